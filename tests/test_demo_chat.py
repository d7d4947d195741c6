"""demo_chat.py: history and templates, truncation, base-model stop, commands, arena math, what a
streamed reply prints, and the non-interactive mode end to end on tiny models and on the real SmolLM2
GGUF through both engines (llama.cpp and transformers)."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import demo_chat
import engines
import models
from engines.hf import TransformersEngine

ROOT = Path(__file__).resolve().parent.parent
FRANCE = "What is the capital of France?"
LANDMARK = "What is a famous landmark there?"


def load_tiny(path) -> engines.Engine:
    return engines.load(str(path), engine="transformers", device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def tiny_engines(tiny_models):
    """{family: Engine} for the chat llama and the base gpt_neox, transformers fp32 on CPU."""
    return {f: load_tiny(tiny_models[f]) for f in ("llama", "gpt_neox")}


def greedy(max_new_tokens=8):
    return demo_chat.GenerationSettings(temperature=0.0, top_p=1.0, max_new_tokens=max_new_tokens)


def collect(stream):
    chunks = list(stream)
    return "".join(c.text for c in chunks), chunks


class ScriptedEngine:
    """A real engine (its tokenizer, chat template and EOS ids) whose every step puts all probability
    on the next scripted token, so a test can make a model 'say' exactly what it needs (e.g. start a
    new 'User:' turn). `on_step(i)` runs before step i's logits are returned."""

    def __init__(self, engine: engines.Engine, script: list[int], on_step=None):
        self.engine, self.script, self.on_step, self.calls = engine, script, on_step, 0

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def _next(self) -> torch.Tensor:
        if self.on_step:
            self.on_step(self.calls)
        logits = torch.full((self.engine.vocab_size,), -1e9)  # (vocab,)
        logits[self.script[self.calls]] = 0.0
        self.calls += 1
        return logits

    def begin(self, ids: list[int]) -> torch.Tensor:
        self.calls = 0
        return self._next()

    def advance(self, token: int) -> torch.Tensor:
        return self._next()


# ----------------------------------------------------------------------------------------------
# Parser and commands (no model)
# ----------------------------------------------------------------------------------------------

def test_parser_defaults_and_validation():
    parser = demo_chat.build_parser()
    args = parser.parse_args([])
    assert (args.temperature, args.top_p, args.max_new_tokens) == (
        demo_chat.DEFAULT_TEMPERATURE, demo_chat.DEFAULT_TOP_P, demo_chat.DEFAULT_MAX_NEW_TOKENS)
    assert args.compare is None and args.prompt is None
    for bad in (["--compare", "tinyllama"], ["--temperature", "-1"], ["--top-p", "0"], ["--max-new-tokens", "0"]):
        with pytest.raises(SystemExit) as exc:
            demo_chat.validate_args(parser, parser.parse_args(bad))
        assert exc.value.code == 2
    args = parser.parse_args(["--compare", "a", "b", "--prompt", "x", "--prompt", "y"])
    assert args.compare == ["a", "b"] and args.prompt == ["x", "y"]


def test_parse_command():
    assert demo_chat.parse_command("What is /set?") is None
    assert demo_chat.parse_command("//etc/hosts is a file") is None  # '//' sends a literal '/'
    assert demo_chat.parse_command("/set temperature 0.2") == demo_chat.Command("set", "temperature 0.2")
    assert demo_chat.parse_command("  /SYSTEM  Be brief. ") == demo_chat.Command("system", "Be brief.")
    assert demo_chat.parse_command("/save") == demo_chat.Command("save", "")
    assert demo_chat.parse_command("/exit") == demo_chat.Command("quit", "")
    with pytest.raises(demo_chat.CommandError, match="unknown command /frobnicate"):
        demo_chat.parse_command("/frobnicate")


def test_apply_setting_changes_value_and_rejects_bad_input():
    settings = demo_chat.GenerationSettings()
    assert demo_chat.apply_setting(settings, "temperature 0.2") == "temperature = 0.2"
    demo_chat.apply_setting(settings, "top-p 0.5")
    demo_chat.apply_setting(settings, "max_new_tokens 12")
    assert (settings.temperature, settings.top_p, settings.max_new_tokens) == (0.2, 0.5, 12)
    for bad, message in [("top_p 1.5", "in \\(0, 1\\]"), ("max_new_tokens 2.5", "whole number"),
                         ("temperature -1", ">= 0"), ("beam 4", "usage"), ("temperature", "usage")]:
        with pytest.raises(demo_chat.CommandError, match=message):
            demo_chat.apply_setting(settings, bad)
    assert settings.max_new_tokens == 12


