"""MMLU as lm-evaluation-harness's `mmlu` task builds and scores it, through any engine.

    python benchmark.py --models ../shared/models/SmolLM2-135M-Instruct.Q4_1.gguf --mmlu-data ../shared/data/mmlu \\
        --mmlu-limit 100 --mmlu-shots 0 5 --skip-speed --skip-humaneval
    python -c "import mmlu; print(mmlu.build_prompt('virology', mmlu.read_csv(open('../shared/data/mmlu/dev/virology_dev.csv').name)[0], []))"

Same prompt bytes as lm-eval (description, k solved dev examples, "Answer:"), same tokenization of
(context, continuation) as its HFLM._encode_pair, log-likelihood of " A".." D" (or "A".."D" through the
chat template, where lm-eval's --apply_chat_template drops the target delimiter), the first maximum
wins (numpy.argmax), and prompts longer than the model's context keep their last tokens, as lm-eval's
left truncation does. What differs is cost, not result: where the four letters are single tokens, one
forward pass per question reads all four from the next-token distribution (`Engine.next_token_logprobs`);
otherwise each letter is scored as its own sequence (`Engine.loglikelihood`, lm-eval's general path).
Data: the original CSV layout (`--mmlu-data DIR` with test/ and dev/) or the hub's cais/mmlu, read and
checked before any model is loaded.
"""

from __future__ import annotations

import csv
import math
import time
from dataclasses import dataclass
from pathlib import Path

import models
from records import Accuracy, MMLUQuestion, MMLUResult

DEFAULT_DATASET = "cais/mmlu"
DEFAULT_SUBJECTS = ("abstract_algebra", "computer_security", "elementary_mathematics",
                    "high_school_physics", "high_school_chemistry", "logical_fallacies",
                    "machine_learning", "professional_law", "world_religions", "us_foreign_policy")
