"""LoRA fine-tuning that visibly changes a model in minutes, measured before and after.

    python finetune_demo.py --model smollm2-135m --epochs 3
    python finetune_demo.py --model tinyllama --epochs 3 --lora-targets all-linear --merge
    python finetune_demo.py --adapter results/finetune-20261123-070000/adapter

The built-in dataset (data/finetune_json_answers.jsonl, written for this project) teaches one
behaviour code can check: answer every question with one line of JSON,
`{"answer": "...", "confidence": 0.9}`. The held-out prompts are answered greedily before and after
training; the share of valid JSON answers, the held-out loss and token accuracy (response tokens
only) are compared. Training goes through PEFT LoRA and TRL's SFTTrainer, with padding-free batches
(every sequence of a batch concatenated, position ids restarting per sequence, so no compute is
spent on pad tokens). Runs unchanged under `accelerate launch finetune_demo.py ...` on several GPUs.

Writes results/finetune-<timestamp>/: the adapter (adapter/, with finetune_config.json holding every
argument, the base model id and revision, and the dataset's sha256), finetune_demo.json and .md
(before/after answers, scores, loss curve, throughput, memory), and merged/ with --merge.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import models
import results_io

DATA_DIR = Path(__file__).resolve().parent / "data"
DEFAULT_DATASET = str(DATA_DIR / "finetune_json_answers.jsonl")
DEFAULT_EPOCHS = 3.0
DEFAULT_LORA_R = 8
DEFAULT_LORA_ALPHA = 16
DEFAULT_LORA_DROPOUT = 0.05
DEFAULT_LEARNING_RATE = 2e-4
DEFAULT_BATCH_SIZE = 4
DEFAULT_GRAD_ACCUM = 4
DEFAULT_MAX_LENGTH = 512
DEFAULT_EVAL_FRACTION = 0.15
DEFAULT_MAX_NEW_TOKENS = 48
DEFAULT_GEN_BATCH_SIZE = 8
DEFAULT_LOGGING_STEPS = 1
BATCHING_MODES = ("padding-free", "padded", "length-grouped")
CHECKS = ("auto", "json-answer", "exact-match", "none")
GRADIENT_CHECKPOINTING = ("auto", "on", "off")
CHECKPOINTING_MIN_PARAMS = 1_000_000_000  # "auto" recomputes activations only for 1B-class models
CONFIG_NAME = "finetune_config.json"  # written inside the adapter directory
ANSWERS_NAME = "heldout_answers.json"  # the "after" answers, beside the adapter, for --adapter checks

# model_type -> LoRA targets, for local models the registry does not know.
MODEL_TYPE_LORA_TARGETS = {
    "llama": models.LLAMA_LORA, "mistral": models.LLAMA_LORA, "qwen2": models.LLAMA_LORA,
    "qwen3": models.LLAMA_LORA, "stablelm": models.LLAMA_LORA, "gemma": models.LLAMA_LORA,
    "gemma2": models.LLAMA_LORA, "gemma3": models.LLAMA_LORA, "gemma3_text": models.LLAMA_LORA,
    "phi3": ("qkv_proj",), "gpt_neox": models.NEOX_LORA,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    models.add_common_args(parser)
    parser.set_defaults(model=None)  # None: smollm2-135m, or the model recorded with --adapter
    parser.add_argument("--dataset", default=None,
                        help="local .json/.jsonl (instruction/input/output or chat messages) or a hub "
                             "dataset id (default: the built-in data/finetune_json_answers.jsonl)")
    parser.add_argument("--epochs", type=float, default=DEFAULT_EPOCHS, help=f"default: {DEFAULT_EPOCHS:g}")
    parser.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps")
    parser.add_argument("--max-length", type=int, default=DEFAULT_MAX_LENGTH,
                        help=f"truncate examples to this many tokens (default: {DEFAULT_MAX_LENGTH})")
    parser.add_argument("--learning-rate", type=float, default=DEFAULT_LEARNING_RATE,
                        help=f"default: {DEFAULT_LEARNING_RATE:g}")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
                        help=f"examples per device per micro-batch (default: {DEFAULT_BATCH_SIZE})")
    parser.add_argument("--grad-accum", type=int, default=DEFAULT_GRAD_ACCUM,
                        help=f"micro-batches per optimizer step (default: {DEFAULT_GRAD_ACCUM})")
    parser.add_argument("--lora-r", type=int, default=DEFAULT_LORA_R, help=f"default: {DEFAULT_LORA_R}")
    parser.add_argument("--lora-alpha", type=int, default=DEFAULT_LORA_ALPHA, help=f"default: {DEFAULT_LORA_ALPHA}")
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
    parser.add_argument("--merge", action="store_true", help="also write the merged model (base + LoRA)")
    parser.add_argument("--adapter", default=None,
                        help="reload a saved adapter and answer the held-out prompts (no training)")
    return parser


def validate_args(parser: argparse.ArgumentParser, args) -> None:
    positive = ("epochs", "max_length", "learning_rate", "batch_size", "grad_accum", "lora_r", "lora_alpha")
    for name in positive:
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    for name in ("max_steps", "eval_limit", "max_new_tokens"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive")
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


def wilson_interval(hits: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion, in percent."""
    if n == 0:
        return math.nan, math.nan
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return round(100 * max(0.0, centre - half), 1), round(100 * min(1.0, centre + half), 1)


