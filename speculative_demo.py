"""Speculative decoding, shown working: lossless, timed against the target alone, and explained.

    python speculative_demo.py --draft qwen2.5-0.5b --target qwen2.5-1.5b --k 4
    python speculative_demo.py --target ../shared/models/SmolLM2-135M-Instruct.Q4_1.gguf --draft self:24 --prompt-kind summarise
    python speculative_demo.py --target ../shared/models/SmolLM2-135M-Instruct.Q4_1.gguf --methods lookup,hf-lookup --sweep-k 1,2,4,6,8 --no-color

A draft (a small model, the target's own first N layers, or n-grams copied from the prompt) proposes k
tokens; the target checks all k in one forward pass and keeps the longest prefix it agrees with, plus
one token of its own. At temperature 0 the output is exactly the target's greedy output; at
temperature > 0 the rejection rule keeps the target's sampling distribution. Whether it is faster
depends on the acceptance rate alpha and the draft/target cost ratio c: expected speedup
(1 - alpha^(k+1)) / ((1 - alpha) (k c + 1)) (Leviathan et al., 2023). docs/speculative.md explains.
Writes results/speculative_demo-<time>.json and .md.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from dataclasses import dataclass, field

import torch

import energy
import models
import results_io

DEFAULT_K = 4
DEFAULT_MAX_NEW_TOKENS = 64
DEFAULT_TEMPERATURE = 0.0
DEFAULT_REPETITIONS = 3
DEFAULT_IDLE_SECONDS = 3.0  # idle power before the first method, where an energy counter exists
DEFAULT_WARMUP = 1
DEFAULT_NGRAM = 3  # prompt lookup tries the last 3, then 2, then 1 tokens
DEFAULT_PROMPT_KIND = "all"
DEFAULT_METHODS = "auto"
COST_TIMING_STEPS = 8  # single-token forwards timed for the cost ratio c
CHEAP_ENOUGH = 0.3  # warn when the draft costs more than this fraction of the target

METHODS = {
    "ours": "our draft-and-verify rounds with the draft model (or the target's first N layers)",
    "lookup": "our draft-and-verify rounds with prompt-lookup drafts (n-gram copy, no draft model)",
    "hf-assisted": "transformers assisted generation (assistant_model; assistant_early_exit for self:N)",
    "hf-lookup": "transformers prompt lookup (prompt_lookup_num_tokens)",
    "universal": "transformers universal assisted generation (draft with a different tokenizer)",
}
NEEDS_DRAFT_MODEL = ("ours", "hf-assisted", "universal")

PASSAGE = (
    "The Great Barrier Reef, off the coast of Queensland in Australia, is the largest coral reef system "
    "in the world. It stretches for more than 2,300 kilometres and is made of nearly 3,000 individual "
    "reefs and 900 islands. The reef is built by billions of tiny organisms called coral polyps, and it "
    "supports a wide diversity of life, including many vulnerable and endangered species. Since 2016, "
    "rising sea temperatures have caused repeated mass coral bleaching events, in which stressed corals "
    "expel the algae that live in their tissues and turn white. Scientists warn that if ocean warming "
    "continues, the Great Barrier Reef could lose most of its coral cover within decades."
)
PROMPTS = {
    "summarise": f"Summarise the following passage in two or three sentences.\n\n{PASSAGE}",
    "code": "Write a Python function `is_prime(n)` that returns True when n is a prime number, "
            "with a docstring and a short example.",
    "chat": "What are three good habits for staying focused while studying? Answer briefly.",
}

# ANSI colours for the terminal view: draft tokens the target accepted vs tokens the target produced.
GREEN, RESET = "\033[32m", "\033[0m"
OPEN_MARK, CLOSE_MARK = "«", "»"  # plain-text / Markdown markup around accepted draft spans


# ----------------------------------------------------------------------------------------------
# Models with their own KV cache
# ----------------------------------------------------------------------------------------------

@contextlib.contextmanager
def first_layers(model, n: int | None):
    """Run `model` with only its first `n` decoder layers (then its final norm and lm_head).

    Both the layer list and config.num_hidden_layers are cut, because some families loop over
    `self.layers` and others over `self.layers[:config.num_hidden_layers]`. Restored on exit.
    """
    if n is None:
        yield model
        return
    base = model.base_model
    layers, depth = base.layers, base.config.num_hidden_layers
    base.layers = torch.nn.ModuleList(list(layers)[:n])
    base.config.num_hidden_layers = n
    try:
        yield model
    finally:
        base.layers = layers
        base.config.num_hidden_layers = depth


class CachedLM:
    """A causal LM (or its first `n_layers`) with its own DynamicCache; it feeds only uncached tokens."""

    def __init__(self, model, n_layers: int | None = None):
        self.model, self.n_layers = model, n_layers
        self.device = next(model.parameters()).device
        self.reset()

    def reset(self) -> None:
        from transformers import DynamicCache
        self.cache = DynamicCache()  # no config: layers appear as they are used, N of them for self:N
        self.forwards = 0

    @property
    def cached(self) -> int:
        return self.cache.get_seq_length()

    def logits_for(self, seq: list[int], keep: int = 1) -> torch.Tensor:
        """Feed seq[cached:] in one forward pass; logits of its last `keep` positions, (keep, vocab) fp32."""
        fresh = seq[self.cached:]
        assert fresh, "the cache already holds the whole sequence"
        ids = torch.tensor([fresh], device=self.device)
        with first_layers(self.model, self.n_layers):
            out = self.model(input_ids=ids, cache=self.cache, use_cache=True,
                             logits_to_keep=min(keep, len(fresh)))
        self.forwards += 1
        return out.logits[0].float()

    def rollback(self, keep: int) -> None:
        """Drop cached positions from `keep` on (DynamicCache.crop takes minus the number to remove)."""
        extra = self.cached - keep
        if extra > 0:
            self.cache.crop(-extra)


# ----------------------------------------------------------------------------------------------
# Drafters: propose up to k tokens after `seq`; q holds their probabilities (None at temperature 0)
# ----------------------------------------------------------------------------------------------

def pick_token(logits: torch.Tensor, temperature: float, generator) -> tuple[int, torch.Tensor | None]:
    """Greedy token at temperature 0, else a sample from softmax(logits / T) and that distribution."""
    if temperature == 0:
        return int(logits.argmax()), None
    probs = torch.softmax(logits / temperature, dim=-1).cpu()
    return int(torch.multinomial(probs, 1, generator=generator)), probs


class ModelDrafter:
    """A separate small model, or the target's first N layers (self-speculation), with its own cache."""

    def __init__(self, lm: CachedLM, shared_vocab: int, target_vocab: int, label: str):
        self.lm, self.shared_vocab, self.target_vocab, self.label = lm, shared_vocab, target_vocab, label

    def reset(self) -> None:
        self.lm.reset()

    @property
    def forwards(self) -> int:
        return self.lm.forwards

    def propose(self, seq: list[int], k: int, temperature: float, generator):
        tokens, probs = [], []
        for _ in range(k):
            # Draft logits are cut to the vocabulary both models share (Qwen2.5 0.5B pads to 151936,
            # 7B to 152064 rows; the ids of real tokens are the same).
            logits = self.lm.logits_for(seq + tokens)[-1, :self.shared_vocab]
            token, q = pick_token(logits, temperature, generator)
            tokens.append(token)
            if q is not None:
                probs.append(torch.nn.functional.pad(q, (0, self.target_vocab - self.shared_vocab)))
        return tokens, (torch.stack(probs) if probs else None)

    def rollback(self, keep: int) -> None:
        self.lm.rollback(keep)


