"""The llama.cpp engine: GGUF files through llama-cpp-python, the runtime inside Ollama and LM Studio.

    python -c "import engines; e = engines.load('../shared/models/SmolLM2-135M-Instruct.Q4_1.gguf', engine='llama.cpp'); print(e.context())"
    python benchmark.py --models ../shared/models/SmolLM2-135M-Instruct.Q4_1.gguf --engine llama.cpp transformers

The weights stay as quantized in the file (Q4_1, Q4_K_M, ...) and llama.cpp computes with its own kernels;
the KV cache is f16. Tokenization and the chat template come from the GGUF's own metadata, as llama.cpp
uses them. One sequence per context: `next_token_logprobs` walks the contexts in order and keeps the
longest prefix already in the KV cache (MMLU's few-shot preamble is computed once per subject), and
`generate` runs prompts one after another.
"""

from __future__ import annotations

import atexit
import logging
import os
import time
import weakref

import numpy as np
import torch

import models
from engines import Engine

DEFAULT_N_CTX = 4096  # KV cells allocated (at most the trained context): 5-shot MMLU prompts reach ~2,200 tokens
DEFAULT_N_BATCH = 512  # tokens per llama_decode call, as llama-bench's pp512 and n_ubatch
KV_BYTES = 2  # llama.cpp's default KV cache type is f16
_OPEN: weakref.WeakSet = weakref.WeakSet()  # closed before interpreter exit, when llama-cpp-python's own
# __del__ would run against a half-torn-down module and print a traceback


@atexit.register
def _close_all() -> None:
    for engine in list(_OPEN):
        engine.close()


