"""LoRA fine-tuning that visibly changes a model in minutes, measured before, during and after.

    python finetune_demo.py --model smollm2-135m
    python finetune_demo.py --model qwen2.5-1.5b --until-format 0.9 --merge
    python finetune_demo.py --show-defaults
    python finetune_demo.py --adapter results/finetune-20261123-070000/adapter

The built-in dataset (data/finetune_json_answers.jsonl, written for this project) teaches one
behaviour code can check: answer every question with one line of JSON,
`{"answer": "...", "confidence": 0.9}`. The held-out prompts are answered greedily before and after
training; the share of valid JSON answers, the held-out loss and token accuracy (response tokens
only) are compared. While training, a fixed subset of held-out prompts is answered every few steps,
so the run shows the step where the behaviour appears (`--until-format` stops there). Training goes
through PEFT LoRA and TRL's SFTTrainer, with padding-free batches (every sequence of a batch
concatenated, position ids restarting per sequence, so no compute is spent on pad tokens). Runs
unchanged under `accelerate launch finetune_demo.py ...` on several GPUs.

Hyper-parameters the user does not give are chosen for the model (its size and whether it is
instruction-tuned; `--show-defaults` prints them with the reason, without loading anything).

Writes results/finetune-<timestamp>/: the adapter (adapter/, with finetune_config.json holding every
argument, the base model id and revision, and the dataset's sha256), finetune_demo.json and .md
(before/after answers, scores, format-vs-step and loss curves, throughput, memory, the dtypes the
base and adapter trained in), and merged/ with --merge.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import energy
import models
import results_io

DATA_DIR = Path(__file__).resolve().parent / "data"
DEFAULT_DATASET = str(DATA_DIR / "finetune_json_answers.jsonl")
DEFAULT_MODEL = "smollm2-135m"
DEFAULT_LORA_R = 8
DEFAULT_LORA_ALPHA = 16
DEFAULT_LORA_DROPOUT = 0.05
# 4 examples per optimizer step, no accumulation: 43 updates per epoch of the 169 built-in training
# examples. A short run learns from the number of updates; 4 x 4 gave 11 per epoch and too few in all.
DEFAULT_BATCH_SIZE = 4
DEFAULT_GRAD_ACCUM = 1
# (parameters up to, LoRA learning rate): smaller models take larger steps. 1e-3 is measured on
# SmolLM2-135M (docs/finetune.md); 2e-4 is the QLoRA paper's rate for 7B-13B models; 5e-4 between.
LEARNING_RATE_BY_SIZE = ((500_000_000, 1e-3), (3_000_000_000, 5e-4), (math.inf, 2e-4))
INSTRUCT_EPOCHS = 1.0  # an instruction-tuned model already answers in turns: only the format is new
BASE_EPOCHS = 2.0  # a base model also learns the turn template and to stop after its answer
CHECKPOINTING_MIN_PARAMS = 1_000_000_000  # recompute activations only for 1B-class models
DEFAULT_MAX_LENGTH = 512
DEFAULT_EVAL_FRACTION = 0.15
DEFAULT_MAX_NEW_TOKENS = 48
DEFAULT_GEN_BATCH_SIZE = 8
DEFAULT_LOGGING_STEPS = 1
DEFAULT_IDLE_SECONDS = 3.0  # idle power before training, where an energy counter exists
DEFAULT_WATCH_EVERY = 5  # optimizer steps between answers to the watched held-out prompts
DEFAULT_WATCH_PROMPTS = 8  # held-out prompts answered at each watch point, spread over the split
DEFAULT_FORMAT_TARGET = 0.9  # share of watched answers in the format: "the behaviour has appeared"
SHOW_DEFAULTS_MODELS = (*models.DEFAULT_MODELS, DEFAULT_MODEL)
DEFAULTED_ARGS = ("lora_r", "lora_alpha", "learning_rate", "batch_size", "grad_accum", "epochs")  # None: per model
BATCHING_MODES = ("padding-free", "padded", "length-grouped")
CHECKS = ("auto", "json-answer", "exact-match", "none")
GRADIENT_CHECKPOINTING = ("auto", "on", "off")
CONFIG_NAME = "finetune_config.json"  # written inside the adapter directory
ANSWERS_NAME = "heldout_answers.json"  # the "after" answers, beside the adapter, for --adapter checks

# model_type -> LoRA targets, for local models the registry does not know.
MODEL_TYPE_LORA_TARGETS = {
    "llama": models.LLAMA_LORA, "mistral": models.LLAMA_LORA, "qwen2": models.LLAMA_LORA,
    "qwen3": models.LLAMA_LORA, "stablelm": models.LLAMA_LORA, "gemma": models.LLAMA_LORA,
    "gemma2": models.LLAMA_LORA, "gemma3": models.LLAMA_LORA, "gemma3_text": models.LLAMA_LORA,
    "phi3": ("qkv_proj",), "gpt_neox": models.NEOX_LORA,
}
PER_MODEL = "per model, see --show-defaults"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=defaults_rule(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    models.add_common_args(parser)
    parser.set_defaults(model=None)  # None: smollm2-135m, or the model recorded with --adapter
    parser.add_argument("--dataset", default=None,
                        help="local .json/.jsonl (instruction/input/output or chat messages) or a hub "
                             "dataset id (default: the built-in data/finetune_json_answers.jsonl)")
    parser.add_argument("--epochs", type=float, default=None, help=f"default: {PER_MODEL}")
    parser.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps")
    parser.add_argument("--max-length", type=int, default=DEFAULT_MAX_LENGTH,
                        help=f"truncate examples to this many tokens (default: {DEFAULT_MAX_LENGTH})")
    parser.add_argument("--learning-rate", type=float, default=None, help=f"default: {PER_MODEL}")
    parser.add_argument("--batch-size", type=int, default=None,
                        help=f"examples per device per micro-batch (default: {DEFAULT_BATCH_SIZE})")
    parser.add_argument("--grad-accum", type=int, default=None,
                        help=f"micro-batches per optimizer step (default: {DEFAULT_GRAD_ACCUM})")
    parser.add_argument("--lora-r", type=int, default=None, help=f"default: {DEFAULT_LORA_R}")
    parser.add_argument("--lora-alpha", type=int, default=None, help=f"default: {DEFAULT_LORA_ALPHA}")
    parser.add_argument("--lora-dropout", type=float, default=DEFAULT_LORA_DROPOUT,
                        help=f"default: {DEFAULT_LORA_DROPOUT}")
    parser.add_argument("--lora-targets", default=None,
                        help="comma-separated module names, or all-linear (default: per family, e.g. "
                             "q_proj,v_proj for Llama-style, query_key_value for GPT-NeoX)")
    parser.add_argument("--batching", default="padding-free", choices=BATCHING_MODES,
                        help="padding-free (default): no pad tokens; padded: TRL's default; "
                             "length-grouped: padded batches of similar lengths")
    parser.add_argument("--gradient-checkpointing", default="auto", choices=GRADIENT_CHECKPOINTING,
                        help="recompute activations to save memory (auto: on for models of 1B+ parameters)")
    parser.add_argument("--eval-fraction", type=float, default=DEFAULT_EVAL_FRACTION,
                        help="held-out share when the dataset has no 'split' field "
                             f"(default: {DEFAULT_EVAL_FRACTION})")
    parser.add_argument("--eval-limit", type=int, default=None,
                        help="answer at most this many held-out prompts (default: all)")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help=f"greedy answer length limit (default: {DEFAULT_MAX_NEW_TOKENS}, or the "
                             "training run's with --adapter)")
    parser.add_argument("--check", default="auto", choices=CHECKS,
                        help="objective score of the answers (auto: json-answer for the built-in "
                             "dataset, exact-match otherwise)")
    parser.add_argument("--watch-every", type=int, default=DEFAULT_WATCH_EVERY,
                        help=f"answer {DEFAULT_WATCH_PROMPTS} held-out prompts every N optimizer steps while "
                             f"training (default: {DEFAULT_WATCH_EVERY}; 0: off)")
    parser.add_argument("--until-format", type=float, default=None, metavar="SHARE",
                        help="stop training once this share of the watched answers is in the taught format, "
                             f"e.g. {DEFAULT_FORMAT_TARGET} (default: train the whole schedule)")
    parser.add_argument("--merge", action="store_true", help="also write the merged model (base + LoRA)")
    parser.add_argument("--adapter", default=None,
                        help="reload a saved adapter and answer the held-out prompts (no training)")
    parser.add_argument("--show-defaults", action="store_true",
                        help="print the hyper-parameters chosen for --model (or for each default model) "
                             "with the reason, and exit; loads and downloads nothing")
    return parser


def validate_args(parser: argparse.ArgumentParser, args) -> None:
    positive = ("epochs", "learning_rate", "batch_size", "grad_accum", "lora_r", "lora_alpha", "max_steps",
                "eval_limit", "max_new_tokens", "max_length")
    for name in positive:
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    if args.watch_every < 0:
        parser.error("--watch-every must be 0 (off) or a number of steps")
    if args.until_format is not None:
        if not 0 < args.until_format <= 1:
            parser.error("--until-format is a share of answers: a number in (0, 1], e.g. 0.9")
        if args.watch_every == 0:
            parser.error("--until-format needs the watch: drop --watch-every 0")
        if args.check not in ("auto", "json-answer"):
            parser.error("--until-format scores the taught JSON format: use it with --check json-answer")
    if not 0 <= args.lora_dropout < 1:
        parser.error("--lora-dropout must be in [0, 1)")
    if not 0 < args.eval_fraction < 1:
        parser.error("--eval-fraction must be between 0 and 1")
    if args.adapter is not None and args.merge:
        parser.error("--merge is for a training run; to merge a saved adapter, train with --merge")
    if args.merge and args.quantize != "none":
        parser.error("--merge needs full-precision base weights (merging into int4/int8 weights rounds the "
                     "update away): train with --quantize none, or keep the adapter separate")


# ----------------------------------------------------------------------------------------------
# Per-model defaults: what teaches the behaviour in minutes depends on the model's size and tuning
# ----------------------------------------------------------------------------------------------

@dataclass
class TrainingDefaults:
    """Hyper-parameters chosen for one model, and why (one line)."""

    params: int
    instruct: bool
    lora_r: int
    lora_alpha: int
    learning_rate: float
    batch_size: int
    grad_accum: int
    epochs: float
    lora_targets: list[str] | None  # None: decided from the loaded model's type
    gradient_checkpointing: bool
    reason: str


def size_label(params: int) -> str:
    return f"{params / 1e9:.3g}B" if params >= 1e9 else f"{params / 1e6:.0f}M"


def rate_label(learning_rate: float) -> str:
    """1e-3, 5e-4: learning rates as people write them."""
    text = f"{learning_rate:.0e}".replace("e-0", "e-")
    return text if float(text) == learning_rate else f"{learning_rate:g}"


def choose_defaults(params: int, instruct: bool, lora_targets=None) -> TrainingDefaults:
    """The rule: learning rate by size, epochs by instruction tuning, checkpointing from 1B up."""
    learning_rate = next(lr for limit, lr in LEARNING_RATE_BY_SIZE if params <= limit)
    epochs = INSTRUCT_EPOCHS if instruct else BASE_EPOCHS
    checkpointing = params >= CHECKPOINTING_MIN_PARAMS
    size_reason = {1e-3: "small model, large LoRA steps (measured on SmolLM2-135M)",
                   5e-4: "1B-class: half the small-model rate, a wider model moves further per step",
                   2e-4: "large model: the QLoRA paper's rate for 7B-13B"}[learning_rate]
    tuning_reason = ("instruction-tuned: it answers in turns already, only the format is new" if instruct
                     else "base model: it also learns the turn template and to stop, so one more epoch")
    memory_reason = ("1B+: activations recomputed to fit laptop memory" if checkpointing
                     else "under 1B: activations fit, recomputing would only cost time")
    reason = (f"lr {rate_label(learning_rate)}: {size_reason}; {epochs:g} epoch{'s' * (epochs != 1)}: "
              f"{tuning_reason}; checkpointing {'on' if checkpointing else 'off'}: {memory_reason}")
    return TrainingDefaults(params, instruct, DEFAULT_LORA_R, DEFAULT_LORA_ALPHA, learning_rate,
                            DEFAULT_BATCH_SIZE, DEFAULT_GRAD_ACCUM, epochs,
                            list(lora_targets) if lora_targets else None, checkpointing, reason)


def defaults_for_spec(spec: models.ModelSpec) -> TrainingDefaults:
    return choose_defaults(spec.params, spec.instruct, spec.lora_targets)


def defaults_for_loaded(loaded: models.Loaded, name: str) -> TrainingDefaults:
    """From the registry entry when the model has one (a GGUF or directory named after it counts),
    else from the loaded weights: parameter count, and whether the tokenizer has a chat template."""
    spec = loaded.resolved.spec or models.find_spec(name)
    if spec is not None:
        return defaults_for_spec(spec)
    return choose_defaults(models.count_parameters(loaded.model), not models.uses_fallback_template(loaded.tokenizer),
                           MODEL_TYPE_LORA_TARGETS.get(loaded.model.config.model_type))


def apply_defaults(args, defaults: TrainingDefaults) -> list[str]:
    """Fill the hyper-parameters the user left out; returns the names taken from `defaults`."""
    taken = [name for name in DEFAULTED_ARGS if getattr(args, name) is None]
    for name in taken:
        setattr(args, name, getattr(defaults, name))
    if args.gradient_checkpointing == "auto":
        args.gradient_checkpointing = "on" if defaults.gradient_checkpointing else "off"
        taken.append("gradient_checkpointing")
    return taken


def defaults_line(name: str, d: TrainingDefaults) -> str:
    targets = ",".join(d.lora_targets) if d.lora_targets else "by model type"
    return (f"{name:<14} {size_label(d.params):>6} {'instruct' if d.instruct else 'base':<8} r {d.lora_r} "
            f"alpha {d.lora_alpha} lr {rate_label(d.learning_rate)} batch {d.batch_size}x{d.grad_accum} epochs "
            f"{d.epochs:g} targets {targets} checkpointing {'on' if d.gradient_checkpointing else 'off'} | {d.reason}")


def defaults_rule() -> str:
    """The rule behind the per-model defaults, for --help (no model is looked at)."""
    tiers = ", ".join(f"{rate_label(lr)} " + (f"up to {size_label(limit)}" if math.isfinite(limit) else "above")
                      for limit, lr in LEARNING_RATE_BY_SIZE)
    return (f"Per-model defaults (the flags above override them): LoRA r {DEFAULT_LORA_R}, alpha "
            f"{DEFAULT_LORA_ALPHA}, batch {DEFAULT_BATCH_SIZE} x accumulation {DEFAULT_GRAD_ACCUM}; learning rate "
            f"{tiers}; epochs: {INSTRUCT_EPOCHS:g} for instruction-tuned models, {BASE_EPOCHS:g} for "
            f"base models; gradient checkpointing from {size_label(CHECKPOINTING_MIN_PARAMS)}. "
            "`--show-defaults` prints them per model with the reason.")


def show_defaults(name: str | None) -> int:
    """One line per model: the registry entry's defaults (nothing is loaded or downloaded)."""
    names = [name] if name else list(SHOW_DEFAULTS_MODELS)
    for n in names:
        spec = models.find_spec(n)
        if spec is None:
            print(f"{n}: not in the registry; its defaults are chosen after loading, from its parameter "
                  "count and whether its tokenizer has a chat template")
            continue
        print(defaults_line(spec.key, defaults_for_spec(spec)))
    return 0


