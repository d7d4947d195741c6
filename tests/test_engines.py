"""The engine layer: every operation on both engines, on the same tiny weights (a twin and its GGUF) and
on the real SmolLM2-135M-Instruct GGUF where ../shared has it.

The tiny llama twin and its F32 GGUF hold identical weights, so transformers and llama.cpp must agree:
same tokens, same chat prompt, logits within float rounding, the same greedy continuation.
"""

from __future__ import annotations

import logging
import warnings

import numpy as np
import pytest
import torch

import engines
import models

pytestmark = pytest.mark.usefixtures("one_thread")

TEXT = "the capital of france is paris and the river"


@pytest.fixture(scope="module")
def pair(tiny_models, tiny_gguf):
    """(transformers engine on the twin, llama.cpp engine on its GGUF)."""
    hf = engines.load(str(tiny_models["llama"]), engine="transformers", device="cpu", dtype="fp32")
    cpp = engines.load(str(tiny_gguf), engine="llama.cpp", threads=1)
    yield hf, cpp
    cpp.close()


@pytest.fixture(scope="module", params=["transformers", "llama.cpp"])
def engine(request, pair):
    return pair[0] if request.param == "transformers" else pair[1]


# ----------------------------------------------------------------------------------------------
# Loading and identity
# ----------------------------------------------------------------------------------------------

def test_default_engine_is_llamacpp_for_gguf_and_transformers_otherwise(tiny_models, tiny_gguf):
    assert engines.default_engine(models.resolve(str(tiny_gguf))) == "llama.cpp"
    assert engines.default_engine(models.resolve(str(tiny_models["llama"]))) == "transformers"


def test_context_records_engine_weights_and_sizes(pair):
    hf, cpp = pair
    a, b = hf.context(), cpp.context()
    assert a["engine"] == "transformers" and a["engine_version"].startswith("transformers ")
    assert b["engine"] == "llama.cpp" and b["engine_version"].startswith("llama-cpp-python ")
    assert a["weights"] == "fp32" and b["weights"] == "GGUF F32" and b["revision"].startswith("sha256:")
    assert "AVX" in b["engine_build"] or "NEON" in b["engine_build"] or b["engine_build"]
    assert cpp.parameter_count() == hf.parameter_count()  # the same tensors
    assert cpp.weight_bytes() == pytest.approx(hf.weight_bytes(), rel=0.02)  # F32 either way
    assert cpp.kv_bytes_per_token() == 2 * 2 * 2 * 16 * 2  # layers x kv heads x (k + v) x head dim x f16
    assert hf.kv_bytes_per_token() == 2 * 2 * 2 * 16 * 4  # fp32 cache in transformers
    details = cpp.memory_details()
    assert details["llama_cpp_context_tokens"] == cpp.context_length == 1024  # capped at the trained context
    assert details["llama_cpp_kv_cache_bytes"] == 1024 * cpp.kv_bytes_per_token()


def test_engine_errors_are_one_line(tiny_models, tiny_gguf, tmp_path):
    with pytest.raises(models.UserError, match="unknown engine 'vllm'"):
        engines.load(str(tiny_gguf), engine="vllm")
    with pytest.raises(models.UserError, match="runs GGUF files.*--gguf"):
        engines.load(str(tiny_models["llama"]), engine="llama.cpp")
    with pytest.raises(models.UserError, match="bitsandbytes, for --engine transformers"):
        engines.load(str(tiny_gguf), engine="llama.cpp", quantize="int4")
    assert engines.load(str(tiny_gguf), engine="llama.cpp", dtype="fp32").context()["dtype"] == "F32"  # the file's
    corrupt = tmp_path / "broken.Q4_0.gguf"
    corrupt.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(models.UserError, match="llama.cpp cannot load .*complete GGUF file"):
        engines.load(str(corrupt), engine="llama.cpp")


# ----------------------------------------------------------------------------------------------
# Tokenizer and chat template: the same on both engines
# ----------------------------------------------------------------------------------------------

