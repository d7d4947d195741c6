"""models.py and results_io.py: registry, resolution, device/dtype rules, loading, errors, results."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import models
import results_io

ROOT = Path(__file__).resolve().parents[1]


# --- registry -----------------------------------------------------------------------------------

def test_default_set_and_required_entries():
    assert models.DEFAULT_MODELS == ("tinyllama", "llama3.2-1b", "stablelm-1.6b", "pythia-1b", "qwen2.5-1.5b")
    for key in ("smollm2-1.7b", "gemma3-1b", "qwen3-1.7b", "smollm2-135m", "smollm2-360m", "pythia-70m",
                "pythia-160m", "qwen2.5-0.5b", "qwen2.5-7b", "llama3.2-3b", "llama3.1-8b", "llama2-7b-chat"):
        assert key in models.REGISTRY
    assert models.REGISTRY["llama3.2-1b"].gated and not models.REGISTRY["tinyllama"].gated
    assert not models.REGISTRY["pythia-1b"].instruct
    assert models.REGISTRY["pythia-1b"].lora_targets == ("query_key_value",)
    assert models.REGISTRY["qwen2.5-1.5b"].lora_targets == ("q_proj", "v_proj")


def test_draft_pairs_name_registry_targets():
    pairs = {(s.key, t) for s in models.REGISTRY.values() for t in s.draft_for}
    for pair in [("pythia-70m", "pythia-1b"), ("pythia-160m", "pythia-1b"), ("qwen2.5-0.5b", "qwen2.5-1.5b"),
                 ("qwen2.5-0.5b", "qwen2.5-7b"), ("llama3.2-1b", "llama3.2-3b"), ("llama3.2-1b", "llama3.1-8b"),
                 ("tinyllama", "llama2-7b-chat"), ("smollm2-135m", "smollm2-1.7b"), ("smollm2-360m", "smollm2-1.7b")]:
        assert pair in pairs
    for _, target in pairs:
        assert target in models.REGISTRY


@pytest.mark.parametrize("key", list(models.REGISTRY))
def test_twin_parameter_count_matches_published(key):
    spec = models.REGISTRY[key]
    twin = models.build_twin(spec, device="meta")  # no memory, no download
    counted = models.count_parameters(twin)
    assert abs(counted - spec.params) / spec.params < 0.02, (counted, spec.params)
    assert twin.config.vocab_size == spec.arch["vocab_size"]
    assert twin.config.num_hidden_layers == spec.arch["num_hidden_layers"]


def test_kv_cache_bytes_from_config():
    cfg = models.twin_config(models.REGISTRY["llama3.2-1b"])
    # 2 (K,V) x 16 layers x 8 kv heads x 64 head dim x 2 bytes
    assert models.kv_cache_bytes_per_token(cfg, torch.float16) == 2 * 16 * 8 * 64 * 2
    cfg = models.twin_config(models.REGISTRY["pythia-1b"])
    assert models.kv_cache_bytes_per_token(cfg, torch.float32) == 2 * 16 * 8 * 256 * 4


# --- resolution ---------------------------------------------------------------------------------

def test_resolve_keys_aliases_and_hub_ids():
    assert models.resolve("TinyLlama").spec.key == "tinyllama"
    assert models.resolve("llama-3.2-1b").path == "meta-llama/Llama-3.2-1B-Instruct"
    hub = models.resolve("Qwen/Qwen2.5-1.5B-Instruct")
    assert hub.source == "hub" and hub.spec.key == "qwen2.5-1.5b"
    other = models.resolve("someorg/some-model")
    assert other.source == "hub" and other.spec is None


def test_unknown_name_suggests_close_matches():
    with pytest.raises(models.UnknownModelError) as err:
        models.resolve("tinylama")
    assert "tinyllama" in str(err.value) and "download_models.py --list" in str(err.value)
    with pytest.raises(models.UnknownModelError, match="no such file"):
        models.resolve("./does/not/exist")


def test_resolve_local_dir_and_gguf(tmp_path, tiny_models):
    local = models.resolve(str(tiny_models["llama"]))
    assert local.source == "local" and local.path == str(tiny_models["llama"].resolve())
    gguf = tmp_path / "my-model.Q4_0.gguf"
    gguf.write_bytes(b"GGUF")
    res = models.resolve(str(gguf))
    assert (res.source, res.path, res.gguf_file, res.label) == ("gguf", str(tmp_path), gguf.name, "my-model.Q4_0")
    assert models.resolve(str(tmp_path)).gguf_file == gguf.name  # a directory holding one .gguf


# --- device and dtype ---------------------------------------------------------------------------

def test_cpu_dtype_rule(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(models, "cpu_has_native_bf16", lambda: False)
    assert models.pick_dtype(cpu) == torch.float32
    monkeypatch.setattr(models, "cpu_has_native_bf16", lambda: True)
    assert models.pick_dtype(cpu) == torch.bfloat16
    assert models.pick_dtype(cpu, "fp16") == torch.float16
    assert models.pick_dtype(torch.device("mps")) == torch.float16


def test_cuda_dtype_rule(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert models.pick_dtype(torch.device("cuda")) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert models.pick_dtype(torch.device("cuda")) == torch.float16
    with pytest.raises(models.UserError, match="no bf16"):
        models.pick_dtype(torch.device("cuda"), "bf16")


def test_native_bf16_detection_reads_cpu_flags(monkeypatch, tmp_path):
    monkeypatch.delenv(models.CPU_BF16_ENV, raising=False)
    real_read = Path.read_text
    flags = {"text": "flags\t: fpu sse avx2 avx512f\n"}
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: flags["text"] if str(self) == "/proc/cpuinfo"
                        else real_read(self, *a, **k))
    assert not models.cpu_has_native_bf16()
    flags["text"] = "flags\t: fpu avx512f avx512_bf16 amx_tile\n"
    assert models.cpu_has_native_bf16()


def test_cpu_bf16_override_beats_the_cpu_flags(monkeypatch):
    real_read = Path.read_text
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: "flags\t: avx512_bf16 amx_bf16\n"
                        if str(self) == "/proc/cpuinfo" else real_read(self, *a, **k))
    monkeypatch.setenv(models.CPU_BF16_ENV, "0")
    assert models.pick_dtype(torch.device("cpu")) == torch.float32  # an AMX machine told to act like an EPYC
    monkeypatch.setenv(models.CPU_BF16_ENV, "1")
    assert models.pick_dtype(torch.device("cpu")) == torch.bfloat16
    assert models.pick_dtype(torch.device("cpu"), "fp32") == torch.float32  # --dtype still wins
    monkeypatch.setenv(models.CPU_BF16_ENV, "yes")
    with pytest.raises(models.UserError, match="BILLION_LLM_CPU_BF16='yes': set it to 1"):
        models.pick_dtype(torch.device("cpu"))


def test_device_validation(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert models.pick_device("cpu").type == "cpu"
    with pytest.raises(models.UserError, match="no CUDA GPU"):
        models.pick_device("cuda")
    with pytest.raises(models.UserError, match="unknown device"):
        models.pick_device("tpu")
    with pytest.raises(models.UserError, match="unknown dtype"):
        models.pick_dtype(torch.device("cpu"), "fp8")


# --- loading ------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["llama", "gpt_neox", "stablelm", "qwen2", "gemma3"])
def test_each_family_loads_and_generates_on_cpu(family, tiny_models):
    loaded = models.load(str(tiny_models[family]), device="cpu", dtype="fp32")
    assert loaded.device.type == "cpu" and next(loaded.model.parameters()).dtype == torch.float32
    assert loaded.model.config._attn_implementation == "sdpa"
    assert loaded.load_seconds > 0 and loaded.tokenizer.pad_token is not None
    enc = loaded.tokenizer.apply_chat_template([{"role": "user", "content": "hello"}], add_generation_prompt=True,
                                               return_tensors="pt", return_dict=True)
    out = loaded.model.generate(**enc, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert out.shape[1] == enc["input_ids"].shape[1] + 4
    ctx = loaded.context()
    assert ctx["dtype"] == "fp32" and ctx["quantize"] == "none" and ctx["device_name"]


@pytest.mark.parametrize("quantize,layer", [("int8", "Linear8bitLt"), ("int4", "Linear4bit")])
def test_bitsandbytes_quantization_on_cpu(quantize, layer, tiny_models):
    pytest.importorskip("bitsandbytes")
    full = models.load(str(tiny_models["llama"]), device="cpu", dtype="fp32")
    quant = models.load(str(tiny_models["llama"]), device="cpu", dtype="fp32", quantize=quantize)
    q_proj = quant.model.model.layers[0].self_attn.q_proj
    assert type(q_proj).__name__ == layer
    assert models.weight_bytes(quant.model) < models.weight_bytes(full.model)
    ids = torch.tensor([[1, 2, 3]])
    out = quant.model.generate(ids, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert out.shape == (1, 6)


def test_unknown_quantization_is_a_user_error():
    with pytest.raises(models.UserError, match="unknown quantization"):
        models.quantization_config("int3", torch.float32)


def test_fallback_template_for_base_model(tiny_models):
    base = models.load(str(tiny_models["gpt_neox"]), device="cpu")
    chat = models.load(str(tiny_models["llama"]), device="cpu")
    assert models.uses_fallback_template(base.tokenizer) and not models.uses_fallback_template(chat.tokenizer)
    assert models.stop_strings(base.tokenizer) == ["\nUser:"] and models.stop_strings(chat.tokenizer) == []
    text = base.tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
         {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}],
        add_generation_prompt=True, tokenize=False)
    assert text == "Be brief.\n\nUser: Hi\nAssistant: Hello.\nUser: Bye\nAssistant:"


def test_twin_weight_bytes_is_params_times_dtype_size():
    spec = models.REGISTRY["pythia-70m"]
    twin = models.build_twin(spec, dtype=torch.float16)
    params = models.count_parameters(twin)
    assert abs(models.weight_bytes(twin) - params * 2) / (params * 2) < 0.05


# --- errors -------------------------------------------------------------------------------------

def _hub_error(status: int, error_code: str | None = None):
    """A real huggingface_hub exception, raised by the library's own status check."""
    import httpx2
    from huggingface_hub.utils import hf_raise_for_status
    headers = {"X-Error-Code": error_code} if error_code else {}
    request = httpx2.Request("GET", "https://huggingface.co/api/models/org/model")
    response = httpx2.Response(status, headers=headers, request=request)
    try:
        hf_raise_for_status(response)
    except Exception as exc:  # noqa: BLE001
        return exc
    raise AssertionError("hf_raise_for_status did not raise")


