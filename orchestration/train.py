"""Raylign's main job: a PPO or GRPO run on Ray.

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
3. run ``iterations`` synchronous iterations (see ``orchestration.driver``), evaluating,
   writing rollouts and exporting as configured;
4. save the policy, the summary and the report.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from orchestration.config import (
    BUILTIN_MODEL,
    BUILTIN_RM,
    ConfigError,
    RunConfig,
    load_config,
    presets,
)
from orchestration.data import (
    DataError,
    PromptSampler,
    PromptSet,
    addition_corpus,
    addition_examples,
    all_prompts,
    load_prompts,
)

FIRST_LAST = 5  # iterations averaged for the "first" and "last" reward in the summary


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from orchestration.config_doc import describe_config

    parser = argparse.ArgumentParser(
        prog="python -m orchestration.train",
        description="Run PPO or GRPO on Ray with vLLM generators and a DeepSpeed learner.",
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


def make_run_dir(cfg: RunConfig, source: str) -> Path:
    name = cfg.logging.name or f"{Path(source).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = Path(cfg.logging.root).expanduser().resolve() / name
    run_dir.mkdir(parents=True, exist_ok=False)
    return run_dir


def prepare_model(cfg: RunConfig, run_dir: Path) -> str:
    """The policy's path; ``builtin:tiny`` is built now, into the run directory."""
    if cfg.model.path != BUILTIN_MODEL:
        return cfg.model.path
    from orchestration.tiny_model import build_tiny_model

    return build_tiny_model(
        str(run_dir / "base_model"), addition_corpus(cfg.data.addition_max_operand)
    )


def init_ray(cfg: RunConfig) -> None:
    """Join the configured cluster (or ``RAY_ADDRESS``), else start an embedded local Ray."""
    import ray

    address = cfg.cluster.address or os.environ.get("RAY_ADDRESS")
    if address:
        context = ray.init(address=address)
    else:
        context = ray.init(address="local", include_dashboard=True)
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


def prepare_reward_models(cfg: RunConfig, run_dir: Path, model_path: str) -> dict[str, str]:
    """Reward model name -> path; ``builtin:addition-rm`` is trained now, into the run
    directory, on preference pairs built from the task (``reward_service.train_rm``)."""
    from reward_service.train_rm import build_addition_rm

    paths = {}
    for m in cfg.reward.models:
        if m.path != BUILTIN_RM:
            paths[m.name] = m.path
            continue
        out = run_dir / f"reward_model_{m.name}"
        print(f"reward model {m.name}: training {BUILTIN_RM} into {out}", flush=True)
        examples = addition_examples(cfg.data.addition_max_operand)
        metrics = build_addition_rm(str(out), model_path, examples, seed=cfg.seed)
        print(
            f"reward model {m.name}: accuracy {metrics['train_accuracy']:.3f} on "
            f"{metrics['pairs_train']:.0f} training pairs, {metrics['held_out_accuracy']:.3f} on "
            f"{metrics['pairs_held_out']:.0f} held-out pairs ({metrics['seconds']:.0f} s)",
            flush=True,
        )
        paths[m.name] = str(out)
    return paths


@dataclass(frozen=True)
class Prepared:
    """What a run has once its inputs are checked, before any actor starts."""

    run_dir: Path
    model_path: str
    prompts: PromptSet
    pad_token_id: int
    reward_model_paths: dict[str, str]
    eval_prompts: PromptSet | None = None


def prepare(cfg: RunConfig, source: str) -> Prepared:
    """Make the run directory, build or find the model, load the tokenizer and every prompt.

    Raises:
        DataError: a dataset row cannot be used (the message names it).
    """
    from transformers import AutoTokenizer

    run_dir = make_run_dir(cfg, source)
    config_text = yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
    (run_dir / "config.yaml").write_text(config_text)
    model_path = prepare_model(cfg, run_dir)
    tokenizer = AutoTokenizer.from_pretrained(
        model_path, trust_remote_code=cfg.model.trust_remote_code
    )
    data = cfg.data

    def load(what: str, source: str, prompt_key: str, label_key: str, split: str) -> PromptSet:
        prompts = load_prompts(
            source,
            tokenizer,
            prompt_key=prompt_key,
            label_key=label_key,
            max_prompt_tokens=data.max_prompt_tokens,
            addition_max_operand=data.addition_max_operand,
            overlong=data.overlong,
            strict=data.strict,
            split=split,
        )
        print(f"{what}: {prompts.report.summary()}", flush=True)
        for problem in prompts.report.problems[:5]:
            print(f"  skipped: {problem}", flush=True)
        return prompts

    prompts = load("prompts", data.source, data.prompt_key, data.label_key, data.split)
    ev = cfg.eval
    eval_prompts = (
        load("eval prompts", ev.source, ev.prompt_key, ev.label_key, ev.split)
        if ev.source is not None
        else None
    )
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return Prepared(
        run_dir=run_dir,
        model_path=model_path,
        prompts=prompts,
        pad_token_id=pad,
        reward_model_paths=prepare_reward_models(cfg, run_dir, model_path),
        eval_prompts=eval_prompts,
    )


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


