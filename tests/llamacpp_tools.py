"""Build llama.cpp's own tools (llama-bench, llama-quantize) from the sources llama-cpp-python ships.

    python -m tests.llamacpp_tools                      # build llama-bench + llama-quantize, print where and how
    python -m tests.llamacpp_tools --cmake-args "-DGGML_NATIVE=OFF -DGGML_BACKEND_DL=ON -DGGML_CPU_ALL_VARIANTS=ON"
    BILLION_LLM_LLAMACPP_CMAKE_ARGS="-DGGML_NATIVE=ON" python -m tests.llamacpp_tools --targets llama-bench

Shared by tests/bench_llama_bench.py and tests/bench_quant_tradeoff.py. The sdist of the installed
llama-cpp-python version (found with --sdist, in the cache, or fetched with `pip download`) vendors the
exact llama.cpp revision the Python package runs, under vendor/llama.cpp. It is unpacked once and built
with cmake into a cache directory outside the repository, one directory per (version, GGML flags), so a
second call reuses the build. The default GGML flags are the ones the installed wheel was built with, so
llama-bench runs the same CPU kernels as our engine.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import models

# The wheel in the project's venv was built with these (a -DGGML_NATIVE=ON build crashed with a general
# protection fault on an Intel AMX Xeon): AVX2 + FMA + F16C kernels, no AVX-512.
DEFAULT_CMAKE_ARGS = "-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"
CMAKE_ARGS_ENV = "BILLION_LLM_LLAMACPP_CMAKE_ARGS"
DEFAULT_CACHE = Path("~/.cache/billion-llm").expanduser()
DEFAULT_JOBS = 2  # the project's reference machine has 2 cores, shared
DEFAULT_TARGETS = ("llama-bench", "llama-quantize")
PACKAGE = "llama_cpp_python"
# What the wheel's own CMakeLists.txt forces, plus switching off what the tools do not need.
BASE_CMAKE_ARGS = ["-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=ON", "-DLLAMA_CURL=OFF",
                   "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
                   "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_APP=OFF"]


@dataclass
class Build:
    """One cmake build of the vendored llama.cpp: where its programs are and what they were built from."""

    package_version: str  # llama-cpp-python version whose sdist was built
    cmake_args: list[str]  # the GGML flags (BASE_CMAKE_ARGS come first)
    source_dir: Path  # vendor/llama.cpp
    build_dir: Path
    build_seconds: float  # this call's cmake time (0 when nothing needed rebuilding)
    llama_cpp_commit: str = ""
    llama_cpp_build_number: int | None = None
    system_info: str = ""  # llama_print_system_info() of the built library: the CPU features compiled in
    targets: list[str] = field(default_factory=list)

    @property
    def bin_dir(self) -> Path:
        return self.build_dir / "bin"

    def tool(self, name: str) -> Path:
        return self.bin_dir / name

    def describe(self) -> dict:
        return {"package_version": self.package_version, "cmake_args": self.cmake_args,
                "base_cmake_args": BASE_CMAKE_ARGS, "source_dir": str(self.source_dir),
                "build_dir": str(self.build_dir), "build_seconds": round(self.build_seconds, 1),
                "llama_cpp_commit": self.llama_cpp_commit, "llama_cpp_build_number": self.llama_cpp_build_number,
                "system_info": self.system_info, "targets": self.targets}


def installed_version() -> str:
    """The llama-cpp-python version in this environment, whose sources we build."""
    try:
        return version(PACKAGE)
    except PackageNotFoundError as exc:
        raise models.UserError("llama-cpp-python is not installed: pip install -r requirements-llamacpp.txt, "
                               "or pass --sdist with the version to build.") from exc


def cmake_args_from(value: str | None) -> list[str]:
    """GGML flags from --cmake-args, else $BILLION_LLM_LLAMACPP_CMAKE_ARGS, else the wheel's."""
    return shlex.split(value or os.environ.get(CMAKE_ARGS_ENV) or DEFAULT_CMAKE_ARGS)


