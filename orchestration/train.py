"""Raylign's main job: a PPO or GRPO run on Ray, or a supervised stage (``stage: sft`` or
``stage: rm``, :func:`run_supervised`: the learner ranks alone).

    python -m orchestration.train --config demo [key=value ...]
    ray job submit -- python -m orchestration.train --config demo logging.root=$PWD/runs

With no cluster address (``cluster.address`` or ``RAY_ADDRESS``, which ``ray job submit`` sets)
it starts an embedded local Ray; otherwise it joins that cluster. Everything is checked (config,
model path, dataset rows) before any actor starts. ``--help`` lists every config field.

The run directory (``logging.root/logging.name``) holds what a person looks at:

- ``metrics.jsonl`` (one JSON line per iteration), ``tensorboard/`` event files, and the same
  metrics as Ray gauges on the cluster's Prometheus endpoint (``ray_raylign_*``);
- ``rollouts/iter_<k>.parquet`` (the iteration's Arrow table) and ``eval/iter_<k>.parquet``;
- ``policy/`` (the final policy, a Hugging Face directory) and ``exports/iter_<k>/``;
- ``report.html`` (plots and sample responses) and ``summary.json``.

The run:

1. load and validate the config, then the tokenizer and every prompt (and eval prompt);
2. start the actors: vLLM generators, the reward actors (rule functions, reward models, remote
   services), the frozen reference, the DeepSpeed learner ranks (and critic for PPO); with
   ``reward.reference_baseline``, score the reference policy's responses to every prompt;
3. run ``iterations`` synchronous iterations (``orchestration.loop``, the run top to bottom),
   evaluating, writing rollouts and exporting as configured;
4. save the policy, the summary and the report.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from orchestration.checkpoint import CheckpointError
from orchestration.checks import InputError
from orchestration.config import ConfigError, RunConfig, load_config, presets
from orchestration.data import DataError
from orchestration.guards import RunStopped
from orchestration.prepare import prepare
from orchestration.sampler import PromptSampler, all_prompts

FIRST_LAST = 5  # iterations averaged for the "first" and "last" reward in the summary


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from orchestration.config_doc import describe_config

    parser = argparse.ArgumentParser(
        prog="python -m orchestration.train",
        description=(
            "Run PPO or GRPO on Ray with vLLM generators and a DeepSpeed learner (stage=rl, "
            "with distill.teacher for on-policy distillation); the sampling methods beside "
            "them (stage=rrhf|rs, and dpo with dpo.online=true); or a stage on the learner "
            "alone (stage=sft|rm, and offline dpo)."
        ),
        epilog="config fields (set any with key=value):\n\n" + describe_config(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--config", default="demo", help=f"a preset ({', '.join(presets())}) or a YAML file"
    )
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. learner.lr=1e-5"
    )
    return parser.parse_args(argv)


def init_ray(cfg: RunConfig, run_dir: Path | None = None) -> None:
    """Join the configured cluster (or ``RAY_ADDRESS``), else start an embedded local Ray. With
    a run directory and ``logging.quiet``, every actor's output goes whole to
    ``<run_dir>/logs/`` and known-benign lines stay off the console (``orchestration.console``)."""
    import logging

    import ray

    kwargs: dict = {"logging_level": logging.WARNING}  # not Ray's start-up notes
    if run_dir is not None and cfg.logging.quiet:
        from orchestration.console import quiet_job

        kwargs["runtime_env"] = quiet_job(run_dir / "logs")
    address = cfg.cluster.address or os.environ.get("RAY_ADDRESS")
    if address:
        context = ray.init(address=address, **kwargs)
    else:
        context = ray.init(address="local", include_dashboard=True, **kwargs)
    dashboard = f"http://{context.dashboard_url}" if context.dashboard_url else "(not running)"
    print(f"ray: {'joined ' + address if address else 'embedded'}; dashboard: {dashboard}")


def summarize(history: list[dict], run_dir: Path, wall_s: float) -> dict:
    evals = [h for h in history if any(k.startswith("eval/") for k in h)]
    history = [h for h in history if "reward/score_mean" in h]  # not the final evaluation
    rewards = [h["reward/score_mean"] for h in history]
    n = min(FIRST_LAST, len(rewards))
    timings = sorted({k for h in history for k in h if k.startswith("timing/")})
    return {
        "run_dir": str(run_dir),
        "iterations": len(history),
        "wall_time_s": wall_s,
        "reward_first": sum(rewards[:n]) / n,
        "reward_last": sum(rewards[-n:]) / n,
        "reward_curve": rewards,
        "mean_timings_s": {
            k: sum(h[k] for h in history if k in h) / sum(k in h for h in history) for k in timings
        },
        "eval": {
            str(e["iteration"]): {k: v for k, v in e.items() if k.startswith("eval/")}
            for e in evals
        },
    }


def make_sinks(cfg: RunConfig, run_dir: Path) -> list:
    """Where metrics go besides ``metrics.jsonl``, as configured."""
    from orchestration.metrics import RayMetricsSink, TensorBoardSink, WandbSink

    sinks: list = []
    if cfg.logging.ray_metrics:
        sinks.append(RayMetricsSink(run_dir.name, cfg.algorithm.estimator.value))
    if cfg.logging.tensorboard:
        sinks.append(TensorBoardSink(run_dir / "tensorboard"))
    wb = cfg.logging.wandb
    if wb.enabled:
        config = cfg.model_dump(mode="json")
        sinks.append(
            WandbSink(
                run_dir,
                run_dir.name,
                config,
                project=wb.project,
                entity=wb.entity,
                mode=wb.mode,
                tags=wb.tags,
            )
        )
    return sinks


def metrics_log(cfg: RunConfig, run_dir: Path, first: int):
    """The run's ``MetricsLog`` (a resumed run keeps its records through iteration
    ``first - 1``)."""
    from orchestration.metrics import MetricsLog

    return MetricsLog(
        run_dir,
        cfg.iterations,
        progress_bar=cfg.logging.progress_bar,
        sinks=make_sinks(cfg, run_dir),
        keep_through=first - 1 if cfg.resume != "never" else None,
    )


def write_summary(cfg: RunConfig, run_dir: Path, summary: dict) -> dict:
    """``summary.json`` and, as configured, the report; returns ``summary``."""
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    if cfg.logging.report:
        from orchestration.report import write_report

        print(f"report: {write_report(run_dir)}", flush=True)
    return summary


def run(cfg: RunConfig, source: str) -> dict:
    """Everything after the config: checks, actors, the loop, the policy and the summary."""
    if not cfg.samples:
        return run_supervised(cfg, source)
    start = time.perf_counter()
    if cfg.logging.quiet:
        from orchestration.console import quiet_driver

        quiet_driver()
    prep = prepare(cfg, source)
    print(f"run directory: {prep.run_dir}", flush=True)

    import ray

    from orchestration.loop import start_loop
    from orchestration.placement import start_actors

    init_ray(cfg, prep.run_dir)
    try:
        actors = start_actors(cfg, prep.model_path, prep.pad_token_id, prep.reward_model_paths)
        sampler = PromptSampler(prep.prompts, cfg.data.seed, shuffle=cfg.data.shuffle)
        loop = start_loop(cfg, actors, sampler, prep)
        first = 0  # the first iteration this process runs
        if prep.resume_from is not None:
            first = loop.restore(prep.resume_from) + 1
            print(
                f"resume: continuing after iteration {first - 1} from {prep.resume_from} "
                f"(weight version {loop.version}, data epoch {sampler.progress:.3f})",
                flush=True,
            )
        elif cfg.reward.reference_baseline:  # (a resumed run has them in the reward shaper)
            baseline = loop.stages.reference_baselines(all_prompts(prep.prompts))
            print(
                f"reference baseline: {baseline['reward/baseline_prompts']:.0f} prompts, "
                f"mean score {baseline['reward/baseline_mean']:.4f}",
                flush=True,
            )
        log = metrics_log(cfg, prep.run_dir, first)
        try:
            loop.run(log, first)
        finally:
            log.close()
        loop.export(prep.run_dir / "policy")
        summary = summarize(log.history, prep.run_dir, time.perf_counter() - start)
        summary["data"] = prep.prompts.report.metrics()  # rows read, loaded, skipped, truncated
    finally:
        ray.shutdown()
    return write_summary(cfg, prep.run_dir, summary)


def summarize_supervised(history: list[dict], run_dir: Path, wall_s: float, key: str) -> dict:
    """A supervised run's summary: its training loss curve and held-out metrics."""
    train = [h for h in history if key in h]
    losses = [h[key] for h in train]
    n = min(FIRST_LAST, len(losses))
    evals = [h for h in history if any(k.startswith("eval/") for k in h)]
    return {
        "run_dir": str(run_dir),
        "iterations": len(train),
        "wall_time_s": wall_s,
        "loss_first": sum(losses[:n]) / n,
        "loss_last": sum(losses[-n:]) / n,
        "loss_curve": losses,
        "eval": {
            str(e["iteration"]): {k: v for k, v in e.items() if k.startswith("eval/")}
            for e in evals
        },
    }


