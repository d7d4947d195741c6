"""What each quantization costs, from the same weights: fp32 in transformers, F16/Q8_0/Q4_K_M/Q4_0 in llama.cpp.

    python -m tests.bench_quant_tradeoff --threads 2 --mmlu-data ../shared/data/mmlu --mmlu-limit 100 --mmlu-shots 0
    python -m tests.bench_quant_tradeoff --prepare-only          # make and fingerprint the files, measure nothing
    python -m tests.bench_quant_tradeoff --benchmark-results results/benchmark-20261201-120000.json

Not collected by pytest (a measurement, not a test). One reproducible chain, every file made by a program:
  1. the GGUF (default: the shared SmolLM2-135M-Instruct Q4_1) is de-quantized by transformers to an fp32
     safetensors directory: the "full precision" reference row;
  2. llama.cpp's own converter (vendor/llama.cpp/convert_hf_to_gguf.py of the installed llama-cpp-python's
     sdist, with its gguf-py) writes an F16 GGUF from that directory;
  3. llama.cpp's llama-quantize, built from the same sources (tests/llamacpp_tools.py), makes Q8_0, Q4_K_M
     and Q4_0 from the F16 file.
Because the starting weights were already Q4_1, every row re-quantizes weights that sit on a Q4_1 grid:
the differences measure what each format loses from those weights, not from the original bf16 release.
Files go to --tools-cache with their sizes, sha256 and the exact commands. Then benchmark.py measures all
five rows in one run (speed, memory, MMLU; fp32 through transformers, the GGUFs through llama.cpp), and each
quant's MMLU answers are compared question by question with the fp32 row (agreement, accuracy difference
with a paired-bootstrap 95% interval, McNemar's exact p: results_io.paired_comparison).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import models
import results_io
from records import BenchmarkRun, ModelResult
from tests import llamacpp_tools

SHARED = results_io.PROJECT_ROOT.parent / "shared"
DEFAULT_SOURCE = str(SHARED / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf")
DEFAULT_MMLU_DATA = str(SHARED / "data" / "mmlu")
DEFAULT_QUANTS = ["Q8_0", "Q4_K_M", "Q4_0"]  # made from the F16 file by llama-quantize
DEFAULT_MMLU_LIMIT = 100
DEFAULT_MMLU_SHOTS = [0]
DEFAULT_REPETITIONS = 3
REFERENCE_DTYPES = {"fp32": "0", "bf16": "1"}  # BILLION_LLM_CPU_BF16: what transformers' auto dtype becomes
# llama-quantize's warning for a tensor whose rows do not fit the target type's block size
FALLBACK_LINE = re.compile(r"required for type\s+(\w+)\).*?falling back to\s+(\w+)")


@dataclass
class ModelFile:
    """One file or directory of the chain, fingerprinted."""

    label: str  # "fp32 (de-quantized)", "F16", "Q8_0", ...
    path: str
    bytes: int
    sha256: str  # of the file (a directory: of its model.safetensors)
    made_by: str  # the command or call that wrote it
    seconds: float | None = None  # None when reused from the cache
    notes: list[str] = field(default_factory=list)


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


# ----------------------------------------------------------------------------------------------
# Making the files
# ----------------------------------------------------------------------------------------------

def dequantize(source: Path, out: Path) -> ModelFile:
    """The GGUF de-quantized by transformers (fp32) and saved as safetensors + tokenizer, once."""
    weights = out / "model.safetensors"
    made_by = (f"models.load({str(source)!r}, device='cpu', dtype='fp32') then model.save_pretrained and "
               f"tokenizer.save_pretrained({str(out)!r}) (transformers GGUF de-quantization)")
    seconds = None
    if not weights.is_file():
        print(f"de-quantizing {source.name} to fp32 safetensors in {out}", flush=True)
        start = time.perf_counter()
        loaded = models.load(str(source), device="cpu", dtype="fp32")
        tmp = out.with_name(out.name + ".tmp")
        loaded.model.save_pretrained(tmp)
        loaded.tokenizer.save_pretrained(tmp)
        tmp.rename(out)
        seconds = time.perf_counter() - start
    return ModelFile("fp32 (de-quantized)", str(out), folder_bytes(out), models.file_sha256(weights), made_by, seconds)


def run_tool(command: list[str], log: Path, env: dict | None = None) -> tuple[float, str]:
    """Run a converter step with its output kept in `log`; seconds and output.

    Raises:
        UserError: the step failed (its last lines are printed).
    """
    print("$", shlex.join(command), flush=True)
    start = time.perf_counter()
    out = subprocess.run(command, capture_output=True, text=True, env=env)
    log.write_text(f"$ {shlex.join(command)}\n{out.stdout}{out.stderr}")
    if out.returncode != 0:
        print((out.stdout + out.stderr)[-3000:], file=sys.stderr)
        raise models.UserError(f"{Path(command[1] if command[0] == sys.executable else command[0]).name} failed "
                               f"(exit {out.returncode}); the log is {log}.")
    return time.perf_counter() - start, out.stdout + out.stderr


def converter_deps(build: llamacpp_tools.Build, cache: Path) -> Path:
    """A folder with the converter's requirements that the project's environment lacks, installed once
    with pip --target so the project's venv stays as it is. llama.cpp's llama converter imports
    sentencepiece before it looks for a tokenizer.model (SmolLM2 has a BPE tokenizer.json, so it then
    falls through to that); its requirements file pins the range."""
    folder = cache / "converter-deps"
    requirements = (build.source_dir / "requirements" / "requirements-convert_legacy_llama.txt").read_text()
    needed = [line.strip() for line in requirements.splitlines() if line.startswith("sentencepiece")]
    probe = subprocess.run([sys.executable, "-c", "import sentencepiece"], capture_output=True,
                           env=dict(os.environ, PYTHONPATH=str(folder)))
    if needed and probe.returncode != 0:
        command = [sys.executable, "-m", "pip", "install", "--quiet", "--target", str(folder), *needed]
        print("$", shlex.join(command), flush=True)
        if subprocess.run(command).returncode != 0:
            raise models.UserError(f"could not install the converter's {' '.join(needed)} into {folder}: "
                                   "install it with pip and rerun.")
    return folder


def convert_to_f16(build: llamacpp_tools.Build, hf_dir: Path, out: Path, deps: Path) -> ModelFile:
    """llama.cpp's convert_hf_to_gguf.py (with its own gguf-py) on the fp32 directory: an F16 GGUF."""
    command = [sys.executable, str(build.source_dir / "convert_hf_to_gguf.py"), str(hf_dir),
               "--outfile", str(out), "--outtype", "f16"]
    seconds = None
    if not out.is_file():
        tmp = out.with_name(out.name + ".tmp")
        seconds, _ = run_tool(command[:-4] + ["--outfile", str(tmp), "--outtype", "f16"], out.with_suffix(".log"),
                              env=dict(os.environ, PYTHONPATH=str(deps)))
        tmp.rename(out)
    return ModelFile("F16", str(out), out.stat().st_size, models.file_sha256(out),
                     f"PYTHONPATH={deps} {shlex.join(command)}", seconds)


