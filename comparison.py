"""The comparison page: docs/COMPARISON.md and its charts, built from results files, never by hand.

    python benchmark.py --report                       # every results/benchmark-*.json, newest fine-tune and speculative runs
    python benchmark.py --report results/benchmark-20261201-120000.json --report-output /tmp/PAGE.md

One row per model, hardware, engine and weights format: the newest figure of each kind across the runs,
each citing its run (R1, R2, …). Published scores from the registry stand beside ours with a verdict.
Where a model was measured in several weights formats or engines, "What each quant costs" compares each
with the full-precision row (for one GGUF file on two engines: the de-quantized one) question by question.
The same results always give the same bytes (charts included).
"""

from __future__ import annotations

import json
import os
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import models
import results_io
from mmlu import ALL_SUBJECTS, CHANCE
from records import BenchmarkRun, HumanEvalResult, MMLUResult, ModelResult

DEFAULT_REPORT_PATH = "docs/COMPARISON.md"
# The page quotes fine-tuning runs of the README's own command only (one per CPU dtype), so what it shows
# is what a reader who runs that command gets.
README_FINETUNE_COMMAND = "finetune_demo.py --model ../shared/models/SmolLM2-135M-Instruct.Q4_1.gguf"
ONE_B_CLASS = (0.9e9, 2.0e9)  # published parameter counts that compete in the recommendations
# Known differences between a published figure and our measurement, each worth this many percentage
# points on top of our 95% CI before a gap is flagged. Why these sizes: docs/design.md, "Published scores".
METHOD_ALLOWANCE_PTS = {
    "method": 3.0,  # the source does not say how it scored MMLU
    "checkpoint": 5.0,  # published for the base model; we scored the instruct/chat one
    "shots": 3.0,  # published few-shot count differs from ours
    "subset": 5.0,  # our MMLU subjects / HumanEval problems are a fixed subset, not a random sample
    "quantized": 2.0,  # weights were quantised (GGUF Q4/Q8, int8, int4) before scoring
    "prompt": 5.0,  # HumanEval prompt format differs (completion vs chat)
}
ALLOWANCE_WORDS = {"method": "scoring not stated", "checkpoint": "published for another checkpoint",
                   "shots": "different shot count", "subset": "subset", "quantized": "quantised weights",
                   "prompt": "different prompt format"}


@dataclass
class ReportRun:
    rid: str  # "R1": how the page cites this file
    path: Path
    data: dict  # the file as read (fine-tune and speculative runs are read through it)
    kind: str  # "benchmark" | "finetune" | "speculative"
    bench: BenchmarkRun | None = None  # benchmark runs as records

    @property
    def date(self) -> str:
        return self.data["environment"]["date"]


@dataclass
class Measured:
    """One figure from a results file, with the row entry and run it came from."""
    value: object  # Speed | Memory | MMLUResult | HumanEvalResult
    entry: ModelResult
    run: ReportRun


@dataclass
class ModelRow:
    """One model on one hardware, engine and weights format: the newest figure of each kind."""
    label: str
    spec: models.ModelSpec | None
    hardware: str
    engine: str
    weights: str
    entry: ModelResult  # the newest entry: parameter count, weight bytes, KV cache size
    entry_run: ReportRun
    speed: Measured | None = None
    memory: Measured | None = None
    mmlu: dict = field(default_factory=dict)  # shots (str) -> Measured
    humaneval: dict = field(default_factory=dict)  # prompt mode -> Measured

    @property
    def params(self) -> int:
        return self.entry.params

    @property
    def runs_on(self) -> str:
        """'transformers · bf16', 'llama.cpp · GGUF Q4_1'."""
        return f"{self.engine} · {self.weights}"


# ----------------------------------------------------------------------------------------------
# Reading results
# ----------------------------------------------------------------------------------------------

