"""The supervised stages end to end on a local Ray through the real entry point: SFT on two
learner ranks (and resumed), a reward model from the SFT policy (balanced, bias-normalised,
evaluated), then PPO on two ranks from the SFT policy with that reward model, the critic started
from it and the PTX term: each stage's output the next one's input, as the pipeline presets
chain them. Short runs: the demo's measured numbers are in the README."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from orchestration.pipeline_data import main as write_pipeline_data
from tests.e2e.test_run import train

pytestmark = pytest.mark.slow


def history(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def ok(out) -> None:
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]


def test_sft_then_reward_model_then_ppo_with_ptx(private_env, tmp_path):
    data, root = tmp_path / "data", tmp_path / "runs"
    write_pipeline_data(["--out", str(data), "--max-operand", "4"])
    common = [f"logging.root={root}", "cluster.torch_threads=1", "logging.report=false"]

    # 1. SFT on two ranks (rows split between them, loss over both), resumed once
    sft = [
        "--config",
        "pipeline-sft",
        f"data.source={data}/sft.jsonl",
        "data.addition_max_operand=4",
        "learner.num_ranks=2",
        "sft.held_out=0.2",
        "eval.every=5",
        "checkpoint.every=5",
        "logging.name=sft",
        *common,
    ]
    ok(train([*sft, "iterations=10"], private_env))
    out = train([*sft, "iterations=16", "resume=auto"], private_env)
    ok(out)
    assert "resume: continuing after iteration 9" in out.stdout
    runs = history(root / "sft")
    trained = [h for h in runs if "sft/loss" in h]
    assert [h["iteration"] for h in trained] == list(range(16))
    evals = [h["eval/sft_loss"] for h in runs if "eval/sft_loss" in h]
    assert len(evals) >= 4 and evals[-1] < 0.8 * evals[0]  # the held-out loss fell
    policy = root / "sft" / "policy"
    assert (policy / "model.safetensors").is_file()

    # 1b. offline DPO from the SFT policy on two ranks, the reference the SFT policy itself: the
    # first step's DPO term is ln 2 (policy = reference), and the held-out pairs' accuracy rises
    out = train(
        [
            "--config",
            "pipeline-dpo",
            "iterations=8",
            f"model.path={policy}",
            f"data.source={data}/preferences.jsonl",
            "learner.num_ranks=2",
            "eval.every=4",
            "logging.name=dpo",
            *common,
        ],
        private_env,
    )
    ok(out)
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
    out = train(
        [
            "--config",
            "pipeline-rm",
            "iterations=12",
            f"model.path={policy}",
            f"data.source={data}/preferences.jsonl",
            f"rm.normalize_source={data}/sft.jsonl",
            f"rm.equal_quality_source={data}/equal_quality.jsonl",
            "eval.every=6",
            "logging.name=rm",
            *common,
        ],
        private_env,
    )
    ok(out)
    assert "length balancing dropped" in out.stdout and "longer response chosen in" in out.stdout
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

    # 3. PPO from the SFT policy against that reward model, the critic from it, with PTX, on
    # two ranks (the PTX rows split between them, its token count over both)
    out = train(
        [
            "--config",
            "pipeline-ppo",
            "iterations=3",
            f"model.path={policy}",
            f"reward.models=[{{name: rm, path: {model}}}]",
            f"learner.critic_init={model}",
            f"ptx.source={data}/sft.jsonl",
            "learner.num_ranks=2",
            "logging.name=ppo",
            *common,
        ],
        private_env,
    )
    ok(out)
    runs = history(root / "ppo")
    assert all(h["actor/ptx_loss"] > 0 for h in runs if "reward/score_mean" in h)
    assert all("reward/rm/mean" in h and "critic/value_loss" in h for h in runs[:3])
