"""Single-pass vs per-choice MMLU scoring: same questions, same batching, timed; predictions compared.

    python -m tests.bench_mmlu_scoring --model ../shared/models/SmolLM2-135M-Instruct.Q4_1.gguf \\
        --mmlu-data ../shared/data/mmlu --subjects world_religions machine_learning --limit 20 --shots 0
    python -m tests.bench_mmlu_scoring --model /tmp/smollm2-135m --mmlu-data ../shared/data/mmlu --shots 5

Not collected by pytest (a timing, not a test). Per-choice scoring is lm-eval's general path: one
sequence per (question, letter), 4 forward rows per question. Single-pass scoring reads the four
letters from one next-token distribution. Both use the same batch size and the same shared-prefix
cache, so that ratio isolates the single-pass idea; with --shots > 0 it also times per-choice
scoring without the prefix cache (each row runs its whole few-shot context, as lm-eval does).
Prints the ratios, the warm-up-excluded trials, and whether every prediction is identical.
"""

from __future__ import annotations

import argparse
import time

import engines
import mmlu
import models
import results_io

DEFAULT_SUBJECTS = ["world_religions", "machine_learning"]
DEFAULT_LIMIT = 20
DEFAULT_SHOTS = 0
DEFAULT_REPETITIONS = 2
DEFAULT_BATCH_SIZE = 8  # benchmark.py's --mmlu-batch-size default


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    models.add_common_args(parser)
    parser.add_argument("--mmlu-data", default=None, help="MMLU CSV folder (default: hub cais/mmlu)")
    parser.add_argument("--subjects", nargs="+", default=DEFAULT_SUBJECTS)
    parser.add_argument("--limit", type=int, default=DEFAULT_LIMIT, help="questions per subject")
    parser.add_argument("--shots", type=int, default=DEFAULT_SHOTS)
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    parser.add_argument("--repetitions", type=int, default=DEFAULT_REPETITIONS)
    return parser


def time_scoring(engine, requests, args, single_pass: bool, share_prefix: bool = True) -> tuple[list[float], dict]:
    """Seconds per repetition (after one uncounted warm-up on the first batch) and the scores."""
    engine.share_prefix = share_prefix
    mmlu.score(engine, requests[:args.batch_size], args.batch_size, single_pass=single_pass)
    trials, scores = [], {}
    for _ in range(args.repetitions):
        engine.synchronize()
        start = time.perf_counter()
        scores = mmlu.score(engine, requests, args.batch_size, single_pass=single_pass)
        engine.synchronize()
        trials.append(time.perf_counter() - start)
    engine.share_prefix = True
    return trials, scores


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    engine = engines.load_from_args(args, engine="transformers")
    docs = mmlu.load_docs(args.subjects, [args.shots], args.limit, args.mmlu_data)
    requests = mmlu.build_requests(engine, docs, args.shots, chat_template=False)
    single, single_scores = time_scoring(engine, requests, args, single_pass=True)
    per_choice, per_choice_scores = time_scoring(engine, requests, args, single_pass=False)
    lm_eval_way, lm_eval_scores = time_scoring(engine, requests, args, single_pass=False, share_prefix=False) \
        if args.shots else (per_choice, per_choice_scores)

    def predictions(scores):
        return [q.prediction for q in mmlu.summarise(requests, scores, engine.context_length)["questions"]]
    same = min(sum(a == b for a, b in zip(predictions(single_scores), predictions(other)))
               for other in (per_choice_scores, lm_eval_scores))
    largest = max(abs(x - y) for other in (per_choice_scores, lm_eval_scores)
                  for k in single_scores for x, y in zip(single_scores[k], other[k]))
    env = results_io.environment(engine.device, args.seed)
    print(f"model {engine.label} ({engine.context()['dtype']}, {env['device']['name']}), "
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
