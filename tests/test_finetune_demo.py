"""finetune_demo.py on tiny random-weight models, and on the real SmolLM2 GGUF (skipped without ../shared).

Training runs use one CPU thread: on a shared 2-core machine, two OpenMP threads contending with
other processes make tiny matrix products many times slower, not faster.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import finetune_demo
import models

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def builtin_examples():
    examples, _ = finetune_demo.load_examples(finetune_demo.DEFAULT_DATASET)
    return examples


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory, builtin_examples) -> Path:
    """6 training + 2 held-out examples copied from the built-in dataset, as instruction/output rows."""
    path = tmp_path_factory.mktemp("data") / "small.jsonl"
    rows = [{"instruction": e.prompt[-1]["content"], "output": e.completion, "split": "test" if i >= 6 else "train"}
            for i, e in enumerate(builtin_examples[:8])]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def parse(*argv: str):
    parser = finetune_demo.build_parser()
    args = parser.parse_args(list(argv))
    finetune_demo.validate_args(parser, args)
    return args


LORA_8_16 = ("--lora-r", "8", "--lora-alpha", "16")


def make_args(model_dir, dataset, out_dir, *extra: str):
    args = parse("--model", str(model_dir), "--dataset", str(dataset), "--output-dir", str(out_dir),
                 "--device", "cpu", "--dtype", "fp32", *extra)
    return args


def trainer_for(args, loaded, examples, tmp_path):
    finetune_demo.apply_defaults(args, finetune_demo.defaults_for_loaded(loaded, args.model))
    train = finetune_demo.build_dataset(loaded.tokenizer, examples, args.max_length)
    return finetune_demo.make_trainer(args, loaded, train, train, tmp_path / "trainer")


# ------------------------------------------------------------------------------------------------
# Arguments and data
# ------------------------------------------------------------------------------------------------

def defaults_of(key):
    return finetune_demo.defaults_for_spec(models.REGISTRY[key])


def test_hyper_parameters_are_left_to_the_model_unless_given():
    args = parse()
    assert all(getattr(args, name) is None for name in finetune_demo.DEFAULTED_ARGS)
    assert args.lora_dropout == 0.05 and args.gradient_checkpointing == "auto"
    assert args.batching == "padding-free" and args.lora_targets is None and args.model is None
    args = parse("--learning-rate", "2e-4", "--epochs", "3")
    taken = finetune_demo.apply_defaults(args, defaults_of("smollm2-135m"))
    assert (args.learning_rate, args.epochs) == (2e-4, 3.0)  # the user's flags win
    assert (args.lora_r, args.lora_alpha, args.batch_size, args.grad_accum) == (8, 16, 4, 1)
    assert "learning_rate" not in taken and "epochs" not in taken and "lora_r" in taken
    assert args.gradient_checkpointing == "off"


def test_defaults_per_model_size_and_tuning():
    small, one_b, base = defaults_of("smollm2-135m"), defaults_of("qwen2.5-1.5b"), defaults_of("pythia-1b")
    assert (small.learning_rate, small.batch_size * small.grad_accum, small.gradient_checkpointing) == (1e-3, 4, False)
    assert one_b.learning_rate < small.learning_rate and one_b.gradient_checkpointing
    assert base.epochs > one_b.epochs and not base.instruct and base.lora_targets == ["query_key_value"]
    assert all(d.reason and "lr" in d.reason for d in (small, one_b, base))


def test_defaults_of_an_unregistered_model_come_from_its_size_and_template(tiny_models):
    for family, instruct in (("llama", True), ("gpt_neox", False)):
        loaded = models.load(str(tiny_models[family]), device="cpu", dtype="fp32")
        chosen = finetune_demo.defaults_for_loaded(loaded, str(tiny_models[family]))
        assert chosen.instruct is instruct and chosen.params == models.count_parameters(loaded.model)
        assert chosen.learning_rate == 1e-3 and not chosen.gradient_checkpointing


def test_show_defaults_prints_each_default_model_without_loading(monkeypatch, capsys):
    def refuse(*_a, **_k):
        raise AssertionError("--show-defaults loaded a model")
    monkeypatch.setattr(models, "load", refuse)
    monkeypatch.setattr(models, "load_model", refuse)
    assert finetune_demo.main(["--show-defaults"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[0] for line in lines] == [*models.DEFAULT_MODELS, "smollm2-135m"]
    pythia = next(line for line in lines if line.startswith("pythia-1b"))
    assert "lr 5e-4" in pythia and "epochs 2" in pythia and "query_key_value" in pythia and "base model" in pythia
    assert all(" | lr " in line for line in lines)  # every line carries its reason


@pytest.mark.parametrize("argv", [["--lora-r", "0"], ["--eval-fraction", "1.5"], ["--epochs", "-1"],
                                  ["--batching", "none"], ["--adapter", "x", "--merge"], ["--until-format", "1.5"],
                                  ["--watch-every", "0", "--until-format", "0.9"], ["--watch-every", "-1"],
                                  ["--check", "exact-match", "--until-format", "0.9"]])
def test_bad_arguments_are_refused(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        parse(*argv)
    assert exc.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_builtin_dataset_has_a_held_out_split_and_every_answer_in_the_taught_format(builtin_examples):
    train, held_out = finetune_demo.split_examples(builtin_examples, 0.15, 0)
    assert 150 <= len(builtin_examples) <= 300
    assert 0.10 <= len(held_out) / len(builtin_examples) <= 0.20
    assert all(finetune_demo.check_json_answer(e.completion) for e in builtin_examples)
    assert not {e.prompt[-1]["content"] for e in train} & {e.prompt[-1]["content"] for e in held_out}
    assert not any("json" in e.prompt[-1]["content"].lower() for e in builtin_examples)  # never asked for


def test_builtin_dataset_file_matches_its_generator():
    proc = subprocess.run([sys.executable, str(ROOT / "data" / "build_finetune_data.py"), "--check"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("text, ok", [
    ('{"answer": "Paris", "confidence": 0.9}', True),
    ('  {"answer": "4", "confidence": 1}\n', True),
    ('{"answer": "Paris"}', False),
    ('{"answer": "Paris", "confidence": 1.5}', False),
    ('{"answer": "", "confidence": 0.5}', False),
    ('{"answer": "Paris", "confidence": true}', False),
    ('{"answer": "Paris",\n "confidence": 0.9}', False),
    ('The capital of France is Paris.', False),
    ('{"answer": "Paris", "confidence": 0.9} Hope this helps!', False),
])
def test_json_answer_check(text, ok):
    assert finetune_demo.check_json_answer(text) is ok


def test_scores_count_format_and_correct_answers():
    ref = '{"answer": "Paris", "confidence": 0.9}'
    score = finetune_demo.score_answers(['{"answer": "paris.", "confidence": 0.5}', '{"answer": "Rome", "confidence": 0.5}',
                                         "Paris"], [ref] * 3, "json-answer")
    assert (score["format_valid"], score["correct"]) == (2, 1)
    low, high = score["format_valid_ci95"]
    assert low < 66.7 < high


def test_records_in_chat_and_instruction_shapes(tmp_path):
    path = tmp_path / "mixed.json"
    path.write_text(json.dumps([
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"},
                      {"role": "assistant", "content": "Hello."}]},
        {"instruction": "Sum these.", "input": "2 and 3", "output": "5"},
    ]))
    examples, source = finetune_demo.load_examples(str(path))
    assert examples[0].prompt == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}]
    assert examples[0].completion == "Hello."
    assert examples[1].prompt == [{"role": "user", "content": "Sum these.\n\n2 and 3"}]
    assert source["sha256"] == models.file_sha256(path)


@pytest.mark.parametrize("content, where", [
    ('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": \n', "line 2"),
    ('{"instruction": "a", "output": "b"}\n{"instruction": "c"}\n', "row 2"),
    ('{"messages": [{"role": "user", "content": "x"}]}\n', "row 1"),
    ('[1, 2]\n', "row 1"),
])
def test_malformed_dataset_gives_one_line_error_and_exit_2(tmp_path, capsys, content, where):
    path = tmp_path / ("bad.json" if content.startswith("[") else "bad.jsonl")
    path.write_text(content)
    with pytest.raises(SystemExit) as exc:
        models.run_cli(finetune_demo.main, ["--dataset", str(path), "--output-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert exc.value.code == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and where in err and str(path) in err
    assert not (tmp_path / "out").exists()


def test_malformed_dataset_from_the_command_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text("{not json}\n")
    proc = subprocess.run([sys.executable, str(ROOT / "finetune_demo.py"), "--dataset", str(path)],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert "line 1: not valid JSON" in proc.stderr


def test_missing_dataset_file_is_a_user_error(tmp_path):
    with pytest.raises(models.UserError, match="not found"):
        finetune_demo.load_examples(str(tmp_path / "nope.jsonl"))


# ------------------------------------------------------------------------------------------------
# Tokenization: prompt tokens are masked out of the loss
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
def test_prompt_tokens_are_masked_out_of_the_loss(tiny_models, builtin_examples, tmp_path, family):
    """TRL's labels are -100 on every prompt token and equal the ids on the answer + end-of-turn."""
    loaded = models.load(str(tiny_models[family]), device="cpu", dtype="fp32")
    tok = loaded.tokenizer
    args = make_args(tiny_models[family], finetune_demo.DEFAULT_DATASET, tmp_path)
    examples = builtin_examples[:4]
    trainer = trainer_for(args, loaded, examples, tmp_path)
    for example, row in zip(examples, trainer.train_dataset):
        ids, labels = row["input_ids"], row["labels"]
        prompt_ids = tok(finetune_demo.prompt_text(tok, example.prompt), add_special_tokens=False)["input_ids"]
        first = next(i for i, lab in enumerate(labels) if lab != -100)
        assert all(lab == -100 for lab in labels[:first])
        assert labels[first:] == ids[first:]
        assert first >= len(prompt_ids) - 1  # at most the boundary token merges into the answer
        assert ids[:first] == prompt_ids[:first]
        answer = tok.decode(ids[first:], skip_special_tokens=True)
        assert example.completion in answer
        assert tok.eos_token_id in ids[first:]  # the model is taught to stop
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    assert "attention_mask" not in batch and batch["input_ids"].shape[0] == 1  # padding-free: one flat row
    assert (batch["input_ids"] == tok.pad_token_id).sum() <= (batch["labels"] != -100).sum()


