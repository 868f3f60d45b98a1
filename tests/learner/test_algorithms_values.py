"""learner.algorithms on small hand-built tensors; each expected number is derived in a comment."""

import math

import pytest
import torch

from learner import algorithms as A
from learner.estimators import ESTIMATOR_SPECS

pytestmark = pytest.mark.unit  # pure code in this process

T = torch.tensor


def close(got, want, tol=1e-6):
    torch.testing.assert_close(
        torch.as_tensor(got, dtype=torch.float64),
        torch.as_tensor(want, dtype=torch.float64),
        atol=tol,
        rtol=0,
    )


# ---- masked statistics -------------------------------------------------------------------

VALS = T([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
MASK = T([[1, 1, 0], [1, 0, 0]])  # selects 1, 2, 4


def test_masked_mean():
    close(A.masked_mean(VALS, MASK), 7 / 3)  # (1 + 2 + 4) / 3
    close(A.masked_mean(VALS, MASK, dim=1), [1.5, 4.0])  # (1 + 2) / 2 ; 4 / 1
    close(A.masked_mean(VALS, torch.zeros_like(MASK)), 0.0)  # empty selection is 0, not NaN


def test_masked_var():
    # deviations from 7/3: -4/3, -1/3, 5/3 -> squares sum to (16 + 1 + 25) / 9 = 14/3
    close(A.masked_var(VALS, MASK, unbiased=False), 14 / 9)  # / 3
    close(A.masked_var(VALS, MASK, unbiased=True), 7 / 3)  # / 2
    with pytest.raises(ValueError, match="at least 2"):
        A.masked_var(VALS, T([[1, 0, 0], [0, 0, 0]]))


def test_masked_whiten():
    w = A.masked_whiten(VALS, MASK)
    s = math.sqrt(7 / 3)  # unbiased std of {1, 2, 4}
    close(w, [[(1 - 7 / 3) / s, (2 - 7 / 3) / s, 0.0], [(4 - 7 / 3) / s, 0.0, 0.0]], tol=1e-5)
    close(A.masked_whiten(VALS, MASK, shift_mean=False), w + 7 / 3 * MASK, tol=1e-5)


# ---- KL and rewards ----------------------------------------------------------------------


def test_kl_estimators_at_a_known_ratio():
    # logp = ln 0.5, ref = ln 0.25 -> log_r = ln 0.5 = -0.693147
    logp, ref = T([math.log(0.5)]), T([math.log(0.25)])
    lr = math.log(0.5)
    close(A.kl_estimate(logp, ref, "k1"), [-lr])  # 0.693147
    close(A.kl_estimate(logp, ref, "k2"), [0.5 * lr * lr])  # 0.240227
    close(A.kl_estimate(logp, ref, "k3"), [0.5 - lr - 1])  # r - log r - 1 = 0.193147
    with pytest.raises(ValueError, match="unknown KL estimator"):
        A.kl_estimate(logp, ref, "k4")


def test_kl_log_ratio_is_clamped_before_exp():
    # log_r = 100 would overflow float32 in exp; clamped to 20: exp(20) - 20 - 1.
    k3 = A.kl_estimate(T([0.0]), T([100.0]), "k3")
    assert torch.isfinite(k3).all()
    assert abs(k3.item() / (math.exp(20) - 21) - 1) < 1e-6  # float32 keeps ~7 digits of 4.85e8
    close(A.kl_estimate(T([0.0]), T([-100.0]), "k1"), [20.0])


def test_token_rewards_put_the_score_on_the_last_token():
    scores = T([1.0, 2.0, 5.0])
    kl = T([[0.1, 0.2, 0.3], [0.5, 0.5, 0.5], [1.0, 1.0, 1.0]])
    mask = T([[1, 1, 0], [1, 1, 1], [0, 0, 0]])
    r = A.token_rewards(scores, kl, mask, kl_coef=0.5)
    # row 0: -0.5*0.1, -0.5*0.2 + 1.0, padding 0 ; row 1: -0.25, -0.25, -0.25 + 2.0
    # row 2 has no tokens: no KL and nowhere to put its score.
    close(r, [[-0.05, 0.9, 0.0], [-0.25, -0.25, 1.75], [0.0, 0.0, 0.0]])


# ---- advantage estimators ----------------------------------------------------------------


def test_gae_by_hand():
    rewards = T([[0.0, 1.0, 0.0]])
    values = T([[0.5, 0.2, 9.0]])  # 9.0 sits on padding and must be ignored
    mask = T([[1, 1, 0]])
    adv, ret = A.gae(rewards, values, mask, gamma=0.9, lam=0.8)
    # t=1 (last token; V after it is 0): delta = 1 + 0.9*0 - 0.2 = 0.8, A1 = 0.8
    # t=0: delta = 0 + 0.9*0.2 - 0.5 = -0.32, A0 = -0.32 + 0.9*0.8*0.8 = 0.256
    close(adv, [[0.256, 0.8, 0.0]])
    close(ret, [[0.756, 1.0, 0.0]])  # A + V


def test_group_advantages_grpo_and_dr_grpo():
    scores = T([1.0, 0.0, 1.0, 0.0, 3.0, 2.0, 2.0])
    groups = T([0, 0, 0, 0, 1, 2, 2])
    # group 0: mean 0.5, unbiased std sqrt(4 * 0.25 / 3) = 0.57735 -> +-0.5 / 0.57735 = +-0.866025
    # group 1 has one sample -> 0 ; group 2 is all equal -> 0
    a = 0.5 / math.sqrt(1 / 3)
    close(A.group_advantages(scores, groups), [a, -a, a, -a, 0, 0, 0], tol=1e-5)
    close(A.group_advantages(scores, groups, scale_by_std=False), [0.5, -0.5, 0.5, -0.5, 0, 0, 0])


def test_unscorable_samples_get_zero_advantage_and_leave_group_stats():
    scores = T([1.0, 0.0, float("nan")])
    groups = T([0, 0, 0])
    # stats over {1, 0}: mean 0.5, unbiased std sqrt(0.5) -> +-0.5 / 0.707107
    close(A.group_advantages(scores, groups), [0.707107, -0.707107, 0.0], tol=1e-5)
    close(A.rloo_advantages(scores, groups), [1.0, -1.0, 0.0])  # baseline = the other one


def test_rloo_by_hand():
    scores = T([1.0, 0.0, 0.5, 7.0])
    groups = T([0, 0, 0, 1])
    # A0 = 1 - (0 + 0.5)/2 = 0.75 ; A1 = 0 - 1.5/2 = -0.75 ; A2 = 0.5 - 1/2 = 0 ; single -> 0
    close(A.rloo_advantages(scores, groups), [0.75, -0.75, 0.0, 0.0])


def test_reinforce_returns_by_hand():
    # G2 = 2 ; G1 = 0 + 0.5*2 = 1 ; G0 = 1 + 0.5*1 = 1.5
    close(A.reinforce_returns(T([[1.0, 0.0, 2.0]]), T([[1, 1, 1]]), gamma=0.5), [[1.5, 1.0, 2.0]])
    # reward 7 on padding is ignored: G1 = 0, G0 = 1
    close(A.reinforce_returns(T([[1.0, 0.0, 7.0]]), T([[1, 1, 0]]), gamma=0.5), [[1.0, 0.0, 0.0]])


# ---- losses ------------------------------------------------------------------------------


def test_policy_loss_clipping_by_hand():
    ratios = T([[1.5, 0.5, 1.1, 0.7]])
    old = torch.zeros(1, 4)
    logp = ratios.log().requires_grad_()
    adv = T([[1.0, 1.0, -1.0, -1.0]])
    loss, m = A.policy_loss(logp, old, adv, torch.ones(1, 4), clip_low=0.2, clip_high=0.2)
    # per token max(-A r, -A clip(r, 0.8, 1.2)):
    # r=1.5, A=1 : max(-1.5, -1.2) = -1.2 (clipped)   r=0.5, A=1 : max(-0.5, -0.8) = -0.5
    # r=1.1, A=-1: max(1.1, 1.1)   = 1.1             r=0.7, A=-1: max(0.7, 0.8)   = 0.8 (clipped)
    close(loss, (-1.2 - 0.5 + 1.1 + 0.8) / 4)  # 0.05
    close(m["actor/clipfrac"], 0.5)
    close(m["actor/ratio_mean"], 0.95)
    close(m["actor/ratio_min"], 0.5)
    close(m["actor/ratio_max"], 1.5)
    close(m["actor/approx_kl"], sum(r - 1 - math.log(r) for r in [1.5, 0.5, 1.1, 0.7]) / 4)
    loss.backward()
    # d/dlogp of -A r is -A r on unclipped tokens and 0 on clipped ones, over 4 tokens
    close(logp.grad, [[0.0, -0.5 / 4, 1.1 / 4, 0.0]])


def test_asymmetric_and_dual_clip():
    old = torch.zeros(1, 2)
    mask = torch.ones(1, 2)
    # clip-higher: r = 1.25 with A = 1 is inside (0.8, 1.28) so unclipped -1.25
    loss, _ = A.policy_loss(
        T([[math.log(1.25), 0.0]]), old, T([[1.0, 0.0]]), mask, clip_low=0.2, clip_high=0.28
    )
    close(loss, -1.25 / 2)
    # dual clip c=3: r=5, A=-1 -> max(5, 1.2) = 5, bounded by -c A = 3 ;
    # the A=+1 token (r=1) is untouched: -1
    loss, m = A.policy_loss(T([[math.log(5.0), 0.0]]), old, T([[-1.0, 1.0]]), mask, dual_clip=3.0)
    close(loss, (3.0 - 1.0) / 2)
    close(m["actor/dual_clipfrac"], 0.5)
    with pytest.raises(ValueError, match="dual_clip must be > 1"):
        A.policy_loss(old, old, old, mask, dual_clip=0.5)


def test_value_loss_by_hand():
    values, old, ret = T([[1.0, 0.0]]), T([[0.5, 0.0]]), T([[2.0, 1.0]])
    mask = torch.ones(1, 2)
    loss, m = A.value_loss(values, old, ret, mask, clip=0.2)
    # token 0: (1-2)^2 = 1 ; clipped V = 0.5 + 0.2 = 0.7 -> (0.7-2)^2 = 1.69 -> 0.5 * 1.69 = 0.845
    # token 1: both 1 -> 0.5 ; mean 0.6725
    close(loss, 0.6725)
    close(m["critic/vf_clipfrac"], 0.5)
    loss, _ = A.value_loss(values, old, ret, mask, clip=None)
    close(loss, 0.5)  # 0.5 * (1 + 1) / 2


def test_aggregate_modes_by_hand():
    loss = T([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0], [9.0, 9.0, 9.0]])
    mask = T([[1, 1, 1], [1, 0, 0], [0, 0, 0]])  # row 2 has no tokens and must not count
    close(A.aggregate(loss, mask, "token-mean"), 10 / 4)
    close(A.aggregate(loss, mask, "seq-mean-token-mean"), (2 + 4) / 2)
    close(A.aggregate(loss, mask, "seq-mean-token-sum"), (6 + 4) / 2)
    close(A.aggregate(loss, mask, "token-mean", num_tokens=8), 10 / 8)
    close(A.aggregate(loss, mask, "seq-mean-token-sum", num_seqs=5), 10 / 5)
    assert A.global_counts(mask) == (4, 2)
    with pytest.raises(ValueError, match="unknown aggregation"):
        A.aggregate(loss, mask, "sum")


def test_kl_loss_is_the_aggregated_estimate():
    logp, ref = T([[math.log(0.5), 0.0]]), T([[math.log(0.25), 0.0]])
    loss, m = A.kl_loss(logp, ref, T([[1, 1]]), kind="k3")
    close(loss, (0.5 - math.log(0.5) - 1) / 2)  # second token has ratio 1 -> k3 = 0
    close(m["actor/kl_loss"], loss)


# ---- logits --------------------------------------------------------------------------------


def test_entropy_from_logits():
    close(A.entropy_from_logits(torch.zeros(8)), math.log(8))  # uniform over 8
    close(
        A.entropy_from_logits(T([0.0, math.log(3.0)])),
        -(0.25 * math.log(0.25) + 0.75 * math.log(0.75)),
    )
    close(A.entropy_from_logits(T([0.0, 100.0])), 0.0, tol=1e-4)


def test_logprobs_from_logits_match_log_softmax_at_any_temperature():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 11, generator=g)
    ids = torch.randint(0, 11, (2, 5), generator=g)
    for tau in (1.0, 0.7, 2.0):
        want = torch.log_softmax(logits / tau, dim=-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
        close(A.logprobs_from_logits(logits, ids, temperature=tau), want, tol=1e-5)
    assert A.logprobs_from_logits(logits.bfloat16(), ids).dtype == torch.float32
    with pytest.raises(ValueError, match="temperature"):
        A.logprobs_from_logits(logits, ids, temperature=0)


# ---- KL controllers ------------------------------------------------------------------------


def test_adaptive_kl_controller_follows_the_instructgpt_rule():
    c = A.AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10_000)
    c.update(current_kl=12.0, n_steps=100)  # error clip(12/6 - 1) = 0.2 -> * (1 + 0.2*100/1e4)
    close(c.value, 0.1 * 1.002)
    c.update(current_kl=6.3, n_steps=1000)  # error 0.05 -> * (1 + 0.05*0.1)
    close(c.value, 0.1 * 1.002 * 1.005)
    c.update(current_kl=0.0, n_steps=10_000)  # error clipped at -0.2 -> * 0.8
    close(c.value, 0.1 * 1.002 * 1.005 * 0.8)
    d = A.AdaptiveKLController(1.0, 1.0, 1)
    d.load_state_dict(c.state_dict())
    assert d.state_dict() == c.state_dict()
    f = A.FixedKLController(0.05)
    f.update(100.0, 10)
    assert f.value == 0.05 and f.state_dict() == {"value": 0.05}