def quantize(build: llamacpp_tools.Build, f16: Path, quant: str, out: Path, threads: int) -> ModelFile:
    """llama-quantize F16 -> `quant`. Tensors whose rows are not a multiple of a k-quant's 256-value block
    (SmolLM2's 576-wide ones) get llama.cpp's fallback type: each fallback is listed in the notes."""
    command = [str(build.tool("llama-quantize")), str(f16), str(out), quant, str(threads)]
    log = out.with_suffix(".log")
    seconds = None
    if not out.is_file():
        tmp = out.with_name(out.name + ".tmp")
        seconds, _ = run_tool(command[:2] + [str(tmp)] + command[3:], log)
        tmp.rename(out)
    fallbacks = [f"{a}->{b}" for a, b in FALLBACK_LINE.findall(log.read_text())] if log.is_file() else []
    notes = [f"{len(fallbacks)} tensors not divisible by the block size took a fallback type: " +
             ", ".join(f"{t} x{fallbacks.count(t)}" for t in sorted(set(fallbacks)))] if fallbacks else []
    return ModelFile(quant, str(out), out.stat().st_size, models.file_sha256(out), shlex.join(command), seconds, notes)


def gguf_py_version(build: llamacpp_tools.Build) -> str:
    text = (build.source_dir / "gguf-py" / "pyproject.toml").read_text()
    match = re.search(r'^version\s*=\s*"([^"]+)"', text, re.M)
    return match.group(1) if match else "unknown"


