"""CPU tests for reward_service.code_verifier: real child processes, each within a second or two.

The network tests need no network: the child prints CONNECTED only if a connection succeeded,
and with either isolation it must fail before any packet could leave.
"""

import os
import resource
import signal
import sys
import threading
import time

import pytest

from reward_service import code_verifier
from reward_service.code_verifier import (
    CHILD_PATH,
    RunResult,
    code_tests,
    extract_code,
    network_isolation,
    run_untrusted,
)

pytestmark = pytest.mark.component  # child processes (the contained functions)

# A wall-clock limit no healthy program here comes near, for the tests whose subject is not the
# limit: a Python start takes well under a second, but several times that on a loaded machine
# (a 2 s limit timed out "print('hello')" once in CI while other processes competed).
ROOM = 20.0

ISOLATIONS = [
    "prelude",
    pytest.param(
        "namespace",
        marks=pytest.mark.skipif(
            network_isolation() != "namespace",
            reason="this host allows no user+network namespaces (unshare failed)",
        ),
    ),
]


def test_network_isolation_is_decided_once():
    assert network_isolation() in ("namespace", "prelude")
    assert network_isolation() is network_isolation()


@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_passing_and_failing_programs(isolation):
    ok = run_untrusted("print('hello')", timeout_s=ROOM, isolation=isolation)
    assert (ok.status, ok.returncode, ok.output, ok.truncated) == ("passed", 0, "hello\n", False)
    bad = run_untrusted("assert 1 + 1 == 3", timeout_s=ROOM, isolation=isolation)
    assert (bad.status, bad.returncode) == ("failed", 1)
    assert bad.output.rstrip().endswith("AssertionError")
    exit3 = run_untrusted("import sys; sys.exit(3)", timeout_s=ROOM, isolation=isolation)
    assert (exit3.status, exit3.returncode) == ("failed", 3)


def test_infinite_loop_is_killed_at_the_wall_clock_limit():
    # the CPU limit further away than the wall clock: with both at 1 s a busy loop races them
    result = run_untrusted("while True: pass", timeout_s=1.0, cpu_s=5)
    assert result.status == "timeout"
    assert result.returncode == -signal.SIGKILL  # killed by us, not by the CPU limit
    assert 1.0 <= result.seconds < 1.0 + 2


def test_sleeping_child_is_killed_too():
    result = run_untrusted("import time; time.sleep(60)", timeout_s=1.0)
    assert (result.status, result.returncode) == ("timeout", -signal.SIGKILL)
    assert result.seconds < 3


def test_cpu_limit_sends_sigxcpu():
    # a wall-clock limit far away, so only the CPU limit can end it (even on a busy machine)
    result = run_untrusted("while True: pass", timeout_s=20.0, cpu_s=1)
    assert (result.status, result.returncode) == ("timeout", -signal.SIGXCPU)


def test_ignoring_sigxcpu_still_ends_at_the_hard_cpu_limit():
    program = "import signal\nsignal.signal(signal.SIGXCPU, signal.SIG_IGN)\nwhile True: pass"
    result = run_untrusted(program, timeout_s=20.0, cpu_s=1)
    assert (result.status, result.returncode) == ("timeout", -signal.SIGKILL)
    assert result.seconds < 20.0  # the hard limit (2 CPU s) ended it, not the wall clock


@pytest.mark.parametrize(
    "program",
    [
        "x = bytearray(2**34)",
        "x = []\nwhile True:\n    x.append(bytearray(10**6))",
        "x = ' ' * 2**40",
    ],
    ids=["16GiB-at-once", "growing-list", "huge-str"],
)
def test_memory_bomb_is_stopped(program):
    parent_limits = resource.getrlimit(resource.RLIMIT_AS)
    result = run_untrusted(program, timeout_s=ROOM, memory_mib=128)
    assert result.status == "memory"
    assert result.seconds < 2.0
    assert "MemoryError" in result.output
    # the parent is untouched: its own limit unchanged, and it can still allocate
    assert resource.getrlimit(resource.RLIMIT_AS) == parent_limits
    assert len(bytearray(256 * 2**20)) == 256 * 2**20