def find_sdist(package_version: str, sdist: str | None, cache: Path) -> Path:
    """The llama-cpp-python sdist: the given file, one already in the cache, or `pip download`ed there.

    Raises:
        UserError: the given file is missing, or pip could not fetch it (offline).
    """
    if sdist:
        path = Path(sdist).expanduser()
        if not path.is_file():
            raise models.UserError(f"--sdist {sdist}: no such file.")
        return path
    folder = cache / "sdist"
    found = sorted(folder.glob(f"{PACKAGE}-{package_version}.tar.gz"))
    if found:
        return found[0]
    folder.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               f"llama-cpp-python=={package_version}", "-d", str(folder)]
    print("$", shlex.join(command), flush=True)
    if subprocess.run(command).returncode != 0 or not (folder / f"{PACKAGE}-{package_version}.tar.gz").is_file():
        raise models.UserError(f"could not download the llama-cpp-python {package_version} sdist: pass the file "
                               "with --sdist (pip download --no-deps --no-binary :all: "
                               f"llama-cpp-python=={package_version}).")
    return folder / f"{PACKAGE}-{package_version}.tar.gz"


def unpack_sources(package_version: str, sdist: str | None, cache: Path) -> Path:
    """vendor/llama.cpp of the version's sdist, unpacked once under cache/src/."""
    top = cache / "src" / f"{PACKAGE}-{package_version}"
    source = top / "vendor" / "llama.cpp"
    if not (source / "CMakeLists.txt").is_file():
        sdist = find_sdist(package_version, sdist, cache)
        print(f"unpacking {sdist} to {top.parent}", flush=True)
        top.parent.mkdir(parents=True, exist_ok=True)
        with tarfile.open(sdist) as tar:
            tar.extractall(top.parent, filter="data")
    if not (source / "CMakeLists.txt").is_file():
        raise models.UserError(f"{sdist} has no vendor/llama.cpp: it is not a llama-cpp-python sdist.")
    return source


def build_dir_for(package_version: str, cmake_args: list[str], cache: Path) -> Path:
    """cache/llama.cpp-<version>-<hash of the flags>: one build per flag set."""
    digest = hashlib.sha256(" ".join(BASE_CMAKE_ARGS + cmake_args).encode()).hexdigest()[:10]
    return cache / f"llama.cpp-{package_version}-{digest}"


def run_logged(command: list[str], log: Path, **kwargs) -> None:
    """Run a build step with its output in `log` (cmake is chatty); its tail on failure.

    Raises:
        UserError: the step failed (the log's last lines are printed first).
    """
    print("$", shlex.join(command), flush=True)
    with log.open("a") as fh:
        fh.write(f"$ {shlex.join(command)}\n")
        fh.flush()
        code = subprocess.run(command, stdout=fh, stderr=subprocess.STDOUT, **kwargs).returncode
    if code != 0:
        print("".join(log.read_text(errors="replace").splitlines(keepends=True)[-30:]), file=sys.stderr)
        raise models.UserError(f"{command[0]} failed (exit {code}); the full log is {log}.")


def read_build_info(build_dir: Path) -> tuple[str, int | None]:
    """llama.cpp's commit and build number, as cmake wrote them into common/build-info.cpp."""
    info = build_dir / "common" / "build-info.cpp"
    text = info.read_text() if info.is_file() else ""
    commit = re.search(r'LLAMA_COMMIT\s*=\s*"([^"]*)"', text)
    number = re.search(r"LLAMA_BUILD_NUMBER\s*=\s*(\d+)", text)
    return (commit.group(1) if commit else "unknown"), (int(number.group(1)) if number else None)


def read_system_info(bin_dir: Path) -> str:
    """llama_print_system_info() of the built libllama, read in a child process so it never meets the
    installed package's copy. cwd=bin_dir: with -DGGML_BACKEND_DL=ON, llama_backend_init() loads the best
    CPU variant from the executable's directory or the working directory."""
    code = ("import ctypes, sys; lib = ctypes.CDLL(sys.argv[1]); lib.llama_backend_init(); "
            "lib.llama_print_system_info.restype = ctypes.c_char_p; print(lib.llama_print_system_info().decode())")
    out = subprocess.run([sys.executable, "-c", code, str(bin_dir / "libllama.so")], cwd=bin_dir,
                         capture_output=True, text=True, timeout=60)
    return out.stdout.strip() or f"(not read: {out.stderr.strip()[-200:]})"