def prepare_files(args, build: llamacpp_tools.Build) -> list[ModelFile]:
    source = Path(args.source)
    folder = args.tools_cache / "quant-tradeoff" / f"{source.stem}-{models.file_sha256(source)[:12]}"
    folder.mkdir(parents=True, exist_ok=True)
    stem = source.stem.split(".")[0]  # SmolLM2-135M-Instruct
    files = [dequantize(source, folder / f"{stem}-fp32")]
    f16 = convert_to_f16(build, Path(files[0].path), folder / f"{stem}-F16.gguf",
                         converter_deps(build, args.tools_cache))
    files.append(f16)
    files += [quantize(build, Path(f16.path), q, folder / f"{stem}-{q}.gguf", args.threads) for q in args.quants]
    if not args.skip_source_row:
        files.append(ModelFile(f"{models.gguf_quant(source.name) or 'source'} (the source file)", str(source),
                               source.stat().st_size, models.file_sha256(source), "given", None,
                               ["the very weights the fp32 row de-quantized, run by llama.cpp's kernels"]))
    return files


def print_files(files: list[ModelFile]) -> None:
    print(f"\n{'file':<22} {'MB':>8}  sha256")
    for f in files:
        made = "reused" if f.seconds is None else f"made in {f.seconds:.0f} s"
        print(f"{f.label:<22} {f.bytes / 1e6:8.1f}  {f.sha256}  {made}  {f.path}")
        for note in f.notes:
            print(f"{'':<22}   {note}")


# ----------------------------------------------------------------------------------------------
# Measuring: benchmark.py over every row, in one run
# ----------------------------------------------------------------------------------------------

def benchmark_command(args, files: list[ModelFile]) -> list[str]:
    """No --engine: benchmark.py's default puts the directory on transformers and each GGUF on llama.cpp."""
    command = [sys.executable, "benchmark.py", "--models", *[f.path for f in files],
               "--threads", str(args.threads), "--repetitions", str(args.repetitions),
               "--mmlu-data", args.mmlu_data, "--mmlu-limit", str(args.mmlu_limit),
               "--mmlu-shots", *map(str, args.mmlu_shots), "--skip-humaneval", "--device", "cpu",
               "--seed", str(args.seed), "--output-dir", args.output_dir]
    return command


def run_benchmark(args, files: list[ModelFile]) -> Path:
    """benchmark.py as a program (its own process, its own results file); the file it wrote."""
    command = benchmark_command(args, files)
    # the reference dtype through transformers' auto choice; torch gets llama.cpp's thread count
    overrides = {models.CPU_BF16_ENV: REFERENCE_DTYPES[args.reference_dtype], "OMP_NUM_THREADS": str(args.threads)}
    env = dict(os.environ, **overrides)
    print("$", " ".join(f"{k}={v}" for k, v in overrides.items()), shlex.join(command), flush=True)
    proc = subprocess.Popen(command, cwd=results_io.PROJECT_ROOT, env=env, stdout=subprocess.PIPE, text=True)
    written = None
    for line in proc.stdout:
        print(line, end="", flush=True)
        if line.startswith("results: "):
            written = Path(line.split()[1])
    if proc.wait() not in (0, 1) or written is None:  # 1: a phase failed, still recorded
        raise models.UserError(f"benchmark.py failed (exit {proc.returncode}); rerun the command above.")
    return written if written.is_absolute() else results_io.PROJECT_ROOT / written


# ----------------------------------------------------------------------------------------------
# Comparing each row with the full-precision one
# ----------------------------------------------------------------------------------------------

def correct_by_question(row: ModelResult, shots: str) -> dict[tuple[str, int], bool]:
    return {(q.subject, q.index): q.correct for q in row.mmlu[shots].questions}


def find_reference(run: BenchmarkRun) -> ModelResult:
    """The transformers row (the de-quantized full-precision weights)."""
    rows = [r for r in run.models.values() if r.ok and r.engine == "transformers"]
    if len(rows) != 1:
        raise models.UserError("the benchmark run needs exactly one transformers row (the fp32 reference); "
                               f"it has {len(rows)}.")
    return rows[0]


