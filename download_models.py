"""Download registry models into the Hugging Face cache so every script can run offline.

    python download_models.py --list                      # the registry, with what is downloaded (offline)
    python download_models.py --dry-run                   # what the default set would fetch, with sizes
    python download_models.py --models tinyllama qwen2.5-0.5b --verify
    python download_models.py --all --cache-dir /data/hf  # everything in the registry
    python download_models.py --models qwen2.5-1.5b smollm2-1.7b --gguf Q4_K_M --verify  # one GGUF file each

Only the files loading needs are fetched (safetensors rather than duplicate .bin, no onnx/gguf/
"original" folders). With --gguf QUANT it fetches instead the one GGUF file of that quantization per
model, from the registry's GGUF repositories (the model makers' own first, then a well-known
repackager); a model with none, or without that quant, is reported in one line and the others still
download. Complete files are skipped and partial ones resumed by huggingface_hub; --verify checks every
file against the sha256 (or git blob id) the Hub publishes. A gated model that cannot be fetched is
reported with how to get access and the others still download. Afterwards, run any script with
HF_HUB_OFFLINE=1.
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import models
import results_io

DEFAULT_OUTPUT_DIR = models.DEFAULT_OUTPUT_DIR
DEFAULT_TIMEOUT_S = 15.0  # per metadata request; an unreachable hub fails well before this
DISK_MARGIN = 1.05  # ask for 5% more free space than the files need

# What loading a causal LM needs; everything else in a repository is skipped.
NEEDED_PATTERNS = ("*.json", "*.safetensors", "tokenizer.model", "*.tiktoken", "*.jinja", "*.txt", "*.py")
SKIPPED_DIRS = ("original/", "onnx/", "openvino/", "coreml/", "tflite/", "gguf/")
SKIPPED_SUFFIXES = (".gguf", ".onnx", ".onnx_data", ".msgpack", ".h5", ".ot", ".tflite", ".mlmodel")
FALLBACK_WEIGHTS = ("pytorch_model*.bin",)  # only where a repository has no safetensors
GGUF_SHARD = re.compile(r"-\d{5}-of-\d{5}$")  # "q4_k_m-00001-of-00002": one part of a split GGUF


@dataclass
class RepoFile:
    name: str
    size: int
    sha256: str | None = None  # LFS files
    blob_id: str | None = None  # git blob sha1, for small non-LFS files


@dataclass
class Plan:
    key: str
    repo_id: str
    gated: bool
    files: list[RepoFile] = field(default_factory=list)
    revision: str | None = None  # commit the metadata describes
    quant: str | None = None  # GGUF quantization ("Q4_K_M") when the plan is one GGUF file

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)


class NoGgufError(models.UserError):
    """The registry knows no GGUF repository for a model: it is skipped, not failed."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--models", nargs="+", metavar="MODEL",
                      help=f"registry keys/aliases or Hugging Face ids (default: {' '.join(models.DEFAULT_MODELS)})")
    what.add_argument("--all", action="store_true", help="every model in the registry")
    parser.add_argument("--gguf", metavar="QUANT", default=None,
                        help="fetch one GGUF file per model at this quantization (Q4_K_M, Q8_0, Q4_0, F16, ...; "
                             "any case) instead of the safetensors")
    parser.add_argument("--list", action="store_true", help="print the registry and what is downloaded; offline")
    parser.add_argument("--dry-run", action="store_true", help="show what would be fetched, with sizes, and stop")
    parser.add_argument("--verify", action="store_true", help="check every file against the Hub's hashes")
    parser.add_argument("--revision", default=None, help="branch, tag or commit (default: main)")
    parser.add_argument("--cache-dir", default=None, help="hub cache (default: $HF_HOME/hub)")
    parser.add_argument("--output-dir", default=DEFAULT_OUTPUT_DIR, help=f"default: {DEFAULT_OUTPUT_DIR}/")
    return parser


# ----------------------------------------------------------------------------------------------
# Planning
# ----------------------------------------------------------------------------------------------

def select_files(names: list[str]) -> list[str]:
    """The files a from_pretrained load needs: configs, tokenizer, safetensors (or .bin if none)."""
    def wanted(name: str, patterns) -> bool:
        if name.startswith(SKIPPED_DIRS) or "/" in name and name.split("/")[0] + "/" in SKIPPED_DIRS:
            return False
        if name.endswith(SKIPPED_SUFFIXES):
            return False
        base = name.rsplit("/", 1)[-1]
        return "/" not in name and any(fnmatch.fnmatch(base, p) for p in patterns)

    chosen = [n for n in names if wanted(n, NEEDED_PATTERNS)]
    if not any(n.endswith(".safetensors") for n in chosen):
        chosen += [n for n in names if wanted(n, FALLBACK_WEIGHTS)]
    return sorted(chosen)