ALL_SUBJECTS = (
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
TARGET_DELIMITER = " "  # lm-eval's default; "" under --apply_chat_template


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------

@dataclass
class SubjectDocs:
    subject: str
    test: list[dict]  # {"question", "choices" (4 strings), "answer" (0-3)}
    dev: list[dict]  # the few-shot pool, in file order (lm-eval's first_n sampler)


def read_csv(path: str | Path) -> list[dict]:
    """Original MMLU CSV: no header; question, four choices, answer letter.

    Raises:
        UserError: naming the file and line of a row that is not 6 columns ending in A-D.
    """
    docs = []
    with open(path, newline="", encoding="utf-8") as fh:
        for line, row in enumerate(csv.reader(fh), 1):
            if len(row) != 6 or row[5].strip() not in LETTERS:
                raise models.UserError(f"{path}, row {line}: expected 6 columns (question, 4 choices, answer "
                                       f"letter A-D), got {len(row)} column(s)"
                                       + (f" ending in {row[-1].strip()[:20]!r}" if row else "")
                                       + ": fix the row or point --mmlu-data at the original MMLU CSVs.")
            docs.append({"question": row[0], "choices": row[1:5], "answer": LETTERS.index(row[5].strip())})
    return docs


def load_split(subject: str, split: str, data_dir: str | None) -> list[dict]:
    """Questions of one subject and split, from `data_dir` (CSV layout) or the hub's cais/mmlu.

    Raises:
        UserError: a missing or malformed file, or a hub failure (one line with the fix).
    """
    if data_dir:
        path = Path(data_dir) / split / f"{subject}_{split}.csv"
        if not path.is_file():
            raise models.UserError(f"MMLU file {path} is missing: --mmlu-data must hold test/{{subject}}_test.csv "
                                   "and dev/{subject}_dev.csv (the original data.tar layout).")
        return read_csv(path)
    offline = models.hub_unreachable()
    if offline:
        models.go_offline()  # the cached copy, if any, without huggingface_hub's minute of retries
    import datasets
    if offline:
        datasets.config.HF_HUB_OFFLINE = True  # datasets read the variable when it was imported
    try:
        with models.translated_errors(DEFAULT_DATASET):
            rows = datasets.load_dataset(DEFAULT_DATASET, subject, split=split)
    except models.UserError:
        if not offline:
            raise
        raise models.UserError(f"cannot reach the Hugging Face Hub ({offline}) and the MMLU dataset {DEFAULT_DATASET} "
                               "is not in the local cache: pass --mmlu-data DIR with the CSV layout "
                               "(test/{subject}_test.csv, dev/{subject}_dev.csv; e.g. ../shared/data/mmlu), "
                               "or run once with a network to cache it, or --skip-mmlu.") from None
    return [{"question": r["question"], "choices": list(r["choices"]), "answer": int(r["answer"])} for r in rows]


def load_docs(subjects: list[str], shots: list[int], limit: int | None, data_dir: str | None) -> list[SubjectDocs]:
    """Every subject's test questions (first `limit`) and its dev examples, checked up front so that
    bad data is reported before a model spends minutes loading.

    Raises:
        UserError: missing/malformed files, an empty subject, too few dev examples for the shots.
    """
    out = []
    for subject in subjects:
        test = load_split(subject, "test", data_dir)[:limit]
        if not test:
            raise models.UserError(f"MMLU subject {subject} has no test questions in "
                                   f"{data_dir or DEFAULT_DATASET}: check the file, or drop the subject.")
        dev = load_split(subject, "dev", data_dir) if max(shots) > 0 else []
        if len(dev) < max(shots):
            raise models.UserError(f"MMLU subject {subject} has {len(dev)} dev examples, fewer than "
                                   f"--mmlu-shots {max(shots)}: use fewer shots or complete dev/{subject}_dev.csv.")
        out.append(SubjectDocs(subject, test, dev))
    return out


# ----------------------------------------------------------------------------------------------
# Prompts, as lm-eval builds them
# ----------------------------------------------------------------------------------------------

def format_subject(subject: str) -> str:
    return subject.replace("_", " ")


def format_question(doc: dict) -> str:
    """lm-eval's doc_to_text: "{{question.strip()}}\\nA. {{choices[0]}}\\n...\\nAnswer:"."""
    lines = [doc["question"].strip()] + [f"{letter}. {choice}" for letter, choice in zip(LETTERS, doc["choices"])]
    return "\n".join(lines) + "\nAnswer:"


def description(subject: str) -> str:
    return f"The following are multiple choice questions (with answers) about {format_subject(subject)}.\n\n"


def solved_examples(shots: list[dict]) -> str:
    """The few-shot block: each example's text, the target delimiter, its letter, a blank line."""
    return "".join(f"{format_question(s)}{TARGET_DELIMITER}{LETTERS[s['answer']]}\n\n" for s in shots)


def build_prompt(subject: str, doc: dict, shots: list[dict]) -> str:
    """Description, k solved examples ("...Answer: B\\n\\n"), then the question ending in "Answer:"."""
    return description(subject) + solved_examples(shots) + format_question(doc)


def build_chat_messages(subject: str, doc: dict, shots: list[dict]) -> list[dict]:
    """lm-eval --apply_chat_template without --fewshot_as_multiturn: the description is the system
    message; the solved examples and the question are one user message."""
    return [{"role": "system", "content": description(subject)},
            {"role": "user", "content": solved_examples(shots) + format_question(doc)}]


def lm_eval_encode(engine, text: str) -> list[int]:
    """lm-eval's HFLM.tok_encode with add_bos_token unset: the tokenizer's own default for special
    tokens, except none when the text already starts with the BOS string (chat templates)."""
    if engine.bos_text and text.startswith(engine.bos_text):
        return engine.encode(text, add_special_tokens=False)
    return engine.encode(text)


def encode_pair(engine, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's _encode_pair: trailing spaces move to the continuation; encode the whole string
    and split it at the length of the encoded context."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = lm_eval_encode(engine, context + continuation)
    context_ids = lm_eval_encode(engine, context)
    return context_ids, whole[len(context_ids):]


@dataclass
class Request:
    """One question, tokenized as lm-eval would: (context, delimiter + letter) for each letter."""

    subject: str
    index: int
    answer: int
    context_ids: list[int]
    continuation_ids: list[list[int]]  # one list per letter

    @property
    def single_token(self) -> bool:
        return all(len(c) == 1 for c in self.continuation_ids)

    def truncated(self, max_length: int) -> bool:
        """lm-eval feeds (context + continuation)[:-1], keeping its last max_length tokens."""
        return len(self.context_ids) + max(len(c) for c in self.continuation_ids) - 1 > max_length

    def scored_pairs(self, max_length: int) -> list[tuple[list[int], list[int]]]:
        """(context, continuation) per letter with the context left-truncated as lm-eval's
        `(context_enc + continuation_enc)[-(max_length + 1):][:-1]` truncates it."""
        return [(self.context_ids[-(max_length + 1 - len(c)):], c) for c in self.continuation_ids]


def make_request(engine, subject: str, index: int, doc: dict, shots: list[dict], chat_template: bool) -> Request:
    if chat_template:
        context = engine.chat_prompt(build_chat_messages(subject, doc, shots))
        delimiter = ""  # lm-eval: target_delimiter = "" when a chat template is applied
    else:
        context, delimiter = build_prompt(subject, doc, shots), TARGET_DELIMITER
    pairs = [encode_pair(engine, context, f"{delimiter}{letter}") for letter in LETTERS]
    assert all(p[0] == pairs[0][0] for p in pairs), "the context encodes the same for every letter"
    return Request(subject, index, doc["answer"], pairs[0][0], [p[1] for p in pairs])


def build_requests(engine, docs: list[SubjectDocs], shots: int, chat_template: bool) -> list[Request]:
    return [make_request(engine, d.subject, i, doc, d.dev[:shots], chat_template)
            for d in docs for i, doc in enumerate(d.test)]


# ----------------------------------------------------------------------------------------------
# Scoring and summary
# ----------------------------------------------------------------------------------------------

def score(engine, requests: list[Request], batch_size: int, single_pass: bool = True,
          progress=None) -> dict[tuple[str, int], list[float]]:
    """Log-likelihoods of A-D for every request, one subject at a time (so an engine can reuse the
    subject's shared few-shot preamble): one pass per question where the letters are single tokens,
    per letter otherwise."""
    max_length = engine.context_length
    scores = {}
    by_subject: dict[str, list[Request]] = {}
    for r in requests:
        by_subject.setdefault(r.subject, []).append(r)
    for group in by_subject.values():
        fast = [r for r in group if single_pass and r.single_token]
        slow = [r for r in group if not (single_pass and r.single_token)]
        if fast:
            contexts = [r.context_ids[-max_length:] for r in fast]
            lls = engine.next_token_logprobs(contexts, [[c[0] for c in r.continuation_ids] for r in fast], batch_size)
            scores.update({(r.subject, r.index): ll for r, ll in zip(fast, lls)})
        if slow:
            pairs = [p for r in slow for p in r.scored_pairs(max_length)]
            lls = engine.loglikelihood(pairs, max(1, batch_size // 4))
            scores.update({(r.subject, r.index): lls[4 * i:4 * i + 4] for i, r in enumerate(slow)})
        if progress is not None:
            progress.update(len(group))
    return scores


def summarise(requests: list[Request], scores: dict, max_length: int) -> dict:
    """Per-question predictions, per-subject accuracy with CI, micro and macro averages."""
    questions, by_subject = [], {}
    for r in requests:
        lls = scores[(r.subject, r.index)]
        pred = max(range(4), key=lambda i: lls[i])  # first maximum, as numpy.argmax in lm-eval
        questions.append(MMLUQuestion(r.subject, r.index, LETTERS[r.answer], LETTERS[pred], pred == r.answer,
                                      [round(x, 5) for x in lls], r.single_token, r.truncated(max_length)))
        by_subject.setdefault(r.subject, []).append(pred == r.answer)
    subjects = {s: Accuracy.of(sum(v), len(v)) for s, v in by_subject.items()}
    accs = [s.accuracy for s in subjects.values()]
    macro = sum(accs) / len(accs)
    macro_se = math.sqrt(sum(s.accuracy * (1 - s.accuracy) / s.total for s in subjects.values())) / len(accs)
    return dict(subjects=subjects, micro=Accuracy.of(sum(q.correct for q in questions), len(questions)),
                macro={"accuracy": macro, "ci95": [macro - 1.96 * macro_se, macro + 1.96 * macro_se]},
                questions=questions, chance=CHANCE, single_pass_questions=sum(r.single_token for r in requests),
                truncated_prompts=sum(q.truncated for q in questions), max_length=max_length)


def run(engine, docs: list[SubjectDocs], shots: int, args, progress_factory) -> MMLUResult:
    """Build, score and summarise one shot count; `args` gives chat_template, mmlu_batch_size,
    mmlu_limit and mmlu_data."""
    requests = build_requests(engine, docs, shots, args.chat_template)
    start = time.perf_counter()
    with progress_factory(total=len(requests), desc=f"MMLU {shots}-shot") as bar:
        scores = score(engine, requests, args.mmlu_batch_size, progress=bar)
    seconds = time.perf_counter() - start
    return MMLUResult(shots=shots, seconds=seconds, chat_template=args.chat_template, limit=args.mmlu_limit,
                      data=args.mmlu_data or f"hub:{DEFAULT_DATASET}",
                      **summarise(requests, scores, engine.context_length))
