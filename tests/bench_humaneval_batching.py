"""HumanEval generation batched across problems vs one problem at a time: same completions, less time.

    python -m tests.bench_humaneval_batching --model ../shared/models/SmolLM2-135M-Instruct.Q4_1.gguf --engine transformers --dtype fp32
    python -m tests.bench_humaneval_batching --model ../shared/models/SmolLM2-135M-Instruct.Q4_1.gguf --limit 20 --batch-size 8 --rounds 2

Not collected by pytest (a timing, not a test). Both ways run humaneval.generate_completions with the
prompt mode chosen for the model (chat for instruct models); the order alternates per round so machine
noise falls on both. Prints seconds per way (mean ± std over rounds), the speed-up, and whether every
completion is identical; writes results/bench_humaneval_batching-<time>.json and .md.
"""

from __future__ import annotations

import argparse
import time
from types import SimpleNamespace

import engines
import humaneval
import models
import results_io

DEFAULT_LIMIT = 20
DEFAULT_BATCH_SIZE = 8
DEFAULT_MAX_NEW_TOKENS = 384  # benchmark.py's --humaneval-max-new-tokens default
DEFAULT_ROUNDS = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    models.add_common_args(parser)
    engines.add_engine_args(parser)
    parser.add_argument("--limit", type=int, default=DEFAULT_LIMIT, help=f"problems (default: {DEFAULT_LIMIT})")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    parser.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS)
    parser.add_argument("--mode", choices=humaneval.MODES, default="auto")
    parser.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS, help="timed rounds of each way")
    return parser


def generate(engine, problems, mode: str, batch_size: int, max_new_tokens: int, seed: int) -> tuple[float, list]:
    settings = SimpleNamespace(humaneval_samples=1, humaneval_batch_size=batch_size,
                               humaneval_max_new_tokens=max_new_tokens, seed=seed)
    engine.synchronize()
    start = time.perf_counter()
    completions = humaneval.generate_completions(engine, problems, mode, settings)
    engine.synchronize()
    return time.perf_counter() - start, completions


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    engine = engines.load_from_args(args)
    problems = humaneval.load_problems(args.limit)
    mode = humaneval.choose_mode(args.mode, engine)
    ways = {"one at a time": 1, f"batched ({args.batch_size})": args.batch_size}
    times = {way: [] for way in ways}
    outputs = {}
    for r in range(args.rounds):
        for way in (list(ways) if r % 2 == 0 else list(ways)[::-1]):
            seconds, outputs[way] = generate(engine, problems, mode, ways[way], args.max_new_tokens, args.seed)
            times[way].append(seconds)
            print(f"round {r + 1}: {way}: {seconds:.1f} s", flush=True)
    single, batched = outputs.values()
    identical = sum(a == b for a, b in zip(single, batched))
    ratio = results_io.mean_std(times["one at a time"])[0] / results_io.mean_std(times[f"batched ({args.batch_size})"])[0]
    context = engine.context()
    lines = [f"{engine.label} · {context['engine']} · {context['weights']} · {context['device_name']}, "
             f"{len(problems)} problems, {mode} mode, max {args.max_new_tokens} new tokens, greedy"]
    lines += [f"{way}: {results_io.fmt_mean_std(t, 1)} s over {len(t)} round(s) {[round(x, 1) for x in t]}"
              for way, t in times.items()]
    lines += [f"speed-up of batching: {ratio:.2f}x", f"identical completions: {identical}/{len(problems)}"]
    print("\n".join(lines))
    env = results_io.environment(engine.device, args.seed)
    json_path, _ = results_io.result_paths(args.output_dir, "bench_humaneval_batching")
    results_io.write_results(json_path, {"model": context, "problems": len(problems), "mode": mode,
                                         "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens,
                                         "seconds": times, "speedup": ratio, "identical": identical,
                                         "completions": outputs, "environment": env},
                             "# HumanEval generation: batched vs one at a time\n\n" + "\n\n".join(lines) + "\n\n"
                             + results_io.environment_markdown(env))
    print(f"wrote {json_path}")
    return 0 if identical == len(problems) else 1


if __name__ == "__main__":
    models.run_cli(main)
