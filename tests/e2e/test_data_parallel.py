"""Data parallelism changes nothing: one learner rank, and two ranks (two Ray actors over gloo)
each training on half of the batch, end one step with the same parameters."""

from __future__ import annotations

import random

import pyarrow as pa
import pytest
import ray
import torch

from actors.learner_actor import LearnerActor
from learner.engine import LearnerSpec, OptimizerSpec
from learner.objectives import LossSpec, PolicyGradient
from rollout import GeneratedSample, append_columns, build_rollout_table
from rollout.ops import split_rows

pytestmark = pytest.mark.slow

# Tolerance. The gradients agree to float32 rounding (summed in another order: two ranks averaged
# by DeepSpeed instead of one rank's micro-batches). AdamW's first step moves each weight by about
# lr x sign(grad), so where a gradient is near zero that rounding shows up as a fraction of the
# step: measured max 1.5e-5 at lr 1e-3, on a handful of weights. Hence a bound of 5% of the step on
# every weight, 1e-6 on all but 0.1% of them, and the global gradient norm (which Adam's scale
# invariance would hide) equal to 1e-5 relative.
LR = 1e-3
ATOL = 0.05 * LR


def learners(spec: LearnerSpec, world: int) -> list:
    actors = [
        ray.remote(LearnerActor).options(num_cpus=0.1).remote(spec, rank, world)
        for rank in range(world)
    ]
    addr, port = ray.get(actors[0].endpoint.remote(), timeout=120)
    ray.get([a.setup.remote(addr, port) for a in actors], timeout=300)
    return actors


def rollout(n: int = 16) -> pa.Table:
    rng = random.Random(0)
    samples = [
        GeneratedSample(
            i,
            0,
            [rng.randrange(1, 12) for _ in range(3 + i % 3)],  # prompts of different lengths
            [rng.randrange(1, 12) for _ in range(1 + i % 4)],  # and responses
            [-1.0] * (1 + i % 4),
            "stop",
        )
        for i in range(n)
    ]
    return build_rollout_table(samples, weight_version=0)


def with_advantages(table: pa.Table) -> pa.Table:
    g = torch.Generator().manual_seed(1)
    lengths = [len(r) for r in table["response_token_ids"].to_pylist()]
    adv = [torch.randn(n, generator=g).tolist() for n in lengths]
    column = pa.array(adv, pa.list_(pa.float32()))
    scores = pa.array([1.0] * table.num_rows, pa.float32())
    return append_columns(table, {"advantages": column, "returns": column, "score": scores})


def one_step_on_one_and_on_two_ranks(spec: LearnerSpec, prepare):
    """One training step of ``spec`` on one rank (the whole batch) and on two (a half each), on
    the session's Ray head: the metrics of each rank and the weights after it.
    ``prepare(rank_0, table)`` makes the batch from the rollout."""
    one = learners(spec, 1)
    two = learners(spec, 2)
    batch = prepare(one[0], rollout())
    halves = split_rows(batch, batch.num_rows // 2)
    m1 = ray.get(one[0].train.remote(batch), timeout=300)
    m2 = ray.get([r.train.remote(h) for r, h in zip(two, halves, strict=True)], timeout=300)
    w1 = ray.get(one[0].policy_weights.remote(), timeout=120)
    w2 = ray.get([r.policy_weights.remote() for r in two], timeout=120)[0]
    for actor in [*one, *two]:
        ray.kill(actor)
    return m1, m2, w1, w2


@pytest.mark.parametrize("zero_stage", [0, 2])
def test_two_ranks_on_halves_end_the_step_where_one_rank_on_the_whole_batch_does(
    ray_driver, tiny_model, zero_stage
):
    spec = LearnerSpec(
        model_path=tiny_model,
        policy_optim=OptimizerSpec(lr=LR),
        objective=PolicyGradient(LossSpec(agg="token-mean")),
        micro_batch_tokens=24,  # several micro-batches, differently cut on each side
        zero_stage=zero_stage,
    )
    m1, m2, w1, w2 = one_step_on_one_and_on_two_ranks(
        spec,
        lambda one, table: with_advantages(ray.get(one.compute_old.remote(table), timeout=120)),
    )

    # the loss reported is the whole batch's on every rank, as it is for one rank
    assert [m["actor/pg_loss"] for m in m2] == pytest.approx([m1["actor/pg_loss"]] * 2, abs=1e-6)
    assert [m["actor/grad_norm"] for m in m2] == pytest.approx([m1["actor/grad_norm"]] * 2, 1e-5)
    diffs = torch.cat([(w1[k] - w2[k]).abs().flatten() for k in w1])
    moved = max((w1[k] - w0).abs().max().item() for k, w0 in initial(tiny_model).items())
    off = float((diffs > 1e-6).float().mean())
    print(
        f"zero {zero_stage}: max |w1 - w2| = {diffs.max():.2e} ({off:.3%} > 1e-6); step {moved:.1e}"
    )
    assert moved > 0.5 * LR  # the step did something
    assert diffs.max() <= ATOL
    assert off < 1e-3


def initial(model_path: str) -> dict[str, torch.Tensor]:
    from learner.models import load_causal_lm

    return load_causal_lm(model_path).state_dict()


def test_a_second_objective_trains_on_two_ranks_as_on_one(ray_driver, tiny_model):
    """The objective seam holds across ranks: next-token cross-entropy (written in the tests,
    shipped to the actors by value) ends one step on two ranks where one rank ends it."""
    import cloudpickle

    import tests.learner.cross_entropy as ce

    cloudpickle.register_pickle_by_value(ce)
    spec = LearnerSpec(
        model_path=tiny_model,
        policy_optim=OptimizerSpec(lr=LR),
        objective=ce.NextTokenCE(),
        micro_batch_tokens=24,
    )
    try:
        m1, m2, w1, w2 = one_step_on_one_and_on_two_ranks(spec, lambda one, table: table)
    finally:
        cloudpickle.unregister_pickle_by_value(ce)
    assert [m["sft/nll"] for m in m2] == pytest.approx([m1["sft/nll"]] * 2, abs=1e-6)
    assert [m["actor/grad_norm"] for m in m2] == pytest.approx([m1["actor/grad_norm"]] * 2, 1e-5)
    diffs = torch.cat([(w1[k] - w2[k]).abs().flatten() for k in w1])
    moved = max((w1[k] - w0).abs().max().item() for k, w0 in initial(tiny_model).items())
    assert moved > 0.5 * LR
    assert diffs.max() <= ATOL
