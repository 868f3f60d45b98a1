"""The DeepSpeed learner engine with the policy-gradient objective on one gloo rank, without Ray
(component tier)."""

import math

import pyarrow as pa
import pytest
import torch

from learner.engine import Engine as Learner
from learner.engine import LearnerSpec, OptimizerSpec
from learner.objectives import LossSpec, PolicyGradient
from rollout import GeneratedSample, append_columns, build_rollout_table
from tests.helpers import free_port

pytestmark = pytest.mark.component  # DeepSpeed on one gloo rank


@pytest.fixture(scope="module")
def learner(tiny_model):
    spec = LearnerSpec(
        model_path=tiny_model,
        policy_optim=OptimizerSpec(lr=1e-3),
        critic_optim=OptimizerSpec(lr=1e-2),
        objective=PolicyGradient(LossSpec(), critic=True),
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


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_every_zero_stage_trains_and_hands_out_full_weights(tiny_model, learner, stage):
    spec = LearnerSpec(
        model_path=tiny_model,
        policy_optim=OptimizerSpec(lr=1e-3),
        objective=PolicyGradient(LossSpec()),
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


def fresh(tiny_model, stage: int, critic: bool = True, cosine: bool = True) -> Learner:
    optim = OptimizerSpec(lr=1e-3, warmup_steps=2, total_steps=10, schedule="cosine")
    spec = LearnerSpec(
        model_path=tiny_model,
        policy_optim=optim if cosine else OptimizerSpec(lr=1e-3),
        critic_optim=OptimizerSpec(lr=1e-2) if critic else None,
        objective=PolicyGradient(LossSpec(), critic=critic),
        micro_batch_tokens=16,
        num_mini_batches=2,
        zero_stage=stage,
    )
    return Learner(spec, rank=0, world_size=1, master_addr="127.0.0.1", master_port=free_port())


@pytest.mark.parametrize(("stage", "critic"), [(0, True), (2, False), (3, False)])
def test_a_restored_checkpoint_trains_exactly_as_the_original_would(
    tiny_model, tmp_path, stage, critic
):
    """Weights, Adam moments, the LR schedule's position and the mini-batch RNG all come back:
    the next step after loading equals the next step of the learner that was saved."""
    a = fresh(tiny_model, stage, critic)
    a.train(batch(a, 1.0))
    a.save_checkpoint(str(tmp_path / "ckpt"))
    step = batch(a, -0.5)
    expected = a.train(step)
    expected_weights = a.policy_weights()

    b = fresh(tiny_model, stage, critic)
    b.load_checkpoint(str(tmp_path / "ckpt"))
    got = b.train(step)
    assert got == pytest.approx(expected, rel=1e-6, abs=1e-9)  # lr, losses, grad norms
    got_weights = b.policy_weights()
    assert all(torch.equal(got_weights[k], expected_weights[k]) for k in expected_weights)
    # And without the optimizer state the same step differs (Adam's moments matter):
    c = fresh(tiny_model, stage, critic)
    c.train(step)
    c_weights = c.policy_weights()
    assert not all(torch.equal(c_weights[k], expected_weights[k]) for k in expected_weights)


def test_a_checkpoint_from_other_learner_settings_is_refused(tiny_model, tmp_path):
    a = fresh(tiny_model, 0, critic=True)
    a.save_checkpoint(str(tmp_path / "ckpt"))
    b = fresh(tiny_model, 0, critic=False)
    expected = r"ZeRO stage 0 \(critic: True\); this run has 1 at stage 0 \(critic: False\)"
    with pytest.raises(ValueError, match=expected):
        b.load_checkpoint(str(tmp_path / "ckpt"))


def test_a_checkpoint_loads_with_weights_only_unpickling(tiny_model, tmp_path, monkeypatch):
    """Every file DeepSpeed reads back goes through torch.load(weights_only=True)."""
    a = fresh(tiny_model, 2, critic=False)
    a.save_checkpoint(str(tmp_path / "ckpt"))
    calls = []
    real = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    fresh(tiny_model, 2, critic=False).load_checkpoint(str(tmp_path / "ckpt"))
    assert calls and all(w is True for w in calls)


def test_consecutive_skipped_updates_are_counted_and_reset_by_a_good_one(tiny_model):
    a = fresh(tiny_model, 0, critic=False, cosine=False)
    bad = batch(a, float("nan"))
    assert a.train(bad)["learner/skipped_in_a_row"] == 2  # two mini-batches, both dropped
    assert a.train(bad)["learner/skipped_in_a_row"] == 4
    assert a.train(batch(a, 1.0))["learner/skipped_in_a_row"] == 0


def test_the_gradient_reduction_group_times_out_like_the_config_says(tiny_model):
    """DeepSpeed reduces gradients on its own clone of the world group; a dead rank must fail
    it after the configured timeout, not torch's 30-minute default."""
    from dataclasses import replace

    from deepspeed.utils import groups

    spec = replace(fresh(tiny_model, 0, critic=False).spec, collective_timeout_s=7.0)
    Learner(spec, rank=0, world_size=1, master_addr="127.0.0.1", master_port=free_port())
    group = groups._clone_world_group()
    backend = group._get_backend(torch.device("cpu"))
    assert backend.options._timeout.total_seconds() == 7.0


def test_an_on_policy_update_equals_the_one_after_a_scoring_pass(tiny_model):
    """One epoch of one mini-batch: taking the first forward's log-probabilities, detached, as
    the old ones gives the loss, gradient and update of a scoring pass first, with no pass.
    (The scoring pass runs without autograd and can differ from the training forward in the
    last float bits, ~1e-7 here; that is the only difference.)"""

    def engine(on_policy: bool) -> Learner:
        loss = LossSpec(kl_loss_coef=0.1, entropy_coef=0.01)
        spec = LearnerSpec(
            model_path=tiny_model,
            policy_optim=OptimizerSpec(lr=1e-3),
            objective=PolicyGradient(loss, temperature=0.8, on_policy=on_policy),
            micro_batch_tokens=16,  # several micro-batches
        )
        return Learner(spec, rank=0, world_size=1, master_addr="127.0.0.1", master_port=free_port())

    samples = [
        GeneratedSample(
            i,
            0,
            [5, 1, 6, 2][: 2 + i % 3],
            [3 + i % 4, 1, 2][: 1 + i % 3],
            [-1.5] * (1 + i % 3),
            "stop",
        )
        for i in range(8)
    ]
    rollout = build_rollout_table(samples, weight_version=0)
    n = [1 + i % 3 for i in range(8)]
    columns = {
        "advantages": pa.array(
            [[(-1.0) ** i] * k for i, k in enumerate(n)], pa.list_(pa.float32())
        ),
        "ref_logprobs": pa.array([[-2.0] * k for k in n], pa.list_(pa.float32())),
        "score": pa.array([1.0] * 8, pa.float32()),
    }
    scored = append_columns(rollout, columns)
    today, reused = engine(False), engine(True)
    grads = {}
    for e in (today, reused):  # the accumulated gradient, just before the optimizer step

        def step(name, ds_engine, bad, e=e, inner=e._step):
            grads[e] = {n: p.grad.clone() for n, p in ds_engine.module.named_parameters()}
            return inner(name, ds_engine, bad)

        e._step = step
    with_old = today.compute_old(scored)
    want = today.train(with_old, {"kl_coef": 0.1})
    got = reused.train(scored, {"kl_coef": 0.1})
    for key in ("actor/pg_loss", "actor/kl_loss", "actor/entropy", "actor/grad_norm"):
        assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-9), key
    assert got["actor/ratio_mean"] == 1.0
    for name, g in grads[today].items():
        gap = float((grads[reused][name] - g).norm() / g.norm().clamp(min=1e-12))
        assert gap < 1e-5, (name, gap)  # measured: 6e-7 at most
    # the metrics the skipped pass would have given the driver, from the first forward
    old = torch.tensor([v for row in with_old["old_logprobs"].to_pylist() for v in row])
    assert got["actor/kl_ref"] == pytest.approx(float((old + 2.0).mean()), rel=1e-5)
    assert got["rollout/logprob_mismatch"] == pytest.approx(float((old + 1.5).abs().mean()), 1e-5)
    assert got["rollout/logprob_mismatch_max"] == pytest.approx(float((old + 1.5).abs().max()))


def test_the_behaviour_correction_weighs_tokens_by_old_over_rollout_across_micro_batches(
    tiny_model,
):
    """Samples whose ``rollout_logprobs`` sit ``delta`` below the learner's ``old_logprobs``:
    the reported weights are ``min(e^delta, cap)`` over every token, summed over the
    micro-batches like the loss, and the masked ones count as masked."""
    from learner.off_policy import OffPolicySpec

    spec = LearnerSpec(
        model_path=tiny_model,
        policy_optim=OptimizerSpec(lr=1e-3),
        objective=PolicyGradient(
            LossSpec(off_policy=OffPolicySpec(weight="token", cap=2.0, mask="token", band=3.0))
        ),
        micro_batch_tokens=16,  # several micro-batches
    )
    engine = Learner(spec, rank=0, world_size=1, master_addr="127.0.0.1", master_port=free_port())
    samples = [
        GeneratedSample(i, 0, [5, 1, 6, 2], [3 + i % 4, 0], [-1.0] * 2, "stop") for i in range(8)
    ]
    table = engine.compute_old(build_rollout_table(samples, weight_version=0))
    deltas = [[0.5, -0.5], [1.0, 0.0], [-1.5, 0.2], [0.0, 0.0]] * 2  # e^1.0 > cap; e^-1.5 < 1/3
    old = table["old_logprobs"].to_pylist()
    rollout = [
        [o - d for o, d in zip(row, ds, strict=True)] for row, ds in zip(old, deltas, strict=True)
    ]
    table = table.set_column(
        table.column_names.index("rollout_logprobs"),
        "rollout_logprobs",
        pa.array(rollout, pa.list_(pa.float32())),
    )
    per_token = pa.array([[1.0, 1.0]] * 8, pa.list_(pa.float32()))
    table = append_columns(
        table, {"advantages": per_token, "score": pa.array([1.0] * 8, pa.float32())}
    )
    metrics = engine.train(table, {})
    weights = [min(math.exp(d), 2.0) if math.exp(d) >= 1 / 3 else 0.0 for ds in deltas for d in ds]
    assert metrics["off_policy/weight_mean"] == pytest.approx(sum(weights) / 16, rel=1e-4)
    assert metrics["off_policy/weight_max"] == pytest.approx(2.0)
    assert metrics["off_policy/truncated_fraction"] == pytest.approx(2 / 16)
    assert metrics["off_policy/masked_fraction"] == pytest.approx(2 / 16)
    assert metrics["off_policy/ratio_max"] == pytest.approx(math.exp(1.0), rel=1e-4)
