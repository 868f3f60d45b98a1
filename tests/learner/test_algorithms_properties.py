"""Closed forms and statistical properties of learner.algorithms."""

import math

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from learner import algorithms as A

pytestmark = pytest.mark.unit  # pure code in this process


def random_batch(seed: int, B: int = 6, T: int = 9):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = (torch.arange(T) < lengths[:, None]).double()
    rewards = torch.randn(B, T, generator=g, dtype=torch.float64) * mask
    values = torch.randn(B, T, generator=g, dtype=torch.float64)
    return rewards, values, mask


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), gamma=st.floats(0.5, 1.0))
def test_gae_with_lambda_one_is_discounted_return_minus_value(seed, gamma):
    rewards, values, mask = random_batch(seed)
    adv, ret = A.gae(rewards, values, mask, gamma=gamma, lam=1.0)
    G = A.reinforce_returns(rewards, mask, gamma)  # sum_k gamma^k r_{t+k}
    torch.testing.assert_close(adv, (G - values) * mask, atol=1e-9, rtol=0)
    torch.testing.assert_close(ret, G, atol=1e-9, rtol=0)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), gamma=st.floats(0.5, 1.0))
def test_gae_with_lambda_zero_is_the_td_error(seed, gamma):
    rewards, values, mask = random_batch(seed)
    adv, _ = A.gae(rewards, values, mask, gamma=gamma, lam=0.0)
    v = values * mask
    next_v = torch.cat([v[:, 1:], torch.zeros_like(v[:, :1])], dim=1)  # V after the last token is 0
    torch.testing.assert_close(adv, (rewards + gamma * next_v - v) * mask, atol=1e-9, rtol=0)


def test_k1_and_k3_are_unbiased_for_kl_between_gaussians():
    # pi = N(0, 1) (sampling policy), pi_ref = N(mu, 1): KL(pi || pi_ref) = mu^2 / 2.
    mu = 0.5
    x = torch.randn(2_000_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    logp = -0.5 * x**2
    ref = -0.5 * (x - mu) ** 2  # the shared normaliser cancels in the ratio
    kl = mu**2 / 2  # 0.125
    # k1 = -log r = -(mu x - mu^2/2) has std mu: standard error 0.5 / sqrt(2e6) = 3.5e-4
    assert abs(A.kl_estimate(logp, ref, "k1").mean().item() - kl) < 2e-3
    assert abs(A.kl_estimate(logp, ref, "k3").mean().item() - kl) < 2e-3
    # k2 is biased: E[0.5 (log r)^2] = 0.5 (mu^2 + mu^4 / 4) = 0.1328125
    assert abs(A.kl_estimate(logp, ref, "k2").mean().item() - 0.5 * (mu**2 + mu**4 / 4)) < 2e-3
    assert (A.kl_estimate(logp, ref, "k3") >= 0).all()


@settings(max_examples=50, deadline=None)
@given(
    scores=st.lists(st.sampled_from([0.0, 0.1, 1.0]) | st.floats(-5, 5), min_size=2, max_size=24),
    n_groups=st.integers(1, 6),
)
@example(scores=[0.1, 0.1, 0.1], n_groups=1)  # 0.1 * 3 / 3 != 0.1 in float64
def test_grpo_groups_have_zero_mean_and_unit_std(scores, n_groups):
    s = torch.tensor(scores, dtype=torch.float64)
    groups = torch.arange(len(scores)) % n_groups
    for scale in (True, False):
        adv = A.group_advantages(s, groups, scale_by_std=scale)
        for g in groups.unique():
            a, sg = adv[groups == g], s[groups == g]
            assert abs(a.sum().item()) < 1e-6 * max(1, len(a))
            if len(sg) > 1 and sg.std().item() > 1e-3 and scale:
                assert abs(a.std().item() - 1.0) < 1e-3
            if len(sg) == 1 or (sg == sg[0]).all():
                assert (a == 0).all()


@settings(max_examples=50, deadline=None)
@given(scores=st.lists(st.floats(-5, 5), min_size=2, max_size=16))
def test_rloo_equals_group_deviation_scaled_by_n_over_n_minus_one(scores):
    # s_i - (S - s_i)/(n-1) = n/(n-1) (s_i - mean): RLOO is Dr. GRPO rescaled.
    s = torch.tensor(scores, dtype=torch.float64)
    groups = torch.zeros(len(scores), dtype=torch.int64)
    n = len(scores)
    torch.testing.assert_close(
        A.rloo_advantages(s, groups),
        n / (n - 1) * A.group_advantages(s, groups, scale_by_std=False),
    )


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_whitened_values_have_zero_mean_unit_variance_and_zero_padding(seed):
    rewards, _, mask = random_batch(seed, B=5, T=7)
    w = A.masked_whiten(rewards, mask)
    assert abs(A.masked_mean(w, mask).item()) < 1e-6
    assert abs(A.masked_var(w, mask).item() - 1.0) < 1e-4
    assert (w[mask == 0] == 0).all()


def test_entropy_is_between_zero_and_log_vocab():
    logits = torch.randn(64, 50, generator=torch.Generator().manual_seed(1)) * 3
    h = A.entropy_from_logits(logits)
    assert (h >= 0).all() and (h <= math.log(50) + 1e-5).all()
