"""Generation throughput with 1 and 2 vLLM replicas on a preset (the driver's dispatch included).

    .venv/bin/python benchmarks/bench_generate.py [--config demo] [--replicas 1 2] [--repeats 20]
        [key=value ...]

For each replica count it starts the run's actors on an embedded local Ray and times the driver's
generate stage alone (prompts dispatched in chunks to whichever replica is free, results joined
into one table) over ``--repeats`` batches, after one warm-up batch. Prints samples/s and
generated tokens/s per replica count, and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def measure(cfg, source: str, repeats: int) -> dict:
    import pyarrow.compute as pc
    import ray

    from orchestration.loop import start_loop
    from orchestration.placement import start_actors
    from orchestration.prepare import prepare
    from orchestration.sampler import PromptSampler
    from orchestration.train import init_ray
    from rollout import schema as S

    prep = prepare(cfg, source)
    init_ray(cfg)
    try:
        actors = start_actors(cfg, prep.model_path, prep.pad_token_id)
        trainer = start_loop(cfg, actors, PromptSampler(prep.prompts, 0), prep)
        n = cfg.data.prompts_per_iteration
        ray.get(trainer.stages.generate(trainer.sampler.next_batch(n)), timeout=600)  # warm-up
        samples = tokens = 0
        start = time.perf_counter()
        for _ in range(repeats):
            table = ray.get(trainer.stages.generate(trainer.sampler.next_batch(n)), timeout=600)
            samples += table.num_rows
            lengths = pc.list_value_length(S.column_array(table, S.RESPONSE_TOKEN_IDS))
            tokens += pc.sum(lengths).as_py()
        seconds = time.perf_counter() - start
    finally:
        ray.shutdown()
    return {
        "samples_per_s": samples / seconds,
        "tokens_per_s": tokens / seconds,
        "batch_s": seconds / repeats,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="demo")
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    from orchestration.config import load_config

    results = {}
    for r in args.replicas:
        cfg = load_config(
            args.config,
            [*args.overrides, f"generator.num_replicas={r}", "logging.root=/tmp/raylign-bench"],
        )
        results[r] = measure(cfg, args.config, args.repeats)
    print(f"\ngeneration, preset {args.config}")
    print(f"{'replicas':>8} {'samples/s':>10} {'tokens/s':>9} {'batch s':>8}")
    for r, m in results.items():
        print(f"{r:>8} {m['samples_per_s']:>10.1f} {m['tokens_per_s']:>9.1f} {m['batch_s']:>8.3f}")
    print(json.dumps({"bench": "generate", "config": args.config, "results": results}))


if __name__ == "__main__":
    main()
