"""What logging an iteration's metrics costs, per sink: the JSON lines file alone, TensorBoard
event files, and Ray gauges (on an embedded local Ray).

    python benchmarks/bench_metrics.py [--metrics 80] [--iterations 200]

Prints a table of milliseconds per iteration and a JSON line.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from orchestration.metrics import MetricsLog, RayMetricsSink, TensorBoardSink


def per_iteration_ms(run_dir: Path, sinks: list, metrics: int, iterations: int) -> float:
    log = MetricsLog(run_dir, iterations, progress_bar=False, sinks=sinks)
    keys = [f"stage{i % 8}/metric_{i}" for i in range(metrics)]
    start = time.perf_counter()
    for k in range(iterations):
        log.log(k, {key: k + i / 7 for i, key in enumerate(keys)})
    seconds = time.perf_counter() - start
    log.close()
    return 1000 * seconds / iterations


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--metrics", type=int, default=80, help="metrics per iteration")
    parser.add_argument("--iterations", type=int, default=200)
    args = parser.parse_args()
    import contextlib
    import io

    import ray

    ray.init(address="local", include_dashboard=False, num_cpus=1)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        cases = {
            "jsonl": lambda d: [],
            "jsonl+tensorboard": lambda d: [TensorBoardSink(d / "tb")],
            "jsonl+ray_gauges": lambda d: [RayMetricsSink("bench", "grpo")],
        }
        for name, sinks in cases.items():
            run_dir = root / name
            run_dir.mkdir()
            with contextlib.redirect_stdout(io.StringIO()):  # the per-iteration printed lines
                ms = per_iteration_ms(run_dir, sinks(run_dir), args.metrics, args.iterations)
            results[name] = ms
    ray.shutdown()
    print(f"{args.metrics} metrics per iteration, {args.iterations} iterations")
    print(f"{'sinks':<22}{'ms / iteration':>16}")
    for name, ms in results.items():
        print(f"{name:<22}{ms:>16.3f}")
    print(json.dumps({"bench": "metrics", "metrics": args.metrics, "ms_per_iteration": results}))


if __name__ == "__main__":
    main()