def test_read_message_multiline():
    def reader(lines):
        it = iter(lines)
        return lambda prompt: next(it)
    assert demo_chat.read_message(reader(["plain line"])) == "plain line"
    assert demo_chat.read_message(reader(['"""first', "second", 'third"""'])) == "first\nsecond\nthird"
    assert demo_chat.read_message(reader(['"""', "a", "", "b", '"""'])) == "a\n\nb"
    assert demo_chat.read_message(reader(['"""one line"""'])) == "one line"


def test_stop_string_helpers():
    stops = ["\nUser:"]
    assert demo_chat.find_stop("Paris.\nUser: next", stops) == 6
    assert demo_chat.find_stop("Paris.", stops) is None
    assert demo_chat.held_back("Paris.\nUs", stops) == 3  # could still become "\nUser:"
    assert demo_chat.held_back("Paris.\nUsa", stops) == 0
    assert demo_chat.held_back("Paris.", []) == 0


def test_sample_next_greedy_and_nucleus():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))  # (vocab,)
    assert engines.sample_next(logits, engines.Sampling(0.0, 1.0)) == 0
    gen = torch.Generator().manual_seed(0)
    seen = {engines.sample_next(logits, engines.Sampling(1.0, 0.7), gen) for _ in range(300)}
    assert seen == {0, 1}  # 0.5 + 0.3 reaches 0.7: the tail is never drawn
    seen = {engines.sample_next(logits, engines.Sampling(1.0, 0.9), gen) for _ in range(300)}
    assert seen == {0, 1, 2}


# ----------------------------------------------------------------------------------------------
# Generation, history and templates on tiny models
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["llama", "gpt_neox", "stablelm", "qwen2", "gemma3"])
def test_stream_generate_greedy_matches_transformers_generate(tiny_models, family):
    engine = load_tiny(tiny_models[family])
    tok = engine.tokenizer
    ids = engine.chat_ids([{"role": "user", "content": "the capital of france"}])
    text, chunks = collect(demo_chat.stream_generate(engine, ids, greedy(20)))
    reference = engine.model.generate(torch.tensor([ids]), max_new_tokens=20, min_new_tokens=20, do_sample=False)
    assert text == tok.decode(reference[0, len(ids):], skip_special_tokens=True)
    last = chunks[-1]
    assert last.finish_reason == "length" and last.generation_tokens == 20 and last.prompt_tokens == len(ids)
    assert last.generation_tps > 0 and last.ttft_s > 0 and last.peak_memory_gb > 0
    assert all(c.finish_reason is None for c in chunks[:-1]) and len(chunks) > 1  # streamed in pieces


def test_history_goes_through_the_chat_template(tiny_engines):
    chat = demo_chat.make_chat(tiny_engines["llama"], system="Be brief.")
    first = demo_chat.generate_reply(chat, "hello world", greedy(6), seed=0, on_chunk=lambda c: None)
    assert [m["role"] for m in chat.messages] == ["user", "assistant"]
    assert chat.messages[1]["content"] == first.text.strip()
    fit = demo_chat.fit_in_context(chat, "and the river", 6)
    prompt = chat.engine.tokenizer.decode(fit.prompt_ids)
    assert prompt.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhello world<|im_end|>")
    assert f"<|im_start|>assistant\n{first.text.strip()}<|im_end|>" in prompt
    assert prompt.endswith("<|im_start|>user\nand the river<|im_end|>\n<|im_start|>assistant\n")
    assert fit.dropped_turns == 0


def test_truncation_drops_oldest_turns_keeps_system(tiny_model_factory):
    engine = load_tiny(tiny_model_factory("llama", max_position_embeddings=64))
    chat = demo_chat.make_chat(engine, system="sys")
    assert chat.context_tokens == 64
    for i in range(4):
        chat.messages += [{"role": "user", "content": f"city {i}"}, {"role": "assistant", "content": f"river {i}"}]
    fit = demo_chat.fit_in_context(chat, "final question", 16)
    assert 1 <= fit.dropped_turns < 4 and len(fit.prompt_ids) + 16 <= 64
    assert chat.messages[-1] == {"role": "user", "content": "final question"}
    assert len(chat.messages) == 1 + 2 * (4 - fit.dropped_turns)
    assert chat.messages[0]["content"] == f"city {fit.dropped_turns}"  # the oldest went first
    prompt = engine.tokenizer.decode(fit.prompt_ids)
    assert prompt.startswith("<|im_start|>system\nsys<|im_end|>") and "city 0" not in prompt

    # a message that alone leaves less room than max_new_tokens shrinks the budget instead
    chat.messages = []
    long = " ".join(["water"] * 40)
    fit = demo_chat.fit_in_context(chat, long, 60)
    assert fit.max_new_tokens == 64 - len(fit.prompt_ids) < 60
    chat.messages = []
    with pytest.raises(models.UserError, match="shorten it"):
        demo_chat.fit_in_context(chat, " ".join(["water"] * 200), 8)