@pytest.mark.parametrize("isolation", ISOLATIONS)
@pytest.mark.parametrize(
    "attempt",
    [
        "socket.create_connection(('1.1.1.1', 53), timeout=1)",
        "socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'x', ('1.1.1.1', 53))",
        "socket.getaddrinfo('example.com', 80)",
    ],
    ids=["tcp", "udp", "dns"],
)
def test_network_is_unreachable(isolation, attempt):
    program = (
        "import socket\n"
        "try:\n"
        f"    {attempt}\n"
        "    print('CONNECTED')\n"
        "except OSError as e:\n"
        "    print('BLOCKED', type(e).__name__, e)\n"
    )
    result = run_untrusted(program, timeout_s=ROOM, isolation=isolation)
    assert result.status == "passed", result.output
    assert "CONNECTED" not in result.output
    assert result.output.startswith("BLOCKED")
    if isolation == "prelude":
        assert result.output == "BLOCKED PermissionError network disabled\n"
    elif "socket.socket" in attempt or "create_connection" in attempt:
        assert "Network is unreachable" in result.output  # the new namespace has no route


def test_prelude_keeps_local_sockets_and_line_numbers():
    program = (
        "import asyncio, socket\n"
        "a, b = socket.socketpair()\n"
        "a.send(b'x')\n"
        "print(b.recv(1), asyncio.run(asyncio.sleep(0, 'ok')), __name__)\n"
        "raise ValueError('line 5')\n"
    )
    result = run_untrusted(program, timeout_s=ROOM, isolation="prelude")
    assert result.status == "failed"
    assert result.output.startswith("b'x' ok __main__\n")
    assert 'program.py", line 5, in <module>' in result.output


def test_output_keeps_the_tail():
    program = "print('START'); print('x' * 10_000); print('END', end='')"
    result = run_untrusted(program, timeout_s=ROOM, output_bytes=1000)
    assert result.status == "passed"
    assert result.truncated
    assert len(result.output) == 1000
    assert result.output == "x" * 996 + "\nEND"
    assert "START" not in result.output


def test_output_flood_is_capped_by_the_file_size_limit():
    program = "import sys\nwhile True:\n    sys.stdout.write('y' * 65536)"
    result = run_untrusted(program, timeout_s=ROOM, output_bytes=100)
    assert result.status == "failed"  # its write fails with EFBIG at 16 MiB; it does not hang
    assert result.seconds < 2.0
    assert result.truncated and len(result.output) <= 100


def test_child_environment_limits_and_cleanup():
    program = (
        "import os, resource, sys\n"
        "from resource import getrlimit as get\n"
        "print(os.getcwd())\n"
        # PEP 538: the child's interpreter itself sets LC_CTYPE when it finds the C locale
        "print(sorted(kv for kv in os.environ.items() if kv[0] != 'LC_CTYPE'))\n"
        "print(get(resource.RLIMIT_AS), get(resource.RLIMIT_NOFILE))\n"
        "print(get(resource.RLIMIT_CORE), get(resource.RLIMIT_CPU))\n"
        "print(os.getsid(0) == os.getpid(), sys.flags.isolated, sys.flags.no_site)\n"
        "open('left_behind.txt', 'w').write('data')\n"
        "os.makedirs('locked/inner')\n"
        "os.chmod('locked', 0o500)\n"
        "os.chmod('.', 0o500)\n"
    )
    result = run_untrusted(program, timeout_s=ROOM, memory_mib=200)
    assert result.status == "passed", result.output
    cwd, env, limits, more, flags = result.output.splitlines()
    assert os.path.basename(cwd).startswith("raylign-untrusted-")
    assert not os.path.exists(cwd)  # removed, even with a read-only subdirectory in it
    assert env == str([("PATH", CHILD_PATH)])
    assert limits == f"({200 * 2**20}, {200 * 2**20}) (64, 64)"
    assert more == f"(0, 0) ({ROOM:.0f}, {ROOM + 1:.0f})"  # CPU: the wall clock's limit, +1 hard
    assert flags == "True 1 1"


