"""The GRPO step synchronous against asynchronous (``max_staleness`` k), at benchmark shapes.

    .venv/bin/python benchmarks/bench_async.py [--modes 0,1,2,1f,2f] [--rounds 2]
        [--iterations 8] [--warmup 2] [--workload W1] [--tiny] [key=value ...]

A mode is ``max_staleness`` k, with partial rollouts (``partial_rollouts: continue``, the
default) or with an ``f`` after it finishing each generation with the weights it started with
(``partial_rollouts: finish``).

The workload is ``bench_shapes``'s (W1: the 6M Qwen2, 16 prompts x 4 samples, 9-token prompts,
32-token responses; W2: 256-token responses), the Raylign loop on an embedded local Ray, every
actor with ``cluster.torch_threads=1`` so that on a 2-core machine the generator and the
learner each have a core of their own while they overlap. Each mode runs with the same
correction (``algorithm.off_policy.weight=token``, so the learner's work is the same; in
synchronous mode its weights are 1 up to the vLLM/learner gap). Per round, each mode in turn
starts its actors, runs ``--warmup`` untimed iterations and ``--iterations`` timed ones, and
stops; modes alternate so drift between hours hits them alike.

Prints per mode the median step (``timing/iteration``), samples per second and the stage times;
then the target: the asynchronous step at most 1.1x the longer of the synchronous generate and
(reference + learner forward + train), and below the synchronous step; then one JSON line
``{"bench": "async", ...}``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_shapes import TINY, WORKLOADS, RaySide, build_inputs, raylign_overrides  # noqa: E402

STAGES = (
    "generate",
    "reward",
    "passes",
    "reference",
    "learner_forward",
    "train",
    "sync",
    "sync_wait",
)
TARGET = 1.1  # the asynchronous step over the longer of generate and the learner's side


def run_mode(mode: str, workload, model: str, prompts: str, root: Path, args) -> list[dict]:
    from orchestration.config import load_config

    k, finish = int(mode.rstrip("f")), mode.endswith("f")
    overrides = raylign_overrides(workload, model, prompts, root / f"k{mode}")
    overrides += [
        f"max_staleness={k}",
        f"partial_rollouts={'finish' if finish else 'continue'}",
        "algorithm.off_policy.weight=token",
        "cluster.torch_threads=1",
        f"iterations={args.warmup + args.iterations + 1}",
        *args.overrides,
    ]
    side = RaySide(load_config("demo", overrides), "demo")
    try:
        out = []
        for i in range(args.warmup + args.iterations):
            metrics = side.loop.iteration()
            if i >= args.warmup:
                out.append(metrics)
                print(
                    f"{name(mode)} iteration {i}: {metrics['timing/iteration']:.3f} s, "
                    f"staleness {metrics.get('rollout/staleness_mean', 0.0):.2f}, continued "
                    f"across an update {metrics.get('rollout/partial_fraction', 0.0):.2f}",
                    file=sys.stderr,
                    flush=True,
                )
        return out
    finally:
        side.close()


def name(mode: str) -> str:
    if mode == "0":
        return "synchronous"
    return f"k={mode.rstrip('f')} " + ("finish" if mode.endswith("f") else "continue")


def summarize(runs: dict[str, list[dict]], rows: int) -> dict:
    def median(k: str, key: str, absent: float = 0.0) -> float:
        return statistics.median(m.get(key, absent) for m in runs[k])

    modes = {}
    for k in runs:
        step = median(k, "timing/iteration")
        modes[k] = {
            "step_s": step,
            "samples_per_s": rows / step,
            "stages_s": {s: median(k, f"timing/{s}") for s in STAGES},
            "staleness_mean": median(k, "rollout/staleness_mean"),
            "token_staleness_mean": median(  # finish: every token is its row's version
                k, "rollout/token_staleness_mean", median(k, "rollout/staleness_mean")
            ),
            "partial_fraction": median(k, "rollout/partial_fraction"),
            "weight_mean": median(k, "off_policy/weight_mean"),
        }
    record = {"bench": "async", "modes": modes}
    if "0" in runs:
        sync = modes["0"]["stages_s"]
        learner = sync["reference"] + sync["learner_forward"] + sync["train"]
        floor = max(sync["generate"], learner)
        record["sync_generate_s"], record["sync_learner_side_s"] = sync["generate"], learner
        record["floor_s"] = floor
        for k in runs:
            if k != "0":
                step = modes[k]["step_s"]
                modes[k]["over_floor"] = step / floor
                modes[k]["over_sync"] = step / modes["0"]["step_s"]
                modes[k]["target_met"] = step <= TARGET * floor and step < modes["0"]["step_s"]
    return record


def main() -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/bench_async.py")
    parser.add_argument(
        "--modes", default="0,1,2,1f,2f", help="max_staleness values (f: finish), comma-separated"
    )
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--iterations", type=int, default=8, help="timed iterations per run")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--workload", default="W1", choices=sorted(WORKLOADS))
    parser.add_argument("--tiny", action="store_true", help="a smoke run; times mean nothing")
    parser.add_argument("overrides", nargs="*", help="key=value for every mode's config")
    args = parser.parse_args()
    workload = TINY if args.tiny else WORKLOADS[args.workload]
    if args.tiny:
        args.rounds, args.iterations, args.warmup = 1, 2, 1
    modes = args.modes.split(",")
    runs: dict[str, list[dict]] = {k: [] for k in modes}
    with tempfile.TemporaryDirectory(prefix="bench-async-") as tmp:
        root = Path(tmp)
        model, prompts = build_inputs(root, workload)
        for r in range(args.rounds):
            for k in modes:
                runs[k] += run_mode(k, workload, model, prompts, root / f"round{r}", args)
    record = summarize(runs, workload.rows) | {"workload": workload.name}
    print(
        f"{'mode':<14}{'step s':>9}{'samples/s':>11}{'generate':>10}{'passes':>8}{'train':>8}"
        f"{'sync':>8}{'wait':>7}{'staleness':>11}{'tokens':>8}{'continued':>11}"
    )
    for k, m in record["modes"].items():
        st = m["stages_s"]
        print(
            f"{name(k):<14}{m['step_s']:>9.3f}{m['samples_per_s']:>11.1f}{st['generate']:>10.3f}"
            f"{st['passes']:>8.3f}{st['train']:>8.3f}{st['sync']:>8.3f}{st['sync_wait']:>7.3f}"
            f"{m['staleness_mean']:>11.2f}{m['token_staleness_mean']:>8.2f}"
            f"{m['partial_fraction']:>11.2f}"
        )
    if "floor_s" in record:
        print(
            f"floor: max(sync generate {record['sync_generate_s']:.3f} s, reference + learner "
            f"forward + train {record['sync_learner_side_s']:.3f} s) = {record['floor_s']:.3f} s"
        )
        for k, m in record["modes"].items():
            if k != "0":
                verdict = "met" if m["target_met"] else "missed"
                print(
                    f"{name(k)}: step {m['over_floor']:.2f}x the floor (target <= "
                    f"{TARGET}), {m['over_sync']:.2f}x the synchronous step: {verdict}"
                )
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
