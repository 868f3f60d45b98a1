"""Multi-turn episodes on a real vLLM engine (CPU, in this process), for every model family of
the matrix: the response is the model's turns and the environment's observations as one token
sequence, the observations tokenized once and appended as they are (``loss_mask`` 0,
log-probability 0), the model's tokens exactly those vLLM sampled, each with the log-probability
a transformers forward of the whole sequence gives it; and a hung environment is cut at its
limit while the other episodes go on."""

from __future__ import annotations

import re
import time

import pyarrow as pa
import pytest
import torch

from actors.episodes import EpisodeSpec
from actors.generator import SAMPLE_SEED, PolicyGenerator
from actors.vllm_engine import EngineSpec, Sampling
from orchestration.tiny_model import FAMILY_MATRIX
from rollout import schema as S
from tests.actors.helpers import OBSERVATION, TWO_TURNS, token_logprobs

PROMPTS = pa.table(
    {
        "prompt_id": pa.array([10, 11], pa.int64()),
        "prompt_token_ids": pa.array([[3, 5, 7, 9], [4, 2]], pa.list_(pa.int32())),
        SAMPLE_SEED: pa.array([100, 200], pa.int64()),
        "label": ["a", "b"],
    }
)


@pytest.mark.component
@pytest.mark.parametrize("family", list(FAMILY_MATRIX))
def test_two_turn_episode_keeps_token_ids_and_masks_the_observation(family, family_models):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = family_models[family]
    generator = PolicyGenerator(EngineSpec(model_path=path, max_model_len=64, kv_cache_bytes=2**25))
    tokenizer = AutoTokenizer.from_pretrained(path)
    observation = tokenizer.encode(OBSERVATION, add_special_tokens=False)
    sampling = Sampling(n=2, max_new_tokens=6, episodes=TWO_TURNS)
    table = generator.generate(PROMPTS, sampling, expected_version=0)

    model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32)
    rows = table.to_pylist()
    assert len(rows) == 4
    for row in rows:
        mask, response = row[S.LOSS_MASK], row[S.RESPONSE_TOKEN_IDS]
        assert len(mask) == len(response) == len(row[S.ROLLOUT_LOGPROBS])
        # model turn, observation, model turn: the mask has exactly one gap, the observation's
        # ids exactly as tokenized once (never re-encoded together with the model's tokens)
        first = mask.index(0.0)
        gap = len(observation)
        assert mask == [1.0] * first + [0.0] * gap + [1.0] * (len(mask) - first - gap)
        assert response[first : first + gap] == observation
        assert row[S.TURNS] == 2 and row[S.EPISODE_END] == "done"
        assert row[S.EPISODE_REWARD] == pytest.approx(1.25)
        assert row[S.TOOL_CALLS] == 0
        # the episode's finish reason is its last turn's: EOS, or the turn's token limit
        ended_with_eos = response[-1] == tokenizer.eos_token_id
        assert row[S.FINISH_REASON] == ("stop" if ended_with_eos else "length")
        # each model token's log-probability is the policy's given everything before it,
        # observation included: vLLM conditioned on these very ids
        expected = token_logprobs(model, row[S.PROMPT_TOKEN_IDS], response)
        got = torch.tensor(row[S.ROLLOUT_LOGPROBS])
        model_tokens = torch.tensor(mask) > 0
        assert torch.allclose(got[model_tokens], expected[model_tokens], atol=1e-4)
        assert (got[~model_tokens] == 0).all()


@pytest.fixture(scope="module")
def untied(family_models) -> PolicyGenerator:
    """One engine of the demo's shape for the tests below."""
    path = family_models["qwen2-untied"]
    return PolicyGenerator(EngineSpec(model_path=path, max_model_len=64, kv_cache_bytes=2**25))


@pytest.mark.component
def test_a_hung_environment_is_cut_at_its_limit_and_the_others_go_on(untied):
    generator = untied
    spec = EpisodeSpec(
        environment="tests.actors.helpers:TwoTurns",
        params={"hang_on_label": "b"},
        max_turns=4,
        max_tokens=40,
        timeout_s=1.0,
    )
    start = time.perf_counter()
    table = generator.generate(PROMPTS, Sampling(n=2, max_new_tokens=6, episodes=spec))
    elapsed = time.perf_counter() - start
    assert elapsed < 10.0  # not the 60 s the environment sleeps
    rows = table.to_pylist()
    hung = [r for r in rows if r["label"] == "b"]
    fine = [r for r in rows if r["label"] == "a"]
    assert [r[S.EPISODE_END] for r in hung] == ["environment:timeout"] * 2
    assert all(r[S.TURNS] == 1 and 0.0 not in r[S.LOSS_MASK] for r in hung)
    assert [r[S.EPISODE_END] for r in fine] == ["done"] * 2
    assert all(r[S.TURNS] == 2 for r in fine)


