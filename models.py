"""Shared model registry, device/dtype choice and loading for every billion-llm script.

    python -c "import models; print(models.resolve('tinyllama'))"
    python -c "import models; m = models.load('smollm2-135m'); print(m.load_seconds)"
    python -c "import models; print(models.pick_dtype(models.pick_device('auto')))"

Nothing here runs at import time: no network, no model loads. Scripts call `resolve` to turn a
name into something loadable, `load` to get (model, tokenizer) on the chosen device/dtype, and wrap
their `main` in `run_cli` so a person sees one actionable line instead of a traceback.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import hashlib
import os
import re
import struct
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

# ----------------------------------------------------------------------------------------------
# Registry. Architecture numbers are copied from each model's published config.json; they build
# the random-weight twin used by `benchmark.py --synthetic` and the parameter counts are checked
# against `params` (the published figure) by tests/test_models.py.
# ----------------------------------------------------------------------------------------------

LLAMA_LORA = ("q_proj", "v_proj")
NEOX_LORA = ("query_key_value",)

# family -> transformers model_type used to build a twin from `arch`.
FAMILY_MODEL_TYPE = {
    "llama": "llama",
    "gpt_neox": "gpt_neox",
    "stablelm": "stablelm",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma3": "gemma3_text",
}


@dataclass(frozen=True)
class PublishedScore:
    """A score published for a model, with where it was read. `value` is in percent, as published.

    `scoring` says how comparable it is to ours: for MMLU "loglik" is the likelihood of the answer
    letter (what lm-evaluation-harness and benchmark.py do), "unstated" a source that does not say,
    "cloze" (likelihood of the answer text) and "other" (MMLU-redux, generation, ...) are different
    tasks in all but name. For HumanEval it is the prompt format, "completion" or "chat".
    `checkpoint` is the model the figure is for: often the base model of an instruct entry.
    """

    benchmark: str  # "mmlu" | "humaneval"
    value: float  # percent
    shots: int | None
    scoring: str
    method: str  # the source's own words for how it was measured
    checkpoint: str  # hub id the figure is for
    source: str  # URL


@dataclass(frozen=True)
class ModelSpec:
    """One registry entry. `arch` holds config.json keys; `params` is the published count."""

    key: str
    hf_id: str
    family: str
    params: int
    context: int
    instruct: bool
    gated: bool
    license: str
    strength: str
    arch: dict
    aliases: tuple[str, ...] = ()
    lora_targets: tuple[str, ...] = LLAMA_LORA
    draft_for: tuple[str, ...] = ()  # registry keys this model can draft for (same tokenizer)
    default: bool = False  # member of the default comparison set
    published: tuple[PublishedScore, ...] = ()  # filled from PUBLISHED_SCORES below the table
    gguf: tuple[GgufSource, ...] = ()  # filled from GGUF_SOURCES below the table; maker's first

    @property
    def url(self) -> str:
        return f"https://huggingface.co/{self.hf_id}"


def _llama(hidden, layers, heads, kv, inter, vocab, ctx, theta, tie, eps=1e-5, **extra):
    return dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                num_key_value_heads=kv, intermediate_size=inter, vocab_size=vocab,
                max_position_embeddings=ctx, rope_theta=theta, tie_word_embeddings=tie,
                rms_norm_eps=eps, **extra)


def _neox(hidden, layers, heads, inter, vocab=50304, ctx=2048):
    return dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                intermediate_size=inter, vocab_size=vocab, max_position_embeddings=ctx,
                rotary_pct=0.25, rotary_emb_base=10000, use_parallel_residual=True,
                tie_word_embeddings=False, layer_norm_eps=1e-5)


_LLAMA3_ROPE = dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                    original_max_position_embeddings=8192)
_LLAMA31_ROPE = dict(_LLAMA3_ROPE, factor=8.0)

_ENTRIES = [
    # --- default comparison set ---------------------------------------------------------------
    ModelSpec("tinyllama", "TinyLlama/TinyLlama-1.1B-Chat-v1.0", "llama", 1_100_048_384, 2048,
              True, False, "apache-2.0", "Llama-2 architecture and tokenizer; 3T tokens; fast and ungated",
              _llama(2048, 22, 32, 4, 5632, 32000, 2048, 10000.0, False),
              aliases=("tinyllama-1.1b", "tinyllama-chat"), draft_for=("llama2-7b-chat",), default=True),
    ModelSpec("llama3.2-1b", "meta-llama/Llama-3.2-1B-Instruct", "llama", 1_235_814_400, 131072,
              True, True, "llama3.2", "Meta's 1B: strong instruction following, 128k context",
              _llama(2048, 16, 32, 8, 8192, 128256, 131072, 500000.0, True, head_dim=64,
                     rope_scaling=_LLAMA3_ROPE),
              aliases=("llama-3.2-1b", "llama3.2", "llama-1b"),
              draft_for=("llama3.2-3b", "llama3.1-8b"), default=True),
    ModelSpec("stablelm-1.6b", "stabilityai/stablelm-2-1_6b-chat", "stablelm", 1_644_515_328, 4096,
              True, False, "stabilityai-community", "Multilingual (7 languages) 1.6B chat model",
              dict(hidden_size=2048, num_hidden_layers=24, num_attention_heads=32,
                   num_key_value_heads=32, intermediate_size=5632, vocab_size=100352,
                   max_position_embeddings=4096, rope_theta=10000.0, partial_rotary_factor=0.25,
                   use_qkv_bias=True, qk_layernorm=False, use_parallel_residual=False,
                   layer_norm_eps=1e-5, tie_word_embeddings=False),
              aliases=("stablelm", "stablelm-2-1.6b", "stablelm2"), default=True),
    ModelSpec("pythia-1b", "EleutherAI/pythia-1b", "gpt_neox", 1_011_781_632, 2048,
              False, False, "apache-2.0", "Fully open research base model (The Pile), no chat tuning",
              _neox(2048, 16, 8, 8192), aliases=("pythia",), lora_targets=NEOX_LORA, default=True),
    ModelSpec("qwen2.5-1.5b", "Qwen/Qwen2.5-1.5B-Instruct", "qwen2", 1_543_714_304, 32768,
              True, False, "apache-2.0", "Best all-round quality at 1.5B: knowledge, code, maths",
              _llama(1536, 28, 12, 2, 8960, 151936, 32768, 1000000.0, True, eps=1e-6),
              aliases=("qwen2.5", "qwen-1.5b", "qwen2.5-1.5b-instruct"), default=True),
    # --- newer 1B-class contenders ------------------------------------------------------------
    ModelSpec("smollm2-1.7b", "HuggingFaceTB/SmolLM2-1.7B-Instruct", "llama", 1_711_376_384, 8192,
              True, False, "apache-2.0", "Hugging Face's open 1.7B trained on 11T curated tokens",
              _llama(2048, 24, 32, 32, 8192, 49152, 8192, 130000.0, True),
              aliases=("smollm2", "smollm2-1.7b-instruct")),
    ModelSpec("gemma3-1b", "google/gemma-3-1b-it", "gemma3", 999_885_952, 32768,
              True, True, "gemma", "Google's 1B with 262k-token vocabulary and local/global attention",
              dict(hidden_size=1152, num_hidden_layers=26, num_attention_heads=4,
                   num_key_value_heads=1, head_dim=256, intermediate_size=6912,
                   vocab_size=262144, max_position_embeddings=32768, sliding_window=512,
                   rope_theta=1000000.0, rope_local_base_freq=10000.0, query_pre_attn_scalar=256,
                   rms_norm_eps=1e-6, tie_word_embeddings=True, sliding_window_pattern=6),
              aliases=("gemma-3-1b", "gemma3", "gemma-3-1b-it")),
    ModelSpec("qwen3-1.7b", "Qwen/Qwen3-1.7B", "qwen3", 1_720_574_976, 40960,
              True, False, "apache-2.0", "Qwen3 hybrid thinking/non-thinking model, 1.7B",
              _llama(2048, 28, 16, 8, 6144, 151936, 40960, 1000000.0, True, eps=1e-6, head_dim=128),
              aliases=("qwen3", "qwen3-1.7b-instruct")),
    # --- small real models and drafts ---------------------------------------------------------
    ModelSpec("smollm2-135m", "HuggingFaceTB/SmolLM2-135M-Instruct", "llama", 134_515_008, 8192,
              True, False, "apache-2.0", "Tiny real chat model: tests, demos, and a draft for SmolLM2-1.7B",
              _llama(576, 30, 9, 3, 1536, 49152, 8192, 100000.0, True),
              aliases=("smollm2-135m-instruct", "smol-135m"), draft_for=("smollm2-1.7b",)),
    ModelSpec("smollm2-360m", "HuggingFaceTB/SmolLM2-360M-Instruct", "llama", 361_821_120, 8192,
              True, False, "apache-2.0", "Small real chat model; a draft for SmolLM2-1.7B",
              _llama(960, 32, 15, 5, 2560, 49152, 8192, 100000.0, True),
              aliases=("smollm2-360m-instruct", "smol-360m"), draft_for=("smollm2-1.7b",)),
    ModelSpec("pythia-70m", "EleutherAI/pythia-70m", "gpt_neox", 70_426_624, 2048,
              False, False, "apache-2.0", "Smallest Pythia; draft for pythia-1b",
              _neox(512, 6, 8, 2048), lora_targets=NEOX_LORA, draft_for=("pythia-1b",)),
    ModelSpec("pythia-160m", "EleutherAI/pythia-160m", "gpt_neox", 162_322_944, 2048,
              False, False, "apache-2.0", "Small Pythia; draft for pythia-1b",
              _neox(768, 12, 12, 3072), lora_targets=NEOX_LORA, draft_for=("pythia-1b",)),
    ModelSpec("qwen2.5-0.5b", "Qwen/Qwen2.5-0.5B-Instruct", "qwen2", 494_032_768, 32768,
              True, False, "apache-2.0", "Qwen2.5 0.5B; draft for Qwen2.5-1.5B and -7B",
              _llama(896, 24, 14, 2, 4864, 151936, 32768, 1000000.0, True, eps=1e-6),
              aliases=("qwen2.5-0.5b-instruct",), draft_for=("qwen2.5-1.5b", "qwen2.5-7b")),
    # --- speculative-decoding targets ---------------------------------------------------------
    ModelSpec("qwen2.5-7b", "Qwen/Qwen2.5-7B-Instruct", "qwen2", 7_615_616_512, 32768,
              True, False, "apache-2.0", "7B target for Qwen2.5 drafts",
              _llama(3584, 28, 28, 4, 18944, 152064, 32768, 1000000.0, False, eps=1e-6),
              aliases=("qwen2.5-7b-instruct",)),
    ModelSpec("llama3.2-3b", "meta-llama/Llama-3.2-3B-Instruct", "llama", 3_212_749_824, 131072,
              True, True, "llama3.2", "3B target for Llama-3.2-1B drafts",
              _llama(3072, 28, 24, 8, 8192, 128256, 131072, 500000.0, True, head_dim=128,
                     rope_scaling=_LLAMA3_ROPE),
              aliases=("llama-3.2-3b",)),
    ModelSpec("llama3.1-8b", "meta-llama/Llama-3.1-8B-Instruct", "llama", 8_030_261_248, 131072,
              True, True, "llama3.1", "8B target for Llama-3.2-1B drafts",
              _llama(4096, 32, 32, 8, 14336, 128256, 131072, 500000.0, False, head_dim=128,
                     rope_scaling=_LLAMA31_ROPE),
              aliases=("llama-3.1-8b",)),
    ModelSpec("llama2-7b-chat", "meta-llama/Llama-2-7b-chat-hf", "llama", 6_738_415_616, 4096,
              True, True, "llama2", "7B Llama-2-tokenizer target for TinyLlama drafts",
              _llama(4096, 32, 32, 32, 11008, 32000, 4096, 10000.0, False),
              aliases=("llama-2-7b-chat",)),
]

# Published scores, each read from the source it links (model card, paper or leaderboard) on the date
# of the commit that added it. Never typed from memory: a figure without a source is left out.
_TINYLLAMA_EVAL = "https://github.com/jzhang38/TinyLlama/blob/main/EVAL.md"
_LLAMA32_CARD = "https://github.com/meta-llama/llama-models/blob/main/models/llama3_2/MODEL_CARD.md"
_LLAMA31_CARD = "https://github.com/meta-llama/llama-models/blob/main/models/llama3_1/MODEL_CARD.md"
_QWEN25_BLOG = "https://qwenlm.github.io/blog/qwen2.5-llm/"
_INSTRUCT_EVAL_MMLU = "InstructEval mmlu.py (next-token probability of A-D, 5-shot default), run by the TinyLlama team"
_META_BASE = "Meta's evaluation, macro_avg/acc_char (answer-letter likelihood), base-model table"
_META_INSTRUCT = "Meta's evaluation, macro_avg/acc, instruction-tuned table (likelihood or generation not stated)"
_P = PublishedScore
PUBLISHED_SCORES: dict[str, tuple[PublishedScore, ...]] = {
    "tinyllama": (
        _P("mmlu", 26.04, 5, "loglik", "Open LLM Leaderboard v1 (lm-evaluation-harness), acc",
           "TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T",
           "https://huggingface.co/TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T"),
        _P("humaneval", 9.15, 0, "completion", "InstructEval humaneval, n_sample 1",
           "TinyLlama/TinyLlama-1.1B-intermediate-step-1195k-token-2.5T", _TINYLLAMA_EVAL),
    ),
    "llama3.2-1b": (
        _P("mmlu", 49.3, 5, "other", _META_INSTRUCT, "meta-llama/Llama-3.2-1B-Instruct", _LLAMA32_CARD),
        _P("mmlu", 32.2, 5, "loglik", _META_BASE, "meta-llama/Llama-3.2-1B", _LLAMA32_CARD),
    ),
    "stablelm-1.6b": (
        _P("mmlu", 38.93, None, "loglik", "Open LLM Leaderboard-format table, 'MMLU (acc_norm)', shots not stated",
           "stabilityai/stablelm-2-1_6b", "https://huggingface.co/stabilityai/stablelm-2-zephyr-1_6b"),
    ),
    "pythia-1b": (
        _P("mmlu", 25.70, 5, "loglik", _INSTRUCT_EVAL_MMLU, "EleutherAI/pythia-1b", _TINYLLAMA_EVAL),
        _P("humaneval", 1.83, 0, "completion", "InstructEval humaneval, n_sample 1, run by the TinyLlama team",
           "EleutherAI/pythia-1b", _TINYLLAMA_EVAL),
    ),
    "qwen2.5-1.5b": (
        _P("mmlu", 50.7, None, "other", "MMLU-redux (re-annotated MMLU), instruct table",
           "Qwen/Qwen2.5-1.5B-Instruct", _QWEN25_BLOG),
        _P("mmlu", 60.9, 5, "unstated", "MMLU 5-shot, base-model table", "Qwen/Qwen2.5-1.5B", _QWEN25_BLOG),
        _P("humaneval", 61.6, None, "chat", "HumanEval, instruct table", "Qwen/Qwen2.5-1.5B-Instruct", _QWEN25_BLOG),
        _P("humaneval", 37.2, 0, "completion", "HumanEval 0-shot, base-model table", "Qwen/Qwen2.5-1.5B",
           _QWEN25_BLOG),
    ),
    "gemma3-1b": (
        _P("humaneval", 41.5, 0, "chat", "HumanEval 0-shot, instruction-tuned table", "google/gemma-3-1b-it",
           "https://huggingface.co/google/gemma-3-1b-it"),
    ),
    "smollm2-135m": (
        _P("mmlu", 29.3, 0, "cloze", "lighteval MMLU (cloze): answer text likelihood, zero-shot",
           "HuggingFaceTB/SmolLM2-135M-Instruct", "https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct"),
        _P("mmlu", 31.5, 0, "cloze", "lighteval MMLU (cloze), zero-shot, base-model table",
           "HuggingFaceTB/SmolLM2-135M", "https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct"),
    ),
    "smollm2-360m": (
        _P("mmlu", 32.8, 0, "cloze", "lighteval MMLU (cloze): answer text likelihood, zero-shot",
           "HuggingFaceTB/SmolLM2-360M-Instruct", "https://huggingface.co/HuggingFaceTB/SmolLM2-360M-Instruct"),
        _P("mmlu", 35.8, 0, "cloze", "lighteval MMLU (cloze), zero-shot, base-model table",
           "HuggingFaceTB/SmolLM2-360M", "https://huggingface.co/HuggingFaceTB/SmolLM2-360M-Instruct"),
    ),
    "qwen2.5-0.5b": (
        _P("mmlu", 24.1, None, "other", "MMLU-redux (re-annotated MMLU), instruct table",
           "Qwen/Qwen2.5-0.5B-Instruct", _QWEN25_BLOG),
        _P("mmlu", 47.5, 5, "unstated", "MMLU 5-shot, base-model table", "Qwen/Qwen2.5-0.5B", _QWEN25_BLOG),
        _P("humaneval", 35.4, None, "chat", "HumanEval, instruct table", "Qwen/Qwen2.5-0.5B-Instruct", _QWEN25_BLOG),
        _P("humaneval", 30.5, 0, "completion", "HumanEval 0-shot, base-model table", "Qwen/Qwen2.5-0.5B",
           _QWEN25_BLOG),
    ),
    "qwen2.5-7b": (
        _P("mmlu", 75.4, None, "other", "MMLU-redux (re-annotated MMLU), instruct table",
           "Qwen/Qwen2.5-7B-Instruct", _QWEN25_BLOG),
        _P("mmlu", 74.2, 5, "unstated", "MMLU 5-shot, base-model table", "Qwen/Qwen2.5-7B", _QWEN25_BLOG),
        _P("humaneval", 84.8, None, "chat", "HumanEval, instruct table", "Qwen/Qwen2.5-7B-Instruct", _QWEN25_BLOG),
        _P("humaneval", 57.9, 0, "completion", "HumanEval 0-shot, base-model table", "Qwen/Qwen2.5-7B", _QWEN25_BLOG),
    ),
    "llama3.2-3b": (
        _P("mmlu", 63.4, 5, "other", _META_INSTRUCT, "meta-llama/Llama-3.2-3B-Instruct", _LLAMA32_CARD),
        _P("mmlu", 58.0, 5, "loglik", _META_BASE, "meta-llama/Llama-3.2-3B", _LLAMA32_CARD),
    ),
    "llama3.1-8b": (
        _P("mmlu", 69.4, 5, "other", _META_INSTRUCT, "meta-llama/Llama-3.1-8B-Instruct", _LLAMA31_CARD),
        _P("mmlu", 66.7, 5, "loglik", _META_BASE, "meta-llama/Llama-3.1-8B", _LLAMA32_CARD),
        _P("humaneval", 72.6, 0, "chat", "HumanEval 0-shot pass@1, instruction-tuned table",
           "meta-llama/Llama-3.1-8B-Instruct", _LLAMA31_CARD),
    ),
    "llama2-7b-chat": (
        _P("mmlu", 45.3, 5, "unstated", "MMLU 5-shot, Llama 2 paper Table 3 (base model)", "meta-llama/Llama-2-7b-hf",
           "https://arxiv.org/abs/2307.09288"),
    ),
}


@dataclass(frozen=True)
class GgufSource:
    """A Hugging Face repository of GGUF files for a registry model, and how its files are named.

    `pattern` is the file name with `{quant}` where the quantization goes. `quants` are spelled exactly
    as that repository spells them (Qwen writes "q4_k_m" and "fp16", bartowski "Q4_K_M" and "f16") and
    list only quants published as one file (shards "-00001-of-0000N" are not fetched). `maker` marks the
    model makers' own repository; `source` says where the repository and file names were checked.
    """

    repo_id: str
    pattern: str
    quants: tuple[str, ...]
    maker: bool
    source: str

    @staticmethod
    def key(quant: str) -> str:
        """The spelling-independent name of a quantization: "q4_k_m" -> "Q4_K_M", "fp16" -> "F16"."""
        upper = quant.strip().upper()
        return {"FP16": "F16", "FP32": "F32"}.get(upper, upper)

    def filename(self, quant: str) -> str | None:
        """This repository's file for `quant` (any spelling), or None if the table does not list it."""
        spelled = next((q for q in self.quants if self.key(q) == self.key(quant)), None)
        return self.pattern.format(quant=spelled) if spelled else None


