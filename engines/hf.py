"""The transformers engine: eager PyTorch models from the Hub, local directories or de-quantized GGUF.

    python -c "import engines; e = engines.load('smollm2-135m', engine='transformers'); print(e.context())"
    python -c "import engines; e = engines.load('../shared/models/SmolLM2-135M-Instruct.Q4_1.gguf', engine='transformers'); print(e.weight_bytes())"

Loading is models.load (device, dtype, bitsandbytes int8/int4, the fallback chat template); this module
adds the Engine operations on top: a KV-cached decode step, single-pass next-token scoring with a
shared-prefix cache, and left-padded batched generation.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch

import models
from engines import Engine

MIN_SHARED_PREFIX_TOKENS = 32  # shorter common prefixes are not worth a cache


@dataclass
class SharedPrefix:
    """KV cache of the tokens every context of a group starts with (description + few-shot examples)."""

    length: int
    cache: object  # transformers Cache for a batch of 1


def common_prefix_length(rows: list[list[int]]) -> int:
    """Tokens every row starts with, leaving each row at least one token of its own."""
    first = rows[0]
    length = min(len(r) for r in rows) - 1
    for r in rows[1:]:
        length = min(length, next((i for i, (a, b) in enumerate(zip(first, r)) if a != b), length))
    return max(length, 0)


def gguf_kept_packed(model) -> bool:
    """Whether transformers kept a GGUF file's quantized blocks (its GGUF quantizer with `kernels`
    installed) rather than de-quantizing every tensor, which it does without them."""
    quantizer = getattr(model, "hf_quantizer", None)
    config = getattr(quantizer, "quantization_config", None)
    return type(quantizer).__name__ == "GgufHfQuantizer" and getattr(config, "dequantize", True) is False


class TransformersEngine(Engine):
    name = "transformers"

    def __init__(self, loaded: models.Loaded):
        self.loaded = loaded
        self.model, self.tokenizer = loaded.model, loaded.tokenizer
        self.resolved, self.load_seconds, self.device = loaded.resolved, loaded.load_seconds, loaded.device
        self.vocab_size = self.model.config.get_text_config().vocab_size
        self.context_length = context_length(loaded)
        self.share_prefix = True  # reuse the KV cache of a prefix all scored contexts share (off: lm-eval's way)
        self._cache = None
        if self.tokenizer is None:  # a random-weight twin: speed and memory only, no text
            self.eos_ids, self.special_ids, self.bos_text, self.is_base_model = set(), set(), None, False
            return
        self.eos_ids = eos_token_ids(self.model, self.tokenizer)
        self.special_ids = set(getattr(self.tokenizer, "all_special_ids", []) or [])
        prefix_id = self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else self.tokenizer.eos_token_id
        self.bos_text = self.tokenizer.decode(prefix_id) if prefix_id is not None else None
        self.is_base_model = models.uses_fallback_template(self.tokenizer)

    @classmethod
    def twin(cls, spec: models.ModelSpec, device: str = "auto", dtype: str = "auto", seed: int = 0) -> TransformersEngine:
        """A random-weight twin of a registry architecture (no download, no tokenizer): for speed and
        memory before a multi-GB download. `load_seconds` is the time to build it on the device."""
        dev = models.pick_device(device)
        dt = models.pick_dtype(dev, dtype)
        start = time.perf_counter()
        model = models.build_twin(spec, dev, dt, seed=seed)
        models.synchronize(dev)
        resolved = models.Resolved(spec.key, "synthetic", spec.hf_id, spec=spec)
        return cls(models.Loaded(model, None, resolved, dev, dt, "none", time.perf_counter() - start))

    @classmethod
    def load(cls, resolved: models.Resolved, *, device: str, dtype: str, quantize: str, revision: str | None,
             cache_dir: str | None, trust_remote_code: bool, threads: int | None) -> TransformersEngine:
        if threads:  # torch's intra-op threads: process-wide, as llama.cpp's n_threads is per context
            torch.set_num_threads(threads)
        return cls(models.load(resolved, device=device, dtype=dtype, quantize=quantize, revision=revision,
                               cache_dir=cache_dir, trust_remote_code=trust_remote_code))

    # --- identity ---------------------------------------------------------------------------------

    def context(self) -> dict:
        import transformers
        out = self.loaded.context()
        weights = out["dtype"]
        if self.resolved.gguf_file:  # named from what loaded, not from the file type
            how = (f"kept packed (transformers' GGUF kernels, {out['dtype']} activations)"
                   if gguf_kept_packed(self.model) else f"de-quantized to {out['dtype']}")
            weights = f"GGUF {models.gguf_quant(self.resolved.gguf_file)} {how}"
        if self.loaded.quantize != "none":
            weights = {"int8": "int8 (bitsandbytes)", "int4": "int4 NF4 (bitsandbytes)"}[self.loaded.quantize]
        out.update(engine=self.name, engine_version=f"transformers {transformers.__version__}", weights=weights,
                   threads=torch.get_num_threads(), hf_id=self.spec.hf_id if self.spec else None)
        if self.resolved.source == "synthetic":
            out.update(weights="random-weight twin", build_seconds=out.pop("load_seconds"), load_seconds=None)
        return out

    def weight_bytes(self) -> int:
        return models.weight_bytes(self.model)

    def parameter_count(self) -> int:
        return models.count_parameters(self.model)

    def kv_bytes_per_token(self) -> int:
        return models.kv_cache_bytes_per_token(self.model.config.get_text_config(), self.model.dtype)

    # --- tokenizer --------------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def chat_prompt(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    # --- compute ----------------------------------------------------------------------------------

    @torch.inference_mode()
    def begin(self, ids: list[int]) -> torch.Tensor:
        out = self.model(input_ids=torch.tensor([ids], device=self.device), use_cache=True, logits_to_keep=1)
        self._cache = out.cache
        return out.logits[0, -1]

    @torch.inference_mode()
    def advance(self, token: int) -> torch.Tensor:
        out = self.model(input_ids=torch.tensor([[token]], device=self.device), cache=self._cache, use_cache=True)
        self._cache = out.cache
        return out.logits[0, -1]

    @torch.inference_mode()
    def prefill(self, ids: list[int]) -> None:
        """Logits of the last position only (as generate's prefill), no cache kept."""
        input_ids = torch.tensor([ids], device=self.device)
        self.model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), logits_to_keep=1, use_cache=False)
        self.synchronize()

    def synchronize(self) -> None:
        models.synchronize(self.device)

    def next_token_logprobs(self, contexts: list[list[int]], candidates: list[list[int]],
                            batch_size: int) -> list[list[float]]:
        """ONE forward pass per context over right-padded batches, longest first; the prefix all
        contexts share (MMLU's description and few-shot examples) is computed once and its KV cache
        reused by every batch."""
        prefix = self._shared_prefix(contexts)
        skip = prefix.length if prefix else 0
        out: list[list[float] | None] = [None] * len(contexts)
        for batch in length_sorted_batches(list(range(len(contexts))), contexts, batch_size):
            rows = [contexts[i][skip:] for i in batch]
            logprobs = self._selected_logprobs(rows, [[len(r) - 1] for r in rows], prefix)
            for i, lp in zip(batch, logprobs):
                out[i] = [lp[0, c].item() for c in candidates[i]]
        return out

    def loglikelihood(self, requests: list[tuple[list[int], list[int]]], batch_size: int) -> list[float]:
        """lm-eval's general path: one sequence per (context, continuation), summing the
        continuation's token log-probs, with the shared prefix cached as above."""
        prefix = self._shared_prefix([c for c, _ in requests])
        skip = prefix.length if prefix else 0
        rows = [(ctx + cont)[:-1][skip:] for ctx, cont in requests]
        out: list[float | None] = [None] * len(requests)
        for batch in length_sorted_batches(list(range(len(requests))), rows, batch_size):
            positions = []
            for i in batch:
                first = len(requests[i][0]) - 1 - skip
                positions.append(list(range(first, first + len(requests[i][1]))))
            logprobs = self._selected_logprobs([rows[i] for i in batch], positions, prefix)
            for i, lp in zip(batch, logprobs):
                out[i] = sum(lp[j, t].item() for j, t in enumerate(requests[i][1]))
        return out

    @torch.inference_mode()
    def _shared_prefix(self, contexts: list[list[int]]) -> SharedPrefix | None:
        length = common_prefix_length(contexts) if len(contexts) > 1 and self.share_prefix else 0
        if length < MIN_SHARED_PREFIX_TOKENS:
            return None
        ids = torch.tensor([contexts[0][:length]], device=self.device)
        out = self.model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True, logits_to_keep=1)
        return SharedPrefix(length, out.cache)

    @torch.inference_mode()
    def _selected_logprobs(self, rows: list[list[int]], positions: list[list[int]],
                           prefix: SharedPrefix | None) -> list[torch.Tensor]:
        """Right-padded batch forward; fp32 log-softmax at the requested positions of each row.

        Only the needed positions go through the LM head (logits_to_keep with an index tensor), so a
        batch costs (batch, k, vocab) logits instead of (batch, seq, vocab)."""
        pad_id = self.tokenizer.pad_token_id
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, :len(row)] = torch.tensor(row)
            mask[i, :len(row)] = 1
        kwargs = {}
        if prefix is not None:
            cache = copy.deepcopy(prefix.cache)
            cache.batch_repeat_interleave(len(rows))
            mask = torch.cat([torch.ones((len(rows), prefix.length), dtype=torch.long), mask], dim=1)
            kwargs = dict(cache=cache, use_cache=True)
        keep = sorted({p for pos in positions for p in pos})
        logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                            logits_to_keep=torch.tensor(keep, device=self.device), **kwargs).logits  # (batch, k, vocab)
        column = {p: j for j, p in enumerate(keep)}
        return [torch.log_softmax(logits[i, [column[p] for p in pos]].float(), dim=-1).cpu()
                for i, pos in enumerate(positions)]

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], max_new_tokens: int, stops: list[str],
                 batch_size: int) -> list[list[int]]:
        """Greedy, batched across prompts of similar length with LEFT padding (each row's last prompt
        token sits at the same column, so one decode step serves the whole batch); each row stops on
        its own at EOS or a stop string. Returns the new tokens of each prompt, EOS and padding removed."""
        pad_id = self.tokenizer.pad_token_id
        out: list[list[int] | None] = [None] * len(prompts)
        for batch in length_sorted_batches(list(range(len(prompts))), prompts, batch_size):
            width = max(len(prompts[i]) for i in batch)
            ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):
                ids[row, width - len(prompts[i]):] = torch.tensor(prompts[i])
                mask[row, width - len(prompts[i]):] = 1
            kwargs = dict(stop_strings=stops, tokenizer=self.tokenizer) if stops else {}
            generated = self.model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                            max_new_tokens=max_new_tokens, do_sample=False, temperature=None,
                                            top_p=None, top_k=None, pad_token_id=pad_id,
                                            eos_token_id=sorted(self.eos_ids), **kwargs)
            for row, i in enumerate(batch):
                new = generated[row, width:].tolist()
                end = next((j for j, t in enumerate(new) if t in self.eos_ids), len(new))
                out[i] = new[:end]
        return out

    def close(self) -> None:
        self._cache = None
        self.model = self.loaded.model = None


