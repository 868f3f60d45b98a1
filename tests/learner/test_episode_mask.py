"""The per-token loss mask of multi-turn episodes, by hand: a built two-turn episode (model
turn, observation, model turn) trains on the model's tokens only. The loss and its gradient
equal a reference computed from a plain forward of the whole sequence over the model's
positions, nothing the observation tokens carry (advantages, old log-probabilities, values)
moves the loss, GAE chains the model's turns across the observation, and ``validate`` names the
row and column of a malformed mask."""

from __future__ import annotations

import pyarrow as pa
import pytest
import torch

from learner.algorithms import AdvantageInputs, compute_advantages, gae, token_rewards
from learner.models import load_causal_lm
from learner.objectives import Counts, LossSpec, PolicyGradient
from orchestration.advantages import AdvantageSpec, advantages
from rollout import GeneratedSample, build_rollout_table
from rollout import schema as S
from rollout.build import EpisodeRecord
from rollout.tensors import model_token_mask
from rollout.validate import RolloutValidationError, validate

pytestmark = pytest.mark.unit  # pure code in this process

PROMPT = [5, 1, 6]
# model turn [3, 2], observation [7, 8], model turn [4, 1]
RESPONSE = [3, 2, 7, 8, 4, 1]
MASK = [1.0, 1.0, 0.0, 0.0, 1.0, 1.0]
MODEL = torch.tensor(MASK) > 0


def episode_table(rows: int = 2, advantage_on_observations: float = 0.0) -> pa.Table:
    samples = [
        GeneratedSample(
            i,
            0,
            PROMPT,
            RESPONSE,
            [-1.0, -2.0, 0.0, 0.0, -1.5, -0.5],
            "stop",
            episode=EpisodeRecord(MASK, turns=2, tool_calls=1, end="done", reward=1.0),
        )
        for i in range(rows)
    ]
    table = build_rollout_table(samples, weight_version=0)
    adv = [0.5, -1.0, advantage_on_observations, advantage_on_observations, 2.0, 1.0]
    extra = {
        S.ADVANTAGES: [adv] * rows,
        S.REF_LOGPROBS: [[-1.0] * 6] * rows,
        S.SCORE: pa.array([1.0] * rows, pa.float32()),
    }
    for name, values in extra.items():
        table = table.append_column(S.KNOWN_FIELDS[name], pa.array(values, S.expected_type(name)))
    return table


def plain_logprobs(model, ids: list[int]) -> torch.Tensor:
    """(6,) log-probability of each response token given all before it, a plain forward."""
    logits = model(torch.tensor([PROMPT + RESPONSE])).logits[0].float()
    logprobs = logits.log_softmax(-1)[len(PROMPT) - 1 : -1]
    return logprobs.gather(-1, torch.tensor(RESPONSE)[:, None])[:, 0]


def on_policy_loss(model, table: pa.Table) -> tuple[torch.Tensor, Counts]:
    goal = PolicyGradient(LossSpec(), on_policy=True)
    micro = goal.collate(table, pad_token_id=0)
    counts = Counts(micro.tokens, micro.sequences)
    loss, _ = goal.micro_loss("actor", {"actor": model}, micro.batch, micro.mask, counts, {})
    return loss, counts


def test_the_loss_and_gradient_come_from_the_models_tokens_only(tiny_model):
    torch.manual_seed(0)
    model = load_causal_lm(tiny_model)
    table = episode_table(rows=2)
    loss, counts = on_policy_loss(model, table)
    assert counts == Counts(tokens=8.0, sequences=2.0)  # 4 model tokens per row, not 6
    loss.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()

    # Reference: token-mean of -A_t * exp(lp_t - sg(lp_t)) over the model's 4 tokens of each
    # of the 2 rows (the ratio is 1 in value, its gradient that of lp_t).
    lp = plain_logprobs(model, PROMPT + RESPONSE)
    adv = torch.tensor([0.5, -1.0, 0.0, 0.0, 2.0, 1.0])
    ratio = torch.exp(lp - lp.detach())
    reference = 2 * (-(adv * ratio)[MODEL].sum()) / 8.0
    reference.backward()
    assert float(loss) == pytest.approx(float(reference), abs=1e-6)
    assert float(loss) == pytest.approx(-(0.5 - 1.0 + 2.0 + 1.0) / 4, abs=1e-6)
    for name, p in model.named_parameters():
        if p.grad is not None:
            assert torch.allclose(got[name], p.grad, atol=1e-6), name


def test_what_the_observation_tokens_carry_moves_no_loss(tiny_model):
    model = load_causal_lm(tiny_model)
    with torch.no_grad():
        zero, _ = on_policy_loss(model, episode_table(advantage_on_observations=0.0))
        huge, _ = on_policy_loss(model, episode_table(advantage_on_observations=1e6))
    assert float(zero) == float(huge)