# ---- registry ------------------------------------------------------------------------------


def test_every_estimator_is_registered_and_only_gae_needs_a_critic():
    assert set(A.ADVANTAGE_ESTIMATORS) == set(A.AdvantageEstimator)
    assert [e.value for e in A.AdvantageEstimator if A.ADVANTAGE_ESTIMATORS[e].needs_critic] == [
        "gae"
    ]


def test_only_the_group_estimators_compare_samples_of_one_prompt():
    assert A.ADVANTAGE_ESTIMATORS is ESTIMATOR_SPECS  # one table of setup choices
    groups = [e.value for e in A.AdvantageEstimator if ESTIMATOR_SPECS[e].needs_groups]
    assert groups == ["grpo", "dr_grpo", "rloo"]


def test_every_estimator_has_a_function():
    mask = T([[1, 1, 0], [1, 0, 0]])
    x = A.AdvantageInputs(
        response_mask=mask,
        scores=T([1.0, 0.0]),
        group_ids=T([0, 0]),
        token_rewards=T([[0.0, 1.0, 0.0], [0.0, 0.0, 0.0]]),
        values=torch.zeros(2, 3),
    )
    for estimator in A.AdvantageEstimator:
        adv, ret = A.compute_advantages(estimator, x)
        assert adv.shape == ret.shape == (2, 3), estimator