def build_tools(targets=DEFAULT_TARGETS, cmake_args: list[str] | None = None, sdist: str | None = None,
                cache: Path = DEFAULT_CACHE, jobs: int = DEFAULT_JOBS) -> Build:
    """Configure (once) and build `targets` of the vendored llama.cpp with `cmake_args`.

    Returns:
        The Build, with its system info line; reused when the programs are already up to date.
    Raises:
        UserError: no cmake/ninja, no sdist, or a failed build.
    """
    for program in ("cmake", "ninja"):
        if not shutil.which(program):
            raise models.UserError(f"building llama.cpp's tools needs {program}: apt-get install cmake ninja-build "
                                   "(or pip install cmake ninja).")
    cmake_args = cmake_args_from(None) if cmake_args is None else cmake_args
    package_version = installed_version()
    source = unpack_sources(package_version, sdist, cache)
    build_dir = build_dir_for(package_version, cmake_args, cache)
    build_dir.mkdir(parents=True, exist_ok=True)
    log = build_dir / "build.log"
    start = time.perf_counter()
    if not (build_dir / "CMakeCache.txt").is_file():
        (build_dir / "cmake-args.txt").write_text(shlex.join(cmake_args) + "\n")
        run_logged(["cmake", "-S", str(source), "-B", str(build_dir), *BASE_CMAKE_ARGS, *cmake_args], log)
    run_logged(["cmake", "--build", str(build_dir), "--parallel", str(jobs), "--target", *targets], log)
    build = Build(package_version, cmake_args, source, build_dir, time.perf_counter() - start, targets=list(targets))
    build.llama_cpp_commit, build.llama_cpp_build_number = read_build_info(build_dir)
    build.system_info = read_system_info(build.bin_dir)
    return build


def add_build_args(parser: argparse.ArgumentParser) -> None:
    """--sdist, --cmake-args, --tools-cache, --jobs: spelled the same by both benchmark tools."""
    group = parser.add_argument_group("building llama.cpp's tools")
    group.add_argument("--sdist", default=None, metavar="FILE.tar.gz",
                       help="llama-cpp-python sdist to build from (default: in --tools-cache, else pip download "
                            "of the installed version)")
    group.add_argument("--cmake-args", default=None, metavar="FLAGS",
                       help=f"GGML cmake flags (default: ${CMAKE_ARGS_ENV}, else the wheel's: {DEFAULT_CMAKE_ARGS})")
    group.add_argument("--tools-cache", type=Path, default=DEFAULT_CACHE, metavar="DIR",
                       help=f"where sources, builds and converted models go (default: {DEFAULT_CACHE})")
    group.add_argument("--jobs", type=int, default=DEFAULT_JOBS, help=f"parallel compile jobs (default: {DEFAULT_JOBS})")


def add_measurement_args(parser: argparse.ArgumentParser) -> None:
    """--seed and --output-dir, then the build options: what both benchmark tools take besides their own."""
    parser.add_argument("--seed", type=int, default=models.DEFAULT_SEED)
    parser.add_argument("--output-dir", default=models.DEFAULT_OUTPUT_DIR)
    add_build_args(parser)


def build_from_args(args, targets=DEFAULT_TARGETS) -> Build:
    build = build_tools(targets, cmake_args_from(args.cmake_args), args.sdist, args.tools_cache, args.jobs)
    print_build(build)
    return build


def print_build(build: Build) -> None:
    print(f"llama.cpp {build.llama_cpp_commit} (build {build.llama_cpp_build_number}) from llama-cpp-python "
          f"{build.package_version}, flags {shlex.join(build.cmake_args)}")
    print(f"  built in {build.build_dir} ({build.build_seconds:.0f} s this call)")
    print(f"  system info: {build.system_info}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_build_args(parser)
    parser.add_argument("--targets", nargs="+", default=list(DEFAULT_TARGETS), help="cmake targets to build")
    args = parser.parse_args(argv)
    build_from_args(args, args.targets)
    return 0


if __name__ == "__main__":
    models.run_cli(main)
