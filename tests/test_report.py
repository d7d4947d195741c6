"""benchmark.py --report (comparison.py): docs/COMPARISON.md is generated from results files,
reproducibly, every figure on it traces to a results file or a cited source, and one model measured on
two engines gets a row for each and a question-by-question comparison."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest

import benchmark
import comparison
import models
from mmlu import ALL_SUBJECTS
from records import Accuracy, BenchmarkRun, MMLUResult, ModelResult

ROOT = Path(__file__).resolve().parent.parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

pytestmark = pytest.mark.usefixtures("one_thread")


def report(results_dir: Path, page: Path, *files: str) -> Path:
    assert benchmark.main(["--report", *files, "--output-dir", str(results_dir), "--report-output", str(page)]) == 0
    return page


def copy_results(dst: Path) -> Path:
    """A clean copy of the results files the committed page cites in its Runs table, and nothing else:
    whatever else a person's results/ holds (their own runs) must not change what these tests see."""
    page = ROOT / "docs" / "COMPARISON.md"
    cited = run_files(page.read_text(encoding="utf-8"), page.parent).values()
    results = (ROOT / "results").resolve()
    for path in cited:
        target = dst / path.relative_to(results)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
    return dst


def tables(markdown: str) -> list[list[str]]:
    """Every Markdown table on the page, as its list of lines."""
    found, current = [], []
    for line in markdown.splitlines():
        if line.startswith("|"):
            current.append(line)
        elif current:
            found.append(current)
            current = []
    return found + ([current] if current else [])


def cells(line: str) -> list[str]:
    return [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]


def section_table(markdown: str, heading: str) -> tuple[list[str], list[list[str]]]:
    body = markdown.split(f"## {heading}\n", 1)[1]
    lines = tables(body)[0]
    return cells(lines[0]), [cells(line) for line in lines[2:]]


def run_files(markdown: str, page_dir: Path) -> dict[str, Path]:
    """R1 -> the results file the Runs table links to."""
    header, rows = section_table(markdown, "Runs: hardware and software")
    out = {}
    for row in rows:
        link = re.search(r"\]\(([^)]+)\)", row[header.index("File")]).group(1)
        out[row[0]] = (page_dir / link).resolve()
    return out


# ---------------------------------------------------------------------------------------------
# The committed page
# ---------------------------------------------------------------------------------------------

def test_committed_page_is_regenerated_byte_for_byte_from_results(tmp_path):
    """Deleting docs/COMPARISON.md and running the report recreates it exactly from results/."""
    results = copy_results(tmp_path / "results")
    page = report(results, tmp_path / "docs" / "COMPARISON.md")
    committed = (ROOT / "docs" / "COMPARISON.md").read_text(encoding="utf-8")
    assert page.read_text(encoding="utf-8") == committed, \
        "docs/COMPARISON.md is stale or hand-edited: run `python benchmark.py --report` and commit the result"
    for png in re.findall(r"\]\((img/[^)]+\.png)\)", committed):
        assert (ROOT / "docs" / png).is_file(), f"{png} is linked from the page but not committed"


def test_every_summary_figure_traces_to_its_run_or_source(tmp_path):
    results = copy_results(tmp_path / "results")
    page = report(results, tmp_path / "docs" / "COMPARISON.md")
    text = page.read_text(encoding="utf-8")
    files = run_files(text, page.parent)
    header, rows = section_table(text, "Quick summary")
    checked = 0
    for row in rows:
        label = row[0].split("**")[1]
        spec = models.REGISTRY.get(label)
        engine = row[header.index("Engine · weights")].split(" · ")[0]
        runs = dict(part.rsplit(" ", 1) for part in row[header.index("Runs")].split(" · ") if part)

        def entries(what):
            run = BenchmarkRun.from_dict(json.loads(files[runs[what]].read_text()))
            return [e for e in run.models.values()
                    if e.ok and e.engine == engine and models.spec_of(e.hf_id or e.name) is spec]
        for column, block in (("Decode tok/s", "decode"), ("Prefill tok/s", "prefill")):
            if row[header.index(column)] != "n/a":
                shown = {getattr(e.speed, block).fmt() for e in entries("speed") if e.speed}
                assert row[header.index(column)] in shown, f"{label} {column} is not in run {runs['speed']}"
                checked += 1
        mmlu = re.match(r"([\d.]+)% \[.*\], (\d+)-shot$", row[header.index("MMLU measured")])
        if mmlu:
            accs = {f"{100 * e.mmlu[mmlu.group(2)].micro.accuracy:.1f}" for e in entries("MMLU")
                    if isinstance(e.mmlu, dict) and mmlu.group(2) in e.mmlu}
            assert mmlu.group(1) in accs
            checked += 1
        for bench, column in (("mmlu", "MMLU published"), ("humaneval", "HumanEval published")):
            published = re.match(r"\[([\d.]+)%\]\((https://[^)]+)\)", row[header.index(column)])
            if published:
                assert any(s.benchmark == bench and f"{s.value:g}" == published.group(1)
                           and s.source == published.group(2) for s in spec.published)
                checked += 1
    assert checked >= 15, "the committed results should give the summary at least fifteen traceable figures"