def test_hub_errors_translate_to_actionable_lines():
    gated = _hub_error(403, "GatedRepo")
    assert type(gated).__name__ == "GatedRepoError"
    msg = models.explain_error(gated, "meta-llama/Llama-3.2-1B-Instruct")
    assert "gated" in msg and "hf auth login" in msg and "HF_TOKEN" in msg
    assert "huggingface.co/meta-llama/Llama-3.2-1B-Instruct" in msg
    missing = _hub_error(404, "RepoNotFound")
    assert type(missing).__name__ == "RepositoryNotFoundError"
    assert "no such repository" in models.explain_error(missing, "org/nope")


def test_offline_and_oom_errors_translate():
    from huggingface_hub.errors import LocalEntryNotFoundError
    msg = models.explain_error(LocalEntryNotFoundError("no connection"), "org/model")
    assert "cannot reach the Hugging Face Hub" in msg and "HF_HUB_OFFLINE=1" in msg
    msg = models.explain_error(torch.OutOfMemoryError("CUDA out of memory"), "tinyllama", torch.device("cuda"))
    assert "out of memory" in msg and "--quantize int4" in msg and "--device cpu" in msg
    assert models.explain_error(ValueError("something else")) is None


def test_load_of_unreachable_hub_model_is_one_line(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path))
    code = "import models; models.run_cli(lambda argv: models.load('someorg/not-cached', device='cpu') and 0)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: cannot reach the Hugging Face Hub")
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