@pytest.mark.component
def test_episode_limits_end_episodes(untied):
    """``max_turns`` ends an episode whose environment would go on; ``max_tokens`` one that
    has no room for the next observation."""
    generator = untied
    one_turn = EpisodeSpec(environment=TWO_TURNS.environment, max_turns=1, max_tokens=40)
    rows = generator.generate(PROMPTS, Sampling(n=1, max_new_tokens=6, episodes=one_turn))
    assert set(rows[S.EPISODE_END].to_pylist()) == {"max_turns"}
    assert set(rows[S.FINISH_REASON].to_pylist()) == {"length"}
    assert all(0.0 not in m for m in rows[S.LOSS_MASK].to_pylist())
    short = EpisodeSpec(environment=TWO_TURNS.environment, max_turns=4, max_tokens=7)
    rows = generator.generate(PROMPTS, Sampling(n=1, max_new_tokens=6, episodes=short))
    assert set(rows[S.EPISODE_END].to_pylist()) == {"max_tokens"}
    assert all(len(r) <= 7 for r in rows[S.RESPONSE_TOKEN_IDS].to_pylist())


@pytest.mark.slow  # Ray actors
def test_an_environment_in_its_own_actor_is_restarted_when_it_hangs_or_dies(ray_driver, untied):
    """``isolation: actor``: a hung call gets the environment's actor killed and restarted, and
    an environment that ends its process loses its episodes, not the generator (this test's
    own process here: in a thread it would have ended pytest)."""
    generator = untied

    def run(mode: str) -> list[dict]:
        spec = EpisodeSpec(
            environment="tests.actors.helpers:Misbehaves",
            params={"mode": mode},
            max_tokens=40,
            timeout_s=2.0,
            isolation="actor",
        )
        table = generator.generate(PROMPTS, Sampling(n=2, max_new_tokens=6, episodes=spec))
        return table.to_pylist()

    start = time.perf_counter()
    rows = run("hang")
    assert time.perf_counter() - start < 30  # not the 60 s the environment sleeps
    assert [r[S.EPISODE_END] for r in rows if r["label"] == "b"] == ["environment:timeout"] * 2
    assert [r[S.EPISODE_END] for r in rows if r["label"] == "a"] == ["done"] * 2
    rows = run("exit")
    assert [r[S.EPISODE_END] for r in rows if r["label"] == "b"] == ["environment:lost"] * 2
    # the actor came back: the next batch's good episodes run to their end
    rows = run("exit")
    assert all(r[S.EPISODE_END] in ("done", "environment:lost") for r in rows if r["label"] == "a")


@pytest.mark.component
def test_the_guessing_game_answers_each_guess_through_the_engine(tmp_path):
    """The built-in game end to end on the generator: every observation is the game's answer to
    the guess before it, and an episode ends when the guess is right (reward 1 less 0.1 per
    earlier guess) or at a limit (reward 0)."""
    from transformers import AutoTokenizer

    from orchestration.data import builtin_corpus, guess_examples
    from orchestration.tiny_model import build_tiny_model

    path = build_tiny_model(str(tmp_path / "guess"), builtin_corpus("builtin:guess", 4))
    tokenizer = AutoTokenizer.from_pretrained(path)
    generator = PolicyGenerator(EngineSpec(model_path=path, max_model_len=64, kv_cache_bytes=2**25))
    (prompt, secret), (prompt2, secret2) = guess_examples()[2], guess_examples()[5]
    prompts = pa.table(
        {
            "prompt_id": pa.array([0, 1], pa.int64()),
            "prompt_token_ids": pa.array(
                [tokenizer.encode(p) for p in (prompt, prompt2)], pa.list_(pa.int32())
            ),
            SAMPLE_SEED: pa.array([1, 2], pa.int64()),
            "label": [secret, secret2],
        }
    )
    spec = EpisodeSpec(environment="guess_number", max_turns=4, max_tokens=40)
    rows = generator.generate(prompts, Sampling(n=8, max_new_tokens=3, episodes=spec)).to_pylist()
    answers = {" higher\n", " lower\n", " say a number\n"}
    for row in rows:
        secret = int(row["label"])
        ids, mask = row[S.RESPONSE_TOKEN_IDS], row[S.LOSS_MASK]
        turns = []  # (model's, text) in order
        for token, m in zip(ids, mask, strict=True):
            if not turns or turns[-1][0] != (m > 0):
                turns.append((m > 0, []))
            turns[-1][1].append(token)
        texts = [(model, tokenizer.decode(t, skip_special_tokens=True)) for model, t in turns]
        assert row[S.TURNS] == sum(model for model, _ in texts)
        for (_, guess), (model, answer) in zip(texts[::2], texts[1::2], strict=False):
            assert not model and answer in answers
            numbers = [int(n) for n in re.findall(r"-?\d+", guess)]
            expected = (
                " say a number\n"
                if not numbers
                else " higher\n"
                if numbers[-1] < secret
                else " lower\n"
            )
            assert answer == expected, (guess, secret)
        if row[S.EPISODE_END] == "done":
            assert row[S.EPISODE_REWARD] == pytest.approx(1.0 - 0.1 * (row[S.TURNS] - 1))
        else:
            assert row[S.EPISODE_END] in ("max_turns", "max_tokens")
            assert row[S.EPISODE_REWARD] == 0.0
    assert {r[S.TURNS] for r in rows} != {1}  # the game went on past the first guess