def length_sorted_batches(indices: list[int], rows: list[list[int]], batch_size: int) -> list[list[int]]:
    """Longest first (as lm-eval: an out-of-memory shows up at once), similar lengths together so a
    batch wastes little padding."""
    ordered = sorted(indices, key=lambda i: -len(rows[i]))
    return [ordered[i:i + batch_size] for i in range(0, len(ordered), batch_size)]


def context_length(loaded: models.Loaded) -> int:
    """Positions the model can attend to: config.max_position_embeddings, else the registry's."""
    n = getattr(loaded.model.config.get_text_config(), "max_position_embeddings", None)
    if n:
        return int(n)
    spec = loaded.resolved.spec
    return spec.context if spec is not None else models.DEFAULT_CONTEXT_TOKENS


def eos_token_ids(model, tokenizer) -> set[int]:
    """Ids that end a reply: the generation config's EOS, the tokenizer's, and end-of-turn tokens."""
    ids: set[int] = set()
    configured = getattr(model.generation_config, "eos_token_id", None)
    ids.update(configured if isinstance(configured, (list, tuple)) else [configured])
    ids.add(tokenizer.eos_token_id)
    vocab = tokenizer.get_vocab()
    ids.update(vocab[t] for t in models.END_OF_TURN_TOKENS if t in vocab)
    ids.discard(None)
    return ids