# --- results writer -----------------------------------------------------------------------------

def test_results_written_atomically_with_environment(tmp_path, monkeypatch):
    env = results_io.environment(device="cpu", seed=7, argv=["benchmark.py", "--quick"])
    for key in ("date", "os", "python", "packages", "device", "cpu", "ram_gb", "git_commit", "command", "seed"):
        assert key in env
    for pkg in ("torch", "transformers", "peft", "trl", "bitsandbytes"):
        assert env["packages"][pkg], pkg
    assert env["device"]["name"] and env["cpu"]["cores_logical"] >= 1 and env["seed"] == 7
    json_path, md_path = results_io.result_paths(tmp_path, "bench", "20260101-000000")
    results_io.write_results(json_path, {"environment": env, "value": 1}, "# first")
    assert json.loads(json_path.read_text())["value"] == 1 and md_path.read_text() == "# first\n"

    def fail(*_a, **_k):
        raise OSError("disk full")
    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError):
        results_io.write_results(json_path, {"value": 2}, "# second")
    assert json.loads(json_path.read_text())["value"] == 1  # the old file is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == [json_path.name, md_path.name]  # no temp files left
    assert "| Libraries |" in results_io.environment_markdown(env)


def test_mean_std_and_bar_chart():
    mean, std = results_io.mean_std([2.0, 4.0, 6.0])
    assert mean == 4.0 and std == pytest.approx(2.0)
    chart = results_io.bar_chart([("pythia-1b", 46.8), ("tinyllama", 23.4)], unit="tok/s", width=10)
    lines = chart.splitlines()
    assert lines[0] == "pythia-1b  ██████████ 46.8 tok/s"
    assert lines[1] == "tinyllama  █████ 23.4 tok/s"


