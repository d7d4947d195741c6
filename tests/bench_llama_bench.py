"""Our llama.cpp engine against llama.cpp's own llama-bench: same GGUF, threads, batch and CPU kernels.

    python -m tests.bench_llama_bench --model ../shared/models/SmolLM2-135M-Instruct.Q4_1.gguf --threads 2
    python -m tests.bench_llama_bench --threads 2 --library build \\
        --cmake-args "-DGGML_NATIVE=OFF -DGGML_BACKEND_DL=ON -DGGML_CPU_ALL_VARIANTS=ON" --also-variants haswell zen4
    python -m tests.bench_llama_bench --threads 2 --library build --variant haswell \\
        --cmake-args "-DGGML_NATIVE=OFF -DGGML_BACKEND_DL=ON -DGGML_CPU_ALL_VARIANTS=ON"

Not collected by pytest (a measurement, not a test). llama-bench is built from the llama.cpp sources that
the installed llama-cpp-python ships (tests/llamacpp_tools.py), with the wheel's GGML flags by default, and
run with our engine's context settings (n_batch = n_ubatch = 512, flash attention off, f16 KV cache).
Each round runs llama-bench once (`-r 1`, after its own uncounted warm-up) and our engine once, in
alternating order, so load from other work on the machine hits both; the figures are mean ± std over rounds.

What each figure is:
  pp  llama-bench: one llama_decode of N random tokens (BOS first) into an empty KV cache.
      ours: Engine.prefill of N random non-special tokens into a fresh context (benchmark.py's prefill).
  tg  llama-bench: BOS, then N-1 random tokens, one llama_decode each from an empty context, all N timed;
      logits are computed but never read.
      ours (benchmark.py's decode): a 16-token random prompt, then N tokens forced (greedy, EOS ignored)
      through engines.stream; tok/s = (N-1) / (time of token N - time of token 1), each step copying the
      logits to numpy and taking their argmax in torch.
      ours as llama-bench: Engine.begin([BOS]) then N-1 Engine.advance(random token), all N timed, in a
      context of N cells as llama-bench allocates for tg (benchmark.py's engine has min(4096, trained)
      cells, and attention then spans a 256-cell window instead of N): the same work as llama-bench's tg
      through our engine, so any gap left there is Python's overhead.

--library build runs our engine on the built libllama instead of the installed wheel's (llama-cpp-python's
LLAMA_CPP_LIB_PATH); with a -DGGML_BACKEND_DL=ON build the CPU kernels are a separate library per
instruction set, and --variant picks one for both sides (auto: the best this CPU supports, as ggml scores
them). --also-variants times llama-bench alone on other variants in the same rounds.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import random
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

import engines
import models
import results_io
from tests import llamacpp_tools

DEFAULT_MODEL = str(results_io.PROJECT_ROOT.parent / "shared" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf")
DEFAULT_ROUNDS = 5
DEFAULT_PROMPT_TOKENS = 512  # llama-bench pp512
DEFAULT_NEW_TOKENS = 128  # llama-bench tg128
DEFAULT_DECODE_CONTEXT_TOKENS = 16  # benchmark.py's prompt before its timed decode
DEFAULT_TOLERANCE = 0.10  # |ours / llama-bench - 1| within this is agreement
AUTO = "auto"


@dataclass
class Series:
    """One figure over the rounds (tok/s), every round kept."""

    label: str
    values: list[float] = field(default_factory=list)

    @property
    def mean(self) -> float:
        return results_io.mean_std(self.values)[0]

    @property
    def std(self) -> float:
        return results_io.mean_std(self.values)[1]

    def fmt(self) -> str:
        return f"{self.mean:.1f} ± {self.std:.1f}"


@dataclass
class LlamaBenchRunner:
    """llama-bench of one build, running one CPU variant (or the build's own choice)."""

    name: str
    program: Path
    command: list[str]
    cwd: Path
    pp: Series
    tg: Series
    last_json: list[dict] = field(default_factory=list)

    def run(self) -> None:
        out = subprocess.run(self.command, cwd=self.cwd, capture_output=True, text=True, timeout=900)
        if out.returncode != 0:
            raise models.UserError(f"llama-bench failed (exit {out.returncode}): {out.stderr.strip()[-400:]}")
        self.last_json = json.loads(out.stdout)
        for test in self.last_json:
            (self.pp if test["n_gen"] == 0 else self.tg).values.append(float(test["avg_ts"]))


# ----------------------------------------------------------------------------------------------
# Our engine, measured as benchmark.py measures it
# ----------------------------------------------------------------------------------------------

def random_ids(engine, n_tokens: int, seed: int) -> list[int]:
    """n_tokens random ids, none special (as benchmark.py's prompts)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, engine.vocab_size, (n_tokens,), generator=gen).tolist()
    return [(t + 1) % engine.vocab_size if t in engine.special_ids else t for t in ids]


def prefill_tok_s(engine, ids: list[int]) -> float:
    engine.synchronize()
    start = time.perf_counter()
    engine.prefill(ids)
    return len(ids) / (time.perf_counter() - start)


def decode_tok_s(engine, prompt_ids: list[int], new_tokens: int) -> float:
    """benchmark.py's tg: forced greedy tokens after a short prompt, timed from the first token."""
    times = [step.time for step in engines.stream(engine, prompt_ids, new_tokens, stop_at_eos=False)]
    return (len(times) - 1) / (times[-1] - times[0])


def decode_from_empty_tok_s(engine, new_tokens: int, seed: int) -> float:
    """llama-bench's tg through our engine: BOS (a random token where the model adds none) into an
    empty context, then new_tokens - 1 random tokens one at a time; all new_tokens evaluations timed."""
    feed = random_ids(engine, new_tokens, seed)
    first = engine.encode("", add_special_tokens=True) or feed[:1]  # [BOS] where the tokenizer adds it
    engine.synchronize()
    start = time.perf_counter()
    engine.begin(first)
    for token in feed[1:]:
        engine.advance(token)
    return new_tokens / (time.perf_counter() - start)


@dataclass
class OurRunner:
    engine: object
    tg_engine: object  # the same file in a context of new_tokens cells, as llama-bench's tg has
    prefill_ids: list[int]
    decode_ids: list[int]
    new_tokens: int
    seed: int
    pp: Series
    tg: Series
    tg_empty: Series

    def warm_up(self) -> None:
        """Uncounted, as llama-bench's warm-up: kernels, allocator, page cache."""
        prefill_tok_s(self.engine, self.prefill_ids)
        decode_tok_s(self.engine, self.decode_ids, min(8, self.new_tokens))
        decode_from_empty_tok_s(self.tg_engine, min(8, self.new_tokens), self.seed + 2)

    def run(self) -> None:
        self.pp.values.append(prefill_tok_s(self.engine, self.prefill_ids))
        self.tg.values.append(decode_tok_s(self.engine, self.decode_ids, self.new_tokens))
        self.tg_empty.values.append(decode_from_empty_tok_s(self.tg_engine, self.new_tokens, self.seed + 2))


# ----------------------------------------------------------------------------------------------
# Which library and which CPU variant
# ----------------------------------------------------------------------------------------------

def is_dl_build(build: llamacpp_tools.Build) -> bool:
    """A -DGGML_BACKEND_DL=ON build: CPU kernels in libggml-cpu-<variant>.so, loaded at run time."""
    return any(build.bin_dir.glob("libggml-cpu-*.so"))


def variant_library(build: llamacpp_tools.Build, variant: str) -> Path:
    path = build.bin_dir / f"libggml-cpu-{variant}.so"
    if not path.is_file():
        known = sorted(p.name.removeprefix("libggml-cpu-").removesuffix(".so")
                       for p in build.bin_dir.glob("libggml-cpu-*.so"))
        raise models.UserError(f"no CPU variant '{variant}' in {build.bin_dir}: choose one of {', '.join(known)}.")
    return path


def isolated_llama_bench(build: llamacpp_tools.Build, variant: str) -> Path:
    """llama-bench that can only load one CPU variant: a copy beside that variant's library alone (ggml
    looks for backends in the executable's directory and the working directory; the shared libraries
    themselves are found through the build's RUNPATH)."""
    folder = build.build_dir / f"variant-{variant}"
    folder.mkdir(exist_ok=True)
    for source in (build.tool("llama-bench"), variant_library(build, variant)):
        target = folder / source.name
        if not target.exists() or target.stat().st_mtime < source.stat().st_mtime:
            shutil.copy2(source, target)
    return folder / "llama-bench"


def llama_bench_runner(build, variant: str, args, gpu_layers: int) -> LlamaBenchRunner:
    program = build.tool("llama-bench") if variant == AUTO else isolated_llama_bench(build, variant)
    command = [str(program), "-m", args.model, "-p", str(args.prompt_tokens), "-n", str(args.new_tokens),
               "-t", str(args.threads), "-r", "1", "-b", "512", "-ub", "512", "-fa", "off",
               "-ngl", str(gpu_layers), "-o", "json"]
    name = f"llama-bench ({variant})" if is_dl_build(build) else "llama-bench"
    return LlamaBenchRunner(name, program, command, program.parent, Series(f"{name} pp"), Series(f"{name} tg"))


def use_build_library(build: llamacpp_tools.Build, variant: str) -> None:
    """Point llama-cpp-python at the built libllama (before llama_cpp is first imported) and, for a
    BACKEND_DL build, register the CPU variant with the ggml that libllama links to: the wheel's own
    loader only searches the Python executable's directory and the working directory."""
    if "llama_cpp" in sys.modules:
        raise RuntimeError("llama_cpp was imported before the library could be chosen")
    os.environ["LLAMA_CPP_LIB_PATH"] = str(build.bin_dir)
    if not is_dl_build(build):
        return
    ggml = ctypes.CDLL(str(build.bin_dir / "libggml.so"))  # the same file libllama's RUNPATH resolves
    if variant == AUTO:
        ggml.ggml_backend_load_all_from_path(str(build.bin_dir).encode())
    else:
        ggml.ggml_backend_load.restype = ctypes.c_void_p
        if not ggml.ggml_backend_load(str(variant_library(build, variant)).encode()):
            raise models.UserError(f"ggml could not load the {variant} CPU variant on this CPU.")


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------

def compare(ours: Series, theirs: Series, tolerance: float) -> dict:
    """Ratio of the means (the verdict) and the ratio within each round: both sides of a round ran
    back to back, so the per-round ratio cancels load that drifts between rounds."""
    ratio = ours.mean / theirs.mean
    per_round = [a / b for a, b in zip(ours.values, theirs.values)]
    round_mean, round_std = results_io.mean_std(per_round)
    return {"ours": ours.label, "llama_bench": theirs.label, "ours_mean": ours.mean, "ours_std": ours.std,
            "llama_bench_mean": theirs.mean, "llama_bench_std": theirs.std, "ratio": ratio,
            "round_ratios": per_round, "round_ratio_mean": round_mean, "round_ratio_std": round_std,
            "round_ratio_ci95": bootstrap_mean_ci(per_round), "within_tolerance": abs(ratio - 1) <= tolerance}


def bootstrap_mean_ci(values: list[float], resamples: int = 2000, seed: int = 0) -> list[float]:
    """95% percentile-bootstrap interval of the mean (seeded: the same rounds give the same interval)."""
    rng = random.Random(seed)
    n = len(values)
    means = sorted(sum(values[rng.randrange(n)] for _ in range(n)) / n for _ in range(resamples))
    return [means[int(0.025 * resamples)], means[int(0.975 * resamples) - 1]]


def comparison_rows(comparisons: list[dict], tolerance: float) -> list[list]:
    return [[c["ours"], f"{c['ours_mean']:.1f} ± {c['ours_std']:.1f}", c["llama_bench"],
             f"{c['llama_bench_mean']:.1f} ± {c['llama_bench_std']:.1f}", f"{c['ratio']:.3f}",
             f"{c['round_ratio_mean']:.3f} [{c['round_ratio_ci95'][0]:.3f}, {c['round_ratio_ci95'][1]:.3f}]",
             "yes" if c["within_tolerance"] else f"no (beyond ±{100 * tolerance:.0f}%)"] for c in comparisons]


COMPARISON_HEADERS = ["Ours", "tok/s", "llama-bench", "tok/s", "ratio of means", "per-round ratio [95% CI]",
                      "within"]


def render_markdown(data: dict) -> str:
    s = data["settings"]
    parts = [f"# Our llama.cpp engine vs llama-bench: {Path(s['model']).name}\n",
             f"{s['rounds']} alternating rounds, {s['threads']} threads, pp{s['prompt_tokens']} / "
             f"tg{s['new_tokens']}, n_batch = n_ubatch = 512, flash attention off, f16 KV cache. "
             f"Our engine ran on the {data['library']} library; llama-bench was built from llama.cpp "
             f"{data['build']['llama_cpp_commit']} (build {data['build']['llama_cpp_build_number']}) with "
             f"`{' '.join(data['build']['cmake_args'])}`.\n",
             f"- our engine's library: `{data['engine']['engine_build']}`",
             f"- llama-bench build's library: `{data['build']['system_info']}`\n",
             "## Agreement (mean ± std over rounds)\n",
             results_io.markdown_table(COMPARISON_HEADERS, comparison_rows(data["comparisons"], s["tolerance"]))]
    if data["other_variants"]:
        rows = [[v["name"], f"{v['pp_mean']:.1f} ± {v['pp_std']:.1f}", f"{v['tg_mean']:.1f} ± {v['tg_std']:.1f}"]
                for v in data["other_variants"]]
        parts += ["## llama-bench per CPU variant (same rounds)\n",
                  results_io.markdown_table(["llama-bench", f"pp{s['prompt_tokens']} tok/s",
                                             f"tg{s['new_tokens']} tok/s"], rows)]
    parts += ["## Per round (tok/s)\n",
              results_io.markdown_table(["Series"] + [str(i + 1) for i in range(s["rounds"])],
                                        [[k] + [f"{v:.1f}" for v in vals] for k, vals in data["rounds"].items()]),
              "## Environment\n", results_io.environment_markdown(data["environment"])]
    return "\n".join(parts)


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL, help="GGUF file (default: the shared SmolLM2 Q4_1)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for both (default: every core)")
    parser.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS, help=f"default: {DEFAULT_ROUNDS}")
    parser.add_argument("--prompt-tokens", type=int, default=DEFAULT_PROMPT_TOKENS,
                        help=f"default: {DEFAULT_PROMPT_TOKENS}")
    parser.add_argument("--new-tokens", type=int, default=DEFAULT_NEW_TOKENS, help=f"default: {DEFAULT_NEW_TOKENS}")
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                        help=f"largest |ours / llama-bench - 1| that counts as agreement (default: {DEFAULT_TOLERANCE})")
    parser.add_argument("--library", choices=("wheel", "build"), default="wheel",
                        help="which libllama our engine runs on: the installed wheel's (default) or this build's")
    parser.add_argument("--variant", default=AUTO,
                        help="-DGGML_BACKEND_DL=ON builds: the CPU variant both sides run (default: auto, the "
                             "best this CPU supports)")
    parser.add_argument("--also-variants", nargs="+", default=[], metavar="VARIANT",
                        help="-DGGML_BACKEND_DL=ON builds: time llama-bench alone on these variants too")
    llamacpp_tools.add_measurement_args(parser)
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not Path(args.model).is_file() or not args.model.endswith(".gguf"):
        parser.error(f"--model {args.model}: not a .gguf file; pass the GGUF to measure.")
    models.require_at_least_one(parser, args, ("threads", "rounds", "prompt_tokens", "jobs"))
    if args.new_tokens < 2:
        parser.error("--new-tokens must be at least 2: decode speed is measured after the first token")
    if (args.variant != AUTO or args.also_variants) and "-DGGML_BACKEND_DL=ON" not in (args.cmake_args or ""):
        parser.error("--variant and --also-variants need a build with --cmake-args \"... -DGGML_BACKEND_DL=ON "
                     "-DGGML_CPU_ALL_VARIANTS=ON\".")
    if args.variant != AUTO and args.library != "build":
        parser.error("--variant applies to our engine only with --library build (the wheel has one CPU library).")
    args.model = str(Path(args.model).resolve())
    return args