def test_truncation_is_reported_in_a_round(tiny_model_factory, tmp_path, capsys):
    engine = load_tiny(tiny_model_factory("llama", max_position_embeddings=64))
    session = make_session([demo_chat.make_chat(engine)], tmp_path, max_new_tokens=20)
    for i in range(4):
        demo_chat.run_round(session, f"question {i} about the city and the river")
    out = capsys.readouterr().out
    assert "dropped the 1 oldest turn(s) to fit its 64-token context" in out
    assert session.rounds[-1]["dropped_turns"] >= 1


def test_base_model_uses_fallback_template_and_stops_at_next_user_turn(tiny_engines):
    engine = tiny_engines["gpt_neox"]
    chat = demo_chat.make_chat(engine)
    assert chat.is_base_model and chat.stops == ["\nUser:"]
    ids = engine.chat_ids(chat.conversation([{"role": "user", "content": "hi"}]))
    assert engine.tokenizer.decode(ids) == "User: hi\nAssistant:"
    scripted = ScriptedEngine(engine, engine.encode(" Paris is the capital.\nUser: and what else?\n"))
    text, chunks = collect(demo_chat.stream_generate(scripted, ids, greedy(50), stops=chat.stops))
    assert text == " Paris is the capital."
    assert chunks[-1].finish_reason == "stop"
    assert not any("User" in c.text or c.text.endswith("\n") for c in chunks)  # the stop was never shown


def test_eos_and_end_of_turn_stop_the_reply(tiny_engines):
    engine = tiny_engines["llama"]
    im_end = engine.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end in engine.eos_ids
    scripted = ScriptedEngine(engine, engine.encode("paris") + [im_end] + engine.encode(" more"))
    text, chunks = collect(demo_chat.stream_generate(scripted, [1, 2], greedy(50)))
    assert text == "paris" and chunks[-1].finish_reason == "stop"
    # a base model's reply ending in a newline (a possible start of "\nUser:") and then EOS keeps it
    base = tiny_engines["gpt_neox"]
    scripted = ScriptedEngine(base, base.encode(" Paris.\n") + [base.tokenizer.eos_token_id])
    assert base.tokenizer.eos_token_id in base.eos_ids
    text, _ = collect(demo_chat.stream_generate(scripted, [1, 2], greedy(50), stops=["\nUser:"]))
    assert text == " Paris.\n"


def test_ctrl_c_stops_the_reply_and_keeps_what_was_shown(tiny_engines):
    chat = demo_chat.make_chat(tiny_engines["llama"])
    shown = []

    def on_chunk(chunk):
        if len(shown) == 3:
            raise KeyboardInterrupt
        shown.append(chunk.text)
    reply = demo_chat.generate_reply(chat, "tell a long story", greedy(40), seed=0, on_chunk=on_chunk)
    assert reply.finish_reason == "interrupted" and "interrupted" in demo_chat.format_footer(reply)
    assert reply.text.startswith("".join(shown)) and len(shown) == 3
    assert chat.messages[-1] == {"role": "assistant", "content": reply.text.strip()}
    after = demo_chat.generate_reply(chat, "go on", greedy(4), seed=0, on_chunk=lambda c: None)
    assert after.finish_reason in ("stop", "length") and len(chat.messages) == 4


def make_session(chats, tmp_path, **overrides):
    args = demo_chat.build_parser().parse_args(["--output-dir", str(tmp_path), "--temperature", "0"])
    for k, v in overrides.items():
        setattr(args, k, v)
    args.transcript_stamp = "test"
    settings = demo_chat.GenerationSettings(args.temperature, args.top_p, args.max_new_tokens)
    env = {"date": "2026-01-01", "os": "x", "python": "3", "packages": {}, "device": {"type": "cpu", "name": "cpu"},
           "cpu": {"model": "cpu", "cores_logical": 1, "native_bf16": False}, "ram_gb": 1, "command": "t"}
    return demo_chat.Session(chats, settings, args, env)