def cost_rows(run: BenchmarkRun) -> list[dict]:
    """One dict per row: sizes, speed, memory, MMLU per shot count, and the paired comparison with the
    reference row on the questions both answered."""
    reference = find_reference(run)
    out = []
    for row in sorted(run.models.values(), key=lambda r: (r.engine != "transformers", -(r.disk_bytes or 0))):
        entry = {"model": row.model, "engine": row.engine, "weights": row.weights_label, "error": row.error,
                 "phase_errors": row.phase_errors, "disk_bytes": row.disk_bytes, "weight_bytes": row.weight_bytes,
                 "peak_bytes": row.memory.peak_bytes if row.memory else None, "mmlu": {}}
        if row.speed:
            entry.update(prefill=[row.speed.prefill.mean, row.speed.prefill.std],
                         decode=[row.speed.decode.mean, row.speed.decode.std])
        for shots, result in (row.mmlu.items() if isinstance(row.mmlu, dict) else ()):
            item = {"accuracy": result.micro.accuracy, "ci95": result.micro.ci95, "n": result.micro.total,
                    "seconds": result.seconds}
            if row is not reference and isinstance(reference.mmlu, dict) and shots in reference.mmlu:
                ref, other = correct_by_question(reference, shots), correct_by_question(row, shots)
                keys = sorted(ref.keys() & other.keys())
                item["vs_reference"] = results_io.paired_comparison([ref[k] for k in keys], [other[k] for k in keys])
            entry["mmlu"][shots] = item
        out.append(entry)
    return out


def fmt_pair(pair) -> str:
    return f"{pair[0]:.1f} ± {pair[1]:.1f}" if pair else "n/a"


def table_rows(costs: list[dict], shots: str) -> list[list]:
    rows = []
    for c in costs:
        m = c["mmlu"].get(shots)
        vs = (m or {}).get("vs_reference")
        rows.append([c["weights"], c["engine"], results_io.gb(c["disk_bytes"]), results_io.gb(c["weight_bytes"]),
                     results_io.gb(c["peak_bytes"]), fmt_pair(c.get("prefill")), fmt_pair(c.get("decode")),
                     f"{100 * m['accuracy']:.1f} [{100 * m['ci95'][0]:.1f}, {100 * m['ci95'][1]:.1f}]" if m else "n/a",
                     f"{100 * vs['agreement']:.1f}% ({vs['only_reference_right']}/{vs['only_other_right']})" if vs
                     else "reference",
                     f"{100 * vs['accuracy_diff']:+.1f} [{100 * vs['diff_ci95'][0]:+.1f}, {100 * vs['diff_ci95'][1]:+.1f}]"
                     if vs else "", f"{vs['mcnemar_p']:.3f}" if vs else ""])
    return rows


def cost_headers(shots: str, run: BenchmarkRun) -> list[str]:
    s = run.settings
    return ["Weights", "Engine", "Disk GB", "Weights GB", "Peak RSS GB", f"Prefill pp{s.get('prompt_tokens')} tok/s",
            f"Decode tg{s.get('new_tokens')} tok/s", f"MMLU {shots}-shot % [95% CI]",
            "Same outcome as fp32 (only fp32 / only this right)", "Δ accuracy pts [95% CI]", "McNemar p"]