def run_rounds(ours: OurRunner, main_bench: LlamaBenchRunner, others: list[LlamaBenchRunner], rounds: int) -> None:
    """Alternate which side goes first, so slow drifts in the machine's load hit both alike."""
    ours.warm_up()
    for i in range(rounds):
        order = [ours, main_bench] if i % 2 == 0 else [main_bench, ours]
        for runner in order + others:
            runner.run()
        print(f"round {i + 1}/{rounds}: ours pp {ours.pp.values[-1]:.1f} tg {ours.tg.values[-1]:.1f} "
              f"(as llama-bench {ours.tg_empty.values[-1]:.1f}) | llama-bench pp {main_bench.pp.values[-1]:.1f} "
              f"tg {main_bench.tg.values[-1]:.1f}" + "".join(f" | {o.name} pp {o.pp.values[-1]:.1f} "
                                                            f"tg {o.tg.values[-1]:.1f}" for o in others), flush=True)


def results_data(args, build, context: dict, env: dict, ours: OurRunner, main_bench: LlamaBenchRunner,
                 others: list[LlamaBenchRunner], comparisons: list[dict]) -> dict:
    series = [ours.pp, ours.tg, ours.tg_empty, main_bench.pp, main_bench.tg] + \
             [s for o in others for s in (o.pp, o.tg)]
    return {"script": "bench_llama_bench",
            "settings": {k: getattr(args, k) for k in ("model", "threads", "rounds", "prompt_tokens", "new_tokens",
                                                       "tolerance", "library", "variant", "also_variants", "seed")},
            "environment": env, "load_average_end": results_io.load_average(),
            "build": build.describe(), "library": args.library, "engine": context,
            "llama_bench_command": main_bench.command, "llama_bench_last_json": main_bench.last_json,
            "comparisons": comparisons, "rounds": {s.label: s.values for s in series},
            "other_variants": [{"name": o.name, "pp_mean": o.pp.mean, "pp_std": o.pp.std, "tg_mean": o.tg.mean,
                                "tg_std": o.tg.std, "command": o.command} for o in others]}


