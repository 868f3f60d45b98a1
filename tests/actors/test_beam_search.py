"""Beam search in the generator (RRHF candidates, not RL samples): on the tiny model, each prompt
gets ``width`` distinct beams ranked by cumulative log-probability, as a transformers forward of
the same weights scores them, and the best beam is at least as likely as the greedy response.
The pool splits prompts over replicas and keeps prompt order (stub engines as Ray actors)."""

from __future__ import annotations

import types

import pyarrow as pa
import pytest
import torch

from actors.generator import LANES, PolicyGenerator, StaleWeightsError
from actors.vllm_engine import EngineSpec, Sampling
from rollout import schema as S
from rollout.build import GeneratedSample
from rollout.validate import validate
from tests.actors.helpers import token_logprobs

WIDTH, NEW_TOKENS = 3, 8
TOL = 1e-4  # vLLM's and transformers' float32 log-probabilities agree to ~1e-6 here


def prompt_table() -> pa.Table:
    return pa.table(
        {
            S.PROMPT_ID: pa.array([10, 11, 12], pa.int64()),
            S.PROMPT_TOKEN_IDS: pa.array([[3, 5, 7, 9], [4, 2], [6]], S.TOKEN_IDS_TYPE),
            "label": pa.array(["a", "b", "c"]),
        }
    )


@pytest.fixture(scope="module")
def generator(tiny_model) -> PolicyGenerator:
    return PolicyGenerator(
        EngineSpec(model_path=tiny_model, max_model_len=64, kv_cache_bytes=32 << 20)
    )


@pytest.fixture(scope="module")
def hf_model(tiny_model):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model).float().eval()


@pytest.mark.component
def test_beams_are_distinct_ranked_and_at_least_as_likely_as_greedy(
    generator, hf_model, tiny_model
):
    from transformers import AutoTokenizer

    eos = AutoTokenizer.from_pretrained(tiny_model).eos_token_id
    prompts = prompt_table()
    table = validate(generator.beam_search(prompts, WIDTH, NEW_TOKENS, expected_version=0))
    greedy = generator.generate(prompts, Sampling(temperature=0.0, max_new_tokens=NEW_TOKENS))
    assert table.schema == greedy.schema  # the rollout schema, no extra column
    assert table.num_rows == WIDTH * prompts.num_rows

    greedy_rows = {r[S.PROMPT_ID]: r for r in greedy.to_pylist()}
    rows = table.to_pylist()
    for p, prompt in enumerate(prompts.to_pylist()):
        beams = rows[p * WIDTH : (p + 1) * WIDTH]  # prompt-major
        assert [b[S.PROMPT_ID] for b in beams] == [prompt[S.PROMPT_ID]] * WIDTH
        assert [b[S.SAMPLE_INDEX] for b in beams] == list(range(WIDTH))
        assert [b["label"] for b in beams] == [prompt["label"]] * WIDTH
        assert {b[S.WEIGHT_VERSION] for b in beams} == {0}
        responses = [tuple(b[S.RESPONSE_TOKEN_IDS]) for b in beams]
        assert len(set(responses)) == WIDTH, responses

        sums = []
        for b in beams:
            response = b[S.RESPONSE_TOKEN_IDS]
            assert b[S.PROMPT_TOKEN_IDS] == prompt[S.PROMPT_TOKEN_IDS]  # response holds new tokens
            assert 1 <= len(response) <= NEW_TOKENS
            ended = response[-1] == eos
            assert b[S.FINISH_REASON] == ("stop" if ended else "length")
            assert ended or len(response) == NEW_TOKENS
            ours = token_logprobs(hf_model, b[S.PROMPT_TOKEN_IDS], response)
            # rollout_logprobs: the policy's per-token log-probabilities at temperature 1.
            assert (ours - torch.tensor(b[S.ROLLOUT_LOGPROBS])).abs().max().item() < TOL
            sums.append(ours.sum().item())
        assert all(a >= b - TOL for a, b in zip(sums, sums[1:], strict=False)), sums  # best first

        g = greedy_rows[prompt[S.PROMPT_ID]]
        greedy_sum = token_logprobs(hf_model, g[S.PROMPT_TOKEN_IDS], g[S.RESPONSE_TOKEN_IDS])
        assert sums[0] >= greedy_sum.sum().item() - TOL, (sums[0], greedy_sum.sum().item())


@pytest.mark.component
def test_beam_search_refuses_a_stale_version_and_an_oversized_width(generator):
    with pytest.raises(StaleWeightsError, match="serves weight version 0"):
        generator.beam_search(prompt_table(), WIDTH, NEW_TOKENS, expected_version=1)
    with pytest.raises(ValueError, match="between 1 and 6"):  # 2 * width <= the vocabulary, 12
        generator.beam_search(prompt_table(), 7, NEW_TOKENS)


# ---------------------------------------------------------------------------------------------
# The pool: prompts split over replicas, one table back in prompt order (engines stubbed).


class _StubEngine:
    """Beam r of a prompt answers [first prompt token, r] with log-probability -(r + 1)."""

    def beam_search(self, prompt_ids, prompt_indices, width, max_new_tokens):
        return [
            GeneratedSample(i, r, list(ids), [ids[0], r], [-(r + 1.0), 0.0], "length")
            for i, ids in zip(prompt_indices, prompt_ids, strict=True)
            for r in range(width)
        ]


class _StubGenerator(PolicyGenerator):
    def __init__(self, version: int):
        super().__init__(None, initial_version=version, engine=_StubEngine())


@pytest.mark.slow  # Ray actors
def test_the_pool_splits_prompts_over_replicas_and_keeps_their_order(ray_driver):
    from orchestration.generators import Faults, GeneratorPool

    ray = ray_driver
    actor = ray.remote(num_cpus=0, concurrency_groups=LANES)(_StubGenerator)
    gens = [actor.remote(0), actor.remote(0)]
    pool = GeneratorPool(types.SimpleNamespace(generators=gens), None, Faults(), timeout=60)
    prompts = prompt_table()
    table = ray.get(pool.beam_search(prompts, 2, NEW_TOKENS), timeout=60)
    assert table.column(S.PROMPT_ID).to_pylist() == [10, 10, 11, 11, 12, 12]
    assert table.column(S.SAMPLE_INDEX).to_pylist() == [0, 1] * 3
    assert table.column("label").to_pylist() == ["a", "a", "b", "b", "c", "c"]
    assert [r[0] for r in table.column(S.RESPONSE_TOKEN_IDS).to_pylist()] == [3, 3, 4, 4, 6, 6]

    pool.version = 1  # the replicas serve 0: the version check refuses
    with pytest.raises(StaleWeightsError):
        pool.beam_search(prompts, 2, NEW_TOKENS)