def find_continuation(seq: list[int], k: int, max_ngram: int) -> list[int]:
    """Prompt lookup: the (up to) k tokens that followed the latest earlier occurrence of the last
    n tokens of `seq`, trying n = max_ngram down to 1; [] when nothing matches."""
    for n in range(min(max_ngram, len(seq) - 1), 0, -1):
        tail = seq[-n:]
        for start in range(len(seq) - n - 1, -1, -1):
            if seq[start:start + n] == tail:
                return seq[start + n:start + n + k]
    return []


class LookupDrafter:
    """Draft tokens copied from the prompt and the text so far; no model, no cache."""

    label = "prompt lookup"

    def __init__(self, max_ngram: int, target_vocab: int):
        self.max_ngram, self.target_vocab, self.forwards = max_ngram, target_vocab, 0

    def reset(self) -> None:
        self.forwards = 0

    def propose(self, seq: list[int], k: int, temperature: float, generator):
        tokens = find_continuation(seq, k, self.max_ngram)
        if temperature == 0 or not tokens:
            return tokens, None
        # A deterministic draft is a one-hot q: accepted with probability p(x).
        return tokens, torch.nn.functional.one_hot(torch.tensor(tokens), self.target_vocab).float()

    def rollback(self, keep: int) -> None:
        pass


class NoDrafter(LookupDrafter):
    """Proposes nothing: every round is one plain target step (our target-alone baseline)."""

    label = "target alone"

    def __init__(self, target_vocab: int = 0):
        super().__init__(0, target_vocab)

    def propose(self, seq, k, temperature, generator):
        return [], None


# ----------------------------------------------------------------------------------------------
# One draft-and-verify round
# ----------------------------------------------------------------------------------------------

@dataclass
class Round:
    proposed: int  # draft tokens offered this round
    accepted: int  # how many of them the target accepted (a prefix)
    emitted: list[int]  # accepted drafts + the target's own token (correction, or bonus when all pass)


def accept_greedy(drafts: list[int], logits: torch.Tensor) -> tuple[int, int]:
    """Temperature 0: accept drafts while they equal the target's argmax; then the target's token.

    logits: (len(drafts) + 1, vocab); row i is the target's prediction after drafts[:i].
    """
    choice = logits.argmax(dim=-1).tolist()
    n = 0
    while n < len(drafts) and drafts[n] == choice[n]:
        n += 1
    return n, choice[n]


def accept_or_resample(p: torch.Tensor, q: torch.Tensor, token: int, generator) -> int | None:
    """The rejection rule for one draft token x ~ q: None if accepted, else the replacement token.

    Accept x with probability min(1, p(x)/q(x)); on rejection draw from norm(max(0, p - q)).
    Then P(emit y) = q(y) min(1, p(y)/q(y)) + P(reject) max(0, p(y) - q(y)) / Z
                   = min(p(y), q(y)) + max(0, p(y) - q(y))     as P(reject) = 1 - sum min(p, q) = Z
                   = p(y): exactly the target's distribution, whatever q is.
    """
    if float(torch.rand((), generator=generator)) * float(q[token]) < float(p[token]):
        return None
    residual = (p - q).clamp_min(0)
    if float(residual.sum()) <= 0:  # p == q up to rounding: rejection had ~zero probability
        residual = p
    return int(torch.multinomial(residual / residual.sum(), 1, generator=generator))


def accept_sampled(drafts: list[int], q: torch.Tensor, p: torch.Tensor, generator) -> tuple[int, int]:
    """Temperature > 0: the rejection rule token by token; a bonus sample from p[k] when all k pass.

    q: (k, vocab) draft probabilities; p: (k + 1, vocab) target probabilities.
    """
    for i, token in enumerate(drafts):
        replacement = accept_or_resample(p[i], q[i], token, generator)
        if replacement is not None:
            return i, replacement
    return len(drafts), int(torch.multinomial(p[len(drafts)], 1, generator=generator))


def speculative_round(target: CachedLM, drafter, seq: list[int], k: int, temperature: float,
                      generator) -> Round:
    """Draft up to k tokens, verify them with ONE target forward pass, roll both caches back.

    Invariant: the target cache holds every token of `seq` but the last (at most); the verify pass
    feeds the uncached tail plus the drafts and reads len(drafts) + 1 rows of logits.
    """
    drafts, q = drafter.propose(seq, k, temperature, generator)
    logits = target.logits_for(seq + drafts, keep=len(drafts) + 1)  # (len(drafts) + 1, vocab)
    if temperature == 0:
        accepted, token = accept_greedy(drafts, logits)
    else:
        accepted, token = accept_sampled(drafts, q, torch.softmax(logits / temperature, -1).cpu(), generator)
    # Keep the KV of seq + accepted drafts; rejected drafts go. The new token is fed next round.
    target.rollback(len(seq) + accepted)
    drafter.rollback(len(seq) + accepted)
    return Round(len(drafts), accepted, drafts[:accepted] + [token])


