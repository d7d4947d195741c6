"""Typed results: what each benchmark phase measures, as dataclasses the writer and the page both read.

    python -c "import records, json; r = records.BenchmarkRun.from_dict(json.load(open('results/benchmark-20261123-081924.json'))); print(list(r.models))"
    python -c "import records; print(records.Measure.of([1.0, 2.0, 3.0], 'tok/s').fmt())"

A results file is `BenchmarkRun.to_dict()` as JSON, so the JSON layout is the dataclasses' fields (older
files load too: a field they lack takes its default). Readers use attributes, never dict paths.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field

import models
import results_io


class Record:
    """Mixin: `to_dict()` to JSON-ready dicts and `from_dict()` back, nested records included.
    JSON_NAMES maps a field to its key in the file where the key is no identifier ("pass@1")."""

    JSON_NAMES: typing.ClassVar[dict[str, str]] = {}

    @classmethod
    def from_dict(cls, data: dict):
        hints = typing.get_type_hints(cls)
        kwargs = {}
        for f in dataclasses.fields(cls):
            key = cls.JSON_NAMES.get(f.name, f.name)
            if key in data:
                kwargs[f.name] = _convert(hints[f.name], data[key])
        return cls(**kwargs)

    def to_dict(self) -> dict:
        return {self.JSON_NAMES.get(f.name, f.name): _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}


def _convert(hint, value):
    """`value` read from JSON, turned into the annotated type where that is a Record (also inside
    dict[str, R], list[R] and unions such as `R | str | None`)."""
    origin = typing.get_origin(hint)
    if isinstance(hint, type) and issubclass(hint, Record):
        return hint.from_dict(value) if isinstance(value, dict) else value
    if origin in (typing.Union, types.UnionType):
        for arm in typing.get_args(hint):
            if isinstance(arm, type) and issubclass(arm, Record) and isinstance(value, dict):
                return arm.from_dict(value)
            if typing.get_origin(arm) in (dict, list) and isinstance(value, typing.get_origin(arm)):
                return _convert(arm, value)
        return value
    if origin is dict and isinstance(value, dict):
        return {k: _convert(typing.get_args(hint)[1], v) for k, v in value.items()}
    if origin is list and isinstance(value, list):
        return [_convert(typing.get_args(hint)[0], v) for v in value]
    return value


def _plain(value):
    if isinstance(value, Record):
        return value.to_dict()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


# ----------------------------------------------------------------------------------------------
# Speed and memory
# ----------------------------------------------------------------------------------------------

@dataclass
class Measure(Record):
    """One figure measured over repetitions: mean ± sample std, every trial kept."""

    mean: float
    std: float
    unit: str
    n: int = 0  # 0: not recorded (the earliest files), then len(trials)
    trials: list[dict] = field(default_factory=list)
    prompt_tokens: int | None = None  # prefill: tokens per pass; categories: the templated prompt
    new_tokens: int | None = None  # decode: tokens per trial (forced length)
    context_tokens: int | None = None  # decode: prompt before the timed tokens
    max_new_tokens: int | None = None  # categories: the cap under the model's own stopping
    prompt: str | None = None  # TTFT: what was sent
    energy: dict | None = None  # energy.EnergyReading.per_unit(...) over all trials, when measured

    def __post_init__(self):
        self.n = self.n or len(self.trials)

    @classmethod
    def of(cls, values: list[float], unit: str, **extra) -> Measure:
        mean, std = results_io.mean_std(values)
        return cls(mean, std, unit, len(values), **extra)

    def fmt(self, digits: int | None = None) -> str:
        """mean ± std; two decimals below 10 so slow CPU figures keep their spread."""
        if digits is None:
            digits = 1 if abs(self.mean) >= 10 else 2
        if self.n == 1:  # no spread to show from a single trial
            return f"{self.mean:.{digits}f} (1 trial)"
        return f"{self.mean:.{digits}f} ± {self.std:.{digits}f}"


@dataclass
class Roofline(Record):
    """Decode against the memory-bandwidth limit (as gpt-fast prints): every decoded token reads all
    weights once, so achieved bandwidth = weight bytes x decode tok/s."""

    weight_bytes: int
    decode_tok_s: float
    achieved_gb_s: float
    peak_gb_s: float | None  # the machine's measured read bandwidth (roofline.py), None if unknown
    fraction: float | None  # achieved / peak
    bound_tok_s: float | None  # peak / weight bytes: the fastest decode the memory allows
    method: str = ""


@dataclass
class Speed(Record):
    prefill: Measure
    decode: Measure
    ttft: Measure
    categories: dict[str, Measure] | str | None = None  # str: why not measured (synthetic weights)
    roofline: Roofline | None = None


@dataclass
class Memory(Record):
    """Peaks in bytes; `peak_bytes` is the figure to show for the device (CPU: RSS above the baseline
    taken after the libraries were imported and before the model was loaded)."""

    method: str
    peak_bytes: int
    peak_rss_bytes: int | None = None
    baseline_rss_bytes: int | None = None
    peak_rss_above_baseline_bytes: int | None = None
    cuda_max_allocated_bytes: int | None = None
    cuda_max_reserved_bytes: int | None = None
    mps_current_allocated_bytes: int | None = None
    mps_driver_allocated_bytes: int | None = None
    engine: dict = field(default_factory=dict)  # engine-reported sizes (llama.cpp context and KV cache)


# ----------------------------------------------------------------------------------------------
# Quality
# ----------------------------------------------------------------------------------------------

@dataclass
class Accuracy(Record):
    """Accuracy with its 95% Wilson interval and lm-eval's standard error sqrt(p(1-p)/(n-1))."""

    correct: int
    total: int
    accuracy: float
    ci95: list[float]
    stderr: float | None = None

    @classmethod
    def of(cls, correct: int, total: int) -> Accuracy:
        low, high = results_io.wilson_interval(correct, total)
        acc = correct / total if total else math.nan
        stderr = math.sqrt(acc * (1 - acc) / (total - 1)) if total > 1 else math.nan
        return cls(correct, total, acc, [low, high], stderr)

    def fmt(self) -> str:
        """'25.8 [23.2, 28.6]' in percent."""
        low, high = self.ci95
        return f"{100 * self.accuracy:.1f} [{100 * low:.1f}, {100 * high:.1f}]"


