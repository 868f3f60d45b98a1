"""The learning-rate schedule's factors, derived by hand (CPU, no DeepSpeed)."""

import math

import pytest
import torch

from learner.engine import OptimizerSpec, _lr_lambda

pytestmark = pytest.mark.unit  # pure code in this process


def factors(steps, **kwargs) -> list[float]:
    factor = _lr_lambda(OptimizerSpec(lr=1.0, **kwargs))
    return [factor(s) for s in steps]


def test_linear_decay_without_warmup_is_cleanrls_annealing():
    # 4 steps: 1 - k/4 for step k, the N+ / CleanRL ``frac = 1 - (update - 1) / num_updates``;
    # the last step is one short of the end, so it still moves (0.25, not 0).
    assert factors(range(5), schedule="linear", total_steps=4) == [1.0, 0.75, 0.5, 0.25, 0.0]


def test_linear_decay_after_warmup():
    # Warm-up 2 of 10 steps: (k + 1) / 2 for k < 2; then 1 - (k - 2) / 8.
    got = factors([0, 1, 2, 6, 9, 10, 12], schedule="linear", warmup_steps=2, total_steps=10)
    # step 0: 1/2; 1: 2/2; 2: the decay's start; 6: midway (4/8); 9: 1 - 7/8; 10 and past: 0
    assert got == pytest.approx([0.5, 1.0, 1.0, 0.5, 0.125, 0.0, 0.0])


def test_linear_decay_ends_at_min_lr_ratio():
    got = factors([2, 6, 10], schedule="linear", warmup_steps=2, total_steps=10, min_lr_ratio=0.1)
    # 0.1 + 0.9 x (1, 1/2, 0)
    assert got == pytest.approx([1.0, 0.55, 0.1])


def test_cosine_and_constant_are_unchanged():
    # Quarter way (step 4 of warm-up 2 + 8): cosine 0.5 (1 + cos(pi / 4)) = 0.854, linear 0.75.
    cosine = factors([0, 4, 6, 10], schedule="cosine", warmup_steps=2, total_steps=10)
    assert cosine == pytest.approx([0.5, 0.5 * (1 + math.cos(math.pi / 4)), 0.5, 0.0])
    assert factors([0, 4], schedule="linear", warmup_steps=2, total_steps=10)[1] == 0.75
    assert factors([0, 1, 5, 100], warmup_steps=2, total_steps=10) == [0.5, 1.0, 1.0, 1.0]


def test_an_unknown_schedule_is_refused():
    with pytest.raises(ValueError, match="lr schedule 'step': give constant, cosine or linear"):
        _lr_lambda(OptimizerSpec(lr=1.0, schedule="step"))


def test_the_optimizer_steps_with_the_factor_of_its_step_and_the_configured_eps():
    # LambdaLR sets factor(0) at construction and factor(k) after the k-th scheduler step, so
    # optimizer step k (0-based) runs at lr x factor(k).
    spec = OptimizerSpec(lr=0.1, eps=1e-5, schedule="linear", total_steps=4)
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([param], lr=spec.lr, eps=spec.eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(spec))
    seen = []
    for _ in range(4):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen == pytest.approx([0.1, 0.075, 0.05, 0.025])
    assert optimizer.param_groups[0]["eps"] == 1e-5


def test_lr_schedule_warms_up_linearly_then_decays_by_cosine():
    spec = OptimizerSpec(lr=1.0, warmup_steps=4, total_steps=14, schedule="cosine")
    f = _lr_lambda(spec)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == 1.0 and f(9) == pytest.approx(0.5) and f(14) == pytest.approx(0.0)
    assert _lr_lambda(OptimizerSpec(lr=1.0, schedule="constant"))(100) == 1.0
