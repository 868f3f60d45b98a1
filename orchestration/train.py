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

from orchestration.checkpoint import CheckpointError
from orchestration.checks import InputError
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
from orchestration.guards import Guards, RunStopped

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
    """A new run's directory (it must not exist), or with ``resume`` the named run's."""
    name = cfg.logging.name or f"{Path(source).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = Path(cfg.logging.root).expanduser().resolve() / name
    try:
        run_dir.mkdir(parents=True, exist_ok=cfg.resume != "never")
    except FileExistsError:
        raise ConfigError(
            f"run directory {run_dir} exists: continue that run with resume=auto, or choose "
            "another logging.name"
        ) from None
    return run_dir


def resume_point(cfg: RunConfig, run_dir: Path):
    """The checkpoint to continue from (None: start), after checking it fits this config."""
    from orchestration import checkpoint

    if cfg.resume == "never":
        return None
    if cfg.resume == "auto":
        path, ignored = checkpoint.find_latest(run_dir)
        for p in ignored:
            print(f"resume: ignoring {p}: not committed (its write was interrupted)", flush=True)
        if path is None:
            print(f"resume: no committed checkpoint in {run_dir}; starting the run", flush=True)
            return None
    else:
        path = Path(cfg.resume).expanduser().resolve()
        if not path.is_dir():
            raise ConfigError(f"resume={cfg.resume}: no such checkpoint directory")
    checkpoint.check_compatible(path, cfg.model_dump(mode="json"))
    return path


def prepare_model(cfg: RunConfig, run_dir: Path, located: str) -> str:
    """The policy's path (``located``: ``model.path`` as ``checks.locate_model`` found it);
    ``builtin:tiny`` is built now, into the run directory (a resumed run reuses the one it
    built)."""
    if cfg.model.path != BUILTIN_MODEL:
        return located
    from orchestration.tiny_model import build_tiny_model

    if (run_dir / "base_model" / "config.json").is_file():
        return str(run_dir / "base_model")
    return build_tiny_model(
        str(run_dir / "base_model"), addition_corpus(cfg.data.addition_max_operand)
    )


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


