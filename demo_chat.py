"""Streaming chat with one model, or side-by-side comparison (a small arena) of several.

    python demo_chat.py --model ../shared/models/SmolLM2-135M-Instruct.Q4_1.gguf --system "Be concise."
    python demo_chat.py --compare ../shared/models/SmolLM2-135M-Instruct.Q4_1.gguf@llama.cpp \
        ../shared/models/SmolLM2-135M-Instruct.Q4_1.gguf@transformers --temperature 0
    python demo_chat.py --compare tinyllama qwen2.5-1.5b --temperature 0 --prompt "What is the capital of France?"
    printf 'Name three rivers.\\n/reset\\nWhat is 2+2?\\n' | python demo_chat.py --model pythia-1b --max-new-tokens 64

Interactive: tokens stream as they are generated and a footer follows each reply
(`N tokens · X tok/s · TTFT Y ms · peak Z GB`). Type /help for the commands; Ctrl+C stops a reply,
Ctrl+C at the prompt or Ctrl+D exits. With --compare every message goes to each model, replies are
shown in columns, and your votes build `<output-dir>/arena.json` + `arena.md` (wins, Elo); `MODEL@ENGINE`
puts one model on a given engine, so the same GGUF can run through llama.cpp and transformers side by side.
Non-interactive (--prompt, --prompts-file, or prompts piped on stdin): answers, prints, and writes
the transcript to `<output-dir>/demo_chat-<time>.json` + `.md`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import warnings
import shutil
import string
import sys
import textwrap
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch
from tabulate import tabulate

import energy
import engines
import models
import results_io

DEFAULT_MAX_NEW_TOKENS = 256
DEFAULT_TEMPERATURE = 0.7
DEFAULT_TOP_P = 0.9
ESTIMATE_CONTEXT_TOKENS = 2048  # KV-cache length assumed by the --compare memory check
SIDE_BY_SIDE_MIN_WIDTH = 100  # narrower terminals show compared replies one after another
COLUMN_GAP = " │ "
MIN_COLUMN_WIDTH = 30
ELO_START = 1000.0
ELO_K = 32.0
ELO_MIN_VOTES = 5  # a model's Elo is shown once it has been in this many voted rounds
ARENA_STEM = "arena"
PROMPT = ">>> "
CONTINUATION = "... "
MULTILINE_QUOTE = '"""'
# Tokens that end an assistant turn in common chat templates; stopping on them as well as on the
# configured EOS keeps a model from writing the user's next turn.

HELP = """Commands:
  /help               this text
  /reset              clear the conversation (the system prompt stays)
  /system [TEXT]      set the system prompt (no TEXT: show it)
  /set [KEY VALUE]    change temperature, top_p or max_new_tokens (no KEY: show them)
  /save [PATH]        write the transcript as JSON + Markdown (default: <output-dir>/demo_chat-<time>.json)
  /stats              session totals per model
  /quit               exit (Ctrl+D, or Ctrl+C at the prompt, also exit)
  \"\"\"                 start multi-line input; end it with a line ending in \"\"\"
Ctrl+C while a reply streams stops it and keeps what was shown."""


# ----------------------------------------------------------------------------------------------
# Generation: a manual prefill + decode loop over the KV cache that yields GenerationChunk
# ----------------------------------------------------------------------------------------------

@dataclass
class GenerationSettings:
    temperature: float = DEFAULT_TEMPERATURE
    top_p: float = DEFAULT_TOP_P
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS


@dataclass
class GenerationChunk:
    """One streamed piece of a reply and the running measurements (like mlx-lm's GenerationResponse)."""

    text: str  # new text since the previous chunk (may be empty while a stop string is pending)
    prompt_tokens: int
    generation_tokens: int  # tokens in the reply so far (EOS not counted)
    prompt_tps: float  # tokens/s of the prefill
    generation_tps: float  # tokens/s, decode only: tokens after the first / time since the first
    ttft_s: float  # seconds from the start of the prefill to the first sampled token
    peak_memory_gb: float
    finish_reason: str | None = None  # None while streaming, then "stop" or "length"


def held_back(text: str, stops: list[str]) -> int:
    """Length of the longest end of `text` that could still grow into a stop string."""
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:n]):
                longest = n
                break
    return longest