# GGUF repositories per registry model, the makers' own first, then one well-known repackager. Every
# repository and file name was read from a public file listing, commit page or download script (the
# Hub itself was not reachable); a quant is listed only where its exact file name was seen. Pythia has
# no GGUF from EleutherAI or a well-known repackager, so it gets none.
_G = GgufSource
_BARTOWSKI = "bartowski's imatrix quants; "
GGUF_SOURCES: dict[str, tuple[GgufSource, ...]] = {
    "tinyllama": (
        _G("TheBloke/TinyLlama-1.1B-Chat-v1.0-GGUF", "tinyllama-1.1b-chat-v1.0.{quant}.gguf",
           ("Q2_K", "Q3_K_M", "Q4_0", "Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0"), False,
           "https://huggingface.co/TheBloke/TinyLlama-1.1B-Chat-v1.0-GGUF/tree/f9804e8 (Q2_K-Q4_K_M "
           "listed); Q5_K_M, Q6_K, Q8_0 in public download scripts. TinyLlama publishes no GGUF"),
    ),
    "llama3.2-1b": (
        _G("bartowski/Llama-3.2-1B-Instruct-GGUF", "Llama-3.2-1B-Instruct-{quant}.gguf",
           ("Q4_0", "Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0", "f16"), False,
           _BARTOWSKI + "https://huggingface.co/bartowski/Llama-3.2-1B-Instruct-GGUF/tree/main, tree/d1738bb, "
           "tree/75d9ce8, commit/7124d9d (f16). Meta publishes no GGUF"),
    ),
    "stablelm-1.6b": (
        _G("mradermacher/stablelm-2-1_6b-chat-GGUF", "stablelm-2-1_6b-chat.{quant}.gguf",
           ("Q2_K", "Q3_K_M", "Q4_K_S", "Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0", "f16"), False,
           "https://huggingface.co/mradermacher/stablelm-2-1_6b-chat-GGUF/tree/main (037d59f). Stability AI "
           "publishes GGUF for stablelm-2-12b-chat, not for this model"),
    ),
    "qwen2.5-1.5b": (
        _G("Qwen/Qwen2.5-1.5B-Instruct-GGUF", "qwen2.5-1.5b-instruct-{quant}.gguf",
           ("q4_0", "q4_k_m", "q5_k_m", "q6_k", "q8_0", "fp16"), True,
           "https://huggingface.co/Qwen/Qwen2.5-1.5B-Instruct-GGUF; each file name in public download scripts "
           "(q6_k and q8_0 pinned with size and sha256 at revision 91cad51)"),
    ),
    "smollm2-1.7b": (
        _G("HuggingFaceTB/SmolLM2-1.7B-Instruct-GGUF", "smollm2-1.7b-instruct-{quant}.gguf", ("q4_k_m",), True,
           "https://huggingface.co/HuggingFaceTB/SmolLM2-1.7B-Instruct-GGUF/tree/main (2d4a76a): q4_k_m only"),
        _G("bartowski/SmolLM2-1.7B-Instruct-GGUF", "SmolLM2-1.7B-Instruct-{quant}.gguf",
           ("Q4_0", "Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0", "f16"), False,
           _BARTOWSKI + "https://huggingface.co/bartowski/SmolLM2-1.7B-Instruct-GGUF/tree/f3498ee (f16), "
           "tree/e364b5c, tree/d70739c"),
    ),
    "gemma3-1b": (
        _G("google/gemma-3-1b-it-qat-q4_0-gguf", "gemma-3-1b-it-{quant}.gguf", ("q4_0",), True,
           "https://huggingface.co/google/gemma-3-1b-it-qat-q4_0-gguf: Google's quantization-aware-trained "
           "Q4_0 (gated like the original); file name and size in public download scripts at revision d1be121"),
        _G("ggml-org/gemma-3-1b-it-GGUF", "gemma-3-1b-it-{quant}.gguf", ("Q4_K_M", "Q8_0", "f16"), False,
           "llama.cpp's own org; https://huggingface.co/ggml-org/gemma-3-1b-it-GGUF, file names in public "
           "download scripts"),
    ),
    "qwen3-1.7b": (
        _G("Qwen/Qwen3-1.7B-GGUF", "Qwen3-1.7B-{quant}.gguf", ("Q8_0",), True,
           "https://huggingface.co/Qwen/Qwen3-1.7B-GGUF: Q8_0 only; file name, size and sha256 in public notes"),
        _G("ggml-org/Qwen3-1.7B-GGUF", "Qwen3-1.7B-{quant}.gguf", ("Q4_K_M", "Q8_0", "f16"), False,
           "llama.cpp's own org; https://huggingface.co/ggml-org/Qwen3-1.7B-GGUF lists Q4_K_M, Q8_0, F16; "
           "file names in public download scripts"),
    ),
    "smollm2-135m": (
        _G("HuggingFaceTB/SmolLM2-135M-Instruct-GGUF", "smollm2-135m-instruct-{quant}.gguf", ("q8_0",), True,
           "https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct-GGUF: no listing found; q8_0 in several "
           "public download scripts (one pins its sha256), like the 360M repository's only file"),
        _G("bartowski/SmolLM2-135M-Instruct-GGUF", "SmolLM2-135M-Instruct-{quant}.gguf",
           ("Q4_0", "Q4_K_M", "Q6_K", "Q8_0", "f16"), False,
           _BARTOWSKI + "https://huggingface.co/bartowski/SmolLM2-135M-Instruct-GGUF/tree/main (09816ac, f16); "
           "the others in public download scripts (Q4_K_M pinned with size and sha256 at 09816ac)"),
    ),
    "smollm2-360m": (
        _G("HuggingFaceTB/SmolLM2-360M-Instruct-GGUF", "smollm2-360m-instruct-{quant}.gguf", ("q8_0",), True,
           "https://huggingface.co/HuggingFaceTB/SmolLM2-360M-Instruct-GGUF/tree/main (593b5a2): q8_0 only"),
        _G("bartowski/SmolLM2-360M-Instruct-GGUF", "SmolLM2-360M-Instruct-{quant}.gguf",
           ("Q4_0", "Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0", "f16"), False,
           _BARTOWSKI + "https://huggingface.co/bartowski/SmolLM2-360M-Instruct-GGUF/tree/670ba89, tree/ab928a9; "
           "f16 in public download scripts"),
    ),
    "qwen2.5-0.5b": (
        _G("Qwen/Qwen2.5-0.5B-Instruct-GGUF", "qwen2.5-0.5b-instruct-{quant}.gguf",
           ("q2_k", "q4_0", "q4_k_m", "q5_k_m", "q8_0", "fp16"), True,
           "https://huggingface.co/Qwen/Qwen2.5-0.5B-Instruct-GGUF; each file name in public download scripts "
           "(q4_k_m pinned with size and sha256 at revision df5bf01)"),
    ),
    "qwen2.5-7b": (
        _G("Qwen/Qwen2.5-7B-Instruct-GGUF", "qwen2.5-7b-instruct-{quant}.gguf", ("q2_k", "q3_k_m"), True,
           "https://ai.gitee.com/hf-models/Qwen/Qwen2.5-7B-Instruct-GGUF (a mirror): q2_k and q3_k_m are single "
           "files; q4_k_m and up are split into shards there, so they come from bartowski"),
        _G("bartowski/Qwen2.5-7B-Instruct-GGUF", "Qwen2.5-7B-Instruct-{quant}.gguf",
           ("Q4_0", "Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0", "f16"), False,
           _BARTOWSKI + "commit histories at https://huggingface.co/bartowski/Qwen2.5-7B-Instruct-GGUF/commits/main/"
           "<file>; Q8_0 in public download scripts"),
    ),
    "llama3.2-3b": (
        _G("bartowski/Llama-3.2-3B-Instruct-GGUF", "Llama-3.2-3B-Instruct-{quant}.gguf",
           ("Q4_0", "Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0", "f16"), False,
           _BARTOWSKI + "https://huggingface.co/bartowski/Llama-3.2-3B-Instruct-GGUF/tree/main (5ab33fa), "
           "tree/a4b1b21, commits/a4bbabf (f16). Meta publishes no GGUF"),
    ),
    "llama3.1-8b": (
        _G("bartowski/Meta-Llama-3.1-8B-Instruct-GGUF", "Meta-Llama-3.1-8B-Instruct-{quant}.gguf",
           ("Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0", "bf16"), False,
           _BARTOWSKI + "https://huggingface.co/bartowski/Meta-Llama-3.1-8B-Instruct-GGUF/tree/83ffb22, tree/4c506ee. "
           "Meta publishes no GGUF"),
    ),
    "llama2-7b-chat": (
        _G("TheBloke/Llama-2-7B-Chat-GGUF", "llama-2-7b-chat.{quant}.gguf",
           ("Q2_K", "Q3_K_M", "Q4_0", "Q4_K_S", "Q4_K_M", "Q8_0"), False,
           "https://huggingface.co/TheBloke/Llama-2-7B-Chat-GGUF/tree/d4e8fc0, tree/ce47014; Q8_0 in public "
           "download links. Meta publishes no GGUF"),
    ),
}


