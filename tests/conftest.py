"""Offline fixtures: tiny random-weight models of each family with a locally trained tokenizer,
and the real SmolLM2-135M-Instruct from ../shared (converted from GGUF once per session).

Fixtures are session-scoped and live in pytest's temporary directories; nothing is written into the
project's results/ or docs/.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

import models

ROOT = Path(__file__).resolve().parents[1]

# The machine must not decide a test's outcome: on CPUs with AMX/AVX512-BF16 `pick_dtype` would choose
# bf16, elsewhere fp32. Every test runs with the CPU default pinned (fp32 unless the person running the
# suite sets BILLION_LLM_CPU_BF16=1 to run it all under bf16); tests whose outcome could depend on the
# default use the `cpu_default_dtype` fixture and run under both.
os.environ.setdefault(models.CPU_BF16_ENV, "0")

SHARED = Path(os.environ.get("BILLION_LLM_SHARED", ROOT.parent / "shared"))
SMOLLM2_GGUF = SHARED / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
MMLU_DIR = SHARED / "data" / "mmlu"

# family -> (registry entry whose architecture is shrunk, instruct?, extra overrides)
TINY_FAMILIES = {
    "llama": ("tinyllama", True, {}),
    "gpt_neox": ("pythia-70m", False, {}),
    "stablelm": ("stablelm-1.6b", True, {"num_key_value_heads": 4}),
    "qwen2": ("qwen2.5-0.5b", True, {}),
    "gemma3": ("gemma3-1b", True, {"num_key_value_heads": 1, "head_dim": 16, "sliding_window": 16,
                                   "query_pre_attn_scalar": 16,
                                   "layer_types": ["sliding_attention", "full_attention"]}),
}
TINY_DIMS = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, max_position_embeddings=1024)

CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_WORDS = ("the a of to and in is that it for on with as was by at be this from are or not have which "
          "model token answer question capital france paris city river mountain water light energy "
          "force mass speed time number value function return list string print def class import "
          "system user assistant hello world good bad fast slow small large language learning "
          "data train test code python law religion policy chemistry physics algebra security").split()


def _corpus(n_lines: int = 1500) -> list[str]:
    """Deterministic text: prose, MMLU-style questions and Python, so common pieces get merges."""
    rng = random.Random(0)
    lines = []
    for i in range(n_lines):
        words = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(5, 14)))
        kind = i % 3
        if kind == 0:
            lines.append(words.capitalize() + ".")
        elif kind == 1:
            letter = "ABCD"[i % 4]
            lines.append(f"{words}?\nA. {rng.choice(_WORDS)}\nB. {rng.choice(_WORDS)}\nC. {rng.choice(_WORDS)}"
                         f"\nD. {rng.choice(_WORDS)}\nAnswer: {letter}\n\n")
        else:
            name = rng.choice(_WORDS)
            lines.append(f"def {name}(x, y):\n    \"\"\"{words}\"\"\"\n    return x + y * {i % 10}\n")
    return lines


def train_tokenizer(out_dir: Path, chat: bool) -> Path:
    """Train a byte-level BPE tokenizer (vocab 512) and save it as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers, trainers
    from tokenizers import models as tok_models
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(tok_models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>",
                                   eos_token="<|im_end|>" if chat else "<|endoftext|>",
                                   unk_token="<|endoftext|>")
    if chat:
        fast.chat_template = CHATML_TEMPLATE
    fast.save_pretrained(out_dir)
    return out_dir


def build_tiny_model(family: str, out_dir: Path, tokenizer_dir: Path, seed: int = 0, **overrides) -> Path:
    """Save a random-weight model of `family` (shrunk registry architecture) plus its tokenizer."""
    from transformers import AutoTokenizer
    key, _instruct, extra = TINY_FAMILIES[family]
    spec = models.REGISTRY[key]
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    dims = dict(TINY_DIMS, **extra, vocab_size=len(tok), rope_scaling=None,
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    if family == "gpt_neox":
        dims.pop("num_key_value_heads")
    dims.update(overrides)
    model = models.build_twin(spec, seed=seed, **dims)
    model.generation_config.pad_token_id = dims["pad_token_id"]
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for a test module: tiny models run fastest so, and on a busy 2-core
    machine two OpenMP threads thrash. Use with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=["fp32", "bf16"])