def test_interactive_commands_reset_set_system_save_stats(tiny_engines, tmp_path, capsys):
    session = make_session([demo_chat.make_chat(tiny_engines["llama"])], tmp_path, max_new_tokens=5)
    chat = session.chats[0]
    lines = iter(["hello", "/set max_new_tokens 3", "/system Answer in French.", "how are you", "/stats",
                  f"/save {tmp_path / 'mine.json'}", "/reset", "/bogus", "/quit", "never read"])
    demo_chat.run_interactive(session, read_line=lambda prompt: next(lines))
    out = capsys.readouterr().out
    assert session.settings.max_new_tokens == 3 and chat.system == "Answer in French."
    assert chat.messages == []  # /reset
    assert next(lines) == "never read"  # /quit left the loop
    assert "unknown command /bogus" in out and "Decode tok/s" in out
    saved = json.loads((tmp_path / "mine.json").read_text())
    assert [r["prompt"] for r in saved["rounds"]] == ["hello", "how are you"]
    assert saved["rounds"][1]["replies"][0]["stats"]["generation_tokens"] <= 3
    assert (tmp_path / "mine.md").read_text().startswith("# demo_chat transcript (chat)")


def test_ctrl_c_or_ctrl_d_at_the_prompt_exits(tiny_engines, tmp_path):
    session = make_session([demo_chat.make_chat(tiny_engines["llama"])], tmp_path)
    for exc in (KeyboardInterrupt, EOFError):
        def read_line(prompt, exc=exc):
            raise exc
        demo_chat.run_interactive(session, read_line=read_line)  # returns instead of raising
    assert session.rounds == []


# ----------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------

def test_columns_side_by_side_when_wide_sequential_when_narrow():
    last = demo_chat.GenerationChunk("", 5, 12, 100.0, 25.0, 0.12, 0.5, "stop")
    replies = [demo_chat.Reply("model-a", "Paris is the capital of France. " * 4, "stop", last),
               demo_chat.Reply("model-b", "Lyon.\nNo, Paris.", "stop", last)]
    wide = demo_chat.render_replies(replies, 120)
    lines = wide.splitlines()
    assert "a) model-a" in lines[0] and "b) model-b" in lines[0]
    assert all(len(line) <= 120 for line in lines)
    assert sum("12 tokens · 25.0 tok/s · TTFT 120 ms · peak RSS 0.50 GB" in line for line in lines) >= 1
    assert any("Lyon." in line and "Paris is the" in line for line in lines)  # the replies share rows
    narrow = demo_chat.render_replies(replies, 80)
    assert not any("model-a" in line and "model-b" in line for line in narrow.splitlines())
    assert narrow.index("model-a") < narrow.index("Paris") < narrow.index("model-b") < narrow.index("Lyon.")


# ----------------------------------------------------------------------------------------------
# Arena: votes and Elo
# ----------------------------------------------------------------------------------------------

def vote(models_, winner):
    return {"models": models_, "winner": winner}


def test_elo_matches_hand_computed_values():
    # Both start at 1000, K = 32. Vote 1: A wins, E_A = 0.5 -> A 1016, B 984.
    # Vote 2: A wins, E_A = 1 / (1 + 10^(-32/400)) = 0.545921 -> A += 32 * 0.454079 = 14.5305.
    # Vote 3: tie, E_A = 1 / (1 + 10^(-61.061/400)) = 0.586917 -> A += 32 * (0.5 - 0.586917) = -2.7813.
    votes = [vote(["A", "B"], "A"), vote(["A", "B"], "A"), vote(["A", "B"], None)]
    assert demo_chat.elo_ratings(votes[:1]) == {"A": 1016.0, "B": 984.0}
    r = demo_chat.elo_ratings(votes[:2])
    assert r["A"] == pytest.approx(1030.5305, abs=1e-3) and r["B"] == pytest.approx(969.4695, abs=1e-3)
    r = demo_chat.elo_ratings(votes)
    assert r["A"] == pytest.approx(1027.7471, abs=1e-3) and r["B"] == pytest.approx(972.2529, abs=1e-3)
    # three models, C wins: C beats A and B (+16 each); the A-B pair carries no information
    assert demo_chat.elo_ratings([vote(["A", "B", "C"], "C")]) == {"A": 984.0, "B": 984.0, "C": 1032.0}
    # order matters: an upset after a lead moves ratings more than before it
    assert demo_chat.elo_ratings([vote(["A", "B"], "B"), vote(["A", "B"], "A")])["A"] != 1000.0


