"""Runs untrusted Python (a policy's code plus a row's tests) in a separate, limited process.

THIS IS A LIMIT ON DAMAGE, NOT A SECURITY BOUNDARY. It stops the everyday accidents of RL on
code (infinite loops, memory bombs, floods of output, stray network calls, files left behind)
from hurting the scorer or the machine. It does not stop code written to escape: the child runs
as the same user, can read and write whatever that user can, can start processes in a new
session that outlive the kill, can fork without bound (``RLIMIT_NPROC`` counts all of the
user's processes, so it is not set), and (with the prelude fallback) can undo the network block.
Run the scorer in a container or VM you are willing to lose when the policy or the data is hostile.

What the child gets (``run_untrusted``):

1. ``python -I -S``: isolated mode, no ``site``: the standard library only, no environment
   variables read, no user site-packages.
2. A fresh temporary directory as its working directory, removed afterwards; an environment
   with only a minimal ``PATH``; no stdin; its own session and process group.
3. Resource limits: address space (``memory_mib``), CPU seconds, 16 MiB per written file (its
   output included), 64 open files, no core dumps.
4. No network: new user and network namespaces (``unshare``) where the kernel allows it, so
   the only interface is a loopback that is down; otherwise a Python prelude that makes
   ``socket`` refuse (``network_isolation()`` says which).
5. A wall-clock limit; when it passes, the whole process group is killed. The group is also
   killed when the child exits, so its background processes do not linger.

How the limits get there: no Python runs in the child between ``fork`` and ``exec`` (no
``preexec_fn``, which CPython documents as unsafe when the parent has threads, as a Ray actor
always does: a lock another thread held at the fork stays locked in the child forever).
``subprocess`` only forks, starts a new session and execs ``python -I -S launcher.py CONFIG
ENTRY``, all in C. The launcher (``_LAUNCHER``, written into the child's temporary directory next
to the program) is a fresh single-threaded interpreter: it enters the namespaces, sets the
limits, then ``os.execv``-s ``python -I -S ENTRY``, so the program keeps its own process, pid and
limits (CPU time counts from the launcher's start). ENTRY is the program itself, or in prelude
mode a ``prelude.py`` that disables ``socket`` and then runs it. Should the launcher fail
(``unshare`` refused, say), it writes the reason to a close-on-exec pipe from the parent and
exits; the parent reports that as ``"error"``, as when the interpreter cannot be started at all.
"""

from __future__ import annotations

import ctypes
import functools
import json
import logging
import math
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO, Literal

logger = logging.getLogger(__name__)

Status = Literal["passed", "failed", "timeout", "memory", "killed", "error"]
Isolation = Literal["namespace", "prelude"]

FILE_SIZE_BYTES = 16 * 1024 * 1024
"""``RLIMIT_FSIZE``: the largest file the child may write (its captured output included)."""

OPEN_FILES = 64
"""``RLIMIT_NOFILE`` for the child."""

CHILD_PATH = "/usr/bin:/bin"
"""The only environment variable the child sees."""

_CLONE_NEWUSER = 0x10000000
_CLONE_NEWNET = 0x40000000


@dataclass(frozen=True)
class RunResult:
    """How a ``run_untrusted`` child ended.

    Attributes:
        status: ``"passed"`` (exit 0), ``"failed"`` (other exit code, e.g. a failed assert),
            ``"timeout"`` (wall clock or CPU limit), ``"memory"`` (``MemoryError``, or killed by
            the kernel with ``SIGKILL``/``SIGSEGV`` under the address-space limit),
            ``"killed"`` (any other signal) or ``"error"`` (the child could not be started).
        returncode: the child's exit code, negative for a signal (``subprocess`` convention);
            None when it never started.
        seconds: wall-clock seconds from start to exit.
        output: the last ``output_bytes`` bytes of stdout and stderr together (interleaved as
            written), decoded as UTF-8 with replacement characters.
        truncated: whether earlier output was dropped.
    """

    status: Status
    returncode: int | None
    seconds: float
    output: str
    truncated: bool = False


# ---------------------------------------------------------------------------------------------
# Network isolation
# ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _libc_unshare() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(None, use_errno=True).unshare
    except (OSError, AttributeError):  # no libc we can load, or no unshare in it (not Linux)
        return None