def score_answers(answers: list[str], references: list[str], check: str) -> dict:
    """% of answers passing the behaviour check and % correct, with 95% Wilson intervals."""
    n = len(answers)
    out = {"check": check, "n": n}
    if check == "json-answer":
        valid = sum(check_json_answer(a) for a in answers)
        out.update(format_valid=valid, format_valid_pct=round(100 * valid / n, 1),
                   format_valid_ci95=wilson_interval(valid, n))
    if check != "none":
        correct = sum(answer_is_correct(a, r, check) for a, r in zip(answers, references))
        out.update(correct=correct, correct_pct=round(100 * correct / n, 1), correct_ci95=wilson_interval(correct, n))
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


def wants_checkpointing(args, model) -> bool:
    if args.gradient_checkpointing != "auto":
        return args.gradient_checkpointing == "on"
    return models.count_parameters(model) >= CHECKPOINTING_MIN_PARAMS


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
    """SFTTrainer wrapping the base model with a fresh LoRA adapter."""
    from trl import SFTTrainer
    targets = resolve_lora_targets(args.lora_targets, loaded)
    checkpointing = wants_checkpointing(args, loaded.model)
    model = prepare_for_kbit(args, loaded.model, checkpointing)
    with models.translated_errors(loaded.label, loaded.device):
        return SFTTrainer(model=model, args=sft_config(args, loaded, out_dir, checkpointing),
                          train_dataset=train_ds, eval_dataset=eval_ds, processing_class=loaded.tokenizer,
                          peft_config=lora_config(args, targets))


def trainable_parameters(model) -> dict:
    trainable, total = model.get_nb_trainable_parameters()
    return {"trainable": trainable, "total": total, "trainable_pct": round(100 * trainable / total, 4)}


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
            with torch.no_grad():
                out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
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


def train(trainer, device) -> dict:
    """Run training; wall time, real (non-pad) tokens/s, steps, peak memory and the loss curve."""
    models.synchronize(device)
    start = time.perf_counter()
    with models.PeakMemory(device, interval=0.05) as memory:
        output = trainer.train()
    models.synchronize(device)
    wall = time.perf_counter() - start
    curve = loss_curve(trainer.state.log_history)
    tokens = int(curve[-1]["num_tokens"]) if curve and curve[-1]["num_tokens"] else 0
    return {"wall_seconds": round(wall, 2), "train_runtime_s": round(output.metrics["train_runtime"], 2),
            "steps": trainer.state.global_step, "epochs": round(trainer.state.epoch or 0, 3),
            "tokens": tokens, "tokens_per_second": round(tokens / output.metrics["train_runtime"], 1),
            "final_train_loss": curve[-1]["loss"] if curve else None,
            "memory": memory_summary(memory), "loss_curve": curve}


# ----------------------------------------------------------------------------------------------
# Saving and reloading
# ----------------------------------------------------------------------------------------------

def resolved_config(args, loaded: models.Loaded, source: dict, targets, checkpointing: bool) -> dict:
    """Everything needed to rebuild this run: arguments, base model and revision, dataset hash."""
    return {"arguments": {k: v for k, v in vars(args).items()},
            "base_model": {"name": args.model, "hf_id": loaded.resolved.spec.hf_id if loaded.resolved.spec else None,
                           "path": loaded.resolved.path, "gguf_file": loaded.resolved.gguf_file,
                           "revision": loaded.revision, "model_type": loaded.model.config.model_type},
            "dataset": source, "lora_targets": targets, "gradient_checkpointing": checkpointing,
            "dtype": models.dtype_name(loaded.dtype), "device": str(loaded.device),
            "packages": results_io.package_versions()}


def save_adapter(model, tokenizer, adapter_dir: Path, config: dict) -> None:
    model.save_pretrained(adapter_dir)
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


