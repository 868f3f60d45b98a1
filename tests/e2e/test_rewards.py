"""The reward service in real runs: dynamic sampling on the session's Ray head (on a user's Parquet
dataset with a malformed row); offline prompt filtering on an embedded Ray. (A learned reward
model driving PPO, its one learning proof, and reference baselines on that reward model:
``test_operate.py``. A run scored by the Ray Serve reward service, and its outage:
``tests/reward_service/test_server.py``, on that module's Serve.)"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

from tests.e2e.helpers import check_run_health, finished, train
from tests.helpers import REPO, joining

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def filtered(tmp_path_factory):
    """The offline filter, started in the background (its Ray is its own, embedded): (process,
    its stdout file, the kept file)."""
    root = tmp_path_factory.mktemp("filtered")
    tmp = tempfile.mkdtemp(prefix="rl", dir="/tmp")  # short: Ray's socket paths
    (root / "home").mkdir()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env |= {"HOME": str(root / "home"), "TMPDIR": tmp}
    kept, stdout = root / "kept.jsonl", root / "stdout.txt"
    command = [sys.executable, "-m", "orchestration.filter_prompts", "--config", "demo"]
    command += ["--samples", "4", "--out", str(kept), f"logging.root={root / 'runs'}"]
    with stdout.open("w") as out:
        proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    yield proc, stdout, kept
    proc.kill()
    shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def sampled(shared_head, filtered, tmp_path_factory):
    """A short GRPO run with dynamic sampling, on a user's dataset: Parquet with its own field
    names and one row without a prompt; the offline filter runs beside it. (summary, history,
    stdout)"""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from orchestration.data import addition_examples

    root = tmp_path_factory.mktemp("sampled")
    env = joining(shared_head, root)
    rows = [{"question": p, "answer": a} for p, a in addition_examples(4)]
    rows.insert(3, {"question": None, "answer": "1"})
    pq.write_table(pa.Table.from_pylist(rows), root / "addition.parquet")
    # 4 samples per prompt: an untrained policy gives many groups with equal scores.
    out = train(
        [
            "--config",
            "demo",
            "iterations=4",
            f"data.source={root / 'addition.parquet'}",
            "data.prompt_key=question",
            "data.label_key=answer",
            "generator.samples_per_prompt=4",
            "reward.dynamic_sampling.enabled=true",
            f"logging.root={root / 'runs'}",
        ],
        env,
    )
    summary, history = finished(out, root / "runs")
    return summary, history, out.stdout


def test_dynamic_sampling_refills_every_batch_to_full_size(sampled):
    _, history, _ = sampled
    check_run_health(history)
    assert all(h["rollout/samples"] == 16 * 4 for h in history)
    assert sum(h["rollout/groups_dropped_fraction"] for h in history) > 0
    assert max(h["rollout/sampling_rounds"] for h in history) >= 2
    refilled = [h for h in history if h["rollout/groups_refilled_with_dropped"] == 0]
    assert refilled  # at least one batch was all informative groups


def test_a_malformed_row_of_a_users_dataset_is_reported_by_number_and_the_rest_train(sampled):
    summary, _, stdout = sampled
    assert "skipped: " in stdout and "row 3: no 'question'" in stdout
    assert summary["data"] == {
        "data/rows": 26.0,
        "data/loaded": 25.0,
        "data/malformed": 1.0,
        "data/overlong_skipped": 0.0,
        "data/truncated": 0.0,
    }


def test_offline_filter_keeps_only_prompts_whose_rewards_vary(sampled, filtered):
    """With no cluster address the command starts a Ray of its own, dashboard included (the
    embedded Ray every entry point falls back to: this is the test of that path). (``sampled``:
    the run it went beside.)"""
    proc, stdout, kept = filtered
    code = proc.wait(timeout=600)
    console = stdout.read_text()
    assert code == 0, console[-6000:]
    stats = [json.loads(line) for line in Path(f"{kept}.stats.jsonl").read_text().splitlines()]
    rows = [json.loads(line) for line in kept.read_text().splitlines()]
    assert len(stats) == 25  # every prompt of the demo task, once
    assert 0 < len(rows) < 25
    assert all((s["reward_std"] > 0) == s["kept"] for s in stats)
    assert len(rows) == sum(s["kept"] for s in stats)
    assert {"prompt", "label"} <= set(rows[0])
    assert f"kept {len(rows)} of 25 prompts" in console
    assert "ray: embedded; dashboard: http://127.0.0.1:" in console
    # The kept file is a dataset a run can use as it is.
    assert not np.isnan([s["reward_mean"] for s in stats]).any()