def find_stop(text: str, stops: list[str]) -> int | None:
    """Index where the first stop string starts in `text`, or None."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


def stream_generate(engine, prompt_ids: list[int], settings: GenerationSettings, *, stops: list[str] = (),
                    generator: torch.Generator | None = None) -> Iterator[GenerationChunk]:
    """Stream a reply through the engine's decode loop, yielding text pieces with running measurements.

    Stops at an EOS/end-of-turn id, at a stop string (cut from the text, never shown), or after
    settings.max_new_tokens tokens. The last chunk carries finish_reason.
    """
    device = engine.device
    stops = list(stops)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    generated: list[int] = []
    text = ""  # the decoded reply so far
    sent = 0  # characters of `text` already yielded
    start = time.perf_counter()
    first = None  # clock at the first sampled token
    sampled = 0

    def chunk(piece: str, finish: str | None = None) -> GenerationChunk:
        now = time.perf_counter()
        ttft = first - start
        decode_s = now - first
        return GenerationChunk(piece, len(prompt_ids), len(generated), len(prompt_ids) / max(ttft, 1e-9),
                               (sampled - 1) / decode_s if sampled > 1 and decode_s > 0 else 0.0,
                               ttft, models.peak_memory_bytes(device) / 1e9, finish)

    sampling = engines.Sampling(settings.temperature, settings.top_p)
    for step in engines.stream(engine, prompt_ids, settings.max_new_tokens, sampling, generator=generator):
        sampled += 1
        first = first or step.time
        if step.token in engine.eos_ids:  # what was held back for a possible stop string is not one: show it
            yield chunk(text[sent:], "stop")
            return
        generated.append(step.token)
        text = engine.decode(generated)
        cut = find_stop(text, stops)
        if cut is not None:
            yield chunk(text[sent:cut] if cut > sent else "", "stop")
            return
        if len(generated) >= settings.max_new_tokens:
            yield chunk(text[sent:], "length")
            return
        safe = len(text) - held_back(text, stops)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 character: wait for its next byte
            safe = min(safe, len(text) - 1)
        if safe > sent:
            yield chunk(text[sent:safe])
            sent = safe


@contextlib.contextmanager
def held_warnings(notices: list[str]):
    """Nothing but the reply is printed inside a streamed reply: warnings and transformers log lines
    raised while it streams are collected into `notices`, to be shown after the footer (also when
    Ctrl+C ends the reply). The library's logger is left as it was: its handlers, and propagation,
    which transformers turns off so that a configured root logger does not print each line twice."""
    from transformers.utils import logging as hf_logging

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            notices.append(record.getMessage())
    library = hf_logging.get_logger("transformers")  # configured by transformers first, so what is saved stays valid
    saved, propagate = library.handlers[:], library.propagate
    collect = Collect(logging.WARNING)
    for h in saved:
        library.removeHandler(h)
    library.addHandler(collect)
    library.propagate = False
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                yield
            finally:
                notices.extend(f"{w.category.__name__}: {w.message}" for w in caught)
    finally:
        library.removeHandler(collect)
        for h in saved:
            library.addHandler(h)
        library.propagate = propagate


# ----------------------------------------------------------------------------------------------
# Conversation state, chat templates and context truncation
# ----------------------------------------------------------------------------------------------

@dataclass
class Reply:
    """One model's answer to one message, with the measurements of its last chunk."""

    model: str
    text: str
    finish_reason: str  # "stop", "length" or "interrupted"
    last: GenerationChunk | None = None  # None when interrupted before the first token
    dropped_turns: int = 0  # oldest user/assistant pairs dropped to fit this reply in the context
    device_type: str = "cpu"  # says what the peak memory figure measures (models.peak_memory_bytes)
    notices: list[str] = field(default_factory=list)  # warnings raised while it streamed, shown after it
    energy: dict | None = None  # energy.EnergyReading.summary per generated token, where a counter exists

    def stats(self) -> dict:
        if self.last is None:
            return {"generation_tokens": 0}
        stats = asdict(self.last)
        del stats["text"], stats["finish_reason"]
        if self.notices:
            stats["notices"] = self.notices
        if self.energy:
            stats["energy"] = self.energy
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in stats.items()}


@dataclass
class Chat:
    """One model's side of the conversation. The system prompt lives apart from `messages`, so
    truncation and /reset never drop it."""

    engine: engines.Engine
    label: str
    system: str | None = None
    meter: energy.EnergyMeter = field(default_factory=lambda: energy.EnergyMeter([], "no meter"))
    messages: list[dict] = field(default_factory=list)  # alternating user / assistant
    replies: list[Reply] = field(default_factory=list)  # every reply of the session, for /stats

    @property
    def is_base_model(self) -> bool:
        return self.engine.is_base_model

    @property
    def context_tokens(self) -> int:
        return self.engine.context_length

    @property
    def stops(self) -> list[str]:
        return self.engine.stop_strings

    def conversation(self, messages: list[dict] | None = None) -> list[dict]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + (self.messages if messages is None else messages)


def make_chat(engine: engines.Engine, system: str | None = None) -> Chat:
    quantize = engine.context().get("quantize", "none")
    return Chat(engine, engine.label + (f"@{quantize}" if quantize != "none" else ""), system)


@dataclass
class Fit:
    """What fits the context: prompt ids, how many old turn pairs were dropped, the token budget."""

    prompt_ids: list[int]
    dropped_turns: int
    max_new_tokens: int


def fit_in_context(chat: Chat, user_text: str, max_new_tokens: int) -> Fit:
    """Append the user message, dropping the oldest user/assistant pairs (never the system prompt)
    while prompt + max_new_tokens exceeds the context. If the message alone still leaves too little
    room, the reply budget shrinks; with no room at all, it raises UserError."""
    messages = chat.messages + [{"role": "user", "content": user_text}]
    dropped = 0
    ids = chat.engine.chat_ids(chat.conversation(messages))
    while len(ids) + max_new_tokens > chat.context_tokens and len(messages) > 1:
        messages = messages[2:]
        dropped += 1
        ids = chat.engine.chat_ids(chat.conversation(messages))
    room = chat.context_tokens - len(ids)
    if room < 1:
        raise models.UserError(f"this message is {len(ids)} tokens with the system prompt, but {chat.label} "
                               f"reads at most {chat.context_tokens}: shorten it or the system prompt.")
    chat.messages = messages
    return Fit(ids, dropped, min(max_new_tokens, room))


def record_reply(chat: Chat, reply: Reply) -> None:
    """Keep the reply in history (what was shown, even if interrupted); forget an empty turn."""
    chat.replies.append(reply)
    text = reply.text.strip()
    if text:
        chat.messages.append({"role": "assistant", "content": text})
    elif chat.messages and chat.messages[-1]["role"] == "user":
        chat.messages.pop()