def test_tokenizer_and_chat_template_agree(pair):
    hf, cpp = pair
    assert hf.encode(TEXT) == cpp.encode(TEXT)
    assert cpp.decode(cpp.encode(TEXT)) == hf.decode(hf.encode(TEXT)) == TEXT
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello world"}]
    assert hf.chat_prompt(messages) == cpp.chat_prompt(messages)
    assert hf.chat_ids(messages) == cpp.chat_ids(messages)
    assert hf.chat_prompt(messages).endswith("<|im_start|>assistant\n")
    assert hf.eos_ids == cpp.eos_ids and hf.encode("<|im_end|>", False)[0] in cpp.eos_ids
    assert not hf.is_base_model and not cpp.is_base_model and cpp.stop_strings == []


# ----------------------------------------------------------------------------------------------
# Compute: the same weights give the same numbers
# ----------------------------------------------------------------------------------------------

def test_begin_and_advance_give_the_same_logits(pair):
    hf, cpp = pair
    ids = hf.encode(TEXT)
    a, b = hf.begin(ids), cpp.begin(ids)
    assert a.shape == b.shape == (hf.vocab_size,)
    assert torch.allclose(a.float(), b.float(), atol=1e-3)
    token = int(a.argmax())
    assert torch.allclose(hf.advance(token).float(), cpp.advance(token).float(), atol=1e-3)


def test_stream_greedy_tokens_agree_and_forced_length_ignores_eos(pair):
    hf, cpp = pair
    ids = hf.encode(TEXT)
    greedy = [[s.token for s in engines.stream(e, ids, 12)] for e in pair]
    assert greedy[0] == greedy[1]
    steps = list(engines.stream(cpp, ids, 9, stop_at_eos=False))
    assert len(steps) == 9 and all(a.time <= b.time for a, b in zip(steps, steps[1:]))


def test_stream_stops_at_eos(engine, monkeypatch):
    eos = min(engine.eos_ids)
    real = engine.advance

    def eos_next(token):  # the third token is forced to EOS
        logits = real(token).clone()
        logits[eos] = 1e4
        return logits
    monkeypatch.setattr(engine, "advance", eos_next)
    tokens = [s.token for s in engines.stream(engine, engine.encode(TEXT), 10)]
    assert len(tokens) == 2 and tokens[-1] == eos


def test_sampling_is_seeded(engine):
    ids = engine.encode(TEXT)
    runs = [[s.token for s in engines.stream(engine, ids, 8, engines.Sampling(1.0, 0.9),
                                             generator=torch.Generator().manual_seed(3))] for _ in range(2)]
    assert runs[0] == runs[1]


def test_prefill_leaves_no_state_behind(engine):
    ids = engine.encode(TEXT)
    before = engine.begin(ids).clone()
    engine.prefill(engine.encode("something else entirely"))
    assert torch.allclose(engine.begin(ids), before, atol=1e-5)


def test_next_token_logprobs_match_log_softmax_with_and_without_a_shared_prefix(engine):
    preamble = engine.encode("the model answers the question about the capital city " * 4)
    contexts = [preamble + engine.encode(f" question {i} water", False) for i in range(5)] + [engine.encode("hello")]
    candidates = [[5, 17, 42, 300]] * len(contexts)
    got = engine.next_token_logprobs(contexts, candidates, batch_size=2)
    for ctx, cand, lp in zip(contexts, candidates, got):
        expected = torch.log_softmax(engine.begin(ctx).double(), -1)[cand]
        assert lp == pytest.approx(expected.tolist(), abs=1e-4)


def test_both_engines_score_the_same(pair):
    hf, cpp = pair
    contexts = [hf.encode(f"question {i} about the river and the mountain?") for i in range(4)]
    candidates = [[hf.encode(f" {x}", False)[0] for x in "ABCD"]] * 4
    a = hf.next_token_logprobs(contexts, candidates, 4)
    b = cpp.next_token_logprobs(contexts, candidates, 4)
    assert np.allclose(a, b, atol=1e-3)
    requests = [(c, hf.encode(" paris city water", False)) for c in contexts]
    assert np.allclose(hf.loglikelihood(requests, 2), cpp.loglikelihood(requests, 2), atol=1e-3)


def test_loglikelihood_is_the_sum_of_token_logprobs(engine):
    context, continuation = engine.encode("the capital of"), engine.encode(" france is paris", False)
    total, ids = 0.0, list(context)
    for token in continuation:
        total += torch.log_softmax(engine.begin(ids).double(), -1)[token].item()
        ids.append(token)
    assert engine.loglikelihood([(context, continuation)], 4)[0] == pytest.approx(total, abs=1e-4)


