"""A quiet console: one line per iteration, and warnings that mean something.

vLLM, DeepSpeed, torch and Ray print a wall of start-up notes in every actor (thread binding,
``LD_PRELOAD`` advice, NUMA, progress bars) and vLLM warns "RotaryEmbedding: Failed to load
weights" at every weight sync; a new user reads these as failures. Everything an actor prints
still goes to the run's log files (``<run_dir>/logs/<role>.log``, one per actor), whole; only the
lines known to be benign (:data:`BENIGN`) are kept off the console. Anything else, a real
warning or a traceback, shows as before (Ray forwards it, prefixed with the actor).

How: :func:`quiet_worker` is the job's ``worker_process_setup_hook`` (``init_ray`` installs it),
so it runs in every worker process before any actor code. It points the process's stdout and
stderr (the file descriptors: C++ writes too) at a small filter process (``python -m
orchestration.console``) that appends every line to the log file and passes the rest on to the
original stderr. The driver's benign log records (Ray's, DeepSpeed's) go to
``<run_dir>/logs/driver.log`` (:func:`quiet_driver`, :func:`quiet_job`).
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

LOG_DIR_ENV = "RAYLIGN_LOG_DIR"  # the run's logs/ directory (set for the whole job)
LOG_NAME_ENV = "RAYLIGN_LOG_NAME"  # this actor's log file name (set per actor)

BENIGN = [
    re.compile(p)
    for p in (
        r"^\s*$",
        # vLLM's INFO lines ("INFO 12-01 23:02:20 [file.py:12] ...") and DEBUG ones
        r"\b(INFO|DEBUG) \d\d-\d\d \d\d:\d\d:\d\d ",
        # vLLM on CPU, at start-up and at every reload: none of these is a failure
        r"RotaryEmbedding: Failed to load weights",
        r"is not found in LD_PRELOAD",
        r"CPU backend doesn't allow to use `torch.set_num_threads`",
        r"OMP_NUM_THREADS=\d+ is set; leaving Torch threads",
        r"The global random seed is set to \d+\. Since VLLM_ENABLE_V1_MULTIPROCESSING",
        r"Enforce eager set, disabling torch.compile",
        r"Inductor compilation was disabled by user settings",
        r"Triton is not installed",
        r"Triton is installed, but doesn't include CPU backend",
        r"Reset SSM cache type",
        r"Model Runner V2 requires Triton",
        r"`torch.distributed.reduce_op` is deprecated",
        r"NUMA binding: Using MEMBIND policy",
        # progress bars (transformers' and vLLM's weight loading)
        r"Loading safetensors checkpoint shards",
        r"Loading weights:",
        r"\d+%\|",
        # DeepSpeed on CPU
        r"deepspeed_shm_comm_op built successfully",
        r"Setting accelerator to CPU",
        # Ray, in the driver: token auth is on, as it should be
        r"Token authentication is enabled for this Ray cluster",
        r"Generated new authentication token and saved to",
    )
]
_WARNING_HEADER = re.compile(r":\d+: \w*Warning: ")  # the first line of a Python warning


def is_benign(line: str) -> bool:
    return any(p.search(line) for p in BENIGN)


class LineFilter:
    """Decides per line; the line after a dropped Python warning (its source line, indented)
    is dropped with it."""

    def __init__(self):
        self._dropped_warning = False

    def keep(self, line: str) -> bool:
        if self._dropped_warning and line.startswith((" ", "\t")):
            self._dropped_warning = False
            return False
        benign = is_benign(line)
        self._dropped_warning = benign and bool(_WARNING_HEADER.search(line))
        return not benign


def log_file(name: str | None = None) -> Path | None:
    """This process's log file under the job's log directory (None when there is none)."""
    root = os.environ.get(LOG_DIR_ENV)
    if not root:
        return None
    name = name or os.environ.get(LOG_NAME_ENV) or f"worker-{os.getpid()}"
    return Path(root) / f"{name}.log"


def quiet_worker() -> None:
    """Ray's ``worker_process_setup_hook``: this process's stdout and stderr through the
    filter. Without a log directory (a job not started by ``orchestration.train``) it does
    nothing."""
    path = log_file()
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError:
        return  # a node that cannot write the run directory keeps its output as it was
    console = os.dup(2)
    proc = subprocess.Popen(
        [sys.executable, "-m", "orchestration.console", str(path)],
        stdin=subprocess.PIPE,
        stdout=console,
        stderr=console,
        start_new_session=True,  # a Ctrl-C meant for the job does not cut the log short
    )
    os.close(console)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os.dup2(proc.stdin.fileno(), 1)
    os.dup2(proc.stdin.fileno(), 2)
    proc.stdin.close()
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(line_buffering=True)


class _DriverFilter(logging.Filter):
    """Keeps benign driver-side log records (Ray's, DeepSpeed's) off the console, into the
    driver's log (held until the run directory exists)."""

    def __init__(self):
        super().__init__()
        self.path: Path | None = None
        self.pending: list[str] = []

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if not is_benign(message):
            return True
        self.write(f"{record.levelname} {record.name}: {message}\n")
        return False

    def write(self, text: str) -> None:
        if self.path is None:
            self.pending.append(text)
            return
        with self.path.open("a") as f:
            f.write("".join(self.pending) + text)
        self.pending.clear()


_DRIVER_FILTER = _DriverFilter()


def quiet_driver() -> None:
    """Quiet the driver from its start: transformers' progress bars off, and benign records of
    DeepSpeed (which ``accelerate`` imports) and Ray kept for the driver's log."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    # DeepSpeed logs through its own logger "DeepSpeed" (not propagated): a filter on the
    # logger itself holds, whenever DeepSpeed is imported and adds its handler.
    logging.getLogger("DeepSpeed").addFilter(_DRIVER_FILTER)


def quiet_job(log_dir: Path) -> dict:
    """The driver's log goes to ``log_dir/driver.log``, Ray's benign records too; returns the
    ``runtime_env`` entries that quiet every worker process of the job."""
    log_dir.mkdir(parents=True, exist_ok=True)
    _DRIVER_FILTER.path = log_dir / "driver.log"
    _DRIVER_FILTER.write("")
    for handler in logging.getLogger("ray").handlers:  # records of ray.* propagate to these
        if _DRIVER_FILTER not in handler.filters:
            handler.addFilter(_DRIVER_FILTER)
    return {
        "worker_process_setup_hook": "orchestration.console.quiet_worker",
        "env_vars": {LOG_DIR_ENV: str(log_dir)},
    }


def _filter(path: str) -> None:
    """The filter process: stdin (the worker's output) to ``path`` whole, and the lines that
    are not benign to stdout (the worker's original stderr). Progress bars rewrite their line
    with ``\\r``: each rewrite is a line here."""
    out = sys.stdout.buffer
    line_filter = LineFilter()
    with open(path, "ab", buffering=0) as log:
        for raw in sys.stdin.buffer:
            log.write(raw)
            for part in raw.replace(b"\r", b"\n").splitlines():
                if line_filter.keep(part.decode("utf-8", "replace")):
                    out.write(part + b"\n")
                    out.flush()


if __name__ == "__main__":
    _filter(sys.argv[1])
