"""Multi-turn episodes end to end through the entry point on a local Ray: the guessing game
(``demo-guess``) with GRPO, synchronous, and with PPO (a critic, GAE over the model's tokens)
one batch ahead with partial rollouts. The observation tokens (``higher`` / ``lower``) are in
every episode and out of every loss: their advantages and returns are 0 in the saved rollouts,
and the report shows each episode's turns apart."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from tests.e2e.test_run import train

pytestmark = pytest.mark.slow


def run(root: Path, env, name: str, *extra: str) -> tuple[list[dict], Path]:
    args = ["--config", "demo-guess", f"logging.root={root}", f"logging.name={name}"]
    out = train([*args, "cluster.torch_threads=1", *extra], env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    run_dir = root / name
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return metrics, run_dir


def check_episodes(metrics: list[dict], run_dir: Path, critic: bool) -> None:
    for m in metrics:
        assert m["episode/turns_mean"] > 1.0  # the game gave feedback and the model went on
        assert m["episode/observation_tokens"] > 0 and m["episode/model_tokens"] > 0
        ends = sum(v for k, v in m.items() if k.startswith("episode/end/"))
        assert ends == pytest.approx(1.0)
    last = sorted((run_dir / "rollouts").glob("iter_*.parquet"))[-1]
    table = pq.read_table(last)
    for column in ("advantages", "returns"):
        values = np.concatenate(table[column].to_numpy(zero_copy_only=False))
        mask = np.concatenate(table["loss_mask"].to_numpy(zero_copy_only=False))
        assert (values[mask == 0] == 0).all(), column
        if critic:  # GAE moves every model token; GRPO's may all be 0 (no spread in a group)
            assert (values[mask == 1] != 0).any(), column
    assert (np.asarray(table["turns"]) >= 1).all()
    report = (run_dir / "report.html").read_text()
    assert '<div class="observation">' in report and '<div class="model">' in report


def test_the_guessing_game_trains_with_grpo_and_with_ppo_ahead(private_env, tmp_path):
    metrics, run_dir = run(tmp_path, private_env, "grpo", "iterations=2")
    check_episodes(metrics, run_dir, critic=False)
    ahead = ["iterations=3", "algorithm.estimator=gae", "max_staleness=1"]
    metrics, run_dir = run(
        tmp_path, private_env, "ppo", *ahead, "algorithm.off_policy.weight=token"
    )
    check_episodes(metrics, run_dir, critic=True)
    assert all("critic/value_loss" in m for m in metrics)
    assert max(m["rollout/staleness_max"] for m in metrics) == 1.0