def test_registry_dispatches_and_broadcasts_outcome_advantages():
    mask = T([[1, 1, 0], [1, 0, 0]])
    x = A.AdvantageInputs(response_mask=mask, scores=T([1.0, 0.0]), group_ids=T([0, 0]))
    adv, ret = A.compute_advantages("dr_grpo", x)
    close(adv, [[0.5, 0.5, 0.0], [-0.5, 0.0, 0.0]])  # +-0.5 on every response token
    close(ret, adv)
    with pytest.raises(ValueError, match="'gae' needs token_rewards, values"):
        A.compute_advantages(A.AdvantageEstimator.GAE, x)
    with pytest.raises(ValueError, match="is not a valid AdvantageEstimator"):
        A.compute_advantages("ppo2", x)


def test_logprobs_from_logits_gradient_matches_log_softmax():
    # d logp / d z_v = 1[v = token] - softmax(z)_v ; the learner trains through this.
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 4, 7, generator=g, dtype=torch.float64)
    ids = torch.randint(0, 7, (3, 4), generator=g)
    a = logits.clone().requires_grad_()
    A.logprobs_from_logits(a, ids, temperature=0.8).sum().backward()
    b = logits.clone().requires_grad_()
    torch.log_softmax(b / 0.8, dim=-1).gather(-1, ids.unsqueeze(-1)).sum().backward()
    close(a.grad, b.grad, tol=1e-6)