def gguf_source(spec: ModelSpec, quant: str) -> tuple[str, str] | None:
    """The GGUF repository and file the registry lists for a model at a quantization.

    Args:
        spec: a registry entry.
        quant: any spelling, e.g. "Q4_K_M", "q8_0", "F16".
    Returns:
        (repo id, file name) from the first source that lists `quant` (the makers' own first), or None.
    """
    for source in spec.gguf:
        name = source.filename(quant)
        if name:
            return source.repo_id, name
    return None


def cached_gguf(spec: ModelSpec, quant: str, cache_dir: str | Path | None = None) -> Path | None:
    """The GGUF file for `spec` at `quant` in the local Hugging Face cache, or None; never the network.

    Looks in every source of the model (a download may have come from the second one) for the file the
    table names, or, for a quant the table does not list, the file named with the quant upper- or
    lower-case (how `download_models.py --gguf` finds one in a repository's listing).
    """
    from huggingface_hub import try_to_load_from_cache
    key = GgufSource.key(quant)
    spellings = {key.upper(), key.lower()} | ({"FP16", "fp16"} if key == "F16" else set())
    for source in spec.gguf:
        listed = source.filename(quant)
        names = [listed] if listed else sorted(source.pattern.format(quant=q) for q in spellings)
        for name in names:
            path = try_to_load_from_cache(source.repo_id, name, cache_dir=cache_dir)
            if isinstance(path, str):  # None: not cached; a sentinel object: known to be absent on the Hub
                return Path(path)
    return None