# ----------------------------------------------------------------------------------------------
# Whole generations
# ----------------------------------------------------------------------------------------------

@dataclass
class Generation:
    tokens: list[int]  # new tokens only
    from_draft: list[bool]  # per token: an accepted draft token (True) or the target's own (False)
    rounds: list[Round] = field(default_factory=list)
    target_forwards: int = 0
    draft_forwards: int = 0
    seconds: float = 0.0

    @property
    def accepted(self) -> int:
        return sum(r.accepted for r in self.rounds)

    @property
    def proposed(self) -> int:
        return sum(r.proposed for r in self.rounds)


def speculative_generate(target: CachedLM, drafter, prompt: list[int], k: int, max_new_tokens: int,
                         temperature: float, eos_ids: set[int], generator) -> Generation:
    """Rounds until max_new_tokens or an end-of-sequence token; the first round also prefills."""
    target.reset()
    drafter.reset()
    seq, gen = list(prompt), Generation([], [])
    while len(gen.tokens) < max_new_tokens:
        budget = max_new_tokens - len(gen.tokens)
        step = speculative_round(target, drafter, seq, min(k, budget - 1), temperature, generator)
        gen.rounds.append(step)
        for i, token in enumerate(step.emitted[:budget]):
            seq.append(token)
            gen.tokens.append(token)
            gen.from_draft.append(i < step.accepted)
            if token in eos_ids:
                break
        if gen.tokens[-1] in eos_ids:
            break
    gen.target_forwards, gen.draft_forwards = target.forwards, drafter.forwards
    return gen


def hf_generate(model, enc: dict, max_new_tokens: int, temperature: float, extra: dict,
                seed: int) -> tuple[list[int], int]:
    """transformers' generate (target alone or with an assisted-generation option in `extra`);
    returns the new tokens and the number of target forward passes it made."""
    calls, depth = [0], model.config.get_text_config().num_hidden_layers

    def count_full_depth_call(*_):  # early exit drafts with the same module at a smaller depth: not counted
        calls[0] += model.config.get_text_config().num_hidden_layers == depth

    handle = model.register_forward_pre_hook(count_full_depth_call)
    sampling = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature > 0 \
        else dict(do_sample=False, temperature=None, top_k=None, top_p=None)
    try:
        models.set_seed(seed)
        out = model.generate(**enc, max_new_tokens=max_new_tokens, **sampling, **extra)
    finally:
        handle.remove()
    return out[0, enc["input_ids"].shape[1]:].tolist(), calls[0]


@contextlib.contextmanager
def assistant_settings(model, k: int):
    """Start HF's dynamic draft length at k ('heuristic_transient': +2 after a full acceptance, -1
    otherwise, reset per call); restore the model's generation config afterwards."""
    config = model.generation_config
    saved = (config.num_assistant_tokens, config.num_assistant_tokens_schedule)
    config.num_assistant_tokens, config.num_assistant_tokens_schedule = k, "heuristic_transient"
    try:
        yield
    finally:
        config.num_assistant_tokens, config.num_assistant_tokens_schedule = saved


# ----------------------------------------------------------------------------------------------
# Measurements
# ----------------------------------------------------------------------------------------------

def acceptance_stats(rounds: list[Round], k: int) -> dict:
    """alpha, tokens per target forward and the histogram of accepted lengths over drafting rounds.

    alpha is estimated as accepted / (accepted + rejected): each judged draft token is either
    accepted or the one rejection that ends its round; tokens after a rejection are never judged.
    """
    drafting = [r for r in rounds if r.proposed > 0]
    accepted = sum(r.accepted for r in drafting)
    rejected = sum(r.accepted < r.proposed for r in drafting)
    proposed = sum(r.proposed for r in drafting)
    emitted = sum(len(r.emitted) for r in rounds)
    histogram = [0] * (k + 1)
    for r in drafting:
        histogram[min(r.accepted, k)] += 1
    return {
        "rounds": len(rounds), "drafting_rounds": len(drafting), "proposed": proposed, "accepted": accepted,
        "alpha": accepted / (accepted + rejected) if accepted + rejected else None,
        "accepted_fraction": accepted / proposed if proposed else None,
        "tokens_per_target_forward": emitted / len(rounds) if rounds else None,
        "histogram": histogram,
    }


def expected_speedup(alpha: float | None, k: int, c: float, verify_ratio: float = 1.0) -> float | None:
    """Leviathan et al. (2023): E[tokens per round] / cost of a round in target-step units,
    (1 - alpha^(k+1)) / (1 - alpha) / (k c + verify_ratio); verify_ratio = 1 is the paper's formula
    (verifying k+1 tokens costs one target step, true when decoding is memory-bound)."""
    if alpha is None:
        return None
    tokens = k + 1 if alpha >= 1 else (1 - alpha ** (k + 1)) / (1 - alpha)
    return tokens / (k * c + verify_ratio)


def timed(device, fn, *a, **kw):
    """Run fn, synchronising the device before reading the clock; (result, seconds)."""
    models.synchronize(device)
    start = time.perf_counter()
    result = fn(*a, **kw)
    models.synchronize(device)
    return result, time.perf_counter() - start


def median_forward_seconds(lm: CachedLM, prompt: list[int], n_tokens: int, steps: int) -> float:
    """Median time of a forward pass over n_tokens new tokens on top of a cached prompt."""
    lm.reset()
    lm.logits_for(prompt)
    times = []
    for _ in range(steps + 1):  # the first one is a warm-up
        _, seconds = timed(lm.device, lm.logits_for, prompt + prompt[:n_tokens], n_tokens)
        lm.rollback(len(prompt))
        times.append(seconds)
    return statistics.median(times[1:])