# ---- unscorable samples and non-finite padding ---------------------------------------------


def test_equal_scores_give_exactly_zero_in_float64():
    # (0.1 + 0.1 + 0.1) / 3 = 0.10000000000000002, so s - mean alone would be -1.4e-17
    scores = torch.full((3,), 0.1, dtype=torch.float64)
    groups = torch.zeros(3, dtype=torch.int64)
    for adv in (
        A.group_advantages(scores, groups),
        A.group_advantages(scores, groups, scale_by_std=False),
        A.rloo_advantages(scores, groups),
    ):
        assert (adv == 0).all(), adv


def test_unscorable_row_gets_no_reward_and_no_advantage_under_ppo():
    scores = T([1.0, float("nan")])
    mask = T([[1, 1, 0], [1, 1, 1]])
    kl = torch.full((2, 3), 0.1)
    r = A.token_rewards(scores, kl, mask, kl_coef=0.5)
    # row 0: -0.05, -0.05 + 1.0 ; row 1 is unscorable: no KL penalty and no NaN score anywhere
    close(r, [[-0.05, 0.95, 0.0], [0.0, 0.0, 0.0]])
    x = A.AdvantageInputs(
        response_mask=mask, scores=scores, token_rewards=r, values=torch.ones(2, 3)
    )
    for est in ("gae", "reinforce_pp"):
        adv, ret = A.compute_advantages(est, x)
        assert torch.isfinite(adv).all() and torch.isfinite(ret).all()
        assert (adv[1] == 0).all() and (ret[1] == 0).all(), est
        assert adv[0, :2].abs().sum() > 0, est
    assert A.scorable_mask(scores, mask).tolist() == [[True, True, False], [False] * 3]


