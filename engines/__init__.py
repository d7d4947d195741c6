"""The engine layer: one small interface to run a model, whatever runs it.

    python -c "import engines; e = engines.load('../shared/models/SmolLM2-135M-Instruct.Q4_1.gguf'); print(e.context())"
    python -c "import engines; print(engines.available())"
    python -c "import engines; e = engines.load('smollm2-135m', engine='transformers'); print(e.chat_ids([{'role': 'user', 'content': 'hi'}]))"

Like lm-evaluation-harness's model interface (`loglikelihood`, `generate_until`, one class per backend,
registered by name), every script talks to an `Engine` and never asks which one it has:

    load / context()              where the model came from and how it runs (recorded with every result)
    encode / decode / chat_prompt the tokenizer and chat template
    begin(ids) / advance(token)   a prefill, then one decode step at a time, each returning next-token logits
    prefill(ids)                  one timed forward pass over a fresh context (speed benchmarks)
    next_token_logprobs           log-probabilities of a few candidate tokens after each context (MMLU letters)
    loglikelihood                 summed log-probabilities of continuations (multi-token answers)
    generate                      greedy batched generation with stop strings (HumanEval)

`stream()` below is the one decode loop both engines share: it samples from the engine's logits and
yields a small timing record per token, so a chat footer and a tg128 figure are measured the same way.

Adding an engine (MLX on Apple, vLLM on multi-GPU machines) is one new module with an `Engine` subclass
plus a line in ENGINES; docs/architecture.md lists what such an engine must provide.
"""

from __future__ import annotations

import importlib
import importlib.util
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

import torch

import models

# name -> (module, class). Modules are imported only when their engine is used, so a missing optional
# package (llama-cpp-python) costs nothing until someone asks for that engine.
ENGINES: dict[str, tuple[str, str]] = {
    "transformers": ("engines.hf", "TransformersEngine"),
    "llama.cpp": ("engines.llamacpp", "LlamaCppEngine"),
}
ENGINE_PACKAGES = {"transformers": "transformers", "llama.cpp": "llama_cpp"}
INSTALL_HINT = {
    "transformers": "pip install -r requirements.txt",
    "llama.cpp": "pip install -r requirements-llamacpp.txt (builds llama-cpp-python, about 7 minutes; "
                 "README: Engines)",
}


@dataclass
class Sampling:
    """How the next token is chosen: greedy at temperature 0, else nucleus sampling."""

    temperature: float = 0.0
    top_p: float = 1.0


@dataclass
class Step:
    """One decoded token and when it was known (perf_counter seconds, device synchronised)."""

    token: int
    time: float


