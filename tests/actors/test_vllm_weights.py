"""A vLLM engine (CPU, in this process) takes new weights on every path and then computes with
them, for every model family of the matrix: the log-probabilities it samples with match a plain
transformers forward of the same weights. Tied output heads are the case that broke: vLLM's
reload refreshed the embedding but left the head computing with a prepacked copy of the old
weights (``actors.vllm_worker``)."""

from __future__ import annotations

import threading

import pytest
import torch

import actors.vllm_worker as vllm_worker
from actors.generator import PolicyGenerator, StaleKernelError
from actors.vllm_engine import EngineSpec, Sampling
from learner import weight_sync as W
from orchestration.tiny_model import FAMILY_MATRIX
from tests.helpers import free_port

pytestmark = pytest.mark.component  # an in-process vLLM engine per model family


def perturbed(model: torch.nn.Module, seed: int, scale: float = 0.05) -> None:
    """An update much larger than a training step's, to every parameter (the tied one once)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def mismatch(generator: PolicyGenerator, hf_model) -> float:
    """Largest |vLLM log-probability - transformers log-probability| over sampled tokens."""
    import pyarrow as pa

    prompts = pa.table(
        {
            "prompt_id": pa.array([0, 1], pa.int64()),
            "prompt_token_ids": pa.array([[3, 5, 7, 9], [4, 2]], pa.list_(pa.int32())),
        }
    )
    table = generator.generate(prompts, Sampling(n=4, max_new_tokens=8, seed=1))
    worst = 0.0
    for row in table.to_pylist():
        prompt, response = row["prompt_token_ids"], row["response_token_ids"]
        with torch.no_grad():
            logits = hf_model(torch.tensor([prompt + response])).logits[0]
        logprobs = logits.log_softmax(-1)[len(prompt) - 1 : -1]
        ours = logprobs.gather(-1, torch.tensor(response)[:, None])[:, 0]
        worst = max(worst, (ours - torch.tensor(row["rollout_logprobs"])).abs().max().item())
    return worst


def start(path: str) -> PolicyGenerator:
    return PolicyGenerator(EngineSpec(model_path=path, max_model_len=64, kv_cache_bytes=32 << 20))


@pytest.mark.parametrize("family", list(FAMILY_MATRIX))
def test_every_load_path_leaves_the_engine_on_the_new_weights(family_models, family):
    from transformers import AutoModelForCausalLM

    path = family_models[family]
    hf = AutoModelForCausalLM.from_pretrained(path).float()
    tied = FAMILY_MATRIX[family].tie_embeddings
    assert (hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()) == tied
    generator = start(path)
    assert mismatch(generator, hf) < 1e-4

    # Object store, resume and recovery pushes: the full state dict passed in the call.
    perturbed(hf, seed=1)
    generator.update_weights(1, hf.state_dict())
    assert mismatch(generator, hf) < 1e-4

    # The collective path: a gloo broadcast from a "learner" thread of this process.
    perturbed(hf, seed=2)
    params = dict(hf.named_parameters())  # the learner's plan: a tied weight appears once
    plan = W.plan_buckets(W.describe(params), bucket_bytes=1 << 16)  # several buckets
    assert ("lm_head.weight" in params) != tied
    port = free_port()
    sender: dict = {}

    def learner() -> None:
        group = W.open_group("127.0.0.1", port, 0, 2, device="cpu", timeout_s=60)
        sender["digest"] = W.Checksum()
        W.send(group, (W.pack(b, params, "cpu") for b in plan.buckets), sender["digest"])

    thread = threading.Thread(target=learner)
    thread.start()
    generator.open_sync_group("127.0.0.1", port, 1, 2, 60)
    version, digests = generator.receive_weights(2, plan, verify=True)
    thread.join(timeout=60)
    assert version == 2 and digests == [sender["digest"].hexdigest()]
    assert mismatch(generator, hf) < 1e-4


def test_a_stale_output_head_is_detected_and_refused(family_models, monkeypatch):
    """Without the re-processing of tied modules the head keeps the old weights: the load
    check names it, and the generator refuses to serve the version."""
    from transformers import AutoModelForCausalLM

    path = family_models["llama-tied"]
    hf = AutoModelForCausalLM.from_pretrained(path).float()
    generator = start(path)
    monkeypatch.setattr(vllm_worker, "refresh_shared", lambda tied, loaded: [])
    perturbed(hf, seed=3, scale=1e-5)  # a small update: a stale head is off by little
    # The parameters without the head's alias, as the collective plan sends them (with
    # "lm_head.weight" in the state dict, vLLM's Llama loads the head module itself).
    params = dict(hf.named_parameters())
    with pytest.raises(StaleKernelError, match=r"\['lm_head'\] still compute"):
        generator.update_weights(1, params)
    assert generator.weight_version() == 0
    assert mismatch(generator, hf) > 1e-5  # it is really serving something else
    monkeypatch.undo()
    generator.update_weights(1, params)
    assert mismatch(generator, hf) < 1e-4


def test_generation_on_any_thread_runs_the_sampler_eagerly(family_models):
    # Ray runs an actor's methods on threads of its own, and torch keeps the "no compile"
    # setting per thread: generating there traced and compiled vLLM's sampler helper (2-3 s of
    # every run's first iteration).
    import pyarrow as pa
    from torch._dynamo.utils import counters

    generator = start(next(iter(family_models.values())))
    torch._dynamo.reset()  # nothing compiled before, by any thread
    before = sum(counters["frames"].values())
    prompts = pa.table(
        {
            "prompt_id": pa.array([0], pa.int64()),
            "prompt_token_ids": pa.array([[3, 5, 7]], pa.list_(pa.int32())),
        }
    )
    tables = []
    thread = threading.Thread(
        target=lambda: tables.append(generator.generate(prompts, Sampling(n=2, max_new_tokens=4)))
    )
    thread.start()
    thread.join()
    assert tables and tables[0].num_rows == 2
    assert sum(counters["frames"].values()) == before  # dynamo saw no frame