def test_leaderboard_counts_win_rate_and_elo_threshold():
    votes = [vote(["A", "B"], "A")] * 3 + [vote(["A", "B"], None), vote(["A", "B"], "B"), vote(["A", "C"], "C")]
    board = {row["model"]: row for row in demo_chat.leaderboard(votes, min_votes=5)}
    assert (board["A"]["votes"], board["A"]["wins"], board["A"]["losses"], board["A"]["ties"]) == (6, 3, 2, 1)
    assert board["A"]["win_rate"] == pytest.approx(3.5 / 6)
    assert board["B"]["win_rate"] == pytest.approx(1.5 / 5)
    assert board["A"]["elo"] is not None and board["B"]["elo"] is not None
    assert board["C"]["elo"] is None and board["C"]["win_rate"] == 1.0  # one vote: no Elo yet
    assert board["A"]["elo"] > board["B"]["elo"]


def test_parse_vote():
    assert demo_chat.parse_vote("a", 2) == 0 and demo_chat.parse_vote(" B ", 2) == 1
    assert demo_chat.parse_vote("c", 2) is None and demo_chat.parse_vote("c", 3) == 2
    assert demo_chat.parse_vote("tie", 2) == "tie" and demo_chat.parse_vote("t", 2) == "tie"
    assert demo_chat.parse_vote("", 2) == "skip" and demo_chat.parse_vote("s", 2) == "skip"
    assert demo_chat.parse_vote("maybe", 2) is None


def test_votes_accumulate_across_runs_in_arena_files(tmp_path):
    last = demo_chat.GenerationChunk("", 5, 3, 1.0, 1.0, 0.1, 0.1, "stop")
    replies = [demo_chat.Reply("A", "x", "stop", last), demo_chat.Reply("B", "y", "stop", last)]
    contexts = {"A": {"dtype": "fp32"}, "B": {"dtype": "fp32"}}
    for choice in (0, 0, "tie", 1, 0):
        demo_chat.record_vote(tmp_path, replies, choice, "q", contexts)
    data = json.loads((tmp_path / "arena.json").read_text())
    assert [v["winner"] for v in data["votes"]] == ["A", "A", None, "B", "A"]
    top = data["leaderboard"][0]
    assert top["model"] == "A" and (top["wins"], top["losses"], top["ties"]) == (3, 1, 1)
    assert top["elo"] == pytest.approx(round(demo_chat.elo_ratings(data["votes"])["A"], 1))
    md = (tmp_path / "arena.md").read_text()
    assert "| A | 5 | 3 | 1 | 1 | 70% |" in md and "K = 32" in md


def test_compare_on_a_narrow_terminal_streams_one_after_another(tiny_engines, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "80")
    session = make_session([demo_chat.make_chat(t) for t in tiny_engines.values()], tmp_path, max_new_tokens=4)
    replies = demo_chat.run_round(session, "hello")
    out = capsys.readouterr().out
    a, b = (f"── {x}) {r.model}" for x, r in zip("ab", replies))
    assert out.index(a) < out.index(demo_chat.format_footer(replies[0])) < out.index(b)
    assert out.rstrip().endswith(demo_chat.format_footer(replies[1]))
    assert not any(demo_chat.COLUMN_GAP in line for line in out.splitlines())


def test_interactive_compare_records_a_vote(tiny_engines, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "120")
    session = make_session([demo_chat.make_chat(t) for t in tiny_engines.values()], tmp_path, max_new_tokens=4)
    lines = iter(["hello", "x", "b", "second", "", "/quit"])  # 'x' is an invalid vote, then b; Enter skips
    demo_chat.run_interactive(session, read_line=lambda prompt: next(lines))
    data = json.loads((tmp_path / "arena.json").read_text())
    assert len(data["votes"]) == 1 and data["votes"][0]["winner"] == session.chats[1].label
    assert "type a letter from a to b" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------
# Memory check
# ----------------------------------------------------------------------------------------------