# Runs as ``python -I -S launcher.py CONFIG ARGS...`` in the child, started without any
# ``preexec_fn``: enters the namespaces, applies the limits, then execs ``python -I -S ARGS...``
# (the program). CONFIG is JSON: "unshare" (clone flags, 0 for none), "limits" ((resource,
# soft, hard) triples) and "error_fd" (a pipe's write end, or null for stderr) where a failure
# before the exec is reported; on success the exec closes it, as the parent's EOF tells.
_LAUNCHER = """\
import json
import os
import resource
import sys


def _unshare(flags):
    if hasattr(os, "unshare"):  # Python 3.12+
        os.unshare(flags)
        return
    import ctypes

    try:
        unshare = ctypes.CDLL(None, use_errno=True).unshare
    except (OSError, AttributeError):
        raise OSError("this libc has no unshare()") from None
    if unshare(flags) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"unshare(CLONE_NEWUSER | CLONE_NEWNET): {os.strerror(errno)}")


def _main():
    config = json.loads(sys.argv[1])
    error_fd = config["error_fd"]
    try:
        if config["unshare"]:
            _unshare(config["unshare"])  # first: loading ctypes needs memory
        for which, soft, hard in config["limits"]:
            resource.setrlimit(which, (soft, hard))
        if error_fd is not None:
            os.set_inheritable(error_fd, False)  # closed by the exec
        os.execv(sys.executable, [sys.executable, "-I", "-S", *sys.argv[2:]])
    except BaseException as e:
        message = f"{type(e).__name__}: {e}".encode("utf-8", "replace")
        try:
            os.write(2 if error_fd is None else error_fd, message)
        finally:
            os._exit(127)


_main()
"""


