"""Offline prompt filtering by reward variance (ChatGLM-RLHF): keep the prompts that teach.

    python -m orchestration.filter_prompts --config my_run.yaml --samples 8 --out kept.jsonl

For every prompt of the config's dataset, the policy (``model.path``) samples ``--samples``
responses with the config's sampling; the config's reward (components, combination and
shaping, as a run computes it at its start) scores them. A prompt whose scores have a standard
deviation of at most ``--min-std`` teaches a group-relative method nothing (every sample gets
the same advantage) and is dropped. Written:

- ``--out``: the kept rows as JSONL, the dataset's own rows unchanged (for ``builtin:addition``,
  ``{"prompt", "label"}``); point ``data.source`` at it;
- ``<out>.stats.jsonl``: one line per prompt: ``dataset_row``, ``reward_mean``, ``reward_std``,
  ``kept``.

Only the generators and reward actors start (on an embedded local Ray, or the configured
cluster); the prompts go through in batches of ``--batch-prompts``, with progress printed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np

from orchestration.config import ConfigError, load_config, presets
from orchestration.data import DataError, addition_examples, read_rows
from orchestration.sampler import all_prompts
from rollout.groups import group_spread


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m orchestration.filter_prompts", description=__doc__
    )
    parser.add_argument(
        "--config", default="demo", help=f"a preset ({', '.join(presets())}) or a YAML file"
    )
    parser.add_argument("--samples", type=int, default=8, help="responses per prompt (k)")
    parser.add_argument("--min-std", type=float, default=0.0, help="drop prompts with std <= this")
    parser.add_argument("--batch-prompts", type=int, default=256, help="prompts per generate call")
    parser.add_argument("--out", required=True, help="JSONL of the kept rows")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    if args.samples < 2:
        parser.error("--samples must be at least 2 (a spread needs two scores)")
    return args


def filter_prompts(cfg, source: str, samples: int, min_std: float, batch: int, out: Path) -> dict:
    """Score ``samples`` responses per prompt, write the kept rows and the per-prompt stats;
    returns the counts."""
    from types import SimpleNamespace

    import ray

    from orchestration import calls, specs
    from orchestration.generators import Faults, GeneratorPool
    from orchestration.placement import reserve, start_generators, start_scorers
    from orchestration.prepare import prepare
    from orchestration.reward_stage import RewardStage
    from orchestration.sync import WeightSync
    from orchestration.train import init_ray

    prep = prepare(cfg, source)
    prompts = all_prompts(prep.prompts)
    init_ray(cfg)
    try:
        plan, groups = reserve(cfg)
        generators = start_generators(cfg, prep.model_path, plan, groups)
        scorers = start_scorers(cfg, prep.model_path, prep.reward_model_paths, plan, groups)
        timeout = cfg.cluster.call_timeout_s
        rewards = RewardStage(specs.shaping_spec(cfg), scorers, timeout)
        # The run's dispatch: chunks to whichever replica is free, a seed per prompt; a replica
        # Ray restarts serves the initial weights again, which is all the filter samples from.
        actors = SimpleNamespace(generators=generators, learners=[])
        sync = WeightSync(actors, timeout, colocated=False, tp=cfg.generator.tensor_parallel_size)
        pool = GeneratorPool.for_run(cfg, actors, sync, Faults())
        sampling = dataclasses.replace(specs.sampling(cfg), n=samples)
        rows, scores = [], []
        start = time.perf_counter()
        for first in range(0, prompts.num_rows, batch):
            scored = rewards.score(pool.generate(prompts.slice(first, batch), sampling))
            table = calls.wait(scored.finish(), "filter prompts", timeout)
            rows.append(table["dataset_row"].to_numpy())
            scores.append(scored.score)
            done, seconds = min(first + batch, prompts.num_rows), time.perf_counter() - start
            print(f"filter: {done}/{prompts.num_rows} prompts scored ({seconds:.0f} s)", flush=True)
    finally:
        ray.shutdown()
    score = np.concatenate(scores).astype(np.float64)
    # Prompt-set index -> the dataset's own row (skipped rows are not in the prompt set, and
    # are not kept: they cannot be trained on either).
    row = np.array([prep.prompts.source_row(int(i)) for i in np.concatenate(rows)], np.int64)
    if cfg.data.source == "builtin:addition":
        originals = [
            {"prompt": p, "label": a} for p, a in addition_examples(cfg.data.addition_max_operand)
        ]
    else:
        originals = read_rows(Path(cfg.data.source), split=cfg.data.split)
    # every dataset row, sampled or not (fewer than two finite scores: std 0, dropped)
    groups = group_spread(score, row, ids=np.arange(len(originals)))
    kept = 0
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w") as kept_file, open(f"{out}.stats.jsonl", "w") as stats_file:
        for r in range(len(originals)):
            std = float(groups.spread[r])
            keep = std > min_std
            kept += keep
            if keep:
                kept_file.write(json.dumps(originals[r]) + "\n")
            stats = {
                "dataset_row": r,
                "reward_mean": float(groups.mean[r]) if groups.count[r] else None,
                "reward_std": std,
                "kept": bool(keep),
            }
            stats_file.write(json.dumps(stats) + "\n")
    return {"prompts": len(originals), "kept": kept, "dropped": len(originals) - kept}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        cfg = cfg.model_copy(
            update={"logging": cfg.logging.model_copy(update={"progress_bar": False})}
        )
        counts = filter_prompts(
            cfg, args.config, args.samples, args.min_std, args.batch_prompts, Path(args.out)
        )
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"kept {counts['kept']} of {counts['prompts']} prompts ({counts['dropped']} with reward "
        f"std <= {args.min_std:g} over {args.samples} samples) -> {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