# ----------------------------------------------------------------------------------------------
# Data: records -> (prompt messages, completion) -> token ids with a completion mask
# ----------------------------------------------------------------------------------------------

@dataclass
class Example:
    """One conversation: the prompt messages, the reference answer, and which split it is in."""

    prompt: list[dict]
    completion: str
    split: str | None = None


def read_records(path: Path) -> list[dict]:
    """Rows of a .jsonl (one object a line) or .json (a list of objects) file.

    Raises:
        UserError: naming the file and line of the first malformed row.
    """
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        rows = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise models.UserError(f"{path} line {number}: not valid JSON ({exc.msg}): fix the line; "
                                       "each line must be one JSON object") from None
        return rows
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as exc:
        raise models.UserError(f"{path} line {exc.lineno}: not valid JSON ({exc.msg}): fix the file; it must "
                               "hold a list of objects") from None
    if isinstance(rows, dict) and isinstance(rows.get("data"), list):
        rows = rows["data"]
    if not isinstance(rows, list):
        raise models.UserError(f"{path}: expected a JSON list of examples, got {type(rows).__name__}")
    return rows


def load_records(dataset: str) -> tuple[list[dict], dict]:
    """Rows from a local file or a hub dataset, and where they came from (with a sha256).

    Raises:
        UserError: missing file, unsupported extension, unreachable hub dataset.
    """
    path = Path(dataset).expanduser()
    if path.suffix in (".json", ".jsonl") or path.exists():
        if not path.is_file():
            raise models.UserError(f"dataset file '{dataset}' not found: pass a .json or .jsonl file or a hub "
                                   "dataset id like org/name")
        if path.suffix not in (".json", ".jsonl"):
            raise models.UserError(f"dataset '{dataset}': expected a .json or .jsonl file")
        rows = read_records(path)
        return rows, {"source": "file", "path": str(path), "sha256": models.file_sha256(path)}
    import datasets
    try:
        hub = datasets.load_dataset(dataset, split="train")
    except Exception as exc:  # noqa: BLE001  datasets raises many types; all mean "cannot load it"
        raise models.UserError(f"cannot load dataset '{dataset}' ({type(exc).__name__}: "
                               f"{str(exc).splitlines()[0][:160]}): pass a local .json/.jsonl file, or "
                               "connect to the Hugging Face Hub") from None
    rows = [dict(r) for r in hub]
    digest = hashlib.sha256(results_io.to_json(rows).encode()).hexdigest()
    return rows, {"source": "hub", "id": dataset, "fingerprint": hub._fingerprint, "sha256": digest}


