"""Pipelines of stages end to end (``orchestration.pipeline``). A chain on the session's Ray
head: SFT on two learner ranks (interrupted after its checkpoint at iteration 9, then resumed by
the pipeline), offline DPO from the SFT policy on two ranks, a reward model from the SFT policy
(balanced, bias-normalised, evaluated), then PPO on two ranks from the SFT policy with that
reward model, the critic started from it and the PTX term, each stage's output the next one's
input. And two SFT stages submitted as one Ray job, then skipped and redone. Short runs: the
demo's measured numbers are in the README; the runner's decisions, pure, are in
``tests/orchestration/test_pipeline_runner.py``."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from orchestration.pipeline_data import main as write_pipeline_data
from tests.e2e.helpers import train
from tests.helpers import REPO, VENV, history

pytestmark = pytest.mark.slow

QUIET = {"cluster.torch_threads": 1, "logging.report": False}
SFT = {
    "data.source": "{demo_data}/sft.jsonl",
    "data.addition_max_operand": 4,
    "learner.num_ranks": 2,  # rows split between the ranks, the loss over both
    "sft.held_out": 0.2,
    "eval.every": 5,
    "checkpoint.every": 5,
    "iterations": 16,
    **QUIET,
}
STAGES = [
    {"name": "sft", "config": "pipeline-sft", "overrides": SFT},
    {
        "name": "dpo",
        "config": "pipeline-dpo",
        "overrides": {
            "iterations": 8,
            "model.path": "{sft.policy}",
            "data.source": "{demo_data}/preferences.jsonl",
            "learner.num_ranks": 2,
            "eval.every": 4,
            **QUIET,
        },
    },
    {
        "name": "rm",
        "config": "pipeline-rm",
        "overrides": {
            "iterations": 12,
            "model.path": "{sft.policy}",
            "data.source": "{demo_data}/preferences.jsonl",
            "rm.normalize_source": "{demo_data}/sft.jsonl",
            "rm.equal_quality_source": "{demo_data}/equal_quality.jsonl",
            "eval.every": 6,
            **QUIET,
        },
    },
    {
        "name": "ppo",
        "config": "pipeline-ppo",
        "overrides": {
            "iterations": 3,
            "model.path": "{sft.policy}",
            "reward.models": [{"name": "rm", "path": "{rm.reward_model}"}],
            "learner.critic_init": "{rm.reward_model}",
            "ptx.source": "{demo_data}/sft.jsonl",
            "learner.num_ranks": 2,  # the PTX rows split between them, its token count over both
            **QUIET,
        },
    },
]


def pipeline(config: Path, env: dict[str, str], *args: str) -> str:
    """``python -m orchestration.pipeline --config <config> *args``, which must succeed: its
    console (stdout and stderr)."""
    start = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-m", "orchestration.pipeline", f"--config={config}", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    print(f"pipeline {' '.join(args) or '(plain)'}: {time.perf_counter() - start:.1f} s")
    console = out.stdout + out.stderr
    assert out.returncode == 0, console[-6000:]
    return console


def test_sft_then_dpo_reward_model_and_ppo_with_ptx_as_one_pipeline(head_env, tmp_path):
    data, root = tmp_path / "data", tmp_path / "runs"
    write_pipeline_data(["--out", str(data), "--max-operand", "4"])
    config = tmp_path / "chain.yaml"
    tree = {"name": "chain", "root": str(root), "demo_data": str(data), "stages": STAGES}
    config.write_text(yaml.safe_dump(tree))

    # The SFT stage cut short: the run the pipeline would start, stopped after iteration 9
    # (its checkpoint committed, no summary written), as a killed job leaves it.
    sft = ["--config", "pipeline-sft", f"logging.root={root}", "logging.name=sft", "resume=auto"]
    sft += [f"{k}={v}".replace("{demo_data}", str(data)) for k, v in SFT.items()]
    out = train([*sft, "iterations=10"], head_env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    (root / "sft" / "summary.json").unlink()

    console = pipeline(config, head_env)
    record = json.loads((root / "pipeline.json").read_text())
    assert {name: s["status"] for name, s in record["stages"].items()} == dict.fromkeys(
        ("sft", "dpo", "rm", "ppo"), "done"
    )
    assert console.count("ray: joined ") == 4  # each stage on the cluster, none its own
    assert "pipeline chain: done" in console

    # 1. SFT: the interrupted stage resumed from its checkpoint, every step once
    assert "resume: continuing after iteration 9" in console
    runs = history(root / "sft")
    trained = [h for h in runs if "sft/loss" in h]
    assert [h["iteration"] for h in trained] == list(range(16))
    evals = [h["eval/sft_loss"] for h in runs if "eval/sft_loss" in h]
    assert len(evals) >= 4 and evals[-1] < 0.8 * evals[0]  # the held-out loss fell
    policy = root / "sft" / "policy"
    assert (policy / "model.safetensors").is_file()

    # 1b. offline DPO, the reference the SFT policy itself: the first step's DPO term is ln 2
    # (policy = reference), and the held-out pairs' accuracy rises
    runs = history(root / "dpo")
    steps = [h for h in runs if "dpo/loss" in h]
    assert [h["iteration"] for h in steps] == list(range(8))
    # (the preset's loss includes RPO's chosen NLL, reported on its own as dpo/nll)
    assert steps[0]["dpo/loss"] - steps[0]["dpo/nll"] == pytest.approx(np.log(2), abs=1e-4)
    assert steps[0]["dpo/margin"] == pytest.approx(0.0, abs=1e-4)
    assert steps[-1]["dpo/margin"] > 0.01 and steps[-1]["dpo/loss"] < steps[0]["dpo/loss"]
    evals = [h["eval/dpo_accuracy"] for h in runs if "eval/dpo_accuracy" in h]
    assert len(evals) >= 2 and evals[-1] > evals[0]
    assert (root / "dpo" / "policy" / "model.safetensors").is_file()

    # 2. the reward model, from the SFT policy
    assert "length balancing dropped" in console and "longer response chosen in" in console
    rm_dir = root / "rm"
    model = rm_dir / "reward_model"
    assert (model / "value_head.safetensors").is_file()
    for name in ("held_out", "equal_quality"):
        metrics = json.loads((rm_dir / "rm_eval" / f"{name}.json").read_text())
        assert metrics["pairs"] > 0 and len(metrics["calibration"]) > 0
    runs = history(rm_dir)
    assert any("eval/rm_accuracy" in h for h in runs) and "rm/loss" in runs[0]
    # the bias normalisation: the SFT demonstrations score 0 on average under the export
    from transformers import AutoTokenizer

    from orchestration.sft_data import load_supervised
    from reward_service.reward_model import RewardModel

    tokenizer = AutoTokenizer.from_pretrained(str(policy))
    ref = load_supervised(f"{data}/sft.jsonl", tokenizer, max_tokens=16)
    sequences = [p + r for p, r in zip(ref.prompt_ids, ref.response_ids, strict=True)]
    assert abs(float(np.mean(RewardModel(str(model)).score_ids(sequences)))) < 1e-3

    # 3. PPO from the SFT policy against that reward model, the critic from it, with PTX
    runs = history(root / "ppo")
    assert all(h["actor/ptx_loss"] > 0 for h in runs if "reward/score_mean" in h)
    assert all("reward/rm/mean" in h and "critic/value_loss" in h for h in runs[:3])


def policy_hash(policy: Path) -> str:
    files = sorted(policy.glob("*.safetensors"))
    assert files, f"no safetensors in {policy}"
    return hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()


def test_a_pipeline_runs_as_one_ray_job_then_skips_and_redoes_its_stages(
    jobs_head, head_env, private_env, tmp_path
):
    """Two SFT stages, the second from the first's policy: submitted as one Ray job, each stage
    joins the job's cluster; run again with ``--from sft2`` the first is skipped and the second
    redone (its directory renamed away) with the same bytes; run again plainly, nothing runs."""
    root, data = tmp_path / "runs", tmp_path / "data"
    quick = {
        "eval.every": 3,
        "cluster.torch_threads": 1,
        "logging.report": False,
        "logging.tensorboard": False,
        "logging.progress_bar": False,
    }
    tree = {
        "name": "e2e",
        "root": str(root),
        "demo_data": str(data),
        "stages": [
            {
                "name": "sft",
                "config": "pipeline-sft",
                "overrides": {"iterations": 6, "data.source": "{demo_data}/sft.jsonl", **quick},
            },
            {
                "name": "sft2",
                "config": "pipeline-sft",
                "overrides": {
                    "iterations": 4,
                    "model.path": "{sft.policy}",
                    "data.source": "{demo_data}/sft.jsonl",
                    **quick,
                },
            },
        ],
    }
    config, names = tmp_path / "p.yaml", ("sft", "sft2")
    config.write_text(yaml.safe_dump(tree))

    excludes = [".venv", "runs", ".git", "*.egg-info", "__pycache__", ".pytest_cache", "data"]
    submit = [str(VENV / "bin" / "ray"), "job", "submit", f"--address={jobs_head}"]
    submit += ["--working-dir=.", "--runtime-env-json", json.dumps({"excludes": excludes})]
    job = ["python", "-m", "orchestration.pipeline", f"--config={config}"]
    out = subprocess.run(
        [*submit, "--", *job],
        cwd=REPO,
        env=private_env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    console = out.stdout + out.stderr
    assert out.returncode == 0 and "succeeded" in console, console[-6000:]
    assert "stage sft (1/2)" in console and "stage sft2 (2/2)" in console
    assert console.count("ray: joined ") == 2  # each stage on the job's cluster, none its own
    assert "pipeline e2e: done" in console
    first = policy_hash(root / "sft2" / "policy")
    summary = root / "sft" / "summary.json"
    made = summary.stat().st_mtime_ns
    state = json.loads((root / "pipeline.json").read_text())
    assert [r["status"] for r in state["table"]] == ["done", "done"]
    sft, sft2 = state["table"]
    assert sft["before"] > sft["after"]  # the loss fell
    # sft2 started from sft's policy ({sft.policy}), not from a fresh tiny model
    curves = [json.loads((root / s / "summary.json").read_text())["loss_curve"] for s in names]
    assert curves[1][0] < curves[0][0] and sft2["before"] == pytest.approx(sum(curves[1]) / 4)

    out = pipeline(config, head_env, "--from", "sft2")
    assert "stage sft: done (" in out and "skipped" in out
    assert summary.stat().st_mtime_ns == made
    assert len(list(root.glob("sft2.replaced-*"))) == 1
    # one rank on CPU, the same seed and input: the redone stage writes the same bytes
    assert policy_hash(root / "sft2" / "policy") == first

    out = pipeline(config, head_env)
    assert "stage sft: done (" in out and "stage sft2: done (" in out
    assert "python -m orchestration.train" not in out