def generate_reply(chat: Chat, user_text: str, settings: GenerationSettings, seed: int,
                   on_chunk: Callable[[GenerationChunk], None]) -> Reply:
    """Fit the context, stream the reply through `on_chunk`, record it. Ctrl+C ends it early.
    Warnings raised while it streams go to `reply.notices`, never into the reply's text."""
    fit = fit_in_context(chat, user_text, settings.max_new_tokens)
    budget = GenerationSettings(settings.temperature, settings.top_p, fit.max_new_tokens)
    generator = torch.Generator(device=chat.engine.device).manual_seed(seed)
    text, last, finish, notices = "", None, "interrupted", []
    stream = stream_generate(chat.engine, fit.prompt_ids, budget, stops=chat.stops, generator=generator)
    try:
        with held_warnings(notices), chat.meter.window() as joules:  # the whole reply: prefill and decode
            for piece in stream:
                text, last = text + piece.text, piece
                on_chunk(piece)
        finish = last.finish_reason
    except KeyboardInterrupt:
        pass
    finally:
        stream.close()
    reply = Reply(chat.label, text, finish, last, fit.dropped_turns, chat.engine.device.type, notices,
                  joules.reading.summary(last.generation_tokens) if joules.reading and last and
                  last.generation_tokens else None)
    record_reply(chat, reply)
    return reply


# ----------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------

def format_footer(reply: Reply) -> str:
    """`42 tokens · 31.5 tok/s · TTFT 120 ms · peak 0.61 GB` (+ why it ended, when not naturally)."""
    if reply.last is None:
        return "0 tokens · interrupted before the first token"
    c = reply.last
    # on CPU the figure is the whole process's peak RSS (every loaded model), not this model alone
    memory = "peak RSS" if reply.device_type == "cpu" else "peak"
    parts = [f"{c.generation_tokens} tokens", f"{c.generation_tps:.1f} tok/s", f"TTFT {c.ttft_s * 1000:.0f} ms",
             f"{memory} {c.peak_memory_gb:.2f} GB"]
    if reply.energy and reply.energy["total_j"] > 0:  # a window shorter than the counter's update shows nothing
        parts.append(f"{reply.energy['per_unit']['j_per_unit']:.3g} J/tok")
    if reply.finish_reason == "length":
        parts.append("stopped at max_new_tokens")
    elif reply.finish_reason == "interrupted":
        parts.append("interrupted")
    return " · ".join(parts)


def wrap_text(text: str, width: int) -> list[str]:
    """Wrap each paragraph of `text` to `width`, keeping the model's own line breaks."""
    lines: list[str] = []
    for paragraph in text.splitlines() or [""]:
        lines.extend(textwrap.wrap(paragraph, width, replace_whitespace=False, drop_whitespace=True) or [""])
    return lines


def render_columns(blocks: list[tuple[str, str, str]], width: int) -> str:
    """(title, text, footer) blocks side by side, each wrapped to its column."""
    col = (width - len(COLUMN_GAP) * (len(blocks) - 1)) // len(blocks)
    cells = [[title[:col], "─" * col] + wrap_text(text, col) + [""] + wrap_text(footer, col)
             for title, text, footer in blocks]
    height = max(len(c) for c in cells)
    rows = [COLUMN_GAP.join((c[i] if i < len(c) else "").ljust(col) for c in cells).rstrip()
            for i in range(height)]
    return "\n".join(rows) + "\n"


def render_sequential(blocks: list[tuple[str, str, str]], width: int) -> str:
    """(title, text, footer) blocks one after another, for narrow terminals and logs."""
    parts = []
    for title, text, footer in blocks:
        parts.append(f"── {title} " + "─" * max(0, min(width, 80) - len(title) - 4))
        parts.append("\n".join(wrap_text(text, width)))
        parts.append(f"[{footer}]\n")
    return "\n".join(parts)


def render_replies(replies: list[Reply], width: int) -> str:
    blocks = [(f"{letter(i)}) {r.model}", r.text.strip(), format_footer(r)) for i, r in enumerate(replies)]
    if side_by_side(width, len(blocks)):
        return render_columns(blocks, width)
    return render_sequential(blocks, width)


def side_by_side(width: int, n_models: int) -> bool:
    """Columns for several models on a wide terminal, each at least MIN_COLUMN_WIDTH characters."""
    col = (width - len(COLUMN_GAP) * (n_models - 1)) // n_models
    return n_models > 1 and width >= SIDE_BY_SIDE_MIN_WIDTH and col >= MIN_COLUMN_WIDTH


def letter(i: int) -> str:
    return string.ascii_lowercase[i]


def terminal_width() -> int:
    return shutil.get_terminal_size((80, 24)).columns


# ----------------------------------------------------------------------------------------------
# Commands
# ----------------------------------------------------------------------------------------------

COMMANDS = ("help", "reset", "system", "set", "save", "stats", "quit")
SETTING_KEYS = {"temperature": "temperature", "temp": "temperature", "top_p": "top_p", "top-p": "top_p",
                "max_new_tokens": "max_new_tokens", "max-new-tokens": "max_new_tokens"}


class CommandError(ValueError):
    """A malformed command; the message says the right form."""


@dataclass(frozen=True)
class Command:
    name: str
    arg: str = ""


def parse_command(line: str) -> Command | None:
    """`/set temperature 0.2` -> Command('set', 'temperature 0.2'); plain text -> None.

    Raises:
        CommandError: an unknown /command.
    """
    stripped = line.strip()
    if not stripped.startswith("/") or stripped.startswith("//"):
        return None
    name, _, arg = stripped[1:].partition(" ")
    name = name.lower()
    if name in ("exit", "bye"):
        name = "quit"
    if name not in COMMANDS:
        raise CommandError(f"unknown command /{name}: type /help for the list (start with // to send a '/').")
    return Command(name, arg.strip())


