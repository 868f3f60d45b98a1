"""The objective seam: the engine trains an objective it has never seen (next-token
cross-entropy, ``tests/learner/cross_entropy.py``), steps and checkpoints it like the
policy-gradient one, and refuses a metric with no declared aggregation. The two-rank run of the
same objective is in ``tests/e2e/test_data_parallel.py``."""

from __future__ import annotations

import pyarrow as pa
import pytest
import torch

from learner.engine import Engine, LearnerSpec, OptimizerSpec
from learner.models import load_causal_lm, policy_forward
from learner.objectives import Counts, LossSpec, PolicyGradient
from rollout import GeneratedSample, build_rollout_table
from rollout.tensors import to_padded
from tests.helpers import free_port
from tests.learner.cross_entropy import NextTokenCE, Unlabelled
from tests.learner.helpers import engine as one_rank


def engine(tiny_model, objective=None, lr: float = 1e-2) -> Engine:
    """Several micro-batches per mini-batch, two mini-batches."""
    objective = objective or NextTokenCE()
    return one_rank(tiny_model, objective, lr=lr, micro_batch_tokens=12, num_mini_batches=2)


def demonstrations(n: int = 8) -> pa.Table:
    """Prompts with the response to imitate: the same two tokens after every prompt."""
    samples = [
        GeneratedSample(i, 0, [5, 1 + i % 3, 6], [3, 2], [0.0, 0.0], "stop") for i in range(n)
    ]
    return build_rollout_table(samples, weight_version=0)


def nll(e: Engine, table: pa.Table) -> float:
    batch = to_padded(table, pad_token_id=0)
    with torch.no_grad():
        out = policy_forward(e.policy.module, batch, temperature=1.0)
    return float(-(out.logprobs * batch.response_mask).sum() / batch.response_mask.sum())


@pytest.mark.component
@pytest.mark.component
def test_the_engine_trains_an_objective_it_was_not_written_for(tiny_model):
    e = engine(tiny_model)
    table = demonstrations()
    before = nll(e, table)
    history = [e.train(table) for _ in range(5)]
    after = nll(e, table)
    assert after < 0.5 * before, (before, after)
    first = history[0]
    assert set(first) == {
        "sft/nll",
        "sft/token_accuracy",
        "actor/grad_norm",
        "actor/lr",
        "actor/skipped_steps",
        "learner/skipped_in_a_row",
    }
    assert history[-1]["sft/token_accuracy"] > first["sft/token_accuracy"]
    assert e.critic is None and e.skipped_steps == {"actor": 0}


@pytest.mark.component
@pytest.mark.component
def test_a_share_metric_is_the_mini_batchs_whole_loss(tiny_model):
    """Summed over the micro-batches (two per mini-batch here), not their mean: with a step too
    small to move the loss, the reported NLL is the NLL of the batch."""
    e = engine(tiny_model, lr=1e-9)
    table = demonstrations()
    assert e.train(table)["sft/nll"] == pytest.approx(nll(e, table), rel=1e-3)


@pytest.mark.component
@pytest.mark.component
def test_the_new_objective_checkpoints_and_resumes_exactly(tiny_model, tmp_path):
    a = engine(tiny_model)
    table = demonstrations()
    a.train(table)
    a.save_checkpoint(str(tmp_path / "ckpt"))
    expected = a.train(table)
    b = engine(tiny_model)
    b.load_checkpoint(str(tmp_path / "ckpt"))
    got = b.train(table)
    assert got == pytest.approx(expected, rel=1e-6, abs=1e-9)
    wa, wb = a.policy_weights(), b.policy_weights()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.component
@pytest.mark.component
def test_a_metric_without_a_declared_aggregation_is_refused(tiny_model):
    e = engine(tiny_model, Unlabelled())
    with pytest.raises(KeyError, match="'sft/nll' without declaring how it aggregates"):
        e.train(demonstrations())


@pytest.mark.component
@pytest.mark.component
def test_an_objective_and_its_optimizers_must_agree_on_the_critic(tiny_model):
    spec = LearnerSpec(
        model_path=tiny_model,
        policy_optim=OptimizerSpec(lr=1e-3),
        objective=PolicyGradient(critic=True),
    )
    with pytest.raises(ValueError, match="trains a critic, but the spec has no critic optimizer"):
        Engine(spec, rank=0, world_size=1, master_addr="127.0.0.1", master_port=free_port())


@pytest.mark.unit
@pytest.mark.unit
def test_the_kl_term_of_the_loss_weighs_by_the_coefficient_of_the_step(tiny_model):
    """``settings["kl_coef"]`` (the run's KL controller) replaces the starting coefficient."""
    goal = PolicyGradient(LossSpec(kl_loss_coef=0.01))
    model = load_causal_lm(tiny_model)
    table = demonstrations(4)
    lengths = [2] * 4
    table = table.append_column(
        "old_logprobs", pa.array([[-1.0, -1.0]] * 4, pa.list_(pa.float32()))
    )
    table = table.append_column("advantages", pa.array([[1.0, 1.0]] * 4, pa.list_(pa.float32())))
    table = table.append_column(
        "ref_logprobs", pa.array([[-3.0, -3.0]] * 4, pa.list_(pa.float32()))
    )
    batch = to_padded(table, pad_token_id=0, per_token_columns=goal.columns)
    counts = Counts(tokens=float(sum(lengths)), sequences=4.0)

    def loss(settings) -> tuple[float, float]:
        value, metrics = goal.micro_loss(
            "actor", {"actor": model}, batch, batch.response_mask, counts, settings
        )
        return float(value), float(metrics["actor/kl_loss"])

    start, kl = loss({})
    moved, _ = loss({"kl_coef": 0.5})
    assert kl > 0
    assert moved - start == pytest.approx((0.5 - 0.01) * kl, rel=1e-4)
