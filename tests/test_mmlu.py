"""mmlu.py: lm-eval's prompt bytes, tokenization, chat-template delimiter and left truncation, data checks,
and scoring through the engine interface (single pass where letters are single tokens, per letter
otherwise), on tiny models; on the real SmolLM2, single-pass and per-choice predictions agree.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

import engines
import mmlu
import models

pytestmark = pytest.mark.usefixtures("one_thread")

DOC = {"question": "  What is 2 + 2?\n", "choices": ["3", "4", "5", "22"], "answer": 1}
SHOTS = [
    {"question": "What is 1 + 1?", "choices": ["2", "1", "0", "11"], "answer": 0},
    {"question": "Which is a prime?", "choices": ["4", "6", "7", "9"], "answer": 2},
]
EXPECTED_TWO_SHOT = (
    "The following are multiple choice questions (with answers) about abstract algebra.\n\n"
    "What is 1 + 1?\nA. 2\nB. 1\nC. 0\nD. 11\nAnswer: A\n\n"
    "Which is a prime?\nA. 4\nB. 6\nC. 7\nD. 9\nAnswer: C\n\n"
    "What is 2 + 2?\nA. 3\nB. 4\nC. 5\nD. 22\nAnswer:"
)


@pytest.fixture(scope="module")
def llama(tiny_models):
    return engines.load(str(tiny_models["llama"]), engine="transformers", device="cpu", dtype="fp32")


# ----------------------------------------------------------------------------------------------
# Prompts and tokenization
# ----------------------------------------------------------------------------------------------

def test_two_shot_prompt_is_byte_exact():
    assert mmlu.build_prompt("abstract_algebra", DOC, SHOTS) == EXPECTED_TWO_SHOT


def test_zero_shot_prompt_is_description_then_question():
    assert mmlu.build_prompt("us_foreign_policy", DOC, []) == (
        "The following are multiple choice questions (with answers) about us foreign policy.\n\n"
        "What is 2 + 2?\nA. 3\nB. 4\nC. 5\nD. 22\nAnswer:")


def test_encode_pair_splits_like_lm_eval(llama):
    context, cont = mmlu.encode_pair(llama, "Answer: ", "A")  # trailing space moves to the continuation
    assert context == llama.encode("Answer:") and llama.decode(cont) == " A"
    assert context + cont == llama.encode("Answer: A")


def test_chat_template_drops_the_target_delimiter_as_lm_eval_does(llama):
    """lm-eval --apply_chat_template: description as system message, solved examples + question as one
    user message (examples keep " A"), and the continuation is "A" with no delimiter. The context's
    final "\\n" moves into the continuation (lm-eval's _encode_pair), so each letter scores as the two
    tokens "Ċ" + "A", not " A" ("ĠA") as in the plain prompt: spelled out in the vocabulary."""
    vocab = llama.tokenizer.get_vocab()
    chat = mmlu.make_request(llama, "abstract_algebra", 0, DOC, SHOTS, chat_template=True)
    plain = mmlu.make_request(llama, "abstract_algebra", 0, DOC, SHOTS, chat_template=False)
    assert chat.continuation_ids == [[vocab["Ċ"], vocab[x]] for x in "ABCD"]
    assert plain.continuation_ids == [[vocab[f"Ġ{x}"]] for x in "ABCD"]
    messages = mmlu.build_chat_messages("abstract_algebra", DOC, SHOTS)
    assert messages[0] == {"role": "system", "content": mmlu.description("abstract_algebra")}
    assert messages[1]["content"] == EXPECTED_TWO_SHOT.split("\n\n", 1)[1]  # examples keep " A", " C"
    prompt = llama.chat_prompt(messages)
    assert chat.context_ids == llama.encode(prompt.rstrip("\n"), add_special_tokens=False)
    # lm-eval scores (context, "A") by summing the continuation's token log-probs: by hand here
    scores = mmlu.score(llama, [chat], batch_size=4)[("abstract_algebra", 0)]
    for letter, got in zip("ABCD", scores):
        ids = list(chat.context_ids)
        expected = 0.0
        for token in (vocab["Ċ"], vocab[letter]):
            expected += torch.log_softmax(llama.begin(ids).double(), -1)[token].item()
            ids.append(token)
        assert got == pytest.approx(expected, abs=1e-4)


def test_prompts_longer_than_the_context_keep_their_last_tokens(tiny_model_factory):
    """lm-eval feeds (context + continuation)[-(max_length + 1):][:-1]: with one-token letters the last
    max_length context tokens. The result counts the truncated prompts."""
    engine = engines.load(str(tiny_model_factory("llama", max_position_embeddings=128)), engine="transformers",
                          device="cpu", dtype="fp32")
    assert engine.context_length == 128
    long_doc = dict(DOC, question="the river and the mountain " * 20 + "what is it?")
    requests = [mmlu.make_request(engine, "virology", 0, long_doc, SHOTS, False),
                mmlu.make_request(engine, "virology", 1, DOC, [], False)]
    assert len(requests[0].context_ids) > 128 and requests[0].truncated(128) and not requests[1].truncated(128)
    scores = mmlu.score(engine, requests, batch_size=2)
    last = requests[0].context_ids[-128:]
    expected = torch.log_softmax(engine.begin(last).double(), -1)[[c[0] for c in requests[0].continuation_ids]]
    assert scores[("virology", 0)] == pytest.approx(expected.tolist(), abs=1e-4)
    summary = mmlu.summarise(requests, scores, engine.context_length)
    assert summary["truncated_prompts"] == 1 and [q.truncated for q in summary["questions"]] == [True, False]


# ----------------------------------------------------------------------------------------------
# Data: read and checked before any model loads
# ----------------------------------------------------------------------------------------------

def write_csv(root, subject, split, text):
    (root / split).mkdir(parents=True, exist_ok=True)
    (root / split / f"{subject}_{split}.csv").write_text(text)


def test_csv_reader_keeps_choices_verbatim(tmp_path):
    write_csv(tmp_path, "virology", "test", '"Q, with comma?", 1.50 ,b,"c\nd",e,D\n')
    assert mmlu.load_split("virology", "test", str(tmp_path)) == [
        {"question": "Q, with comma?", "choices": [" 1.50 ", "b", "c\nd", "e"], "answer": 3}]


def test_bad_data_is_a_user_error_naming_the_file(tmp_path):
    with pytest.raises(models.UserError, match="virology_test.csv is missing.*data.tar layout"):
        mmlu.load_docs(["virology"], [0], None, str(tmp_path))
    write_csv(tmp_path, "virology", "test", "q,a,b,c,d,A\nq2,a,b,c\n")
    with pytest.raises(models.UserError, match=r"virology_test.csv, row 2: expected 6 columns .* got 4"):
        mmlu.load_docs(["virology"], [0], None, str(tmp_path))
    write_csv(tmp_path, "virology", "test", "q,a,b,c,d,E\n")
    with pytest.raises(models.UserError, match="row 1: .*ending in 'E'"):
        mmlu.load_docs(["virology"], [0], None, str(tmp_path))
    write_csv(tmp_path, "virology", "test", "")
    with pytest.raises(models.UserError, match="virology has no test questions"):
        mmlu.load_docs(["virology"], [0], None, str(tmp_path))
    write_csv(tmp_path, "virology", "test", "q,a,b,c,d,A\n")
    write_csv(tmp_path, "virology", "dev", "q,a,b,c,d,B\n")
    with pytest.raises(models.UserError, match="1 dev examples, fewer than --mmlu-shots 5"):
        mmlu.load_docs(["virology"], [0, 5], None, str(tmp_path))
    docs = mmlu.load_docs(["virology"], [0, 1], 7, str(tmp_path))
    assert len(docs[0].test) == 1 and len(docs[0].dev) == 1


# ----------------------------------------------------------------------------------------------
# Scoring
# ----------------------------------------------------------------------------------------------

def requests_for(engine, n=6, shots=1):
    docs = [{"question": f"Question number {i} about the river and the mountain?",
             "choices": ["paris", "city", "water", "light"], "answer": i % 4} for i in range(n)]
    return [mmlu.make_request(engine, "high_school_physics", i, d, SHOTS[:shots], False) for i, d in enumerate(docs)]


def test_single_pass_matches_per_choice_scoring(llama):
    reqs = requests_for(llama)
    assert all(r.single_token for r in reqs), "the tiny tokenizer has single-token ' A'..' D'"
    fast = mmlu.score(llama, reqs, batch_size=4)
    slow = mmlu.score(llama, reqs, batch_size=4, single_pass=False)
    unbatched = mmlu.score(llama, reqs, batch_size=1)
    for key in fast:
        assert fast[key] == pytest.approx(slow[key], abs=1e-4)
        assert fast[key] == pytest.approx(unbatched[key], abs=1e-4)
    r = reqs[0]  # one log-likelihood by hand
    expected = torch.log_softmax(llama.begin(r.context_ids).float(), -1)[r.continuation_ids[2][0]].item()
    assert fast[(r.subject, r.index)][2] == pytest.approx(expected, abs=1e-4)


def test_multi_token_letters_fall_back_to_per_choice(llama):
    ctx = llama.encode("Which answer is right?\nAnswer:")
    conts = [llama.encode(" A .", False), llama.encode(" B", False), llama.encode(" C", False), llama.encode(" D", False)]
    req = mmlu.Request("virology", 0, 0, ctx, conts)
    assert not req.single_token
    scores = mmlu.score(llama, [req], batch_size=8)
    with torch.no_grad():
        logp = torch.log_softmax(llama.model(torch.tensor([ctx + conts[0]])).logits[0].float(), -1)
    by_hand = sum(logp[len(ctx) - 1 + j, t].item() for j, t in enumerate(conts[0]))
    assert scores[("virology", 0)][0] == pytest.approx(by_hand, abs=1e-4)


def test_llamacpp_scores_as_transformers_does_on_the_same_weights(llama, tiny_gguf):
    cpp = engines.load(str(tiny_gguf), engine="llama.cpp", threads=1)
    try:
        reqs_hf, reqs_cpp = requests_for(llama, n=8, shots=2), requests_for(cpp, n=8, shots=2)
        assert [r.context_ids for r in reqs_hf] == [r.context_ids for r in reqs_cpp]
        a, b = mmlu.score(llama, reqs_hf, 4), mmlu.score(cpp, reqs_cpp, 4)
        assert all(a[k] == pytest.approx(b[k], abs=1e-3) for k in a)
    finally:
        cpp.close()


def test_summary_counts_accuracy_micro_and_macro():
    reqs = [mmlu.Request("a", i, 0, [1], [[1], [2], [3], [4]]) for i in range(3)]
    reqs.append(mmlu.Request("b", 0, 3, [1], [[1], [2], [3], [4]]))
    scores = {("a", 0): [0.0, -1, -2, -3], ("a", 1): [-5, 0.0, -1, -1], ("a", 2): [-1, -1, -1, -1],
              ("b", 0): [-3, -2, -1, -0.5]}
    summary = mmlu.summarise(reqs, scores, 2048)
    assert [q.prediction for q in summary["questions"]] == ["A", "B", "A", "D"]  # ties -> first
    assert summary["subjects"]["a"].correct == 2 and summary["subjects"]["a"].total == 3
    assert summary["micro"].accuracy == pytest.approx(3 / 4)
    assert summary["macro"]["accuracy"] == pytest.approx((2 / 3 + 1) / 2)
    assert summary["micro"].stderr == pytest.approx(math.sqrt(0.75 * 0.25 / 3))


def test_run_returns_a_record(llama, tmp_path):
    write_csv(tmp_path, "virology", "test", "".join(f"q{i} about water?,paris,city,water,light,{'ABCD'[i % 4]}\n"
                                                    for i in range(5)))
    write_csv(tmp_path, "virology", "dev", "d about water?,paris,city,water,light,A\n")
    docs = mmlu.load_docs(["virology"], [1], None, str(tmp_path))
    args = SimpleNamespace(chat_template=False, mmlu_batch_size=4, mmlu_limit=None, mmlu_data=str(tmp_path))

    class Bar:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def update(self, n):
            pass
    result = mmlu.run(llama, docs, 1, args, lambda **kw: Bar())
    assert result.shots == 1 and result.micro.total == 5 and len(result.questions) == 5
    assert result.max_length == llama.context_length and result.truncated_prompts == 0
    assert result.to_dict()["micro"]["total"] == 5


# ----------------------------------------------------------------------------------------------
# The real SmolLM2
# ----------------------------------------------------------------------------------------------

def test_real_smollm2_letters_are_single_tokens_and_scoring_agrees(smollm2_loaded, mmlu_dir):
    from engines.hf import TransformersEngine
    engine = TransformersEngine(smollm2_loaded)
    docs = mmlu.load_docs(["world_religions", "computer_security"], [1], 2, str(mmlu_dir))
    reqs = mmlu.build_requests(engine, docs, 1, False)
    assert all(r.single_token for r in reqs)
    assert [engine.decode(c) for c in reqs[0].continuation_ids] == [" A", " B", " C", " D"]
    fast = mmlu.score(engine, reqs, batch_size=4)
    slow = mmlu.score(engine, reqs, batch_size=4, single_pass=False)

    def predictions(scores):
        return [q.prediction for q in mmlu.summarise(reqs, scores, engine.context_length)["questions"]]
    assert predictions(fast) == predictions(slow)
    chat = mmlu.make_request(engine, "virology", 0, DOC, [], chat_template=True)
    assert engine.tokenizer.decode(chat.context_ids).endswith("<|im_start|>assistant")  # "\n" moved to the continuation
    assert [engine.decode(c) for c in chat.continuation_ids] == ["\nA", "\nB", "\nC", "\nD"]