_ENTRIES = [dataclasses.replace(s, published=PUBLISHED_SCORES.get(s.key, ()), gguf=GGUF_SOURCES.get(s.key, ()))
            for s in _ENTRIES]
REGISTRY: dict[str, ModelSpec] = {spec.key: spec for spec in _ENTRIES}
DEFAULT_MODELS: tuple[str, ...] = tuple(s.key for s in _ENTRIES if s.default)
_ALIASES: dict[str, str] = {a.lower(): s.key for s in _ENTRIES for a in (s.key, *s.aliases)}

DEVICES = ("auto", "cuda", "mps", "cpu")
DTYPES = {"auto": None, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
QUANTIZATIONS = ("none", "int8", "int4")

# Plain template for base models without one (Pythia). Generation must stop at FALLBACK_STOP.
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}\n\n"
    "{% elif message['role'] == 'user' %}User: {{ message['content'] }}\n"
    "{% else %}Assistant: {{ message['content'] }}\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)
FALLBACK_STOP = "\nUser:"
# End-of-turn tokens of the chat formats in the registry: a reply ends at any of them.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>")
DEFAULT_CONTEXT_TOKENS = 2048  # when neither the model config nor the registry states one
GGUF_QUANT = re.compile(r"(?i)[.-](i?q\d\w*|f16|bf16|f32)$")  # "SmolLM2-135M-Instruct.Q4_1" -> Q4_1


