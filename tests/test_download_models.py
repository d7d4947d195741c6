"""download_models.py: file selection, size planning, gated/offline handling, verification, --list."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from huggingface_hub.hf_api import BlobLfsInfo, RepoSibling

import download_models as dm
from test_models import _hub_error

ROOT = Path(__file__).resolve().parents[1]

REPO_FILES = ["config.json", "generation_config.json", "model.safetensors", "pytorch_model.bin",
              "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
              "chat_template.jinja", "README.md", ".gitattributes", "onnx/model.onnx", "original/consolidated.00.pth",
              "original/params.json", "model.Q4_0.gguf", "flax_model.msgpack", "LICENSE.txt"]


def test_select_files_keeps_only_what_loading_needs():
    assert dm.select_files(REPO_FILES) == sorted([
        "LICENSE.txt", "chat_template.jinja", "config.json", "generation_config.json", "model.safetensors",
        "special_tokens_map.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json"])


def test_select_files_falls_back_to_bin_without_safetensors():
    names = ["config.json", "pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin",
             "pytorch_model.bin.index.json", "tokenizer.json"]
    assert dm.select_files(names) == sorted(names)


def _siblings(files: dict[str, bytes]):
    out = []
    for name, content in files.items():
        if name.endswith(".safetensors"):
            lfs = BlobLfsInfo(size=len(content), sha256=hashlib.sha256(content).hexdigest(), pointer_size=134)
            out.append(RepoSibling(name, size=len(content), blob_id="x", lfs=lfs))
        else:
            blob = hashlib.sha1(f"blob {len(content)}\0".encode() + content).hexdigest()
            out.append(RepoSibling(name, size=len(content), blob_id=blob))
    return out


class FakeApi:
    """Stands in for HfApi.model_info; repositories map to {file: content}."""

    def __init__(self, repos, errors=None):
        self.repos, self.errors = repos, errors or {}

    def model_info(self, repo_id, **_kwargs):
        if repo_id in self.errors:
            raise self.errors[repo_id]
        return SimpleNamespace(siblings=_siblings(self.repos[repo_id]), sha="c0ffee", gated=False)


def _fake_snapshot(repos, tmp_path, errors=None):
    """snapshot_download replacement: writes the allowed files into a snapshot folder."""
    def snapshot_download(repo_id, allow_patterns=None, **_kwargs):
        if errors and repo_id in errors:
            raise errors[repo_id]
        snap = tmp_path / "cache" / repo_id.replace("/", "--")
        snap.mkdir(parents=True, exist_ok=True)
        for name in allow_patterns:
            (snap / name).write_bytes(repos[repo_id][name])
        return str(snap)
    return snapshot_download


REPOS = {
    "TinyLlama/TinyLlama-1.1B-Chat-v1.0": {"config.json": b"{}", "model.safetensors": b"w" * 1000,
                                           "pytorch_model.bin": b"b" * 1000, "tokenizer.json": b"{}"},
    "meta-llama/Llama-3.2-1B-Instruct": {"config.json": b"{}", "model.safetensors": b"v" * 500},
}


def test_plan_reports_sizes_and_hashes():
    plan = dm.plan_model(FakeApi(REPOS), "tinyllama", "TinyLlama/TinyLlama-1.1B-Chat-v1.0", False, None)
    assert [f.name for f in plan.files] == ["config.json", "model.safetensors", "tokenizer.json"]
    assert plan.total_bytes == 1004  # the duplicate .bin is not counted
    assert plan.files[1].sha256 == hashlib.sha256(b"w" * 1000).hexdigest()


def test_gated_model_is_reported_and_others_still_download(tmp_path, monkeypatch, capsys):
    gated_error = _hub_error(403, "GatedRepo")
    errors = {"meta-llama/Llama-3.2-1B-Instruct": gated_error}
    monkeypatch.setattr("huggingface_hub.HfApi", lambda: FakeApi(REPOS))
    monkeypatch.setattr("huggingface_hub.snapshot_download", _fake_snapshot(REPOS, tmp_path, errors))
    code = dm.main(["--models", "tinyllama", "llama3.2-1b", "--verify", "--output-dir", str(tmp_path / "out")])
    assert code == 1  # something failed: non-zero, but the other model finished
    result = json.loads(next((tmp_path / "out").glob("download_models-*.json")).read_text())
    by_model = {o["model"]: o for o in result["models"]}
    assert by_model["tinyllama"]["status"] == "ok" and by_model["tinyllama"]["verified"] is True
    gated = by_model["llama3.2-1b"]
    assert gated["status"] == "failed" and "gated" in gated["message"] and "hf auth login" in gated["message"]
    assert (tmp_path / "cache" / "TinyLlama--TinyLlama-1.1B-Chat-v1.0" / "model.safetensors").is_file()
    assert not (tmp_path / "cache" / "TinyLlama--TinyLlama-1.1B-Chat-v1.0" / "pytorch_model.bin").exists()
    assert "Environment" in next((tmp_path / "out").glob("download_models-*.md")).read_text()


def test_dry_run_shows_sizes_and_downloads_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("huggingface_hub.HfApi", lambda: FakeApi(REPOS))
    monkeypatch.setattr("huggingface_hub.snapshot_download", lambda *a, **k: pytest.fail("downloaded"))
    assert dm.main(["--models", "tinyllama", "--dry-run", "--output-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "tinyllama" in out and "total: 0.00 GB" in out and not list(tmp_path.iterdir())


def test_not_enough_disk_is_a_user_error(tmp_path, monkeypatch):
    plan = dm.Plan("big", "org/big", False, [dm.RepoFile("model.safetensors", 10**18)])
    with pytest.raises(dm.models.UserError, match="not enough disk space"):
        dm.check_disk([plan], str(tmp_path))


def test_verify_detects_a_corrupt_file(tmp_path):
    repo = REPOS["TinyLlama/TinyLlama-1.1B-Chat-v1.0"]
    plan = dm.plan_model(FakeApi(REPOS), "tinyllama", "TinyLlama/TinyLlama-1.1B-Chat-v1.0", False, None)
    for f in plan.files:
        (tmp_path / f.name).write_bytes(repo[f.name])
    assert dm.verify(plan, tmp_path) == []
    (tmp_path / "model.safetensors").write_bytes(b"x" * 1000)  # same size, other content
    (tmp_path / "config.json").write_bytes(b"[]")
    assert dm.verify(plan, tmp_path) == ["config.json", "model.safetensors"]


def _run(args, tmp_path, **env):
    full_env = dict(os.environ, HF_HOME=str(tmp_path / "hf"), **env)
    return subprocess.run([sys.executable, "download_models.py", *args], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("extra", [[], ["--dry-run"]])
def test_unreachable_hub_fails_fast_with_one_line(tmp_path, extra):
    # A closed local port stands in for "no network", whatever network the test machine has.
    proc = _run(["--models", "tinyllama", *extra, "--output-dir", str(tmp_path / "out")], tmp_path,
                HF_ENDPOINT="http://127.0.0.1:9")
    assert proc.returncode != 0
    assert proc.stderr.strip() == ("error: cannot reach the Hugging Face Hub (no network, or the Hub is down): "
                                   "nothing was downloaded. Connect and run again; models already in the cache "
                                   "work offline with HF_HUB_OFFLINE=1.")
    assert "Traceback" not in proc.stderr + proc.stdout


def test_list_works_offline_and_shows_cached_models(tmp_path):
    snap = tmp_path / "hf" / "hub" / "models--EleutherAI--pythia-70m" / "snapshots" / "abc"
    snap.mkdir(parents=True)
    (snap / "config.json").write_text("{}" * 600_000)
    (snap.parents[1] / "refs").mkdir()
    (snap.parents[1] / "refs" / "main").write_text("abc")
    proc = _run(["--list"], tmp_path, HF_HUB_OFFLINE="1", HF_ENDPOINT="http://127.0.0.1:9")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].split()[:4] == ["key", "Hugging", "Face", "id"]
    row = next(line for line in lines if line.startswith("pythia-70m "))
    assert "yes (0.00 GB)" in row
    assert "no" in next(line for line in lines if line.startswith("tinyllama "))
    assert len([line for line in lines if line and line.split()[0] in dm.models.REGISTRY]) == len(dm.models.REGISTRY)