def test_all_unscorable_batch_gives_zero_advantages_instead_of_failing_to_whiten():
    mask = T([[1, 1], [1, 0]])
    scores = torch.full((2,), float("nan"))
    r = A.token_rewards(scores, torch.zeros(2, 2), mask, kl_coef=0.1)
    adv, _ = A.compute_advantages(
        "reinforce_pp", A.AdvantageInputs(mask, scores=scores, token_rewards=r)
    )
    assert (adv == 0).all()


def test_inf_on_padding_does_not_leak_into_results():
    inf = float("inf")
    values = T([[1.0, inf], [3.0, -inf]])
    mask = T([[1, 0], [1, 0]])
    close(A.masked_mean(values, mask), 2.0)
    close(A.aggregate(values, mask, "seq-mean-token-mean"), 2.0)
    adv, ret = A.gae(T([[1.0, inf]]), T([[0.5, inf]]), T([[1, 0]]), gamma=1.0, lam=1.0)
    close(adv, [[0.5, 0.0]])  # 1 - 0.5 ; the padded inf is ignored
    close(ret, [[1.0, 0.0]])


def test_each_estimator_names_the_aggregation_it_is_defined_with():
    agg = {e.value: spec.loss_agg for e, spec in A.ADVANTAGE_ESTIMATORS.items()}
    assert agg["grpo"] == "seq-mean-token-mean"  # DeepSeekMath: mean over a sequence's tokens
    assert agg["dr_grpo"] == "seq-mean-token-sum"  # Dr. GRPO: no per-sequence length division