def measure_costs(target: CachedLM, drafter, prompt: list[int], k: int, steps: int = COST_TIMING_STEPS) -> dict:
    """c = draft step time / target step time (one token each), and the cost of verifying k+1
    tokens in one target pass relative to one token (1 on a memory-bound GPU, more on a CPU)."""
    target_step = median_forward_seconds(target, prompt, 1, steps)
    verify = median_forward_seconds(target, prompt, k + 1, steps)
    if isinstance(drafter, ModelDrafter):
        draft_step = median_forward_seconds(drafter.lm, prompt, 1, steps)
    else:
        draft_step = min(timed(target.device, drafter.propose, prompt, k, 0.0, None)[1] for _ in range(steps)) / max(k, 1)
    return {"target_step_ms": 1000 * target_step, "draft_step_ms": 1000 * draft_step,
            f"verify_{k + 1}_tokens_ms": 1000 * verify, "c": draft_step / target_step,
            "verify_ratio": verify / target_step}


# ----------------------------------------------------------------------------------------------
# Lossless check
# ----------------------------------------------------------------------------------------------

def first_mismatch(reference: list[int], candidate: list[int]) -> int | None:
    """Index of the first differing token (a shorter output differs where it ends); None if equal."""
    for i, (a, b) in enumerate(zip(reference, candidate)):
        if a != b:
            return i
    return None if len(reference) == len(candidate) else min(len(reference), len(candidate))


@torch.inference_mode()
def top2_gap(model, prompt: list[int], reference: list[int], position: int) -> float:
    """The target's logit gap between its top two tokens where the reference chose token `position`."""
    ids = torch.tensor([prompt + reference[:position]], device=next(model.parameters()).device)
    top = model(input_ids=ids, logits_to_keep=1).logits[0, -1].float().topk(2).values
    return float(top[0] - top[1])


def lossless_report(model, prompt: list[int], reference: list[int], candidate: list[int]) -> dict:
    position = first_mismatch(reference, candidate)
    if position is None:
        return {"identical": True, "tokens_compared": len(reference)}
    short = position >= min(len(reference), len(candidate))
    return {"identical": False, "first_mismatch": position,
            "target_token": reference[position] if position < len(reference) else None,
            "method_token": candidate[position] if position < len(candidate) else None,
            "target_top2_logit_gap": None if short else top2_gap(model, prompt, reference, position)}


# ----------------------------------------------------------------------------------------------
# Compatibility and the default pair
# ----------------------------------------------------------------------------------------------

def parse_self_draft(name: str | None, depth: int) -> int | None:
    """N from 'self:N' (1 <= N < the target's depth); None for any other draft name."""
    if not name or not name.lower().startswith("self:"):
        return None
    try:
        n = int(name.split(":", 1)[1])
    except ValueError:
        raise models.UserError(f"--draft {name}: write self:N with N a number of layers, e.g. self:{depth // 3}.")
    if not 1 <= n < depth:
        raise models.UserError(f"--draft {name}: the target has {depth} layers; choose 1 <= N < {depth}.")
    return n


def self_draft_cost_share(model, n: int) -> float:
    """Weights a self:n draft multiplies per token (first n layers + lm_head) / the target's."""
    layers = [models.count_parameters(layer) for layer in model.base_model.layers]
    head = model.get_output_embeddings().weight.numel()
    return (sum(layers[:n]) + head) / (sum(layers) + head)


def same_tokenizer(a, b) -> bool:
    """Same token -> id mapping (the only thing drafts and targets must agree on)."""
    return a is b or a.get_vocab() == b.get_vocab()


def check_compatibility(target: models.Loaded, draft: models.Loaded | None, self_layers: int | None) -> dict:
    """Tokenizers, vocabulary sizes, and warnings (with the reason) when the pair is unlikely to help."""
    t_params = models.count_parameters(target.model)
    t_vocab = target.model.config.get_text_config().vocab_size
    depth = target.model.config.get_text_config().num_hidden_layers
    if self_layers is not None:
        share = self_draft_cost_share(target.model, self_layers)
        report = {"draft": f"self:{self_layers}", "same_tokenizer": True, "target_vocab": t_vocab,
                  "draft_vocab": t_vocab, "shared_vocab": t_vocab, "cost_share": share, "warnings": []}
        if share > CHEAP_ENOUGH:
            report["warnings"].append(
                f"self:{self_layers} runs {self_layers} of {depth} layers plus the full lm_head, about {share:.0%} "
                "of a target step: the draft is not much cheaper, so the speedup will be small or below 1.")
        return report
    d_vocab = draft.model.config.get_text_config().vocab_size
    same = same_tokenizer(target.tokenizer, draft.tokenizer)
    share = models.count_parameters(draft.model) / t_params
    warnings = []
    if not same:
        warnings.append("different tokenizers: only universal assisted generation (--methods universal) applies.")
    if share > CHEAP_ENOUGH:
        warnings.append(f"the draft has {share:.0%} of the target's parameters: c will be near {share:.2f}, "
                        "so it is not much cheaper and the speedup will be small or below 1.")
    t_family, d_family = target.model.config.model_type, draft.model.config.model_type
    if t_family != d_family:
        warnings.append(f"different families ({d_family} drafting for {t_family}): "
                        "expect a low acceptance rate.")
    if same and d_vocab != t_vocab:
        warnings.append(f"embedding sizes differ ({d_vocab} vs {t_vocab}) with the same tokenizer: "
                        f"draft logits are cut to the shared {min(d_vocab, t_vocab)} ids.")
    return {"draft": draft.label, "same_tokenizer": same, "target_vocab": t_vocab, "draft_vocab": d_vocab,
            "shared_vocab": min(d_vocab, t_vocab), "cost_share": share, "warnings": warnings}