def prepare_reward_models(
    cfg: RunConfig, run_dir: Path, model_path: str, located: dict[str, str]
) -> dict[str, str]:
    """Reward model name -> path (``located``: the configured ones as ``checks.locate_model``
    found them); ``builtin:addition-rm`` is trained now, into the run directory, on preference
    pairs built from the task (``reward_service.train_rm``)."""
    from reward_service.train_rm import build_addition_rm

    paths = {}
    for m in cfg.reward.models:
        if m.path != BUILTIN_RM:
            paths[m.name] = located[m.name]
            continue
        out = run_dir / f"reward_model_{m.name}"
        if (out / "config.json").is_file():  # a resumed run: the model it trained
            paths[m.name] = str(out)
            continue
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
    resume_from: Path | None
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

    from orchestration.checks import check_inputs, locate_model

    # Hub names first, before the run directory exists: no hub access fails here in seconds.
    policy = cfg.model.path
    if policy != BUILTIN_MODEL:
        policy = locate_model("model.path", policy)
    reward_paths = {
        m.name: locate_model(f"reward.models[{m.name}].path", m.path)
        for m in cfg.reward.models
        if m.path != BUILTIN_RM
    }
    run_dir = make_run_dir(cfg, source)
    resume_from = resume_point(cfg, run_dir)
    config_text = yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
    (run_dir / "config.yaml").write_text(config_text)
    model_path = prepare_model(cfg, run_dir, policy)
    tokenizer = AutoTokenizer.from_pretrained(
        model_path, trust_remote_code=cfg.model.trust_remote_code
    )
    reward_model_paths = prepare_reward_models(cfg, run_dir, model_path, reward_paths)
    for note in check_inputs(cfg, model_path, tokenizer, reward_model_paths):
        print(f"note: {note}", flush=True)
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
        resume_from=resume_from,
        prompts=prompts,
        pad_token_id=pad,
        reward_model_paths=reward_model_paths,
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
        self.failures = 0  # learner group rebuilds so far
        self.guards = Guards(cfg, lambda: trainer.rewards.describe_unscorable())
        self.initial_state: dict | None = None  # what a rollback with no checkpoint restores
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

    def run(self, log, start: int = 0) -> None:
        """Iterations ``start`` .. ``iterations - 1``, then the final evaluation. A learner rank
        that dies sends the run back to its last committed checkpoint (``rollback``)."""
        from orchestration.checkpoint import rng_states

        cfg = self.cfg
        if start == 0:
            self.initial_state = self.trainer.state_dict() | {"rng": rng_states()}
        k = start
        while k < cfg.iterations:
            try:
                metrics = self.step(k)
            except Exception as e:  # noqa: BLE001 - only a dead learner rank is handled
                if not self.learner_died(e):
                    raise
                k = self.rollback(log, e)
                continue
            log.log(k, metrics)
            try:
                for warning in self.guards.check(k, metrics):
                    print(warning, flush=True)
            except RunStopped as stop:
                path = self.save_checkpoint(k)
                raise type(stop)(f"{stop} (checkpoint: {path})") from None
            every = cfg.checkpoint.every
            if k == cfg.iterations - 1 or (every and (k + 1) % every == 0):
                self.save_checkpoint(k)
            k += 1
        if self.eval_table is not None:  # the final weights, as their own record
            log.log(cfg.iterations, self.evaluate(cfg.iterations))

    def step(self, k: int) -> dict[str, float]:
        """Iteration ``k`` with its evaluation, rollout file and export as scheduled."""
        cfg, last = self.cfg, self.cfg.iterations - 1
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
        return metrics

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self, k: int) -> Path:
        """Checkpoint after iteration ``k`` (committed), keeping the newest
        ``checkpoint.keep``."""
        from orchestration import checkpoint

        state = self.trainer.state_dict() | {"rng": checkpoint.rng_states()}
        config = self.cfg.model_dump(mode="json")
        timeout = self.cfg.cluster.call_timeout_s
        path = checkpoint.save(
            self.run_dir, k, state, config, self.trainer.actors.learners, timeout
        )
        checkpoint.prune(self.run_dir, self.cfg.checkpoint.keep)
        return path

    def restore(self, path: Path) -> int:
        """Load checkpoint ``path`` into the learner ranks and the driver, and give the
        generators its weights before they generate again. Returns its iteration."""
        from orchestration import calls, checkpoint

        state = checkpoint.check_compatible(path, self.cfg.model_dump(mode="json"))
        learners = self.trainer.actors.learners
        timeout = self.cfg.cluster.call_timeout_s
        loads = [r.load_checkpoint.remote(str(path / "learner")) for r in learners]
        calls.wait(loads, "restore checkpoint", timeout)
        self.trainer.load_state_dict(state)
        checkpoint.set_rng_states(state["rng"])
        self.trainer.push_weights(state["weight_version"])
        return int(state["iteration"])

    def learner_died(self, error: Exception) -> bool:
        """Whether ``error`` came with a dead learner rank (ranks are never restarted: one
        that died is gone)."""
        import ray

        from orchestration import calls

        if not isinstance(error, ray.exceptions.RayError):
            return False
        timeout = self.cfg.cluster.call_timeout_s
        for rank in self.trainer.actors.learners:
            try:
                calls.wait(rank.__ray_ready__.remote(), "learner check", timeout)
            except ray.exceptions.RayActorError:
                return True
        return False

    def rollback(self, log, error: Exception) -> int:
        """Rebuild the learner group and continue from the last committed checkpoint (or the
        start); returns the next iteration. Past ``cluster.max_failures`` the error stands."""
        from orchestration import checkpoint
        from orchestration.placement import rebuild_learners

        self.failures += 1
        limit = self.cfg.cluster.max_failures
        if self.failures > limit:
            raise RuntimeError(
                f"the learner group failed {self.failures} times (cluster.max_failures={limit})"
            ) from error
        start = time.perf_counter()
        path, _ = checkpoint.find_latest(self.run_dir)
        print(
            f"learner: a rank died ({type(error).__name__}); rebuilding the group "
            f"(failure {self.failures} of at most {limit}) and resuming from "
            f"{path or 'the start'}",
            flush=True,
        )
        rebuild_learners(
            self.cfg, self.trainer.actors, self.prep.model_path, self.prep.pad_token_id
        )
        if path is not None:
            k = self.restore(path)
        else:
            self.trainer.load_state_dict(self.initial_state)
            checkpoint.set_rng_states(self.initial_state["rng"])
            self.trainer.push_weights(0)
            k = -1
        log.rewind(k)
        self.trainer._count("learner_rebuilds", time.perf_counter() - start)
        print(f"learner: rebuilt in {time.perf_counter() - start:.1f} s", flush=True)
        return k + 1

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
        from orchestration import calls

        learners = self.trainer.actors.learners
        timeout = self.cfg.cluster.call_timeout_s
        calls.wait([a.save_policy.remote(str(path)) for a in learners], "export", timeout)

    def prune_exports(self) -> None:
        keep = self.cfg.export.keep
        exports = sorted((self.run_dir / "exports").glob("iter_*[0-9]"))
        for old in exports[:-keep] if keep else []:
            shutil.rmtree(old)


def run(cfg: RunConfig, source: str) -> dict:
    """Everything after the config: checks, actors, the loop, the policy and the summary."""
    start = time.perf_counter()
    if cfg.logging.quiet:
        from orchestration.console import quiet_driver

        quiet_driver()
    prep = prepare(cfg, source)
    print(f"run directory: {prep.run_dir}", flush=True)

    import ray

    from orchestration.driver import Trainer
    from orchestration.metrics import MetricsLog
    from orchestration.placement import start_actors

    init_ray(cfg, prep.run_dir)
    try:
        actors = start_actors(cfg, prep.model_path, prep.pad_token_id, prep.reward_model_paths)
        sampler = PromptSampler(prep.prompts, cfg.data.seed, shuffle=cfg.data.shuffle)
        trainer = Trainer(cfg, actors, sampler, prep.pad_token_id)
        loop = Loop(cfg, trainer, sampler, prep)
        first = 0  # the first iteration this process runs
        if prep.resume_from is not None:
            first = loop.restore(prep.resume_from) + 1
            print(
                f"resume: continuing after iteration {first - 1} from {prep.resume_from} "
                f"(weight version {trainer.version}, data epoch {sampler.progress:.3f})",
                flush=True,
            )
        elif cfg.reward.reference_baseline:  # (a resumed run has them in the reward shaper)
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
            keep_through=first - 1 if cfg.resume != "never" else None,
        )
        try:
            loop.run(log, first)
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
    except (DataError, ConfigError, CheckpointError, InputError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RunStopped as e:  # a guard: 3 numerical faults, 4 off-policy, 5 nothing scorable
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    print(
        f"done: {summary['iterations']} iterations in {summary['wall_time_s']:.0f} s; reward "
        f"{summary['reward_first']:.3f} (first {FIRST_LAST}) -> {summary['reward_last']:.3f} "
        f"(last {FIRST_LAST})\nrun directory: {summary['run_dir']}",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
