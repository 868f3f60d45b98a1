"""The sampling methods beside PPO and GRPO end to end through the entry point on the session's
Ray head, short: rejection-sampling fine-tuning, online DPO, RRHF with beam-search and dataset
candidates, and on-policy distillation from a teacher equal to the policy (no signal). The
demos' measured numbers are in the README."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from orchestration.data import addition_corpus
from orchestration.pipeline_data import main as write_pipeline_data
from orchestration.tiny_model import build_tiny_model
from tests.e2e.helpers import train, train_together
from tests.helpers import history

pytestmark = pytest.mark.slow

COMMON = ["cluster.torch_threads=1", "logging.report=false", "data.prompts_per_iteration=8"]


def args(config: str, root: Path, *extra: str) -> list[str]:
    return ["--config", config, f"logging.root={root}", *COMMON, *extra]


def finished(out, root: Path) -> list[dict]:
    """The history of the run that ``out`` ran under ``root``, which must have succeeded."""
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    command = out.args
    names = [x.split("=", 1)[1] for x in command if x.startswith("logging.name=")]
    run_dir = root / (names[-1] if names else command[command.index("--config") + 1])
    assert (run_dir / "policy" / "model.safetensors").is_file()
    return history(run_dir)


def run(config: str, root: Path, env, *extra: str) -> list[dict]:
    return finished(train(args(config, root, *extra), env), root)


def together(env, root: Path, *runs: list[str]) -> list[list[dict]]:
    """Runs side by side (short runs: their start-ups overlap), their histories."""
    return [finished(out, root) for out in train_together(list(runs), env)]


def test_rejection_sampling_online_dpo_and_rrhf(head_env, tmp_path):
    root = tmp_path / "runs"
    data = tmp_path / "data"
    write_pipeline_data(["--out", str(data), "--max-operand", "4"])
    # rejection sampling: every prompt's best kept (no threshold), two SFT steps per round;
    # online DPO on two learner ranks beside it
    rs = ["iterations=3", "rs.threshold=null", "checkpoint.every=2"]
    runs, dpo = together(
        head_env,
        root,
        args("demo-rs", root, *rs),
        args("demo-dpo", root, "iterations=3", "learner.num_ranks=2"),
    )
    assert [h["rs/kept_fraction"] for h in runs] == [1.0, 1.0, 1.0]
    assert all(h["rs/best_of_n"] >= h["rs/mean_score"] for h in runs)
    assert all("rs/sft_loss" in h and h["learner/empty_batch"] == 0.0 for h in runs)
    assert runs[-1]["sync/bytes"] > 0

    # resumed inside the stage from its checkpoint after iteration 1: round 2 again, the same;
    # RRHF beside it: 4 samples, 2 beams and the dataset's two answers per prompt, ranked by
    # score
    checkpoint = root / "demo-rs" / "checkpoints" / "iter_000001"
    again, rrhf = together(
        head_env,
        root,
        args("demo-rs", root, *rs, f"resume={checkpoint}", "logging.name=rs-b"),
        args(
            "demo-rrhf",
            root,
            "iterations=3",
            "generator.samples_per_prompt=4",
            f"data.source={data}/candidates.jsonl",
            "rrhf.dataset_responses=[model_a,model_b]",
        ),
    )
    assert [h["iteration"] for h in again] == [2]
    for key in ("rs/best_of_n", "rs/mean_score", "rs/sft_loss", "reward/score_mean"):
        assert again[0][key] == runs[2][key], key

    # online DPO on two learner ranks (the pairs split between them): best and worst of each
    # prompt's samples; the first step is at the reference
    runs = dpo
    first = runs[0]
    assert 0 < first["pairs/kept_fraction"] <= 1.0
    assert first["dpo/loss"] == pytest.approx(np.log(2), abs=1e-3)
    assert first["dpo/margin"] == pytest.approx(0.0, abs=1e-3)
    assert runs[-1]["dpo/reward_chosen"] > runs[-1]["dpo/reward_rejected"]

    # RRHF
    runs = rrhf
    assert all(h["rollout/samples"] == 8 * 4 for h in runs)  # the policy's samples only
    assert all(1 <= h["rrhf/candidates"] <= 8 for h in runs)
    assert all(np.isfinite(h["rrhf/loss"]) and h["rrhf/ft_loss"] > 0 for h in runs)
    shares = [h["rrhf/best_from_beams"] + h["rrhf/best_from_dataset"] for h in runs]
    assert all(0 <= s <= 1 for s in shares)
    # the rollout file holds each prompt's dataset answers as its candidates 6 and 7, scored
    rows = pq.read_table(root / "demo-rrhf" / "rollouts" / "iter_000000.parquet").to_pylist()
    answers = [json.loads(line) for line in (data / "candidates.jsonl").read_text().splitlines()]
    by_prompt = {a["prompt"]: a for a in answers}
    digits = {d: str(d - 2) for d in range(2, 11)} | {1: "+", 11: "="}  # the tiny tokenizer's

    def text(ids: list[int]) -> str:
        return "".join(digits.get(t, "") for t in ids)

    dataset = [r for r in rows if r["sample_index"] >= 6]
    assert len(dataset) == 8 * 2
    for r in dataset:
        want = by_prompt[text(r["prompt_token_ids"])][
            "model_a" if r["sample_index"] == 6 else "model_b"
        ]
        assert r["response_token_ids"][-1] == 0 and text(r["response_token_ids"]) == want
        assert (r["score"] == 1.0) == (want == r["label"])  # a wrong integer earns format credit


def test_distillation_from_a_teacher_equal_to_the_policy_gives_no_signal(head_env, tmp_path):
    model = build_tiny_model(str(tmp_path / "model"), addition_corpus(4))
    runs = run(
        "demo-distill",
        tmp_path / "runs",
        head_env,
        "iterations=2",
        f"model.path={model}",
        f"distill.teacher={model}",
    )
    # the task reward weighs 0 and the teacher is the policy: no advantage anywhere
    for h in runs:
        assert abs(h["distill/reverse_kl"]) < 1e-5
        assert h["advantage/abs_mean"] < 1e-5