def test_gae_chains_the_model_turns_across_the_observation():
    # Tokens: m0 m1 o o m2 m3 (model tokens at 0, 1, 4, 5). gamma = 1, lam = 1: the advantage of
    # a model token is the sum of the rewards from it on (observations carry none) minus its
    # value; the returns are the rewards to go. Reward 1 on the last token, values 0.1..0.4 on
    # the model tokens (and 9 on the observation slots, which must be ignored):
    #   A(m3) = 1 - 0.4 = 0.6; A(m2) = 0 + V(m3) - V(m2) + A(m3) - ... = 1 - 0.3 = 0.7
    #   A(m1) = 1 - 0.2 = 0.8 (its next value is V(m2), past the observation); A(m0) = 0.9
    rewards = torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.0, 1.0]])
    values = torch.tensor([[0.1, 0.2, 9.0, 9.0, 0.3, 0.4]])
    mask = torch.tensor([MASK]) > 0
    adv, returns = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    assert torch.allclose(adv, torch.tensor([[0.9, 0.8, 0.0, 0.0, 0.7, 0.6]]))
    assert torch.allclose(returns, torch.tensor([[1.0, 1.0, 0.0, 0.0, 1.0, 1.0]]))
    # gamma = 0.5, lam = 1, the same: A(m3) = 0.6; A(m2) = 0.5 * 1 - 0.3 = 0.2;
    # A(m1) = 0.25 - 0.2 = 0.05; A(m0) = 0.125 - 0.1 = 0.025 (one discount per model token)
    adv, _ = gae(rewards, values, mask, gamma=0.5, lam=1.0)
    assert torch.allclose(adv, torch.tensor([[0.025, 0.05, 0.0, 0.0, 0.2, 0.6]]))


def test_the_score_lands_on_the_last_model_token():
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0, 1.0, 0.0]]) > 0  # an episode cut after a turn
    rewards = token_rewards(torch.tensor([2.0]), torch.zeros(1, 6), mask, kl_coef=0.1)
    assert rewards.tolist() == [[0.0, 0.0, 0.0, 0.0, 2.0, 0.0]]


def test_the_advantages_stage_gives_observations_nothing():
    table = episode_table(rows=4).drop_columns([S.ADVANTAGES])
    table = table.append_column(S.KNOWN_FIELDS[S.OLD_LOGPROBS], table[S.REF_LOGPROBS])
    scores = pa.array([1.0, 0.0, 1.0, 0.0], pa.float32())
    table = table.set_column(table.schema.get_field_index(S.SCORE), S.KNOWN_FIELDS[S.SCORE], scores)
    table = table.set_column(
        table.schema.get_field_index(S.PROMPT_ID),
        S.KNOWN_FIELDS[S.PROMPT_ID],
        pa.array([0, 0, 1, 1], pa.int64()),
    )
    table = table.set_column(
        table.schema.get_field_index(S.SAMPLE_INDEX),
        S.KNOWN_FIELDS[S.SAMPLE_INDEX],
        pa.array([0, 1, 0, 1], pa.int32()),
    )
    spec = AdvantageSpec(estimator="grpo", kl_in_reward=False, needs_critic=False, kl_kind="k3")
    out = advantages(table, spec, kl_coef=0.0, version=0)
    for row in out.table[S.ADVANTAGES].to_pylist():
        assert row[2] == row[3] == 0.0 and row[0] != 0.0
    assert out.metrics["episode/model_tokens"] == 16.0
    assert out.metrics["episode/observation_tokens"] == 8.0
    assert out.metrics["episode/tool_call_rate"] == 1.0
    assert out.metrics["episode/end/done"] == 1.0


def test_group_estimators_broadcast_only_onto_the_models_tokens():
    mask = torch.tensor([MASK, MASK]) > 0
    inputs = AdvantageInputs(
        response_mask=mask, scores=torch.tensor([1.0, 0.0]), group_ids=torch.tensor([0, 0])
    )
    adv, _ = compute_advantages("grpo", inputs)
    assert (adv[:, 2:4] == 0).all() and (adv[:, [0, 1, 4, 5]] != 0).all()


def test_model_token_mask_reads_the_column():
    table = episode_table(rows=1)
    padded = torch.ones(1, 7, dtype=torch.bool)
    padded[0, 6] = False
    assert model_token_mask(table, padded).tolist() == [MASK_BOOL + [False]]


MASK_BOOL = [m > 0 for m in MASK]


@pytest.mark.parametrize(
    "mask, message",
    [
        ([1.0, 1.0, 0.5, 0.0, 1.0, 1.0], "holds 0.5"),
        ([0.0, 1.0, 0.0, 0.0, 1.0, 1.0], "starts with an observation token"),
        ([1.0, 1.0, 0.0, 0.0, 1.0], "has 5 entries but the response has 6 tokens"),
    ],
)
def test_validate_names_the_row_and_column_of_a_malformed_mask(mask, message):
    good = episode_table(rows=3)
    masks = good[S.LOSS_MASK].to_pylist()
    masks[2] = mask
    bad = good.set_column(
        good.schema.get_field_index(S.LOSS_MASK),
        S.KNOWN_FIELDS[S.LOSS_MASK],
        pa.array(masks, S.PER_TOKEN_TYPE),
    )
    validate(good)
    with pytest.raises(RolloutValidationError, match=message) as caught:
        validate(bad)
    assert caught.value.column == S.LOSS_MASK and caught.value.row == 2