def apply_setting(settings: GenerationSettings, arg: str) -> str:
    """`temperature 0.2` -> set it and say so.

    Raises:
        CommandError: unknown key or a value out of range.
    """
    parts = arg.split()
    if len(parts) != 2 or parts[0].lower() not in SETTING_KEYS:
        raise CommandError("usage: /set temperature|top_p|max_new_tokens VALUE")
    key, raw = SETTING_KEYS[parts[0].lower()], parts[1]
    try:
        value = int(raw) if key == "max_new_tokens" else float(raw)
    except ValueError:
        raise CommandError(f"/set {key}: '{raw}' is not a {'whole ' if key == 'max_new_tokens' else ''}number")
    valid = {"temperature": value >= 0, "top_p": 0 < value <= 1, "max_new_tokens": value >= 1}[key]
    if not valid:
        rule = {"temperature": ">= 0 (0 = greedy)", "top_p": "in (0, 1]", "max_new_tokens": ">= 1"}[key]
        raise CommandError(f"/set {key}: must be {rule}")
    setattr(settings, key, value)
    return f"{key} = {value}"


def read_message(read_line: Callable[[str], str]) -> str:
    """One message: a line, or a block opened by \"\"\" and closed by a line ending in \"\"\"."""
    line = read_line(PROMPT)
    if not line.lstrip().startswith(MULTILINE_QUOTE):
        return line
    first = line.lstrip()[len(MULTILINE_QUOTE):]
    if first.rstrip().endswith(MULTILINE_QUOTE):
        return first.rstrip()[:-len(MULTILINE_QUOTE)]
    lines = [first] if first else []
    while True:
        more = read_line(CONTINUATION)
        if more.rstrip().endswith(MULTILINE_QUOTE):
            lines.append(more.rstrip()[:-len(MULTILINE_QUOTE)])
            return "\n".join(lines).strip("\n")
        lines.append(more)


# ----------------------------------------------------------------------------------------------
# Arena: votes, win counts and Elo
# ----------------------------------------------------------------------------------------------

def parse_vote(answer: str, n_models: int) -> str | int | None:
    """'a'/'b'/... -> model index; 't'/'tie' -> 'tie'; ''/'s'/'skip' -> 'skip'; anything else -> None."""
    answer = answer.strip().lower()
    if answer in ("", "s", "skip"):
        return "skip"
    if answer in ("t", "tie"):
        return "tie"
    if len(answer) == 1 and answer in string.ascii_lowercase[:n_models]:
        return string.ascii_lowercase.index(answer)
    return None


def elo_ratings(votes: list[dict], k: float = ELO_K, start: float = ELO_START) -> dict[str, float]:
    """Replay votes in order. Within a vote, every pair involving the winner counts as a win for it
    (pairs of two losers carry no information and are skipped); a tie counts 0.5 for every pair.
    Pair updates use the ratings from before the vote: R' = R + K (S - E), E = 1 / (1 + 10^((R_o - R) / 400))."""
    ratings: dict[str, float] = {}
    for vote in votes:
        names = vote["models"]
        for name in names:
            ratings.setdefault(name, start)
        delta = dict.fromkeys(names, 0.0)
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                if vote["winner"] is None:
                    score = 0.5
                elif vote["winner"] in (a, b):
                    score = 1.0 if vote["winner"] == a else 0.0
                else:
                    continue
                expected = 1.0 / (1.0 + 10 ** ((ratings[b] - ratings[a]) / 400.0))
                delta[a] += k * (score - expected)
                delta[b] -= k * (score - expected)
        for name in names:
            ratings[name] += delta[name]
    return ratings


def leaderboard(votes: list[dict], min_votes: int = ELO_MIN_VOTES) -> list[dict]:
    """Per model: votes, wins, losses, ties, win rate ((wins + ties/2) / votes) and Elo (None below
    min_votes), best first."""
    rows: dict[str, dict] = {}
    for vote in votes:
        for name in vote["models"]:
            row = rows.setdefault(name, dict(model=name, votes=0, wins=0, losses=0, ties=0))
            row["votes"] += 1
            if vote["winner"] is None:
                row["ties"] += 1
            else:
                row["wins" if vote["winner"] == name else "losses"] += 1
    ratings = elo_ratings(votes)
    for row in rows.values():
        row["win_rate"] = (row["wins"] + 0.5 * row["ties"]) / row["votes"]
        row["elo"] = round(ratings[row["model"]], 1) if row["votes"] >= min_votes else None
    return sorted(rows.values(), key=lambda r: (r["elo"] is not None, r["elo"] or 0, r["win_rate"]), reverse=True)


def arena_paths(output_dir: str | Path) -> tuple[Path, Path]:
    stem = Path(output_dir) / ARENA_STEM
    return stem.with_suffix(".json"), stem.with_suffix(".md")


def load_arena(output_dir: str | Path) -> dict:
    """The accumulated votes in <output-dir>/arena.json, or an empty arena."""
    path = arena_paths(output_dir)[0]
    if not path.is_file():
        return {"script": "demo_chat", "elo": {"start": ELO_START, "k": ELO_K, "min_votes": ELO_MIN_VOTES},
                "votes": []}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise models.UserError(f"{path} is not valid JSON ({exc}): fix or move it to start a new arena.")