class Engine(ABC):
    """A loaded model behind one interface. Subclasses set the attributes below in __init__."""

    name: ClassVar[str]  # "transformers", "llama.cpp"

    resolved: models.Resolved
    load_seconds: float
    device: torch.device  # where logits live; sampling runs there
    vocab_size: int  # rows of the logits
    context_length: int  # positions the model can attend to
    eos_ids: set[int]  # ids that end a reply (EOS and end-of-turn tokens)
    special_ids: set[int]  # ids a random benchmark prompt must avoid
    bos_text: str | None  # the BOS string, to tell whether a text already starts with it
    is_base_model: bool  # no chat template of its own: the plain User:/Assistant: fallback is used

    @property
    def label(self) -> str:
        return self.resolved.label

    @property
    def spec(self) -> models.ModelSpec | None:
        """The registry entry, also for a local directory or GGUF file named after a registry model."""
        return self.resolved.spec or models.find_spec(self.resolved.gguf_file or self.resolved.path)

    # --- identity ---------------------------------------------------------------------------------

    @abstractmethod
    def context(self) -> dict:
        """Provenance for every result: model, source, engine and its version, weights format and
        quantization, device, dtype, revision, load seconds, threads."""

    @abstractmethod
    def weight_bytes(self) -> int:
        """Bytes the weights take as loaded (quantized weights count their packed size)."""

    @abstractmethod
    def parameter_count(self) -> int:
        """Parameters of the loaded model (tied embeddings once)."""

    @abstractmethod
    def kv_bytes_per_token(self) -> int:
        """Bytes one token adds to the KV cache."""

    def memory_details(self) -> dict:
        """Engine-reported sizes beside the sampled peak (llama.cpp: context and KV cache)."""
        return {}

    # --- tokenizer and chat template --------------------------------------------------------------

    @abstractmethod
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids; add_special_tokens adds BOS where the model's tokenizer does by default."""

    @abstractmethod
    def decode(self, ids: list[int]) -> str:
        """Text of `ids` without special tokens."""

    @abstractmethod
    def chat_prompt(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The conversation rendered through the model's chat template (or the fallback)."""

    def chat_ids(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of the rendered conversation; the template carries its own BOS, as in
        transformers' apply_chat_template(tokenize=True)."""
        return self.encode(self.chat_prompt(messages, add_generation_prompt), add_special_tokens=False)

    @property
    def stop_strings(self) -> list[str]:
        """Extra stops: the next 'User:' turn for base models on the fallback template."""
        return [models.FALLBACK_STOP] if self.is_base_model else []

    # --- compute ----------------------------------------------------------------------------------

    @abstractmethod
    def begin(self, ids: list[int]) -> torch.Tensor:
        """Start a fresh sequence: run `ids`, keep their KV cache, return next-token logits (vocab,)."""

    @abstractmethod
    def advance(self, token: int) -> torch.Tensor:
        """Append one token to the current sequence; next-token logits (vocab,)."""

    def prefill(self, ids: list[int]) -> None:
        """One forward pass over `ids` in a fresh context, for timing; finishes before returning."""
        self.begin(ids)
        self.synchronize()

    def synchronize(self) -> None:
        """Wait for queued work so a clock read measures finished work."""

    @abstractmethod
    def next_token_logprobs(self, contexts: list[list[int]], candidates: list[list[int]],
                            batch_size: int) -> list[list[float]]:
        """For each context, log P(token | context) of each of its candidate tokens (fp32 log-softmax
        over the whole vocabulary). Contexts sharing a long prefix may reuse its KV cache."""

    @abstractmethod
    def loglikelihood(self, requests: list[tuple[list[int], list[int]]], batch_size: int) -> list[float]:
        """Summed log P(continuation | context) for each (context ids, continuation ids)."""

    def generate(self, prompts: list[list[int]], max_new_tokens: int, stops: list[str],
                 batch_size: int) -> list[list[int]]:
        """Greedy continuations of each prompt, each ending at EOS, a stop string or the length limit
        (the stop string's tokens may be included: callers cut the text at the stop). This default
        runs the prompts one at a time through `stream`; engines that can batch override it."""
        return [generate_until(self, ids, max_new_tokens, stops) for ids in prompts]

    def close(self) -> None:
        """Free the model's memory now rather than at garbage collection."""


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------

def available(name: str) -> bool:
    """True when the package behind engine `name` can be imported."""
    return importlib.util.find_spec(ENGINE_PACKAGES[name]) is not None


def default_engine(resolved: models.Resolved) -> str:
    """llama.cpp for a .gguf file when llama-cpp-python is installed (GGUF is its native format: the
    weights stay quantized, load in a fraction of a second and decode several times faster on a CPU
    than de-quantized in transformers); transformers for everything else."""
    if resolved.gguf_file and available("llama.cpp"):
        return "llama.cpp"
    return "transformers"


def check_engine(name: str, resolved: models.Resolved | None = None) -> None:
    """Raise a one-line UserError when engine `name` is unknown, not installed, or cannot run `resolved`.

    Raises:
        UserError: with the fix (the install command, or the kind of file the engine needs).
    """
    if name not in ENGINES:
        raise models.UserError(f"unknown engine '{name}': choose one of {', '.join(ENGINES)}.")
    if not available(name):
        raise models.UserError(f"--engine {name} needs the {ENGINE_PACKAGES[name]} package: {INSTALL_HINT[name]}.")
    if name == "llama.cpp" and resolved is not None and not resolved.gguf_file:
        raise models.UserError(f"--engine llama.cpp runs GGUF files and {resolved.name} is not one: pass a .gguf "
                               "file, or fetch one with `python download_models.py --models "
                               f"{resolved.spec.key if resolved.spec else '...'} --gguf Q4_K_M`.")


def warm_imports(name: str) -> None:
    """Import engine `name`'s libraries now, so that their memory is not charged to the first model
    measured (transformers alone adds over 100 MB of RSS)."""
    engine_class(name)
    if name == "transformers":
        from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401  lazy modules, loaded here


def engine_class(name: str) -> type[Engine]:
    module, cls = ENGINES[name]
    return getattr(importlib.import_module(module), cls)


def load(name: str | models.Resolved, *, engine: str | None = None, device: str = "auto", dtype: str = "auto",
         quantize: str = "none", revision: str | None = None, cache_dir: str | None = None,
         trust_remote_code: bool = False, threads: int | None = None) -> Engine:
    """Resolve `name` and load it on `engine` (default: `default_engine`).

    Args:
        name: anything models.resolve accepts (registry key, hub id, local dir, .gguf file).
        engine: "transformers", "llama.cpp" or None.
        threads: CPU threads (llama.cpp: default every core; transformers: sets torch.set_num_threads).
    Returns:
        A loaded Engine.
    Raises:
        UserError: unknown model or engine, a missing package, a model the engine cannot run, and every
            load failure models.load translates.
    """
    resolved = name if isinstance(name, models.Resolved) else models.resolve(name)
    engine = engine or default_engine(resolved)
    check_engine(engine, resolved)
    return engine_class(engine).load(resolved, device=device, dtype=dtype, quantize=quantize, revision=revision,
                                     cache_dir=cache_dir, trust_remote_code=trust_remote_code, threads=threads)


def load_from_args(args, name: str | None = None, engine: str | None = None, quantize: str | None = None) -> Engine:
    """`load` with the common options of models.add_common_args (and --engine/--threads where a script has them)."""
    return load(name if name is not None else args.model, engine=engine or getattr(args, "engine", None),
                device=args.device, dtype=args.dtype, quantize=quantize if quantize is not None else args.quantize,
                revision=args.revision, cache_dir=args.cache_dir, trust_remote_code=args.trust_remote_code,
                threads=getattr(args, "threads", None))


def add_engine_args(parser, multi: bool = False) -> None:
    """--engine (one, or several for one row each) and --threads, spelled the same in every script."""
    choices = list(ENGINES)
    if multi:
        parser.add_argument("--engine", nargs="+", default=None, choices=choices, metavar="ENGINE",
                            help="one or more of transformers llama.cpp: one row per engine (default: llama.cpp "
                                 "for .gguf files when llama-cpp-python is installed, else transformers)")
    else:
        parser.add_argument("--engine", default=None, choices=choices,
                            help="transformers or llama.cpp (default: llama.cpp for .gguf files when "
                                 "llama-cpp-python is installed, else transformers)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for either engine, so both can be compared on the same count (default: "
                             "every core for llama.cpp, torch's own setting for transformers)")


# ----------------------------------------------------------------------------------------------
# The shared decode loop
# ----------------------------------------------------------------------------------------------

def sample_next(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None = None) -> int:
    """Next token id from logits (vocab,): argmax at temperature 0, else nucleus sampling (top_p)."""
    if sampling.temperature <= 0:
        return int(logits.argmax().item())  # .item() waits for the device: the clock reads finished work
    probs = torch.softmax(logits.float() / sampling.temperature, dim=-1)
    if sampling.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # keep the smallest prefix whose mass reaches top_p: drop a token once the mass before it does
        sorted_probs[(sorted_probs.cumsum(dim=-1) - sorted_probs) >= sampling.top_p] = 0.0
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator).item())