def test_memory_estimate_and_refusal(tiny_models, monkeypatch):
    spec = models.REGISTRY["tinyllama"]
    cpu = torch.device("cpu")
    assert demo_chat.estimate_model_bytes("tinyllama", "transformers", cpu, torch.float16, "none") == \
        models.estimate_memory_bytes(spec, torch.float16, "none", demo_chat.ESTIMATE_CONTEXT_TOKENS)
    engine = load_tiny(tiny_models["llama"])  # what the estimate, made without loading, must match
    expected = engine.parameter_count() * 4 + engine.kv_bytes_per_token() * demo_chat.ESTIMATE_CONTEXT_TOKENS
    assert demo_chat.estimate_model_bytes(str(tiny_models["llama"]), "transformers", cpu, torch.float32,
                                          "none") == expected
    args = demo_chat.build_parser().parse_args(["--device", "cpu", "--dtype", "fp32"])
    targets = [("tinyllama", "transformers"), ("qwen2.5-1.5b", "transformers")]
    monkeypatch.setattr(demo_chat, "available_memory_bytes", lambda device: 2**30)
    with pytest.raises(models.UserError, match="will not fit together.*--quantize int4"):
        demo_chat.check_memory(targets, args)
    args.skip_memory_check = True
    assert "GB is free" in demo_chat.check_memory(targets, args)


def test_memory_estimate_of_a_gguf_depends_on_the_engine(smollm2_gguf):
    """llama.cpp maps the quantized file as it is and allocates an f16 KV cache of up to 4096 tokens
    (SmolLM2-135M: 30 layers x 3 KV heads x (64 + 64) x 2 bytes = 23,040 bytes a token); transformers
    de-quantizes the weights to the dtype."""
    cpu = torch.device("cpu")
    on_llama_cpp = demo_chat.estimate_model_bytes(str(smollm2_gguf), "llama.cpp", cpu, torch.float32, "none")
    assert on_llama_cpp == smollm2_gguf.stat().st_size + 23_040 * 4096
    on_transformers = demo_chat.estimate_model_bytes(str(smollm2_gguf), "transformers", cpu, torch.float32, "none")
    assert on_transformers > 3 * on_llama_cpp  # 135M parameters at 4 bytes each against ~5.7 bits and an f16 cache


# ----------------------------------------------------------------------------------------------
# Non-interactive mode end to end
# ----------------------------------------------------------------------------------------------

def run_main(argv, capsys):
    assert demo_chat.main(argv) == 0
    return capsys.readouterr().out


def test_noninteractive_prompts_write_transcript(tiny_models, tmp_path, capsys, cpu_default_dtype):
    out = run_main(["--model", str(tiny_models["llama"]), "--prompt", "hello", "--prompt", "and the river",
                    "--max-new-tokens", "6", "--temperature", "0", "--output-dir", str(tmp_path)], capsys)
    [json_path] = tmp_path.glob("demo_chat-*.json")
    data = json.loads(json_path.read_text())
    assert data["mode"] == "chat" and [r["prompt"] for r in data["rounds"]] == ["hello", "and the river"]
    reply = data["rounds"][0]["replies"][0]
    assert reply["text"] and reply["text"] in out and reply["footer"] in out
    assert data["models"][0]["dtype"] == cpu_default_dtype and data["models"][0]["instruction_tuned"] is True
    assert data["environment"]["device"]["type"] == "cpu" and data["settings"]["temperature"] == 0.0
    assert "**User:** and the river" in json_path.with_suffix(".md").read_text()


def test_noninteractive_stdin_runs_commands_and_multiline(tiny_models, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO('first question\n/reset\n"""line one\nline two"""\n'))
    run_main(["--model", str(tiny_models["gpt_neox"]), "--max-new-tokens", "4", "--output-dir", str(tmp_path)],
             capsys)
    data = json.loads(next(tmp_path.glob("demo_chat-*.json")).read_text())
    assert [r["prompt"] for r in data["rounds"]] == ["first question", "line one\nline two"]
    assert data["models"][0]["instruction_tuned"] is False


def test_base_model_notice(tiny_models, tmp_path, capsys):
    out = run_main(["--model", str(tiny_models["gpt_neox"]), "--prompt", "hi", "--max-new-tokens", "3",
                    "--output-dir", str(tmp_path)], capsys)
    assert "is a base model, not instruction-tuned" in out and "'User:' turn" in out


def test_noninteractive_compare_prints_columns_and_saves_both(tiny_models, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "130")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("hello\nthe capital of france\n")
    out = run_main(["--compare", str(tiny_models["llama"]), str(tiny_models["qwen2"]), "--prompts-file", str(prompts),
                    "--max-new-tokens", "5", "--temperature", "0", "--output-dir", str(tmp_path / "out")], capsys)
    assert "memory: the 2 models need about" in out
    assert any("a) llama" in line and "b) qwen2" in line for line in out.splitlines())
    data = json.loads(next((tmp_path / "out").glob("demo_chat-*.json")).read_text())
    assert data["mode"] == "compare" and len(data["rounds"]) == 2
    assert [r["model"] for r in data["rounds"][0]["replies"]] == ["llama", "qwen2"]
    assert all(r["stats"]["generation_tokens"] >= 1 for rnd in data["rounds"] for r in rnd["replies"])
    assert not (tmp_path / "out" / "arena.json").exists()  # no votes without a person


