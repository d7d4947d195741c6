"""Single-pass vs per-choice MMLU scoring: same questions, same batching, timed; predictions compared.

    python tests/bench_mmlu_scoring.py --model ../shared/models/SmolLM2-135M-Instruct.Q4_1.gguf \\
        --mmlu-data ../shared/data/mmlu --subjects world_religions machine_learning --limit 20 --shots 0
    python tests/bench_mmlu_scoring.py --model /tmp/smollm2-135m --mmlu-data ../shared/data/mmlu --shots 5

Not collected by pytest (a timing, not a test). Per-choice scoring is lm-eval's general path: one
sequence per (question, letter), 4 forward rows per question. Single-pass scoring reads the four
letters from one next-token distribution. Both use the same batch size and the same shared-prefix
cache, so that ratio isolates the single-pass idea; with --shots > 0 it also times per-choice
scoring without the prefix cache (each row runs its whole few-shot context, as lm-eval does).
Prints the ratios, the warm-up-excluded trials, and whether every prediction is identical.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import benchmark  # noqa: E402
import models  # noqa: E402
import results_io  # noqa: E402

DEFAULT_SUBJECTS = ["world_religions", "machine_learning"]
DEFAULT_LIMIT = 20
DEFAULT_SHOTS = 0
DEFAULT_REPETITIONS = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    models.add_common_args(parser)
    parser.add_argument("--mmlu-data", default=None, help="MMLU CSV folder (default: hub cais/mmlu)")
    parser.add_argument("--subjects", nargs="+", default=DEFAULT_SUBJECTS)
    parser.add_argument("--limit", type=int, default=DEFAULT_LIMIT, help="questions per subject")
    parser.add_argument("--shots", type=int, default=DEFAULT_SHOTS)
    parser.add_argument("--batch-size", type=int, default=benchmark.DEFAULT_MMLU_BATCH_SIZE)
    parser.add_argument("--repetitions", type=int, default=DEFAULT_REPETITIONS)
    return parser


def time_scoring(loaded, requests, args, single_pass: bool, share_prefix: bool = True) -> tuple[list[float], dict]:
    """Seconds per repetition (after one uncounted warm-up on the first batch) and the scores."""
    pad = loaded.tokenizer.pad_token_id
    benchmark.score_mmlu(loaded.model, requests[:args.batch_size], loaded.device, pad, args.batch_size,
                         single_pass=single_pass, share_prefix=share_prefix)
    trials, scores = [], {}
    for _ in range(args.repetitions):
        models.synchronize(loaded.device)
        start = time.perf_counter()
        scores = benchmark.score_mmlu(loaded.model, requests, loaded.device, pad, args.batch_size,
                                      single_pass=single_pass, share_prefix=share_prefix)
        models.synchronize(loaded.device)
        trials.append(time.perf_counter() - start)
    return trials, scores


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    loaded = models.load_from_args(args)
    requests = benchmark.build_mmlu_requests(loaded.tokenizer, args.subjects, args.shots, args.limit,
                                             args.mmlu_data, chat_template=False)
    single, single_scores = time_scoring(loaded, requests, args, single_pass=True)
    per_choice, per_choice_scores = time_scoring(loaded, requests, args, single_pass=False)
    lm_eval_way, lm_eval_scores = time_scoring(loaded, requests, args, single_pass=False, share_prefix=False) \
        if args.shots else (per_choice, per_choice_scores)
    fast = benchmark.summarise_mmlu(requests, single_scores)["questions"]
    same = min(sum(a["prediction"] == b["prediction"] for a, b in
                   zip(fast, benchmark.summarise_mmlu(requests, other)["questions"]))
               for other in (per_choice_scores, lm_eval_scores))
    largest = max(abs(x - y) for other in (per_choice_scores, lm_eval_scores)
                  for k in single_scores for x, y in zip(single_scores[k], other[k]))
    env = results_io.environment(loaded.device, args.seed)
    print(f"model {loaded.label} ({models.dtype_name(loaded.dtype)}, {env['device']['name']}), "
          f"{len(requests)} questions ({', '.join(args.subjects)}; {args.shots}-shot, limit {args.limit}), "
          f"batch {args.batch_size}, {sum(r.single_token for r in requests)} with single-token letters")
    print(f"single-pass  s: {results_io.fmt_mean_std(single, 2)}  trials {[round(t, 2) for t in single]}")
    print(f"per-choice   s: {results_io.fmt_mean_std(per_choice, 2)}  trials {[round(t, 2) for t in per_choice]}")
    ratio = results_io.mean_std(per_choice)[0] / results_io.mean_std(single)[0]
    print(f"speed-up (per-choice / single-pass, both sharing the few-shot prefix cache): {ratio:.2f}x")
    if args.shots:
        print(f"per-choice, no prefix cache (lm-eval's way) s: {results_io.fmt_mean_std(lm_eval_way, 2)}  "
              f"trials {[round(t, 2) for t in lm_eval_way]}")
        ratio = results_io.mean_std(lm_eval_way)[0] / results_io.mean_std(single)[0]
        print(f"speed-up (per-choice without prefix cache / benchmark.py's scorer): {ratio:.2f}x")
    print(f"identical predictions: {same}/{len(requests)}; largest log-likelihood difference {largest:.2e}")
    return 0 if same == len(requests) else 1


if __name__ == "__main__":
    models.run_cli(main)