def targets(args) -> list[tuple[str, str, bool, models.ModelSpec | None]]:
    """(label, repo id, gated, registry entry or None) for each requested model."""
    if args.all:
        return [(s.key, s.hf_id, s.gated, s) for s in models.REGISTRY.values()]
    out = []
    for name in args.models or models.DEFAULT_MODELS:
        resolved = models.resolve(name)
        if resolved.source not in ("registry", "hub"):
            raise models.UserError(f"'{name}' is a local path, nothing to download: use it directly with --model(s).")
        gated = resolved.spec.gated if resolved.spec else False
        out.append((resolved.label, resolved.path, gated, resolved.spec))
    return out


def repo_file(sibling) -> RepoFile:
    """A RepoFile from the Hub's metadata for one file (size and sha256 from LFS when it is there)."""
    lfs = getattr(sibling, "lfs", None)
    return RepoFile(sibling.rfilename, int(sibling.size or (lfs.size if lfs else 0) or 0),
                    sha256=getattr(lfs, "sha256", None) if lfs else None, blob_id=sibling.blob_id)


def plan_model(api, label: str, repo_id: str, gated: bool, revision: str | None) -> Plan:
    """Ask the Hub which files the repository has, with sizes and hashes, and keep the needed ones."""
    info = api.model_info(repo_id, revision=revision, files_metadata=True, timeout=DEFAULT_TIMEOUT_S)
    siblings = {s.rfilename: s for s in info.siblings or []}
    files = [repo_file(siblings[name]) for name in select_files(list(siblings))]
    return Plan(label, repo_id, gated or bool(getattr(info, "gated", False)), files, info.sha)


def quant_of(source: models.GgufSource, name: str) -> str | None:
    """The quantization a file of `source` is named for ("q4_k_m"), or None for other files and shards."""
    head, _, tail = source.pattern.partition("{quant}")
    if not (name.startswith(head) and name.endswith(tail)) or len(name) <= len(head) + len(tail):
        return None
    quant = name[len(head):len(name) - len(tail)]
    return None if "/" in quant or GGUF_SHARD.search(quant) else quant


def quant_order(quant: str) -> tuple[int, str]:
    """Sort key: by the bits in the name (Q2_K before Q8_0 before F16), then by name."""
    bits = re.search(r"\d+", quant)
    return (int(bits.group()) if bits else 99, quant)


def plan_gguf(api, label: str, spec: models.ModelSpec | None, quant: str, revision: str | None) -> Plan:
    """Find the one GGUF file of `quant` for a model: in the sources the registry lists it for first (makers'
    own before repackagers), then in the others' Hub listings; size and sha256 from the Hub's metadata.

    Raises:
        NoGgufError: the registry knows no GGUF repository for the model.
        models.UserError: no source publishes `quant`; names the quants each one has.
    """
    sources = spec.gguf if spec else ()
    if not sources:
        raise NoGgufError("no GGUF repository is known for this model: download its safetensors (without --gguf)")
    key = models.GgufSource.key(quant)
    ordered = sorted(sources, key=lambda s: s.filename(quant) is None)  # stable: listed ones first
    found: dict[str, list[str]] = {}
    for source in ordered:
        with models.translated_errors(source.repo_id):
            info = api.model_info(source.repo_id, revision=revision, files_metadata=True, timeout=DEFAULT_TIMEOUT_S)
        quants = {}
        for sibling in info.siblings or []:
            q = quant_of(source, sibling.rfilename)
            if q is not None:
                quants[models.GgufSource.key(q)] = sibling
        if key in quants:
            gated = bool(getattr(info, "gated", False))
            return Plan(label, source.repo_id, gated, [repo_file(quants[key])], info.sha, quant=key)
        found[source.repo_id] = sorted(quants, key=quant_order)
    have = "; ".join(f"{repo} has {', '.join(qs) or 'no single-file GGUF'}" for repo, qs in found.items())
    raise models.UserError(f"no {key} GGUF: {have}. Pick one of those with --gguf.")


def cache_root(cache_dir: str | None) -> Path:
    from huggingface_hub import constants
    return Path(cache_dir or constants.HF_HUB_CACHE)