def read_results_file(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise models.UserError(f"--report {path}: cannot read it as a results file ({exc}).")
    if not isinstance(data, dict) or "environment" not in data:
        raise models.UserError(f"--report {path}: not a results file of this suite (no environment block).")
    return data


def find_report_runs(files: list[str], results_dir: Path) -> list[ReportRun]:
    """Benchmark runs (given, or every results/benchmark-*.json), the newest fine-tune and reload runs,
    and the newest speculative-decoding run of each configuration, numbered R1, R2, … in date order
    within each kind."""
    bench = [Path(f) for f in files] or sorted(results_dir.glob("benchmark-*.json"))
    if not bench:
        raise models.UserError(f"no benchmark results in {results_dir}/: run benchmark.py first, or pass "
                               "RUN.json files to --report.")
    found = []
    for path in bench:
        data = read_results_file(path)
        if data.get("script") != "benchmark" or "models" not in data:
            raise models.UserError(f"--report {path}: not a benchmark.py results file.")
        found.append(("benchmark", path, data))
    tunes = [(p, read_results_file(p)) for p in sorted(results_dir.glob("finetune*/finetune_demo.json"))]
    readme_runs: dict[str, tuple[Path, dict]] = {}  # dtype -> the newest training run of the README's command
    for path, data in tunes:
        if "training" in data and data["environment"]["command"] == README_FINETUNE_COMMAND:
            dtype = data["model"]["dtype"]
            if dtype not in readme_runs or data["environment"]["date"] > readme_runs[dtype][1]["environment"]["date"]:
                readme_runs[dtype] = (path, data)
    found += [("finetune", path, data) for path, data in readme_runs.values()]
    reloads = [t for t in tunes if "reproduced" in t[1]]
    if reloads:  # the newest reload check of a saved adapter
        found.append(("finetune", *max(reloads, key=lambda t: (t[1]["environment"]["date"], str(t[0])))))
    newest_spec: dict[tuple, tuple[Path, dict]] = {}  # the newest run of each configuration
    for path in sorted(results_dir.glob("speculative_demo-*.json")):
        data = read_results_file(path)
        if "prompts" in data and "target" in data:
            config = (data["target"]["model"], data["target"]["dtype"],
                      (data.get("compatibility") or {}).get("draft"), tuple(data["methods"]),
                      tuple(data["prompts"]), data["settings"]["k"])
            if config not in newest_spec or data["environment"]["date"] > newest_spec[config][1]["environment"]["date"]:
                newest_spec[config] = (path, data)
    found += [("speculative", path, data) for path, data in newest_spec.values()]
    kinds = ("benchmark", "finetune", "speculative")
    found.sort(key=lambda f: (kinds.index(f[0]), f[2]["environment"]["date"], str(f[1])))
    return [ReportRun(f"R{i}", path, data, kind, BenchmarkRun.from_dict(data) if kind == "benchmark" else None)
            for i, (kind, path, data) in enumerate(found, 1)]


def row_weights(e: ModelResult) -> str:
    """The weights format a row is keyed by: a random-weight twin counts as the released weights in
    its dtype, so real figures replace the twin's in the same row."""
    return e.dtype if e.source == "synthetic" else e.weights_label


def hardware_label(e: ModelResult, run: ReportRun) -> str:
    """'AMD EPYC (cpu)', or 'AMD EPYC (cpu, 1 thread)' for a CPU run limited to fewer threads than the
    machine's cores: figures on other thread counts are other rows, never merged or ranked as one."""
    cores = ((run.data.get("environment") or {}).get("cpu") or {}).get("cores_logical")
    if e.device == "cpu" and e.threads and cores and e.threads < cores:
        return f"{e.device_name} ({e.device}, {e.threads} thread{'s' if e.threads > 1 else ''})"
    return f"{e.device_name} ({e.device})"


def collect_rows(runs: list[ReportRun]) -> list[ModelRow]:
    """Merge every benchmark run into one row per (model, hardware, engine, weights): the newest figure
    of each kind wins, except that a real-weights speed figure is never replaced by a random twin's."""
    rows: dict[tuple, ModelRow] = {}
    for run in (r for r in runs if r.kind == "benchmark"):
        for e in run.bench.models.values():
            if not e.ok:
                continue
            spec = models.spec_of(e.hf_id or e.name)
            label = spec.key if spec else e.model
            key = (label, hardware_label(e, run), e.engine, row_weights(e))
            row = rows.setdefault(key, ModelRow(label, spec, key[1], e.engine, key[3], e, run))
            row.entry, row.entry_run = e, run
            if e.speed and e.memory and (row.speed is None or row.speed.entry.source == "synthetic"
                                         or e.source != "synthetic"):
                row.speed, row.memory = Measured(e.speed, e, run), Measured(e.memory, e, run)
            for shots, result in (e.mmlu.items() if isinstance(e.mmlu, dict) else ()):
                row.mmlu[shots] = Measured(result, e, run)
            if isinstance(e.humaneval, HumanEvalResult):
                row.humaneval[e.humaneval.mode] = Measured(e.humaneval, e, run)
    order = list(models.REGISTRY)
    return sorted(rows.values(), key=lambda r: (r.label not in order, order.index(r.label) if r.label in order
                                                else 0, r.label, r.hardware, r.engine, r.weights))


def several_formats(rows: list[ModelRow]) -> set[str]:
    """Models shown in more than one row (engines or weights formats): their rows need the format named."""
    labels = [r.label for r in rows]
    return {label for label in labels if labels.count(label) > 1}


# ----------------------------------------------------------------------------------------------
# Quality: measured, published, verdicts
# ----------------------------------------------------------------------------------------------

def measured_quality(row: ModelRow, benchmark: str, shots: int | None = None,
                     mode: str | None = None) -> tuple[float, float, float, Measured, int | None] | None:
    """(accuracy %, CI low %, CI high %, figure, shots) of our closest measurement, or None. MMLU: the
    asked shot count, else the most shots measured. HumanEval: the asked prompt mode, else the one that
    suits the model (chat for instruct models, completion for base models), else any."""
    if benchmark == "mmlu":
        if not row.mmlu:
            return None
        key = str(shots) if str(shots) in row.mmlu else max(row.mmlu, key=int)
        m = row.mmlu[key]
        low, high = m.value.micro.ci95
        return 100 * m.value.micro.accuracy, 100 * low, 100 * high, m, int(key)
    if not row.humaneval:
        return None
    suits = "chat" if row.spec is None or row.spec.instruct else "completion"
    m = row.humaneval.get(mode) or row.humaneval.get(suits) or row.humaneval[sorted(row.humaneval)[0]]
    he = m.value  # Wilson over problems: exact for greedy (1 sample), approximate for n > 1
    low, high = results_io.wilson_interval(round(he.pass_at_1 * he.problems), he.problems)
    return 100 * he.pass_at_1, 100 * low, 100 * high, m, None


def known_differences(score: models.PublishedScore, row: ModelRow, m: Measured, shots: int | None) -> list[str]:
    reasons = ["method"] if score.scoring == "unstated" else []
    if row.spec is not None and score.checkpoint.lower() != row.spec.hf_id.lower():
        reasons.append("checkpoint")
    if score.benchmark == "mmlu":
        if score.shots is not None and shots != score.shots:
            reasons.append("shots")
        if m.value.limit or len(m.value.subjects) < len(ALL_SUBJECTS):
            reasons.append("subset")
    else:
        if m.value.problems < 164:
            reasons.append("subset")
        if score.scoring != m.value.mode:
            reasons.append("prompt")
    if m.entry.is_quantized:
        reasons.append("quantized")
    return reasons


def compare_published(score: models.PublishedScore, row: ModelRow) -> dict:
    """Our closest measurement beside a published score, and whether the gap is larger than our 95% CI
    plus the allowances for the known differences in method (METHOD_ALLOWANCE_PTS)."""
    out = {"score": score, "measured": None, "verdict": "not measured here"}
    got = measured_quality(row, score.benchmark, score.shots, mode=score.scoring)
    if got is None:
        return out
    value, low, high, m, shots = got
    reasons = known_differences(score, row, m, shots)
    ci_side = (high - value) if score.value > value else (value - low)
    allowed = ci_side + sum(METHOD_ALLOWANCE_PTS[r] for r in reasons)
    out.update(measured=got, reasons=reasons, diff=value - score.value, allowed=allowed)
    if score.benchmark == "mmlu" and score.scoring not in ("loglik", "unstated"):
        out["verdict"] = f"not comparable ({score.scoring} scoring; ours is answer-letter log-likelihood)"
    else:
        out["verdict"] = "agrees" if abs(value - score.value) <= allowed else "⚠ differs"
    return out


def headline_published(spec: models.ModelSpec | None, benchmark: str,
                       like_for_like: bool = False) -> models.PublishedScore | None:
    """The published figure to show for a model: its own checkpoint first, then letter-likelihood /
    completion scoring, then 5-shot. `like_for_like` keeps only figures scored the way we score, so
    models can be ranked against each other (base checkpoints included)."""
    scores = [s for s in (spec.published if spec else ()) if s.benchmark == benchmark
              and (not like_for_like or s.scoring in ("loglik", "unstated", "completion"))]
    if not scores:
        return None
    return min(scores, key=lambda s: (s.checkpoint.lower() != spec.hf_id.lower(),
                                      s.scoring not in ("loglik", "completion"), s.shots != 5))


def fmt_published(score: models.PublishedScore) -> str:
    shots = f", {score.shots}-shot" if score.shots is not None else ""
    return f"{score.value:g}%{shots} [source]({score.source})"


def fmt_quality(got, cite_run: bool = True) -> str:
    if got is None:
        return "not measured"
    value, low, high, m, shots = got
    shot = f", {shots}-shot" if shots is not None else f", {m.value.problems} problems, {m.value.mode}"
    return f"{value:.1f}% [{low:.1f}, {high:.1f}]{shot}" + (f" ({m.run.rid})" if cite_run else "")


def decode_tokens_per_joule(r: ModelRow) -> float | None:
    energy = r.speed.value.decode.energy if r.speed else None
    return energy["per_unit"]["units_per_j"] if energy else None


def mmlu_points_per_kj(r: ModelRow) -> float | None:
    """MMLU accuracy points per kilojoule per question (= points / kJ per 1,000 questions): the
    quality a joule buys, comparable across runs of different sizes."""
    got = measured_quality(r, "mmlu", 5)
    energy = got[3].value.energy if got else None
    return got[0] / (energy["per_unit"]["j_per_unit"]) if energy else None


def fmt_per_watt(r: ModelRow) -> str:
    tok_j, points = decode_tokens_per_joule(r), mmlu_points_per_kj(r)
    if tok_j is None and points is None:
        return "not measured"
    return " · ".join(x for x in (f"{tok_j:.2f} tok/J" if tok_j else "", f"{points:.1f} MMLU pts/kJ per 1k q"
                                  if points else "") if x)


def fmt_roofline(r: ModelRow) -> str:
    roof = r.speed.value.roofline if r.speed else None
    if roof is None or roof.fraction is None:
        return "n/a"
    return f"{roof.achieved_gb_s:.2f} GB/s = {100 * roof.fraction:.0f}%"


# ----------------------------------------------------------------------------------------------
# What each quant costs: every weights format of a model against its reference row
# ----------------------------------------------------------------------------------------------

def reference_row(group: list[ModelRow]) -> ModelRow | None:
    """The row a model's other rows are measured against: unquantized dense weights in the widest
    dtype. Where every row is quantized (one GGUF file on llama.cpp and transformers), the row that
    computes in the widest dtype: transformers de-quantizes the file and runs full-precision arithmetic
    on the same weights, so the table shows what llama.cpp's quantized kernels cost."""
    order = {"fp32": 0, "bf16": 1, "fp16": 1}
    scored = [r for r in group if r.mmlu]
    return min(scored, key=lambda r: (r.entry.is_quantized, order.get(r.entry.dtype, 2), r.engine != "transformers"),
               default=None)


def quant_cost_sections(rows: list[ModelRow]) -> list[str]:
    """One table per model measured in several weights formats with MMLU on the same questions:
    speed, memory, disk, accuracy and the paired comparison with its reference row."""
    parts = []
    several_hw = len({r.hardware for r in rows}) > 1
    groups = dict.fromkeys((r.label, r.hardware) for r in rows if r.label in several_formats(rows))
    for label, hardware in groups:  # one table per model and hardware: speeds on one machine and thread count
        group = [r for r in rows if (r.label, r.hardware) == (label, hardware)]
        ref = reference_row(group)
        if ref is None:
            continue
        for shots in sorted(ref.mmlu, key=int):
            base = ref.mmlu[shots].value
            table = []
            for r in group:
                if shots not in r.mmlu:
                    continue
                res = r.mmlu[shots].value
                paired = paired_mmlu(base, res)
                speed = r.speed.value if r.speed else None
                table.append([r.runs_on, results_io.gb(r.entry.disk_bytes), results_io.gb(r.entry.weight_bytes),
                              results_io.gb(r.memory.value.peak_bytes) if r.memory else "n/a",
                              speed.decode.fmt() if speed else "n/a", speed.prefill.fmt() if speed else "n/a",
                              res.micro.fmt()] + (
                    ["reference", "–", "–"] if r is ref else
                    ["not the same questions", "–", "–"] if paired is None else
                    [f"{100 * paired['agreement']:.1f}% ({paired['same_outcome']}/{paired['n']})",
                     f"{100 * paired['accuracy_diff']:+.1f} [{100 * paired['diff_ci95'][0]:+.1f}, "
                     f"{100 * paired['diff_ci95'][1]:+.1f}]", f"{paired['mcnemar_p']:.3f}"])
                    + [" · ".join(sorted({m.run.rid for m in (r.speed, r.mmlu[shots]) if m}))])
            if len(table) < 2:
                continue
            parts += [f"### What each quant costs: {label}{f' on {hardware}' if several_hw else ''}, MMLU {shots}-shot\n",
                      f"Reference: {ref.runs_on}. Agreement: questions answered correctly or incorrectly by both; "
                      "Δ accuracy: this row minus the reference, in points, with a 95% paired-bootstrap interval; "
                      "McNemar: exact two-sided p on the questions only one of the two got right.\n",
                      results_io.markdown_table(
                          ["Engine · weights", "Disk GB", "Weights GB", "Peak GB", "Decode tok/s", "Prefill tok/s",
                           "MMLU % [95% CI]", "Agreement with reference", "Δ accuracy [95% CI]", "McNemar p", "Runs"],
                          table)]
    return parts


def paired_mmlu(reference: MMLUResult, other: MMLUResult) -> dict | None:
    """Per-question comparison when both scored the same questions; None otherwise."""
    key = lambda q: (q.subject, q.index)  # noqa: E731
    ref = {key(q): q.correct for q in reference.questions}
    oth = {key(q): q.correct for q in other.questions}
    common = sorted(set(ref) & set(oth))
    if not common or len(common) != len(ref) or reference.data != other.data:
        return None
    return results_io.paired_comparison([ref[k] for k in common], [oth[k] for k in common])


# ----------------------------------------------------------------------------------------------
# Charts
# ----------------------------------------------------------------------------------------------

def draw_png_chart(path: Path, title: str, unit: str, bars: list[tuple[str, float | None, tuple | None]],
                   published: dict | None = None, chance: float | None = None) -> Path:
    """Horizontal bars (measured, with error bars) and diamonds (published), saved as a PNG with no
    timestamp or software tag so the same figures give the same bytes."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [b[0] for b in bars]
    values = [b[1] if b[1] is not None else 0.0 for b in bars]
    errors = [[(b[1] - b[2][0]) if b[1] is not None and b[2] else 0.0 for b in bars],
              [(b[2][1] - b[1]) if b[1] is not None and b[2] else 0.0 for b in bars]]
    right = max([v + e for v, e in zip(values, errors[1])] + list((published or {}).values()) + [1e-9])
    digits = 2 if right < 10 else 1
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(bars) + 1.4), dpi=100)
    y = list(range(len(bars)))
    ax.barh(y, values, xerr=errors, color="#4C72B0", ecolor="#222222", capsize=3, label="measured here")
    for yi, b, top in zip(y, bars, errors[1]):  # the value just past the error bar, so they never overlap
        if b[1] is not None:
            ax.text(b[1] + top + 0.01 * right, yi, f"{b[1]:.{digits}f}", va="center", ha="left", fontsize=8)
    if published:
        shown = [k for k in published if k in labels]
        ax.scatter([published[k] for k in shown], [y[labels.index(k)] for k in shown], marker="D",
                   color="#DD8452", zorder=3, label="published")
        for k in shown:
            ax.text(published[k], y[labels.index(k)] - 0.28, f"{published[k]:g}", va="center", ha="center",
                    fontsize=7, color="#A0522D")
    ax.set_xlim(0, right * 1.12)
    if chance is not None:
        ax.axvline(chance, color="#888888", linestyle="--", linewidth=1, label=f"chance ({chance:g}{unit})")
    ax.set_yticks(y, labels)
    ax.invert_yaxis()
    ax.set_xlabel(unit)
    ax.set_title(textwrap.fill(title, 90), fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    if published or chance is not None:
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, format="png", metadata={"Software": None})
    plt.close(fig)
    os.replace(tmp, path)
    return path


def row_name(r: ModelRow, rows: list[ModelRow], with_hardware: bool = True) -> str:
    """A row's name on charts: the model, plus engine and weights where the model has several rows,
    plus the hardware where the page covers several (unless the context already names it)."""
    twin = " (twin)" if r.speed and r.speed.entry.source == "synthetic" else ""
    several_hw = with_hardware and len({x.hardware for x in rows if x.speed}) > 1
    name = r.label + (f" · {r.runs_on}" if r.label in several_formats(rows) else "") + twin
    return f"{name} · {r.hardware}" if several_hw else name


def chart_sections(rows: list[ModelRow], img_dir: Path, page_dir: Path) -> list[str]:
    """Head-to-head charts, each as a PNG (linked) and as Unicode bars (readable in a terminal)."""
    def err(m) -> tuple[float, float]:
        return m.mean - m.std, m.mean + m.std

    speed = [r for r in rows if r.speed]
    charts = [
        ("decode", "Decode speed, tok/s (mean ± std; higher is better)", "tok/s",
         [(row_name(r, rows), r.speed.value.decode.mean, err(r.speed.value.decode)) for r in speed], None, None),
        ("prefill", "Prefill speed, tok/s (mean ± std; higher is better)", "tok/s",
         [(row_name(r, rows), r.speed.value.prefill.mean, err(r.speed.value.prefill)) for r in speed], None, None),
        ("memory", "Peak memory during generation above the pre-load baseline, GB (lower is better)", "GB",
         [(row_name(r, rows), r.memory.value.peak_bytes / 1e9, None) for r in speed], None, None),
    ]
    per_watt = [(row_name(r, rows), decode_tokens_per_joule(r), None) for r in speed if decode_tokens_per_joule(r)]
    if per_watt:
        charts.append(("ai-per-watt", "AI per watt: decode tokens per joule, whole machine as the counters see it "
                                      "(higher is better)", "tok/J", per_watt, None, None))
    for bench, title, chance in (("mmlu", "MMLU accuracy, % (measured with 95% CI; published: scored like ours, "
                                           "base checkpoints where that is all there is)", 100 * CHANCE),
                                 ("humaneval", "HumanEval pass@1, % (measured with 95% CI; published: completion "
                                               "prompts, base checkpoints where that is all there is)", None)):
        quality, published = [], {}
        for r in rows:
            got, pub = measured_quality(r, bench, 5), headline_published(r.spec, bench, like_for_like=True)
            if got is None and (pub is None or any(q[0] == r.label for q in quality)):
                continue
            name = row_name(r, rows) if got else r.label
            quality.append((name, got[0] if got else None, (got[1], got[2]) if got else None))
            if pub and r.label not in published:
                published[name] = pub.value
        charts.append((bench, title, "%", quality, published, chance))
    parts = []
    for stem, title, unit, bars, published, chance in charts:
        if not bars:
            continue
        png = draw_png_chart(img_dir / f"comparison-{stem}.png", title, unit, bars, published, chance)
        rel = Path(os.path.relpath(png, page_dir)).as_posix()
        digits = 2 if unit != "%" and max((b[1] or 0) for b in bars) < 10 else 1  # percentages: one decimal
        text = results_io.bar_chart([(b[0], b[1]) for b in bars if b[1] is not None], unit=unit, digits=digits)
        if published:
            text += "published:\n" + results_io.bar_chart(list(published.items()), unit=unit, digits=1)
        parts += [f"### {title}\n", f"![{title}]({rel})\n", "```text\n" + text + "```\n"]
    return parts


# ----------------------------------------------------------------------------------------------
# Tables and lines
# ----------------------------------------------------------------------------------------------

def summary_table(rows: list[ModelRow]) -> str:
    """Compact enough for a laptop screen: figures without run ids, which go to the last column."""
    one_hw = len({r.hardware for r in rows}) == 1
    headers = (["Model", "Engine · weights", "Params"] + ([] if one_hw else ["Hardware"])
               + ["Decode tok/s", "Prefill tok/s", "Roofline", "AI per watt", "Peak GB", "MMLU measured", "MMLU published",
                  "HumanEval measured", "HumanEval published", "Runs"])
    table = []
    for r in rows:
        sp, mm, he = r.speed, measured_quality(r, "mmlu", 5), measured_quality(r, "humaneval", None)
        twin = " (twin)" if sp and sp.entry.source == "synthetic" else ""
        runs = [f"{what} {m.run.rid}" for what, m in (("speed", sp), ("MMLU", mm and mm[3]), ("HumanEval", he and he[3]))
                if m]
        table.append([f"**{r.label}**{twin}", r.runs_on, f"{r.params / 1e9:.2f}B"] + ([] if one_hw else [r.hardware]) + [
            sp.value.decode.fmt() if sp else "n/a", sp.value.prefill.fmt() if sp else "n/a", fmt_roofline(r),
            fmt_per_watt(r),
            results_io.gb(r.memory.value.peak_bytes) if r.memory else "n/a",
            fmt_quality(mm, cite_run=False), published_cell(r.spec, "mmlu"),
            fmt_quality(he, cite_run=False), published_cell(r.spec, "humaneval"), " · ".join(runs)])
    return results_io.markdown_table(headers, table)


def published_cell(spec: models.ModelSpec | None, benchmark: str) -> str:
    """The figure scored most like ours (a base checkpoint's if need be), linked, tagged where it differs."""
    score = headline_published(spec, benchmark, like_for_like=True) or headline_published(spec, benchmark)
    if score is None:
        return "none found"
    tags = [f"{score.shots}-shot"] if score.shots is not None else []
    tags += [] if score.checkpoint.lower() == spec.hf_id.lower() else ["base model"]
    if score.scoring in ("cloze", "other"):
        tags.append(score.scoring if score.scoring == "cloze" else score.method.split(",")[0])
    return f"[{score.value:g}%]({score.source}) " + ", ".join(tags)


def ranked(rows: list[ModelRow], value, higher_is_better: bool) -> list[tuple[ModelRow, float]]:
    got = [(r, value(r)) for r in rows]
    return sorted([g for g in got if g[1] is not None], key=lambda g: -g[1] if higher_is_better else g[1])


def recommendation_lines(rows: list[ModelRow]) -> list[str]:
    """'When to use each model': each line is derived from a figure on this page and names it."""
    lines = []
    in_class = [r for r in rows if r.spec is None or ONE_B_CLASS[0] <= r.spec.params <= ONE_B_CLASS[1]]
    for hw in sorted({r.hardware for r in in_class if r.speed}):
        group = [r for r in in_class if r.speed and r.hardware == hw]
        for what, block, unit in (("Fastest decode", "decode", "tok/s"), ("Fastest prefill", "prefill", "tok/s")):
            order = ranked(group, lambda r: getattr(r.speed.value, block).mean, True)
            best, runner = order[0][0], (order[1][0] if len(order) > 1 else None)
            a = getattr(best.speed.value, block)
            text = (f"- **{what} on {hw}: {row_name(best, rows, False)}** — {a.fmt()} {unit} "
                    f"({best.speed.run.rid}, {best.runs_on})")
            if runner:
                b = getattr(runner.speed.value, block)
                tie = a.mean - a.std <= b.mean + b.std
                text += (f"; next {row_name(runner, rows, False)} {b.fmt()} ({a.mean / b.mean:.2f}×"
                         f"{', within one std: a tie' if tie else ''})")
            lines.append(text + ".")
        order = ranked(group, lambda r: r.memory.value.peak_bytes, False)
        best, worst = order[0][0], order[-1][0]
        lines.append(f"- **Least memory on {hw}: {row_name(best, rows, False)}** — peak "
                     f"{results_io.gb(best.memory.value.peak_bytes)} GB above baseline while generating "
                     f"({best.memory.run.rid}); the largest, {row_name(worst, rows, False)}, needs "
                     f"{results_io.gb(worst.memory.value.peak_bytes)} GB.")
    for bench, what in (("mmlu", "MMLU"), ("humaneval", "HumanEval")):
        measured = ranked(rows, lambda r: (measured_quality(r, bench, 5) or [None])[0], True)
        if measured:
            best = measured[0][0]
            got = measured_quality(best, bench, 5)
            note = "" if len({r.label for r, _ in measured}) > 1 else " — the only model with a measured score on this page"
            lines.append(f"- **Most accurate measured ({what}): {row_name(best, rows)}** — {fmt_quality(got)}{note}.")
        scores = {r.label: headline_published(r.spec, bench, like_for_like=True) for r in in_class}
        published = ranked(list({r.label: r for r in in_class}.values()),
                           lambda r: scores[r.label].value if scores[r.label] else None, True)
        if published:
            best, score = published[0][0], scores[published[0][0].label]
            others = ", ".join(f"{r.label} {v:g}" for r, v in published[1:])
            lines.append(f"- **Highest published {what} in the 1B class: {best.label}** — {fmt_published(score)} "
                         f"for `{score.checkpoint}` ({score.method}); published, not measured here"
                         + (f" (others, scored the same way: {others})" if others else "") + ".")
    return lines


def model_use_line(r: ModelRow, rows: list[ModelRow]) -> str:
    """One row's place on this page: its ranks on the measured figures, then the registry's facts."""
    bits = []
    group = [x for x in rows if x.speed and x.hardware == r.hardware]
    if r.speed and len(group) > 1:
        order = [x for x, _ in ranked(group, lambda x: x.speed.value.decode.mean, True)]
        mem = [x for x, _ in ranked(group, lambda x: x.memory.value.peak_bytes, False)]
        bits.append(f"decode #{order.index(r) + 1} of {len(group)} ({r.speed.value.decode.fmt()} tok/s, "
                    f"{r.speed.run.rid}), memory #{mem.index(r) + 1} of {len(group)} "
                    f"({results_io.gb(r.memory.value.peak_bytes)} GB, {r.memory.run.rid})")
    got = measured_quality(r, "mmlu", 5)
    if got:
        bits.append(f"MMLU {fmt_quality(got)}")
    spec = r.spec
    if spec:
        facts = [f"context {spec.context:,}", "chat-tuned" if spec.instruct else "base model (no chat tuning)",
                 f"licence {spec.license}"] + (["gated: accept the licence on its Hub page"] if spec.gated else [])
        bits.append(spec.strength + " (" + ", ".join(facts) + ")")
    return f"- **{row_name(r, rows)}** — " + "; ".join(bits) + "."


def published_rows(rows: list[ModelRow]) -> str:
    """Every published figure of a model we also measured on that benchmark, with the verdict."""
    headers = ["Model", "Published", "Checkpoint · method (the source's words)", "Measured here", "Gap",
               "Allowed gap", "Verdict"]
    table = []
    for r in rows:
        if r.spec is None:
            continue
        for score in r.spec.published:
            c = compare_published(score, r)
            if c["measured"] is None:
                continue
            ci = c["allowed"] - sum(METHOD_ALLOWANCE_PTS[k] for k in c["reasons"])
            allowed = f"{c['allowed']:.1f} = CI {ci:.1f}" + "".join(
                f" + {ALLOWANCE_WORDS[k]} {METHOD_ALLOWANCE_PTS[k]:g}" for k in c["reasons"])
            if c["verdict"].startswith("not comparable"):
                allowed = "– (not judged)"
            bench = "MMLU" if score.benchmark == "mmlu" else "HumanEval"
            table.append([row_name(r, rows), f"{bench} {fmt_published(score)}", f"`{score.checkpoint}` · {score.method}",
                          fmt_quality(c["measured"]), f"{c['diff']:+.1f}", allowed, c["verdict"]])
    if not table:
        return "No model on this page has both a measured and a published score on the same benchmark yet.\n"
    return results_io.markdown_table(headers, table)


def model_section(r: ModelRow, rows: list[ModelRow]) -> list[str]:
    spec, e, rid = r.spec, r.entry, r.entry_run.rid
    head = f"### {row_name(r, rows, False)} · {r.hardware}\n"
    facts = ""
    if spec:
        facts = (f"[`{spec.hf_id}`]({spec.url}) · {spec.params / 1e9:.2f}B parameters (published) · context "
                 f"{spec.context:,} · licence {spec.license}{' · gated' if spec.gated else ''} · "
                 f"{'chat-tuned' if spec.instruct else 'base model'}. {spec.strength}.\n")
    table = [["Engine", f"{e.engine}" + (f" ({e.engine_version})" if e.engine_version else ""), "what ran the model", rid],
             ["Parameters", f"{e.params:,}", "counted in the loaded model, tied embeddings once", rid],
             ["Weights in memory", f"{results_io.gb(e.weight_bytes)} GB", f"as loaded, {e.weights_label}", rid],
             ["KV cache", f"{e.kv_cache_bytes_per_1k_tokens / 1e6:.1f} MB per 1k tokens",
              "2 × layers × KV heads × head dim × bytes per element", rid]]
    if e.load_seconds is not None:
        table += [["Load time", f"{e.load_seconds:.2f} s", "tokenizer + weights onto the device, wall clock", rid],
                  ["Size on disk", f"{results_io.gb(e.disk_bytes)} GB", "weight files", rid]]
    if r.speed:
        sp, st = r.speed.value, r.speed.run.bench.settings
        setting = f"{st['repetitions']} repetitions after 1 warm-up, {r.speed.entry.weights_label}"
        table += [["Prefill", f"{sp.prefill.fmt()} tok/s", f"pp{sp.prefill.prompt_tokens}; {setting}", r.speed.run.rid],
                  ["Decode", f"{sp.decode.fmt()} tok/s", f"tg{sp.decode.new_tokens} forced length; {setting}",
                   r.speed.run.rid],
                  ["Time to first token", f"{sp.ttft.fmt(0)} ms", sp.ttft.prompt or "", r.speed.run.rid],
                  ["Peak memory while generating", f"{results_io.gb(r.memory.value.peak_bytes)} GB",
                   r.memory.value.method, r.memory.run.rid]]
        if sp.roofline and sp.roofline.fraction is not None:
            roof = sp.roofline
            table.append(["Decode vs memory bandwidth", f"{roof.achieved_gb_s:.2f} GB/s = {100 * roof.fraction:.0f}% "
                          f"of {roof.peak_gb_s:g} GB/s", f"weights × decode tok/s; memory allows "
                          f"{roof.bound_tok_s:.1f} tok/s", r.speed.run.rid])
    for shots, m in sorted(r.mmlu.items(), key=lambda kv: int(kv[0])):
        v = m.value
        subset = f"{len(v.subjects)} subjects" + (f" × first {v.limit}" if v.limit else "")
        table.append([f"MMLU {shots}-shot (micro)", v.micro.fmt() + " %",
                      f"{v.micro.total} questions, {subset}; {m.entry.weights_label}"
                      + (", chat template" if v.chat_template else ""), m.run.rid])
    for mode, m in sorted(r.humaneval.items()):
        he = m.value
        outcomes = ", ".join(f"{v} {k}" for k, v in he.outcomes.items())
        table.append([f"HumanEval pass@1 ({mode})", fmt_quality(measured_quality(r, "humaneval", mode=mode),
                                                                cite_run=False),
                      f"{he.samples_per_problem} sample(s) per problem, timeout {he.timeout_s:g} s; "
                      f"{outcomes}; {m.entry.weights_label}", m.run.rid])
    parts = [head, facts, results_io.markdown_table(["Figure", "Value", "How", "Run"], table)]
    if spec and spec.published:
        parts.append("Published: " + "; ".join(
            f"{'MMLU' if s.benchmark == 'mmlu' else 'HumanEval'} {fmt_published(s)} ({s.checkpoint}, {s.method})"
            for s in spec.published) + ".\n")
    return parts


def finetune_section(runs: list[ReportRun]) -> list[str]:
    """The README's fine-tuning command as it ran here, one column per dtype, and the reload check."""
    trained = [r for r in runs if r.kind == "finetune" and "training" in r.data]
    reload = next((r for r in runs if r.kind == "finetune" and "reproduced" in r.data), None)
    if not trained:
        return ["## Fine-tuning\n", f"No run of the README's command (`{README_FINETUNE_COMMAND}`) found.\n"]

    def pct(block, key):
        low, high = block[f"{key}_ci95"]
        return f"{block[key]}/{block['n']} = {block[f'{key}_pct']:.1f}% [{low:.1f}, {high:.1f}]"

    def watch(d):
        w = d["training"].get("format_watch") or {}
        if w.get("first_step_at_target") is None:
            return "not reached" if w else "not watched"
        return (f"step {w['first_step_at_target']} of {d['training']['steps']} "
                f"({w['training_seconds_to_target']:.0f} s of training)")

    def column(r: ReportRun) -> list[str]:
        d = r.data
        b, a, t, prec = d["before"], d["after"], d["training"], d.get("precision", {})
        return [f"{d['model']['dtype']} on {d['model']['device_name']} ({r.rid})",
                f"lr {d['config']['arguments']['learning_rate']:g}, r {d['config']['arguments']['lora_r']}, "
                f"batch {d['config']['arguments']['batch_size']} × {d['config']['arguments']['grad_accum']}, "
                f"{d['config']['arguments']['epochs']:g} epoch(s); {d['lora']['trainable']:,} trainable",
                f"{t['steps']} steps, {t['tokens']:,} tokens, {t['wall_seconds']:.0f} s "
                f"({t['tokens_per_second']:.1f} tok/s without the watch)",
                f"{prec.get('base_dtype', '?')} / {prec.get('adapter_dtype', '?')} / {t.get('optimizer_state_dtype', '?')}",
                f"{pct(b, 'format_valid')} → {pct(a, 'format_valid')}", watch(d),
                f"{pct(b, 'correct')} → {pct(a, 'correct')}", f"{b['loss']:.3f} → {a['loss']:.3f}"]
    labels = ["Run", "Defaults chosen for the model", "Training", "Base / LoRA / optimizer dtype",
              f"Held-out answers in the taught format ({trained[0].data['before']['check']})",
              "Watched answers ≥ 90% in the format from", "Held-out: correct answer", "Held-out loss"]
    columns = [column(r) for r in trained]
    rows = [[label] + [c[i] for c in columns] for i, label in enumerate(labels)]
    if reload:
        rep = reload.data["reproduced"]
        rows.append(["Adapter reloaded in a new process", f"{rep['identical']}/{rep['n']} answers identical "
                                                          f"({reload.rid})"] + [""] * (len(columns) - 1))
    return ["## Fine-tuning: the README's command\n",
            f"`python {README_FINETUNE_COMMAND}`, as run here under each CPU dtype (BILLION_LLM_CPU_BF16=1 and 0). "
            "Percentages are of held-out prompts with 95% Wilson intervals.\n",
            results_io.markdown_table(["", *("Before → after LoRA" for _ in columns)], rows)]


def fmt_trials(trials: list[float]) -> str:
    mean, std = results_io.mean_std(trials)
    return f"{mean:.1f} (1 trial)" if len(trials) == 1 else f"{mean:.1f} ± {std:.1f}"


def speculative_section(runs: list[ReportRun]) -> list[str]:
    """One small table per run and prompt: the methods side by side against the target alone."""
    spec_runs = [r for r in runs if r.kind == "speculative"]
    if not spec_runs:
        return ["## Speculative decoding\n", "No speculative_demo.py results found.\n"]
    parts = ["## Speculative decoding (newest speculative_demo.py run of each configuration)\n",
             "tok/s is mean ± std over the run's repeats; speedup is against the target alone with Hugging Face "
             "`generate`; α is the per-token acceptance rate; greedy output is compared token by token with the "
             "target alone: a difference where the target's top two logits tie (gap 0.000, bf16/fp16) is a "
             "rounding tie between a one-token and a many-token pass, not a wrong acceptance (docs/speculative.md).\n"]
    for run in spec_runs:
        d = run.data
        draft = f"draft {d['compatibility']['draft']}" if d.get("compatibility") else "no draft model"
        for kind, prompt in d["prompts"].items():
            table = []
            for method, m in prompt["methods"].items():
                check = m.get("lossless") or {}
                greedy = "–" if not check else "identical" if check["identical"] else (
                    f"differs from token {check['first_mismatch']} (target's top-2 logit gap there "
                    f"{check['target_top2_logit_gap']:.3f})")
                table.append([method, fmt_trials(m["tok_s_trials"]), f"{m['speedup_vs_hf']:.2f}×",
                              f"{m['tokens_per_target_forward']:.2f}", f"{m['alpha']:.2f}" if "alpha" in m else "–",
                              greedy])
            parts += [f"**{run.rid}**: target {d['target']['model']} ({d['target']['dtype']}, "
                      f"{d['target']['device_name']}), {draft}, prompt *{kind}* ({prompt['prompt_tokens']} tokens), "
                      f"k = {d['settings']['k']}, {d['settings']['max_new_tokens']} new tokens, "
                      f"{d['settings'].get('repetitions', d['settings'].get('repeats'))} repetition(s).\n",
                      results_io.markdown_table(["Method", "tok/s", "Speedup vs target", "Tokens / target forward",
                                                 "α", "Greedy output"], table)]
    return parts


def load_average_of(data: dict) -> str:
    """1/5/15-minute load averages at the start, wherever the script recorded them."""
    load = (data["environment"].get("load_average") or data.get("load_average")
            or data.get("settings", {}).get("load_average"))
    if isinstance(load, str):
        load = load.split()
    return " / ".join(f"{float(x):.1f}" for x in load) if load else "not recorded"


def used_runs(rows: list[ModelRow]) -> set[str]:
    """The benchmark runs at least one figure on the page comes from (fine-tune and speculative runs
    are always used)."""
    figures = [m for r in rows for m in (r.speed, r.memory, *r.humaneval.values(), *r.mmlu.values()) if m]
    return {m.run.rid for m in figures}


def hardware_of(env: dict) -> str:
    dev, cpu = env["device"], env["cpu"]
    gpu = f"{dev['name']} ({dev['memory_gb']} GB), " if dev["type"] != "cpu" else ""
    bandwidth = f", reads {env['memory_bandwidth']['best_gb_s']:g} GB/s" if env.get("memory_bandwidth") else ""
    return f"{dev['type']}: {gpu}{cpu['model']}, {cpu['cores_logical']} cores, {env['ram_gb']} GB RAM{bandwidth}"


def software_of(env: dict) -> str:
    return (f"{env['os']}, Python {env['python']}, "
            + ", ".join(f"{k} {v}" for k, v in env["packages"].items() if v))


def run_span(rids: list[str]) -> str:
    return ", ".join(rids) if len(rids) < 3 else f"{rids[0]}–{rids[-1]}" if \
        [int(r[1:]) for r in rids] == list(range(int(rids[0][1:]), int(rids[-1][1:]) + 1)) else ", ".join(rids)


def runs_section(runs: list[ReportRun], rows: list[ModelRow], page_dir: Path) -> list[str]:
    """Hardware per run in a table; software environments and command lines listed once each below."""
    used = used_runs(rows)
    table, software = [], {}
    for run in runs:
        env = run.data["environment"]
        rel = Path(os.path.relpath(run.path, page_dir)).as_posix()
        commit = env.get("git_commit") or "n/a"
        kind = run.kind if run.kind != "benchmark" or run.rid in used else "benchmark (superseded)"
        table.append([run.rid, f"[{run.path.name}]({rel})", kind, env["date"][:16].replace("T", " "),
                      hardware_of(env), load_average_of(run.data),
                      commit[:12] + ("+dirty" if commit.endswith("+dirty") else "")])
        software.setdefault(software_of(env), []).append(run.rid)
    return ["## Runs: hardware and software\n",
            "Every measured figure above names one of these runs; its JSON holds every trial, question and "
            "completion. *Superseded* runs gave figures that newer runs of the same model and hardware "
            "replaced; they are kept for the record. Load average: 1/5/15-minute, at the start of the run.\n",
            results_io.markdown_table(["Run", "File", "Script", "Date (UTC)", "Hardware", "Load avg", "Commit"],
                                      table),
            "Software:\n\n" + "\n".join(f"- {run_span(rids)}: {sw}" for sw, rids in software.items()) + "\n",
            "Commands:\n\n" + "\n".join(f"- {run.rid}: `{run.data['environment']['command']}`" for run in runs)
            + "\n"]


def energy_note(runs: list[ReportRun], rows: list[ModelRow]) -> str:
    """How the AI-per-watt column was measured, or why it is empty (each reason once)."""
    reasons = {}  # why -> the runs it applies to
    for r in runs:
        energy_env = (r.bench.environment.get("energy") or {}) if r.kind == "benchmark" else {}
        if r.kind == "benchmark" and r.rid in used_runs(rows) and not energy_env.get("available"):
            why = (energy_env.get("reason") or "").removeprefix("not measured — ") or "the run predates the energy meter"
            reasons.setdefault(why, []).append(r.rid)
    measured = any(decode_tokens_per_joule(r) for r in rows)
    text = ("AI per watt: decode tokens per joule from the hardware's energy counters over the decode trials, and "
            "MMLU points per kJ per question (docs/energy.md)." if measured else
            "AI per watt: no run on this page had a readable energy counter, so no energy figure is shown "
            "(none is estimated).")
    why = "; ".join(f"{', '.join(rids)}: {reason}" for reason, rids in sorted(reasons.items()))
    return text + (f" Why not: {why}." if why else "") + "\n"


def render_comparison(runs: list[ReportRun], rows: list[ModelRow], chart_parts: list[str], page_dir: Path) -> str:
    newest = max(r.date for r in runs)[:10]
    synthetic = sorted({r.label for r in rows if r.speed and r.speed.entry.source == "synthetic"})
    parts = [
        "# Which ~1B model? Measured comparison\n",
        f"Generated by `python benchmark.py --report` from {len(runs)} results files (newest {newest}); do not "
        "edit by hand — rerun the report. Every measured figure names its run (R1, R2, …, listed under *Runs* "
        "with hardware and software); every published figure links its source. Speed is mean ± std over "
        "repetitions; accuracies carry 95% Wilson intervals. A model measured through several engines or weights "
        "formats has one row for each.\n",
    ]
    if synthetic:
        parts.append(f"Speed and memory of {', '.join(synthetic)} were measured on random-weight twins: the same "
                     "architecture, shapes and dtype as the released model, built without a download, so the "
                     "figures match the real weights but say nothing about quality. Their quality columns are "
                     "published figures only.\n")
    hardware = sorted({r.hardware for r in rows})
    quant = quant_cost_sections(rows)
    parts += ["## Quick summary\n",
              (f"All on {hardware[0]}. " if len(hardware) == 1 else "")
              + "Speed is decode/prefill tok/s and peak memory while generating; Roofline is the decode's achieved "
                "memory bandwidth (weights × tok/s) and its share of what the machine's memory reads; accuracies "
                "are micro averages with 95% intervals; published figures link their source. *Runs* names the "
                "results file of each measured figure.\n",
              summary_table(rows),
              energy_note(runs, rows),
              "## When to use each model\n",
              "\n".join(recommendation_lines(rows)) + "\n",
              "\n".join(model_use_line(r, rows) for r in rows) + "\n",
              "## Head-to-head charts\n", *chart_parts]
    if quant:
        parts += ["## What each quant costs\n", *quant]
    parts += ["## Measured vs published\n",
              "A gap is flagged ⚠ when it is larger than our 95% CI (on the side of the published figure) plus an "
              "allowance for each known difference in method: "
              + ", ".join(f"{ALLOWANCE_WORDS[k]} {v:g} points" for k, v in METHOD_ALLOWANCE_PTS.items())
              + " (why: docs/design.md). Cloze, MMLU-redux and generative scores are other tasks and are shown, "
                "not judged. Published figures of models not measured here are in each model's section below.\n",
              published_rows(rows),
              "## Per model\n"]
    for r in rows:
        parts += model_section(r, rows)
    parts += finetune_section(runs) + speculative_section(runs) + runs_section(runs, rows, page_dir)
    return "\n".join(parts)


def write_report(files: list[str], results_dir: Path, page: Path) -> Path:
    """Build the page and its PNG charts from results files; the same inputs give the same bytes."""
    runs = find_report_runs(files, results_dir)
    rows = collect_rows(runs)
    chart_parts = chart_sections(rows, page.parent / "img", page.parent)
    results_io.atomic_write_text(page, render_comparison(runs, rows, chart_parts, page.parent))
    return page
