"""DPO (with IPO and conservative DPO) and RRHF: the losses by hand, the objectives on a tiny
causal LM against the same losses computed from ``sequence_logprobs``, and both on the learner
engine (one gloo rank, real DeepSpeed, no Ray). CPU, a few seconds (the first engine test of a
fresh environment also builds DeepSpeed's CPU communication op, about 30 s, once)."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest
import torch

from learner.losses import preference_loss, rrhf_loss
from learner.models import load_causal_lm
from learner.objectives import Counts
from learner.preference import DirectPreference, RankResponses, sequence_logprobs
from rollout import schema as S
from tests.learner.helpers import engine, full_forward_nll, group_table

LN2 = math.log(2.0)


def nls(x: float) -> float:
    """-log sigmoid(x) = log(1 + exp(-x))."""
    return math.log1p(math.exp(-x))


# ------------------------------------------------------------------------------ DPO loss by hand


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


@pytest.mark.unit
def test_dpo_loss_is_ln2_when_policy_and_reference_agree():
    logps = t(-3.0, -1.5)
    loss, stats = preference_loss(logps, t(-2.0, -4.0), logps, t(-2.0, -4.0), beta=0.1, num_pairs=2)
    assert loss.item() == pytest.approx(LN2)
    assert stats["accuracy"].item() == pytest.approx(0.5)  # every pair a tie: half right
    assert stats["margin"].item() == 0.0


@pytest.mark.unit
def test_dpo_loss_and_implicit_rewards_on_a_pair_by_hand():
    # pc = -1, pr = -3, rc = rr = -2: chosen log-ratio 1, rejected -1, h = 2; beta h = 1
    args = (t(-1.0), t(-3.0), t(-2.0), t(-2.0))
    loss, stats = preference_loss(*args, beta=0.5, num_pairs=1)
    assert loss.item() == pytest.approx(nls(1.0)) and nls(1.0) == pytest.approx(0.3132617, 1e-6)
    assert stats["reward_chosen"].item() == pytest.approx(0.5)  # 0.5 * 1
    assert stats["reward_rejected"].item() == pytest.approx(-0.5)  # 0.5 * -1
    assert stats["margin"].item() == pytest.approx(1.0)  # 0.5 * 2
    assert stats["accuracy"].item() == 1.0


@pytest.mark.unit
def test_conservative_dpo_by_hand():
    # eps = 0.1: 0.9 (-log sigmoid 1) + 0.1 (-log sigmoid -1); -log sigmoid(-1) = 1 + nls(1)
    args = (t(-1.0), t(-3.0), t(-2.0), t(-2.0))
    loss, _ = preference_loss(*args, beta=0.5, label_smoothing=0.1, num_pairs=1)
    assert loss.item() == pytest.approx(0.9 * 0.3132617 + 0.1 * 1.3132617, rel=1e-6)
    # at h = 0 both terms are ln 2, whatever eps
    tie, _ = preference_loss(
        t(0.0), t(0.0), t(0.0), t(0.0), beta=1, label_smoothing=0.3, num_pairs=1
    )
    assert tie.item() == pytest.approx(LN2)


@pytest.mark.unit
def test_ipo_by_hand():
    # h = 2 on summed log-probs: beta 0.5 -> (2 - 1)^2 = 1; beta 0.25 -> (2 - 2)^2 = 0
    args = (t(-1.0), t(-3.0), t(-2.0), t(-2.0))
    assert preference_loss(*args, beta=0.5, loss_type="ipo", num_pairs=1)[0].item() == 1.0
    assert preference_loss(*args, beta=0.25, loss_type="ipo", num_pairs=1)[0].item() == 0.0
    # and a tie is pushed apart: (0 - 1/(2 * 0.5))^2 = 1
    tie = preference_loss(t(0.0), t(0.0), t(0.0), t(0.0), beta=0.5, loss_type="ipo", num_pairs=1)
    assert tie[0].item() == 1.0


@pytest.mark.unit
def test_dpo_shares_use_the_batchs_pairs_and_a_tie_counts_half():
    # h = 2, 0, -1 (refs 0), a micro-batch of 3 pairs of a batch of 4
    loss, stats = preference_loss(
        t(1.0, 0.0, 0.0), t(-1.0, 0.0, 1.0), *[t(0, 0, 0)] * 2, beta=1.0, num_pairs=4
    )
    assert loss.item() == pytest.approx((nls(2.0) + LN2 + nls(-1.0)) / 4)
    assert stats["accuracy"].item() == pytest.approx((1 + 0.5 + 0) / 4)
    assert stats["reward_chosen"].item() == pytest.approx((1 + 0 + 0) / 4)
    assert stats["reward_rejected"].item() == pytest.approx((-1 + 0 + 1) / 4)
    assert stats["margin"].item() == pytest.approx((2 + 0 - 1) / 4)


@pytest.mark.unit
@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"beta": 0.0}, "beta"),
        ({"beta": -1.0}, "beta"),
        ({"loss_type": "hinge"}, "loss_type"),
        ({"label_smoothing": 0.5}, "label_smoothing"),
        ({"label_smoothing": -0.1}, "label_smoothing"),
        ({"loss_type": "ipo", "label_smoothing": 0.1}, "label_smoothing"),
    ],
)
def test_invalid_preference_arguments_raise_naming_the_argument(kwargs, field):
    kwargs = {"beta": 0.1} | kwargs
    with pytest.raises(ValueError, match=field):
        preference_loss(t(0.0), t(0.0), t(0.0), t(0.0), num_pairs=1, **kwargs)
    with pytest.raises(ValueError, match=field):
        DirectPreference(**kwargs)


# ------------------------------------------------------------------------------ RRHF loss by hand


def rrhf_example(lengths):
    # group 0: responses 0, 1, 2 ranked 0 > 1 > 2, best 0; group 1: responses 3, 4, 4 > 3, best 4
    seq_logps = t(-4.0, -3.0, -2.0, -1.0, -3.0).requires_grad_()
    return dict(
        seq_logps=seq_logps,
        lengths=torch.tensor(lengths),
        chosen=torch.tensor([0, 0, 1, 4]),
        rejected=torch.tensor([1, 2, 2, 3]),
        best=torch.tensor([0, 4]),
        groups=torch.tensor([0, 0, 0, 1]),
    )


@pytest.mark.unit
def test_rrhf_loss_by_hand_on_two_groups():
    args = rrhf_example([4, 1, 1, 2, 3])
    # p = -4/4, -3/1, -2/1, -1/2, -3/3 = -1, -3, -2, -0.5, -1
    # group 0: max(0, -3 + 1) + max(0, -2 + 1) + max(0, -2 + 3) = 0 + 0 + 1; ft = 1
    # group 1: max(0, -0.5 + 1) = 0.5; ft = -(-3 / 3) = 1
    loss, stats = rrhf_loss(**args, ce_coef=0.5, num_groups=2)
    assert loss.item() == pytest.approx((1 + 0.5 * 1 + 0.5 + 0.5 * 1) / 2)
    assert stats["rank_loss"].item() == pytest.approx((1 + 0.5) / 2)
    assert stats["ft_loss"].item() == pytest.approx((1 + 1) / 2)
    assert stats["rank_accuracy"].item() == pytest.approx(2 / 4)  # pairs 0>1 and 0>2 only
    # d loss / d p: hinge 1>2 gives -1/2 to p_1, +1/2 to p_2; hinge 4>3 +1/2 to p_3, -1/2 to
    # p_4; the ce term -0.5/2 to p_0 and p_4. d p_i / d logp_i = 1 / L_i.
    loss.backward()
    assert args["seq_logps"].grad.tolist() == pytest.approx(
        [-0.25 / 4, -0.5 / 1, 0.5 / 1, 0.5 / 2, -0.75 / 3]
    )


@pytest.mark.unit
def test_rrhf_ranks_by_length_normalised_log_probability():
    # response 0 is longer with a lower sum (-4 < -3) but a higher mean (-1 > -3): it ranks
    # above response 1 as its reward says, so the pair 0 > 1 costs nothing.
    normalised, stats = rrhf_loss(**rrhf_example([4, 1, 1, 2, 3]), ce_coef=0.0, num_groups=2)
    # unnormalised (every length 1): p = -4, -3, -2, -1, -3; hinges 1 + 2 + 1 and 2
    summed, _ = rrhf_loss(**rrhf_example([1] * 5), ce_coef=0.0, num_groups=2)
    assert normalised.item() == pytest.approx(1.5 / 2)
    assert summed.item() == pytest.approx(6 / 2)


@pytest.mark.unit
def test_rrhf_rank_accuracy_is_nan_without_pairs():
    args = rrhf_example([1] * 5) | {
        "chosen": torch.tensor([], dtype=torch.long),
        "rejected": torch.tensor([], dtype=torch.long),
        "groups": torch.tensor([], dtype=torch.long),
    }
    loss, stats = rrhf_loss(**args, num_groups=2)
    assert loss.item() == pytest.approx((4 + 3) / 2)  # the ce term alone
    assert math.isnan(stats["rank_accuracy"].item())


# ------------------------------------------------------------------------------ on a tiny model

GROUPS = [  # (prompt, responses, pairs (chosen, rejected, margin))
    ([5, 1], [[3, 0], [4, 4, 0], [7, 0]], [(0, 1, 0.5), (0, 2, 0.0), (1, 2, 0.0)]),
    ([6, 2], [[2, 0], [8, 9, 0]], [(1, 0, 0.0)]),
]


@pytest.fixture(scope="module")
def model(tiny_model):
    return load_causal_lm(tiny_model).eval()


def with_columns(table: pa.Table, model, best=None) -> pa.Table:
    """``table`` with its ``ref_logps`` from ``model`` and, given, ``best_response``."""
    flat = sequence_logprobs(model, table, pad_token_id=0)
    k = [len(g[1]) for g in GROUPS[: table.num_rows]]
    per_group = np.split(flat, np.cumsum(k)[:-1])
    table = table.append_column(
        S.REF_LOGPS, pa.array([p.tolist() for p in per_group], pa.list_(pa.float32()))
    )
    if best is not None:
        table = table.append_column(S.BEST_RESPONSE, pa.array(best, pa.int32()))
    return table


def micro_loss(objective, model, table):
    micro = objective.collate(table, pad_token_id=0)
    counts = Counts(micro.tokens, micro.sequences)
    return objective.micro_loss("actor", {"actor": model}, micro.batch, None, counts, {})


@pytest.mark.unit
def test_sequence_logprobs_sum_each_responses_token_logprobs(model):
    flat = sequence_logprobs(model, group_table(GROUPS), pad_token_id=0)
    rows = [(p, r, [1.0] * len(r)) for p, rs, _ in GROUPS for r in rs]
    assert flat.shape == (5,)
    for got, row in zip(flat, rows, strict=True):
        nll, _ = full_forward_nll(model, [row])
        assert got == pytest.approx(-nll, rel=1e-5)


@pytest.mark.unit
def test_dpo_against_itself_is_ln2_and_one_step_moves_towards_chosen(tiny_model):
    policy = load_causal_lm(tiny_model).eval()
    table = with_columns(group_table(GROUPS), policy)  # the reference is the policy itself
    objective = DirectPreference(beta=0.5)
    micro = objective.collate(table, pad_token_id=0)
    assert micro.tokens == micro.sequences == 4  # loss units are pairs
    loss, metrics = micro_loss(objective, policy, table)
    assert loss.item() == pytest.approx(LN2, abs=1e-5)
    assert metrics["dpo/accuracy"].item() == pytest.approx(0.5)
    assert metrics["dpo/margin"].item() == pytest.approx(0.0, abs=1e-5)
    assert set(metrics) == objective.shares - {"dpo/nll"}  # nll_coef=0: no NLL term

    loss.backward()
    with torch.no_grad():
        for p in policy.parameters():
            if p.grad is not None:
                p -= 0.05 * p.grad
    with torch.no_grad():
        after, metrics = micro_loss(objective, policy, table)
    assert metrics["dpo/margin"].item() > 0 and after.item() < LN2
    assert metrics["dpo/reward_chosen"].item() > metrics["dpo/reward_rejected"].item()


@pytest.mark.unit
def test_dpo_parts_of_a_batch_add_up_to_its_loss(model):
    table = with_columns(group_table(GROUPS), model)
    objective = DirectPreference(beta=2.0, label_smoothing=0.1)
    table = table.set_column(  # a reference that disagrees, so the loss is not ln 2
        table.schema.get_field_index(S.REF_LOGPS),
        S.REF_LOGPS,
        pa.array([[-1.0, -9.0, -2.0], [-3.0, -1.0]], pa.list_(pa.float32())),
    )
    whole, _ = micro_loss(objective, model, table)
    total = Counts(4.0, 4.0)
    parts = [objective.collate(table.slice(i, 1), 0) for i in range(2)]
    split = sum(
        objective.micro_loss("actor", {"actor": model}, m.batch, None, total, {})[0] for m in parts
    )
    assert split.item() == pytest.approx(whole.item(), rel=1e-5)


@pytest.mark.unit
def test_dpo_names_a_group_whose_ref_logps_do_not_match_its_responses(model):
    table = group_table(GROUPS).append_column(
        S.REF_LOGPS, pa.array([[0.0, 0.0], [0.0, 0.0]], pa.list_(pa.float32()))
    )
    with pytest.raises(ValueError, match="prompt_id 0: 2 ref_logps for 3 responses"):
        DirectPreference().collate(table, 0)
    with pytest.raises(KeyError, match="ref_logps"):
        DirectPreference().collate(group_table(GROUPS), 0)


@pytest.mark.unit
def test_rrhf_on_a_tiny_model_is_rrhf_loss_by_hand(model):
    table = with_columns(group_table(GROUPS), model, best=[0, 1])
    objective = RankResponses(ce_coef=0.7)
    micro = objective.collate(table, pad_token_id=0)
    assert micro.tokens == micro.sequences == 2  # loss units are groups
    loss, metrics = micro_loss(objective, model, table)

    logps = sequence_logprobs(model, table, pad_token_id=0)
    lengths = np.array([len(r) for _, rs, _ in GROUPS for r in rs])
    p = logps / lengths
    pairs = [(0, 1), (0, 2), (1, 2), (3 + 1, 3 + 0)]  # group 1's rows start at 3
    rank = sum(max(0.0, p[r] - p[c]) for c, r in pairs)
    ft = -(p[0] + p[3 + 1])
    assert loss.item() == pytest.approx((rank + 0.7 * ft) / 2, rel=1e-5)
    assert metrics["rrhf/rank_loss"].item() == pytest.approx(rank / 2, rel=1e-5, abs=1e-7)
    assert metrics["rrhf/ft_loss"].item() == pytest.approx(ft / 2, rel=1e-5)
    right = sum(p[c] > p[r] for c, r in pairs) / 4
    assert metrics["rrhf/rank_accuracy"].item() == pytest.approx(right)
    assert set(metrics) == objective.shares | objective.rates


@pytest.mark.unit
def test_rrhf_refuses_a_best_response_outside_its_group(model):
    table = group_table(GROUPS).append_column(S.BEST_RESPONSE, pa.array([0, 2], pa.int32()))
    with pytest.raises(ValueError, match="prompt_id 1: best_response 2 is not one of its 2"):
        RankResponses().collate(table, 0)


# ------------------------------------------------------------------------------ on the engine


@pytest.mark.component  # DeepSpeed on one gloo rank
def test_dpo_on_the_engine_starts_at_ln2_and_learns_the_preferences(tiny_model):
    learner = engine(tiny_model, DirectPreference(beta=0.5), lr=3e-3)
    assert set(learner.engines) == {"actor"}
    table = with_columns(group_table(GROUPS), learner.modules["actor"])
    before = learner.evaluate(table)
    assert before["dpo/loss"] == pytest.approx(LN2, abs=1e-5)
    for _ in range(10):
        metrics = learner.train(table)
    assert metrics["actor/grad_norm"] > 0
    after = learner.evaluate(table)
    assert after["dpo/loss"] < before["dpo/loss"] and after["dpo/accuracy"] == 1.0
    assert after["dpo/margin"] > 0


@pytest.mark.component  # DeepSpeed on one gloo rank
def test_rrhf_on_the_engine_orders_the_responses_and_reports_its_rate(tiny_model):
    learner = engine(tiny_model, RankResponses(), lr=3e-3)
    table = with_columns(group_table(GROUPS), learner.modules["actor"], best=[0, 1])
    before = learner.evaluate(table)
    assert set(before) == {"rrhf/loss", "rrhf/rank_loss", "rrhf/ft_loss"}  # shares only
    for _ in range(10):
        metrics = learner.train(table)
    assert 0.0 <= metrics["rrhf/rank_accuracy"] <= 1.0  # a rate, averaged over micro-batches
    after = learner.evaluate(table)
    assert after["rrhf/loss"] < before["rrhf/loss"] and after["rrhf/rank_loss"] == 0.0


@pytest.mark.unit
def test_rpo_adds_the_chosen_responses_token_mean_nll(model):
    """nll_coef > 0: each pair's loss gains the chosen response's token-mean NLL times it."""
    table = with_columns(group_table(GROUPS), model)
    with torch.no_grad():
        plain, _ = micro_loss(DirectPreference(beta=0.1), model, table)
        both, metrics = micro_loss(DirectPreference(beta=0.1, nll_coef=2.0), model, table)
    batch = DirectPreference().collate(table, pad_token_id=0).batch
    seq = sequence_logprobs(model, group_table(GROUPS), pad_token_id=0)
    lengths = batch.sequences.response_lengths.float().numpy()
    chosen = batch.chosen.numpy()
    nll = float(np.mean(-seq[chosen] / lengths[chosen]))
    assert metrics["dpo/nll"].item() == pytest.approx(nll, rel=1e-5)
    assert both.item() == pytest.approx(plain.item() + 2.0 * nll, rel=1e-5)
