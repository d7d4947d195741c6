"""Training tokens/s: finetune_demo's padding-free batches vs TRL's default padded setup.

    python -m tests.bench_finetune_throughput --model smollm2-135m
    python -m tests.bench_finetune_throughput --model /tmp/smollm2-135m --max-steps 4 --trials 2
    python -m tests.bench_finetune_throughput --model smollm2-135m --mmlu-dir ../shared/data/mmlu
    python -m tests.bench_finetune_throughput --model tinyllama --device cuda --setups ours trl-default

Not a test (pytest does not collect it): it prints figures and writes results/bench_finetune-*.json/.md.
Every setup trains the same model from the same LoRA initialisation on the same examples in the same
order (same seed, batch size, learning rate, dtype); only the batch layout and TRL's defaults differ:

  ours         padding-free (sequences concatenated, position ids restart per sequence), activations kept
  padded       TRL's default collator (right-padded to the longest sequence), activations kept
  trl-default  TRL's SFTConfig defaults: padded batches and gradient checkpointing on

Tokens/s counts real tokens only (no pad), so a setup cannot look faster by processing padding.
The loss per optimizer step of each setup is recorded beside ours: same batches, so the curves must
match to float precision ("same loss behaviour").

The gain from padding-free batches is 1 / (1 - pad share) at most, so it depends on how much the
lengths in a batch differ. `--mmlu-dir` swaps the built-in dataset (short, similar lengths) for
MMLU test questions as instruction -> "Answer: X" examples, whose lengths range from a line to a
page, like most real instruction data.
"""

from __future__ import annotations

import argparse
import csv
import os
import random
import tempfile
import time
from pathlib import Path

import finetune_demo
import models
import results_io  # noqa: E402