def render_markdown(result: dict) -> str:
    """The run as Markdown: scores before/after, loss curve, throughput, answers side by side."""
    m, before, after = result["model"], result.get("before", {}), result.get("after", {})
    lines = [f"# Fine-tune: {m['model']} ({m['dtype']}, {m['device_name']})", ""]
    lines += [results_io.markdown_table(["", "before", "after", "95% CI before → after"],
                                        score_rows(before, after)), ""]
    training = result.get("training")
    if training:
        lora = result["lora"]
        lines += ["## Training", "", results_io.markdown_table(["", "value"], [
            ["LoRA targets / r / alpha", f"{result['config']['lora_targets']} / {result['config']['arguments']['lora_r']}"
                                         f" / {result['config']['arguments']['lora_alpha']}"],
            ["trainable parameters", f"{lora['trainable']:,} of {lora['total']:,} ({lora['trainable_pct']}%)"],
            ["batching", result["config"]["arguments"]["batching"]],
            ["optimizer steps / epochs", f"{training['steps']} / {training['epochs']}"],
            ["training wall time", f"{training['wall_seconds']} s"],
            ["training tokens/s (real tokens, no padding)", training["tokens_per_second"]],
            ["peak memory", ", ".join(f"{k} {v}" for k, v in training["memory"].items())],
            ["whole run wall time", f"{result.get('total_wall_seconds')} s"],
            ["load average at start (1/5/15 min)", result.get("load_average")],
            ["torch CPU threads", result.get("torch_threads")],
        ]), ""]
        curve = training["loss_curve"]
        losses = [p["loss"] for p in curve]
        if losses:
            lines += [f"Training loss per step ({losses[0]} → {losses[-1]}): `{sparkline(losses)}`", "", "```",
                      results_io.bar_chart([(f"step {p['step']}", p["loss"]) for p in curve], digits=3).rstrip(),
                      "```", ""]
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

def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


class Run:
    """One run directory; `save()` rewrites its JSON + Markdown after each finished stage."""

    def __init__(self, args, kind: str):
        self.rank, _ = distributed_rank()
        self.dir = Path(args.output_dir) / f"{kind}-{results_io.timestamp()}"
        self.json_path = self.dir / "finetune_demo.json"
        self.start = time.perf_counter()
        import torch
        self.result: dict = {"script": "finetune_demo", "load_average": load_average(),
                             "torch_threads": torch.get_num_threads()}

    def save(self) -> None:
        if self.rank != 0:
            return
        self.result["total_wall_seconds"] = round(time.perf_counter() - self.start, 1)
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


def run_training(args) -> int:
    """Before eval -> LoRA training -> after eval -> save adapter (and merged model)."""
    models.set_seed(args.seed)
    run = Run(args, "finetune")
    examples, source = load_examples(args.dataset)
    train_examples, held_out = split_examples(examples, args.eval_fraction, args.seed)
    held_out = held_out[:args.eval_limit]
    check = resolve_check(args.check, args.dataset)
    loaded = load_base_model(args, args.model)
    tokenizer = loaded.tokenizer
    train_ds = build_dataset(tokenizer, train_examples, args.max_length)
    eval_ds = build_dataset(tokenizer, held_out, args.max_length)
    run.result.update(environment=results_io.environment(loaded.device, args.seed), model=loaded.context(),
                      answers=answer_table(held_out))
    print(f"{loaded.label}: {len(train_ds)} training / {len(held_out)} held-out examples on {loaded.device} "
          f"({models.dtype_name(loaded.dtype)}), load avg {run.result['load_average']}", flush=True)

    answer_and_score("before", run, loaded.model, tokenizer, held_out, args, check)
    trainer = make_trainer(args, loaded, train_ds, eval_ds, run.dir / "trainer")
    model = trainer.model
    targets = model.peft_config["default"].target_modules
    targets = sorted(targets) if isinstance(targets, (set, list)) else targets
    config = resolved_config(args, loaded, source, targets, trainer.args.gradient_checkpointing)
    run.result.update(config=config, lora=trainable_parameters(model), dataset={
        **source, "train_examples": len(train_ds), "held_out_examples": len(eval_ds), "check": check})
    run.result["before"].update(evaluate_held_out(trainer, eval_ds))
    run.save()

    run.result["training"] = train(trainer, loaded.device)
    run.result["after"] = evaluate_held_out(trainer, eval_ds)
    after = answer_and_score("after", run, model, tokenizer, held_out, args, check)
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
        print(f"training: {t['steps']} steps in {t['wall_seconds']} s, {t['tokens_per_second']} tokens/s, "
              f"loss {sparkline([p['loss'] for p in t['loss_curve']])}, {t['memory']}")
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
    if args.adapter is not None:
        return run_reload(args)
    args.model = absolute_if_local(args.model or "smollm2-135m")
    args.dataset = absolute_if_local(args.dataset or DEFAULT_DATASET)
    args.max_new_tokens = args.max_new_tokens or DEFAULT_MAX_NEW_TOKENS
    return run_training(args)


if __name__ == "__main__":
    models.run_cli(main)