def main(argv=None) -> int:
    args = parse_args(argv)
    build = llamacpp_tools.build_from_args(args, targets=("llama-bench",))
    if args.library == "build":
        use_build_library(build, args.variant)
    from engines.llamacpp import cpu_threads
    args.threads = args.threads or cpu_threads()
    engine = engines.load(args.model, engine="llama.cpp", device="cpu", threads=args.threads)
    context = engine.context()
    print(f"our engine: {context['engine_version']}, library {args.library}: {context['engine_build']}")
    from engines.llamacpp import LlamaCppEngine
    tg_engine = LlamaCppEngine.load(models.resolve(args.model), device="cpu", dtype="auto", quantize="none",
                                    revision=None, cache_dir=None, trust_remote_code=False, threads=args.threads,
                                    n_ctx=args.new_tokens)
    ours = OurRunner(engine, tg_engine, random_ids(engine, args.prompt_tokens, args.seed),
                     random_ids(engine, DEFAULT_DECODE_CONTEXT_TOKENS, args.seed + 1), args.new_tokens, args.seed,
                     Series(f"ours pp{args.prompt_tokens}"), Series(f"ours tg{args.new_tokens} (benchmark.py)"),
                     Series(f"ours tg{args.new_tokens} (as llama-bench)"))
    main_bench = llama_bench_runner(build, args.variant, args, engine.gpu_layers)
    others = [llama_bench_runner(build, v, args, engine.gpu_layers) for v in args.also_variants]
    print("$", " ".join(main_bench.command))
    env = results_io.environment(torch.device("cpu"), args.seed, None)  # load average before the rounds
    run_rounds(ours, main_bench, others, args.rounds)
    engine.close()
    tg_engine.close()
    comparisons = [compare(ours.pp, main_bench.pp, args.tolerance), compare(ours.tg, main_bench.tg, args.tolerance),
                   compare(ours.tg_empty, main_bench.tg, args.tolerance)]
    print()
    print(results_io.markdown_table(COMPARISON_HEADERS, comparison_rows(comparisons, args.tolerance)))
    for other in others:
        print(f"{other.name}: pp {other.pp.fmt()}  tg {other.tg.fmt()} tok/s")
    data = results_data(args, build, context, env, ours, main_bench, others, comparisons)
    json_path, _ = results_io.result_paths(args.output_dir, "bench_llama_bench")
    results_io.write_results(json_path, data, render_markdown(data))
    print(f"results: {json_path} and {json_path.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    models.run_cli(main)