def test_page_tables_are_well_formed_and_charts_are_pngs(tmp_path):
    results = copy_results(tmp_path / "results")
    page = report(results, tmp_path / "docs" / "COMPARISON.md")
    text = page.read_text(encoding="utf-8")
    for lines in tables(text):
        widths = {len(cells(line)) for line in lines}
        assert len(widths) == 1, f"ragged table starting {lines[0][:80]}"
        assert set(lines[1].replace("|", "").replace("-", "").replace(":", "")) <= {" ", ""}
    charts = re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", text)
    assert {Path(c).name for c in charts} >= {"comparison-decode.png", "comparison-memory.png",
                                              "comparison-mmlu.png", "comparison-humaneval.png"}
    for chart in charts:
        assert (page.parent / chart).read_bytes()[:8] == PNG_MAGIC


def test_newest_run_of_each_speculative_configuration_is_shown(tmp_path):
    results = copy_results(tmp_path / "results")
    older = sorted(results.glob("speculative_demo-*.json"))[0]
    data = json.loads(older.read_text())
    data["environment"]["date"] = "2099-01-01T00:00:00+00:00"
    (results / "speculative_demo-20990101-000000.json").write_text(json.dumps(data))
    shown = [r.path.name for r in comparison.find_report_runs([], results) if r.kind == "speculative"]
    assert "speculative_demo-20990101-000000.json" in shown and older.name not in shown


# ---------------------------------------------------------------------------------------------
# A fresh run, end to end
# ---------------------------------------------------------------------------------------------

def test_report_from_a_fresh_run_is_deterministic_png_included(tmp_path, tiny_models):
    out = tmp_path / "results"
    assert benchmark.main(["--models", str(tiny_models["llama"]), "--device", "cpu", "--dtype", "fp32",
                           "--output-dir", str(out), "--repetitions", "2", "--prompt-tokens", "16",
                           "--new-tokens", "4", "--category-max-new-tokens", "4", "--category-repetitions", "1",
                           "--skip-mmlu", "--skip-humaneval"]) == 0
    first = report(out, tmp_path / "a" / "COMPARISON.md")
    second = report(out, tmp_path / "b" / "COMPARISON.md")
    assert first.read_bytes() == second.read_bytes()
    pngs = sorted((tmp_path / "a" / "img").glob("*.png"))
    assert pngs and all(p.read_bytes() == (tmp_path / "b" / "img" / p.name).read_bytes() for p in pngs)
    text = first.read_text()
    label = Path(str(tiny_models["llama"])).name
    assert f"**{label}**" in text and "Fastest decode on" in text and "speed R1" in text
    assert "No run of the README's command" in text and "No speculative_demo.py results found." in text


