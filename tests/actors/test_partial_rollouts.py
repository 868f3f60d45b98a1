"""Partial rollouts on a real vLLM engine (CPU, in this process), for every model family of
the matrix: a weight update that arrives in the middle of a generation applies from the next
token on. The tokens sampled before it are kept, each token records the version that sampled
it, and each token's ``rollout_logprobs`` is that version's log-probability given everything
before it (a transformers forward of that version's weights), so the continuation really ran
on the new weights and recomputed the prefix with them."""

from __future__ import annotations

import threading
import time

import pyarrow as pa
import pytest
import torch

from actors.generator import SAMPLE_SEED, PolicyGenerator, StaleWeightsError
from actors.vllm_engine import EngineSpec, Sampling
from orchestration.tiny_model import FAMILY_MATRIX
from rollout import schema as S
from tests.actors.helpers import assert_switched, update_mid_generation

pytestmark = pytest.mark.component  # an in-process vLLM engine per model family

PROMPTS = pa.table(
    {
        "prompt_id": pa.array([10, 11], pa.int64()),
        "prompt_token_ids": pa.array([[3, 5, 7, 9], [4, 2]], pa.list_(pa.int32())),
        SAMPLE_SEED: pa.array([100, 200], pa.int64()),
    }
)
CONTINUING = Sampling(n=3, max_new_tokens=96, ignore_eos=True, continue_across_updates=True)


@pytest.mark.parametrize("family", list(FAMILY_MATRIX))
def test_an_update_mid_generation_applies_from_the_next_token(family_models, family):
    from transformers import AutoModelForCausalLM

    path = family_models[family]
    old = AutoModelForCausalLM.from_pretrained(path).float().eval()
    new = AutoModelForCausalLM.from_pretrained(path).float().eval()
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in new.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    generator = PolicyGenerator(
        EngineSpec(model_path=path, max_model_len=128, kv_cache_bytes=32 << 20)
    )
    out = update_mid_generation(generator, 1, new.state_dict(), PROMPTS, CONTINUING)
    table = out["table"]
    # The update did not wait for the generation to end.
    assert out["generation_running_after_update"]
    assert generator.weight_version() == 1
    assert table.column_names[: len(S.GENERATOR_FIELDS)] == [f.name for f in S.GENERATOR_FIELDS]
    assert table.num_rows == 6 and set(table.column(S.WEIGHT_VERSION).to_pylist()) == {0}
    assert_switched(table, old, new, CONTINUING.max_new_tokens, 1e-4)

    # A continuing generation may start on a newer version than the driver saw (an update
    # reached the replica first); an older one is a restarted replica, refused.
    assert generator.generate(PROMPTS, CONTINUING, expected_version=0).num_rows == 6
    with pytest.raises(StaleWeightsError):
        generator.generate(PROMPTS, CONTINUING, expected_version=2)
    with pytest.raises(StaleWeightsError):
        generator.generate(PROMPTS, Sampling(n=1, max_new_tokens=4), expected_version=0)


def test_a_load_that_fails_mid_generation_fails_both_and_leaves_the_engine_clean(family_models):
    """The load's error reaches the caller that asked for it, the generation stops with it (its
    weights are in doubt), and no request of it stays in the engine for the next call."""
    generator = PolicyGenerator(
        EngineSpec(
            model_path=family_models["qwen2-untied"], max_model_len=128, kv_cache_bytes=32 << 20
        )
    )
    failed: dict = {}

    def generate() -> None:
        try:
            generator.generate(PROMPTS, CONTINUING)
        except RuntimeError as e:
            failed["generation"] = e

    def broken_load():
        raise ValueError("the sync group is gone")

    thread = threading.Thread(target=generate)
    thread.start()
    while not generator._takes_updates and thread.is_alive():
        time.sleep(0.001)
    with pytest.raises(ValueError, match="the sync group is gone"):
        generator._exclusive(broken_load)
    thread.join(timeout=120)
    assert "in the middle of a generation" in str(failed["generation"])
    assert isinstance(failed["generation"].__cause__, ValueError)
    assert not generator.engine.llm.llm_engine.has_unfinished_requests()
    table = generator.generate(PROMPTS, Sampling(n=2, max_new_tokens=4, seed=3))
    assert table.num_rows == 4 and generator.weight_version() == 0