def arena_markdown(data: dict) -> str:
    rows = [[r["model"], r["votes"], r["wins"], r["losses"], r["ties"], f"{100 * r['win_rate']:.0f}%",
             r["elo"] if r["elo"] is not None else f"— (needs {ELO_MIN_VOTES} votes)"]
            for r in data["leaderboard"]]
    return ("# demo_chat arena\n\n"
            f"{len(data['votes'])} voted rounds from `demo_chat.py --compare`. Win rate counts a tie as half "
            f"a win. Elo starts at {ELO_START:.0f} with K = {ELO_K:.0f}, replays every vote in order (the "
            "winner beats each other model in its round; a tie is 0.5 for every pair), and is shown once a "
            f"model has {ELO_MIN_VOTES} votes.\n\n"
            + results_io.markdown_table(["Model", "Votes", "Wins", "Losses", "Ties", "Win rate", "Elo"], rows)
            + f"\nUpdated {data['updated']}.\n")


def record_vote(output_dir: str | Path, replies: list[Reply], choice: str | int, prompt: str,
                contexts: dict[str, dict]) -> dict:
    """Append one vote to arena.json and rewrite arena.md (both atomically); return the arena."""
    data = load_arena(output_dir)
    names = [r.model for r in replies]
    data["votes"].append({"date": results_io.timestamp(), "models": names,
                          "winner": None if choice == "tie" else names[choice], "prompt": prompt,
                          "contexts": {n: contexts[n] for n in names}})
    data["leaderboard"] = leaderboard(data["votes"])
    data["updated"] = results_io.timestamp()
    results_io.write_results(arena_paths(output_dir)[0], data, arena_markdown(data))
    return data


# ----------------------------------------------------------------------------------------------
# Memory check before loading several models
# ----------------------------------------------------------------------------------------------

def estimate_model_bytes(name: str, engine: str, device: torch.device, dtype: torch.dtype,
                         quantize: str) -> int | None:
    """Registry models: models.estimate_memory_bytes. A .gguf on llama.cpp: the file, which it maps as
    is, plus a tenth for its KV cache and buffers. Local dirs and .gguf on transformers: parameters
    counted on the meta device from their config (nothing allocated). None when the config cannot be
    read offline."""
    resolved = models.resolve(name)
    if engine == "llama.cpp":  # the mapped file, plus an f16 KV cache of the context it allocates
        spec = models.spec_of(resolved.gguf_file)
        kv = (models.kv_cache_bytes_per_token(models.twin_config(spec), torch.float16) * min(4096, spec.context)
              if spec else 0.1 * models.disk_bytes(resolved))
        return int(models.disk_bytes(resolved) + kv)
    if resolved.spec is not None:
        return models.estimate_memory_bytes(resolved.spec, dtype, quantize, ESTIMATE_CONTEXT_TOKENS)
    if resolved.source == "hub":
        return None
    from transformers import AutoConfig, AutoModelForCausalLM
    try:
        kwargs = {"gguf_file": resolved.gguf_file} if resolved.gguf_file else {}
        config = AutoConfig.from_pretrained(resolved.path, **kwargs)
        with torch.device("meta"):
            params = models.count_parameters(AutoModelForCausalLM.from_config(config))
    except (OSError, ValueError, KeyError):
        return None
    bits = {"none": torch.tensor([], dtype=dtype).element_size() * 8, "int8": 8, "int4": 4.5}[quantize]
    return int(params * bits / 8 + models.kv_cache_bytes_per_token(config, dtype) * ESTIMATE_CONTEXT_TOKENS)


