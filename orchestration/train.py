"""Raylign's main job: a PPO or GRPO run on Ray.

    python -m orchestration.train --config demo [key=value ...]
    ray job submit -- python -m orchestration.train --config demo logging.root=$PWD/runs

With no cluster address (``cluster.address`` or ``RAY_ADDRESS``, which ``ray job submit`` sets)
it starts an embedded local Ray; otherwise it joins that cluster. Everything is checked (config,
model path, dataset rows) before any actor starts. Per-iteration metrics are printed and written
to ``<run_dir>/metrics.jsonl``; the final policy is saved to ``<run_dir>/policy`` (safetensors)
and a summary to ``<run_dir>/summary.json``.

The run:

1. load and validate the config, then the tokenizer and every prompt;
2. start the actors: vLLM generators, the reward actors (rule functions, reward models, remote
   services), the frozen reference, the DeepSpeed learner ranks (and critic for PPO); with
   ``reward.reference_baseline``, score the reference policy's responses to every prompt;
3. run ``iterations`` synchronous iterations (see ``orchestration.driver``);
4. save the policy and the summary.
"""

from __future__ import annotations

import argparse
import json
import os
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
    parser = argparse.ArgumentParser(
        prog="python -m orchestration.train",
        description="Run PPO or GRPO on Ray with vLLM generators and a DeepSpeed learner.",
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
        "mean_timings_s": {k: sum(h[k] for h in history) / len(history) for k in timings},
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
    prompts = load_prompts(
        cfg.data.source,
        tokenizer,
        prompt_key=cfg.data.prompt_key,
        label_key=cfg.data.label_key,
        max_prompt_tokens=cfg.data.max_prompt_tokens,
        addition_max_operand=cfg.data.addition_max_operand,
    )
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return Prepared(
        run_dir=run_dir,
        model_path=model_path,
        prompts=prompts,
        pad_token_id=pad,
        reward_model_paths=prepare_reward_models(cfg, run_dir, model_path),
    )


def run(cfg: RunConfig, source: str) -> dict:
    """Everything after the config: checks, actors, the loop, the policy and the summary."""
    start = time.perf_counter()
    prep = prepare(cfg, source)
    print(f"run directory: {prep.run_dir}\nprompts: {len(prep.prompts)} from {cfg.data.source}")

    import ray

    from orchestration.driver import Trainer
    from orchestration.metrics import MetricsLog
    from orchestration.placement import start_actors

    init_ray(cfg)
    try:
        actors = start_actors(cfg, prep.model_path, prep.pad_token_id, prep.reward_model_paths)
        sampler = PromptSampler(prep.prompts, cfg.data.seed)
        trainer = Trainer(cfg, actors, sampler, prep.pad_token_id)
        if cfg.reward.reference_baseline:
            baseline = trainer.reference_baselines(all_prompts(prep.prompts))
            print(
                f"reference baseline: {baseline['reward/baseline_prompts']:.0f} prompts, "
                f"mean score {baseline['reward/baseline_mean']:.4f}",
                flush=True,
            )
        log = MetricsLog(prep.run_dir, cfg.iterations, progress_bar=cfg.logging.progress_bar)
        try:
            for k in range(cfg.iterations):
                log.log(k, trainer.iteration())
        finally:
            log.close()
        policy_dir = str(prep.run_dir / "policy")  # all ranks take part (ZeRO-3); rank 0 writes
        ray.get([a.save_policy.remote(policy_dir) for a in actors.learners], timeout=600)
        summary = summarize(log.history, prep.run_dir, time.perf_counter() - start)
    finally:
        ray.shutdown()
    (prep.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
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
