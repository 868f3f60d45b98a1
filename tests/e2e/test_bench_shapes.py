"""Smoke of ``benchmarks/bench_shapes.py --tiny``: both sides run in one process, and the record
it prints holds sane numbers (its times mean nothing at this size)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from tests.helpers import REPO

pytestmark = pytest.mark.slow


def test_bench_shapes_tiny(head_env):
    # On the session's Ray head (RAY_ADDRESS): the benchmark joins a cluster as a run does.
    out = subprocess.run(
        [sys.executable, "benchmarks/bench_shapes.py", "--tiny"],
        cwd=REPO,
        env=head_env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    (line,) = [x for x in out.stdout.splitlines() if x.startswith('{"bench": "shapes"')]
    record = json.loads(line)
    assert record["tiny"] is True
    (w,) = record["workloads"].values()
    spec = w["workload"]
    assert spec["repeats"] == len(w["raylign_repeats_s"]) == len(w["plain_repeats_s"]) == 2

    times = [w["raylign_s"], w["plain_s"], *w["raylign_repeats_s"], *w["plain_repeats_s"]]
    for stage, t in ((k, v) for d in times for k, v in d.items()):
        assert math.isfinite(t) and t >= 0, (stage, t)
    assert w["plain_s"]["sum"] > 0 and w["raylign_s"]["iteration"] > 0
    assert set(w["targets"]) == {"step", "train", "reference", "sync"}

    # Fixed shapes on both sides: every response exactly as long as asked (ignore_eos).
    rows = spec["prompts"] * spec["samples"]
    assert w["rows"] == {"raylign": rows, "plain": rows}
    r = spec["response_tokens"]
    assert w["response_tokens"] == {side: {"min": r, "max": r} for side in ("raylign", "plain")}
    assert w["prompt_tokens"]["raylign"] == w["prompt_tokens"]["plain"] == {"min": 9, "max": 9}
    # Both engines served the weights their trainer had (fp32).
    assert all(0 <= m < 1e-3 for m in w["logprob_mismatch_max"].values())

    memory = w["memory_mib"]
    assert {"generator-0", "scorer-0", "reference", "learner-0", "driver"} <= set(memory)
    assert all(m["peak_mib"] > 0 for m in memory.values())
    assert memory["driver"]["maxrss_lifetime_mib"] > 0