def test_truncation_keeps_the_start(tiny_models, builtin_examples):
    tok = models.load_tokenizer(models.resolve(str(tiny_models["llama"])))
    row = finetune_demo.tokenize_example(tok, builtin_examples[0], max_length=10)
    assert len(row["input_ids"]) == len(row["completion_mask"]) == 10


# ------------------------------------------------------------------------------------------------
# LoRA targets per family
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family, expected", [("llama", {"q_proj", "v_proj"}), ("qwen2", {"q_proj", "v_proj"}),
                                              ("stablelm", {"q_proj", "v_proj"}), ("gemma3", {"q_proj", "v_proj"}),
                                              ("gpt_neox", {"query_key_value"})])
def test_lora_targets_per_family(tiny_models, family, expected):
    from peft import get_peft_model
    loaded = models.load(str(tiny_models[family]), device="cpu", dtype="fp32")
    targets = finetune_demo.resolve_lora_targets(None, loaded)
    assert set(targets) == expected
    model = get_peft_model(loaded.model, finetune_demo.lora_config(parse(*LORA_8_16), targets))
    wrapped = {name.split(".lora_A")[0].rsplit(".", 1)[-1] for name, _ in model.named_parameters() if "lora_A" in name}
    assert wrapped == expected


def test_lora_targets_from_the_registry_and_overrides(tiny_models):
    loaded = models.load(str(tiny_models["gpt_neox"]), device="cpu", dtype="fp32")
    as_pythia = models.Loaded(loaded.model, loaded.tokenizer, models.resolve("pythia-70m"), loaded.device,
                              loaded.dtype, "none", 0.0)
    assert finetune_demo.resolve_lora_targets(None, as_pythia) == ["query_key_value"]
    assert finetune_demo.resolve_lora_targets("all-linear", loaded) == "all-linear"
    assert finetune_demo.resolve_lora_targets("dense, query_key_value", loaded) == ["dense", "query_key_value"]
    with pytest.raises(models.UserError, match="no modules named q_proj"):
        finetune_demo.resolve_lora_targets("q_proj", loaded)