@dataclass
class MMLUQuestion(Record):
    subject: str
    index: int
    answer: str  # letter
    prediction: str
    correct: bool
    loglikelihoods: list[float]  # A..D
    single_pass: bool = True
    truncated: bool = False  # the prompt was left-truncated to the model's context, as lm-eval does


@dataclass
class MMLUResult(Record):
    shots: int
    subjects: dict[str, Accuracy]
    micro: Accuracy
    macro: dict  # {"accuracy", "ci95"}: the mean of subject accuracies
    questions: list[MMLUQuestion]
    seconds: float
    chance: float = 0.25
    single_pass_questions: int = 0
    chat_template: bool = False
    limit: int | None = None
    data: str = ""
    truncated_prompts: int = 0
    max_length: int | None = None  # tokens a prompt may have: the model's context
    energy: dict | None = None


@dataclass
class HumanEvalSample(Record):
    completion: str
    status: str  # "passed" | "failed" | "timed out"
    error: str = ""
    seconds: float = 0.0


@dataclass
class HumanEvalProblem(Record):
    task_id: str
    passed: int
    samples: list[HumanEvalSample]


@dataclass
class HumanEvalResult(Record):
    JSON_NAMES: typing.ClassVar[dict[str, str]] = {"pass_at_1": "pass@1", "pass_at_10": "pass@10"}

    problems: int
    samples_per_problem: int
    mode: str  # "completion" | "chat"
    pass_at_1: float
    outcomes: dict[str, int]
    per_problem: list[HumanEvalProblem]
    temperature: float = 0.0
    timeout_s: float = 3.0
    memory_mb: int = 1024
    generate_seconds: float = 0.0
    pass_at_10: float | None = None
    batch_size: int = 1
    isolation: dict | None = None  # sandbox.Isolation.as_dict(): what protected the machine
    energy: dict | None = None


# ----------------------------------------------------------------------------------------------
# One model, one run
# ----------------------------------------------------------------------------------------------

@dataclass
class ModelResult(Record):
    """One row: a model on one engine with one weights format. `error` is set when the model could
    not be measured at all; `phase_errors` when one phase failed and the others were kept."""

    name: str  # what the user typed
    model: str  # display label
    quantize: str = "none"
    engine: str = "transformers"
    engine_version: str | None = None
    engine_build: str | None = None
    weights: str | None = None  # "bf16", "GGUF Q4_1", "GGUF Q4_1 de-quantized to fp32", "int4 NF4 (bitsandbytes)"
    source: str | None = None  # registry | hub | local | gguf | synthetic
    path: str | None = None
    hf_id: str | None = None
    gguf_file: str | None = None
    revision: str | None = None
    device: str | None = None
    device_name: str | None = None
    dtype: str | None = None
    threads: int | None = None
    gpu_layers: int | None = None
    load_seconds: float | None = None
    build_seconds: float | None = None  # synthetic twins are built, not loaded
    disk_bytes: int | None = None
    params: int | None = None
    published_params: int | None = None
    weight_bytes: int | None = None
    kv_cache_bytes_per_1k_tokens: int | None = None
    baseline_rss_bytes: int | None = None
    speed: Speed | None = None
    memory: Memory | None = None
    mmlu: dict[str, MMLUResult] | str | None = None  # shots -> result; str: why not measured
    humaneval: HumanEvalResult | str | None = None
    energy: dict | None = None  # the meter's description and idle baseline, or why not measured
    error: str | None = None
    phase_errors: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def weights_label(self) -> str:
        """How the weights ran, for tables: 'random-weight twin', 'GGUF Q4_1 (llama.cpp)', …"""
        if self.source == "synthetic":
            return "random-weight twin"
        if self.weights:
            return self.weights
        if self.source == "gguf":  # files written before the engine layer
            quant = models.gguf_quant(self.gguf_file)
            return f"GGUF {quant} de-quantized to {self.dtype}".replace("  ", " ")
        return {"int8": "int8 (bitsandbytes)", "int4": "int4 NF4 (bitsandbytes)"}.get(self.quantize, self.dtype or "")

    @property
    def is_quantized(self) -> bool:
        if self.quantize != "none":
            return True
        quant = models.gguf_quant(self.gguf_file) if self.source == "gguf" else ""
        return bool(quant) and quant not in ("F16", "BF16", "F32")


@dataclass
class BenchmarkRun(Record):
    script: str
    settings: dict
    environment: dict
    models: dict[str, ModelResult] = field(default_factory=dict)
    resumed: list[str] = field(default_factory=list)  # dates the run was resumed
