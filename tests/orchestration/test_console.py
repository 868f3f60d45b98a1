"""The quiet console: what an actor prints goes whole to its log file; only lines known to be
benign stay off the console, and anything else (a real warning, a traceback) still shows."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from orchestration.console import LOG_DIR_ENV, LOG_NAME_ENV, LineFilter, is_benign

# Lines these libraries print at start-up and at every sync on CPU (seen in real runs).
BENIGN = [
    "(MainProcess pid=3004) WARNING 12-01 23:02:22 [cpu_worker.py:114] libtcmalloc is not found "
    "in LD_PRELOAD. For best performance, please follow the section `set LD_PRELOAD` in ...",
    "(MainProcess pid=10279) WARNING 12-01 23:27:17 [layerwise.py:266] RotaryEmbedding: Failed "
    "to load weights",
    "(MainProcess pid=3004) INFO 12-01 23:02:20 [kernel.py:467] Final IR op priority ...",
    "[W1201 23:02:22.512449063 utils.cpp:68] Warning: NUMA binding: Using MEMBIND policy for "
    "memory allocation on the NUMA nodes (0).",
    "Loading weights: 100%|██████████| 27/27 [00:00<00:00, 4758.64it/s]",
    "DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully",
    "",
]
REAL = [
    "(MainProcess pid=1) WARNING 12-01 23:27:17 [inplace.py:120] Following weights were not "
    "loaded from checkpoint: {'lm_head.weight'}",
    "Traceback (most recent call last):",
    "RuntimeError: CUDA out of memory",
    "warning: reward function 'f' failed on 4 of 4 samples so far",
]


@pytest.mark.unit
def test_known_benign_lines_are_recognised_and_others_are_not():
    assert all(is_benign(line) for line in BENIGN)
    assert not any(is_benign(line) for line in REAL)


@pytest.mark.unit
def test_a_dropped_python_warning_takes_its_source_line_with_it():
    f = LineFilter()
    header = (
        "/x/vllm/triton_utils/dispatcher.py:138: FutureWarning: `torch.distributed.reduce_op` "
        "is deprecated, please use `torch.distributed.ReduceOp` instead"
    )
    assert not f.keep(header)
    assert not f.keep('  if hasattr(value, "__dict__"):')
    assert f.keep("  an indented line after a kept one stays")
    assert f.keep("/x/y.py:3: UserWarning: something real")
    assert f.keep("  its source line")


@pytest.mark.component  # a child process
def test_a_worker_process_keeps_benign_output_in_its_log_and_shows_the_rest(tmp_path):
    """A process set up by the worker hook: Python prints, C-level writes to fd 2, a
    progress bar's carriage returns."""
    script = textwrap.dedent(
        f"""
        import os, sys
        from orchestration.console import quiet_worker
        quiet_worker()
        print({BENIGN[1]!r})
        print({REAL[0]!r})
        os.write(2, b"[W1201 utils.cpp:68] Warning: NUMA binding: Using MEMBIND policy\\n")
        os.write(2, b"C-level error: something broke\\n")
        sys.stderr.write("Loading weights: 50%|##  | 1/2\\rLoading weights: 100%|####| 2/2\\n")
        """
    )
    env = {LOG_DIR_ENV: str(tmp_path / "logs"), LOG_NAME_ENV: "generator-0"}
    out = subprocess.run(
        [sys.executable, "-c", script],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    console = out.stdout + out.stderr
    assert console.splitlines() == [REAL[0], "C-level error: something broke"]
    log = (tmp_path / "logs" / "generator-0.log").read_text()
    for text in (BENIGN[1], REAL[0], "NUMA binding", "C-level error", "Loading weights: 100%"):
        assert text in log