def cpu_threads() -> int:
    """Cores this process may run on (llama-cpp-python's own default is half of them)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def trained_context(path: str) -> int:
    """The context length a GGUF model was trained for, from a model-only load (the weights are
    memory-mapped, not read, so this costs a small fraction of a second).

    Raises:
        ValueError: the file is not a loadable GGUF model.
    """
    import llama_cpp
    model = llama_cpp.llama_model_load_from_file(path.encode(), llama_cpp.llama_model_default_params())
    if not model:
        raise ValueError(f"Failed to load model from file: {path}")
    try:
        return llama_cpp.llama_model_n_ctx_train(model)
    finally:
        llama_cpp.llama_model_free(model)


def file_type_name(value: str | None) -> str:
    """GGUF general.file_type (an enum number) as a quant name: "3" -> "Q4_1"."""
    import gguf
    try:
        return gguf.LlamaFileType(int(value)).name.removeprefix("MOSTLY_").removeprefix("ALL_")
    except (TypeError, ValueError):
        return "unknown"


class LlamaCppEngine(Engine):
    name = "llama.cpp"

    def __init__(self, llm, resolved: models.Resolved, load_seconds: float, threads: int, gpu_layers: int):
        import llama_cpp
        self._lib, self.llm = llama_cpp, llm
        self.resolved, self.load_seconds = resolved, load_seconds
        self.threads, self.gpu_layers = threads, gpu_layers
        self.device = torch.device("cpu")  # logits come back to host memory; sampling runs there
        self.vocab_size = llm.n_vocab()
        self.context_length = llm.n_ctx()
        self.metadata = dict(llm.metadata)
        self.quant = file_type_name(self.metadata.get("general.file_type"))
        vocab = llama_cpp.llama_model_get_vocab(llm.model)
        self.eos_ids = {t for t in range(self.vocab_size) if llama_cpp.llama_vocab_is_eog(vocab, t)}
        self.special_ids = {t for t in range(self.vocab_size)
                            if llama_cpp.llama_vocab_get_attr(vocab, t) & llama_cpp.LLAMA_TOKEN_ATTR_CONTROL}
        self.bos_text = self._piece(llm.token_bos()) if llm.token_bos() >= 0 else None
        template = self.metadata.get("tokenizer.chat_template")
        self.is_base_model = not template
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter
        eos = self._piece(llm.token_eos()) if llm.token_eos() >= 0 else ""
        self._formatter = Jinja2ChatFormatter(template or models.FALLBACK_CHAT_TEMPLATE, eos, self.bos_text or "")
        _OPEN.add(self)

    @classmethod
    def load(cls, resolved: models.Resolved, *, device: str, dtype: str, quantize: str, revision: str | None,
             cache_dir: str | None, trust_remote_code: bool, threads: int | None,
             n_ctx: int = DEFAULT_N_CTX) -> LlamaCppEngine:
        """Open the GGUF file; layers go to the GPU when asked for (or on 'auto') and this build can.

        `dtype` does not apply: the file fixes the weight types (its quantization is recorded as the
        row's dtype), so a run that sets --dtype for its transformers rows can still have llama.cpp rows.

        Raises:
            UserError: --quantize (bitsandbytes; pick a quantized GGUF instead), a GPU this build
                cannot use, a missing or corrupt file.
        """
        import llama_cpp
        # llama.cpp's own log lines go to stderr through llama-cpp-python's logger: keep them out of the
        # terminal (a failure becomes one UserError line below); BILLION_LLM_DEBUG=1 shows them
        logging.getLogger("llama-cpp-python").setLevel(logging.DEBUG if os.environ.get("BILLION_LLM_DEBUG")
                                                         else logging.CRITICAL + 1)
        if quantize != "none":
            raise models.UserError(f"--quantize {quantize} is bitsandbytes, for --engine transformers; with llama.cpp "
                                   "pick a quantized GGUF file instead (download_models.py --gguf Q4_K_M).")
        offload = llama_cpp.llama_supports_gpu_offload()
        if device in ("cuda", "mps") and not offload:
            raise models.UserError(f"--device {device}: this llama-cpp-python build has no GPU offload; reinstall "
                                   "it with CMAKE_ARGS=\"-DGGML_CUDA=on\" (or -DGGML_METAL=on), or use --device cpu.")
        gpu_layers = -1 if offload and device != "cpu" else 0
        threads = threads or cpu_threads()
        path = os.path.join(resolved.path, resolved.gguf_file)
        start = time.perf_counter()
        try:
            n_ctx = min(n_ctx, trained_context(path))
            llm = llama_cpp.Llama(model_path=path, n_ctx=n_ctx, n_batch=DEFAULT_N_BATCH, n_ubatch=DEFAULT_N_BATCH,
                                  n_threads=threads, n_threads_batch=threads, n_gpu_layers=gpu_layers,
                                  logits_all=False, verbose=bool(os.environ.get("BILLION_LLM_DEBUG")))
        except (ValueError, RuntimeError) as exc:
            raise models.UserError(f"{resolved.label}: llama.cpp cannot load {path} ({exc}): check that it is a "
                                   "complete GGUF file (download it again, or --verify).") from exc
        return cls(llm, resolved, time.perf_counter() - start, threads, gpu_layers)

    # --- identity ---------------------------------------------------------------------------------

    def context(self) -> dict:
        from importlib.metadata import version
        spec = self.spec
        path = os.path.join(self.resolved.path, self.resolved.gguf_file)
        device = "cuda" if self.gpu_layers else "cpu"
        return {
            "model": self.label, "source": self.resolved.source, "path": self.resolved.path,
            "hf_id": spec.hf_id if spec else None, "gguf_file": self.resolved.gguf_file,
            "revision": "sha256:" + models.file_sha256(path)[:16],
            "engine": self.name, "engine_version": f"llama-cpp-python {version('llama_cpp_python')}",
            "engine_build": self._lib.llama_print_system_info().decode().strip(),
            "weights": f"GGUF {self.quant}", "device": device,
            "device_name": models.cpu_model_name() if device == "cpu" else "GPU (llama.cpp offload)",
            "dtype": self.quant, "quantize": "none", "load_seconds": round(self.load_seconds, 3),
            "threads": self.threads, "gpu_layers": self.gpu_layers,
        }

    def weight_bytes(self) -> int:
        return int(self._lib.llama_model_size(self.llm.model))

    def parameter_count(self) -> int:
        return int(self._lib.llama_model_n_params(self.llm.model))

    def kv_bytes_per_token(self) -> int:
        """2 (K and V) x layers x KV heads x head size x 2 bytes (f16), sizes from the GGUF metadata."""
        lib, model = self._lib, self.llm.model
        arch = self.metadata.get("general.architecture", "")
        heads, kv_heads = lib.llama_model_n_head(model), lib.llama_model_n_head_kv(model)
        head_k = int(self.metadata.get(f"{arch}.attention.key_length") or lib.llama_model_n_embd(model) // heads)
        head_v = int(self.metadata.get(f"{arch}.attention.value_length") or head_k)
        return lib.llama_model_n_layer(model) * kv_heads * (head_k + head_v) * KV_BYTES

    def memory_details(self) -> dict:
        return {"llama_cpp_context_tokens": self.context_length,
                "llama_cpp_kv_cache_bytes": self.context_length * self.kv_bytes_per_token(),
                "llama_cpp_kv_type": "f16", "llama_cpp_n_batch": DEFAULT_N_BATCH,
                "llama_cpp_weights_mmap": True}

    # --- tokenizer --------------------------------------------------------------------------------

    def _piece(self, token: int) -> str:
        return self.llm.detokenize([token], special=True).decode("utf-8", errors="replace")

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        # special=True: "<|im_start|>" in a rendered chat template is one control token, as in transformers
        return self.llm.tokenize(text.encode("utf-8"), add_bos=add_special_tokens, special=True)

    def decode(self, ids: list[int]) -> str:
        return self.llm.detokenize(list(ids), special=False).decode("utf-8", errors="replace")

    def chat_prompt(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        self._formatter.add_generation_prompt = add_generation_prompt
        return self._formatter(messages=messages).prompt

    # --- compute ----------------------------------------------------------------------------------

    def _logits(self) -> np.ndarray:
        """Next-token logits after the last evaluated token (a copy: llama.cpp reuses the buffer)."""
        ptr = self._lib.llama_get_logits_ith(self.llm.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.vocab_size,)).copy()

    def _eval_from(self, ids: list[int]) -> None:
        """Evaluate `ids` as the whole sequence, keeping the longest prefix already in the KV cache
        (at least the last token is run, so its logits are fresh)."""
        held = self.llm.input_ids[:self.llm.n_tokens].tolist()
        keep = next((i for i, (a, b) in enumerate(zip(held, ids)) if a != b), min(len(held), len(ids)))
        keep = min(keep, len(ids) - 1)
        if len(ids) > self.context_length:
            raise models.UserError(f"{len(ids)} tokens do not fit llama.cpp's context of {self.context_length}.")
        self.llm.n_tokens = keep  # eval() drops every KV cell from n_tokens on
        self.llm.eval(ids[keep:])

    def begin(self, ids: list[int]) -> torch.Tensor:
        self.llm.reset()
        self.llm.eval(ids)
        return torch.from_numpy(self._logits())

    def advance(self, token: int) -> torch.Tensor:
        self.llm.eval([token])
        return torch.from_numpy(self._logits())

    def prefill(self, ids: list[int]) -> None:
        self.llm.reset()
        self.llm.eval(ids)
        self.synchronize()

    def synchronize(self) -> None:
        self._lib.llama_synchronize(self.llm.ctx)

    def next_token_logprobs(self, contexts: list[list[int]], candidates: list[list[int]],
                            batch_size: int) -> list[list[float]]:
        out: list[list[float] | None] = [None] * len(contexts)
        for i in sorted(range(len(contexts)), key=lambda i: contexts[i]):  # neighbours share the most
            self._eval_from(contexts[i])
            logprobs = log_softmax(self._logits())
            out[i] = [float(logprobs[c]) for c in candidates[i]]
        return out

    def loglikelihood(self, requests: list[tuple[list[int], list[int]]], batch_size: int) -> list[float]:
        out: list[float | None] = [None] * len(requests)
        for i in sorted(range(len(requests)), key=lambda i: requests[i][0]):
            context, continuation = requests[i]
            self._eval_from(context)
            total = 0.0
            for j, token in enumerate(continuation):
                total += float(log_softmax(self._logits())[token])
                if j < len(continuation) - 1:
                    self.llm.eval([token])
            out[i] = total
        return out

    def close(self) -> None:
        if self.llm is not None:
            self.llm.close()
            self.llm = None


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """fp64 log-softmax of a (vocab,) vector."""
    x = logits.astype(np.float64)
    top = x.max()
    return x - top - np.log(np.exp(x - top).sum())
