"""Two vLLM generator replicas as Ray actors (CPU), driven by the ``GeneratorPool`` as the
asynchronous loop drives them: a generation submitted ahead of training, then a weight update.

With partial rollouts the update reaches both replicas in the middle of their generations (it
returns while they still generate), and every row continues with the new weights from its
tokens so far (``token_versions``). With ``partial_rollouts: finish`` the update waits for the
generations submitted before it, which finish with the weights they started with. The weights
come from a stand-in for the learner rank (a plain actor holding a perturbed copy of the model):
the subject is the generators' lanes and the pool, not training."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pyarrow as pa
import pytest
import torch

from actors.generator import actor_class
from actors.vllm_engine import EngineSpec, Sampling
from rollout import schema as S

pytestmark = pytest.mark.slow
NEW_TOKENS = 120  # the tiny model has 128 positions
ROWS = 32  # prompts per generation: 120 steps of 32 samples per replica outlast an update


class WeightsHolder:
    """What ``WeightSync`` asks of a learner rank: its policy as host arrays."""

    def __init__(self, path: str):
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(path).float()
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for p in self.model.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.05)

    def sync_plan(self):
        from learner.weight_sync import describe, plan_buckets

        return plan_buckets(describe(dict(self.model.named_parameters())), 64 << 20)

    def policy_arrays(self):
        from learner.weight_sync import to_host_arrays

        return to_host_arrays(self.model.state_dict())


def prompts(rows: int) -> pa.Table:
    return pa.table(
        {
            S.PROMPT_ID: pa.array(range(rows), pa.int64()),
            S.PROMPT_TOKEN_IDS: pa.array(
                [[3, 5, 7][: 1 + i % 3] for i in range(rows)], S.TOKEN_IDS_TYPE
            ),
        }
    )


def under_way(gens, timeout: float = 60.0) -> None:
    """Until every replica is generating (a task's start takes its time on a busy machine)."""
    import ray

    deadline = time.monotonic() + timeout
    while not all(ray.get([g.generating.remote() for g in gens], timeout=timeout)):
        assert time.monotonic() < deadline, "the generations did not start"
        time.sleep(0.005)


def test_a_weight_update_reaches_generations_under_way_on_every_replica(ray_driver, tiny_model):
    from orchestration.generators import Faults, GeneratorPool
    from orchestration.sync import WeightSync

    ray = ray_driver
    spec = EngineSpec(model_path=tiny_model, max_model_len=128, kv_cache_bytes=64 << 20)
    gens = [actor_class().options(num_cpus=0).remote(spec) for _ in range(2)]
    holder = ray.remote(num_cpus=0)(WeightsHolder).remote(tiny_model)
    plan = ray.get(holder.sync_plan.remote(), timeout=300)
    actors = SimpleNamespace(generators=gens, learners=[holder], sync_plan=plan)
    sync = WeightSync(actors, 300, colocated=False, tp=1)
    pool = GeneratorPool(actors, sync, Faults(), timeout=300)
    assert ray.get([g.weight_version.remote() for g in gens], timeout=300) == [0, 0]
    warm = Sampling(n=1, max_new_tokens=4)  # an engine's first steps are slow (warm-up)
    ray.get(pool.generate(prompts(4), warm), timeout=300)

    # Partial rollouts: the update does not wait for the generations.
    continuing = Sampling(
        n=2, max_new_tokens=NEW_TOKENS, ignore_eos=True, continue_across_updates=True
    )
    began = time.perf_counter()
    submitted = pool.submit(prompts(ROWS), continuing)
    under_way(gens)
    start = time.perf_counter()
    pool.update()
    update_s = time.perf_counter() - start
    ready, _ = ray.wait(submitted.versions, num_returns=2, timeout=0)
    assert len(ready) < 2, "the update waited for the generations"
    table = ray.get(pool.collect(submitted, continuing), timeout=300)
    generation_s = time.perf_counter() - began
    assert table.num_rows == 2 * ROWS and table.column(S.PROMPT_ID).to_pylist() == [
        i for i in range(ROWS) for _ in range(2)
    ]
    assert set(table.column(S.WEIGHT_VERSION).to_pylist()) == {0}
    versions = table.column(S.TOKEN_VERSIONS).to_pylist()
    assert all(len(v) == NEW_TOKENS and v[0] == 0 and v[-1] == 1 for v in versions)
    assert ray.get([g.weight_version.remote() for g in gens], timeout=60) == [1, 1]

    # The loop's sync behind the rollout: the update runs in the driver's background, and
    # a generation submitted meanwhile starts once its replica serves the new version.
    assert pool.update(wait=False) == {}
    again = pool.submit(prompts(2), continuing)
    assert again.version == 2
    table = ray.get(pool.collect(again, continuing), timeout=300)
    assert set(table.column(S.WEIGHT_VERSION).to_pylist()) == {2}
    assert {t for v in table.column(S.TOKEN_VERSIONS).to_pylist() for t in v} == {2}
    assert pool.version == 2 and pool.take_sync_metrics()["sync/bytes"] > 0
    assert pool.take_sync_metrics() == {}  # reported once

    # partial_rollouts: finish: the update waits until the generations submitted before it
    # have finished, with the weights they started with.
    finishing = Sampling(n=2, max_new_tokens=NEW_TOKENS, ignore_eos=True)
    submitted = pool.submit(prompts(ROWS), finishing)
    under_way(gens)
    pool.update()
    ready, _ = ray.wait(submitted.versions, num_returns=2, timeout=0)
    assert len(ready) == 2
    table = ray.get(pool.collect(submitted, finishing), timeout=300)
    assert set(table.column(S.WEIGHT_VERSION).to_pylist()) == {2}
    assert S.TOKEN_VERSIONS not in table.column_names
    assert ray.get([g.weight_version.remote() for g in gens], timeout=60) == [3, 3]
    print(
        f"\npartial rollouts: the update took {update_s:.3f} s of the generations' "
        f"{generation_s:.2f} s"
    )


def test_two_replicas_dynamic_sampling_and_evaluation_run_k_ahead(head_env, tmp_path):
    """The loop with max_staleness=2 and partial rollouts on two generator replicas, with
    dynamic sampling (extra rounds come from the generations running ahead) and evaluation
    (sampled by the current weights between them): every row within the bound, each token's
    version recorded, the evaluations at their iterations."""
    import json

    import pyarrow.parquet as pq

    from tests.e2e.helpers import finished, train

    root = tmp_path / "runs"
    args = ["--config", "demo-async", f"logging.root={root}", "iterations=6"]
    args += ["max_staleness=2", "generator.num_replicas=2", "eval.source=builtin:addition"]
    args += ["eval.every=3", "eval.max_prompts=4", "data.prompts_per_iteration=8"]
    args += ["reward.dynamic_sampling.enabled=true", "reward.dynamic_sampling.max_rounds=2"]
    args += ["logging.rollouts_every=1", "logging.report=false", "logging.tensorboard=false"]
    summary, history = finished(train(args, head_env), root)
    steps = [h for h in history if "rollout/staleness_max" in h]
    assert [h["iteration"] for h in steps] == list(range(6))
    assert all(h["rollout/staleness_max"] <= 2 for h in steps)
    assert max(h["rollout/staleness_max"] for h in steps) == 2  # two batches ahead
    assert any(h["rollout/sampling_rounds"] > 1 for h in steps)  # rounds from the queue
    assert all(h["rollout/token_staleness_mean"] <= h["rollout/staleness_mean"] for h in steps)
    assert sorted(h["iteration"] for h in history if "eval/prompts" in h) == [0, 3, 6]
    run = root / "demo-async"
    for k in range(6):
        table = pq.read_table(run / "rollouts" / f"iter_{k:06d}.parquet").to_pylist()
        for row in table:
            versions = row["token_versions"]
            assert len(versions) == len(row["response_token_ids"])
            assert min(versions, default=row["weight_version"]) == row["weight_version"]
            assert k - row["weight_version"] <= 2
    assert json.loads((run / "summary.json").read_text())["iterations"] == 6