def default_pair(device: torch.device, dtype: torch.dtype) -> tuple[str, str]:
    """(draft, target) from the registry: Qwen2.5 0.5B -> 7B on a GPU holding both, 0.5B -> 1.5B on
    a smaller GPU or MPS, SmolLM2 135M -> 1.7B on a CPU."""
    if device.type == "cpu":
        return "smollm2-135m", "smollm2-1.7b"
    if device.type == "cuda":
        need = sum(models.estimate_memory_bytes(models.REGISTRY[key], dtype, context_tokens=4096)
                   for key in ("qwen2.5-0.5b", "qwen2.5-7b"))
        if torch.cuda.get_device_properties(device).total_memory > 1.15 * need:
            return "qwen2.5-0.5b", "qwen2.5-7b"
    return "qwen2.5-0.5b", "qwen2.5-1.5b"


def registry_draft_for(target_name: str) -> str | None:
    """The smallest registry model listed as a draft for this target, if the target is in the registry."""
    spec = models.spec_of(target_name)
    drafts = [d for d in models.REGISTRY.values() if spec is not None and spec.key in d.draft_for]
    return min(drafts, key=lambda d: d.params).key if drafts else None


def choose_methods(requested: str, compat: dict | None, self_layers: int | None) -> list[str]:
    """'auto': every method that applies to this pair; otherwise the listed ones, checked."""
    names = [m.strip() for m in requested.split(",") if m.strip()]
    if requested == "auto":
        if compat is None:
            return ["lookup", "hf-lookup"]
        if not compat["same_tokenizer"]:
            return ["universal", "lookup", "hf-lookup"]
        return ["ours", "hf-assisted", "lookup", "hf-lookup"]
    unknown = [m for m in names if m not in METHODS]
    if unknown:
        raise models.UserError(f"unknown method {', '.join(unknown)}: choose from {', '.join(METHODS)} (or auto).")
    if compat is None and any(m in NEEDS_DRAFT_MODEL for m in names):
        raise models.UserError("--methods " + requested + " needs a draft: pass --draft MODEL or --draft self:N.")
    if compat is not None and not compat["same_tokenizer"] and {"ours", "hf-assisted"} & set(names):
        raise models.UserError("the draft's tokenizer differs from the target's: use --methods universal "
                               "(transformers universal assisted generation), lookup or hf-lookup.")
    if "universal" in names and (self_layers is not None or (compat and compat["same_tokenizer"])):
        raise models.UserError("--methods universal is for a draft with a different tokenizer; "
                               "this pair shares one: use ours or hf-assisted.")
    return names


# ----------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------

def token_pieces(tokenizer, tokens: list[int]) -> list[str]:
    """Text of each token as it appears in the decoded whole (multi-byte characters stay intact)."""
    pieces, previous = [], ""
    for i in range(len(tokens)):
        text = tokenizer.decode(tokens[:i + 1], skip_special_tokens=True)
        pieces.append(text[len(previous):] if text.startswith(previous) else text)
        previous = text
    return pieces


def render_marked(tokenizer, gen: Generation, color: bool) -> str:
    """Accepted draft tokens in green (colour) or inside «…» (plain); target tokens as they are."""
    out, inside = [], False
    for piece, drafted in zip(token_pieces(tokenizer, gen.tokens), gen.from_draft):
        if drafted != inside:
            out.append((GREEN if drafted else RESET) if color else (OPEN_MARK if drafted else CLOSE_MARK))
            inside = drafted
        out.append(piece)
    if inside:
        out.append(RESET if color else CLOSE_MARK)
    return "".join(out)


def use_color(args) -> bool:
    return not args.no_color and sys.stdout.isatty() and "NO_COLOR" not in os.environ


def histogram_text(histogram: list[int]) -> str:
    return results_io.bar_chart([(f"{n} accepted", float(count)) for n, count in enumerate(histogram)],
                                unit="rounds", digits=0)


def fmt(value, digits: int = 2, suffix: str = "") -> str:
    return "–" if value is None else f"{value:.{digits}f}{suffix}"


def method_rows(prompt_result: dict) -> list[list]:
    rows = []
    for name, m in prompt_result["methods"].items():
        loss = m.get("lossless")
        joules = (m.get("energy") or {}).get("per_unit")
        rows.append([name, m["tok_s"], fmt(m.get("speedup_vs_hf"), 2, "×"), fmt(m.get("speedup_vs_loop"), 2, "×"),
                     fmt(joules and joules["j_per_unit"], 3, " J/tok"), fmt(m.get("energy_vs_hf"), 2, "×"),
                     fmt(m.get("tokens_per_target_forward")), fmt(m.get("alpha")),
                     fmt(m.get("predicted_speedup"), 2, "×"), fmt(m.get("predicted_speedup_measured_verify"), 2, "×"),
                     "–" if loss is None else ("identical" if loss["identical"]
                                               else f"differs at {loss['first_mismatch']} (gap {fmt(loss.get('target_top2_logit_gap'), 3)})")])
    return rows


METHOD_HEADERS = ["method", "tok/s (mean ± std)", "speedup vs target (HF)", "speedup vs target (our loop)",
                  "energy", "energy vs target (HF)",
                  "tokens / target fwd", "α", "Leviathan prediction", "prediction with measured verify cost",
                  "greedy lossless"]


SWEEP_HEADERS = ["method", "k", "tok/s (mean ± std)", "speedup vs target (our loop)", "α", "tokens / target fwd",
                 "c", "verify k+1 (target steps)", "Leviathan prediction", "prediction with measured verify cost",
                 "peak"]


def sweep_rows(sweep: list[dict]) -> list[list]:
    return [[r["method"], r["k"], r["tok_s"], fmt(r["speedup_vs_loop"], 2, "×"), fmt(r["alpha"]),
             fmt(r["tokens_per_target_forward"]), fmt(r["c"], 3), fmt(r["verify_ratio"]),
             fmt(r["predicted_speedup"], 2, "×"),
             fmt(expected_speedup(r["alpha"], r["k"], r["c"], r["verify_ratio"]), 2, "×"),
             "◀ peak" if r["peak"] else ""] for r in sweep]


def energy_line(meter: dict) -> str:
    """How energy was measured (counter, idle watts), or why it was not, once per report."""
    if not meter.get("available"):
        return f"Energy: {meter.get('reason') or 'not measured'}."
    idle = sum((meter.get("idle_watts") or {}).values())
    return f"Energy: {meter['counter']}, idle {idle:.1f} W; J/tok over the timed repetitions of each method."


