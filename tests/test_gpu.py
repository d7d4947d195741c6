"""The CUDA paths, on tiny models: engines in bf16 and fp16, bitsandbytes int8/int4, every script, and
NVML energy. Skipped where torch sees no CUDA GPU (CI); tests/gpu_check.sh runs it on a GPU machine."""

from __future__ import annotations

import json

import pytest
import torch

import demo_chat
import energy
import engines
import finetune_demo
import speculative_demo

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible to torch")

TEXT = "the capital of france is paris and the river"


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_engine_on_cuda(tiny_models, dtype):
    engine = engines.load(str(tiny_models["llama"]), engine="transformers", device="cuda", dtype=dtype)
    assert engine.device.type == "cuda" and engine.context()["dtype"] == dtype
    ids = engine.encode(TEXT)
    assert len(list(engines.stream(engine, ids, 6, stop_at_eos=False))) == 6
    lps = engine.next_token_logprobs([ids, ids[:4]], [[1, 2, 3]] * 2, 2)
    assert all(-50 < x <= 0 for row in lps for x in row)
    assert len(engine.generate([ids, ids[:3]], 5, [], 2)) == 2


@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_bitsandbytes_on_cuda(tiny_models, quantize):
    full = engines.load(str(tiny_models["llama"]), engine="transformers", device="cuda", dtype="bf16")
    quant = engines.load(str(tiny_models["llama"]), engine="transformers", device="cuda", dtype="bf16",
                         quantize=quantize)
    assert quant.weight_bytes() < full.weight_bytes() and quant.context()["quantize"] == quantize
    assert len(list(engines.stream(quant, quant.encode(TEXT), 4, stop_at_eos=False))) == 4


def test_nvml_energy_counts_gpu_work():
    meter = energy.EnergyMeter.detect("cuda")
    assert meter.available, meter.reason
    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    with meter.window() as w:
        for _ in range(200):
            a = a @ a / 64
    assert w.reading.joules["gpu"] > 0 and w.reading.avg_watts > 0


def test_every_script_runs_on_cuda(tiny_models, tmp_path, capsys):
    model = str(tiny_models["llama"])
    assert demo_chat.main(["--model", model, "--device", "cuda", "--prompt", "hello", "--max-new-tokens", "6",
                           "--temperature", "0", "--output-dir", str(tmp_path / "chat")]) == 0
    transcript = json.loads(next((tmp_path / "chat").glob("demo_chat-*.json")).read_text())
    assert transcript["models"][0]["device"].startswith("cuda")
    assert speculative_demo.main(["--target", model, "--draft", "self:1", "--prompt", "hello world",
                                  "--max-new-tokens", "8", "--repetitions", "1", "--warmup", "0",
                                  "--device", "cuda", "--output-dir", str(tmp_path / "spec")]) == 0
    for quantize in ("none", "int4"):  # LoRA and QLoRA
        assert finetune_demo.main(["--model", model, "--device", "cuda", "--quantize", quantize, "--max-steps", "2",
                                   "--output-dir", str(tmp_path / f"tune-{quantize}")]) == 0