def test_all_linear_wraps_every_projection(tiny_models):
    from peft import get_peft_model
    loaded = models.load(str(tiny_models["llama"]), device="cpu", dtype="fp32")
    model = get_peft_model(loaded.model, finetune_demo.lora_config(parse(*LORA_8_16), "all-linear"))
    wrapped = {name.split(".lora_A")[0].rsplit(".", 1)[-1] for name, _ in model.named_parameters() if "lora_A" in name}
    assert wrapped == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


# ------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------

def test_overfitting_a_handful_lowers_loss_and_changes_only_lora_weights(tiny_models, builtin_examples, tmp_path):
    loaded = models.load(str(tiny_models["llama"]), device="cpu", dtype="fp32")
    base = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    args = make_args(tiny_models["llama"], finetune_demo.DEFAULT_DATASET, tmp_path, "--epochs", "25",
                     "--grad-accum", "1", "--learning-rate", "1e-2", "--lora-targets", "all-linear")
    trainer = trainer_for(args, loaded, builtin_examples[:4], tmp_path)
    before = finetune_demo.evaluate_held_out(trainer, trainer.train_dataset)
    result = finetune_demo.train(trainer, loaded.device)
    after = finetune_demo.evaluate_held_out(trainer, trainer.train_dataset)
    losses = [p["loss"] for p in result["loss_curve"]]
    # A random 2-layer model starts near ln(vocab) = 6.2 nats; 25 steps of LoRA take off more than 0.5.
    assert len(losses) == 25 and losses[-1] < losses[0] - 0.5
    assert after["loss"] < before["loss"] - 0.5
    assert result["tokens_per_second"] > 0 and result["memory"]["peak_rss_mb"] > 0
    changed_lora, state = 0, trainer.model.state_dict()
    for name, value in state.items():
        if "lora_" in name:
            changed_lora += "lora_B" in name and bool(value.abs().sum() > 0)  # B starts at zero
            continue
        key = name.replace("base_model.model.", "").replace(".base_layer", "")
        assert torch.equal(value, base[key]), f"base weight {key} changed"
    assert changed_lora == 7 * 2  # every projection of both layers
    assert {n for n, p in trainer.model.named_parameters() if p.requires_grad} == \
        {n for n in state if "lora_" in n}


