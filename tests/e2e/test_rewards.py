"""The reward service in real runs on a local Ray: a remote reward served by Ray Serve (and its
outage), reference baselines, dynamic sampling, offline prompt filtering, and a learned reward
model driving PPO."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import ray
from ray import serve

from orchestration.config import load_config
from orchestration.loop import start_loop
from orchestration.placement import start_actors
from orchestration.prepare import prepare
from orchestration.sampler import PromptSampler
from reward_service.server import build_app
from tests.e2e.test_run import check_run_health, finished, train

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
TOKEN_ENV = "RAYLIGN_E2E_REWARD_TOKEN"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_run_scored_by_the_serve_reward_service_survives_its_outage(
    private_env, monkeypatch, tmp_path
):
    monkeypatch.setenv(TOKEN_ENV, "e2e-token")  # before ray.init: Serve's replicas inherit it
    port = free_port()
    url = f"http://127.0.0.1:{port}/score"
    cfg = load_config(
        "demo",
        [
            "reward.functions=[]",
            f"reward.remote=[{{name: remote, url: '{url}', token_env: {TOKEN_ENV}, "
            "read_timeout_s: 5, max_retries: 1, backoff_s: 0.1}]",
            "reward.monitors=[{name: exact_integer}]",  # the same function, computed locally
            "reward.no_eos_penalty=null",
            "iterations=3",
            f"logging.root={tmp_path}",
        ],
    )
    ray.init(num_cpus=4, include_dashboard=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = build_app({"functions": "exact_integer", "token_env": TOKEN_ENV})
        serve.run(app, name="reward", route_prefix="/score")
        prep = prepare(cfg, "demo")
        actors = start_actors(cfg, prep.model_path, prep.pad_token_id)
        trainer = start_loop(cfg, actors, PromptSampler(prep.prompts, 0), prep)
        samples = cfg.data.prompts_per_iteration * cfg.generator.samples_per_prompt

        served = trainer.iteration()
        assert served["reward/remote/unscorable"] == 0
        # The service scored the very responses the local monitor scored, with the same function.
        assert served["reward/remote/mean"] == pytest.approx(served["reward/exact_integer/mean"])
        assert served["reward/score_mean"] == pytest.approx(served["reward/exact_integer/mean"])

        serve.delete("reward")  # the reward service goes away mid-run
        outage = trainer.iteration()
        assert outage["reward/remote/unscorable"] == samples
        assert outage["reward/unscorable"] == samples
        assert outage["reward/remote/failed_batches"] >= 1
        assert outage["rollout/weight_version"] == 1  # ... and the run went on

        serve.run(app, name="reward", route_prefix="/score")
        back = trainer.iteration()
        assert back["reward/remote/unscorable"] == 0
        assert back["reward/remote/mean"] == pytest.approx(back["reward/exact_integer/mean"])
        assert trainer.version == 3
    finally:
        serve.shutdown()
        ray.shutdown()


def test_reference_baseline_centres_the_reference_policys_own_scores(private_env, tmp_path):
    # The learned reward model scores the untrained policy far below zero; at iteration 0 the
    # policy *is* the reference, so after subtracting the baseline its scores average ~0.
    out = train(
        [
            "--config",
            "demo-rm",
            "iterations=1",
            "reward.reference_baseline=true",
            "reward.reference_baseline_samples=16",
            f"logging.root={tmp_path / 'runs'}",
        ],
        private_env,
    )
    summary, (first,) = finished(out, tmp_path / "runs")
    assert "reference baseline: 25 prompts" in out.stdout
    assert first["reward/raw_mean"] < -1.0
    assert first["reward/baseline_missing"] == 0
    # Noise: 256 samples against 16 x 25 baseline samples of a score with std ~1.5 -> ~0.12.
    assert abs(first["reward/score_mean"]) < 0.35
    assert abs(first["reward/score_mean"]) < abs(first["reward/raw_mean"]) / 4


def test_dynamic_sampling_refills_every_batch_to_full_size(private_env, tmp_path):
    # 4 samples per prompt: an untrained policy gives many groups with equal scores.
    out = train(
        [
            "--config",
            "demo",
            "iterations=4",
            "generator.samples_per_prompt=4",
            "reward.dynamic_sampling.enabled=true",
            f"logging.root={tmp_path / 'runs'}",
        ],
        private_env,
    )
    _, history = finished(out, tmp_path / "runs")
    check_run_health(history)
    assert all(h["rollout/samples"] == 16 * 4 for h in history)
    assert sum(h["rollout/groups_dropped_fraction"] for h in history) > 0
    assert max(h["rollout/sampling_rounds"] for h in history) >= 2
    refilled = [h for h in history if h["rollout/groups_refilled_with_dropped"] == 0]
    assert refilled  # at least one batch was all informative groups


def test_offline_filter_keeps_only_prompts_whose_rewards_vary(private_env, tmp_path):
    kept = tmp_path / "kept.jsonl"
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "orchestration.filter_prompts",
            "--config",
            "demo",
            "--samples",
            "4",
            "--out",
            str(kept),
            f"logging.root={tmp_path / 'runs'}",
        ],
        cwd=REPO,
        env=private_env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    stats = [json.loads(line) for line in Path(f"{kept}.stats.jsonl").read_text().splitlines()]
    rows = [json.loads(line) for line in kept.read_text().splitlines()]
    assert len(stats) == 25  # every prompt of the demo task, once
    assert 0 < len(rows) < 25
    assert all((s["reward_std"] > 0) == s["kept"] for s in stats)
    assert len(rows) == sum(s["kept"] for s in stats)
    assert {"prompt", "label"} <= set(rows[0])
    assert f"kept {len(rows)} of 25 prompts" in out.stdout
    # The kept file is a dataset a run can use as it is.
    assert not np.isnan([s["reward_mean"] for s in stats]).any()


def test_a_learned_reward_model_drives_ppo_and_the_rule_metric_it_never_saw_improves(
    private_env, tmp_path
):
    root = tmp_path / "runs"
    out = train(["--config", "demo-rm", "iterations=150", f"logging.root={root}"], private_env)
    summary, history = finished(out, root)
    check_run_health(history)
    (run_dir,) = [p for p in root.iterdir() if p.is_dir()]
    rm = json.loads((run_dir / "reward_model_rm" / "train_metrics.json").read_text())
    assert rm["held_out_accuracy"] > 0.9  # pairs the reward model was not trained on
    # Only the reward model is in the score; exact_integer is a monitor.
    assert all(h["reward/raw_mean"] == pytest.approx(h["reward/rm/mean"]) for h in history)
    rule = [h["reward/exact_integer/mean"] for h in history]
    first, last = np.mean(rule[:5]), np.mean(rule[-10:])
    learned = [h["reward/rm/mean"] for h in history]
    # The policy climbs the learned score: over the first and last 5 iterations it rose by 5.2
    # to 8.9 in the five 150-iteration runs measured (this preset at seed 0, and with
    # algorithm.entropy_coef=0.03 at seeds 0, 1, 2 and data.seed=1) ...
    assert np.mean(learned[-5:]) - np.mean(learned[:5]) > 4.0, learned
    # ... and the rule metric it never saw rises from the junk level (~0.07: untrained
    # responses rarely stop with an integer): to 0.19-0.84 (last 10) in those runs. How far
    # depends on the seed: the policy often settles on one integer per prompt, right or not.
    assert first < 0.15
    assert last > 0.15 and last > 2 * first, rule
