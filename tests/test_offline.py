"""Without a network, every script says so in one line and exits 2 at once: no retry chatter.

A closed local port (HF_ENDPOINT=http://127.0.0.1:9) stands in for "no network", whatever network the
test machine has, and an empty HF_HOME for a fresh machine whose cache holds nothing.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import models

ROOT = Path(__file__).resolve().parents[1]
CLOSED_PORT = "http://127.0.0.1:9"
OFFLINE_LINE = "error: cannot reach the Hugging Face Hub"
# The retry loop this replaces took 48 s per model; a bound far below it, far above a busy machine's
# Python start-up (the figure itself is printed by the test for the record).
QUICKLY_S = 20.0

SCRIPTS = {
    "download_models": [],
    "benchmark": [],
    "demo_chat": ["--prompt", "hello"],
    "speculative_demo": ["--max-new-tokens", "4"],
}


def run_offline(script: str, argv: list[str], tmp_path: Path, **env) -> tuple[subprocess.CompletedProcess, float]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    full_env.update(HF_HOME=str(tmp_path / "hf-home"), HF_ENDPOINT=CLOSED_PORT, PYTHONWARNINGS="ignore", **env)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, f"{script}.py", *argv, "--output-dir", str(tmp_path / "out")], cwd=ROOT,
                          env=full_env, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    return proc, time.perf_counter() - start


def assert_one_offline_line(proc: subprocess.CompletedProcess, seconds: float) -> str:
    print(f"exit {proc.returncode} after {seconds:.1f} s: {proc.stderr.strip()}")
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(OFFLINE_LINE), proc.stderr
    assert "Retrying" not in proc.stderr + proc.stdout and "Traceback" not in proc.stderr
    assert seconds < QUICKLY_S
    return lines[0]


@pytest.mark.parametrize("script", SCRIPTS)
def test_each_script_fails_fast_offline_with_one_line(script, tmp_path):
    line = assert_one_offline_line(*run_offline(script, SCRIPTS[script], tmp_path))
    assert "HF_HUB_OFFLINE=1" in line


def test_benchmark_names_all_five_default_models_and_what_to_do(tmp_path):
    line = assert_one_offline_line(*run_offline("benchmark", [], tmp_path))
    assert all(key in line for key in models.DEFAULT_MODELS), line
    assert "download_models.py" in line and "local model directory or .gguf" in line


@pytest.mark.parametrize("script", ["benchmark", "demo_chat"])
def test_hf_hub_offline_and_an_uncached_hub_id_behave_the_same(script, tmp_path):
    argv = ["--models" if script == "benchmark" else "--model", "someone/not-cached-model"]
    line = assert_one_offline_line(*run_offline(script, argv + SCRIPTS[script], tmp_path, HF_HUB_OFFLINE="1"))
    assert "HF_HUB_OFFLINE is set" in line and "someone/not-cached-model" in line


def test_local_models_still_run_when_some_cannot_be_had(tmp_path, tiny_models):
    proc, seconds = run_offline("benchmark", ["--models", "tinyllama", str(tiny_models["llama"]), "--skip-mmlu",
                                              "--skip-humaneval", "--repetitions", "1", "--prompt-tokens", "8",
                                              "--new-tokens", "2", "--category-max-new-tokens", "2",
                                              "--category-repetitions", "1"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "tinyllama is not in the local cache" in proc.stderr and "measuring the others" in proc.stderr
    assert "Retrying" not in proc.stderr + proc.stdout
    assert list((tmp_path / "out").glob("benchmark-*.json"))


def test_finetune_fails_fast_offline_with_one_line(tmp_path):
    line = assert_one_offline_line(*run_offline("finetune_demo", ["--max-steps", "1"], tmp_path))
    assert "smollm2-135m" in line


def test_mmlu_from_the_hub_fails_fast_offline_with_the_local_folder_as_the_fix(tmp_path, tiny_models):
    # a local model needs no Hub, but MMLU without --mmlu-data is the Hub's cais/mmlu: said before any load
    line = assert_one_offline_line(*run_offline("benchmark", ["--quick", "--models", str(tiny_models["llama"])],
                                                tmp_path))
    assert "MMLU dataset cais/mmlu is not in the local cache" in line and "--mmlu-data DIR" in line
