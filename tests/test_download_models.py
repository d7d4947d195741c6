"""download_models.py: file selection, size planning, gated/offline handling, verification, --list, --gguf."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from huggingface_hub.hf_api import BlobLfsInfo, RepoSibling

import download_models as dm
from test_models import _hub_error

ROOT = Path(__file__).resolve().parents[1]

@pytest.fixture(autouse=True)
def hub_answers(monkeypatch):
    """In-process tests fake the Hub's API: its reachability check passes as a real Hub's would.
    (The tests that run the script in a subprocess point it at a closed port instead.)"""
    monkeypatch.setattr(dm.models, "hub_unreachable", lambda: None)


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
        if name.endswith((".safetensors", ".gguf")):  # stored with Git LFS on the Hub: size and sha256
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


@pytest.mark.parametrize("extra", [[], ["--dry-run"], ["--gguf", "Q4_K_M"]])
def test_unreachable_hub_fails_fast_with_one_line(tmp_path, extra):
    # A closed local port stands in for "no network", whatever network the test machine has.
    proc = _run(["--models", "tinyllama", *extra, "--output-dir", str(tmp_path / "out")], tmp_path,
                HF_ENDPOINT="http://127.0.0.1:9")
    assert proc.returncode != 0
    assert proc.stderr.strip() == ("error: cannot reach the Hugging Face Hub (cannot reach http://127.0.0.1:9 "
                                   "(Connection refused)): nothing was downloaded. Connect and run again; models "
                                   "already in the cache work offline with HF_HUB_OFFLINE=1.")
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


# ----------------------------------------------------------------------------------------------
# --gguf: one GGUF file per model from the registry's GGUF repositories
# ----------------------------------------------------------------------------------------------

QWEN_GGUF = "Qwen/Qwen2.5-1.5B-Instruct-GGUF"  # the makers' own; lower-case quants, "fp16"
SMOL_MAKER = "HuggingFaceTB/SmolLM2-1.7B-Instruct-GGUF"  # q4_k_m only
SMOL_BARTOWSKI = "bartowski/SmolLM2-1.7B-Instruct-GGUF"  # upper-case quants, "f16"
GGUF_REPOS = {
    QWEN_GGUF: {"qwen2.5-1.5b-instruct-q4_k_m.gguf": b"k" * 700, "qwen2.5-1.5b-instruct-q8_0.gguf": b"e" * 900,
                "qwen2.5-1.5b-instruct-fp16.gguf": b"h" * 1500, "README.md": b"# Qwen",
                "qwen2.5-1.5b-instruct-q3_k_m.gguf": b"3" * 600},
    SMOL_MAKER: {"smollm2-1.7b-instruct-q4_k_m.gguf": b"s" * 800},
    SMOL_BARTOWSKI: {"SmolLM2-1.7B-Instruct-Q4_K_M.gguf": b"b" * 800, "SmolLM2-1.7B-Instruct-Q8_0.gguf": b"B" * 1200,
                     "SmolLM2-1.7B-Instruct-Q3_K_L.gguf": b"l" * 650, "SmolLM2-1.7B-Instruct.imatrix": b"i"},
    "Qwen/Qwen3-1.7B-GGUF": {"Qwen3-1.7B-Q8_0.gguf": b"8" * 100, "LICENSE": b"apache"},
    "ggml-org/Qwen3-1.7B-GGUF": {"Qwen3-1.7B-Q4_K_M.gguf": b"4" * 50, "Qwen3-1.7B-Q8_0.gguf": b"8" * 100,
                                 "Qwen3-1.7B-f16.gguf": b"f" * 200, "Qwen3-1.7B-Q6_K-00001-of-00002.gguf": b"6",
                                 "Qwen3-1.7B-Q6_K-00002-of-00002.gguf": b"6"},
}
REG = dm.models.REGISTRY


@pytest.mark.parametrize("model, quant, repo, name", [
    ("qwen2.5-1.5b", "Q4_K_M", QWEN_GGUF, "qwen2.5-1.5b-instruct-q4_k_m.gguf"),  # lower-case file names
    ("qwen2.5-1.5b", "f16", QWEN_GGUF, "qwen2.5-1.5b-instruct-fp16.gguf"),  # the same quant, spelled "fp16"
    ("smollm2-1.7b", "q4_k_m", SMOL_MAKER, "smollm2-1.7b-instruct-q4_k_m.gguf"),  # the makers' repository first
    ("smollm2-1.7b", "q8_0", SMOL_BARTOWSKI, "SmolLM2-1.7B-Instruct-Q8_0.gguf"),  # upper-case, from the repackager
    ("smollm2-1.7b", "Q3_K_L", SMOL_BARTOWSKI, "SmolLM2-1.7B-Instruct-Q3_K_L.gguf"),  # in the listing, not the table
])
def test_gguf_plan_picks_the_one_file_for_the_quant(model, quant, repo, name):
    plan = dm.plan_gguf(FakeApi(GGUF_REPOS), model, REG[model], quant, None)
    content = GGUF_REPOS[repo][name]
    assert (plan.repo_id, [f.name for f in plan.files]) == (repo, [name])
    assert plan.total_bytes == len(content) and plan.files[0].sha256 == hashlib.sha256(content).hexdigest()
    assert plan.quant == dm.models.GgufSource.key(quant)


def test_gguf_quant_nobody_publishes_names_the_ones_that_exist():
    with pytest.raises(dm.models.UserError) as err:
        dm.plan_gguf(FakeApi(GGUF_REPOS), "qwen3-1.7b", REG["qwen3-1.7b"], "q5_k_m", None)
    # shards ("-00001-of-00002") and other files are not quants one can ask for
    assert str(err.value) == ("no Q5_K_M GGUF: Qwen/Qwen3-1.7B-GGUF has Q8_0; "
                              "ggml-org/Qwen3-1.7B-GGUF has Q4_K_M, Q8_0, F16. Pick one of those with --gguf.")


def _fake_gguf_snapshot(tmp_path, corrupt=()):
    """snapshot_download replacement for GGUF repositories; files named in `corrupt` arrive damaged."""
    def snapshot_download(repo_id, allow_patterns=None, **_kwargs):
        snap = tmp_path / "cache" / repo_id.replace("/", "--")
        snap.mkdir(parents=True, exist_ok=True)
        for name in allow_patterns:
            content = GGUF_REPOS[repo_id][name]
            (snap / name).write_bytes(b"x" * len(content) if name in corrupt else content)
        return str(snap)
    return snapshot_download


def test_gguf_download_fetches_one_file_reports_model_without_gguf_and_records_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("huggingface_hub.HfApi", lambda: FakeApi(GGUF_REPOS))
    monkeypatch.setattr("huggingface_hub.snapshot_download", _fake_gguf_snapshot(tmp_path))
    code = dm.main(["--models", "pythia-1b", "qwen2.5-1.5b", "smollm2-1.7b", "--gguf", "Q8_0", "--verify",
                    "--output-dir", str(tmp_path / "out")])
    captured = capsys.readouterr()
    assert code == 0  # a model without GGUF is skipped, not a failure
    assert captured.err == ("  pythia-1b: no GGUF repository is known for this model: download its safetensors "
                            "(without --gguf)\n")
    plan_line = next(line for line in captured.out.splitlines() if line.startswith("qwen2.5-1.5b "))
    assert plan_line.split()[:3] == ["qwen2.5-1.5b", QWEN_GGUF, "qwen2.5-1.5b-instruct-q8_0.gguf"]
    assert sorted(p.name for p in (tmp_path / "cache").rglob("*") if p.is_file()) == [
        "SmolLM2-1.7B-Instruct-Q8_0.gguf", "qwen2.5-1.5b-instruct-q8_0.gguf"]  # nothing else from either repo
    result = json.loads(next((tmp_path / "out").glob("download_models-*.json")).read_text())
    by_model = {o["model"]: o for o in result["models"]}
    assert by_model["pythia-1b"]["status"] == "skipped"
    smol = by_model["smollm2-1.7b"]
    content = GGUF_REPOS[SMOL_BARTOWSKI]["SmolLM2-1.7B-Instruct-Q8_0.gguf"]
    assert (smol["status"], smol["verified"], smol["repo_id"], smol["quant"], smol["gguf_file"], smol["bytes"],
            smol["sha256"]) == ("ok", True, SMOL_BARTOWSKI, "Q8_0", "SmolLM2-1.7B-Instruct-Q8_0.gguf", len(content),
                                hashlib.sha256(content).hexdigest())
    markdown = next((tmp_path / "out").glob("download_models-*.md")).read_text()
    assert "SmolLM2-1.7B-Instruct-Q8_0.gguf" in markdown and hashlib.sha256(content).hexdigest() in markdown


def test_gguf_plan_table_names_file_repository_and_size(capsys):
    plan = dm.Plan("qwen2.5-1.5b", QWEN_GGUF, False, [dm.RepoFile("qwen2.5-1.5b-instruct-q4_k_m.gguf", 1_117_320_736)],
                   quant="Q4_K_M")
    dm.print_plan([plan])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["model", "repository", "file", "GB", "gated"]
    assert lines[2].split() == ["qwen2.5-1.5b", QWEN_GGUF, "qwen2.5-1.5b-instruct-q4_k_m.gguf", "1.12"]
    assert lines[-1] == "total: 1.12 GB"


def test_gguf_verify_detects_a_corrupt_file(tmp_path, monkeypatch):
    name = "qwen2.5-1.5b-instruct-q4_k_m.gguf"
    monkeypatch.setattr("huggingface_hub.HfApi", lambda: FakeApi(GGUF_REPOS))
    monkeypatch.setattr("huggingface_hub.snapshot_download", _fake_gguf_snapshot(tmp_path, corrupt={name}))
    code = dm.main(["--models", "qwen2.5-1.5b", "--gguf", "q4_k_m", "--verify", "--output-dir", str(tmp_path / "out")])
    assert code == 1
    (outcome,) = json.loads(next((tmp_path / "out").glob("download_models-*.json")).read_text())["models"]
    assert outcome["status"] == "failed" and outcome["verified"] is False and name in outcome["message"]


def test_gguf_unknown_quant_is_one_line_and_the_others_still_download(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("huggingface_hub.HfApi", lambda: FakeApi(GGUF_REPOS))
    monkeypatch.setattr("huggingface_hub.snapshot_download", _fake_gguf_snapshot(tmp_path))
    code = dm.main(["--models", "qwen3-1.7b", "qwen2.5-1.5b", "--gguf", "Q4_K_M", "--dry-run"])
    assert code == 0
    out = capsys.readouterr().out
    assert "Qwen3-1.7B-Q4_K_M.gguf" in out and "qwen2.5-1.5b-instruct-q4_k_m.gguf" in out  # ggml-org's; Qwen's own
    code = dm.main(["--models", "qwen3-1.7b", "qwen2.5-1.5b", "--gguf", "Q3_K_M", "--output-dir", str(tmp_path)])
    err = capsys.readouterr().err.splitlines()
    assert code == 1 and len(err) == 1 and err[0].startswith("  qwen3-1.7b: no Q3_K_M GGUF: Qwen/Qwen3-1.7B-GGUF has ")
    assert (tmp_path / "cache" / QWEN_GGUF.replace("/", "--") / "qwen2.5-1.5b-instruct-q3_k_m.gguf").is_file()


def _cache_file(root: Path, repo_id: str, name: str, content: bytes = b"GGUF") -> Path:
    """A file the way huggingface_hub caches it: models--org--name/snapshots/<rev>/<file> + refs/main."""
    repo_dir = root / ("models--" + repo_id.replace("/", "--"))
    (repo_dir / "snapshots" / "c0ffee").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs").mkdir(exist_ok=True)
    (repo_dir / "refs" / "main").write_text("c0ffee")
    path = repo_dir / "snapshots" / "c0ffee" / name
    path.write_bytes(content)
    return path


def test_cached_gguf_finds_the_file_in_the_hf_cache_without_network(tmp_path, monkeypatch):
    def no_network(*_args, **_kwargs):
        raise AssertionError("cached_gguf touched the network")
    monkeypatch.setattr(socket.socket, "connect", no_network)
    qwen = _cache_file(tmp_path, QWEN_GGUF, "qwen2.5-1.5b-instruct-q4_k_m.gguf")
    smol = _cache_file(tmp_path, SMOL_BARTOWSKI, "SmolLM2-1.7B-Instruct-Q3_K_L.gguf")
    assert dm.models.cached_gguf(REG["qwen2.5-1.5b"], "Q4_K_M", cache_dir=tmp_path) == qwen
    assert dm.models.cached_gguf(REG["smollm2-1.7b"], "q3_k_l", cache_dir=tmp_path) == smol  # the repackager's
    assert dm.models.cached_gguf(REG["qwen2.5-1.5b"], "Q8_0", cache_dir=tmp_path) is None
    assert dm.models.cached_gguf(REG["pythia-1b"], "Q4_K_M", cache_dir=tmp_path) is None
    assert dm.models.cached_gguf(REG["qwen2.5-1.5b"], "Q4_K_M", cache_dir=tmp_path / "empty") is None
    assert dm.models.gguf_source(REG["qwen2.5-1.5b"], "F16") == (QWEN_GGUF, "qwen2.5-1.5b-instruct-fp16.gguf")
    assert dm.models.gguf_source(REG["pythia-1b"], "Q4_K_M") is None


def test_list_shows_gguf_quants_and_which_are_cached(tmp_path):
    _cache_file(tmp_path, SMOL_BARTOWSKI, "SmolLM2-1.7B-Instruct-Q8_0.gguf")
    rows = {row[0]: row[-1] for row in dm.registry_rows(str(tmp_path))}
    assert rows["smollm2-1.7b"] == "Q4_0 Q4_K_M Q5_K_M Q6_K Q8_0* F16"
    assert rows["pythia-1b"] == "none" and "*" not in rows["qwen2.5-1.5b"]


def test_every_gguf_source_is_well_formed():
    for spec in REG.values():
        for source in spec.gguf:
            assert "{quant}" in source.pattern and source.pattern.endswith(".gguf") and source.source
            assert all(dm.quant_of(source, source.filename(q)) == q for q in source.quants)
        assert [s.maker for s in spec.gguf] == sorted((s.maker for s in spec.gguf), reverse=True)  # makers first