def record_to_example(row, where: str) -> Example:
    """instruction/input/output or {"messages": [...]} (the last message is the assistant's answer).

    Raises:
        UserError: a row in neither shape, naming `where` (file and row).
    """
    if not isinstance(row, dict):
        raise models.UserError(f"{where}: expected a JSON object, got {type(row).__name__}")
    split = row.get("split")
    if "messages" in row:
        messages = row["messages"]
        ok = (isinstance(messages, list) and len(messages) >= 2
              and all(isinstance(m, dict) and isinstance(m.get("content"), str) and "role" in m for m in messages)
              and messages[-1]["role"] == "assistant")
        if not ok:
            raise models.UserError(f"{where}: 'messages' must be a list of {{role, content}} ending with an "
                                   "assistant message")
        prompt = [{"role": m["role"], "content": m["content"]} for m in messages[:-1]]
        return Example(prompt, messages[-1]["content"], split)
    instruction, output = row.get("instruction"), row.get("output")
    if not isinstance(instruction, str) or not isinstance(output, str) or not instruction.strip():
        raise models.UserError(f"{where}: needs string fields 'instruction' and 'output' (and optional "
                               "'input'), or 'messages': fix the row or the file")
    context = row.get("input") or ""
    user = f"{instruction}\n\n{context}" if context.strip() else instruction
    return Example([{"role": "user", "content": user}], output, split)


def load_examples(dataset: str) -> tuple[list[Example], dict]:
    rows, source = load_records(dataset)
    if not rows:
        raise models.UserError(f"dataset '{dataset}' has no examples")
    name = source.get("path") or source.get("id")
    examples = [record_to_example(row, f"{name} row {i + 1}") for i, row in enumerate(rows)]
    source["examples"] = len(examples)
    return examples, source


def split_examples(examples: list[Example], eval_fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """The dataset's own 'split' field when present; otherwise a seeded `eval_fraction` hold-out.

    Raises:
        UserError: when either side would be empty.
    """
    import random
    if any(e.split is not None for e in examples):
        train = [e for e in examples if e.split != "test"]
        held_out = [e for e in examples if e.split == "test"]
    else:
        order = list(range(len(examples)))
        random.Random(seed).shuffle(order)
        n_test = max(1, round(len(examples) * eval_fraction))
        test_ids = set(order[:n_test])
        train = [e for i, e in enumerate(examples) if i not in test_ids]
        held_out = [e for i, e in enumerate(examples) if i in test_ids]
    if not train or not held_out:
        raise models.UserError(f"the dataset splits into {len(train)} training and {len(held_out)} held-out "
                               "examples: it needs at least one of each (add examples or change --eval-fraction)")
    return train, held_out


def prompt_text(tokenizer, prompt: list[dict]) -> str:
    return tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)


def tokenize_example(tokenizer, example: Example, max_length: int) -> dict:
    """Token ids of prompt + answer through the chat template, and a mask that is 1 on answer tokens.

    The answer starts where the ids of the prompt alone and of the whole conversation diverge, so a
    token merged across the boundary counts as answer. The answer ends with the end-of-turn token
    (the model must learn to stop); base-model templates get the EOS token appended.
    Returns {"input_ids": [...], "completion_mask": [...]}, truncated to `max_length` from the end.
    """
    prompt_ids = tokenizer(prompt_text(tokenizer, example.prompt), add_special_tokens=False)["input_ids"]
    full = tokenizer.apply_chat_template(example.prompt + [{"role": "assistant", "content": example.completion}],
                                         tokenize=False)
    full_ids = tokenizer(full, add_special_tokens=False)["input_ids"]
    start = 0
    while start < min(len(prompt_ids), len(full_ids)) and prompt_ids[start] == full_ids[start]:
        start += 1
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in full_ids[start:]:
        full_ids = full_ids + [tokenizer.eos_token_id]
    mask = [0] * start + [1] * (len(full_ids) - start)
    return {"input_ids": full_ids[:max_length], "completion_mask": mask[:max_length]}


def build_dataset(tokenizer, examples: list[Example], max_length: int):
    """A datasets.Dataset of tokenized examples; examples left with no answer tokens are dropped."""
    import datasets
    rows = [tokenize_example(tokenizer, e, max_length) for e in examples]
    rows = [r for r in rows if any(r["completion_mask"])]
    if not rows:
        raise models.UserError(f"--max-length {max_length} leaves no answer tokens in any example: raise it")
    return datasets.Dataset.from_list(rows)