def render_markdown(report: dict) -> str:
    s = report["settings"]
    lines = [f"# Speculative decoding: {report['target']['model']} with draft {report['compatibility']['draft'] if report['compatibility'] else 'none'}",
             "", results_io.environment_markdown(report["environment"]),
             f"k = {s['k']}, max new tokens = {s['max_new_tokens']}, temperature = {s['temperature']}, "
             f"{s['repetitions']} timed repetitions after {s['warmup']} warm-up, dtype {report['target']['dtype']}, "
             f"load average at start {s['load_average']}.", "",
             energy_line(report["environment"].get("energy") or {}), ""]
    if report["compatibility"]:
        c = report["compatibility"]
        lines += [f"Compatibility: same tokenizer: {c['same_tokenizer']}; vocab target {c['target_vocab']}, "
                  f"draft {c['draft_vocab']}; draft cost share {c['cost_share']:.2f}."]
        lines += [f"- warning: {w}" for w in c["warnings"]] + [""]
    for kind, res in report["prompts"].items():
        costs = res.get("costs", {})
        lines += [f"## Prompt: {kind}", "", "> " + " ".join(res["prompt"][:300].split()) + ("…" if len(res["prompt"]) > 300 else ""), ""]
        for label, cost in costs.items():
            lines.append(f"- cost ({label}): target step {cost['target_step_ms']:.1f} ms, draft step "
                         f"{cost['draft_step_ms']:.2f} ms, c = {cost['c']:.3f}, verifying k+1 tokens = "
                         f"{cost['verify_ratio']:.2f} target steps")
        lines += ["", results_io.markdown_table(METHOD_HEADERS, method_rows(res))]
        for name, m in res["methods"].items():
            if m.get("marked_text") is not None:
                lines += [f"### {name}: accepted draft tokens in «…», the target's own tokens plain", "",
                          "```text", m["marked_text"], "```", "", "Accepted lengths per round:", "", "```text",
                          histogram_text(m["histogram"]).rstrip(), "```", ""]
    if report.get("sweep"):
        lines += ["## Sweep over k", "", results_io.markdown_table(
            SWEEP_HEADERS, sweep_rows(report["sweep"]))]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# Wiring
# ----------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default=None, help="model that verifies (default: registry pair for the device)")
    parser.add_argument("--draft", default=None,
                        help="draft model, or self:N for the target's first N layers (default: registry pair)")
    models.add_common_args(parser, default_model=None)
    parser.add_argument("--methods", default=DEFAULT_METHODS,
                        help=f"comma list of {', '.join(METHODS)}; auto = all that apply (default: {DEFAULT_METHODS})")
    parser.add_argument("--prompt", default=None, help="your own prompt (replaces the built-in ones)")
    parser.add_argument("--prompt-kind", default=DEFAULT_PROMPT_KIND, choices=["all", *PROMPTS],
                        help=f"built-in prompt(s) (default: {DEFAULT_PROMPT_KIND})")
    parser.add_argument("--k", type=int, default=DEFAULT_K, help=f"draft tokens per round (default: {DEFAULT_K})")
    parser.add_argument("--sweep-k", default=None, metavar="K,K,...",
                        help="also time our methods at each k, e.g. 1,2,4,6,8")
    parser.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS,
                        help=f"default: {DEFAULT_MAX_NEW_TOKENS}")
    parser.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE,
                        help=f"0 = greedy (default: {DEFAULT_TEMPERATURE})")
    parser.add_argument("--ngram", type=int, default=DEFAULT_NGRAM,
                        help=f"longest n-gram prompt lookup matches (default: {DEFAULT_NGRAM})")
    parser.add_argument("--repetitions", type=int, default=DEFAULT_REPETITIONS,
                        help=f"timed runs (default: {DEFAULT_REPETITIONS})")
    parser.add_argument("--warmup", type=int, default=DEFAULT_WARMUP, help=f"untimed runs first (default: {DEFAULT_WARMUP})")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default: torch's choice; 1 helps on a busy machine)")
    parser.add_argument("--no-color", action="store_true", help="plain «…» markup instead of terminal colours")
    return parser


def validate_args(parser, args) -> None:
    if args.k < 1:
        parser.error("--k must be at least 1")
    if args.max_new_tokens < 1 or args.repetitions < 1 or args.warmup < 0 or args.ngram < 1:
        parser.error("--max-new-tokens, --repetitions and --ngram must be positive, --warmup >= 0")
    if args.temperature < 0:
        parser.error("--temperature must be >= 0")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be at least 1")
    if args.sweep_k:
        try:
            args.sweep_k = [int(v) for v in args.sweep_k.split(",")]
        except ValueError:
            parser.error("--sweep-k takes a comma list of integers, e.g. 1,2,4,6,8")
        if min(args.sweep_k) < 1:
            parser.error("--sweep-k values must be at least 1")


def encode_prompt(tokenizer, text: str, device) -> dict:
    enc = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                        return_dict=True, return_tensors="pt")
    return {key: value.to(device) for key, value in enc.items() if key in ("input_ids", "attention_mask")}


def eos_ids_of(model, tokenizer) -> set[int]:
    ids = model.generation_config.eos_token_id
    ids = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
    return ids | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())


@dataclass
class Setup:
    """Everything a run needs, built once in main()."""

    target: models.Loaded
    draft: models.Loaded | None
    self_layers: int | None
    compat: dict | None
    methods: list[str]
    target_lm: CachedLM
    drafter: ModelDrafter | None
    eos_ids: set[int]
    vocab: int  # the target's logit rows
    meter: energy.EnergyMeter  # joules per method's timed runs, where a counter exists


def build_drafter(setup_target: models.Loaded, draft: models.Loaded | None, self_layers: int | None,
                  compat: dict | None) -> ModelDrafter | None:
    if compat is None:
        return None
    t_vocab = compat["target_vocab"]
    if self_layers is not None:
        return ModelDrafter(CachedLM(setup_target.model, self_layers), t_vocab, t_vocab, f"self:{self_layers}")
    if not compat["same_tokenizer"]:
        return None
    return ModelDrafter(CachedLM(draft.model), compat["shared_vocab"], t_vocab, draft.label)