def check_disk(plans: list[Plan], cache_dir: str | None) -> None:
    """Raise UserError when the cache's disk lacks room for the planned files."""
    root = cache_root(cache_dir)
    probe = root
    while not probe.exists():
        probe = probe.parent
    need = int(sum(p.total_bytes for p in plans) * DISK_MARGIN)
    free = shutil.disk_usage(probe).free
    if need > free:
        raise models.UserError(f"not enough disk space in {root}: need {results_io.gb(need)} GB, {results_io.gb(free)} GB free. "
                               "Free some space, pick fewer --models, or use --cache-dir on a bigger disk.")


# ----------------------------------------------------------------------------------------------
# Downloading and verifying
# ----------------------------------------------------------------------------------------------

def download(plan: Plan, args) -> Path:
    """Fetch the planned files (complete ones skipped, partial ones resumed) and return the snapshot."""
    from huggingface_hub import snapshot_download
    path = snapshot_download(plan.repo_id, revision=plan.revision or args.revision,
                             allow_patterns=[f.name for f in plan.files], cache_dir=args.cache_dir,
                             etag_timeout=DEFAULT_TIMEOUT_S)
    return Path(path)


def git_blob_sha1(path: Path) -> str:
    """The id git gives a file's content: sha1 of 'blob <size>\\0' + bytes."""
    digest = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def verify(plan: Plan, snapshot: Path) -> list[str]:
    """Names of files whose size or hash differs from the Hub's metadata (empty when all match)."""
    bad = []
    for f in plan.files:
        path = snapshot / f.name
        if not path.is_file() or (f.size and path.stat().st_size != f.size):
            bad.append(f.name)
        elif f.sha256 and models.file_sha256(path) != f.sha256:
            bad.append(f.name)
        elif not f.sha256 and f.blob_id and git_blob_sha1(path) != f.blob_id:
            bad.append(f.name)
    return bad


def cached_repos(cache_dir: str | None) -> dict[str, int]:
    """{repo id: bytes on disk} from the local cache; never touches the network."""
    from huggingface_hub import scan_cache_dir
    root = cache_root(cache_dir)
    if not root.is_dir():
        return {}
    try:
        info = scan_cache_dir(root)
    except Exception:  # noqa: BLE001  a damaged cache must not break --list
        return {}
    return {r.repo_id: r.size_on_disk for r in info.repos if r.repo_type == "model"}


# ----------------------------------------------------------------------------------------------
# Reporting
# ----------------------------------------------------------------------------------------------

def gguf_cell(spec: models.ModelSpec, cache_dir: str | None) -> str:
    """The GGUF quants the registry lists for a model, "*" after each one in the cache."""
    quants = sorted({models.GgufSource.key(q) for s in spec.gguf for q in s.quants}, key=quant_order)
    return " ".join(q + ("*" if models.cached_gguf(spec, q, cache_dir) else "") for q in quants) or "none"


def registry_rows(cache_dir: str | None) -> list[list]:
    cached = cached_repos(cache_dir)
    rows = []
    for s in models.REGISTRY.values():
        size = cached.get(s.hf_id)
        rows.append([s.key, s.hf_id, f"{s.params / 1e9:.2f}B", s.family, "instruct" if s.instruct else "base",
                     "yes" if s.gated else "", s.license, f"yes ({results_io.gb(size)} GB)" if size else "no",
                     gguf_cell(s, cache_dir)])
    return rows


REGISTRY_HEADERS = ["key", "Hugging Face id", "params", "family", "type", "gated", "license", "downloaded",
                    "GGUF quants (* cached)"]


def print_registry(cache_dir: str | None) -> None:
    from tabulate import tabulate
    print(tabulate(registry_rows(cache_dir), headers=REGISTRY_HEADERS))
    print(f"\ndefault set: {' '.join(models.DEFAULT_MODELS)}   cache: {cache_root(cache_dir)}")


def print_plan(plans: list[Plan]) -> None:
    from tabulate import tabulate
    if any(p.quant for p in plans):  # one GGUF file per model: name it
        rows = [[p.key, p.repo_id, ", ".join(f.name for f in p.files), results_io.gb(p.total_bytes),
                 "yes" if p.gated else ""] for p in plans]
        print(tabulate(rows, headers=["model", "repository", "file", "GB", "gated"]))
    else:
        rows = [[p.key, p.repo_id, len(p.files), results_io.gb(p.total_bytes), "yes" if p.gated else ""]
                for p in plans]
        print(tabulate(rows, headers=["model", "repository", "files", "GB", "gated"]))
    print(f"total: {results_io.gb(sum(p.total_bytes for p in plans))} GB")


