"""The synchronous step on Ray against the sum of its pieces timed alone (DESIGN.md's bar).

    .venv/bin/python benchmarks/bench_step.py [--config demo] [--iterations 30] [key=value ...]

Part 1 runs the preset's iterations on an embedded local Ray and averages each stage's wall time
(the first iteration, which warms the engines up, is left out). Part 2 builds the same pieces in
this one process (vLLM engine, scorer, reference, one learner rank) and times each alone on a
batch of the same shape; generate is timed with per-prompt sampling seeds (as the driver sends
them) and without. It prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

STAGES = ("generate", "reward", "reference", "learner_forward", "advantages", "train", "sync")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def on_ray(cfg, source: str, iterations: int) -> dict[str, float]:
    import ray

    from orchestration.loop import start_loop
    from orchestration.placement import start_actors
    from orchestration.prepare import prepare
    from orchestration.sampler import PromptSampler
    from orchestration.train import init_ray

    prep = prepare(cfg, source)
    init_ray(cfg)
    try:
        actors = start_actors(cfg, prep.model_path, prep.pad_token_id)
        trainer = start_loop(cfg, actors, PromptSampler(prep.prompts, 0), prep)
        history = [trainer.iteration() for _ in range(iterations + 1)][1:]
    finally:
        ray.shutdown()
    keys = [f"timing/{s}" for s in STAGES] + ["timing/iteration"]
    return {k: sum(h[k] for h in history) / len(history) for k in keys} | {
        "model_path": prep.model_path,
        "pad_token_id": prep.pad_token_id,
        "prompts": prep.prompts,
    }


def alone(cfg, model_path: str, pad_token_id: int, prompts, repeats: int) -> dict[str, float]:
    """Each piece in this process, on one batch of the run's shape; mean of ``repeats`` calls."""
    from actors.generator import PolicyGenerator
    from actors.reference import ReferenceModel
    from actors.vllm_engine import EngineSpec, Sampling
    from orchestration.sampler import PromptSampler
    from orchestration.specs import learner_spec
    from reward_service.scorer import RuleScorer, RuleSpec

    gen = cfg.generator
    generator = PolicyGenerator(
        EngineSpec(
            model_path, max_model_len=gen.max_model_len, kv_cache_bytes=gen.kv_cache_mib << 20
        )
    )
    scorer = RuleScorer(
        [RuleSpec(f.name, f.params, f.column) for f in cfg.reward.functions], model_path
    )
    reference = ReferenceModel(
        model_path,
        temperature=gen.temperature,
        micro_batch_tokens=cfg.learner.micro_batch_tokens,
        pad_token_id=pad_token_id,
    )
    from learner.engine import Engine

    learner = Engine(
        learner_spec(cfg, model_path, pad_token_id, total_steps=10**6),
        rank=0,
        world_size=1,
        master_addr="127.0.0.1",
        master_port=free_port(),
    )
    sampling = Sampling(gen.samples_per_prompt, gen.temperature, gen.max_new_tokens)
    batch = PromptSampler(prompts, 0).next_batch(cfg.data.prompts_per_iteration)

    def timed(fn):
        fn()  # warm-up
        start = time.perf_counter()
        for _ in range(repeats):
            out = fn()
        return out, (time.perf_counter() - start) / repeats

    table, t_gen = timed(lambda: generator.generate(batch, sampling))
    import pyarrow as pa

    from actors.generator import SAMPLE_SEED

    seeded = batch.append_column(SAMPLE_SEED, pa.array(range(batch.num_rows), pa.int64()))
    _, t_seeded = timed(lambda: generator.generate(seeded, sampling))  # the driver's default
    _, t_reward = timed(lambda: scorer.score(table))  # the components; shaping is numpy
    with_ref, t_ref = timed(lambda: reference.logprobs(table))
    old, t_fwd = timed(lambda: learner.compute_old(with_ref))
    from rollout.ops import append_columns

    zeros = pa.array([[0.0] * len(r) for r in old["response_token_ids"].to_pylist()])
    trainable = append_columns(old, {"advantages": zeros, "returns": zeros})
    _, t_train = timed(lambda: learner.train(trainable))
    weights = learner.policy_weights()
    version = iter(range(1, 10**6))
    _, t_sync = timed(lambda: generator.update_weights(next(version), weights))
    return {
        "generate": t_seeded,
        "generate_unseeded": t_gen,
        "reward": t_reward,
        "reference": t_ref,
        "learner_forward": t_fwd,
        "train": t_train,
        "sync": t_sync,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="demo")
    parser.add_argument("--iterations", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    from orchestration.config import load_config

    root = tempfile.mkdtemp(prefix="raylign-bench-")
    cfg = load_config(
        args.config, [*args.overrides, f"logging.root={root}", "logging.progress_bar=false"]
    )
    ray_t = on_ray(cfg, args.config, args.iterations)
    alone_t = alone(cfg, ray_t["model_path"], ray_t["pad_token_id"], ray_t["prompts"], args.repeats)

    print(f"\n{'stage':<18}{'on Ray (s)':>12}{'alone (s)':>12}")
    for stage in STAGES:
        cell = f"{alone_t[stage]:.4f}" if stage in alone_t else "-"  # advantages: driver-only
        print(f"{stage:<18}{ray_t[f'timing/{stage}']:>12.4f}{cell:>12}")
        if stage == "generate":
            print(f"{'  without seeds':<18}{'':>12}{alone_t['generate_unseeded']:>12.4f}")
    unseeded = alone_t.pop("generate_unseeded")
    pieces = sum(alone_t.values())
    step = ray_t["timing/iteration"]
    print(f"{'iteration':<18}{step:>12.4f}{pieces:>12.4f}   ratio {step / pieces:.2f}")
    record = {
        "bench": "step",
        "config": args.config,
        "iterations": args.iterations,
        "on_ray_s": {s: ray_t[f"timing/{s}"] for s in STAGES} | {"iteration": step},
        "alone_s": alone_t | {"sum": pieces, "generate_unseeded": unseeded},
        "ratio": step / pieces,
        "cpus": os.cpu_count(),
    }
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