def test_batched_generate_equals_one_at_a_time(engine):
    prompts = [engine.encode(t) for t in ("def add(a, b):", "the capital of france", "hello world and the river is")]
    batched = engine.generate(prompts, 10, ["\n\n"], batch_size=3)
    alone = [engine.generate([p], 10, ["\n\n"], batch_size=1)[0] for p in prompts]
    assert batched == alone == [engines.generate_until(engine, p, 10, ["\n\n"]) for p in prompts]


def test_generate_stops_at_a_stop_string(pair):
    hf, cpp = pair
    ids = hf.encode(TEXT)
    free = engines.generate_until(hf, ids, 12, [])
    text = hf.decode(free)
    stop = next(text[i:i + 2] for i in range(1, len(text) - 1) if text[i:i + 2].isascii() and text[i:i + 2].isalpha())
    for e in pair:
        out = e.generate([ids], 12, [stop], batch_size=1)[0]
        assert out == free[:len(out)] and stop in e.decode(out) and stop not in e.decode(out[:-1])


def test_no_deprecation_warning_from_our_calls(pair, caplog):
    """transformers 5.24 renamed `past_key_values` to `cache`: our calls use the new name, so nothing
    is warned (warnings are errors here) and nothing deprecated is logged."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with caplog.at_level(logging.WARNING):
            for e in pair:
                ids = e.encode(TEXT)
                list(engines.stream(e, ids, 4))
                e.prefill(ids)
                e.next_token_logprobs([ids, ids + [5] * 40, ids + [5] * 41], [[1, 2]] * 3, 2)
                e.generate([ids, ids[:3]], 4, ["\n"], 2)
    assert not [r for r in caplog.records if "deprecat" in r.getMessage().lower()]


# ----------------------------------------------------------------------------------------------
# The real SmolLM2-135M-Instruct, on both engines
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2_cpp(smollm2_gguf):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    engine = engines.load(str(smollm2_gguf), engine="llama.cpp")
    yield engine
    engine.close()


def test_real_gguf_on_both_engines(smollm2_cpp, smollm2_loaded):
    from engines.hf import TransformersEngine
    hf = TransformersEngine(smollm2_loaded)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    assert hf.chat_ids(messages) == smollm2_cpp.chat_ids(messages)
    assert smollm2_cpp.context()["weights"] == "GGUF Q4_1" and smollm2_cpp.eos_ids >= {2}
    ids = hf.chat_ids(messages)
    a, b = hf.begin(ids).numpy(), smollm2_cpp.begin(ids).numpy()
    # llama.cpp multiplies Q4_1 weights with 8-bit-quantized activations; transformers de-quantized
    # them to fp32: close, not equal
    assert np.corrcoef(a, b)[0, 1] > 0.99
    assert set(np.argsort(a)[-5:]) & set(np.argsort(b)[-5:])
    reply = hf.decode(engines.generate_until(hf, ids, 12, []))
    assert "Paris" in reply
    letters = [smollm2_cpp.encode(f" {x}", False) for x in "ABCD"]
    assert all(len(t) == 1 for t in letters) and letters == [hf.encode(f" {x}", False) for x in "ABCD"]


def test_a_gguf_on_transformers_is_labelled_by_what_loaded(tiny_gguf):
    from types import SimpleNamespace

    from engines.hf import gguf_kept_packed
    engine = engines.load(str(tiny_gguf), engine="transformers", dtype="fp32")
    try:  # without the `kernels` package transformers de-quantizes every tensor into plain Linear layers
        assert not gguf_kept_packed(engine.model)
        assert all(type(m) is torch.nn.Linear for m in engine.model.modules() if "Linear" in type(m).__name__)
        assert engine.context()["weights"] == "GGUF F32 de-quantized to fp32"
    finally:
        engine.close()
    GgufHfQuantizer = type("GgufHfQuantizer", (), {})  # what transformers attaches when it keeps the blocks
    packed = GgufHfQuantizer()
    packed.quantization_config = SimpleNamespace(dequantize=False)
    assert gguf_kept_packed(SimpleNamespace(hf_quantizer=packed))
    packed.quantization_config = SimpleNamespace(dequantize=True)
    assert not gguf_kept_packed(SimpleNamespace(hf_quantizer=packed))