class Loop:
    """The iterations, with evaluation, rollout files and exports on their schedules."""

    def __init__(self, cfg: RunConfig, trainer, sampler: PromptSampler, prep: Prepared):
        from actors.vllm_engine import Sampling

        self.cfg, self.trainer, self.sampler, self.prep = cfg, trainer, sampler, prep
        self.run_dir = prep.run_dir
        self.eval_table = None
        if prep.eval_prompts is not None:
            table = all_prompts(prep.eval_prompts)
            limit = cfg.eval.max_prompts
            self.eval_table = table.slice(0, limit) if limit else table
            ev = cfg.eval
            self.eval_sampling = Sampling(
                n=ev.samples,
                temperature=ev.temperature,
                max_new_tokens=ev.max_new_tokens or cfg.generator.max_new_tokens,
                seed=cfg.seed,
            )

    def run(self, log) -> None:
        cfg, last = self.cfg, self.cfg.iterations - 1
        for k in range(cfg.iterations):
            metrics: dict[str, float] = {}
            if self.eval_table is not None and k % cfg.eval.every == 0:
                metrics |= self.evaluate(k)
            metrics |= self.trainer.iteration()
            metrics["data/epoch"] = self.sampler.progress
            every = cfg.logging.rollouts_every
            if every and (k == 0 or k == last or k % every == 0):
                from orchestration.evaluation import write_table

                path = self.run_dir / "rollouts" / f"iter_{k:06d}.parquet"
                write_table(self.trainer.last_batch, path)
            if cfg.export.every and (k + 1) % cfg.export.every == 0 and k != last:
                start = time.perf_counter()
                self.export(self.run_dir / "exports" / f"iter_{k:06d}")
                self.prune_exports()
                metrics["timing/export"] = time.perf_counter() - start
            log.log(k, metrics)
        if self.eval_table is not None:  # the final weights, as their own record
            log.log(cfg.iterations, self.evaluate(cfg.iterations))

    def evaluate(self, k: int) -> dict[str, float]:
        """The eval set under the current weights -> ``eval/*`` metrics and
        ``eval/iter_<k>.parquet``."""
        from orchestration.evaluation import eval_metrics, write_table

        start = time.perf_counter()
        table = self.trainer.evaluate(self.eval_table, self.eval_sampling)
        write_table(table, self.run_dir / "eval" / f"iter_{k:06d}.parquet")
        metrics = eval_metrics(table, self.cfg.eval_component, self.cfg.eval.correct_threshold)
        return metrics | {"timing/eval": time.perf_counter() - start}

    def export(self, path: Path) -> None:
        """The learner's current policy as a Hugging Face directory (every rank takes part
        under ZeRO-3; rank 0 writes)."""
        import ray

        learners = self.trainer.actors.learners
        timeout = self.cfg.cluster.call_timeout_s
        ray.get([a.save_policy.remote(str(path)) for a in learners], timeout=timeout)

    def prune_exports(self) -> None:
        keep = self.cfg.export.keep
        exports = sorted((self.run_dir / "exports").glob("iter_*[0-9]"))
        for old in exports[:-keep] if keep else []:
            shutil.rmtree(old)


def run(cfg: RunConfig, source: str) -> dict:
    """Everything after the config: checks, actors, the loop, the policy and the summary."""
    start = time.perf_counter()
    prep = prepare(cfg, source)
    print(f"run directory: {prep.run_dir}", flush=True)

    import ray

    from orchestration.driver import Trainer
    from orchestration.metrics import MetricsLog
    from orchestration.placement import start_actors

    init_ray(cfg)
    try:
        actors = start_actors(cfg, prep.model_path, prep.pad_token_id, prep.reward_model_paths)
        sampler = PromptSampler(prep.prompts, cfg.data.seed, shuffle=cfg.data.shuffle)
        trainer = Trainer(cfg, actors, sampler, prep.pad_token_id)
        if cfg.reward.reference_baseline:
            baseline = trainer.reference_baselines(all_prompts(prep.prompts))
            print(
                f"reference baseline: {baseline['reward/baseline_prompts']:.0f} prompts, "
                f"mean score {baseline['reward/baseline_mean']:.4f}",
                flush=True,
            )
        log = MetricsLog(
            prep.run_dir,
            cfg.iterations,
            progress_bar=cfg.logging.progress_bar,
            sinks=make_sinks(cfg, prep.run_dir),
        )
        loop = Loop(cfg, trainer, sampler, prep)
        try:
            loop.run(log)
        finally:
            log.close()
        loop.export(prep.run_dir / "policy")
        summary = summarize(log.history, prep.run_dir, time.perf_counter() - start)
        summary["data"] = prep.prompts.report.metrics()  # rows read, loaded, skipped, truncated
    finally:
        ray.shutdown()
    (prep.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    if cfg.logging.report:
        from orchestration.report import write_report

        print(f"report: {write_report(prep.run_dir)}", flush=True)
    return summary


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        summary = run(cfg, args.config)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"done: {summary['iterations']} iterations in {summary['wall_time_s']:.0f} s; reward "
        f"{summary['reward_first']:.3f} (first {FIRST_LAST}) -> {summary['reward_last']:.3f} "
        f"(last {FIRST_LAST})\nrun directory: {summary['run_dir']}",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