# ----------------------------------------------------------------------------------------------
# Objective checks of the answers
# ----------------------------------------------------------------------------------------------

def parse_json_answer(text: str) -> dict | None:
    """The answer as a dict when it is exactly one line of JSON {"answer": str, "confidence": 0..1}."""
    text = text.strip()
    if not text or "\n" in text:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    if not isinstance(value, dict) or set(value) != {"answer", "confidence"}:
        return None
    answer, confidence = value["answer"], value["confidence"]
    if not isinstance(answer, str) or not answer.strip():
        return None
    if isinstance(confidence, bool) or not isinstance(confidence, (int, float)) or not 0 <= confidence <= 1:
        return None
    return value


def check_json_answer(text: str) -> bool:
    return parse_json_answer(text) is not None


def normalise(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).strip()


def answer_is_correct(text: str, reference: str, check: str) -> bool:
    """json-answer: same 'answer' field as the reference JSON; exact-match: same normalised text."""
    if check == "json-answer":
        got, want = parse_json_answer(text), parse_json_answer(reference)
        return got is not None and want is not None and normalise(got["answer"]) == normalise(want["answer"])
    return normalise(text) == normalise(reference)


def interval_pct(hits: int, n: int) -> tuple[float, float]:
    """95% Wilson interval of hits / n, in percent like the scores beside it."""
    return tuple(round(100 * x, 1) for x in results_io.wilson_interval(hits, n))


def score_answers(answers: list[str], references: list[str], check: str) -> dict:
    """% of answers passing the behaviour check and % correct, with 95% Wilson intervals."""
    n = len(answers)
    out = {"check": check, "n": n}
    if check == "json-answer":
        valid = sum(check_json_answer(a) for a in answers)
        out.update(format_valid=valid, format_valid_pct=round(100 * valid / n, 1),
                   format_valid_ci95=interval_pct(valid, n))
    if check != "none":
        correct = sum(answer_is_correct(a, r, check) for a, r in zip(answers, references))
        out.update(correct=correct, correct_pct=round(100 * correct / n, 1), correct_ci95=interval_pct(correct, n))
    return out


def resolve_check(check: str, dataset: str) -> str:
    if check != "auto":
        return check
    return "json-answer" if Path(dataset).resolve() == Path(DEFAULT_DATASET).resolve() else "exact-match"


# ----------------------------------------------------------------------------------------------
# Model, LoRA and trainer
# ----------------------------------------------------------------------------------------------

def distributed_rank() -> tuple[int, int | None]:
    """(global rank, local rank) under `accelerate launch` / torchrun; (0, None) otherwise."""
    local = os.environ.get("LOCAL_RANK")
    return int(os.environ.get("RANK", 0)), (int(local) if local is not None else None)


def load_base_model(args, name: str) -> models.Loaded:
    """The base model via models.load, on this process's GPU when launched distributed."""
    _, local_rank = distributed_rank()
    device = args.device
    if local_rank is not None and models.pick_device(device).type == "cuda":
        device = f"cuda:{local_rank}"  # one GPU per process; never every rank on cuda:0
    return models.load(name, device=device, dtype=args.dtype, quantize=args.quantize,
                       revision=args.revision, cache_dir=args.cache_dir, trust_remote_code=args.trust_remote_code)


def resolve_lora_targets(requested: str | None, loaded: models.Loaded) -> list[str] | str:
    """Module names LoRA wraps: the flag, else the registry entry, else by config.model_type.

    Raises:
        UserError: an unknown model type without --lora-targets, or names the model lacks.
    """
    if requested == "all-linear":
        return "all-linear"
    if requested:
        targets = [t.strip() for t in requested.split(",") if t.strip()]
    elif loaded.resolved.spec is not None:
        targets = list(loaded.resolved.spec.lora_targets)
    else:
        model_type = loaded.model.config.model_type
        if model_type not in MODEL_TYPE_LORA_TARGETS:
            raise models.UserError(f"no default LoRA targets for model type '{model_type}': pass "
                                   "--lora-targets q_proj,v_proj (module names) or --lora-targets all-linear")
        targets = list(MODEL_TYPE_LORA_TARGETS[model_type])
    names = {name.rsplit(".", 1)[-1] for name, _ in loaded.model.named_modules()}
    missing = [t for t in targets if t not in names]
    if missing:
        raise models.UserError(f"the model has no modules named {', '.join(missing)}: pass --lora-targets with "
                               "names from the model (or all-linear)")
    return targets


def lora_config(args, targets):
    from peft import LoraConfig
    return LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                      target_modules=targets, bias="none", task_type="CAUSAL_LM")


def sft_config(args, loaded: models.Loaded, out_dir: Path, checkpointing: bool):
    """TRL's SFTConfig for our run: loss on answer tokens only, no checkpoints, a log every step."""
    import torch
    from trl import SFTConfig
    padding_free = args.batching == "padding-free"
    return SFTConfig(
        output_dir=str(out_dir), num_train_epochs=args.epochs, max_steps=args.max_steps or -1,
        per_device_train_batch_size=args.batch_size, per_device_eval_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum, learning_rate=args.learning_rate,
        logging_steps=DEFAULT_LOGGING_STEPS, save_strategy="no", report_to="none", seed=args.seed,
        data_seed=args.seed, gradient_checkpointing=checkpointing,
        bf16=loaded.dtype == torch.bfloat16, fp16=loaded.dtype == torch.float16,
        use_cpu=loaded.device.type == "cpu", completion_only_loss=True,
        # Our examples are truncated at tokenization; TRL refuses max_length with padding-free batches.
        padding_free=padding_free, max_length=None if padding_free else args.max_length,
        train_sampling_strategy="group_by_length" if args.batching == "length-grouped" else "random",
        disable_tqdm=not os.isatty(2), dataloader_pin_memory=False,
    )


def prepare_for_kbit(args, model, checkpointing: bool):
    """QLoRA: cast norms to fp32 and enable input grads on a bitsandbytes-quantized model."""
    if args.quantize == "none":
        return model
    from peft import prepare_model_for_kbit_training
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing)


def make_trainer(args, loaded: models.Loaded, train_ds, eval_ds, out_dir: Path):
    """SFTTrainer wrapping the base model with a fresh LoRA adapter (`args` after `apply_defaults`)."""
    from trl import SFTTrainer
    assert all(getattr(args, name) is not None for name in DEFAULTED_ARGS), "apply_defaults(args, ...) first"
    targets = resolve_lora_targets(args.lora_targets, loaded)
    checkpointing = args.gradient_checkpointing == "on"
    model = prepare_for_kbit(args, loaded.model, checkpointing)
    with models.translated_errors(loaded.label, loaded.device):
        return SFTTrainer(model=model, args=sft_config(args, loaded, out_dir, checkpointing),
                          train_dataset=train_ds, eval_dataset=eval_ds, processing_class=loaded.tokenizer,
                          peft_config=lora_config(args, targets))


def trainable_parameters(model) -> dict:
    trainable, total = model.get_nb_trainable_parameters()
    return {"trainable": trainable, "total": total, "trainable_pct": round(100 * trainable / total, 4)}


