"""speculative_demo.py: lossless greedy output, exact rollback, the target's distribution at T > 0.

Tiny random-weight llama models share one tokenizer, so they pair up as draft and target:
- a 1-layer draft with other weights (the target almost never agrees: the rejection path),
- a copy of the target with noise added (agrees often: acceptance and rejection mixed),
- the target's own first layer (`self:1`), and prompt lookup (no draft model).
The real SmolLM2-135M-Instruct checks that self-speculation and lookup are lossless on real text.
"""

from __future__ import annotations

import json

import pytest
import torch

import models
import speculative_demo as sd

PROMPTS = ["Summarise: the model answers the question about the capital city of france and paris.",
           "def train(x, y):\n    return x + y",
           "Hello world, what is a good language for data?"]
pytestmark = pytest.mark.usefixtures("one_thread")
SIGNIFICANCE = 0.001  # chi-square tests reject "same distribution" below this p-value (seeded: deterministic)


# ----------------------------------------------------------------------------------------------
# Fixtures
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def target(tiny_models):
    return models.load(str(tiny_models["llama"]), device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def other_draft(tiny_model_factory):
    """1 layer, different seed: the target rejects nearly everything it proposes."""
    return models.load(str(tiny_model_factory("llama", seed=7, num_hidden_layers=1)), device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def noisy_draft(tiny_models, tmp_path_factory):
    """The target's weights plus noise: close enough to be accepted often, not always."""
    loaded = models.load(str(tiny_models["llama"]), device="cpu", dtype="fp32")
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for param in loaded.model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.3 * param.std())
    out = tmp_path_factory.mktemp("noisy-draft")
    loaded.model.save_pretrained(out)
    loaded.tokenizer.save_pretrained(out)
    return models.load(str(out), device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def foreign_draft(tiny_model_factory, tmp_path_factory):
    """A draft whose tokenizer has another vocabulary (300 ids): only universal assisted generation."""
    from conftest import _corpus, build_tiny_model
    from tokenizers import Tokenizer, decoders, pre_tokenizers, trainers
    from tokenizers import models as tok_models
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(tok_models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(_corpus(), trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|im_end|>",
                                   unk_token="<|endoftext|>")
    fast.chat_template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    root = tmp_path_factory.mktemp("foreign")
    fast.save_pretrained(root / "tok")
    return models.load(str(build_tiny_model("llama", root / "model", root / "tok", seed=5, num_hidden_layers=1)),
                       device="cpu", dtype="fp32")


def drafter_for(target, draft=None, layers=None):
    vocab = target.model.config.vocab_size
    if draft is None and layers is None:
        return sd.LookupDrafter(sd.DEFAULT_NGRAM, vocab)
    lm = sd.CachedLM(target.model, layers) if layers else sd.CachedLM(draft.model)
    return sd.ModelDrafter(lm, vocab, vocab, "test")


def prompt_ids(target, text):
    return sd.encode_prompt(target.tokenizer, text, "cpu")["input_ids"][0].tolist()


@torch.inference_mode()
def plain_greedy(target, prompt, n):
    return sd.speculative_generate(sd.CachedLM(target.model), sd.NoDrafter(), prompt, 1, n, 0.0, set(), None).tokens


@torch.inference_mode()
def speculate(target, drafter, prompt, k, n, temperature=0.0, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return sd.speculative_generate(sd.CachedLM(target.model), drafter, prompt, k, n, temperature, set(), generator)


def chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor, min_expected: float = 5.0) -> float:
    """Pearson's chi-square goodness of fit; cells expecting < min_expected are pooled into one."""
    expected = probs * counts.sum()
    big = expected >= min_expected
    observed = torch.cat([counts[big], counts[~big].sum().reshape(1)])
    expected = torch.cat([expected[big], expected[~big].sum().reshape(1)])
    keep = expected > 0
    observed, expected = observed[keep], expected[keep]
    statistic = float(((observed - expected) ** 2 / expected).sum())
    dof = len(expected) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                         torch.tensor(statistic / 2, dtype=torch.float64)))


# ----------------------------------------------------------------------------------------------
# Greedy: exactly the target's output
# ----------------------------------------------------------------------------------------------

def test_our_plain_loop_matches_transformers_generate(target):
    enc = sd.encode_prompt(target.tokenizer, PROMPTS[0], "cpu")
    with torch.inference_mode():
        reference, forwards = sd.hf_generate(target.model, enc, 20, 0.0, {}, 0)
    assert plain_greedy(target, enc["input_ids"][0].tolist(), 20) == reference
    assert forwards == 20  # one target pass per token without a draft


@pytest.mark.parametrize("k", range(1, 9))
def test_greedy_speculation_equals_target_alone_for_every_k(target, noisy_draft, other_draft, k):
    for text in PROMPTS:
        prompt = prompt_ids(target, text)
        reference = plain_greedy(target, prompt, 24)
        for label, drafter in [("noisy draft", drafter_for(target, noisy_draft)),
                               ("self:1", drafter_for(target, layers=1)), ("lookup", drafter_for(target)),
                               ("other draft", drafter_for(target, other_draft))]:
            if label == "other draft" and k not in (1, 8):
                continue  # it is rejected every round: two k suffice for that path
            gen = speculate(target, drafter, prompt, k, 24)
            assert gen.tokens == reference, f"{label}, k={k}, prompt {text[:20]!r}"


def test_the_draft_pairs_exercise_both_acceptance_and_rejection(target, noisy_draft, other_draft):
    prompt = prompt_ids(target, PROMPTS[0])
    alphas = {}
    for label, drafter in [("noisy", drafter_for(target, noisy_draft)), ("self:1", drafter_for(target, layers=1)),
                           ("other", drafter_for(target, other_draft))]:
        alphas[label] = sd.acceptance_stats(speculate(target, drafter, prompt, 4, 32).rounds, 4)["alpha"]
    assert 0.2 < alphas["noisy"] < 1.0 and 0.1 < alphas["self:1"] < 1.0, alphas
    assert alphas["other"] < 0.2, alphas


def test_acceptance_counts_add_up(target, noisy_draft):
    prompt = prompt_ids(target, PROMPTS[1])
    k = 4
    gen = speculate(target, drafter_for(target, noisy_draft), prompt, k, 40)
    stats = sd.acceptance_stats(gen.rounds, k)
    assert len(gen.tokens) == 40 == sum(len(r.emitted) for r in gen.rounds)
    assert sum(gen.from_draft) == gen.accepted == stats["accepted"] == sum(r.accepted for r in gen.rounds)
    assert len(gen.tokens) - sum(gen.from_draft) == len(gen.rounds)  # one target token per round
    assert gen.target_forwards == len(gen.rounds)  # ONE verify pass per round (the first also prefills)
    assert gen.draft_forwards == gen.proposed  # one draft pass per proposed token
    assert sum(stats["histogram"]) == stats["drafting_rounds"]
    assert sum(n * c for n, c in enumerate(stats["histogram"])) == stats["accepted"]
    assert stats["tokens_per_target_forward"] == pytest.approx(40 / len(gen.rounds))
    assert all(r.accepted <= r.proposed <= k for r in gen.rounds)


def test_drafts_stop_at_the_token_budget(target):
    gen = speculate(target, drafter_for(target, layers=1), prompt_ids(target, PROMPTS[2]), 8, 5)
    assert len(gen.tokens) == 5 and all(r.proposed <= 4 for r in gen.rounds)


# ----------------------------------------------------------------------------------------------
# KV caches after rollback equal a fresh computation
# ----------------------------------------------------------------------------------------------

def assert_cache_matches_fresh(model, cache, seq, layers=None):
    from transformers import DynamicCache
    fresh = DynamicCache()
    with torch.inference_mode(), sd.first_layers(model, layers):
        model(input_ids=torch.tensor([seq[:cache.get_seq_length()]]), past_key_values=fresh, use_cache=True)
    assert len(cache.layers) == len(fresh.layers) == (layers or model.config.num_hidden_layers)
    for mine, ref in zip(cache.layers, fresh.layers):
        assert mine.keys.shape == ref.keys.shape
        torch.testing.assert_close(mine.keys, ref.keys, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(mine.values, ref.values, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("draft_kind", ["noisy", "self:1"])
def test_rollback_leaves_both_caches_equal_to_a_fresh_computation(target, noisy_draft, draft_kind):
    prompt = prompt_ids(target, PROMPTS[0])
    drafter = drafter_for(target, noisy_draft) if draft_kind == "noisy" else drafter_for(target, layers=1)
    target_lm = sd.CachedLM(target.model)
    seq, rejected = list(prompt), 0
    with torch.inference_mode():
        for _ in range(8):
            step = sd.speculative_round(target_lm, drafter, seq, 4, 0.0, None)
            rejected += step.accepted < step.proposed
            assert target_lm.cached == len(seq) + step.accepted
            assert drafter.lm.cached <= len(seq) + step.accepted
            seq += step.emitted
    assert rejected > 0, "the check needs at least one rejected round"
    assert target_lm.cached == len(seq) - 1
    assert_cache_matches_fresh(target.model, target_lm.cache, seq)
    assert_cache_matches_fresh(target.model if draft_kind == "self:1" else noisy_draft.model, drafter.lm.cache,
                               seq, layers=1 if draft_kind == "self:1" else None)


def test_self_draft_restores_the_full_model(target):
    depth = len(target.model.model.layers)
    with sd.first_layers(target.model, 1):
        assert len(target.model.model.layers) == 1
    assert len(target.model.model.layers) == depth == target.model.config.num_hidden_layers


# ----------------------------------------------------------------------------------------------
# Temperature > 0: the target's distribution
# ----------------------------------------------------------------------------------------------

def random_distribution(n, generator):
    """Uniform on the simplex (Dirichlet(1, ..., 1)): normalised exponential draws."""
    e = -torch.log(torch.rand(n, generator=generator))
    return e / e.sum()


def sample_with_rule(p, q, n, generator, rule):
    counts = torch.zeros(len(p))
    for _ in range(n):
        token = int(torch.multinomial(q, 1, generator=generator))
        replacement = rule(p, q, token, generator)
        counts[token if replacement is None else replacement] += 1
    return counts


def test_rejection_step_reproduces_the_target_distribution():
    generator = torch.Generator().manual_seed(0)
    for trial in range(3):
        p, q = random_distribution(8, generator), random_distribution(8, generator)
        counts = sample_with_rule(p, q, 20_000, generator, sd.accept_or_resample)
        assert chi_square_p_value(counts, p) > SIGNIFICANCE, (trial, counts / counts.sum(), p)
    # A one-hot q (prompt lookup's deterministic draft) is accepted with probability p(x).
    p = torch.tensor([0.5, 0.3, 0.1, 0.05, 0.05, 0, 0, 0])
    counts = sample_with_rule(p, torch.nn.functional.one_hot(torch.tensor(2), 8).float(), 20_000, generator,
                              sd.accept_or_resample)
    assert chi_square_p_value(counts, p) > SIGNIFICANCE


def test_the_distribution_test_can_fail():
    """Control: always accepting the draft gives q, and the same chi-square test rejects it."""
    generator = torch.Generator().manual_seed(1)
    p, q = random_distribution(8, generator), random_distribution(8, generator)
    counts = sample_with_rule(p, q, 20_000, generator, lambda *_: None)
    assert chi_square_p_value(counts, p) < SIGNIFICANCE


@pytest.mark.parametrize("draft_kind", ["noisy", "lookup"])
def test_sampled_first_token_follows_the_target_distribution(target, noisy_draft, draft_kind):
    """End to end: many rounds from the same cached prompt; the first emitted token ~ softmax(z / T)."""
    temperature, n = 0.02, 1500  # a low T concentrates the random model's flat logits on a few tokens
    text = "the capital of france is paris. the capital of"
    prompt = prompt_ids(target, text)
    drafter = drafter_for(target, noisy_draft) if draft_kind == "noisy" else drafter_for(target)
    with torch.inference_mode():
        p = torch.softmax(target.model(torch.tensor([prompt])).logits[0, -1] / temperature, -1)
        target_lm, counts = sd.CachedLM(target.model), torch.zeros(len(p))
        generator = torch.Generator().manual_seed(0)
        accepted = 0
        for _ in range(n):
            step = sd.speculative_round(target_lm, drafter, prompt, 2, temperature, generator)
            counts[step.emitted[0]] += 1
            accepted += step.accepted > 0
            target_lm.rollback(len(prompt) - 1)
            drafter.rollback(len(prompt) - 1)
    if draft_kind == "noisy":
        assert 0.05 * n < accepted < 0.95 * n, "both the accept and the resample branch must be exercised"
    assert chi_square_p_value(counts, p) > SIGNIFICANCE


# ----------------------------------------------------------------------------------------------
# Pieces: lookup, formula, lossless report, compatibility, rendering
# ----------------------------------------------------------------------------------------------

def test_find_continuation_copies_what_followed_the_latest_match():
    seq = [1, 2, 3, 9, 9, 1, 2, 3, 4, 5, 6, 7, 1, 2, 3]
    assert sd.find_continuation(seq, 3, 3) == [4, 5, 6]
    assert sd.find_continuation(seq, 10, 3) == [4, 5, 6, 7, 1, 2, 3]
    assert sd.find_continuation([5, 6, 7, 8], 2, 3) == []
    assert sd.find_continuation([4, 8, 1, 4], 2, 3) == [8, 1]  # falls back to a 1-gram


def test_expected_speedup_formula():
    assert sd.expected_speedup(0.0, 4, 0.0) == pytest.approx(1.0)
    assert sd.expected_speedup(1.0, 4, 0.0) == pytest.approx(5.0)
    assert sd.expected_speedup(0.8, 4, 0.05) == pytest.approx((1 - 0.8 ** 5) / 0.2 / 1.2)
    assert sd.expected_speedup(0.5, 4, 0.1, verify_ratio=2.0) == pytest.approx(1.9375 / 2.4)
    assert sd.expected_speedup(None, 4, 0.1) is None


def test_lossless_report_gives_position_and_the_targets_top2_gap(target):
    prompt = prompt_ids(target, PROMPTS[0])
    reference = plain_greedy(target, prompt, 10)
    assert sd.lossless_report(target.model, prompt, reference, list(reference)) == {
        "identical": True, "tokens_compared": 10}
    changed = reference[:6] + [(reference[6] + 1) % 512] + reference[7:]
    report = sd.lossless_report(target.model, prompt, reference, changed)
    assert report["first_mismatch"] == 6 and not report["identical"]
    with torch.inference_mode():
        top = target.model(torch.tensor([prompt + reference[:6]])).logits[0, -1].topk(2).values
    assert report["target_top2_logit_gap"] == pytest.approx(float(top[0] - top[1]), abs=1e-5)
    assert sd.lossless_report(target.model, prompt, reference, reference[:4])["first_mismatch"] == 4


def test_compatibility_check(target, other_draft, foreign_draft):
    same = sd.check_compatibility(target, other_draft, None)
    assert same["same_tokenizer"] and same["shared_vocab"] == 512
    assert any("parameters" in w for w in same["warnings"])  # a 1-layer draft of a 2-layer target is not cheap
    foreign = sd.check_compatibility(target, foreign_draft, None)
    assert not foreign["same_tokenizer"] and foreign["draft_vocab"] == 300
    assert any("universal" in w for w in foreign["warnings"])
    assert sd.choose_methods("auto", foreign, None)[0] == "universal"
    with pytest.raises(models.UserError, match="universal"):
        sd.choose_methods("ours", foreign, None)
    self_draft = sd.check_compatibility(target, None, 1)
    assert self_draft["same_tokenizer"] and 0.5 < self_draft["cost_share"] < 1  # 1 of 2 layers + lm_head
    assert any("not much cheaper" in w for w in self_draft["warnings"])


def test_default_pair_suits_the_device():
    assert sd.default_pair(torch.device("cpu"), torch.float32) == ("smollm2-135m", "smollm2-1.7b")
    draft, target = sd.default_pair(torch.device("mps"), torch.float16)
    assert target in models.REGISTRY[draft].draft_for
    assert sd.registry_draft_for("qwen2.5-7b") == "qwen2.5-0.5b"
    assert sd.registry_draft_for("smollm2-1.7b") == "smollm2-135m"
    assert sd.registry_draft_for("./some-local-dir") is None


def test_marked_text_and_colours(target):
    gen = sd.Generation(tokens=[], from_draft=[])
    pieces = target.tokenizer("the capital of france")["input_ids"]
    gen.tokens, gen.from_draft = pieces, [False] + [True] * (len(pieces) - 1)
    plain = sd.render_marked(target.tokenizer, gen, color=False)
    assert plain.replace(sd.OPEN_MARK, "").replace(sd.CLOSE_MARK, "") == target.tokenizer.decode(pieces)
    assert plain.count(sd.OPEN_MARK) == 1 and plain.endswith(sd.CLOSE_MARK)
    coloured = sd.render_marked(target.tokenizer, gen, color=True)
    assert sd.GREEN in coloured and coloured.endswith(sd.RESET) and sd.OPEN_MARK not in coloured


# ----------------------------------------------------------------------------------------------
# The script end to end
# ----------------------------------------------------------------------------------------------

def test_parser_rejects_bad_values():
    parser = sd.build_parser()
    for argv in (["--k", "0"], ["--sweep-k", "1,x"], ["--temperature", "-1"]):
        with pytest.raises(SystemExit):
            sd.validate_args(parser, parser.parse_args(argv))
    with pytest.raises(models.UserError, match="layers"):
        sd.parse_self_draft("self:30", 30)
    assert sd.parse_self_draft("self:12", 30) == 12 and sd.parse_self_draft("qwen2.5-0.5b", 30) is None


def test_script_writes_results_with_every_method_lossless(tiny_models, noisy_draft, tmp_path, capsys,
                                                          cpu_default_dtype):
    target_dir = str(tiny_models["llama"])
    draft_dir = noisy_draft.resolved.path
    assert sd.main(["--target", target_dir, "--draft", draft_dir, "--prompt-kind", "summarise",
                    "--max-new-tokens", "16", "--repetitions", "2", "--warmup", "1", "--sweep-k", "1,3",
                    "--output-dir", str(tmp_path), "--no-color"]) == 0
    data = json.loads(next(tmp_path.glob("speculative_demo-*.json")).read_text())
    methods = data["prompts"]["summarise"]["methods"]
    assert set(methods) == {"target alone (HF generate)", "target alone (our loop)", "ours", "hf-assisted",
                            "lookup", "hf-lookup"}
    # The model stops at EOS on its own, so the length may be under 16, but every method is lossless:
    # each yields exactly as many tokens as the target alone (random weights reach EOS earlier in bf16).
    expected = methods["target alone (our loop)"]["n_tokens"]
    assert 1 <= expected <= 16
    for name, m in methods.items():
        assert m["n_tokens"] == expected and len(m["tok_s_trials"]) == 2, name
        if name != "target alone (HF generate)":
            assert m["lossless"]["identical"], name
    ours = methods["ours"]
    assert 0 < ours["alpha"] < 1 and ours["predicted_speedup"] > 0 and "«" in ours["marked_text"]
    assert data["prompts"]["summarise"]["costs"]["ours"]["c"] > 0
    assert [r["k"] for r in data["sweep"] if r["method"] == "ours"] == [1, 3]
    assert sum(r["peak"] for r in data["sweep"]) == 2
    markdown = next(tmp_path.glob("speculative_demo-*.md")).read_text()
    assert "Leviathan prediction" in markdown and "Sweep over k" in markdown
    assert "speedup vs target" in capsys.readouterr().out


def test_script_self_draft_and_universal(tiny_models, foreign_draft, tmp_path):
    target_dir = str(tiny_models["llama"])
    assert sd.main(["--target", target_dir, "--draft", "self:1", "--prompt", "hello world", "--methods",
                    "ours,hf-assisted", "--max-new-tokens", "8", "--repetitions", "1", "--warmup", "0",
                    "--output-dir", str(tmp_path / "self")]) == 0
    data = json.loads(next((tmp_path / "self").glob("*.json")).read_text())
    assert data["compatibility"]["draft"] == "self:1" and data["draft"] is None
    methods = data["prompts"]["custom"]["methods"]
    assert all(m["lossless"]["identical"] for m in methods.values() if "lossless" in m)
    # HF's early exit drafts with the target module itself: only full-depth passes count as target passes.
    assert methods["hf-assisted"]["target_forwards"] <= methods["hf-assisted"]["n_tokens"]
    assert sd.main(["--target", target_dir, "--draft", foreign_draft.resolved.path, "--prompt", "hello world",
                    "--max-new-tokens", "8", "--repetitions", "1", "--warmup", "0",
                    "--output-dir", str(tmp_path / "uag")]) == 0
    data = json.loads(next((tmp_path / "uag").glob("*.json")).read_text())
    assert data["methods"][0] == "universal" and not data["compatibility"]["same_tokenizer"]
    assert data["prompts"]["custom"]["methods"]["universal"]["lossless"]["identical"]


def test_bad_draft_is_one_line_error(tiny_models, tmp_path):
    with pytest.raises(models.UserError, match="choose 1 <= N < 2"):
        sd.main(["--target", str(tiny_models["llama"]), "--draft", "self:5", "--output-dir", str(tmp_path)])


# ----------------------------------------------------------------------------------------------
# The real SmolLM2-135M-Instruct
# ----------------------------------------------------------------------------------------------

def test_real_smollm2_self_speculation_and_lookup_are_lossless(smollm2_loaded):
    real = smollm2_loaded
    prompt = sd.encode_prompt(real.tokenizer, sd.PROMPTS["summarise"], "cpu")["input_ids"][0].tolist()
    eos = sd.eos_ids_of(real.model, real.tokenizer)
    vocab = real.model.config.vocab_size
    with torch.inference_mode():
        target_lm = sd.CachedLM(real.model)
        reference = sd.speculative_generate(target_lm, sd.NoDrafter(), prompt, 1, 24, 0.0, eos, None).tokens
        for drafter in (sd.ModelDrafter(sd.CachedLM(real.model, 20), vocab, vocab, "self:20"),
                        sd.LookupDrafter(sd.DEFAULT_NGRAM, vocab)):
            gen = sd.speculative_generate(target_lm, drafter, prompt, 4, 24, 0.0, eos, None)
            assert gen.tokens == reference, drafter.label
            assert gen.accepted > 0 and gen.target_forwards < len(reference), drafter.label
    assert "reef" in real.tokenizer.decode(reference).lower()