def test_padding_free_batches_give_the_same_losses_as_padded_ones(tiny_models, builtin_examples, tmp_path):
    """Same batches, same order: only the layout differs, so the loss curve must not move."""
    curves, tokens = {}, {}
    for batching in ("padding-free", "padded"):
        loaded = models.load(str(tiny_models["llama"]), device="cpu", dtype="fp32")
        args = make_args(tiny_models["llama"], finetune_demo.DEFAULT_DATASET, tmp_path, "--max-steps", "3",
                         "--grad-accum", "2", "--batching", batching, "--learning-rate", "5e-3")
        result = finetune_demo.train(trainer_for(args, loaded, builtin_examples[:40], tmp_path), loaded.device)
        curves[batching] = [p["loss"] for p in result["loss_curve"]]
        tokens[batching] = result["tokens"]
    assert curves["padding-free"] == pytest.approx(curves["padded"], abs=2e-3)
    assert tokens["padding-free"] == tokens["padded"]  # both count real tokens only


# ------------------------------------------------------------------------------------------------
# End to end: before/after, saved adapter, reload reproduces the answers, merge
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained_run(tiny_models, small_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    torch.set_num_threads(1)
    argv = ["--model", str(tiny_models["llama"]), "--dataset", str(small_dataset), "--output-dir", str(out),
            "--device", "cpu", "--dtype", "fp32", "--epochs", "12", "--grad-accum", "1",
            "--learning-rate", "5e-3", "--max-new-tokens", "12", "--merge", "--seed", "3", "--check", "json-answer"]
    assert finetune_demo.main(argv) == 0
    (run_dir,) = out.glob("finetune-*")
    return run_dir, json.loads((run_dir / "finetune_demo.json").read_text())


def test_run_writes_before_after_scores_curve_and_metrics(trained_run):
    run_dir, result = trained_run
    assert len(result["answers"]) == 2 and all("before" in a and "after" in a for a in result["answers"])
    for stage in ("before", "after"):
        assert {"format_valid_pct", "correct_pct", "loss", "token_accuracy"} <= set(result[stage])
    training = result["training"]
    assert len(training["loss_curve"]) == training["steps"] == 24
    assert training["loss_curve"][-1]["loss"] < training["loss_curve"][0]["loss"]
    assert result["lora"]["trainable"] > 0 and 0 < result["lora"]["trainable_pct"] < 100
    md = (run_dir / "finetune_demo.md").read_text()
    assert "Training loss per step" in md and "Held-out answers" in md and "before" in md
    assert "while training" in md and "optimizer state dtype" in md


def test_the_watch_answers_a_fixed_subset_every_n_steps_and_its_time_is_kept_apart(trained_run):
    run_dir, result = trained_run
    training, watch = result["training"], result["training"]["format_watch"]
    curve = watch["curve"]
    # step 0 = the "before" answers, a point every 5 optimizer steps, then the final weights (step 24)
    assert [p["step"] for p in curve] == [0, 5, 10, 15, 20, 24]
    assert [p["source"] for p in curve] == ["before"] + ["watch"] * 4 + ["after"]
    assert watch["held_out_indices"] == [0, 1] and all(p["n"] == 2 for p in curve)
    before = sum(finetune_demo.check_json_answer(a["before"]) for a in result["answers"])
    assert curve[0]["format_valid"] == before
    assert watch["answering_seconds"] > 0
    assert watch["answering_seconds"] == pytest.approx(sum(p["seconds"] for p in curve), abs=0.05)
    assert training["watch_seconds"] == watch["answering_seconds"]
    # tokens/s over the training time without the watch; the seconds are stored rounded to 0.01 s, which on
    # a sub-second tiny run is itself a percent or more, so the check allows exactly that rounding
    seconds = training["training_seconds"]
    assert seconds == pytest.approx(training["train_runtime_s"] - training["watch_seconds"], abs=0.011)
    assert training["tokens"] / (seconds + 0.005) - 0.05 <= training["tokens_per_second"] \
        <= training["tokens"] / (seconds - 0.005) + 0.05
    assert watch["stopped_at"] is None and watch["until_format"] is None
    elapsed = [p["elapsed_s"] for p in curve]
    assert elapsed == sorted(elapsed) and elapsed[0] == 0
    assert elapsed[-1] == pytest.approx(training["train_runtime_s"], abs=0.1)
    assert all(p["training_s"] <= p["elapsed_s"] for p in curve)


def test_watch_positions_spread_over_the_held_out_split():
    assert finetune_demo.watch_indices(31) == [0, 3, 7, 11, 15, 19, 23, 27]
    assert finetune_demo.watch_indices(5) == [0, 1, 2, 3, 4]


def test_adapter_is_saved_with_its_resolved_configuration(trained_run, small_dataset, tiny_models):
    run_dir, _ = trained_run
    config = json.loads((run_dir / "adapter" / finetune_demo.CONFIG_NAME).read_text())
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert config["dataset"]["sha256"] == models.file_sha256(small_dataset)
    assert config["base_model"]["path"] == str(Path(tiny_models["llama"]).resolve())
    assert config["arguments"]["lora_r"] == 8 and config["arguments"]["seed"] == 3
    assert config["lora_targets"] == ["q_proj", "v_proj"]


def test_reloading_the_adapter_reproduces_the_after_answers(trained_run, tmp_path):
    run_dir, result = trained_run
    assert finetune_demo.main(["--adapter", str(run_dir / "adapter"), "--output-dir", str(tmp_path),
                               "--device", "cpu", "--dtype", "fp32"]) == 0
    (reload_json,) = tmp_path.glob("finetune-reload-*/finetune_demo.json")
    reloaded = json.loads(reload_json.read_text())
    assert [a["after"] for a in reloaded["answers"]] == [a["after"] for a in result["answers"]]
    assert reloaded["reproduced"] == {"identical": 2, "n": 2, "all": True}


def test_merge_writes_a_plain_model_with_the_lora_folded_in(trained_run):
    from transformers import AutoModelForCausalLM
    run_dir, _ = trained_run
    merged = AutoModelForCausalLM.from_pretrained(run_dir / "merged")
    assert not any("lora" in name for name, _ in merged.named_parameters())


def test_reload_without_a_saved_adapter_is_a_user_error(tmp_path):
    with pytest.raises(models.UserError, match="holds no adapter"):
        finetune_demo.main(["--adapter", str(tmp_path)])


# ------------------------------------------------------------------------------------------------
# The real model: the taught behaviour is absent before training
# ------------------------------------------------------------------------------------------------

def test_smollm2_does_not_answer_in_json_before_training(smollm2_loaded, builtin_examples):
    _, held_out = finetune_demo.split_examples(builtin_examples, 0.15, 0)
    prompts = [e.prompt for e in held_out[:6]]
    answers = finetune_demo.generate_answers(smollm2_loaded.model, smollm2_loaded.tokenizer, prompts, 24)
    assert all(a.strip() for a in answers)  # it does answer, in prose
    assert sum(finetune_demo.check_json_answer(a) for a in answers) == 0


def test_default_training_teaches_smollm2_the_format(smollm2_gguf, tmp_path, recwarn):
    """The README's command on the real SmolLM2 GGUF with every training default untouched, cut short
    for CI in two ways: 16 held-out prompts instead of 31, and --until-format 0.9 stops training once
    the 8 watched prompts answer in the format. The held-out format score must rise by 50+ points."""
    argv = ["--model", str(smollm2_gguf), "--output-dir", str(tmp_path), "--dtype", "fp32",
            "--eval-limit", "16", "--until-format", "0.9"]
    assert finetune_demo.main(argv) == 0
    (result_path,) = tmp_path.glob("finetune-*/finetune_demo.json")
    result = json.loads(result_path.read_text())
    config, chosen = result["config"], defaults_of("smollm2-135m")
    assert set(finetune_demo.DEFAULTED_ARGS) <= set(config["defaults"]["taken"])  # nothing set by hand
    assert config["arguments"]["learning_rate"] == chosen.learning_rate
    before, after = result["before"], result["after"]
    assert before["n"] == after["n"] == 16
    assert after["format_valid_pct"] - before["format_valid_pct"] >= 50, (before, after)
    watch = result["training"]["format_watch"]
    assert watch["stopped_at"] == watch["first_step_at_target"] == result["training"]["steps"]
    assert result["training"]["steps"] < 43  # one epoch of 169 examples in batches of 4 is 43 steps
    assert not [str(w.message) for w in recwarn if "config file" in str(w.message)]  # no Hub lookup on save


def test_qlora_int4_trains_only_the_adapter_on_4bit_weights(tiny_models, builtin_examples, tmp_path):
    """bitsandbytes 0.50 runs 4-bit NF4 on CPU: the base linears are Linear4bit, LoRA B moves."""
    import bitsandbytes as bnb
    args = make_args(tiny_models["llama"], finetune_demo.DEFAULT_DATASET, tmp_path, "--quantize", "int4",
                     "--max-steps", "3", "--grad-accum", "1", "--learning-rate", "1e-2")
    loaded = finetune_demo.load_base_model(args, args.model)
    trainer = trainer_for(args, loaded, builtin_examples[:8], tmp_path)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in trainer.model.modules())
    result = finetune_demo.train(trainer, loaded.device)
    assert all(math.isfinite(p["loss"]) for p in result["loss_curve"]) and len(result["loss_curve"]) == 3
    moved = [n for n, p in trainer.model.named_parameters() if "lora_B" in n and p.abs().sum() > 0]
    assert moved