def available_memory_bytes(device: torch.device) -> int:
    """Free GPU memory on CUDA, otherwise available system memory (MPS shares it)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    import psutil
    return psutil.virtual_memory().available


def check_memory(targets: list[tuple[str, str]], args) -> str:
    """Estimate what the (model, engine) pairs need together; a summary line, or UserError if they
    will not fit."""
    device = models.pick_device(args.device)
    dtype = models.pick_dtype(device, args.dtype)
    estimates = [(name, estimate_model_bytes(name, engine, device, dtype, args.quantize)) for name, engine in targets]
    known = sum(v for _, v in estimates if v is not None)
    free = available_memory_bytes(device)
    detail = ", ".join(f"{models.resolve(n).label} ~{v / 2**30:.2f} GB" if v is not None
                       else f"{models.resolve(n).label} unknown" for n, v in estimates)
    summary = (f"memory: the {len(targets)} models need about {known / 2**30:.2f} GB ({detail}); "
               f"{free / 2**30:.1f} GB is free on {device.type}")
    if known > free and not args.skip_memory_check:
        raise models.UserError(f"{summary}: they will not fit together. Compare fewer or smaller models, add "
                               "--quantize int4, or pass --skip-memory-check to try anyway.")
    return summary


# ----------------------------------------------------------------------------------------------
# Transcript
# ----------------------------------------------------------------------------------------------

@dataclass
class Session:
    """Everything the chat loop needs: the models, the settings /set changes, the rounds so far."""

    chats: list[Chat]
    settings: GenerationSettings
    args: argparse.Namespace
    environment: dict
    rounds: list[dict] = field(default_factory=list)

    @property
    def compare(self) -> bool:
        return len(self.chats) > 1


def session_totals(chat: Chat) -> dict:
    """Replies, tokens, decode tok/s and TTFT (mean ± std over replies), peak memory, dropped turns."""
    measured = [r.last for r in chat.replies if r.last is not None]
    decode = [c.generation_tps for c in measured if c.generation_tokens > 1]
    ttft_ms = [c.ttft_s * 1000 for c in measured]
    joules = [r.energy["per_unit"]["j_per_unit"] for r in chat.replies if r.energy]
    return {"model": chat.label, "replies": len(chat.replies),
            "tokens": sum(c.generation_tokens for c in measured),
            "j_per_token": results_io.mean_std(joules) if joules else None,
            "decode_tps": results_io.mean_std(decode) if decode else None,
            "ttft_ms": results_io.mean_std(ttft_ms) if ttft_ms else None,
            "peak_memory_gb": round(max((c.peak_memory_gb for c in measured), default=0.0), 3),
            "dropped_turns": sum(r.dropped_turns for r in chat.replies),
            "interrupted": sum(r.finish_reason == "interrupted" for r in chat.replies)}


def format_totals(totals: dict) -> list:
    def spread(pair, digits):
        return "n/a" if pair is None else f"{pair[0]:.{digits}f} ± {pair[1]:.{digits}f}"
    return [totals["model"], totals["replies"], totals["tokens"], spread(totals["decode_tps"], 1),
            spread(totals["ttft_ms"], 0), f"{totals['peak_memory_gb']:.2f}",
            spread(totals.get("j_per_token"), 3) if totals.get("j_per_token") else "not measured",
            totals["dropped_turns"]]


TOTALS_HEADERS = ["Model", "Replies", "Tokens", "Decode tok/s", "TTFT ms", "Peak GB", "J/tok", "Dropped turns"]
TOTALS_NOTE = ("tok/s and TTFT: mean ± std over replies; decode tok/s counts tokens after the first; "
               "peak GB: torch's peak allocation on CUDA, the whole process's peak RSS on CPU; J/tok: the "
               "energy counters over each whole reply (prompt and decode) per generated token.")


def transcript_data(session: Session) -> dict:
    return {
        "script": "demo_chat",
        "mode": "compare" if session.compare else "chat",
        "models": [dict(c.engine.context(), label=c.label, context_tokens=c.context_tokens,
                        instruction_tuned=not c.is_base_model) for c in session.chats],
        "settings": dict(asdict(session.settings), seed=session.args.seed, system=session.args.system),
        "rounds": session.rounds,
        "totals": [session_totals(c) for c in session.chats],
        "environment": session.environment,
    }


def transcript_markdown(data: dict) -> str:
    lines = [f"# demo_chat transcript ({data['mode']})", ""]
    lines.append(results_io.markdown_table(
        ["Model", "Engine", "Source", "Device", "Weights", "Context", "Instruction-tuned", "Load s"],
        [[m["label"], m.get("engine", "transformers"), m["source"], m["device_name"], m.get("weights", m["dtype"]),
          m["context_tokens"],
          "yes" if m["instruction_tuned"] else "no (plain User:/Assistant: template)", m["load_seconds"]]
         for m in data["models"]]))
    s = data["settings"]
    lines += [f"Settings: temperature {s['temperature']}, top_p {s['top_p']}, max_new_tokens "
              f"{s['max_new_tokens']}, seed {s['seed']}, system prompt: {s['system']!r}.", ""]
    meter = data["environment"].get("energy") or {}
    lines += [f"Energy: {meter['counter']}, J/tok per reply in each footer." if meter.get("available")
              else f"Energy: {meter.get('reason') or 'not measured'}.", ""]
    for r in data["rounds"]:
        lines += [f"## Round {r['index']}", "", f"**User:** {r['prompt']}", ""]
        for reply in r["replies"]:
            lines += [f"**{reply['model']}:** {reply['text']}", "", f"_{reply['footer']}_", ""]
        if r.get("dropped_turns"):
            lines += [f"(oldest turns dropped to fit the context: {r['dropped_turns']})", ""]
    totals = results_io.markdown_table(TOTALS_HEADERS, [format_totals(t) for t in data["totals"]])
    lines += ["## Totals", "", totals, TOTALS_NOTE, "", "## Environment", "",
              results_io.environment_markdown(data["environment"])]
    return "\n".join(lines)


def save_transcript(session: Session, path: str | Path | None = None) -> tuple[Path, Path]:
    json_path = Path(path).with_suffix(".json") if path else results_io.result_paths(
        session.args.output_dir, "demo_chat", session.args.transcript_stamp)[0]
    data = transcript_data(session)
    return results_io.write_results(json_path, data, transcript_markdown(data))


# ----------------------------------------------------------------------------------------------
# The chat loop (printing lives here)
# ----------------------------------------------------------------------------------------------

def dim(text: str) -> str:
    return f"\033[2m{text}\033[0m" if sys.stdout.isatty() else text


def notice(text: str) -> None:
    print(dim(f"[{text}]"), flush=True)


def run_round(session: Session, prompt: str) -> list[Reply]:
    """Send `prompt` to every model; stream (one model, or a narrow terminal) or show columns after.
    Ctrl+C stops the reply in progress and skips the models after it in this round."""
    width = terminal_width()
    live = not side_by_side(width, len(session.chats))
    replies: list[Reply] = []
    seed = session.args.seed + len(session.rounds)  # same seed for every model in a round
    for i, chat in enumerate(session.chats):
        if session.compare and live:
            print(f"── {letter(i)}) {chat.label} " + "─" * max(0, min(width, 80) - len(chat.label) - 7))
        reply = generate_reply(chat, prompt, session.settings, seed, stream_printer(live, chat.label))
        if live:
            print()
            if reply.dropped_turns:
                notice(f"{chat.label}: dropped the {reply.dropped_turns} oldest turn(s) to fit its "
                       f"{chat.context_tokens}-token context")
            print(dim(format_footer(reply)), flush=True)
            for text in dict.fromkeys(reply.notices):
                notice(f"{chat.label}: {text}")
        elif sys.stdout.isatty():
            print("\r\033[K", end="", flush=True)
        replies.append(reply)
        if reply.finish_reason == "interrupted":
            if session.compare and i + 1 < len(session.chats):
                notice("interrupted: the remaining models skip this round")
            break
    if not live:
        for reply in replies:
            if reply.dropped_turns:
                notice(f"{reply.model}: dropped the {reply.dropped_turns} oldest turn(s) to fit its context")
        print(render_replies(replies, width), flush=True)
        for reply in replies:
            for text in dict.fromkeys(reply.notices):
                notice(f"{reply.model}: {text}")
    session.rounds.append({"index": len(session.rounds) + 1, "prompt": prompt, "system": session.args.system,
                           "settings": asdict(session.settings),
                           "dropped_turns": max((r.dropped_turns for r in replies), default=0),
                           "replies": [dict(model=r.model, text=r.text.strip(), finish_reason=r.finish_reason,
                                            footer=format_footer(r), stats=r.stats()) for r in replies]})
    return replies


def stream_printer(live: bool, label: str) -> Callable[[GenerationChunk], None]:
    """Print pieces as they come; in the column view show a progress counter instead (TTY only)."""
    def on_chunk(chunk: GenerationChunk) -> None:
        if live:
            print(chunk.text, end="", flush=True)
        elif sys.stdout.isatty():
            print(f"\r{label}: {chunk.generation_tokens} tokens…", end="", flush=True)
    return on_chunk


def ask_vote(session: Session, replies: list[Reply], prompt: str, read_line: Callable[[str], str]) -> None:
    """Ask which reply was better and record it in the arena; Enter, Ctrl+C or Ctrl+D skips."""
    options = "  ".join(f"{letter(i)}) {r.model}" for i, r in enumerate(replies))
    while True:
        try:
            choice = parse_vote(read_line(f"Vote: {options}  t) tie  s) skip [s]: "), len(replies))
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if choice is not None:
            break
        print(f"type a letter from a to {letter(len(replies) - 1)}, t or s")
    if choice == "skip":
        return
    contexts = {c.label: c.engine.context() for c in session.chats}
    data = record_vote(session.args.output_dir, replies, choice, prompt, contexts)
    board = ", ".join(f"{r['model']} {r['wins']}W/{r['losses']}L/{r['ties']}T"
                      + (f" Elo {r['elo']:.0f}" if r["elo"] is not None else "") for r in data["leaderboard"])
    notice(f"vote saved to {arena_paths(session.args.output_dir)[0]}: {board}")


def run_command(session: Session, command: Command) -> bool:
    """Carry out a /command; False means quit."""
    if command.name == "quit":
        return False
    if command.name == "help":
        print(HELP)
    elif command.name == "reset":
        for chat in session.chats:
            chat.messages.clear()
        notice("history cleared" + (" (system prompt kept)" if session.args.system else ""))
    elif command.name == "system":
        if command.arg:
            session.args.system = command.arg
            for chat in session.chats:
                chat.system = command.arg
        notice(f"system prompt: {session.args.system!r}")
    elif command.name == "set":
        message = apply_setting(session.settings, command.arg) if command.arg else str(asdict(session.settings))
        notice(message)
    elif command.name == "save":
        json_path, md_path = save_transcript(session, command.arg or None)
        notice(f"transcript saved: {json_path} and {md_path}")
    elif command.name == "stats":
        print(tabulate([format_totals(session_totals(c)) for c in session.chats], TOTALS_HEADERS))
        notice(TOTALS_NOTE)
    return True


def handle_line(session: Session, text: str, read_line: Callable[[str], str] | None = None) -> bool:
    """A command or a message; False means quit. Votes are asked only when read_line is given."""
    if not text.strip():
        return True
    try:
        command = parse_command(text)
        if command is not None:
            return run_command(session, command)
    except CommandError as exc:
        notice(str(exc))
        return True
    message = text[1:] if text.lstrip().startswith("//") else text
    try:
        replies = run_round(session, message)
    except models.UserError as exc:  # a message longer than the context: say so, keep chatting
        notice(str(exc))
        return True
    finished = all(r.finish_reason != "interrupted" for r in replies) and len(replies) == len(session.chats)
    if session.compare and read_line is not None and finished:
        ask_vote(session, replies, message, read_line)
    return True


def run_interactive(session: Session, read_line: Callable[[str], str] = input) -> None:
    """The prompt loop: /commands, multi-line input, Ctrl+C / Ctrl+D to leave."""
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    notice("Type /help for commands; Ctrl+C stops a reply; /quit, Ctrl+D or Ctrl+C at the prompt exits")
    while True:
        try:
            text = read_message(read_line)
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if not handle_line(session, text, read_line):
            return


def batch_messages(args, stdin) -> Iterator[str]:
    """Messages for non-interactive mode: --prompt values verbatim, then the prompts file, then stdin;
    file and stdin lines go through the same reader as the prompt, so /commands and \"\"\" work there."""
    yield from args.prompt or []
    sources = []
    if args.prompts_file:
        sources.append(Path(args.prompts_file).read_text(encoding="utf-8").splitlines())
    if not args.prompt and not args.prompts_file:
        sources.append(stdin.read().splitlines())
    for lines in sources:
        it = iter(lines)

        def read_line(_prompt: str) -> str:
            try:
                return next(it)
            except StopIteration:
                raise EOFError
        while True:
            try:
                yield read_message(read_line)
            except EOFError:
                break