# ----------------------------------------------------------------------------------------------
# Errors a person can act on
# ----------------------------------------------------------------------------------------------

class UserError(Exception):
    """An error whose message is one actionable line; scripts print it and exit non-zero."""


class UnknownModelError(UserError, ValueError):
    """A name that is no registry key, alias, hub id or local path."""


def close_matches(name: str, n: int = 3) -> list[str]:
    """Registry keys or aliases that look like `name` (difflib), mapped back to keys."""
    hits = difflib.get_close_matches(name.lower(), list(_ALIASES), n=n * 2, cutoff=0.6)
    keys: list[str] = []
    for hit in hits:
        if _ALIASES[hit] not in keys:
            keys.append(_ALIASES[hit])
    return keys[:n]


# ----------------------------------------------------------------------------------------------
# Resolution
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Resolved:
    """Where a model comes from. `source` is 'registry', 'hub', 'local' or 'gguf'."""

    name: str  # what the user typed
    source: str
    path: str  # hub repo id, local directory, or the directory holding the .gguf
    gguf_file: str | None = None
    spec: ModelSpec | None = None

    @property
    def label(self) -> str:
        """Short display name: registry key, hub id, or local directory/file name."""
        if self.spec is not None:
            return self.spec.key
        if self.gguf_file:
            return Path(self.gguf_file).stem
        return Path(self.path).name if self.source == "local" else self.path


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


def resolve(name: str) -> Resolved:
    """Turn a registry key/alias, hub id, local model directory or .gguf file into a Resolved.

    Args:
        name: e.g. "tinyllama", "Qwen/Qwen2.5-1.5B-Instruct", "./my-model", "model.Q4_1.gguf".
    Returns:
        A Resolved naming the source and what to pass to `from_pretrained`.
    Raises:
        UnknownModelError: with close matches and a pointer to `download_models.py --list`.
    """
    key = _ALIASES.get(name.strip().lower())
    if key is not None:
        spec = REGISTRY[key]
        return Resolved(name, "registry", spec.hf_id, spec=spec)
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return Resolved(name, "gguf", str(path.resolve().parent), gguf_file=path.name)
    if path.is_dir():
        if (path / "config.json").is_file():
            return Resolved(name, "local", str(path.resolve()), spec=_spec_for_hub_id(name))
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return Resolved(name, "gguf", str(path.resolve()), gguf_file=ggufs[0].name)
        raise UnknownModelError(
            f"directory '{name}' holds no model: it needs config.json with the weights (a transformers model "
            + (f"directory), or name one of its {len(ggufs)} .gguf files directly." if ggufs else
               "directory) or a single .gguf file."))
    if path.is_file() and not name.endswith(".gguf"):
        raise UnknownModelError(f"'{name}' is a file but not a .gguf model: pass a .gguf file or a model "
                                "directory with config.json.")
    looks_local = name.startswith((".", "/", "~")) or name.endswith(".gguf") or os.sep + os.sep in name
    if _HUB_ID.match(name) and not path.exists() and not looks_local:
        return Resolved(name, "hub", name, spec=_spec_for_hub_id(name))
    matches = close_matches(name)
    hint = f"did you mean {', '.join(matches)}? " if matches else ""
    what = "no such file or model directory" if looks_local or path.exists() else "unknown model"
    raise UnknownModelError(
        f"{what} '{name}': {hint}Run `python download_models.py --list` for the registry "
        "(any Hugging Face id like org/name, a local model directory or a .gguf file also works)."
    )


def canonical_name(name: str) -> str:
    """One spelling per model, so a results row is found again however the model was typed: the
    registry key, the hub id, or the absolute path of a local directory or GGUF file."""
    try:
        resolved = resolve(name)
    except UserError:
        return name
    if resolved.source == "registry":
        return resolved.spec.key
    if resolved.gguf_file:
        return str(Path(resolved.path) / resolved.gguf_file)
    return resolved.path


def disk_bytes(resolved: Resolved, cache_dir: str | None = None) -> int | None:
    """Size of the weight files on disk (GGUF file, local dir, or the hub cache snapshot); None
    when the model is not on disk."""
    if resolved.gguf_file:
        return (Path(resolved.path) / resolved.gguf_file).stat().st_size
    folder = Path(resolved.path) if resolved.source == "local" else None
    if folder is None:
        try:
            from huggingface_hub import snapshot_download
            folder = Path(snapshot_download(resolved.path, local_files_only=True, cache_dir=cache_dir))
        except Exception:  # noqa: BLE001  not cached: size unknown, never fatal
            return None
    files = [f for f in folder.rglob("*") if f.suffix in (".safetensors", ".bin", ".pt", ".gguf")]
    return sum(f.stat().st_size for f in files) or None


def _spec_for_hub_id(hub_id: str) -> ModelSpec | None:
    return next((s for s in _ENTRIES if s.hf_id.lower() == hub_id.lower()), None)


def find_spec(name: str | None) -> ModelSpec | None:
    """The registry entry a name stands for, or None: key, alias, hub id, or the last part of a
    local path or GGUF file named after the hub model ("/x/SmolLM2-135M-Instruct.Q4_1.gguf",
    "/tmp/smollm2-135m"). Used to put published scores and registry facts beside results."""
    if not name:
        return None
    key = _ALIASES.get(name.strip().lower())
    if key is not None:
        return REGISTRY[key]
    spec = _spec_for_hub_id(name)
    if spec is not None:
        return spec
    stem = Path(name.rstrip("/")).name.lower().removesuffix(".gguf")
    if stem in REGISTRY:  # a directory named after a key; short aliases ("qwen3") are too loose for a path
        return REGISTRY[stem]
    for spec in _ENTRIES:  # "<hub name>.Q4_1", "<hub name>-q4_k_m": a quantisation suffix after the name
        base = spec.hf_id.split("/")[-1].lower()
        if stem == base or re.match(re.escape(base) + r"[.-](q\d|f16|f32|bf16|fp16|fp32|iq\d)", stem):
            return spec
    return None


# ----------------------------------------------------------------------------------------------
# Can the model be had? Local files, the Hugging Face cache, or a Hub that answers
# ----------------------------------------------------------------------------------------------

HUB_PROBE_TIMEOUT_S = 2.0  # a reachable Hub answers a TCP connect well within this
DEFAULT_HUB = "https://huggingface.co"


@functools.cache
def hub_unreachable() -> str | None:
    """Why the Hub cannot be used (HF_HUB_OFFLINE set, or no TCP connection to HF_ENDPOINT within
    HUB_PROBE_TIMEOUT_S), or None when it answers. Asked once per process; never retried, so an
    offline machine hears it in a second instead of huggingface_hub's minute of retries."""
    import socket
    from urllib.parse import urlparse
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return "HF_HUB_OFFLINE is set"
    url = urlparse(os.environ.get("HF_ENDPOINT") or DEFAULT_HUB)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=HUB_PROBE_TIMEOUT_S).close()
    except OSError as exc:
        return f"cannot reach {url.scheme}://{url.hostname}:{port} ({exc.strerror or exc})"
    return None


def in_local_cache(repo_id: str, revision: str | None = None, cache_dir: str | None = None) -> bool:
    """True when the Hugging Face cache holds `repo_id` (its config.json at that revision)."""
    from huggingface_hub import try_to_load_from_cache
    return isinstance(try_to_load_from_cache(repo_id, "config.json", cache_dir=cache_dir, revision=revision), str)


