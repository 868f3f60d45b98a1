"""The off-policy correction (learner.off_policy) by hand: truncated token weights, the sequence
weight, both masks, padding ignored, and the decoupled PPO loss they weigh."""

from __future__ import annotations

import math

import pytest
import torch

from learner.algorithms import OffPolicySpec, behaviour_weights, policy_loss

pytestmark = pytest.mark.unit  # pure code in this process

# One sample of 3 tokens and one of 1 (then padding, whose values must not matter).
# log r = old - mu per token: row 0: 0.5, -0.8, 0.1; row 1: 1.2
OLD = torch.tensor([[0.0, -1.0, -0.4], [-0.3, -9.0, 5.0]])
MU = torch.tensor([[-0.5, -0.2, -0.5], [-1.5, 0.0, -7.0]])
MASK = torch.tensor([[1, 1, 1], [1, 0, 0]]).bool()


def test_token_weights_are_the_ratios_truncated_at_the_cap():
    w, m = behaviour_weights(OLD, MU, MASK, OffPolicySpec(weight="token", cap=1.5))
    want = [[1.5, math.exp(-0.8), math.exp(0.1)], [1.5, 0.0, 0.0]]  # e^0.5, e^1.2 > 1.5
    assert torch.allclose(w, torch.tensor(want), atol=1e-6)
    assert m["off_policy/truncated_fraction"].item() == pytest.approx(2 / 4)
    assert m["off_policy/masked_fraction"].item() == 0.0
    assert m["off_policy/weight_mean"].item() == pytest.approx(sum(map(sum, want)) / 4)
    assert m["off_policy/weight_max"].item() == pytest.approx(1.5)
    assert m["off_policy/ratio_max"].item() == pytest.approx(math.exp(1.2))


def test_the_sequence_weight_is_the_truncated_product_of_the_token_ratios():
    w, _ = behaviour_weights(OLD, MU, MASK, OffPolicySpec(weight="sequence", cap=3.0))
    row0 = math.exp(0.5 - 0.8 + 0.1)  # 0.819; row 1: e^1.2 = 3.32, truncated to 3
    assert torch.allclose(w, torch.tensor([[row0] * 3, [3.0, 0.0, 0.0]]), atol=1e-6)


def test_the_sequence_mask_uses_the_geometric_mean_and_the_token_mask_each_ratio():
    # geometric means: row 0 exp(-0.2/3) = 0.936, row 1 exp(1.2) = 3.32
    w, m = behaviour_weights(OLD, MU, MASK, OffPolicySpec(mask="sequence", band=2.0))
    assert w.tolist() == [[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]
    assert m["off_policy/masked_fraction"].item() == pytest.approx(1 / 4)
    # token ratios e^0.5 = 1.65, e^-0.8 = 0.449, e^0.1, e^1.2 = 3.32; band 2: the 2nd and 4th out
    w, m = behaviour_weights(OLD, MU, MASK, OffPolicySpec(weight="token", mask="token"))
    assert torch.allclose(w, torch.tensor([[math.exp(0.5), 0.0, math.exp(0.1)], [0.0] * 3]))
    assert m["off_policy/masked_fraction"].item() == pytest.approx(2 / 4)
    assert m["off_policy/truncated_fraction"].item() == 0.0  # the one over the cap is masked


def test_global_token_counts_make_the_shares_add_up():
    spec = OffPolicySpec(weight="token", cap=1.5)
    whole = behaviour_weights(OLD, MU, MASK, spec)[1]["off_policy/weight_mean"]
    parts = [
        behaviour_weights(OLD[i : i + 1], MU[i : i + 1], MASK[i : i + 1], spec, 4)[1]
        for i in (0, 1)
    ]
    assert sum(p["off_policy/weight_mean"] for p in parts).item() == pytest.approx(whole.item())


def test_no_correction_and_equal_policies_leave_the_loss_as_it_was():
    logprobs = (OLD + torch.tensor([[0.1, -0.3, 0.05], [0.4, 0.0, 0.0]])).requires_grad_()
    adv = torch.tensor([[1.0, 1.0, 1.0], [-2.0, 0.0, 0.0]])
    plain, _ = policy_loss(logprobs, OLD, adv, MASK)
    w, m = behaviour_weights(OLD, OLD, MASK, OffPolicySpec(weight="token", mask="sequence"))
    assert w.tolist() == [[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]] and m["off_policy/weight_mean"] == 1
    weighted, _ = policy_loss(logprobs, OLD, adv, MASK, weights=w)
    assert weighted.item() == pytest.approx(plain.item())


def test_the_decoupled_loss_weighs_the_clip_around_the_proximal_policy():
    # rho = exp(logp - old), clipped to [0.8, 1.2] around the proximal policy; w = min(old/mu, 2)
    delta = torch.tensor([[0.3, -0.3, 0.1], [-0.5, 0.0, 0.0]])
    logprobs = (OLD + delta).requires_grad_()
    adv = torch.tensor([[1.0, -1.0, 2.0], [-1.0, 0.0, 0.0]])
    w, _ = behaviour_weights(OLD, MU, MASK, OffPolicySpec(weight="token", cap=2.0))
    loss, _ = policy_loss(logprobs, OLD, adv, MASK, weights=w)
    expected = 0.0
    for (b, t), a in zip([(0, 0), (0, 1), (0, 2), (1, 0)], [1.0, -1.0, 2.0, -1.0], strict=True):
        rho = math.exp(delta[b, t].item())
        clipped = min(max(rho, 0.8), 1.2)
        weight = min(math.exp(OLD[b, t].item() - MU[b, t].item()), 2.0)
        expected += weight * max(-a * rho, -a * clipped)
    assert loss.item() == pytest.approx(expected / 4, abs=1e-6)  # token-mean over 4 tokens
    loss.backward()
    # token (0, 0): rho = e^0.3 > 1.2 with A > 0: clipped, no gradient; (0, 2): inside, w * A * rho
    assert logprobs.grad[0, 0].item() == 0.0
    rho = math.exp(0.1)
    assert logprobs.grad[0, 2].item() == pytest.approx(-math.exp(0.1) * 2.0 * rho / 4, abs=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"weight": "tokens"}, "weight='tokens'"),
        ({"mask": "row"}, "mask='row'"),
        ({"cap": 0.0}, "cap must be > 0"),
        ({"band": 1.0}, "band must be > 1"),
    ],
)
def test_bad_specs_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        OffPolicySpec(**kwargs)