def run_batch(session: Session, messages: Iterator[str]) -> None:
    """Answer each message, print it like the chat would, save the transcript after every round."""
    json_path = None
    for text in messages:
        if not text.strip():
            continue
        print(f"{PROMPT}{text}", flush=True)
        before = len(session.rounds)
        if not handle_line(session, text):
            break
        if len(session.rounds) > before:
            json_path, _ = save_transcript(session)
            if any(r["finish_reason"] == "interrupted" for r in session.rounds[-1]["replies"]):
                notice("interrupted: the remaining messages are not sent")
                break
    if json_path is not None:
        notice(f"transcript: {json_path} and {json_path.with_suffix('.md')}")
    else:
        notice("no messages to answer: pass --prompt, --prompts-file, or pipe prompts on stdin")


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    title, examples = __doc__.split("\n\n")[:2]
    parser = argparse.ArgumentParser(description=title, epilog="examples:\n" + examples,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    models.add_common_args(parser)
    engines.add_engine_args(parser)
    parser.add_argument("--compare", nargs="+", metavar="MODEL[@ENGINE]",
                        help="chat with two or more models at once (replaces --model) and vote on replies; "
                             "MODEL@llama.cpp or MODEL@transformers picks the engine for that one")
    parser.add_argument("--system", default=None, help="system prompt (default: the model's own, if any)")
    parser.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE,
                        help=f"0 = greedy (default: {DEFAULT_TEMPERATURE})")
    parser.add_argument("--top-p", type=float, default=DEFAULT_TOP_P, help=f"default: {DEFAULT_TOP_P}")
    parser.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS,
                        help=f"default: {DEFAULT_MAX_NEW_TOKENS}")
    parser.add_argument("--prompt", action="append", metavar="TEXT",
                        help="answer this message and exit (repeat for a multi-turn conversation)")
    parser.add_argument("--prompts-file", metavar="FILE",
                        help="answer each line (a /command, or a \"\"\" block) and exit")
    parser.add_argument("--skip-memory-check", action="store_true",
                        help="load the --compare models even if the estimate says they will not fit")
    return parser