def go_offline() -> None:
    """Make huggingface_hub and transformers use the local cache only (no request, no retry)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    if "huggingface_hub" in sys.modules:  # it read the variable at import time
        import huggingface_hub.constants
        huggingface_hub.constants.HF_HUB_OFFLINE = True


def unavailable(names: list[str], revision: str | None = None, cache_dir: str | None = None) -> dict[str, str]:
    """{name: why} for every model that is neither local, nor cached, nor on a reachable Hub. When the
    Hub cannot be reached, the process goes offline so that cached models load without retries.

    Raises:
        UnknownModelError: a name that is no model at all (checked before any network use).
    """
    from_hub = [n for n in names if resolve(n).source in ("registry", "hub")]
    why = hub_unreachable() if from_hub else None  # local files need no Hub
    if why is None:
        return {}
    go_offline()  # cached models then load at once, where from_pretrained would retry the Hub for a minute
    return {n: why for n in from_hub if not in_local_cache(resolve(n).path, revision, cache_dir)}


def require_available(names: list[str], revision: str | None = None, cache_dir: str | None = None) -> None:
    """One line and no retries when a model cannot be had.

    Raises:
        UserError: naming every model that is not local, not cached, and behind an unreachable Hub.
    """
    missing = unavailable(names, revision, cache_dir)
    if missing:
        raise UserError(offline_message(missing) + ".")


def offline_message(missing: dict[str, str]) -> str:
    """One line for the models `unavailable` found: why, which, and the commands that fix it."""
    labels = [resolve(n).label for n in missing]
    return (f"cannot reach the Hugging Face Hub ({next(iter(missing.values()))}) and {', '.join(labels)} "
            f"{'is' if len(labels) == 1 else 'are'} not in the local cache: connect to the internet, or download "
            f"{'it' if len(labels) == 1 else 'them'} first (`python download_models.py --models {' '.join(labels)}`) "
            "and run with HF_HUB_OFFLINE=1, or pass a local model directory or .gguf file")


# ----------------------------------------------------------------------------------------------
# Device and dtype
# ----------------------------------------------------------------------------------------------

def pick_device(requested: str = "auto") -> torch.device:
    """Choose cuda > mps > cpu for 'auto'; validate an explicit choice.

    Raises:
        UserError: when the requested device is not available on this machine.
    """
    requested = (requested or "auto").lower()
    has_mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if has_mps else "cpu")
    kind = requested.split(":")[0]
    if kind not in DEVICES:
        raise UserError(f"unknown device '{requested}': choose one of {', '.join(DEVICES)}.")
    if kind == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA GPU is visible to PyTorch "
                        f"(torch {torch.__version__}): use --device auto or cpu, or install a CUDA build of torch.")
    if kind == "mps" and not has_mps:
        raise UserError("--device mps was asked for but Apple MPS is not available: use --device auto or cpu.")
    return torch.device(requested)


CPU_BF16_ENV = "BILLION_LLM_CPU_BF16"  # "1"/"0" overrides what /proc/cpuinfo says (tests set both)


def cpu_has_native_bf16() -> bool:
    """True when the CPU has bf16 matrix instructions (AMX or AVX512-BF16); Apple silicon counts.

    BILLION_LLM_CPU_BF16=1 or 0 overrides the detection, so the CPU default dtype (bf16 or fp32)
    can be chosen the same on every machine: tests run under both, and a user can compare them.

    Raises:
        UserError: when the override is set to something other than 0 or 1.
    """
    override = os.environ.get(CPU_BF16_ENV, "").strip()
    if override:
        if override not in ("0", "1"):
            raise UserError(f"{CPU_BF16_ENV}={override!r}: set it to 1 (bf16 on CPU), 0 (fp32) or unset it "
                            "to read the CPU flags.")
        return override == "1"
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return sys.platform == "darwin" and os.uname().machine == "arm64"
    return bool(re.search(r"\b(amx_bf16|avx512_bf16)\b", flags))


def pick_dtype(device: torch.device, requested: str = "auto") -> torch.dtype:
    """dtype for `device`: bf16 on CUDA where supported else fp16; fp16 on MPS; fp32 on CPU
    unless it has native bf16 (without it bf16 is several times slower than fp32).

    Raises:
        UserError: for an unknown name, or bf16 on a GPU without it.
    """
    requested = (requested or "auto").lower()
    if requested not in DTYPES:
        raise UserError(f"unknown dtype '{requested}': choose one of {', '.join(DTYPES)}.")
    if requested != "auto":
        dtype = DTYPES[requested]
        if dtype == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise UserError("this GPU has no bf16 support: use --dtype fp16 (or auto).")
        return dtype
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.bfloat16 if cpu_has_native_bf16() else torch.float32


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items() if v is not None}.get(dtype, str(dtype))


def device_name(device: torch.device) -> str:
    """Human-readable accelerator name: GPU model, 'Apple MPS' or the CPU model."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return "Apple MPS"
    return cpu_model_name()


def cpu_model_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform
    return platform.processor() or platform.machine()


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels so a clock read measures finished work (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def set_seed(seed: int) -> None:
    import random
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np
        np.random.seed(seed)
    except ImportError:
        pass


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------

@dataclass
class Loaded:
    """A loaded model with everything a result needs to say where it came from."""

    model: torch.nn.Module
    tokenizer: object
    resolved: Resolved
    device: torch.device
    dtype: torch.dtype
    quantize: str
    load_seconds: float  # wall time of tokenizer + weights, to the device
    revision: str | None = None

    @property
    def label(self) -> str:
        return self.resolved.label

    def context(self) -> dict:
        """The provenance block every result records next to its numbers."""
        return {
            "model": self.label, "source": self.resolved.source, "path": self.resolved.path,
            "hf_id": self.resolved.spec.hf_id if self.resolved.spec else None,
            "gguf_file": self.resolved.gguf_file, "revision": self.revision,
            "device": str(self.device), "device_name": device_name(self.device),
            "dtype": dtype_name(self.dtype), "quantize": self.quantize,
            "load_seconds": round(self.load_seconds, 3),
        }


def quantization_config(quantize: str, compute_dtype: torch.dtype):
    """BitsAndBytesConfig for int8 / int4 (NF4 + double quantisation), None for 'none'.

    Raises:
        UserError: unknown mode, or bitsandbytes missing.
    """
    if quantize == "none":
        return None
    if quantize not in QUANTIZATIONS:
        raise UserError(f"unknown quantization '{quantize}': choose one of {', '.join(QUANTIZATIONS)}.")
    try:
        import bitsandbytes  # noqa: F401  (imported to fail early with a clear message)
    except ImportError as exc:
        raise UserError(f"--quantize {quantize} needs bitsandbytes (pip install 'bitsandbytes>=0.49'): {exc}")
    from transformers import BitsAndBytesConfig
    if quantize == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                              bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute_dtype)


def _source_kwargs(resolved: Resolved, revision: str | None, cache_dir: str | None) -> dict:
    kwargs: dict = {}
    if resolved.gguf_file:
        kwargs["gguf_file"] = resolved.gguf_file
    if revision and resolved.source in ("registry", "hub"):
        kwargs["revision"] = revision
    if cache_dir:
        kwargs["cache_dir"] = cache_dir
    return kwargs


def load_tokenizer(resolved: Resolved, *, revision: str | None = None, cache_dir: str | None = None,
                   trust_remote_code: bool = False):
    """Tokenizer with a pad token, and the plain fallback chat template when it has none.

    Raises:
        UserError: translated hub/file errors (see `explain_error`).
    """
    from transformers import AutoTokenizer
    with translated_errors(resolved.label, gguf=resolved.gguf_file):
        tok = AutoTokenizer.from_pretrained(resolved.path, trust_remote_code=trust_remote_code,
                                            **_source_kwargs(resolved, revision, cache_dir))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    if not getattr(tok, "chat_template", None):
        tok.chat_template = FALLBACK_CHAT_TEMPLATE
    return tok