def run_supervised(cfg: RunConfig, source: str) -> dict:
    """``stage: sft``, ``stage: rm`` or offline ``stage: dpo``: the learner ranks (and for DPO
    the frozen reference) train the stage's objective (``orchestration.loop.SupervisedLoop``);
    the model goes to ``<run_dir>/policy`` (sft, dpo) or ``<run_dir>/reward_model`` (rm, after
    the bias normalisation, with ``rm_eval/``)."""
    start = time.perf_counter()
    if cfg.logging.quiet:
        from orchestration.console import quiet_driver

        quiet_driver()
    from orchestration.prepare import prepare_supervised

    prep = prepare_supervised(cfg, source)
    print(f"run directory: {prep.run_dir}", flush=True)

    import ray

    from orchestration.loop import SupervisedLoop
    from orchestration.placement import start_learner_ranks
    from orchestration.supervised import SupervisedStages

    init_ray(cfg, prep.run_dir)
    key = f"{cfg.stage}/loss"
    try:
        actors = start_learner_ranks(cfg, prep.model_path, prep.pad_token_id)
        stages = SupervisedStages(cfg, actors)
        loop = SupervisedLoop(cfg, stages, prep.inputs, prep.run_dir)
        first = 0
        if prep.resume_from is not None:
            first = loop.restore(prep.resume_from) + 1
            print(f"resume: continuing after iteration {first - 1} from {prep.resume_from}")
        log = metrics_log(cfg, prep.run_dir, first)
        try:
            loop.run(log, first)
        finally:
            log.close()
        summary = summarize_supervised(log.history, prep.run_dir, time.perf_counter() - start, key)
        summary["data"] = prep.inputs.metrics
        if cfg.stage == "rm":
            summary["reward_model"] = finish_reward_model(cfg, stages, prep)
            loop.export(prep.run_dir / "reward_model")
        else:
            loop.export(prep.run_dir / "policy")
    finally:
        ray.shutdown()
    return write_summary(cfg, prep.run_dir, summary)