# --- real model ---------------------------------------------------------------------------------

def test_real_smollm2_gguf_answers_paris(smollm2_loaded):
    loaded = smollm2_loaded
    assert loaded.resolved.source == "gguf" and loaded.revision.startswith("sha256:b179c952")
    enc = loaded.tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France? Answer briefly."}],
        add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = loaded.model.generate(**enc, max_new_tokens=20, do_sample=False)
    reply = loaded.tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in reply


def test_published_scores_are_cited_and_well_formed():
    """Each published figure names its benchmark, checkpoint, method and a source URL; every default
    model has at least one MMLU figure to compare against."""
    scorings = {"mmlu": {"loglik", "unstated", "cloze", "other"}, "humaneval": {"completion", "chat"}}
    for spec in models.REGISTRY.values():
        for score in spec.published:
            assert score.benchmark in scorings and score.scoring in scorings[score.benchmark], (spec.key, score)
            assert 0 < score.value < 100 and score.source.startswith("https://"), (spec.key, score)
            assert re.fullmatch(r"[\w.-]+/[\w.-]+", score.checkpoint) and score.method, (spec.key, score)
            assert score.shots in (None, 0, 5), (spec.key, score)
    for key in models.DEFAULT_MODELS:
        assert any(s.benchmark == "mmlu" for s in models.REGISTRY[key].published), key


def test_spec_of_finds_registry_entries_behind_paths_and_gguf_names():
    assert models.spec_of("/x/SmolLM2-135M-Instruct.Q4_1.gguf").key == "smollm2-135m"
    assert models.spec_of("qwen2.5-1.5b-instruct-q4_k_m.gguf").key == "qwen2.5-1.5b"
    assert models.spec_of("/tmp/smollm2-135m/").key == "smollm2-135m"
    assert models.spec_of("Qwen/Qwen2.5-1.5B-Instruct").key == "qwen2.5-1.5b"
    assert models.spec_of("/tmp/my-own-model") is None
    assert models.spec_of("/tmp/work/qwen3") is None  # a short alias is not enough to claim a directory