@functools.lru_cache(maxsize=1)
def network_isolation() -> Isolation:
    """How children are cut off from the network here, decided once per process by starting a
    probe child: ``"namespace"`` when ``unshare(CLONE_NEWUSER | CLONE_NEWNET)`` works (most Linux
    hosts), else ``"prelude"`` (containers without user namespaces, seccomp filters, not Linux).
    """
    if _libc_unshare() is None:
        return "prelude"
    config = json.dumps({"unshare": _CLONE_NEWUSER | _CLONE_NEWNET, "limits": [], "error_fd": None})
    try:
        probe = subprocess.run(
            [sys.executable, "-I", "-S", "-c", _LAUNCHER, config, "-c", "pass"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env={"PATH": CHILD_PATH},
            timeout=60,
            check=False,
        )
    except (OSError, subprocess.SubprocessError) as e:
        logger.info("no network namespace for untrusted code (%s); using the socket prelude", e)
        return "prelude"
    if probe.returncode != 0:
        reason = probe.stderr.decode("utf-8", "replace").strip() or f"exit {probe.returncode}"
        logger.info(
            "no network namespace for untrusted code (%s); using the socket prelude", reason
        )
        return "prelude"
    return "namespace"


# Runs before the program in "prelude" mode; the program is then executed from its own file so
# its line numbers stay right. Local (AF_UNIX) sockets and socket pairs keep working (asyncio
# needs one); anything that would reach the network or resolve a name raises.
_PRELUDE = """\
import _socket
import socket


def _network_disabled(*args, **kwargs):
    raise PermissionError("network disabled")


def _disabled(base, unix=_socket.AF_UNIX):
    # base.__init__, not super(): socket.socket.__init__ calls _socket.socket.__init__ (this
    # class, once replaced) with instances of the original class.
    class Disabled(base):
        def __init__(self, family=-1, type=-1, proto=-1, fileno=None):
            if fileno is None and family != unix:
                raise PermissionError("network disabled")
            base.__init__(self, family, type, proto, fileno)

    return Disabled


socket.socket = socket.SocketType = _disabled(socket.socket)
_socket.socket = _socket.SocketType = _disabled(_socket.socket)
for _module in (socket, _socket):
    for _name in ("create_connection", "create_server", "getaddrinfo", "gethostbyname",
                  "gethostbyname_ex", "gethostbyaddr", "getnameinfo"):
        if hasattr(_module, _name):
            setattr(_module, _name, _network_disabled)
with open({path!r}, encoding="utf-8") as _file:
    _code = compile(_file.read(), {path!r}, "exec")
del _socket, socket, _network_disabled, _disabled, _module, _name, _file
exec(_code, {{"__name__": "__main__", "__file__": {path!r}, "__builtins__": __builtins__}})
"""


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------


def _limits(memory_bytes: int, cpu_s: int) -> list[tuple[int, int, int]]:
    """``(resource, soft, hard)`` for the child, never above the parent's hard limits (a child
    may not raise them). The CPU hard limit is a second above the soft one, so the child first
    gets ``SIGXCPU`` (reported as a timeout) rather than a bare ``SIGKILL``."""
    wanted = [
        (resource.RLIMIT_CORE, 0, 0),
        (resource.RLIMIT_FSIZE, FILE_SIZE_BYTES, FILE_SIZE_BYTES),
        (resource.RLIMIT_NOFILE, OPEN_FILES, OPEN_FILES),
        (resource.RLIMIT_CPU, cpu_s, cpu_s + 1),
        (resource.RLIMIT_AS, memory_bytes, memory_bytes),
    ]
    limits = []
    for which, soft, hard in wanted:
        _, parent_hard = resource.getrlimit(which)
        if parent_hard != resource.RLIM_INFINITY:
            soft, hard = min(soft, parent_hard), min(hard, parent_hard)
        limits.append((which, soft, hard))
    return limits


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:  # the group is already empty
        pass


def _wait_exited(pid: int, deadline: float) -> bool:
    """Polls until ``pid`` has exited (True) or ``deadline`` passes (False), without reaping it:
    while it is an unreaped zombie its process group id cannot be reused, so killing the group
    afterwards cannot hit a stranger."""
    delay = 0.0005
    while True:
        if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
            return True
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        time.sleep(min(delay, remaining))
        delay = min(delay * 2, 0.05)


def _read_tail(f: BinaryIO, limit: int) -> tuple[str, bool]:
    """The last ``limit`` bytes written to ``f``, decoded, and whether more came before. Read
    through the parent's own handle: the child may have replaced the file by then (with a FIFO,
    say, whose opening would block)."""
    size = f.seek(0, os.SEEK_END)
    f.seek(max(0, size - limit))
    data = f.read(limit)
    if size > limit:
        data = data.lstrip(bytes(range(0x80, 0xC0)))  # a character cut in half at the start
    return data.decode("utf-8", errors="replace"), size > limit


def _classify(returncode: int, output: str, cpu_seconds: float, cpu_s: int) -> Status:
    if returncode == 0:
        return "passed"
    lines = output.rstrip().rsplit("\n", 1)
    if lines and lines[-1].startswith("MemoryError"):
        return "memory"
    if returncode == -signal.SIGXCPU:
        return "timeout"
    if returncode == -signal.SIGKILL and cpu_seconds >= cpu_s:
        return "timeout"  # it ignored SIGXCPU and hit the hard CPU limit
    if returncode in (-signal.SIGKILL, -signal.SIGSEGV):
        return "memory"
    return "killed" if returncode < 0 else "failed"


def _remove_tree(path: str) -> None:
    """``shutil.rmtree``, first giving back the permissions the child may have taken away."""
    os.chmod(path, 0o700)
    for root, dirs, _ in os.walk(path):
        for d in dirs:
            full = os.path.join(root, d)
            if not os.path.islink(full):
                os.chmod(full, 0o700)
    try:
        shutil.rmtree(path)
    except OSError as e:  # e.g. an escaped grandchild still writing there
        logger.warning("could not remove the sandbox directory %s: %s", path, e)


def _write(path: str, text: str) -> str:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path


def _write_program(workdir: str, source: str, isolation: Isolation) -> tuple[str, str]:
    """Writes ``launcher.py``, ``program.py`` and, for the prelude, ``prelude.py``; returns the
    launcher and the file it is to exec (the program, or the prelude that runs it)."""
    launcher = _write(os.path.join(workdir, "launcher.py"), _LAUNCHER)
    program = _write(os.path.join(workdir, "program.py"), source)
    if isolation == "namespace":
        return launcher, program
    return launcher, _write(os.path.join(workdir, "prelude.py"), _PRELUDE.format(path=program))


def _read_launch_error(fd: int) -> str | None:
    """What the launcher wrote to the error pipe before dying, or None (it exec'd the program).
    Read once the child is gone; non-blocking, in case a process forked elsewhere in this one
    still holds the write end."""
    os.set_blocking(fd, False)
    try:
        data = os.read(fd, 65536)
    except BlockingIOError:
        return None
    return data.decode("utf-8", errors="replace") if data else None


def run_untrusted(
    source: str,
    *,
    timeout_s: float = 5.0,
    cpu_s: int | None = None,
    memory_mib: int = 256,
    output_bytes: int = 64 * 1024,
    isolation: Isolation | None = None,
) -> RunResult:
    """Runs the Python program ``source`` in a limited child process (see the module docstring:
    a limit on damage, not a security boundary) and reports how it ended.

    Args:
        source: the whole program.
        timeout_s: wall-clock seconds before the child's process group is killed.
        cpu_s: CPU seconds (``RLIMIT_CPU``); default ``ceil(timeout_s)``.
        memory_mib: address space (``RLIMIT_AS``) in MiB; the interpreter itself needs ~20.
        output_bytes: how much of the end of the output ``RunResult.output`` keeps. The child
            may write up to ``FILE_SIZE_BYTES`` in all; past that its writes fail.
        isolation: ``"namespace"`` or ``"prelude"``; default ``network_isolation()``.

    Returns ``RunResult`` with status ``"error"`` (and the reason as output) when the child
    cannot be started; never raises for anything the program does.

    Raises:
        ValueError: a non-positive limit or an unknown isolation.
    """
    cpu_s = math.ceil(timeout_s) if cpu_s is None else cpu_s
    if timeout_s <= 0 or cpu_s <= 0 or memory_mib <= 0 or output_bytes <= 0:
        raise ValueError(
            "timeout_s, cpu_s, memory_mib and output_bytes must be positive, got "
            f"{timeout_s}, {cpu_s}, {memory_mib}, {output_bytes}"
        )
    isolation = network_isolation() if isolation is None else isolation
    if isolation not in ("namespace", "prelude"):
        raise ValueError(f"unknown isolation {isolation!r}; use 'namespace' or 'prelude'")
    workdir = tempfile.mkdtemp(prefix="raylign-untrusted-")
    try:
        launcher, entry = _write_program(workdir, source, isolation)
        if isolation == "namespace" and _libc_unshare() is None:
            return RunResult("error", None, 0.0, "cannot start: this libc has no unshare()")
        error_read, error_write = os.pipe()
        try:
            config = {
                "unshare": _CLONE_NEWUSER | _CLONE_NEWNET if isolation == "namespace" else 0,
                "limits": _limits(memory_mib * 2**20, cpu_s),
                "error_fd": error_write,
            }
            with open(os.path.join(workdir, "output.txt"), "w+b") as output_file:
                start = time.monotonic()
                try:
                    proc = subprocess.Popen(
                        [sys.executable, "-I", "-S", launcher, json.dumps(config), entry],
                        cwd=workdir,
                        env={"PATH": CHILD_PATH},
                        stdin=subprocess.DEVNULL,
                        stdout=output_file,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                        pass_fds=(error_write,),
                    )
                except (OSError, subprocess.SubprocessError) as e:
                    return RunResult("error", None, time.monotonic() - start, f"cannot start: {e}")
                finally:
                    os.close(error_write)
                exited = _wait_exited(proc.pid, start + timeout_s)
                _kill_group(proc.pid)  # the child on a timeout; what it left running otherwise
                _, wait_status, usage = os.wait4(proc.pid, 0)
                proc.returncode = os.waitstatus_to_exitcode(wait_status)  # reaped here
                seconds = time.monotonic() - start
                output, truncated = _read_tail(output_file, output_bytes)
            launch_error = _read_launch_error(error_read)
        finally:
            os.close(error_read)
        if launch_error is not None:
            return RunResult("error", None, seconds, f"cannot start: {launch_error}")
        if not exited:
            status: Status = "timeout"
        else:
            status = _classify(proc.returncode, output, usage.ru_utime + usage.ru_stime, cpu_s)
        return RunResult(status, proc.returncode, seconds, output, truncated)
    finally:
        _remove_tree(workdir)


# ---------------------------------------------------------------------------------------------
# Reward function
# ---------------------------------------------------------------------------------------------

_FENCE = re.compile(r"^[ \t]*```[ \t]*([\w+.-]*)[^\n]*$", re.MULTILINE)
_PYTHON_TAGS = ("", "python", "python3", "py")


def extract_code(response: str) -> str:
    """The last fenced code block tagged ``python``/``python3``/``py`` or untagged, else the
    whole response.

    Fences are lines starting with three backticks; they pair up in order (opening, closing),
    so a block in another language is skipped, not misread. An opening fence never closed (a
    response cut off at the token budget) does not count as a block.
    """
    fences = list(_FENCE.finditer(response))
    blocks = [
        (opening[1].lower(), response[opening.end() + 1 : closing.start()])
        for opening, closing in zip(fences[::2], fences[1::2], strict=False)  # unclosed: dropped
    ]
    python = [code for tag, code in blocks if tag in _PYTHON_TAGS]
    return python[-1] if python else response


def code_tests(
    prompt: str,
    response: str,
    label: str | None,
    *,
    timeout_s: float = 5.0,
    memory_mib: int = 256,
    passed: float = 1.0,
    failed: float = 0.0,
) -> float | None:
    """``passed`` when the response's code followed by the label's tests exits 0, else
    ``failed`` (a failed assert, an exception, a timeout, too much memory).

    The code is ``extract_code(response)``; the label is Python test code (``assert``
    statements, say) appended after it and run together by ``run_untrusted`` (a limit on damage,
    not a security boundary). Takes up to ``timeout_s`` per sample, one sample at a time.

    Unscorable (None): no label, or the child could not be started at all.

    Raises:
        ValueError: a non-positive ``timeout_s`` or ``memory_mib``.
    """
    if timeout_s <= 0 or memory_mib <= 0:
        raise ValueError(
            f"timeout_s and memory_mib must be positive, got {timeout_s}, {memory_mib}"
        )
    if label is None:
        return None
    result = run_untrusted(
        f"{extract_code(response)}\n\n{label}\n", timeout_s=timeout_s, memory_mib=memory_mib
    )
    if result.status == "error":
        return None
    return passed if result.status == "passed" else failed
