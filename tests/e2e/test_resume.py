"""Resume: a run stopped after iteration k and resumed produces the iteration k+1 an
uninterrupted run produces: the same prompts, the same sampled tokens, the same losses.

16 prompts, 8 per iteration: an epoch is two iterations. The interrupted run stops after
iteration 1 (an epoch boundary: iteration 2 draws epoch 1's first prompts) and after iteration 2
(mid-epoch), and is resumed each time from its checkpoint, in a new process with new actors.

Tolerance: tokens, prompts, scores and weight versions are equal; log-probabilities and losses
agree to 1e-5 (relative). On CPU they come out bit-identical here; the tolerance leaves room for a
different thread count changing float summation order.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.e2e.helpers import assert_same_iteration, by_iteration, train

pytestmark = pytest.mark.slow

ARGS = [
    "--config",
    "demo",
    "data.addition_max_operand=3",  # 16 prompts
    "data.prompts_per_iteration=8",
    "generator.samples_per_prompt=4",
    "checkpoint.every=1",
    "checkpoint.keep=2",
    "logging.rollouts_every=1",
    "logging.tensorboard=false",
    "logging.ray_metrics=false",
    "logging.report=false",
]


def run(env, root: Path, name: str, iterations: int, *extra: str) -> str:
    out = train(
        [*ARGS, f"iterations={iterations}", f"logging.root={root}", f"logging.name={name}", *extra],
        env,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    return out.stdout


def test_a_resumed_run_continues_exactly_like_an_uninterrupted_one(head_env, tmp_path):
    root = tmp_path / "runs"
    run(head_env, root, "whole", 4)
    whole, parts = root / "whole", root / "parts"

    run(head_env, root, "parts", 2)  # stops after iteration 1, at the end of epoch 0
    assert sorted(p.name for p in (parts / "checkpoints").iterdir()) == [
        "iter_000000",
        "iter_000001",
    ]
    # An interrupted checkpoint write, newer than the last committed one: no marker, and a
    # driver state that would fail to load if it were read.
    torn = parts / "checkpoints" / "iter_000002"
    shutil.copytree(parts / "checkpoints" / "iter_000001", torn)
    (torn / "COMMITTED").unlink()
    (torn / "driver.json").write_text("{torn")

    out = run(head_env, root, "parts", 3, "resume=auto")
    assert f"resume: ignoring {torn}: not committed" in out
    assert "resume: continuing after iteration 1 from" in out and "iter_000001" in out
    assert by_iteration(parts)[2]["data/epoch"] == 1.5  # iteration 2 drew epoch 1's first half
    assert_same_iteration(whole, parts, 2)  # resumed at the epoch boundary

    out = run(head_env, root, "parts", 4, "resume=auto")
    assert "resume: continuing after iteration 2" in out
    assert_same_iteration(whole, parts, 3)  # resumed mid-epoch

    # Nothing lost or repeated: one record per iteration, the final weight version and data
    # position of the uninterrupted run, and its final weights.
    lines = (parts / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["iteration"] for line in lines] == [0, 1, 2, 3]
    assert by_iteration(parts)[3]["data/epoch"] == by_iteration(whole)[3]["data/epoch"] == 2.0
    assert (
        json.loads((parts / "checkpoints" / "iter_000003" / "driver.json").read_text())[
            "weight_version"
        ]
        == 4
    )
    assert sorted(p.name for p in (parts / "checkpoints").iterdir()) == [
        "iter_000002",
        "iter_000003",
    ]
    from safetensors.torch import load_file

    wa = load_file(whole / "policy" / "model.safetensors")
    wb = load_file(parts / "policy" / "model.safetensors")
    assert all(np.allclose(wa[k].numpy(), wb[k].numpy(), rtol=1e-5, atol=1e-7) for k in wa)

    # Resuming with a config that is not this run's fails before anything starts; nothing of
    # the run is touched. A new run over the same directory is refused too.
    before = (parts / "metrics.jsonl").read_text()
    args = [*ARGS, "iterations=5", f"logging.root={root}", "logging.name=parts"]
    out = train(
        [*args, "resume=auto", "learner.lr=1e-3", "generator.samples_per_prompt=2"], head_env
    )
    assert out.returncode == 2, out.stderr[-3000:]
    assert "iter_000003 was written with a different config:" in out.stderr
    assert "learner.lr: 0.0005 -> 0.001" in out.stderr
    assert "generator.samples_per_prompt: 4 -> 2" in out.stderr
    assert "start a new run (another logging.name)" in out.stderr
    out = train(args, head_env)
    assert out.returncode == 2
    assert "exists: continue that run with resume=auto" in out.stderr
    assert (parts / "metrics.jsonl").read_text() == before
    assert (parts / "checkpoints" / "iter_000003" / "COMMITTED").is_file()