def test_lora_weights_and_optimizer_state_stay_fp32_whatever_the_base_dtype(tiny_models, builtin_examples, tmp_path,
                                                                           cpu_default_dtype):
    """A bf16 base (the CPU default with native bf16) trains fp32 LoRA weights with fp32 AdamW moments
    under bf16 autocast; the results say so, read from the parameters and the optimizer."""
    args = parse("--model", str(tiny_models["llama"]), "--output-dir", str(tmp_path), "--device", "cpu",
                 "--max-steps", "2", "--learning-rate", "1e-2")
    loaded = finetune_demo.load_base_model(args, args.model)
    trainer = trainer_for(args, loaded, builtin_examples[:8], tmp_path)
    precision = finetune_demo.precision(trainer)
    assert precision == {"base_dtype": cpu_default_dtype, "adapter_dtype": "fp32",
                         "autocast": "bf16" if cpu_default_dtype == "bf16" else "none"}
    result = finetune_demo.train(trainer, loaded.device)
    assert result["optimizer_state_dtype"] == "fp32"
    assert all(math.isfinite(p["loss"]) for p in result["loss_curve"])
    assert any(p.abs().sum() > 0 for n, p in trainer.model.named_parameters() if "lora_B" in n)


def test_merge_with_quantized_weights_is_refused(capsys):
    with pytest.raises(SystemExit):
        parse("--quantize", "int4", "--merge")
    assert "full-precision" in capsys.readouterr().err
