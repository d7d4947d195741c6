"""The energy meter in the scripts: speculative decoding's methods get joules per token beside their
speedup, from a fake RAPL counter; without a counter the report says why, once.
(benchmark.py's hooks are tested in tests/test_benchmark.py; demo_chat's footer in tests/test_demo_chat.py.)"""

from __future__ import annotations

import json

import pytest

import energy
import speculative_demo as sd

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def short_idle(monkeypatch):
    monkeypatch.setattr(sd, "DEFAULT_IDLE_SECONDS", 0.2)


def run_speculative(tiny_models, out):
    target = str(tiny_models["llama"])
    assert sd.main(["--target", target, "--draft", "self:1", "--prompt", "hello world", "--methods",
                    "ours,lookup", "--max-new-tokens", "8", "--repetitions", "2", "--warmup", "0",
                    "--output-dir", str(out)]) == 0
    return json.loads(next(out.glob("speculative_demo-*.json")).read_text())


def test_speculative_methods_get_joules_per_token_beside_their_speedup(tiny_models, tmp_path, fake_rapl):
    data = run_speculative(tiny_models, tmp_path)
    assert data["environment"]["energy"]["available"]
    methods = data["prompts"]["custom"]["methods"]
    for name, m in methods.items():
        joules = m["energy"]
        assert joules["total_j"] == pytest.approx(20.0 * joules["seconds"], rel=0.05), name
        assert joules["per_unit"]["units"] == 2 * m["n_tokens"]
    for name in ("ours", "lookup"):
        m = methods[name]
        base = methods["target alone (HF generate)"]["energy"]["per_unit"]["j_per_unit"]
        assert m["energy_vs_hf"] == pytest.approx(m["energy"]["per_unit"]["j_per_unit"] / base)
    md = next(tmp_path.glob("speculative_demo-*.md")).read_text()
    assert "J/tok" in md and "Energy: RAPL" in md


def test_speculative_without_a_counter_says_why(tiny_models, tmp_path):
    if energy.EnergyMeter.detect("cpu").available:
        pytest.skip("this machine has a readable energy counter")
    data = run_speculative(tiny_models, tmp_path)
    assert data["environment"]["energy"]["reason"].startswith("not measured — ")
    assert all(m["energy"] is None for m in data["prompts"]["custom"]["methods"].values())
    assert "Energy: not measured — " in next(tmp_path.glob("speculative_demo-*.md")).read_text()


def test_comparison_page_shows_ai_per_watt_from_a_measured_run(tiny_models, tmp_path, fake_rapl, monkeypatch):
    import benchmark
    monkeypatch.setattr(benchmark, "DEFAULT_IDLE_SECONDS", 0.2)
    out = tmp_path / "results"
    assert benchmark.main(["--models", str(tiny_models["llama"]), "--device", "cpu", "--output-dir", str(out),
                           "--repetitions", "2", "--prompt-tokens", "16", "--new-tokens", "4",
                           "--category-max-new-tokens", "4", "--category-repetitions", "1",
                           "--skip-mmlu", "--skip-humaneval"]) == 0
    page = tmp_path / "docs" / "COMPARISON.md"
    assert benchmark.main(["--report", "--output-dir", str(out), "--report-output", str(page)]) == 0
    text = page.read_text()
    run = json.loads(next(out.glob("benchmark-*.json")).read_text())
    [entry] = run["models"].values()
    tok_j = entry["speed"]["decode"]["energy"]["per_unit"]["units_per_j"]
    assert f"{tok_j:.2f} tok/J" in text and "AI per watt: decode tokens per joule" in text
    assert (page.parent / "img" / "comparison-ai-per-watt.png").read_bytes()[:4] == b"\x89PNG"


def test_chat_footer_shows_joules_per_token_and_the_transcript_keeps_them(tiny_models, tmp_path, fake_rapl,
                                                                         capsys):
    import demo_chat
    assert demo_chat.main(["--model", str(tiny_models["llama"]), "--prompt", "hello", "--prompt", "and the river",
                           "--max-new-tokens", "6", "--temperature", "0", "--output-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    data = json.loads(next(tmp_path.glob("demo_chat-*.json")).read_text())
    assert data["environment"]["energy"]["available"]
    for rnd in data["rounds"]:
        reply = rnd["replies"][0]
        joules = reply["stats"]["energy"]
        assert joules["total_j"] == pytest.approx(20.0 * joules["seconds"], rel=0.05)
        assert joules["per_unit"]["units"] == reply["stats"]["generation_tokens"]
        assert f" · {joules['per_unit']['j_per_unit']:.3g} J/tok" in reply["footer"] and reply["footer"] in out
    assert data["totals"][0]["j_per_token"] is not None
    assert "energy: RAPL" in out


def test_chat_without_a_counter_says_why_once_and_no_footer_figure(tiny_models, tmp_path, capsys):
    import demo_chat
    if energy.EnergyMeter.detect("cpu").available:
        pytest.skip("this machine has a readable energy counter")
    assert demo_chat.main(["--model", str(tiny_models["llama"]), "--prompt", "hello", "--max-new-tokens", "4",
                           "--output-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.count("energy: not measured — ") == 1 and "J/tok" not in out.split("energy: not measured")[1]
    assert "Energy: not measured — " in next(tmp_path.glob("demo_chat-*.md")).read_text()


def test_finetune_reports_joules_per_1k_trained_tokens(tiny_models, tmp_path, fake_rapl, monkeypatch):
    import finetune_demo
    monkeypatch.setattr(finetune_demo, "DEFAULT_IDLE_SECONDS", 0.2)
    assert finetune_demo.main(["--model", str(tiny_models["llama"]), "--max-steps", "2", "--watch-every", "0",
                               "--eval-limit", "2", "--max-new-tokens", "4", "--output-dir", str(tmp_path),
                               "--device", "cpu", "--dtype", "fp32"]) == 0
    [result] = tmp_path.glob("finetune-*/finetune_demo.json")
    data = json.loads(result.read_text())
    joules, tokens = data["training"]["energy"], data["training"]["tokens"]
    assert data["environment"]["energy"]["available"]
    assert joules["total_j"] == pytest.approx(20.0 * joules["seconds"], rel=0.05)
    assert joules["per_unit"]["unit"] == "1k trained tokens" and joules["per_unit"]["units"] == pytest.approx(tokens / 1000)
    assert "J per 1k trained tokens" in result.with_suffix(".md").read_text()