def run_ours(setup: Setup, drafter, prompt: list[int], k: int, args, trial: int) -> tuple[Generation, float]:
    generator = torch.Generator().manual_seed(args.seed + trial)
    with torch.inference_mode():
        gen, seconds = timed(setup.target.device, speculative_generate, setup.target_lm, drafter, prompt, k,
                             args.max_new_tokens, args.temperature, setup.eos_ids, generator)
    gen.seconds = seconds
    return gen, seconds


def hf_extra(setup: Setup, method: str, k: int, args) -> dict:
    if method == "hf-lookup":
        return dict(prompt_lookup_num_tokens=k, max_matching_ngram_size=args.ngram)
    if method == "hf-assisted" and setup.self_layers is not None:
        return dict(assistant_early_exit=setup.self_layers)
    if method == "hf-assisted":
        return dict(assistant_model=setup.draft.model)
    if method == "universal":
        return dict(assistant_model=setup.draft.model, tokenizer=setup.target.tokenizer,
                    assistant_tokenizer=setup.draft.tokenizer)
    return {}


def run_hf(setup: Setup, method: str, enc: dict, k: int, args, trial: int) -> tuple[Generation, float]:
    extra = hf_extra(setup, method, k, args)
    assistant = extra.get("assistant_model", setup.target.model if "assistant_early_exit" in extra else None)
    settings = assistant_settings(assistant, k) if assistant is not None else contextlib.nullcontext()
    with settings, torch.inference_mode():
        (tokens, forwards), seconds = timed(setup.target.device, hf_generate, setup.target.model, enc,
                                            args.max_new_tokens, args.temperature, extra, args.seed + trial)
    return Generation(tokens, [False] * len(tokens), target_forwards=forwards, seconds=seconds), seconds


def time_method(setup: Setup, method: str, prompt: list[int], enc: dict, k: int, args) -> dict:
    """Warm-up runs, then `repetitions` timed runs of one method; tokens, tok/s and round statistics."""
    drafter = {"ours": setup.drafter, "lookup": LookupDrafter(args.ngram, setup.vocab),
               "loop": NoDrafter(setup.vocab)}.get(method)
    runs, readings = [], []
    for trial in range(args.warmup + args.repetitions):
        with setup.meter.window() as w:
            if drafter is not None:
                runs.append(run_ours(setup, drafter, prompt, k, args, trial))
            else:
                runs.append(run_hf(setup, method, enc, k, args, trial))
        readings.append(w.reading)
    timed_runs = runs[args.warmup:]
    gen = timed_runs[0][0]
    rates = [len(g.tokens) / s for g, s in timed_runs]
    result = {"k": k, "tokens": gen.tokens, "n_tokens": len(gen.tokens), "tok_s": results_io.fmt_mean_std(rates),
              "tok_s_trials": [round(r, 2) for r in rates], "tok_s_mean": results_io.mean_std(rates)[0],
              "seconds_trials": [round(s, 4) for _, s in timed_runs], "target_forwards": gen.target_forwards,
              "tokens_per_target_forward": len(gen.tokens) / gen.target_forwards if gen.target_forwards else None}
    joules = energy.EnergyReading.combine(readings[args.warmup:])  # speculation trades compute for latency
    result["energy"] = joules.summary(sum(len(g.tokens) for g, _ in timed_runs)) if joules else None
    if drafter is not None and method != "loop":
        stats = acceptance_stats(gen.rounds, k)
        result.update(stats, draft_forwards=gen.draft_forwards, generation=gen)
    return result


def run_prompt(setup: Setup, kind: str, text: str, args) -> dict:
    """Every method on one prompt: timings, acceptance, costs, lossless check, marked text."""
    tok, device = setup.target.tokenizer, setup.target.device
    enc = encode_prompt(tok, text, device)
    prompt = enc["input_ids"][0].tolist()
    res = {"prompt": text, "prompt_tokens": len(prompt), "methods": {}, "costs": {}}
    baseline = time_method(setup, "target", prompt, enc, args.k, args)
    loop = time_method(setup, "loop", prompt, enc, args.k, args)
    res["methods"]["target alone (HF generate)"] = baseline
    res["methods"]["target alone (our loop)"] = loop
    drafters = {"ours": setup.drafter, "lookup": LookupDrafter(args.ngram, setup.vocab)}
    with torch.inference_mode():
        for method in setup.methods:
            if method in drafters and drafters[method] is not None:
                res["costs"][method] = measure_costs(setup.target_lm, drafters[method], prompt, args.k)
    for method in setup.methods:
        print(f"  {kind}: {method} ...", file=sys.stderr, flush=True)
        m = time_method(setup, method, prompt, enc, args.k, args)
        cost = res["costs"].get(method)
        if cost and m.get("alpha") is not None:
            m["predicted_speedup"] = expected_speedup(m["alpha"], args.k, cost["c"])
            m["predicted_speedup_measured_verify"] = expected_speedup(m["alpha"], args.k, cost["c"], cost["verify_ratio"])
        res["methods"][method] = m
    for name, m in res["methods"].items():
        m["speedup_vs_hf"] = m["tok_s_mean"] / baseline["tok_s_mean"]
        if m["energy"] and baseline["energy"]:  # < 1: fewer joules per token than the target alone
            m["energy_vs_hf"] = m["energy"]["per_unit"]["j_per_unit"] / baseline["energy"]["per_unit"]["j_per_unit"]
        m["speedup_vs_loop"] = m["tok_s_mean"] / loop["tok_s_mean"]
        if args.temperature == 0 and name != "target alone (HF generate)":
            with torch.inference_mode():
                m["lossless"] = lossless_report(setup.target.model, prompt, baseline["tokens"], m["tokens"])
        gen = m.pop("generation", None)
        if gen is not None:
            m["marked_text"] = render_marked(tok, gen, color=False)
            m["_generation"] = gen
        m["text"] = tok.decode(m["tokens"], skip_special_tokens=True)
    return res