def uses_fallback_template(tokenizer) -> bool:
    """True when `tokenizer` got the plain User:/Assistant: template (a base model)."""
    return getattr(tokenizer, "chat_template", None) == FALLBACK_CHAT_TEMPLATE


def stop_strings(tokenizer) -> list[str]:
    """Extra stop strings for generation: the next 'User:' turn for fallback-template models."""
    return [FALLBACK_STOP] if uses_fallback_template(tokenizer) else []


def load_model(resolved: Resolved, device: torch.device, dtype: torch.dtype, *, quantize: str = "none",
               revision: str | None = None, cache_dir: str | None = None,
               trust_remote_code: bool = False, attn_implementation: str = "sdpa"):
    """Weights on `device` in `dtype` (or int8/int4 via bitsandbytes), eval mode, SDPA attention.

    Raises:
        UserError: unknown quantization, a platform bitsandbytes cannot serve, translated hub,
            file and out-of-memory errors.
    """
    from transformers import AutoModelForCausalLM
    qconfig = quantization_config(quantize, dtype)
    if qconfig is not None and device.type == "mps":
        raise UserError(f"--quantize {quantize} is not supported on Apple MPS by bitsandbytes: "
                        "use --quantize none (fp16), or --device cpu.")
    kwargs = dict(dtype=dtype, attn_implementation=attn_implementation,
                  trust_remote_code=trust_remote_code, **_source_kwargs(resolved, revision, cache_dir))
    if qconfig is not None:
        kwargs.update(quantization_config=qconfig, device_map={"": str(device)})
    with translated_errors(resolved.label, device, gguf=resolved.gguf_file):
        model = AutoModelForCausalLM.from_pretrained(resolved.path, **kwargs)
        if qconfig is None:
            model.to(device)
    if resolved.gguf_file:
        # transformers de-quantises GGUF weights to `dtype` on load: the result is a plain dense model,
        # so drop the quantizer marks that would block save_pretrained and PEFT training.
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    model.eval()
    return model


def load(name: str | Resolved, *, device: str | torch.device = "auto", dtype: str | torch.dtype = "auto",
         quantize: str = "none", revision: str | None = None, cache_dir: str | None = None,
         trust_remote_code: bool = False, attn_implementation: str = "sdpa") -> Loaded:
    """Resolve, pick device and dtype, load tokenizer and model; time the whole load.

    Args:
        name: anything `resolve` accepts, or a Resolved.
        device, dtype: 'auto' or explicit names (see DEVICES, DTYPES), or torch objects.
        quantize: 'none', 'int8' or 'int4'.
        trust_remote_code: run code shipped with the model (off unless the user asks).
    Returns:
        Loaded with model, tokenizer, provenance and `load_seconds`.
    Raises:
        UserError: every failure a person can act on, with one line saying what to do.
    """
    resolved = name if isinstance(name, Resolved) else resolve(name)
    dev = device if isinstance(device, torch.device) else pick_device(device)
    dt = dtype if isinstance(dtype, torch.dtype) else pick_dtype(dev, dtype)
    start = time.perf_counter()
    tokenizer = load_tokenizer(resolved, revision=revision, cache_dir=cache_dir,
                               trust_remote_code=trust_remote_code)
    model = load_model(resolved, dev, dt, quantize=quantize, revision=revision, cache_dir=cache_dir,
                       trust_remote_code=trust_remote_code, attn_implementation=attn_implementation)
    synchronize(dev)
    seconds = time.perf_counter() - start
    return Loaded(model, tokenizer, resolved, dev, dt, quantize, seconds, model_revision(resolved, model))


def model_revision(resolved: Resolved, model) -> str | None:
    """Hub commit hash when known; sha256 prefix of a .gguf; None for other local directories."""
    commit = getattr(model.config, "_commit_hash", None)
    if commit:
        return commit
    if resolved.gguf_file:
        return "sha256:" + file_sha256(Path(resolved.path) / resolved.gguf_file)[:16]
    return None


def gguf_quant(gguf_file: str | None) -> str:
    """The quantization a GGUF file name states ("Q4_1", "Q4_K_M", "F16"), or "" when it states none."""
    match = GGUF_QUANT.search(Path(gguf_file or "").stem)
    return match.group(1).upper() if match else ""


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------
# Random-weight twins and sizes
# ----------------------------------------------------------------------------------------------

def twin_config(spec: ModelSpec, **overrides):
    """A transformers config with the real architecture of `spec` (overrides shrink it for tests)."""
    from transformers import AutoConfig
    arch = dict(spec.arch)
    arch.update(overrides)
    if spec.family == "gemma3":
        arch.setdefault("layer_types", None)
    return AutoConfig.for_model(FAMILY_MODEL_TYPE[spec.family], **arch)


def build_twin(spec: ModelSpec, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
               seed: int = 0, **overrides):
    """Random-weight model with `spec`'s architecture, built straight on `device` in `dtype`."""
    from transformers import AutoModelForCausalLM
    config = twin_config(spec, **overrides)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


def count_parameters(model: torch.nn.Module) -> int:
    """Unique parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of parameters + buffers as stored (int8/int4 weights count their packed size)."""
    tensors = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def kv_cache_bytes_per_token(config, dtype: torch.dtype) -> int:
    """Bytes one token adds to the KV cache: 2 (K and V) x layers x kv_heads x head_dim x bytes."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    bytes_per = torch.tensor([], dtype=dtype).element_size()
    return 2 * config.num_hidden_layers * kv_heads * head_dim * bytes_per


def estimate_memory_bytes(spec: ModelSpec, dtype: torch.dtype, quantize: str = "none",
                          context_tokens: int = 2048) -> int:
    """Rough resident size: weights at the dtype/quantization plus a KV cache of `context_tokens`."""
    bits = {"none": torch.tensor([], dtype=dtype).element_size() * 8, "int8": 8, "int4": 4.5}[quantize]
    return int(spec.params * bits / 8 + kv_cache_bytes_per_token(twin_config(spec), dtype) * context_tokens)


# ----------------------------------------------------------------------------------------------
# Peak memory (shared by the benchmark and the fine-tuning demo)
# ----------------------------------------------------------------------------------------------

RSS_SAMPLE_S = 0.005  # seconds between RSS samples; short enough to catch a generate() peak


def process_rss() -> int:
    import psutil
    return psutil.Process().memory_info().rss


def peak_memory_bytes(device: torch.device) -> int:
    """The process's peak so far: allocated GPU memory on CUDA (since the last reset), driver memory on
    MPS, peak RSS on CPU (every loaded model together)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    if device.type == "mps":
        return torch.mps.driver_allocated_memory()
    try:
        import resource
    except ImportError:  # Windows: no peak figure, the current RSS is the closest
        return process_rss()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss * (1 if sys.platform == "darwin" else 1024)