def finish_reward_model(cfg: RunConfig, stages, prep) -> dict:
    """After training: shift the head's bias so the reference responses score 0 on average
    (``rm.normalize_source``), then evaluate on the held-out and equal-quality pairs into
    ``rm_eval/``. Returns what it did and measured."""
    import numpy as np

    from orchestration.rm_eval import write_rm_eval
    from orchestration.supervised import rm_evaluation

    out: dict = {}
    inputs = prep.inputs
    if inputs.normalize is not None:
        mean = float(np.mean([s for g in stages.score(inputs.normalize) for s in g]))
        out["bias"] = stages.shift_bias(-mean)
        out["reference_mean_before"] = mean
        print(f"reward model: reference responses scored {mean:+.4f} on average; bias shifted")
    edges = cfg.rm.length_buckets
    for name, table in (("held_out", inputs.held_out), ("equal_quality", inputs.equal_quality)):
        if table is None:
            continue
        metrics = rm_evaluation(stages, table, edges)
        write_rm_eval(prep.run_dir, name, metrics)
        out[name] = {k: metrics[k] for k in ("accuracy", "pairs", "longer_preferred", "ece")}
        longer = metrics["longer_preferred"]
        print(
            f"reward model on {name} pairs: accuracy {metrics['accuracy']:.3f} over "
            f"{metrics['pairs']} pairs; the longer response preferred in "
            + (f"{longer:.3f} of those differing in length" if longer is not None else "none"),
            flush=True,
        )
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        summary = run(cfg, args.config)
    except (DataError, ConfigError, CheckpointError, InputError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RunStopped as e:  # a guard: 3 numerical faults, 4 off-policy, 5 nothing scorable
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    if "loss_first" in summary:
        print(
            f"done: {summary['iterations']} iterations in {summary['wall_time_s']:.0f} s; loss "
            f"{summary['loss_first']:.3f} (first {FIRST_LAST}) -> {summary['loss_last']:.3f} "
            f"(last {FIRST_LAST})\nrun directory: {summary['run_dir']}",
            flush=True,
        )
        return 0
    print(
        f"done: {summary['iterations']} iterations in {summary['wall_time_s']:.0f} s; reward "
        f"{summary['reward_first']:.3f} (first {FIRST_LAST}) -> {summary['reward_last']:.3f} "
        f"(last {FIRST_LAST})\nrun directory: {summary['run_dir']}",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
