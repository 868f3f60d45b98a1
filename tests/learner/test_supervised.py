"""The supervised objectives and their losses, by hand; and on the learner engine (one gloo rank,
real DeepSpeed, no Ray): SFT, the PTX term inside a policy-gradient step, reward-model training,
its bias shift and its export."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest
import torch
import torch.nn.functional as F

from learner.engine import Engine
from learner.losses import next_token_loss, pairwise_loss
from learner.models import CriticModel, load_causal_lm
from learner.objectives import Counts, LossSpec, PolicyGradient
from learner.supervised import (
    NextToken,
    PackedBatch,
    PairwiseRanking,
    first_fit_decreasing,
    flatten_groups,
    pack,
)
from orchestration.tiny_model import FAMILY_MATRIX
from rollout import schema as S
from tests.learner.helpers import engine, full_forward_nll, group_table, sft_table

ROWS = [  # (prompt, response, sft_mask): chat-like masks with context tokens inside the response
    ([5, 6, 7], [1, 2], [1.0, 1.0]),
    ([8, 9], [3, 4, 5, 6], [0.0, 1.0, 0.0, 1.0]),
    ([5], [7], [1.0]),
    ([4, 4, 4, 4], [2], [1.0]),
    ([6, 3], [2, 8, 9], [1.0, 1.0, 0.0]),
]


# ------------------------------------------------------------------------------ losses by hand


@pytest.mark.unit
def test_pairwise_loss_with_margin_and_l2_regulariser_by_hand():
    chosen, rejected = torch.tensor([2.0, 0.0, 0.5]), torch.tensor([1.0, 1.0, 0.5])
    margin = torch.tensor([0.5, 0.0, 1.0])
    loss, stats = pairwise_loss(chosen, rejected, margin, reg=0.1, num_pairs=4)

    def softplus(x):  # -log sigmoid(d - m) = log(1 + exp(-(d - m)))
        return math.log1p(math.exp(-x))

    by_hand = (
        softplus(2 - 1 - 0.5)
        + 0.1 * (4 + 1)
        + softplus(0 - 1 - 0.0)
        + 0.1 * (0 + 1)
        + softplus(0 - 1.0)
        + 0.1 * (0.25 + 0.25)
    ) / 4  # divided by the batch's pairs (4), not this part's (3)
    assert loss.item() == pytest.approx(by_hand, rel=1e-6)
    assert stats["accuracy"].item() == pytest.approx((1 + 0 + 0.5) / 4)  # a tie counts half
    assert stats["margin_mean"].item() == pytest.approx((1 - 1 + 0) / 4)


@pytest.mark.unit
def test_next_token_loss_is_the_masked_token_mean_nll():
    logprobs = torch.log(torch.tensor([[0.5, 0.25], [0.1, 0.9]]))
    mask = torch.tensor([[True, False], [True, True]])
    loss, _ = next_token_loss(logprobs, mask, num_tokens=6)
    assert loss.item() == pytest.approx(-(math.log(0.5) + math.log(0.1) + math.log(0.9)) / 6)


@pytest.fixture(scope="module")
def model(tiny_model):
    return load_causal_lm(tiny_model).eval()


@pytest.mark.unit
@pytest.mark.parametrize("packing", ["never", "always"])
def test_sft_loss_counts_only_masked_tokens_whether_padded_or_packed(model, packing):
    table = sft_table(ROWS)
    objective = NextToken(packing=packing)
    micro = objective.collate(table, pad_token_id=0)
    assert isinstance(micro.batch, PackedBatch) == (packing == "always")
    total, count = full_forward_nll(model, ROWS)
    assert micro.tokens == count == 8  # the sft_mask's ones, not every response token
    counts = Counts(tokens=micro.tokens, sequences=micro.sequences)
    loss, metrics = objective.micro_loss(
        "actor", {"actor": model}, micro.batch, micro.mask, counts, {}
    )
    assert loss.item() == pytest.approx(total / count, rel=1e-5)
    assert metrics["sft/loss"].item() == pytest.approx(loss.item())


@pytest.mark.unit
def test_packing_puts_several_samples_in_a_row_without_attention_between_them(model):
    table = sft_table(ROWS)
    packed = pack(table, pad_token_id=0, capacity=12)
    assert packed.input_ids.shape[0] < table.num_rows  # samples share rows
    # position ids restart at each sample; the mask is block-diagonal causal
    row, seg = packed.position_ids[0], packed.segments[0]
    starts = [i for i in range(len(seg)) if i == 0 or seg[i] != seg[i - 1]]
    assert len(starts) >= 2 and all(row[i] == 0 for i in starts)
    mask = packed.attention_mask[0, 0]
    second = starts[1]
    assert not mask[second, second - 1] and mask[second, second]
    total, count = full_forward_nll(model, ROWS)
    lp = -NextToken().micro_loss(
        "actor", {"actor": model}, packed, packed.loss_mask, Counts(1.0, 1.0), {}
    )[0]
    assert -lp.item() == pytest.approx(total, rel=1e-5)  # each sample's loss as if alone


@pytest.mark.unit
def test_first_fit_decreasing_fills_the_first_bin_with_room():
    assert first_fit_decreasing(np.array([3, 5, 2, 4, 1]), 6) == [[1, 4], [3, 2], [0]]
    assert first_fit_decreasing(np.array([9, 1]), 4) == [[0], [1]]  # too long: a bin alone


@pytest.mark.unit
def test_auto_packing_pads_when_packing_saves_no_row():
    same = sft_table([([1, 2], [3], [1.0])] * 3)
    assert not isinstance(NextToken().collate(same, 0).batch, PackedBatch)
    mixed = sft_table([([1, 2, 3, 4, 5], [3], [1.0]), ([1], [2], [1.0]), ([1], [2], [1.0])])
    assert isinstance(NextToken().collate(mixed, 0).batch, PackedBatch)


# ------------------------------------------------------------------------------ prompt groups


@pytest.mark.unit
def test_a_ranking_of_k_responses_trains_as_one_group_with_each_response_once():
    ranking = ([1, 2], [[3], [4, 5], [6, 7, 8]], [(0, 1, 0.0), (0, 2, 0.0), (1, 2, 0.0)])
    pair = ([9], [[3], [4]], [(1, 0, 1.0)])
    table = group_table([ranking, pair])
    objective = PairwiseRanking()
    # tokens per group: K prompts and the K responses, so the engine never splits a group
    assert objective.lengths(table).tolist() == [3 * 2 + 6, 2 * 1 + 2]
    micro = objective.collate(table, pad_token_id=0)
    batch = micro.batch
    assert micro.tokens == micro.sequences == 4  # loss units are pairs: 3 choose 2, then 1
    assert batch.sequences.input_ids.shape[0] == 5  # each response through the model once
    assert batch.chosen.tolist() == [0, 0, 1, 4] and batch.rejected.tolist() == [1, 2, 2, 3]
    assert batch.margin.tolist() == [0.0, 0.0, 0.0, 1.0]
    rows = flatten_groups(table, 0).sequences.response_ids.tolist()
    assert rows[4][:1] == [4] and rows[2] == [6, 7, 8]


# ------------------------------------------------------------------------------ on the engine


@pytest.mark.component  # DeepSpeed on one gloo rank
def test_sft_on_the_engine_lowers_the_loss_and_evaluates_without_a_step(tiny_model):
    learner = engine(tiny_model, NextToken(packing="auto"), micro_batch_tokens=12)
    table = sft_table(ROWS)
    before = learner.evaluate(table)
    again = learner.evaluate(table)
    assert before == again  # no step
    total, count = full_forward_nll(learner.modules["actor"], ROWS)
    assert before["sft/loss"] == pytest.approx(total / count, rel=1e-5)
    for _ in range(10):
        metrics = learner.train(table)
    assert metrics["actor/grad_norm"] > 0
    assert learner.evaluate(table)["sft/loss"] < 0.5 * before["sft/loss"]


def rollout(n: int = 4) -> pa.Table:
    from rollout import GeneratedSample, append_columns, build_rollout_table

    samples = [
        GeneratedSample(i, 0, [5, 1, 6], [3 + i % 3, 0], [-1.0, -1.0], "stop") for i in range(n)
    ]
    table = build_rollout_table(samples, weight_version=0)
    per_token = pa.array([[0.5, -0.5]] * n, pa.list_(pa.float32()))
    zeros = pa.array([[0.0, 0.0]] * n, pa.list_(pa.float32()))
    return append_columns(
        table,
        {
            S.ADVANTAGES: per_token,
            S.REF_LOGPROBS: zeros,
            S.SCORE: pa.array([1.0] * n, pa.float32()),
        },
    )


@pytest.mark.component  # DeepSpeed on one gloo rank
def test_the_ptx_term_adds_exactly_its_coefficient_times_the_cross_entropy(tiny_model, monkeypatch):
    coef = 0.7
    objective = PolicyGradient(LossSpec(), on_policy=True)
    with_ptx = engine(tiny_model, objective, ptx=NextToken(prefix="actor/ptx_"), ptx_coef=coef)
    table, ptx = rollout(), sft_table(ROWS)
    seen = []
    monkeypatch.setattr(
        Engine, "_backward", lambda self, engine, loss: seen.append(loss.item()) or False
    )
    # no step: backward is stubbed, so the weights stay and the two calls see the same model
    metrics = with_ptx.train(table, ptx=ptx)
    without = with_ptx.train(table)
    total, count = full_forward_nll(with_ptx.modules["actor"], ROWS)
    assert metrics["actor/ptx_loss"] == pytest.approx(total / count, rel=1e-5)
    assert "actor/ptx_loss" not in without
    assert len(seen) == 2  # one micro-batch each
    assert seen[0] - seen[1] == pytest.approx(coef * total / count, rel=1e-5)


@pytest.mark.component  # DeepSpeed on one gloo rank
def test_reward_model_training_shift_and_export(tiny_model, tmp_path):
    from reward_service.reward_model import RewardModel  # what an RL run's reward actor loads

    groups = [
        ([5, 1], [[3, 0], [4, 4, 0], [7, 0]], [(0, 1, 0.5), (0, 2, 0.0), (1, 2, 0.0)]),
        ([6, 2], [[2, 0], [8, 0]], [(1, 0, 0.0)]),
    ]
    table = group_table(groups)
    learner = engine(tiny_model, PairwiseRanking(reg=0.01), lr=3e-3)
    assert set(learner.engines) == {"rm"} and learner.sender is None
    first = learner.train(table)
    for _ in range(30):
        last = learner.train(table)
    assert last["rm/loss"] < first["rm/loss"] and last["rm/accuracy"] == 1.0
    scores = learner.score(table)
    assert [len(s) for s in scores] == [3, 2]
    assert scores[0][0] > scores[0][1] > scores[0][2] and scores[1][1] > scores[1][0]
    learner.shift_rm_bias(-1.25)
    shifted = learner.score(table)
    assert np.allclose(np.concatenate(shifted), np.concatenate(scores) - 1.25, atol=1e-5)

    out = tmp_path / "rm"
    learner.save_policy(str(out))
    assert (out / "value_head.safetensors").is_file() and (out / "model.safetensors").is_file()
    # the reward actor of an RL run scores the export as the engine did
    served = RewardModel(str(out)).score_ids([[5, 1, *r] for r in groups[0][1]])
    assert np.allclose(served, shifted[0], atol=1e-4)
    # and a critic starts from it (learner.critic_init): the same scores at the last token
    critic = CriticModel.from_pretrained(str(out)).eval()
    with torch.no_grad():
        values = critic(torch.tensor([[5, 1, 3, 0]]), torch.ones(1, 4), torch.arange(4)[None])
    assert values[0, -1].item() == pytest.approx(shifted[0][0], abs=1e-4)


@pytest.mark.unit
def test_cross_entropy_reference_is_the_models_own(model):
    # the hand reference above uses the model's forward; check it against F.cross_entropy once
    prompt, response, _ = ROWS[0]
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0]
    ce = F.cross_entropy(logits[len(prompt) - 1 : -1], torch.tensor(response), reduction="sum")
    total, _ = full_forward_nll(model, [(prompt, response, [1.0] * len(response))])
    assert ce.item() == pytest.approx(total, rel=1e-5)


@pytest.mark.component  # DeepSpeed on one gloo rank
@pytest.mark.parametrize("family", list(FAMILY_MATRIX))
def test_every_model_family_packs_like_it_pads_and_its_reward_model_export_scores_the_same(
    tmp_path, family
):
    # Tied output heads and grouped-query attention change how the body, the head and the
    # export line up; each shape of the model-family matrix goes through the supervised paths.
    from orchestration.data import addition_corpus
    from orchestration.tiny_model import build_tiny_model
    from reward_service.reward_model import RewardModel

    path = build_tiny_model(str(tmp_path / "m"), addition_corpus(4), FAMILY_MATRIX[family])
    model = load_causal_lm(path).eval()
    total, count = full_forward_nll(model, ROWS)
    for packing in ("never", "always"):
        objective = NextToken(packing=packing)
        micro = objective.collate(sft_table(ROWS), 0)
        counts = Counts(micro.tokens, micro.sequences)
        loss, _ = objective.micro_loss(
            "actor", {"actor": model}, micro.batch, micro.mask, counts, {}
        )
        assert loss.item() == pytest.approx(total / count, rel=1e-5), packing

    groups = [([5, 1], [[3, 0], [4, 4, 0]], [(0, 1, 0.0)])]
    learner = engine(path, PairwiseRanking(), lr=3e-3)
    for _ in range(3):
        learner.train(group_table(groups))
    scores = learner.score(group_table(groups))[0]
    learner.save_policy(str(tmp_path / "rm"))
    served = RewardModel(str(tmp_path / "rm")).score_ids([[5, 1, *r] for r in groups[0][1]])
    assert np.allclose(served, scores, atol=1e-4)