def precision(trainer) -> dict:
    """The dtypes training really uses, read from the parameters: frozen base weights, trainable
    (LoRA) weights, and the autocast the Trainer wraps the forward pass in. PEFT upcasts bf16/fp16
    adapters to fp32 (`autocast_adapter_dtype=True`, which SFTTrainer keeps outside DeepSpeed ZeRO-3),
    so the optimizer updates fp32 weights while the base computes in bf16."""
    def names(params) -> str:
        return "/".join(sorted({models.dtype_name(p.dtype) for p in params})) or "none"
    params = list(trainer.model.parameters())
    autocast = "bf16" if trainer.args.bf16 else "fp16" if trainer.args.fp16 else "none"
    return {"base_dtype": names(p for p in params if not p.requires_grad),
            "adapter_dtype": names(p for p in params if p.requires_grad), "autocast": autocast}


def optimizer_state_dtype(trainer) -> str:
    """dtype of AdamW's moment estimates after training (they follow the trainable weights)."""
    import torch
    states = trainer.optimizer.state.values() if trainer.optimizer is not None else []
    found = {models.dtype_name(v.dtype) for state in states for v in state.values()
             if torch.is_tensor(v) and v.dim() > 0}
    return "/".join(sorted(found)) or "none"


def evaluate_held_out(trainer, eval_ds) -> dict:
    """Held-out loss and next-token accuracy over answer tokens (TRL's own eval metrics)."""
    metrics = trainer.evaluate(eval_dataset=eval_ds)
    return {"loss": round(metrics["eval_loss"], 4),
            "token_accuracy": round(metrics["eval_mean_token_accuracy"], 4)}


# ----------------------------------------------------------------------------------------------
# Generation: greedy answers to the held-out prompts
# ----------------------------------------------------------------------------------------------

def generate_answers(model, tokenizer, prompts: list[list[dict]], max_new_tokens: int,
                     batch_size: int = DEFAULT_GEN_BATCH_SIZE) -> list[str]:
    """Greedy answers, batched with left padding; cut at the end-of-turn token or stop string."""
    import torch
    model.eval()
    device = next(model.parameters()).device
    stops = models.stop_strings(tokenizer)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    answers = []
    try:
        for i in range(0, len(prompts), batch_size):
            texts = [prompt_text(tokenizer, p) for p in prompts[i:i + batch_size]]
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            extra = {"stop_strings": stops, "tokenizer": tokenizer} if stops else {}
            with torch.no_grad():  # use_cache: the Trainer sets config.use_cache=False
                out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                                     pad_token_id=tokenizer.pad_token_id, **extra)
            for row in out[:, enc["input_ids"].shape[1]:]:
                text = tokenizer.decode(row, skip_special_tokens=True)
                for stop in stops:
                    text = text.split(stop)[0]
                answers.append(text.strip())
    finally:
        tokenizer.padding_side = side
    return answers


# ----------------------------------------------------------------------------------------------
# Watching the objective while training: a fixed held-out subset, answered every few steps
# ----------------------------------------------------------------------------------------------

@dataclass
class WatchPoint:
    """The watched held-out answers at one optimizer step."""

    step: int
    format_valid: int | None  # None unless the check is json-answer
    correct: int
    n: int
    source: str  # "before", "watch" (during training) or "after"
    seconds: float = 0.0  # greedy answering time at this point, s (0: taken from the before/after answers)
    elapsed_s: float = 0.0  # wall time from the start of training to this point, s (earlier watch points included)
    training_s: float = 0.0  # the same without the earlier watch points' answering time, s

    @property
    def share(self) -> float:
        """The score the watch follows: answers in the taught format, else correct answers."""
        return (self.format_valid if self.format_valid is not None else self.correct) / self.n