def render_markdown(data: dict, run: BenchmarkRun) -> str:
    parts = [f"# What each quant costs: {Path(data['settings']['source']).name}\n",
             "Every row comes from the same weights: the Q4_1 GGUF de-quantized to fp32 by transformers (the "
             "reference row), converted to F16 by llama.cpp's convert_hf_to_gguf.py and quantized from F16 by "
             "llama-quantize. The source was already Q4_1, so each quant re-quantizes weights on a Q4_1 grid.\n",
             f"Benchmark run: `{data['benchmark_results']}`.\n"]
    for shots in data["shots"]:
        parts += [f"## MMLU {shots}-shot\n", results_io.markdown_table(cost_headers(shots, run),
                                                                       table_rows(data["costs"], shots))]
    rows = [[f["label"], f"{f['bytes'] / 1e6:.1f}", f"`{f['sha256']}`", f"`{f['made_by']}`", "; ".join(f["notes"])]
            for f in data["files"]]
    parts += ["## Files\n", results_io.markdown_table(["File", "MB", "sha256", "Made by", "Notes"], rows),
              f"Converter: llama.cpp {data['build']['llama_cpp_commit']} (build "
              f"{data['build']['llama_cpp_build_number']}) convert_hf_to_gguf.py with its gguf-py "
              f"{data['gguf_py_version']}; llama-quantize from the same sources, flags "
              f"`{' '.join(data['build']['cmake_args'])}`.\n", "## Environment\n",
              results_io.environment_markdown(data["environment"])]
    return "\n".join(parts)


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default=DEFAULT_SOURCE, help="the GGUF every row starts from (default: the "
                                                                 "shared SmolLM2-135M-Instruct Q4_1)")
    parser.add_argument("--quants", nargs="+", default=DEFAULT_QUANTS, help=f"llama-quantize types made from F16 "
                                                                             f"(default: {' '.join(DEFAULT_QUANTS)})")
    parser.add_argument("--reference-dtype", choices=list(REFERENCE_DTYPES), default="fp32",
                        help="dtype of the transformers reference row (default: fp32)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for llama.cpp, torch "
                                                                  "(OMP_NUM_THREADS) and llama-quantize (default: every core)")
    parser.add_argument("--repetitions", type=int, default=DEFAULT_REPETITIONS,
                        help=f"benchmark.py speed repetitions (default: {DEFAULT_REPETITIONS})")
    parser.add_argument("--mmlu-data", default=DEFAULT_MMLU_DATA, help="MMLU CSV folder (default: ../shared/data/mmlu)")
    parser.add_argument("--mmlu-limit", type=int, default=DEFAULT_MMLU_LIMIT,
                        help=f"first N questions per subject (default: {DEFAULT_MMLU_LIMIT})")
    parser.add_argument("--mmlu-shots", nargs="+", type=int, default=DEFAULT_MMLU_SHOTS,
                        help="few-shot counts (default: 0)")
    parser.add_argument("--skip-source-row", action="store_true",
                        help="leave out the source GGUF itself (the fp32 row's exact weights on llama.cpp's kernels)")
    parser.add_argument("--prepare-only", action="store_true", help="make and fingerprint the files; measure nothing")
    parser.add_argument("--benchmark-results", metavar="RUN.json", default=None,
                        help="compare the rows of this finished benchmark.py run instead of running a new one")
    llamacpp_tools.add_measurement_args(parser)
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not Path(args.source).is_file() or not args.source.endswith(".gguf"):
        parser.error(f"--source {args.source}: not a .gguf file.")
    if not args.prepare_only and not args.benchmark_results and not (Path(args.mmlu_data) / "test").is_dir():
        parser.error(f"--mmlu-data {args.mmlu_data}: no test/ folder; point it at the MMLU CSV folder.")
    if args.benchmark_results and not Path(args.benchmark_results).is_file():
        parser.error(f"--benchmark-results {args.benchmark_results}: no such file")
    models.require_at_least_one(parser, args, ("threads", "repetitions", "mmlu_limit", "jobs"))
    if any(k < 0 for k in args.mmlu_shots):
        parser.error("--mmlu-shots must be 0 or more")
    args.source = str(Path(args.source).resolve())
    args.mmlu_data = str(Path(args.mmlu_data).resolve())
    args.threads = args.threads or len(os.sched_getaffinity(0))
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    build = llamacpp_tools.build_from_args(args, targets=("llama-quantize",))
    files = prepare_files(args, build)
    print_files(files)
    if args.prepare_only:
        return 0
    results_path = Path(args.benchmark_results) if args.benchmark_results else run_benchmark(args, files)
    run = BenchmarkRun.from_dict(json.loads(results_path.read_text(encoding="utf-8")))
    costs = cost_rows(run)
    shots = sorted({k for c in costs for k in c["mmlu"]}, key=int)
    data = {"script": "bench_quant_tradeoff", "settings": {k: getattr(args, k) for k in (
                "source", "quants", "reference_dtype", "threads", "repetitions", "mmlu_data", "mmlu_limit",
                "mmlu_shots", "skip_source_row", "seed")},
            "environment": results_io.environment("cpu", args.seed, None), "build": build.describe(),
            "gguf_py_version": gguf_py_version(build), "files": [asdict(f) for f in files],
            "benchmark_command": benchmark_command(args, files), "benchmark_results": str(results_path),
            "shots": shots, "costs": costs}
    for k in shots:
        print(f"\nWhat each quant costs (MMLU {k}-shot, {costs[0]['mmlu'][k]['n']} questions):")
        print(results_io.markdown_table(cost_headers(k, run), table_rows(costs, k)))
    json_path, _ = results_io.result_paths(args.output_dir, "bench_quant_tradeoff")
    results_io.write_results(json_path, data, render_markdown(data, run))
    print(f"results: {json_path} and {json_path.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    models.run_cli(main)