def test_bad_input_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        models.run_cli(demo_chat.main, ["--model", str(tmp_path / "missing"), "--prompt", "x"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: no such file or model directory")
    with pytest.raises(SystemExit) as exc:
        demo_chat.main(["--prompts-file", str(tmp_path / "nope.txt")])
    assert exc.value.code == 2 and "nope.txt: no such file" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# Nothing but the reply is printed inside a streamed reply
# ----------------------------------------------------------------------------------------------

HELD_WARNING = "the cache format will change in the next release"
HELD_LOG = "these generation flags are not valid and may be ignored"


def warn_mid_stream(step: int) -> None:
    """What a library may do while a reply streams: a Python warning and a transformers log line."""
    if step == 2:
        warnings.warn(HELD_WARNING, FutureWarning)
        from transformers.utils import logging as hf_logging
        hf_logging.get_logger("transformers.generation.utils").warning(HELD_LOG)


class Seen(logging.Handler):
    """A handler on the transformers logger, as transformers' own stderr handler or a user's would be."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_warnings_while_streaming_are_shown_after_the_footer(tiny_engines, tmp_path, capsys):
    engine = tiny_engines["llama"]
    im_end = engine.tokenizer.convert_tokens_to_ids("<|im_end|>")
    scripted = ScriptedEngine(engine, engine.encode("paris is the capital city") + [im_end], on_step=warn_mid_stream)
    library = logging.getLogger("transformers")
    seen, propagate = Seen(), library.propagate
    library.addHandler(seen)
    try:
        session = make_session([demo_chat.make_chat(scripted)], tmp_path, max_new_tokens=20)
        demo_chat.run_batch(session, iter(["hello"]))
        assert seen.messages == []  # held while the reply streamed
        # the logger is left as it was: propagating now would print every later transformers warning twice
        # wherever the root logger has a handler
        assert library.propagate == propagate
        logging.getLogger("transformers.generation.utils").warning("after the reply")
        assert seen.messages == ["after the reply"]  # the library's own handlers are back
    finally:
        library.removeHandler(seen)
    out, err = capsys.readouterr()
    reply = session.rounds[0]["replies"][0]
    assert reply["text"] == "paris is the capital city"
    streamed, after = out.split(">>> hello\n", 1)[1].split(reply["footer"], 1)
    assert streamed == "paris is the capital city\n"  # the reply, its line break, nothing else
    assert f"[llama: FutureWarning: {HELD_WARNING}]" in after and f"[llama: {HELD_LOG}]" in after
    assert HELD_WARNING not in err and HELD_LOG not in err
    saved = json.loads(next(tmp_path.glob("demo_chat-*.json")).read_text())
    notices = saved["rounds"][0]["replies"][0]["stats"]["notices"]
    assert sorted(notices) == sorted([f"FutureWarning: {HELD_WARNING}", HELD_LOG])


def test_warnings_before_ctrl_c_are_kept(tiny_engines):
    engine = tiny_engines["llama"]
    scripted = ScriptedEngine(engine, engine.encode("a long story about the river and the city and the mountain"),
                              on_step=warn_mid_stream)
    chat = demo_chat.make_chat(scripted)

    def on_chunk(chunk):
        if scripted.calls > 4:  # Ctrl+C two steps after the warning
            raise KeyboardInterrupt
    reply = demo_chat.generate_reply(chat, "tell a story", greedy(40), seed=0, on_chunk=on_chunk)
    assert reply.finish_reason == "interrupted" and reply.text
    assert f"FutureWarning: {HELD_WARNING}" in reply.notices and HELD_LOG in reply.notices


# ----------------------------------------------------------------------------------------------
# The real SmolLM2-135M-Instruct: the second turn depends on the first; one GGUF on two engines
# ----------------------------------------------------------------------------------------------

def test_smollm2_two_turns_use_history(smollm2_loaded):
    chat = demo_chat.make_chat(TransformersEngine(smollm2_loaded))
    first = demo_chat.generate_reply(chat, FRANCE, greedy(12), 0, lambda c: None)
    assert "Paris" in first.text
    second = demo_chat.generate_reply(chat, LANDMARK, greedy(24), 0, lambda c: None)
    assert "Eiffel" in second.text or "Louvre" in second.text


def test_llama_cpp_chat_sends_the_first_reply_with_the_second_turn(smollm2_gguf, tmp_path, capsys, monkeypatch):
    sent = []  # (engine, prompt ids, prompt text) of each reply, as the chat streamed it
    stream_generate = demo_chat.stream_generate

    def spy(engine, prompt_ids, settings, **kwargs):
        sent.append((engine.name, list(prompt_ids), engine.decode(prompt_ids)))
        return stream_generate(engine, prompt_ids, settings, **kwargs)
    monkeypatch.setattr(demo_chat, "stream_generate", spy)
    out = run_main(["--model", str(smollm2_gguf), "--engine", "llama.cpp", "--threads", "1", "--prompt", FRANCE,
                    "--prompt", LANDMARK, "--temperature", "0", "--max-new-tokens", "16",
                    "--output-dir", str(tmp_path)], capsys)
    data = json.loads(next(tmp_path.glob("demo_chat-*.json")).read_text())
    model = data["models"][0]
    assert (model["engine"], model["weights"], model["instruction_tuned"]) == ("llama.cpp", "GGUF Q4_1", True)
    assert model["engine_version"].startswith("llama-cpp-python ") and model["threads"] == 1
    first, second = (r["replies"][0] for r in data["rounds"])
    for reply in (first, second):
        assert reply["text"] and reply["text"] in out and reply["footer"] in out
        assert reply["stats"]["generation_tokens"] >= 1 and reply["stats"]["prompt_tokens"] > 0
    (engine1, ids1, text1), (engine2, ids2, text2) = sent
    assert engine1 == engine2 == "llama.cpp"
    assert ids2[:len(ids1)] == ids1 and len(ids2) == second["stats"]["prompt_tokens"]  # the conversation goes on
    assert first["text"] in text2[len(text1):] and text2.rstrip().endswith(f"{LANDMARK}\nassistant")
    assert LANDMARK not in text1


def test_compare_one_gguf_on_llama_cpp_and_transformers(smollm2_gguf, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "140")
    gguf = str(smollm2_gguf)
    out = run_main(["--compare", f"{gguf}@llama.cpp", f"{gguf}@transformers", "--threads", "1", "--prompt", FRANCE,
                    "--temperature", "0", "--max-new-tokens", "12", "--output-dir", str(tmp_path)], capsys)
    assert "memory: the 2 models need about" in out
    data = json.loads(next(tmp_path.glob("demo_chat-*.json")).read_text())
    labels = [m["label"] for m in data["models"]]
    assert labels == ["SmolLM2-135M-Instruct.Q4_1 (llama.cpp)", "SmolLM2-135M-Instruct.Q4_1 (transformers)"]
    assert [m["engine"] for m in data["models"]] == ["llama.cpp", "transformers"]
    assert data["models"][0]["weights"] == "GGUF Q4_1"
    assert data["models"][1]["weights"].startswith("GGUF Q4_1 de-quantized to ")
    replies = data["rounds"][0]["replies"]
    assert data["mode"] == "compare" and [r["model"] for r in replies] == labels
    assert all(r["text"] and r["stats"]["generation_tokens"] >= 1 for r in replies)
    assert any(f"a) {labels[0]}" in line and f"b) {labels[1]}" in line for line in out.splitlines())
    assert "Paris" in replies[1]["text"]


def test_transformers_gguf_chat_shows_no_library_warnings(smollm2_gguf, tmp_path):
    """What a person sees in a terminal: stdout and stderr of a real two-turn run, every warning shown."""
    result = subprocess.run(
        [sys.executable, "-W", "default", "demo_chat.py", "--model", str(smollm2_gguf), "--engine", "transformers",
         "--prompt", FRANCE, "--prompt", LANDMARK, "--temperature", "0", "--max-new-tokens", "12",
         "--output-dir", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=900,
        env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert result.returncode == 0, result.stderr[-3000:]
    output = (result.stdout + result.stderr).lower()
    for word in ("deprecat", "futurewarning", "userwarning", "past_key_values"):
        assert word not in output, f"{word!r} in the output:\n{result.stdout}\n{result.stderr}"
    data = json.loads(next(tmp_path.glob("demo_chat-*.json")).read_text())
    assert data["models"][0]["engine"] == "transformers" and len(data["rounds"]) == 2
    for rnd in data["rounds"]:
        reply = rnd["replies"][0]
        streamed = result.stdout.split(f">>> {rnd['prompt']}\n", 1)[1].split(reply["footer"], 1)[0]
        assert reply["text"] and streamed.strip() == reply["text"] and "notices" not in reply["stats"]