DEFAULT_MAX_STEPS = 4
DEFAULT_TRIALS = 2
DEFAULT_GRAD_ACCUM = 2
DEFAULT_MMLU_EXAMPLES = 200
SETUPS = {  # name -> finetune_demo arguments that differ
    "ours": ["--batching", "padding-free", "--gradient-checkpointing", "off"],
    "padded": ["--batching", "padded", "--gradient-checkpointing", "off"],
    "trl-default": ["--batching", "padded", "--gradient-checkpointing", "on"],
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    models.add_common_args(parser)
    parser.add_argument("--dataset", default=finetune_demo.DEFAULT_DATASET, help="default: the built-in dataset")
    parser.add_argument("--max-steps", type=int, default=DEFAULT_MAX_STEPS, help=f"default: {DEFAULT_MAX_STEPS}")
    parser.add_argument("--grad-accum", type=int, default=DEFAULT_GRAD_ACCUM, help=f"default: {DEFAULT_GRAD_ACCUM}")
    parser.add_argument("--batch-size", type=int, default=finetune_demo.DEFAULT_BATCH_SIZE,
                        help=f"default: {finetune_demo.DEFAULT_BATCH_SIZE}")
    parser.add_argument("--trials", type=int, default=DEFAULT_TRIALS, help=f"default: {DEFAULT_TRIALS}")
    parser.add_argument("--setups", nargs="+", default=list(SETUPS), choices=list(SETUPS))
    parser.add_argument("--mmlu-dir", default=None,
                        help="use MMLU test questions (CSV layout, e.g. ../shared/data/mmlu) instead of --dataset")
    return parser


def mmlu_examples(mmlu_dir: str, n: int, seed: int) -> list:
    """`n` MMLU test questions drawn by seed over all subjects, as question+choices -> 'Answer: X'."""
    rows = []
    for path in sorted(Path(mmlu_dir, "test").glob("*_test.csv")):
        with open(path, newline="", encoding="utf-8") as fh:
            rows += [r for r in csv.reader(fh) if len(r) == 6]
    if not rows:
        raise models.UserError(f"no MMLU test CSVs under {mmlu_dir}/test: pass the folder holding test/")
    picked = random.Random(seed).sample(rows, min(n, len(rows)))
    return [finetune_demo.Example([{"role": "user", "content": f"{q}\nA. {a}\nB. {b}\nC. {c}\nD. {d}"}],
                                  f"Answer: {ans}") for q, a, b, c, d, ans in picked]


def setup_args(args, setup: str):
    argv = ["--model", args.model, "--device", args.device, "--dtype", args.dtype,
            "--seed", str(args.seed), "--max-steps", str(args.max_steps), "--grad-accum", str(args.grad_accum),
            "--batch-size", str(args.batch_size), "--output-dir", args.output_dir, *SETUPS[setup]]
    return finetune_demo.build_parser().parse_args(argv)


def padding_share(trainer, micro_batches: int) -> dict:
    """Tokens the model computes on vs real tokens, over the micro-batches a run will see."""
    computed = real = 0
    for i, batch in enumerate(trainer.get_train_dataloader()):
        if i == micro_batches:
            break
        computed += batch["input_ids"].numel()
        real += int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
    return {"computed_tokens": computed, "real_tokens": real, "pad_share_pct": round(100 * (1 - real / computed), 1)}


def run_trial(args, setup: str, examples) -> dict:
    """Fresh model, fresh LoRA, `max_steps` optimizer steps; real tokens/s and the loss per step."""
    fargs = setup_args(args, setup)
    loaded = finetune_demo.load_base_model(fargs, fargs.model)
    finetune_demo.apply_defaults(fargs, finetune_demo.defaults_for_loaded(loaded, fargs.model))  # r, alpha, lr
    train_ds = finetune_demo.build_dataset(loaded.tokenizer, examples, fargs.max_length)
    scratch = Path(tempfile.mkdtemp(prefix="bench-trainer-"))  # SFTTrainer wants an output_dir; nothing is saved
    trainer = finetune_demo.make_trainer(fargs, loaded, train_ds, None, scratch)
    trainer.args.disable_tqdm = True
    padding = padding_share(trainer, args.max_steps * args.grad_accum)
    cpu_start = time.process_time()
    result = finetune_demo.train(trainer, loaded.device)
    cpu_seconds = time.process_time() - cpu_start
    return {"setup": setup, "learning_rate": fargs.learning_rate, "lora_r": fargs.lora_r,
            "tokens_per_second": result["tokens_per_second"], "tokens": result["tokens"],
            "train_runtime_s": result["train_runtime_s"], "cpu_seconds": round(cpu_seconds, 2),
            "tokens_per_cpu_second": round(result["tokens"] / cpu_seconds, 1), "losses": [p["loss"] for p in result["loss_curve"]],
            "memory": result["memory"], **padding}


def summarise(trials: list[dict], setups: list[str]) -> list[dict]:
    ours = [t for t in trials if t["setup"] == "ours"]
    base_speed = results_io.mean_std([t["tokens_per_second"] for t in ours])[0] if ours else None
    base_cpu = results_io.mean_std([t["tokens_per_cpu_second"] for t in ours])[0] if ours else None
    rows = []
    for setup in setups:
        runs = [t for t in trials if t["setup"] == setup]
        mean, std = results_io.mean_std([t["tokens_per_second"] for t in runs])
        cpu_mean, cpu_std = results_io.mean_std([t["tokens_per_cpu_second"] for t in runs])
        loss_gap = (round(max(abs(a - b) for a, b in zip(runs[0]["losses"], ours[0]["losses"])), 4) if ours else None)
        rows.append({"setup": setup, "tokens_per_second_mean": round(mean, 1), "tokens_per_second_std": round(std, 1),
                     "trials": [t["tokens_per_second"] for t in runs], "pad_share_pct": runs[0]["pad_share_pct"],
                     "ours_speedup": round(base_speed / mean, 2) if base_speed else None,
                     "tokens_per_cpu_second_mean": round(cpu_mean, 1), "tokens_per_cpu_second_std": round(cpu_std, 1),
                     "ours_speedup_cpu": round(base_cpu / cpu_mean, 2) if base_cpu else None,
                     "losses": runs[0]["losses"], "max_loss_gap_vs_ours": loss_gap,
                     "peak_memory": runs[0]["memory"]})
    return rows


def render_markdown(result: dict) -> str:
    rows = [[r["setup"], f"{r['tokens_per_second_mean']} ± {r['tokens_per_second_std']}",
             ", ".join(str(v) for v in r["trials"]), r["ours_speedup"],
             f"{r['tokens_per_cpu_second_mean']} ± {r['tokens_per_cpu_second_std']}", r["ours_speedup_cpu"],
             r["pad_share_pct"],
             " ".join(f"{v:.3f}" for v in r["losses"]), r["max_loss_gap_vs_ours"],
             ", ".join(f"{k} {v}" for k, v in r["peak_memory"].items())] for r in result["summary"]]
    s = result["settings"]
    lines = [f"# Fine-tuning throughput: {result['model']['model']} ({result['model']['dtype']}, "
             f"{result['model']['device_name']})", "",
             f"{s['max_steps']} optimizer steps x {s['grad_accum']} micro-batches of {s['batch_size']} examples, "
             f"{s['trials']} trials per setup, interleaved; data: {s['dataset']}; torch threads {s['torch_threads']}; "
             f"load average {result['load_average_start']} (start) / {result['load_average_end']} (end).", "",
             results_io.markdown_table(["setup", "real tokens/s (wall, mean ± std)", "trials", "ours is x faster",
                                        "real tokens per CPU-second", "ours is x faster (CPU time)",
                                        "pad share %", "loss per step", "max loss gap vs ours",
                                        "peak memory"], rows),
             "Tokens per CPU-second divide by this process's CPU time (torch on one thread), which other "
             "processes on a shared machine inflate far less than wall time.", "",
             "", results_io.bar_chart([(r["setup"], r["tokens_per_second_mean"]) for r in result["summary"]],
                                      unit="tok/s"),
             "## Environment", "", results_io.environment_markdown(result["environment"])]
    return "\n".join(lines)


def main(argv=None) -> int:
    import torch
    args = build_parser().parse_args(argv)
    args.model = finetune_demo.absolute_if_local(args.model)
    if args.mmlu_dir:
        train_examples = mmlu_examples(args.mmlu_dir, DEFAULT_MMLU_EXAMPLES, args.seed)
        args.dataset = f"MMLU test, {len(train_examples)} questions drawn with seed {args.seed}"
    else:
        examples, _ = finetune_demo.load_examples(args.dataset)
        train_examples, _ = finetune_demo.split_examples(examples, finetune_demo.DEFAULT_EVAL_FRACTION, args.seed)
    load_start = results_io.load_average()
    trials = []
    for trial in range(args.trials):  # interleave setups so load drift hits each alike
        for setup in args.setups:
            t = run_trial(args, setup, train_examples)
            trials.append(t)
            print(f"trial {trial + 1} {setup:12s} {t['tokens_per_second']:8.1f} real tok/s  "
                  f"{t['tokens_per_cpu_second']:8.1f} per CPU-s  pad {t['pad_share_pct']}%"
                  f"  losses {t['losses']}", flush=True)
    loaded_ctx = finetune_demo.load_base_model(setup_args(args, "ours"), args.model).context()
    result = {"script": "bench_finetune_throughput", "model": loaded_ctx,
              "settings": {"max_steps": args.max_steps, "grad_accum": args.grad_accum, "batch_size": args.batch_size,
                           "trials": args.trials, "dataset": args.dataset, "torch_threads": torch.get_num_threads(),
                           "omp_num_threads": os.environ.get("OMP_NUM_THREADS")},
              "load_average_start": load_start, "load_average_end": results_io.load_average(),
              "environment": results_io.environment(models.pick_device(args.device), args.seed),
              "trials": trials, "summary": summarise(trials, args.setups)}
    json_path, _ = results_io.result_paths(args.output_dir, "bench_finetune")
    results_io.write_results(json_path, result, render_markdown(result))
    print(render_markdown(result).split("## Environment")[0])
    print(f"results: {json_path} (+ .md)")
    return 0


if __name__ == "__main__":
    models.run_cli(main)