def test_report_without_results_says_what_to_do(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        models.run_cli(benchmark.main, ["--report", "--output-dir", str(tmp_path),
                                        "--report-output", str(tmp_path / "P.md")])
    assert exit_info.value.code == 2
    assert "run benchmark.py first" in capsys.readouterr().err
    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(models.UserError, match="cannot read it as a results file"):
        benchmark.main(["--report", str(tmp_path / "x.json"), "--report-output", str(tmp_path / "P.md")])


# ---------------------------------------------------------------------------------------------
# Measured vs published
# ---------------------------------------------------------------------------------------------

def mmlu_row(accuracy: float, low: float, high: float, subjects: int = 57, source: str = "hub") -> comparison.ModelRow:
    spec = models.REGISTRY["qwen2.5-1.5b"]
    entry = ModelResult(name=spec.key, model=spec.key, source=source, dtype="fp32", params=spec.params)
    value = MMLUResult(shots=5, subjects={s: Accuracy.of(1, 2) for s in ALL_SUBJECTS[:subjects]},
                       micro=Accuracy(round(1000 * accuracy), 1000, accuracy, [low, high]), macro={},
                       questions=[], seconds=1.0)
    run = comparison.ReportRun("R1", Path("r.json"), {}, "benchmark")
    return comparison.ModelRow(spec.key, spec, "cpu", "transformers", "fp32", entry, run,
                               mmlu={"5": comparison.Measured(value, entry, run)})


def score(value: float, scoring: str = "loglik", checkpoint: str = "Qwen/Qwen2.5-1.5B-Instruct", shots: int = 5):
    return models.PublishedScore("mmlu", value, shots, scoring, "test", checkpoint, "https://example.org")


def test_gap_inside_ci_agrees_and_outside_is_flagged():
    row = mmlu_row(0.50, 0.47, 0.53)
    assert comparison.compare_published(score(52.9), row)["verdict"] == "agrees"
    flagged = comparison.compare_published(score(53.2), row)
    assert flagged["verdict"] == "⚠ differs" and flagged["allowed"] == pytest.approx(3.0)
    assert comparison.compare_published(score(46.9), row)["verdict"] == "⚠ differs"


def test_known_method_differences_widen_the_allowed_gap():
    row = mmlu_row(0.50, 0.47, 0.53, subjects=10)
    base = comparison.compare_published(score(62.0, checkpoint="Qwen/Qwen2.5-1.5B", shots=0), row)
    assert base["reasons"] == ["checkpoint", "shots", "subset"]
    assert base["allowed"] == pytest.approx(3.0 + 5 + 3 + 5) and base["verdict"] == "agrees"
    assert comparison.compare_published(score(66.5, checkpoint="Qwen/Qwen2.5-1.5B", shots=0), row)["verdict"] \
        == "⚠ differs"
    unstated = comparison.compare_published(score(54.0, scoring="unstated"), mmlu_row(0.50, 0.47, 0.53))
    assert unstated["reasons"] == ["method"] and unstated["verdict"] == "agrees"


def test_other_tasks_are_shown_but_not_judged():
    row = mmlu_row(0.30, 0.27, 0.33)
    result = comparison.compare_published(score(80.0, scoring="cloze"), row)
    assert result["verdict"].startswith("not comparable") and result["diff"] == pytest.approx(-50.0)
    nothing = comparison.ModelRow("qwen2.5-1.5b", models.REGISTRY["qwen2.5-1.5b"], "cpu", "transformers", "fp32",
                                  ModelResult(name="qwen2.5-1.5b", model="qwen2.5-1.5b"),
                                  comparison.ReportRun("R1", Path("r.json"), {}, "benchmark"))
    assert comparison.compare_published(score(60.0), nothing)["verdict"] == "not measured here"


def test_gguf_quantisation_is_a_known_difference():
    row = mmlu_row(0.50, 0.47, 0.53, source="gguf")
    row.entry.gguf_file = "Qwen2.5-1.5B-Instruct.Q4_1.gguf"
    assert comparison.compare_published(score(54.0), row)["reasons"] == ["quantized"]
    row.entry.gguf_file = "Qwen2.5-1.5B-Instruct.F16.gguf"
    assert comparison.compare_published(score(54.0), row)["reasons"] == []
    bitsandbytes = mmlu_row(0.50, 0.47, 0.53)
    bitsandbytes.entry.quantize = "int4"
    assert comparison.compare_published(score(54.0), bitsandbytes)["reasons"] == ["quantized"]


# ---------------------------------------------------------------------------------------------
# One GGUF on two engines: a row each, side by side, and what the other engine costs
# ---------------------------------------------------------------------------------------------

GEOGRAPHY = [  # question, four choices, answer letter: the columns of the original MMLU CSV files
    ("Which is the largest ocean on Earth?", "Atlantic", "Indian", "Pacific", "Arctic", "C"),
    ("What is the capital of France?", "Berlin", "Madrid", "Paris", "Rome", "C"),
    ("On which continent is Egypt?", "Asia", "Africa", "Europe", "South America", "B"),
    ("Which river flows through London?", "Seine", "Thames", "Danube", "Rhine", "B"),
    ("Mount Everest is in which mountain range?", "Andes", "Alps", "Rockies", "Himalayas", "D"),
    ("Which is the largest hot desert?", "Gobi", "Sahara", "Kalahari", "Atacama", "B"),
    ("What is the capital of Japan?", "Seoul", "Beijing", "Tokyo", "Bangkok", "C"),
    ("Which line divides the Earth into northern and southern hemispheres?", "the prime meridian",
     "the equator", "the tropic of Cancer", "the international date line", "B"),
    ("Which of these countries is an island?", "Switzerland", "Iceland", "Austria", "Hungary", "B"),
    ("Canberra is the capital of which country?", "New Zealand", "Canada", "Australia", "South Africa", "C"),
    ("The Andes mountains are on which continent?", "Africa", "Europe", "Asia", "South America", "D"),
    ("Which is the longest river in South America?", "Amazon", "Orinoco", "Parana", "Magdalena", "A"),
]


def write_mmlu_csv(root: Path, subject: str = "high_school_geography") -> Path:
    """The original MMLU layout (test/<subject>_test.csv, no header) with GEOGRAPHY as the test split."""
    import csv
    (root / "test").mkdir(parents=True)
    with open(root / "test" / f"{subject}_test.csv", "w", newline="", encoding="utf-8") as fh:
        csv.writer(fh).writerows(GEOGRAPHY)
    return root


def mcnemar_p(b: int, c: int) -> float:
    """Exact two-sided McNemar: twice the smaller binomial tail of b successes in b + c at p = 1/2."""
    if b + c == 0:
        return 1.0
    return min(1.0, 2 * sum(math.comb(b + c, i) for i in range(min(b, c) + 1)) / 2 ** (b + c))


def test_one_gguf_on_two_engines_shows_both_rows_and_the_paired_comparison(tmp_path, smollm2_gguf):
    out = tmp_path / "results"
    assert benchmark.main(["--models", str(smollm2_gguf), "--engine", "llama.cpp", "transformers", "--threads", "1",
                           "--output-dir", str(out), "--repetitions", "2", "--prompt-tokens", "16",
                           "--new-tokens", "4", "--category-max-new-tokens", "4", "--category-repetitions", "1",
                           "--mmlu-data", str(write_mmlu_csv(tmp_path / "mmlu")), "--mmlu-subjects",
                           "high_school_geography", "--mmlu-shots", "0", "--skip-humaneval"]) == 0
    [results] = out.glob("benchmark-*.json")
    run = BenchmarkRun.from_dict(json.loads(results.read_text()))
    by_engine = {e.engine: e for e in run.models.values()}
    assert set(by_engine) == {"llama.cpp", "transformers"}
    assert all(e.ok and not e.phase_errors for e in by_engine.values())
    text = report(out, tmp_path / "docs" / "COMPARISON.md").read_text()

    # the summary: one row per engine, next to each other, each naming its engine and weights
    header, rows = section_table(text, "Quick summary")
    smol = [i for i, row in enumerate(rows) if row[0] == "**smollm2-135m**"]
    assert len(smol) == 2 and smol[1] == smol[0] + 1
    formats = [rows[i][header.index("Engine · weights")] for i in smol]
    assert formats[0] == "llama.cpp · GGUF Q4_1"
    assert formats[1] == f"transformers · {by_engine['transformers'].weights}" and "de-quantized" in formats[1]
    for i, engine in zip(smol, ("llama.cpp", "transformers")):
        e = by_engine[engine]
        assert rows[i][header.index("Decode tok/s")] == e.speed.decode.fmt()
        assert rows[i][header.index("MMLU measured")].startswith(f"{100 * e.mmlu['0'].micro.accuracy:.1f}% [")
    assert "smollm2-135m · llama.cpp · GGUF Q4_1" in text  # charts and sections name the format too

    # what the other engine costs: question by question against the transformers row
    heading = "What each quant costs: smollm2-135m, MMLU 0-shot"
    assert f"### {heading}\n" in text
    header, rows = section_table(text, "What each quant costs")
    assert header[-4:] == ["Agreement with reference", "Δ accuracy [95% CI]", "McNemar p", "Runs"]
    table = {row[0].split(" · ")[0]: row for row in rows}
    assert table["transformers"][header.index("Agreement with reference")] == "reference"
    ref = {(q.subject, q.index): q.correct for q in by_engine["transformers"].mmlu["0"].questions}
    other = {(q.subject, q.index): q.correct for q in by_engine["llama.cpp"].mmlu["0"].questions}
    assert set(ref) == set(other) and len(ref) == len(GEOGRAPHY)
    b = sum(ref[k] and not other[k] for k in ref)  # only the reference right
    c = sum(other[k] and not ref[k] for k in ref)  # only llama.cpp right
    n = len(ref)
    row = table["llama.cpp"]
    assert row[header.index("Agreement with reference")] == f"{100 * (n - b - c) / n:.1f}% ({n - b - c}/{n})"
    assert row[header.index("Δ accuracy [95% CI]")].startswith(f"{100 * (c - b) / n:+.1f} [")
    assert row[header.index("McNemar p")] == f"{mcnemar_p(b, c):.3f}"
    assert row[header.index("Decode tok/s")] == by_engine["llama.cpp"].speed.decode.fmt()


def test_reference_row_is_full_precision_else_the_de_quantized_gguf():
    spec = models.REGISTRY["smollm2-135m"]
    run = comparison.ReportRun("R1", Path("r.json"), {}, "benchmark")
    mmlu = {"0": comparison.Measured(None, None, run)}

    def row(engine, weights, **entry):
        result = ModelResult(name=spec.key, model=spec.key, engine=engine, weights=weights, **entry)
        return comparison.ModelRow(spec.key, spec, "cpu", engine, weights, result, run, mmlu=dict(mmlu))
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    llama_cpp = row("llama.cpp", "GGUF Q4_1", source="gguf", gguf_file=gguf, dtype="Q4_1")
    de_quantized = row("transformers", "GGUF Q4_1 de-quantized to fp32", source="gguf", gguf_file=gguf, dtype="fp32")
    int4 = row("transformers", "int4 NF4 (bitsandbytes)", source="hub", quantize="int4", dtype="bf16")
    dense = row("transformers", "bf16", source="hub", dtype="bf16")
    assert comparison.reference_row([llama_cpp, de_quantized, int4, dense]) is dense
    assert comparison.reference_row([llama_cpp, de_quantized]) is de_quantized
    unscored = row("transformers", "fp32", source="hub", dtype="fp32")
    unscored.mmlu = {}
    assert comparison.reference_row([llama_cpp, unscored]) is llama_cpp


def test_runs_on_fewer_threads_than_cores_are_their_own_hardware_rows():
    run = comparison.ReportRun("R1", Path("r.json"), {"environment": {"cpu": {"cores_logical": 8}}}, "benchmark")
    entry = lambda **kw: ModelResult(name="m", model="m", device="cpu", device_name="Xeon", **kw)  # noqa: E731
    assert comparison.hardware_label(entry(threads=2), run) == "Xeon (cpu, 2 threads)"
    assert comparison.hardware_label(entry(threads=1), run) == "Xeon (cpu, 1 thread)"
    assert comparison.hardware_label(entry(threads=8), run) == "Xeon (cpu)"  # every core: the machine itself
    assert comparison.hardware_label(entry(), run) == "Xeon (cpu)"  # files from before threads were recorded
    gpu = ModelResult(name="m", model="m", device="cuda", device_name="H200", threads=1)
    assert comparison.hardware_label(gpu, run) == "H200 (cuda)"