def test_replacing_the_output_file_does_not_block_the_parent():
    program = "import os\nprint('kept')\nos.remove('output.txt')\nos.mkfifo('output.txt')\n"
    result = run_untrusted(program, timeout_s=ROOM)
    assert (result.status, result.output) == ("passed", "kept\n")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_background_processes_die_with_the_child():
    program = (
        "import subprocess, sys\n"
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        "print(p.pid)\n"
    )
    result = run_untrusted(program, timeout_s=ROOM)
    assert result.status == "passed", result.output
    pid = int(result.output)
    deadline = time.monotonic() + 2
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(pid)


def test_cannot_start_is_an_error_result(monkeypatch):
    monkeypatch.setattr(sys, "executable", "/nonexistent/python")
    result = run_untrusted("print(1)", timeout_s=1.0)
    assert (result.status, result.returncode) == ("error", None)
    assert result.output.startswith("cannot start:")
    assert code_tests("q", "x = 1", "assert x == 1", timeout_s=1.0) is None  # unscorable


def test_launcher_failure_is_an_error_result(monkeypatch):
    # an unknown resource: setrlimit fails in the launcher, before the program could start
    monkeypatch.setattr(code_verifier, "_limits", lambda memory_bytes, cpu_s: [(999, 1, 1)])
    result = run_untrusted("print(1)", timeout_s=ROOM)
    assert (result.status, result.returncode) == ("error", None)
    assert result.output.startswith("cannot start: ValueError"), result.output


def test_runs_while_parent_threads_hold_locks():
    # no preexec_fn: nothing in the child between fork and exec can wait on a parent's lock
    lock = threading.Lock()
    stop = threading.Event()

    def churn():
        while not stop.is_set():
            with lock:
                pass

    threads = [threading.Thread(target=churn, daemon=True) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        results = [run_untrusted("print('ok')", timeout_s=10.0) for _ in range(3)]
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert [(r.status, r.output) for r in results] == [("passed", "ok\n")] * 3


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"timeout_s": 0}, "must be positive"),
        ({"memory_mib": -1}, "must be positive"),
        ({"output_bytes": 0}, "must be positive"),
        ({"isolation": "docker"}, "unknown isolation 'docker'"),
    ],
)
def test_run_untrusted_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        run_untrusted("print(1)", **kwargs)


def test_run_result_is_frozen():
    result = RunResult("passed", 0, 0.1, "")
    with pytest.raises(AttributeError):
        result.status = "failed"


# ------------------------------------------------------------------------------------------
# extract_code / code_tests
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        ("def f():\n    return 1", "def f():\n    return 1"),  # no fence: the whole response
        ("Here:\n```python\nx = 1\n```\nDone.", "x = 1\n"),
        ("```py\nx = 1\n```", "x = 1\n"),
        ("```\nx = 2\n```", "x = 2\n"),
        ("```python\nx = 1\n```\nbetter:\n```python\nx = 3\n```", "x = 3\n"),  # the last one
        ("```python\nx = 1\n```\n```bash\nls\n```\n", "x = 1\n"),  # other languages skipped
        ("```python\nx = 1\n```\n```python\nx = 2", "x = 1\n"),  # unclosed: not a block
        ("```text\nnot code\n```", "```text\nnot code\n```"),
    ],
)
def test_extract_code(response, expected):
    assert extract_code(response) == expected


SOLUTION = "Sure.\n```python\ndef add(a, b):\n    return a + b\n```\n"
TESTS = "assert add(2, 3) == 5\nassert add(-1, 1) == 0"


def test_code_tests_scores():
    assert code_tests("q", SOLUTION, TESTS, timeout_s=ROOM) == 1.0
    assert code_tests("q", SOLUTION.replace("a + b", "a - b"), TESTS, timeout_s=ROOM) == 0.0
    assert code_tests("q", "this is not python", TESTS, timeout_s=ROOM) == 0.0
    assert code_tests("q", SOLUTION, None) is None
    assert code_tests("q", SOLUTION, TESTS, timeout_s=ROOM, passed=2.0, failed=-1.0) == 2.0


def test_code_tests_infinite_loop_scores_failed():
    start = time.monotonic()
    loop = "```python\ndef add(a, b):\n    while True:\n        pass\n```"
    assert code_tests("q", loop, TESTS, timeout_s=1.0) == 0.0
    assert time.monotonic() - start < 3.0