def watch_indices(n_held_out: int, n: int = DEFAULT_WATCH_PROMPTS) -> list[int]:
    """`n` held-out positions spread evenly over the split, so the watched prompts mix the built-in
    data's categories (spelling, arithmetic, passages, general knowledge, weekdays, ...)."""
    if n_held_out <= n:
        return list(range(n_held_out))
    return [i * n_held_out // n for i in range(n)]


class FormatWatch:
    """Answers the watched prompts greedily with the current weights every `every` optimizer steps
    (eval mode, no gradients, then back to training) and says when training may stop."""

    def __init__(self, model, tokenizer, held_out: list[Example], check: str, args):
        self.model, self.tokenizer, self.check = model, tokenizer, check
        self.indices = watch_indices(len(held_out))
        self.examples = [held_out[i] for i in self.indices]
        self.every, self.max_new_tokens, self.target = args.watch_every, args.max_new_tokens, args.until_format
        self.points: list[WatchPoint] = []
        self.seconds = 0.0  # answering time inside trainer.train(), s: kept out of the training tokens/s
        self.started = time.perf_counter()  # reset when training begins
        self.stopped_at: int | None = None

    def record(self, step: int, answers: list[str], source: str, seconds: float = 0.0,
               elapsed: float = 0.0) -> WatchPoint:
        score = score_answers(answers, [e.completion for e in self.examples], self.check)
        point = WatchPoint(step, score.get("format_valid"), score.get("correct", 0), len(answers), source,
                           round(seconds, 2), round(elapsed, 1), round(max(0.0, elapsed - self.seconds), 1))
        self.points.append(point)
        return point

    def measure(self, step: int) -> bool:
        """Answer the watched prompts now; True when the --until-format target is reached."""
        start = time.perf_counter()
        answers = generate_answers(self.model, self.tokenizer, [e.prompt for e in self.examples],
                                   self.max_new_tokens)
        self.model.train()
        seconds = time.perf_counter() - start
        point = self.record(step, answers, "watch", seconds, start - self.started)
        self.seconds += seconds
        what = "in the format" if point.format_valid is not None else "correct"
        print(f"step {step}, {point.elapsed_s:.0f} s into training: {round(point.share * point.n)}/{point.n} "
              f"watched answers {what} (answered in {seconds:.1f} s)", flush=True)
        if self.target is not None and point.share >= self.target:
            self.stopped_at = step
            return True
        return False

    def summary(self) -> dict:
        target = self.target if self.target is not None else DEFAULT_FORMAT_TARGET
        reached = next((p for p in self.points if p.share >= target), None)
        return {"every": self.every, "prompts": len(self.examples), "held_out_indices": self.indices,
                "check": self.check, "until_format": self.target, "target": target,
                "first_step_at_target": reached.step if reached else None,
                "training_seconds_to_target": reached.training_s if reached else None,
                "seconds_to_target": reached.elapsed_s if reached else None, "stopped_at": self.stopped_at,
                "answering_seconds": round(self.seconds, 2), "curve": [asdict(p) for p in self.points]}


def watch_callback(watch: FormatWatch):
    """A TrainerCallback that runs the watch after every `watch.every`-th optimizer step."""
    from transformers import TrainerCallback

    class Watch(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            watch.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step % watch.every == 0 and watch.measure(state.global_step):
                control.should_training_stop = True
    return Watch()


# ----------------------------------------------------------------------------------------------
# Measuring: peak memory and the training run
# ----------------------------------------------------------------------------------------------

def memory_summary(memory: models.PeakMemory) -> dict:
    """Peak process RSS (and peak CUDA allocation) in MB, as the training report shows them."""
    report = memory.report()
    out = {"peak_rss_mb": round(report["peak_rss_bytes"] / 2**20, 1)}
    if "cuda_max_allocated_bytes" in report:
        out["peak_cuda_allocated_mb"] = round(report["cuda_max_allocated_bytes"] / 2**20, 1)
    return out


def loss_curve(log_history: list[dict]) -> list[dict]:
    """Per logging step: step, training loss, token accuracy, learning rate, real tokens so far."""
    return [{"step": e["step"], "loss": round(e["loss"], 4),
             "token_accuracy": round(e.get("mean_token_accuracy", math.nan), 4),
             "learning_rate": e.get("learning_rate"), "num_tokens": e.get("num_tokens")}
            for e in log_history if "loss" in e and "step" in e]


def train(trainer, device, watch: FormatWatch | None = None, meter: energy.EnergyMeter | None = None) -> dict:
    """Run training; wall time, real (non-pad) tokens/s, steps, peak memory, the loss curve, and the
    energy of the run per 1k trained tokens where a counter exists.

    Tokens/s divides by the training time without the watch's answering time: what the watch costs
    is reported on its own (`watch_seconds`) and the wall time still includes it (so does the energy)."""
    meter = meter or energy.EnergyMeter([], "no meter given")
    models.synchronize(device)
    start = time.perf_counter()
    with models.PeakMemory(device, interval=0.05) as memory, meter.window() as joules:
        output = trainer.train()
    models.synchronize(device)
    wall = time.perf_counter() - start
    curve = loss_curve(trainer.state.log_history)
    tokens = int(curve[-1]["num_tokens"]) if curve and curve[-1]["num_tokens"] else 0
    watch_seconds = watch.seconds if watch is not None else 0.0
    train_seconds = output.metrics["train_runtime"] - watch_seconds
    return {"wall_seconds": round(wall, 2), "train_runtime_s": round(output.metrics["train_runtime"], 2),
            "watch_seconds": round(watch_seconds, 2), "training_seconds": round(train_seconds, 2),
            "steps": trainer.state.global_step, "epochs": round(trainer.state.epoch or 0, 3),
            "tokens": tokens, "tokens_per_second": round(tokens / train_seconds, 1),
            "final_train_loss": curve[-1]["loss"] if curve else None,
            "optimizer_state_dtype": optimizer_state_dtype(trainer),
            "energy": joules.reading.summary(tokens / 1000, "1k trained tokens") if joules.reading and tokens else None,
            "memory": memory_summary(memory), "loss_curve": curve}


# ----------------------------------------------------------------------------------------------
# Saving and reloading
# ----------------------------------------------------------------------------------------------

def resolved_config(args, loaded: models.Loaded, source: dict, targets, checkpointing: bool,
                    defaults: TrainingDefaults, taken: list[str]) -> dict:
    """Everything needed to rebuild this run: arguments, base model and revision, dataset hash, and
    the per-model defaults with the arguments that came from them (the rest the user set)."""
    return {"arguments": {k: v for k, v in vars(args).items()},
            "defaults": {**asdict(defaults), "taken": taken},
            "base_model": {"name": args.model, "hf_id": loaded.resolved.spec.hf_id if loaded.resolved.spec else None,
                           "path": loaded.resolved.path, "gguf_file": loaded.resolved.gguf_file,
                           "revision": loaded.revision, "model_type": loaded.model.config.model_type},
            "dataset": source, "lora_targets": targets, "gradient_checkpointing": checkpointing,
            "dtype": models.dtype_name(loaded.dtype), "device": str(loaded.device),
            "packages": results_io.package_versions()}


def save_adapter(model, tokenizer, adapter_dir: Path, config: dict) -> None:
    # The vocabulary is never resized, so the base embeddings need no saving; "auto" would look the
    # base model's path up on the Hugging Face Hub (and warn when it is a local GGUF directory).
    model.save_pretrained(adapter_dir, save_embedding_layers=False)
    tokenizer.save_pretrained(adapter_dir)
    results_io.atomic_write_text(adapter_dir / CONFIG_NAME, results_io.to_json(config))


def save_merged(model, tokenizer, merged_dir: Path) -> None:
    """Fold the LoRA weights into the base weights and save a plain model directory."""
    merged = model.merge_and_unload()
    merged.save_pretrained(merged_dir)
    tokenizer.save_pretrained(merged_dir)


def read_adapter_config(adapter_dir: Path) -> dict:
    path = adapter_dir / CONFIG_NAME
    if not (adapter_dir / "adapter_config.json").is_file():
        raise models.UserError(f"'{adapter_dir}' holds no adapter (adapter_config.json missing): pass the "
                               "adapter/ directory of a finetune_demo.py run")
    if not path.is_file():
        raise models.UserError(f"'{adapter_dir}' has no {CONFIG_NAME}: pass --model and --dataset, or use an "
                               "adapter saved by finetune_demo.py")
    return json.loads(path.read_text(encoding="utf-8"))


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------

def sparkline(values: list[float]) -> str:
    """`▇▆▅▃▂▁`: one block per value, scaled between the smallest and largest."""
    blocks = "▁▂▃▄▅▆▇█"
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return ""
    low, high = min(values), max(values)
    span = (high - low) or 1.0
    return "".join(blocks[min(7, int((v - low) / span * 7.999))] for v in values)


def short(text: str, limit: int = 90) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


def score_rows(before: dict, after: dict) -> list[list]:
    rows = []
    def interval(stage: dict, key: str) -> str:
        return "{:g}–{:g}".format(*stage[key]) if key in stage else "n/a"
    if "format_valid_pct" in after:
        rows.append(["answers in the taught format (%)", before.get("format_valid_pct"), after["format_valid_pct"],
                     f"{interval(before, 'format_valid_ci95')} → {interval(after, 'format_valid_ci95')}"])
    if "correct_pct" in after:
        rows.append(["answers matching the reference (%)", before.get("correct_pct"), after["correct_pct"],
                     f"{interval(before, 'correct_ci95')} → {interval(after, 'correct_ci95')}"])
    for key, label in (("loss", "held-out loss (answer tokens)"), ("token_accuracy", "held-out token accuracy")):
        if key in after:
            rows.append([label, before.get(key), after[key], ""])
    return rows


def energy_cell(joules: dict | None, meter: dict) -> str:
    """'2,310 J = 4.2 J per 1k trained tokens (1.1 above idle), 25 W', or why it was not measured."""
    if not joules:
        return meter.get("reason") or "not measured"
    per = joules["per_unit"]
    above = f" ({per['above_idle_j_per_unit']:.3g} above idle)" if per["above_idle_j_per_unit"] is not None else ""
    return (f"{joules['total_j']:,.0f} J = {per['j_per_unit']:.3g} J per 1k trained tokens{above}, "
            f"{joules['avg_watts']:.1f} W ({joules['counter']})")


def training_markdown(result: dict) -> list[str]:
    """Settings and why, dtypes, time and memory; the format-vs-step curve; the loss curve."""
    training, lora, config = result["training"], result["lora"], result["config"]
    arguments, defaults, prec = config["arguments"], config["defaults"], result["precision"]
    user_set = [name for name in (*DEFAULTED_ARGS, "gradient_checkpointing") if name not in defaults["taken"]]
    lines = ["## Training", "", results_io.markdown_table(["", "value"], [
        ["LoRA targets / r / alpha", f"{config['lora_targets']} / {arguments['lora_r']} / {arguments['lora_alpha']}"],
        ["learning rate / batch x accumulation / epochs", f"{arguments['learning_rate']:g} / {arguments['batch_size']} "
                                                          f"x {arguments['grad_accum']} / {arguments['epochs']:g}"],
        ["defaults chosen for this model", defaults["reason"]],
        ["set on the command line instead", ", ".join(user_set) or "nothing"],
        ["trainable parameters", f"{lora['trainable']:,} of {lora['total']:,} ({lora['trainable_pct']}%)"],
        ["base weights / LoRA weights / optimizer state dtype",
         f"{prec['base_dtype']} / {prec['adapter_dtype']} / {training['optimizer_state_dtype']} "
         f"(autocast: {prec['autocast']})"],
        ["batching, gradient checkpointing", f"{arguments['batching']}, {arguments['gradient_checkpointing']}"],
        ["optimizer steps / epochs", f"{training['steps']} / {training['epochs']}"],
        ["training wall time", f"{training['wall_seconds']} s, of which {training['watch_seconds']} s answering "
                               "the watched prompts"],
        ["training tokens/s (real tokens, no padding, watch time excluded)", training["tokens_per_second"]],
        ["peak memory", ", ".join(f"{k} {v}" for k, v in training["memory"].items())],
        ["energy of the training run", energy_cell(training.get("energy"),
                                                   (result.get("environment") or {}).get("energy") or {})],
        ["whole run wall time", f"{result.get('total_wall_seconds')} s"],
        ["load average at start / end (1, 5, 15 min)", " / ".join(" ".join(map(str, result.get(key) or ["n/a"]))
                                                                  for key in ("load_average", "load_average_end"))],
        ["torch CPU threads", result.get("torch_threads")],
    ]), ""]
    watch = training.get("format_watch")
    if watch:
        lines += watch_markdown(watch)
    losses = [p["loss"] for p in training["loss_curve"]]
    if losses:
        lines += [f"Training loss per step ({losses[0]} → {losses[-1]}): `{sparkline(losses)}`", "", "```",
                  results_io.bar_chart([(f"step {p['step']}", p["loss"]) for p in training["loss_curve"]],
                                       digits=3).rstrip(), "```", ""]
    return lines


def watch_markdown(watch: dict) -> list[str]:
    what = "in the taught format" if watch["check"] == "json-answer" else "correct"
    reached = watch["first_step_at_target"]
    stop = (f"; training stopped there (--until-format {watch['until_format']:g})" if watch["stopped_at"] is not None
            else "")
    head = (f"≥ {watch['target']:.0%} first reached at step {reached}, {watch['seconds_to_target']:.0f} s into "
            f"training ({watch['training_seconds_to_target']:.0f} s of it training, the rest answering){stop}"
            if reached is not None else f"{watch['target']:.0%} not reached")
    points = watch["curve"]
    shares = [100 * (p["format_valid"] if p["format_valid"] is not None else p["correct"]) / p["n"] for p in points]
    return [f"## Held-out answers {what} while training", "",
            f"{watch['prompts']} held-out prompts (positions {watch['held_out_indices']}), answered greedily every "
            f"{watch['every']} optimizer steps with the current weights ({watch['answering_seconds']} s in all); "
            f"step 0 is the untrained model, the last point the final weights. {head}.", "", "```",
            results_io.bar_chart([(f"step {p['step']} ({p['elapsed_s']:.0f} s)", v) for p, v in zip(points, shares)],
                                 unit="%").rstrip(),
            "```", ""]


def render_markdown(result: dict) -> str:
    """The run as Markdown: scores before/after, loss curve, throughput, answers side by side."""
    m, before, after = result["model"], result.get("before", {}), result.get("after", {})
    lines = [f"# Fine-tune: {m['model']} ({m['dtype']}, {m['device_name']})", ""]
    lines += [results_io.markdown_table(["", "before", "after", "95% CI before → after"],
                                        score_rows(before, after)), ""]
    training = result.get("training")
    if training:
        lines += training_markdown(result)
    if result.get("reproduced"):
        rep = result["reproduced"]
        lines += [f"Reloaded adapter reproduces the saved 'after' answers: {rep['identical']}/{rep['n']} identical.", ""]
    answers = result.get("answers", [])
    if answers:
        lines += ["## Held-out answers (greedy)", ""]
        lines += [results_io.markdown_table(["prompt", "reference", "before", "after"],
                                            [[short(a["prompt"], 60), short(a["reference"], 50),
                                              short(a.get("before", "")), short(a.get("after", ""))]
                                             for a in answers]), ""]
    lines += ["## Environment", "", results_io.environment_markdown(result["environment"])]
    return "\n".join(lines)


def print_side_by_side(answers: list[dict]) -> None:
    for a in answers:
        print(f"\nQ: {short(a['prompt'], 100)}\n   before: {short(a.get('before', ''), 100)}\n"
              f"   after:  {short(a.get('after', ''), 100)}")


# ----------------------------------------------------------------------------------------------
# Runs
# ----------------------------------------------------------------------------------------------

class Run:
    """One run directory; `save()` rewrites its JSON + Markdown after each finished stage."""

    def __init__(self, args, kind: str):
        self.rank, _ = distributed_rank()
        self.dir = Path(args.output_dir) / f"{kind}-{results_io.timestamp()}"
        self.json_path = self.dir / "finetune_demo.json"
        self.start = time.perf_counter()
        import torch
        self.result: dict = {"script": "finetune_demo", "load_average": results_io.load_average(),
                             "torch_threads": torch.get_num_threads()}

    def save(self) -> None:
        if self.rank != 0:
            return
        self.result["total_wall_seconds"] = round(time.perf_counter() - self.start, 1)
        self.result["load_average_end"] = results_io.load_average()  # other work on the machine meanwhile
        results_io.write_results(self.json_path, self.result, render_markdown(self.result))


def answer_table(held_out: list[Example]) -> list[dict]:
    return [{"prompt": e.prompt[-1]["content"], "reference": e.completion} for e in held_out]


def answer_and_score(stage: str, run: Run, model, tokenizer, held_out: list[Example], args, check: str) -> list[str]:
    """Greedy answers to the held-out prompts, stored in the run under `stage` with their score."""
    print(f"answering {len(held_out)} held-out prompts ({stage}) ...", flush=True)
    answers = generate_answers(model, tokenizer, [e.prompt for e in held_out], args.max_new_tokens)
    for row, text in zip(run.result["answers"], answers):
        row[stage] = text
    run.result.setdefault(stage, {}).update(score_answers(answers, [e.completion for e in held_out], check))
    return answers


def start_watch(trainer, tokenizer, held_out: list[Example], check: str, args,
                before: list[str]) -> FormatWatch | None:
    """The held-out watch hooked into the trainer, its step-0 point taken from the untrained answers;
    None when off (--watch-every 0, or nothing to check)."""
    if not args.watch_every or check == "none":
        return None
    watch = FormatWatch(trainer.model, tokenizer, held_out, check, args)
    watch.record(0, [before[i] for i in watch.indices], "before")
    trainer.add_callback(watch_callback(watch))
    return watch


def finish_watch(watch: FormatWatch, training: dict, after: list[str]) -> None:
    """The final weights' point (from the "after" answers just given) and the summary, into `training`."""
    if watch.points[-1].step != training["steps"]:
        watch.record(training["steps"], [after[i] for i in watch.indices], "after",
                     elapsed=training["train_runtime_s"])
    training["format_watch"] = watch.summary()


def run_training(args) -> int:
    """Before eval -> LoRA training, watched -> after eval -> save adapter (and merged model)."""
    models.set_seed(args.seed)
    run = Run(args, "finetune")
    examples, source = load_examples(args.dataset)
    train_examples, held_out = split_examples(examples, args.eval_fraction, args.seed)
    held_out = held_out[:args.eval_limit]
    check = resolve_check(args.check, args.dataset)
    if args.until_format is not None and check != "json-answer":
        raise models.UserError(f"--until-format scores the taught JSON format, but this run checks {check}: "
                               "add --check json-answer (answers in the JSON format) or drop --until-format")
    models.require_available([args.model], args.revision, args.cache_dir)
    loaded = load_base_model(args, args.model)
    defaults = defaults_for_loaded(loaded, args.model)
    taken = apply_defaults(args, defaults)
    meter = energy.EnergyMeter.detect(loaded.device)
    if meter.available:
        meter.measure_idle(DEFAULT_IDLE_SECONDS)
    print(meter.status_line(), flush=True)
    tokenizer = loaded.tokenizer
    train_ds = build_dataset(tokenizer, train_examples, args.max_length)
    eval_ds = build_dataset(tokenizer, held_out, args.max_length)
    run.result.update(environment={**results_io.environment(loaded.device, args.seed), "energy": meter.describe()},
                      model=loaded.context(), answers=answer_table(held_out))
    print(f"{loaded.label}: {len(train_ds)} training / {len(held_out)} held-out examples on {loaded.device} "
          f"({models.dtype_name(loaded.dtype)}), load avg {run.result['load_average']}\n"
          f"defaults: {defaults_line(loaded.label, defaults)}", flush=True)

    before = answer_and_score("before", run, loaded.model, tokenizer, held_out, args, check)
    trainer = make_trainer(args, loaded, train_ds, eval_ds, run.dir / "trainer")
    model = trainer.model
    watch = start_watch(trainer, tokenizer, held_out, check, args, before)
    targets = model.peft_config["default"].target_modules
    targets = sorted(targets) if isinstance(targets, (set, list)) else targets
    config = resolved_config(args, loaded, source, targets, trainer.args.gradient_checkpointing, defaults, taken)
    run.result.update(config=config, lora=trainable_parameters(model), precision=precision(trainer), dataset={
        **source, "train_examples": len(train_ds), "held_out_examples": len(eval_ds), "check": check})
    run.result["before"].update(evaluate_held_out(trainer, eval_ds))
    run.save()

    run.result["training"] = train(trainer, loaded.device, watch, meter)
    run.result["after"] = evaluate_held_out(trainer, eval_ds)
    after = answer_and_score("after", run, model, tokenizer, held_out, args, check)
    if watch is not None:
        finish_watch(watch, run.result["training"], after)
    save_outputs(run, model, tokenizer, config, held_out, after, args)
    run.save()
    print_side_by_side(run.result["answers"])
    print_summary(run)
    return 0


def save_outputs(run: Run, model, tokenizer, config: dict, held_out: list[Example], after: list[str],
                 args) -> None:
    """Adapter + configuration + the "after" answers (for --adapter checks); merged model with --merge."""
    adapter_dir = run.dir / "adapter"
    run.result["adapter_dir"] = str(adapter_dir)
    if run.rank != 0:
        return
    save_adapter(model, tokenizer, adapter_dir, config)
    results_io.atomic_write_text(adapter_dir / ANSWERS_NAME, results_io.to_json(
        {"prompts": [e.prompt for e in held_out], "answers": after, "max_new_tokens": args.max_new_tokens}))
    if args.merge:
        save_merged(model, tokenizer, run.dir / "merged")
        run.result["merged_dir"] = str(run.dir / "merged")


def builtin_if_moved(dataset: str) -> str:
    """The built-in dataset of this checkout when the recorded one was the built-in file of another."""
    if not Path(dataset).exists() and Path(dataset).name == Path(DEFAULT_DATASET).name:
        return DEFAULT_DATASET
    return dataset


def run_reload(args) -> int:
    """Load base model + saved adapter, answer the held-out prompts, compare with the saved answers."""
    from peft import PeftModel
    adapter_dir = Path(args.adapter)
    saved = read_adapter_config(adapter_dir)
    recorded = saved["arguments"]
    args.model = args.model or recorded["model"]
    args.dataset = args.dataset or builtin_if_moved(recorded["dataset"])
    args.max_new_tokens = args.max_new_tokens or recorded["max_new_tokens"]
    args.quantize = recorded["quantize"] if args.quantize == "none" else args.quantize
    args.dtype = recorded["dtype"] if args.dtype == "auto" else args.dtype
    args.eval_limit = args.eval_limit or recorded.get("eval_limit")
    run = Run(args, "finetune-reload")
    examples, source = load_examples(args.dataset)
    if source["sha256"] != saved["dataset"]["sha256"]:
        print(f"warning: dataset {args.dataset} differs from the one the adapter was trained on", flush=True)
    _, held_out = split_examples(examples, recorded["eval_fraction"], recorded["seed"])
    held_out = held_out[:args.eval_limit]
    check = resolve_check(args.check if args.check != "auto" else recorded["check"], args.dataset)
    models.require_available([args.model], args.revision, args.cache_dir)
    loaded = load_base_model(args, args.model)
    model = PeftModel.from_pretrained(loaded.model, str(adapter_dir))
    run.result.update(environment=results_io.environment(loaded.device, args.seed), model=loaded.context(),
                      config=saved, answers=answer_table(held_out))
    after = answer_and_score("after", run, model, loaded.tokenizer, held_out, args, check)
    answers_path = adapter_dir / ANSWERS_NAME
    if answers_path.is_file():
        expected = json.loads(answers_path.read_text(encoding="utf-8"))["answers"]
        identical = sum(a == b for a, b in zip(after, expected))
        run.result["reproduced"] = {"identical": identical, "n": len(expected), "all": after == expected}
    run.save()
    for row in run.result["answers"]:
        print(f"Q: {short(row['prompt'], 100)}\n   {short(row['after'], 100)}")
    print_summary(run)
    return 0


def print_summary(run: Run) -> None:
    r = run.result
    for stage in ("before", "after"):
        s = r.get(stage)
        if s:
            parts = [f"{k} {s[k]}" for k in ("format_valid_pct", "correct_pct", "loss", "token_accuracy") if k in s]
            print(f"{stage:>6}: " + ", ".join(parts))
    if "training" in r:
        t = r["training"]
        print(f"training: {t['steps']} steps in {t['wall_seconds']} s ({t['watch_seconds']} s of it answering the "
              f"watched prompts), {t['tokens_per_second']} tokens/s, loss "
              f"{sparkline([p['loss'] for p in t['loss_curve']])}, {t['memory']}")
        p = r["precision"]
        print(f"dtypes: base {p['base_dtype']}, LoRA {p['adapter_dtype']}, optimizer state "
              f"{t['optimizer_state_dtype']}, autocast {p['autocast']}")
        w = t.get("format_watch")
        if w:
            curve = " ".join(f"{c['step']}:{c['format_valid'] if c['format_valid'] is not None else c['correct']}"
                             f"/{c['n']}" for c in w["curve"])
            reached = (f"first ≥ {w['target']:.0%} at step {w['first_step_at_target']}"
                       if w["first_step_at_target"] is not None else f"never ≥ {w['target']:.0%}")
            print(f"watched held-out answers (step:score): {curve}; {reached}")
    if "reproduced" in r:
        print(f"reproduced: {r['reproduced']['identical']}/{r['reproduced']['n']} answers identical")
    print(f"results: {run.json_path} (+ .md), {r.get('total_wall_seconds')} s in all")


def absolute_if_local(name: str) -> str:
    """Local paths become absolute, so the recorded configuration works from any directory."""
    return str(Path(name).expanduser().resolve()) if Path(name).expanduser().exists() else name


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    validate_args(parser, args)
    if args.show_defaults:
        return show_defaults(args.model)
    if args.adapter is not None:
        return run_reload(args)
    args.model = absolute_if_local(args.model or DEFAULT_MODEL)
    args.dataset = absolute_if_local(args.dataset or DEFAULT_DATASET)
    args.max_new_tokens = args.max_new_tokens or DEFAULT_MAX_NEW_TOKENS
    return run_training(args)


if __name__ == "__main__":
    models.run_cli(main)
