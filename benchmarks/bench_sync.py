"""Weight sync: the collective path against a raw broadcast of the same bytes, and the object store.

    .venv/bin/python benchmarks/bench_sync.py [--sizes 10 100] [--replicas 1] [--repeats 3]

For each model size (millions of parameters; a Qwen2-style model built locally), one learner rank
and ``--replicas`` vLLM generators run as Ray actors and open the weight-sync group. Then, between
those same processes and in the same run, it times (median of ``--repeats``):

- ``collective``: a full sync as the driver does it (learner packs buckets, broadcasts them, every
  generator worker receives and loads them into vLLM);
- ``no-load``: the same transfer (pack, bucketed broadcast, unpack) with vLLM's load left out;
- ``raw``: one ``broadcast`` of a flat buffer of the same number of bytes over the same group,
  from and into buffers allocated and touched beforehand, nothing else (the floor);
- ``raw fresh``: the same, into a receive buffer allocated for the call (what a receiver that
  keeps no spare copy of the model pays: on CPU, page faults on every byte);
- ``object_store``: the fallback (rank 0's state dict through Ray's object store, then loaded).

Prints a table and one JSON line. The target: collective at most 1.5x raw.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = {  # millions of parameters -> (hidden, intermediate, layers, heads)
    10: (256, 1024, 10, 4),
    100: (768, 2048, 14, 12),
}


def build_model(root: str, millions: int) -> str:
    from orchestration.data import addition_corpus
    from orchestration.tiny_model import TinyModelSpec, build_tiny_model

    hidden, inter, layers, heads = SHAPES[millions]
    spec = TinyModelSpec(
        hidden_size=hidden, intermediate_size=inter, num_layers=layers, num_heads=heads
    )
    return build_tiny_model(os.path.join(root, f"m{millions}"), addition_corpus(4), spec)


def _raw_send(nbytes: int):
    def run(actor_self) -> None:
        import torch

        # Allocated and touched once (the warm-up call), so the timed calls only broadcast.
        if getattr(actor_self, "_bench_buffer", None) is None:
            actor_self._bench_buffer = torch.ones(nbytes // 4, dtype=torch.float32)
        actor_self.learner.sender._group.broadcast(actor_self._bench_buffer).wait()

    return run


def _raw_receive(nbytes: int, fresh: bool):
    def on_worker(worker) -> None:
        import torch

        if fresh:  # a new receive buffer each time, as a receiver without a spare copy needs
            worker._bench_buffer = torch.empty(nbytes // 4, dtype=torch.float32)
        elif getattr(worker, "_bench_buffer", None) is None:
            worker._bench_buffer = torch.zeros(nbytes // 4, dtype=torch.float32)
        worker._raylign_group.broadcast(worker._bench_buffer).wait()
        assert float(worker._bench_buffer[-1]) == 1.0
        if fresh:
            worker._bench_buffer = None

    def run(actor_self) -> None:
        actor_self.engine.llm.collective_rpc(on_worker)

    return run


def _receive_only(plan):
    def on_worker(worker) -> None:
        from learner import weight_sync

        for _ in weight_sync.receive(worker._raylign_group, plan, "cpu"):
            pass

    def run(actor_self) -> None:
        actor_self.engine.llm.collective_rpc(on_worker)

    return run


def measure(model_path: str, replicas: int, repeats: int, bucket_mib: float) -> dict:
    import ray

    from actors.generator import actor_class as generator_actor_class
    from actors.learner_actor import LearnerActor
    from actors.vllm_engine import EngineSpec
    from learner.engine import LearnerSpec, OptimizerSpec
    from learner.objectives import PolicyGradient
    from orchestration.placement import Actors
    from orchestration.sync import CollectiveSync

    timeout = 600
    env = {"runtime_env": {"env_vars": {"OMP_NUM_THREADS": "2"}}, "num_cpus": 0.1}
    spec = LearnerSpec(
        model_path=model_path, policy_optim=OptimizerSpec(lr=1e-5), objective=PolicyGradient()
    )
    learner = ray.remote(LearnerActor).options(**env).remote(spec, 0, 1)
    addr, port = ray.get(learner.endpoint.remote(), timeout=timeout)
    ray.get(learner.setup.remote(addr, port), timeout=timeout)
    generators = [
        generator_actor_class()
        .options(**env)
        .remote(EngineSpec(model_path=model_path, max_model_len=128, kv_cache_bytes=64 * 2**20))
        for _ in range(replicas)
    ]
    ray.get([g.weight_version.remote() for g in generators], timeout=timeout)
    plan = ray.get(learner.sync_plan.remote(int(bucket_mib * 2**20)), timeout=timeout)
    actors = Actors(generators, None, None, [learner], sync_plan=plan)
    CollectiveSync(actors, timeout, colocated=False, tp=1).open()
    nbytes = plan.num_bytes
    version = 0

    def collective() -> float:
        nonlocal version
        version += 1
        start = time.perf_counter()
        sends = learner.broadcast_weights.remote(plan)
        ray.get([g.receive_weights.remote(version, plan) for g in generators], timeout=timeout)
        ray.get(sends, timeout=timeout)
        return time.perf_counter() - start

    def transport() -> float:  # the collective path without vLLM's load_weights
        start = time.perf_counter()
        sends = learner.broadcast_weights.remote(plan)
        ray.get([g.__ray_call__.remote(_receive_only(plan)) for g in generators], timeout=timeout)
        ray.get(sends, timeout=timeout)
        return time.perf_counter() - start

    def raw(fresh: bool = False) -> float:
        start = time.perf_counter()
        refs = [g.__ray_call__.remote(_raw_receive(nbytes, fresh)) for g in generators]
        refs.append(learner.__ray_call__.remote(_raw_send(nbytes)))
        ray.get(refs, timeout=timeout)
        return time.perf_counter() - start

    def object_store() -> float:
        nonlocal version
        version += 1
        start = time.perf_counter()
        weights = learner.policy_weights.remote()
        ray.get([g.update_weights.remote(version, weights) for g in generators], timeout=timeout)
        return time.perf_counter() - start

    collective(), raw()  # warm up: first broadcasts connect gloo's pairs
    times = {"collective": [], "transport": [], "raw": [], "raw_fresh": [], "object_store": []}
    for _ in range(repeats):  # interleaved, so drift in the machine's load hits all alike
        times["collective"].append(collective())
        times["transport"].append(transport())
        times["raw"].append(raw())
        times["raw_fresh"].append(raw(fresh=True))
        times["object_store"].append(object_store())
    for a in [learner, *generators]:
        ray.kill(a)
    median = {k: statistics.median(v) for k, v in times.items()}
    return {
        "bytes": nbytes,
        "buckets": len(plan.buckets),
        **{f"{k}_s": v for k, v in median.items()},
        "collective_over_raw": median["collective"] / median["raw"],
        "transport_over_raw": median["transport"] / median["raw"],
        "collective_over_raw_fresh": median["collective"] / median["raw_fresh"],
        "object_store_over_collective": median["object_store"] / median["collective"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 100], choices=sorted(SHAPES))
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--bucket-mib", type=float, default=64)
    args = parser.parse_args()

    import ray

    root = tempfile.mkdtemp(prefix="raylign-bench-sync-")
    models = {m: build_model(root, m) for m in args.sizes}
    ray.init(include_dashboard=False)
    try:
        results = {
            m: measure(path, args.replicas, args.repeats, args.bucket_mib)
            for m, path in models.items()
        }
    finally:
        ray.shutdown()
    print(f"\nweight sync, 1 learner rank -> {args.replicas} generator(s), gloo on CPU")
    print(
        f"{'params':>7} {'MB':>8} {'buckets':>7} {'raw s':>8} {'raw fresh s':>11} "
        f"{'collective s':>12} {'x raw':>6} {'x fresh':>7} {'no-load s':>9} {'x raw':>6} "
        f"{'object store s':>14}"
    )
    for m, r in results.items():
        print(
            f"{m:>6}M {r['bytes'] / 1e6:>8.1f} {r['buckets']:>7} {r['raw_s']:>8.3f} "
            f"{r['raw_fresh_s']:>11.3f} {r['collective_s']:>12.3f} "
            f"{r['collective_over_raw']:>6.2f} {r['collective_over_raw_fresh']:>7.2f} "
            f"{r['transport_s']:>9.3f} {r['transport_over_raw']:>6.2f} "
            f"{r['object_store_s']:>14.3f}"
        )
    print(
        json.dumps(
            {
                "bench": "sync",
                "replicas": args.replicas,
                "bucket_mib": args.bucket_mib,
                "results": {f"{m}M": r for m, r in results.items()},
            }
        )
    )


if __name__ == "__main__":
    main()