def stream(engine: Engine, prompt_ids: list[int], max_new_tokens: int, sampling: Sampling = Sampling(), *,
           stop_at_eos: bool = True, generator: torch.Generator | None = None) -> Iterator[Step]:
    """Prefill `prompt_ids`, then decode one token at a time, yielding each token with its time.

    With stop_at_eos the EOS/end-of-turn token is yielded and ends the stream; without it (forced
    length, as llama-bench's tg) exactly max_new_tokens tokens come out.
    """
    logits = engine.begin(prompt_ids)
    for i in range(max_new_tokens):
        token = sample_next(logits, sampling, generator)
        yield Step(token, time.perf_counter())
        if (stop_at_eos and token in engine.eos_ids) or i == max_new_tokens - 1:
            return
        logits = engine.advance(token)


def generate_until(engine: Engine, prompt_ids: list[int], max_new_tokens: int, stops: list[str],
                 sampling: Sampling = Sampling(), generator: torch.Generator | None = None) -> list[int]:
    """Tokens after `prompt_ids` (greedy unless `sampling` says otherwise) until EOS (not kept), a stop
    string in the text, or the limit."""
    out: list[int] = []
    for step in stream(engine, prompt_ids, max_new_tokens, sampling, generator=generator):
        if step.token in engine.eos_ids:
            break
        out.append(step.token)
        if stops and any(s in engine.decode(out[-64:]) for s in stops):
            break
    return out