def cpu_default_dtype(request, monkeypatch) -> str:
    """Run a test once with each CPU default dtype, as an AMD EPYC (fp32) and an AMX Xeon (bf16)
    would choose it; yields the dtype name that `--dtype auto` now means on the CPU."""
    monkeypatch.setenv(models.CPU_BF16_ENV, "1" if request.param == "bf16" else "0")
    return request.param


@pytest.fixture(scope="session")
def tokenizer_dirs(tmp_path_factory) -> dict[str, Path]:
    """{'chat': ChatML tokenizer dir, 'base': no-template tokenizer dir}."""
    root = tmp_path_factory.mktemp("tokenizers")
    return {"chat": train_tokenizer(root / "chat", chat=True),
            "base": train_tokenizer(root / "base", chat=False)}


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, tokenizer_dirs) -> dict[str, Path]:
    """{family: directory} for llama, gpt_neox, stablelm, qwen2, gemma3 (gpt_neox is a base model)."""
    root = tmp_path_factory.mktemp("tiny-models")
    return {family: build_tiny_model(family, root / family,
                                     tokenizer_dirs["chat" if instruct else "base"])
            for family, (_key, instruct, _extra) in TINY_FAMILIES.items()}


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory, tokenizer_dirs):
    """Build extra tiny models: factory(family, seed=..., **config_overrides) -> directory.

    Models built with the same tokenizer can pair up, e.g. a 1-layer draft for a 2-layer target.
    """
    root = tmp_path_factory.mktemp("tiny-extra")
    counter = iter(range(10**6))

    def make(family: str = "llama", seed: int = 0, **overrides) -> Path:
        instruct = TINY_FAMILIES[family][1]
        return build_tiny_model(family, root / f"{family}-{next(counter)}",
                                tokenizer_dirs["chat" if instruct else "base"], seed=seed, **overrides)
    return make


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory, tiny_models) -> Path:
    """The tiny llama twin written as an F32 GGUF file: the same weights for both engines."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (requirements-llamacpp.txt)")
    from tests.tiny_gguf import write_llama_gguf
    return write_llama_gguf(tiny_models["llama"], tmp_path_factory.mktemp("tiny-gguf") / "tiny-llama.F32.gguf")


@pytest.fixture
def fake_rapl(tmp_path, monkeypatch) -> Path:
    """A fake powercap tree whose package counter runs at a constant 20 W, and EnergyMeter.detect
    pointed at it: the scripts' energy hooks measured end to end without hardware counters."""
    import time

    import energy
    zone = tmp_path / "powercap" / "intel-rapl:0"
    zone.mkdir(parents=True)
    (zone / "name").write_text("package-0\n")
    (zone / "max_energy_range_uj").write_text(f"{2**40}\n")
    (zone / "energy_uj").write_text("0\n")
    real_read = energy.read_int
    monkeypatch.setattr(energy, "read_int", lambda path: int(time.perf_counter() * 20e6) % 2**40
                        if path.name == "energy_uj" else real_read(path))
    detect = energy.EnergyMeter.detect.__func__
    monkeypatch.setattr(energy.EnergyMeter, "detect", classmethod(
        lambda cls, device="cpu", **kw: detect(cls, device, powercap_root=tmp_path / "powercap")))
    return tmp_path / "powercap"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"../shared is absent ({SHARED}): real-model fixtures are only in CI and dev checkouts")
    return SHARED


@pytest.fixture(scope="session")
def smollm2_gguf(shared_dir) -> Path:
    if not SMOLLM2_GGUF.is_file():
        pytest.skip(f"{SMOLLM2_GGUF} is absent")
    return SMOLLM2_GGUF


@pytest.fixture(scope="session")
def smollm2_loaded(smollm2_gguf):
    """The real SmolLM2-135M-Instruct, loaded from GGUF through models.load once (fp32, CPU)."""
    return models.load(str(smollm2_gguf), device="cpu", dtype="fp32")


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory, smollm2_loaded) -> Path:
    """The GGUF converted once to a safetensors directory, which scripts load in about a second."""
    out = tmp_path_factory.mktemp("smollm2-135m-instruct")
    smollm2_loaded.model.save_pretrained(out)
    smollm2_loaded.tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def mmlu_dir(shared_dir) -> Path:
    if not (MMLU_DIR / "test").is_dir():
        pytest.skip(f"{MMLU_DIR} is absent")
    return MMLU_DIR