def summary_markdown(outcomes: list[dict], env: dict) -> str:
    headers = ["Model", "Repository", "Status", "GB", "Note"]
    rows = [[o["model"], o["repo_id"], o["status"], o.get("gb", ""), o.get("message", "")] for o in outcomes]
    if any("gguf_file" in o for o in outcomes):
        headers[2:2] = ["GGUF file", "SHA-256"]
        for row, o in zip(rows, outcomes):
            row[2:2] = [o.get("gguf_file", ""), o.get("sha256", "")]
    return ("# Model downloads\n\n" + results_io.markdown_table(headers, rows)
            + "\n## Environment\n\n" + results_io.environment_markdown(env))


def fetch_one(plan: Plan, args) -> dict:
    """Download and (optionally) verify one planned model; a gated or missing repo becomes an outcome."""
    outcome = {"model": plan.key, "repo_id": plan.repo_id}
    if plan.quant:  # what the Hub says the file is: recorded whether or not it downloads
        (f,) = plan.files
        outcome.update(quant=plan.quant, gguf_file=f.name, bytes=f.size, sha256=f.sha256)
    try:
        with models.translated_errors(plan.repo_id):
            snapshot = download(plan, args)
    except models.UserError as exc:
        if "cannot reach the Hugging Face Hub" in str(exc):
            raise
        return dict(outcome, status="failed", message=str(exc))
    outcome.update(status="ok", path=str(snapshot), revision=plan.revision, gb=results_io.gb(plan.total_bytes),
                   files=[f.name for f in plan.files])
    if args.verify:
        bad = verify(plan, snapshot)
        outcome["verified"] = not bad
        if bad:
            outcome.update(status="failed", message=f"hash mismatch: {', '.join(bad)} (run again to re-fetch)")
    return outcome


def plan_all(api, args) -> tuple[list[Plan], list[dict]]:
    """Metadata for every requested model, so sizes are known before anything downloads; a model that
    cannot be planned becomes a failed (or, without a GGUF repository, skipped) outcome."""
    plans, unplanned = [], []
    for label, repo_id, gated, spec in targets(args):
        try:
            with models.translated_errors(repo_id):
                plans.append(plan_gguf(api, label, spec, args.gguf, args.revision) if args.gguf
                             else plan_model(api, label, repo_id, gated, args.revision))
        except models.UserError as exc:
            if "cannot reach the Hugging Face Hub" in str(exc):
                raise models.UserError("cannot reach the Hugging Face Hub (no network, or the Hub is down): "
                                       "nothing was downloaded. Connect and run again; models already in the "
                                       "cache work offline with HF_HUB_OFFLINE=1.") from exc
            print(f"  {label}: {exc}", file=sys.stderr)
            status = "skipped" if isinstance(exc, NoGgufError) else "failed"
            unplanned.append({"model": label, "repo_id": repo_id, "status": status, "message": str(exc)})
    return plans, unplanned


def save_results(json_path: Path, env: dict, args, outcomes: list[dict]) -> None:
    results_io.write_results(json_path, {"environment": env, "gguf": args.gguf, "models": outcomes},
                             summary_markdown(outcomes, env))


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.list:
        print_registry(args.cache_dir)
        return 0
    if models.hub_unreachable():  # one second, no retries: nothing can be planned without the Hub
        raise models.UserError(f"cannot reach the Hugging Face Hub ({models.hub_unreachable()}): nothing was "
                               "downloaded. Connect and run again; models already in the cache work offline "
                               "with HF_HUB_OFFLINE=1.")
    from huggingface_hub import HfApi
    plans, outcomes = plan_all(HfApi(), args)
    print_plan(plans)
    check_disk(plans, args.cache_dir)
    if args.dry_run:
        return 0
    env = results_io.environment(device="cpu")
    json_path, _ = results_io.result_paths(args.output_dir, "download_models")
    save_results(json_path, env, args, outcomes)  # models that could not be planned, before any download
    for plan in plans:
        what = f"{plan.files[0].name}, " if plan.quant else ""
        print(f"\n== {plan.key} ({plan.repo_id}, {what}{results_io.gb(plan.total_bytes)} GB)")
        outcomes.append(fetch_one(plan, args))
        save_results(json_path, env, args, outcomes)
    from tabulate import tabulate
    print("\n" + tabulate([[o["model"], o["status"], o.get("gb", ""), o.get("message", "")] for o in outcomes],
                          headers=["model", "status", "GB", "note"]))
    print(f"\nwrote {json_path} and {json_path.with_suffix('.md')}")
    return 1 if not plans or any(o["status"] == "failed" for o in outcomes) else 0


if __name__ == "__main__":
    models.run_cli(main)