def validate_args(parser: argparse.ArgumentParser, args) -> None:
    if args.temperature < 0:
        parser.error("--temperature must be >= 0 (0 = greedy)")
    if not 0 < args.top_p <= 1:
        parser.error("--top-p must be in (0, 1]")
    if args.max_new_tokens < 1:
        parser.error("--max-new-tokens must be >= 1")
    if args.prompts_file and not Path(args.prompts_file).is_file():
        parser.error(f"--prompts-file {args.prompts_file}: no such file")
    if args.compare is not None and not 2 <= len(args.compare) <= len(string.ascii_lowercase):
        parser.error("--compare needs at least two models (use --model for one)")


def split_engine(name: str, default: str | None) -> tuple[str, str | None]:
    """'model.gguf@llama.cpp' -> ('model.gguf', 'llama.cpp'); without a known engine suffix, the default."""
    head, sep, tail = name.rpartition("@")
    return (head, tail) if sep and tail in engines.ENGINES else (name, default)


def load_chats(args) -> list[Chat]:
    """Load every model once; check first that each can be had and that several fit in memory together."""
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()  # the chat prints its own one-line load summary
    targets = []
    models.require_available([split_engine(item, None)[0] for item in args.compare or [args.model]],
                             args.revision, args.cache_dir)
    for item in args.compare or [args.model]:  # every name is checked before the first (slow) load
        name, engine = split_engine(item, args.engine)
        resolved = models.resolve(name)
        engine = engine or engines.default_engine(resolved)
        engines.check_engine(engine, resolved)
        targets.append((name, engine))
    if len(targets) > 1:
        notice(check_memory(targets, args))
    chats = []
    for name, engine_name in targets:
        print(f"Loading {name} ({engine_name}) …", flush=True)
        engine = engines.load_from_args(args, name, engine=engine_name)
        chat = make_chat(engine, args.system)
        context = engine.context()
        print(f"Loaded {chat.label} in {engine.load_seconds:.1f} s ({engine.name}, {context['device_name']}, "
              f"{context['weights']}, {chat.context_tokens}-token context)", flush=True)
        if chat.is_base_model:
            notice(f"{chat.label} is a base model, not instruction-tuned: it is prompted with a plain "
                   "'User: … Assistant:' template, may ramble, and each reply stops where it starts "
                   "a new 'User:' turn")
        chats.append(chat)
    meter = energy.EnergyMeter.detect(chats[0].engine.device)
    notice(meter.status_line())
    for chat in chats:
        chat.meter = meter
    labels = [c.label for c in chats]
    for chat in chats:  # the same model on two engines: name the engine
        if labels.count(chat.label) > 1:
            chat.label += f" ({chat.engine.name})"
    labels = [c.label for c in chats]
    if len(set(labels)) < len(labels):
        raise models.UserError(f"--compare got the same model twice ({', '.join(labels)}): give different models "
                               "or engines.")
    return chats


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    validate_args(parser, args)
    args.transcript_stamp = results_io.timestamp()
    interactive = not (args.prompt or args.prompts_file) and sys.stdin.isatty()
    chats = load_chats(args)
    settings = GenerationSettings(args.temperature, args.top_p, args.max_new_tokens)
    session = Session(chats, settings, args, {**results_io.environment(chats[0].engine.device, args.seed),
                                              "energy": chats[0].meter.describe()})
    if interactive:
        run_interactive(session)
    else:
        run_batch(session, batch_messages(args, sys.stdin))
    return 0


if __name__ == "__main__":
    models.run_cli(main)
