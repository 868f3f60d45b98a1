"""The DeepSpeed learner on one gloo rank, without Ray (component tier)."""

import math
import socket

import pyarrow as pa
import pytest
import torch

from learner.worker import Learner, LearnerSpec, LossSpec, OptimizerSpec, _lr_lambda
from rollout import GeneratedSample, append_columns, build_rollout_table


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def learner(tiny_model):
    spec = LearnerSpec(
        model_path=tiny_model,
        policy_optim=OptimizerSpec(lr=1e-3),
        critic_optim=OptimizerSpec(lr=1e-2),
        loss=LossSpec(),
        micro_batch_tokens=16,  # several micro-batches per mini-batch
        num_mini_batches=2,
    )
    return Learner(spec, rank=0, world_size=1, master_addr="127.0.0.1", master_port=free_port())


def batch(learner, advantage: float, scores=(1.0,) * 8) -> pa.Table:
    samples = [
        GeneratedSample(i, 0, [5, 1, 6, 2], [3 + i % 4, 0], [-1.0, -1.0], "stop") for i in range(8)
    ]
    table = learner.compute_old(build_rollout_table(samples, weight_version=0))
    per_token = pa.array([[advantage, advantage]] * 8, pa.list_(pa.float32()))
    return append_columns(
        table,
        {"advantages": per_token, "returns": per_token, "score": pa.array(scores, pa.float32())},
    )


def weights(learner) -> dict[str, torch.Tensor]:
    return learner.policy_weights()


def test_old_logprobs_and_values_have_one_entry_per_response_token(learner):
    table = batch(learner, 1.0)
    assert [len(x) for x in table["old_logprobs"].to_pylist()] == [2] * 8
    assert [len(x) for x in table["values"].to_pylist()] == [2] * 8
    assert all(v <= 0 for row in table["old_logprobs"].to_pylist() for v in row)


def test_a_step_with_positive_advantage_raises_the_sampled_tokens_logprob(learner):
    table = batch(learner, 1.0)
    before = torch.tensor(table["old_logprobs"].to_pylist())
    metrics = learner.train(table)
    after = torch.tensor(
        learner.compute_old(table.drop_columns(["old_logprobs", "values"]))[
            "old_logprobs"
        ].to_pylist()
    )
    assert (after > before).float().mean() > 0.9
    assert metrics["actor/grad_norm"] > 0 and metrics["critic/grad_norm"] > 0
    assert metrics["actor/skipped_steps"] == 0


def test_non_finite_loss_skips_the_step_and_is_counted(learner):
    table = batch(learner, float("nan"))
    before = weights(learner)
    skipped = learner.skipped_steps["actor"]
    metrics = learner.train(table)
    after = weights(learner)
    assert learner.skipped_steps["actor"] == skipped + 2  # both mini-batches
    assert metrics["actor/skipped_steps"] == skipped + 2
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_unscorable_rows_leave_the_loss(learner):
    # Every row unscorable: no token counts, the policy loss is 0 and nothing moves.
    table = batch(learner, 5.0, scores=[None] * 8)
    before = weights(learner)
    metrics = learner.train(table)
    assert "actor/pg_loss" not in metrics  # no micro-batch ran
    after = weights(learner)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_lr_schedule_warms_up_linearly_then_decays_by_cosine():
    spec = OptimizerSpec(lr=1.0, warmup_steps=4, total_steps=14, schedule="cosine")
    f = _lr_lambda(spec)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == 1.0 and f(9) == pytest.approx(0.5) and f(14) == pytest.approx(0.0)
    assert _lr_lambda(OptimizerSpec(lr=1.0, schedule="constant"))(100) == 1.0


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_every_zero_stage_trains_and_hands_out_full_weights(tiny_model, learner, stage):
    spec = LearnerSpec(
        model_path=tiny_model,
        policy_optim=OptimizerSpec(lr=1e-3),
        loss=LossSpec(),
        zero_stage=stage,
    )
    zero = Learner(spec, rank=0, world_size=1, master_addr="127.0.0.1", master_port=free_port())
    before = zero.policy_weights()
    metrics = zero.train(batch(zero, 1.0))
    after = zero.policy_weights()
    assert metrics["actor/skipped_steps"] == 0 and math.isfinite(metrics["actor/grad_norm"])
    assert before.keys() == after.keys() == learner.policy_weights().keys()
    assert all(after[k].shape == before[k].shape for k in before)  # gathered, not shards
    assert any(not torch.equal(before[k], after[k]) for k in before)