class PeakMemory:
    """Peak memory during a `with` block. CPU: process RSS sampled every `interval` seconds in a
    background thread (minus `baseline_rss`, taken before the model was loaded); CUDA: max
    allocated/reserved after a reset; MPS: current and driver-allocated memory sampled the same way."""

    def __init__(self, device: torch.device, baseline_rss: int = 0, interval: float = RSS_SAMPLE_S):
        self.device, self.baseline_rss, self.interval = device, baseline_rss, interval
        self.peak_rss = self.peak_mps = self.peak_mps_driver = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_rss = max(self.peak_rss, process_rss())
            if self.device.type == "mps":
                self.peak_mps = max(self.peak_mps, torch.mps.current_allocated_memory())
                self.peak_mps_driver = max(self.peak_mps_driver, torch.mps.driver_allocated_memory())
            self._stop.wait(self.interval)

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak_rss = max(self.peak_rss, process_rss())
        return False

    def report(self) -> dict:
        """Peaks in bytes; `peak_bytes` is the figure to show for this device."""
        sampler = f"{self.interval * 1000:g} ms sampler"
        out = {"method": {"cpu": f"peak RSS ({sampler}) minus pre-load baseline",
                          "cuda": "torch.cuda.max_memory_allocated / max_memory_reserved after reset",
                          "mps": f"peak torch.mps current / driver allocated ({sampler})"}[self.device.type],
               "peak_rss_bytes": self.peak_rss, "baseline_rss_bytes": self.baseline_rss,
               "peak_rss_above_baseline_bytes": self.peak_rss - self.baseline_rss}
        if self.device.type == "cuda":
            out["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated(self.device)
            out["cuda_max_reserved_bytes"] = torch.cuda.max_memory_reserved(self.device)
            out["peak_bytes"] = out["cuda_max_allocated_bytes"]
        elif self.device.type == "mps":
            out.update(mps_current_allocated_bytes=self.peak_mps, mps_driver_allocated_bytes=self.peak_mps_driver,
                       peak_bytes=self.peak_mps)
        else:
            out["peak_bytes"] = out["peak_rss_above_baseline_bytes"]
        return out


# ----------------------------------------------------------------------------------------------
# Error translation
# ----------------------------------------------------------------------------------------------

_NETWORK_ERRORS = ("ConnectError", "ConnectionError", "ConnectTimeout", "TimeoutException",
                   "NetworkError", "ProxyError", "ReadTimeout", "OfflineModeIsEnabled",
                   "LocalEntryNotFoundError", "NewConnectionError", "MaxRetryError")


def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _names(exc: BaseException) -> set[str]:
    return {cls.__name__ for e in _chain(exc) for cls in type(e).__mro__}


def explain_error(exc: BaseException, model: str = "the model", device: torch.device | None = None) -> str | None:
    """One actionable line for hub, network, file and memory failures; None if not recognised."""
    names = _names(exc)
    text = " ".join(str(e) for e in _chain(exc))
    repo = f"https://huggingface.co/{model}" if "/" in model else "the model's Hugging Face page"
    gated = (f"{model} is gated: accept its license at {repo} (logged in), then run `hf auth login` "
             "or set HF_TOKEN to a token with read access.")
    if "GatedRepoError" in names:
        return gated
    if "RepositoryNotFoundError" in names:
        return (f"{model}: no such repository on the Hugging Face Hub (or it is private): check the id, "
                "or run `python download_models.py --list`.")
    if re.search(r"\bgated\b|\b403\b", text):
        return gated
    if re.search(r"\b401\b|Unauthorized|invalid (user )?token", text, re.I):
        return (f"the Hub refused the access token for {model} (401): run `hf auth login` again or set "
                "a valid HF_TOKEN.")
    if "RevisionNotFoundError" in names:
        return f"{model}: that revision does not exist on the Hub: check --revision."
    if names & set(_NETWORK_ERRORS) or re.search(r"couldn't connect|Name or service not known|offline mode",
                                                 text, re.I):
        return (f"cannot reach the Hugging Face Hub and {model} is not in the local cache: connect to the "
                "internet, pass a local model directory or .gguf file, or download it first "
                "(`python download_models.py --models ...`) and run with HF_HUB_OFFLINE=1.")
    if ("OutOfMemoryError" in names or isinstance(exc, MemoryError)
            or re.search(r"out of memory|CUDA error: out of memory|MPS backend out of memory", text, re.I)):
        where = f" on {device}" if device is not None else ""
        return (f"out of memory loading or running {model}{where}: try --quantize int4, a smaller model "
                "(`python download_models.py --list`), a shorter prompt/--max-new-tokens, or --device cpu.")
    if "SafetensorsError" in names or "HeaderTooLarge" in text or "invalid load key" in text:
        return f"{model}: a weight file is corrupt or truncated: delete it and download again (--verify)."
    if isinstance(exc, OSError) and re.search(r"does not appear to have a file named|not a valid|"
                                              r"Can't load|Unrecognized model", text):
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return f"{model}: cannot load from this location ({first[:200]}): point to a model directory with config.json and weights."
    if "trust_remote_code" in text:
        return (f"{model} needs custom code from its repository: review it, then pass --trust-remote-code "
                "if you trust it.")
    return None


class translated_errors:
    """Context manager turning recognised load/run failures into a UserError with one line. With
    `gguf` set, the errors a malformed GGUF file raises in the reader (struct.error, ValueError, …)
    are reported as a broken file."""

    def __init__(self, model: str = "the model", device: torch.device | None = None, gguf: str | None = None):
        self.model, self.device, self.gguf = model, device, gguf

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc is None or isinstance(exc, (UserError, KeyboardInterrupt)):
            return False
        if self.gguf and isinstance(exc, (struct.error, ValueError, KeyError, IndexError, EOFError)):
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
            raise UserError(f"{self.gguf}: not a readable GGUF file ({first}): it is corrupt, truncated or of an "
                            "unsupported version; download it again (download_models.py --gguf ... --verify).") from exc
        message = explain_error(exc, self.model, self.device)
        if message is None:
            return False
        raise UserError(message) from exc


def run_cli(main, argv=None) -> None:
    """Run a script's `main(argv)`; print UserError (and recognised failures) as one line, exit 2."""
    try:
        code = main(argv)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("\ninterrupted: results finished so far are saved.", file=sys.stderr)
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001  a known failure still deserves one line, not a traceback
        message = explain_error(exc)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
    sys.exit(code or 0)


# ----------------------------------------------------------------------------------------------
# Shared command-line options (each default lives here once)
# ----------------------------------------------------------------------------------------------

DEFAULT_SEED = 0
DEFAULT_OUTPUT_DIR = "results"


def require_at_least_one(parser, args, names) -> None:
    """parser.error (one line, exit 2) for any of the integer options `names` given below 1 (None = unset)."""
    for name in names:
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1 (got {value})")


def add_common_args(parser, *, multi: bool = False, default_models: tuple[str, ...] = DEFAULT_MODELS,
                    default_model: str | None = "smollm2-135m") -> None:
    """--model/--models, --device, --dtype, --quantize, --seed, --output-dir, --revision,
    --cache-dir, --trust-remote-code: spelled and validated the same way in every script."""
    if multi:
        parser.add_argument("--models", nargs="+", default=list(default_models), metavar="MODEL",
                            help="registry keys/aliases, Hugging Face ids, local dirs or .gguf files "
                                 f"(default: {' '.join(default_models)})")
    elif default_model is not None:
        parser.add_argument("--model", default=default_model,
                            help="registry key/alias, Hugging Face id, local dir or .gguf file "
                                 f"(default: {default_model})")
    parser.add_argument("--device", default="auto", choices=DEVICES, help="default: auto (cuda > mps > cpu)")
    parser.add_argument("--dtype", default="auto", choices=list(DTYPES),
                        help="default: auto (bf16/fp16 on GPU, fp32 on CPUs without native bf16)")
    parser.add_argument("--quantize", default="none", choices=QUANTIZATIONS,
                        help="bitsandbytes weight quantization (default: none)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help=f"default: {DEFAULT_SEED}")
    parser.add_argument("--output-dir", default=DEFAULT_OUTPUT_DIR, help=f"default: {DEFAULT_OUTPUT_DIR}/")
    parser.add_argument("--revision", default=None, help="hub branch, tag or commit (default: main)")
    parser.add_argument("--cache-dir", default=None, help="hub cache directory (default: HF_HOME)")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="run Python code shipped with a model repository (off by default)")


def load_from_args(args, name: str | None = None, quantize: str | None = None) -> Loaded:
    """`load` with the common options of `add_common_args`."""
    return load(name if name is not None else args.model, device=args.device, dtype=args.dtype,
                quantize=quantize if quantize is not None else args.quantize, revision=args.revision,
                cache_dir=args.cache_dir, trust_remote_code=args.trust_remote_code)


def spec_of(model_or_name) -> ModelSpec | None:
    """Registry entry for a Loaded, Resolved or name, if it has one."""
    if isinstance(model_or_name, Loaded):
        return model_or_name.resolved.spec
    if isinstance(model_or_name, Resolved):
        return model_or_name.spec
    return find_spec(str(model_or_name))


def spec_as_dict(spec: ModelSpec) -> dict:
    return dataclasses.asdict(spec)