def sweep_k(setup: Setup, prompt_text: str, args) -> list[dict]:
    """Our methods at each k of --sweep-k on one prompt; the fastest row per method is the peak."""
    enc = encode_prompt(setup.target.tokenizer, prompt_text, setup.target.device)
    prompt = enc["input_ids"][0].tolist()
    loop = time_method(setup, "loop", prompt, enc, 1, args)["tok_s_mean"]
    rows = []
    for method in [m for m in ("ours", "lookup") if m in setup.methods]:
        drafter = setup.drafter if method == "ours" else LookupDrafter(args.ngram, setup.vocab)
        for k in args.sweep_k:
            print(f"  sweep: {method} k={k} ...", file=sys.stderr, flush=True)
            m = time_method(setup, method, prompt, enc, k, args)
            with torch.inference_mode():
                cost = measure_costs(setup.target_lm, drafter, prompt, k)
            rows.append({"method": method, "k": k, "tok_s": m["tok_s"], "tok_s_mean": m["tok_s_mean"],
                         "speedup_vs_loop": m["tok_s_mean"] / loop, "alpha": m["alpha"], "c": cost["c"],
                         "verify_ratio": cost["verify_ratio"],
                         "tokens_per_target_forward": m["tokens_per_target_forward"],
                         "predicted_speedup": expected_speedup(m["alpha"], k, cost["c"]), "peak": False})
        best = max((r for r in rows if r["method"] == method), key=lambda r: r["tok_s_mean"])
        best["peak"] = True
    return rows


def print_prompt_result(setup: Setup, kind: str, res: dict, args) -> None:
    color = use_color(args)
    print(f"\n=== {kind} ({res['prompt_tokens']} prompt tokens) ===")
    for label, cost in res["costs"].items():
        print(f"cost {label}: target step {cost['target_step_ms']:.1f} ms, draft step {cost['draft_step_ms']:.2f} ms, "
              f"c = {cost['c']:.3f}, verify k+1 = {cost['verify_ratio']:.2f} target steps")
    print(results_io.markdown_table(METHOD_HEADERS, method_rows(res)))
    for name, m in res["methods"].items():
        gen = m.get("_generation")
        if gen is None:
            continue
        legend = f"{GREEN}accepted draft{RESET} / target" if color else "«accepted draft» / target"
        print(f"--- {name} ({legend}) ---\n{render_marked(setup.target.tokenizer, gen, color)}\n")
        print(histogram_text(m["histogram"]))


def load_setup(args) -> Setup:
    device = models.pick_device(args.device)
    dtype = models.pick_dtype(device, args.dtype)
    draft_name, target_name = args.draft, args.target
    if target_name is None:
        default_draft, target_name = default_pair(device, dtype)
        draft_name = draft_name or default_draft
    draft_name = draft_name or registry_draft_for(target_name)
    models.require_available([n for n in (target_name, draft_name) if n and not n.startswith("self:")],
                             args.revision, args.cache_dir)
    target = models.load_from_args(args, target_name)
    depth = target.model.config.get_text_config().num_hidden_layers
    self_layers = parse_self_draft(draft_name, depth)
    wanted = None if args.methods == "auto" else {m.strip() for m in args.methods.split(",")}
    needs_draft = bool(draft_name) and (wanted is None or bool(wanted & set(NEEDS_DRAFT_MODEL)))
    draft = models.load_from_args(args, draft_name) if needs_draft and self_layers is None else None
    compat = check_compatibility(target, draft, self_layers) if needs_draft else None
    methods = choose_methods(args.methods, compat, self_layers)
    for warning in (compat or {}).get("warnings", []):
        print(f"warning: {warning}", file=sys.stderr)
    setup = Setup(target, draft, self_layers, compat, methods, CachedLM(target.model),
                  build_drafter(target, draft, self_layers, compat), eos_ids_of(target.model, target.tokenizer),
                  target.model.config.get_text_config().vocab_size, energy.EnergyMeter.detect(device))
    if setup.meter.available:
        setup.meter.measure_idle(DEFAULT_IDLE_SECONDS)
    return setup


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    validate_args(parser, args)
    models.set_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    setup = load_setup(args)
    prompts = {"custom": args.prompt} if args.prompt else (
        PROMPTS if args.prompt_kind == "all" else {args.prompt_kind: PROMPTS[args.prompt_kind]})
    json_path, _ = results_io.result_paths(args.output_dir, "speculative_demo")
    print(setup.meter.status_line())
    report = {"environment": {**results_io.environment(setup.target.device, args.seed, argv),
                              "energy": setup.meter.describe()},
              "target": setup.target.context(), "draft": setup.draft.context() if setup.draft else None,
              "compatibility": setup.compat, "methods": setup.methods,
              "settings": {"k": args.k, "max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
                           "repetitions": args.repetitions, "warmup": args.warmup, "ngram": args.ngram,
                           "self_layers": setup.self_layers, "threads": torch.get_num_threads(), "load_average": [round(v, 2) for v in os.getloadavg()]},
              "prompts": {}, "sweep": None}
    with models.translated_errors(setup.target.label, setup.target.device):
        for kind, text in prompts.items():
            res = run_prompt(setup, kind, text, args)
            print_prompt_result(setup, kind, res, args)
            report["prompts"][kind] = res
            write_report(json_path, report)
        if args.sweep_k:
            report["sweep"] = sweep_k(setup, next(iter(prompts.values())), args)
            print(results_io.markdown_table(SWEEP_HEADERS, sweep_rows(report["sweep"])))
    json_path, md_path = write_report(json_path, report)
    print(f"wrote {json_path} and {md_path}")
    return 0


def write_report(json_path, report: dict):
    """JSON without the in-memory Generation objects, and the Markdown view."""
    clean = {**report, "prompts": {kind: {**res, "methods": {name: {k: v for k, v in m.items() if k != "_generation"}
                                                              for name, m in res["methods"].items()}}
                                   for kind, res in report["prompts"].items()}}
    return results_io.write_results(json_path, clean, render_markdown(clean))


if __name__ == "__main__":
    models.run_cli(main)
