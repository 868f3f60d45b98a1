"""Before any actor starts: the run directory, the model, the reward models and every prompt.

Everything that can be checked without the cluster is checked here (config against the resumed
checkpoint, model and tokenizer, every dataset row), so bad input fails in seconds, with
nothing started and nothing lost.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from orchestration.config import BUILTIN_MODEL, BUILTIN_RM, ConfigError, RunConfig
from orchestration.data import PromptSet, builtin_corpus, load_prompts


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
        str(run_dir / "base_model"),
        builtin_corpus(cfg.data.source, cfg.data.addition_max_operand),
    )


def prepare_reward_models(
    cfg: RunConfig, run_dir: Path, model_path: str, located: dict[str, str]
) -> dict[str, str]:
    """Reward model name -> path (``located``: the configured ones as ``checks.locate_model``
    found them); ``builtin:addition-rm`` is trained now, into the run directory, on preference
    pairs built from the task, by ``python -m orchestration.train_rm`` in a process of its own
    (the learner engine's reward-model objective on one gloo rank: its process group and
    DeepSpeed state stay out of this driver)."""
    import json
    import subprocess
    import sys

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
        command = [sys.executable, "-m", "orchestration.train_rm", "--base", model_path]
        command += ["--out", str(out), "--seed", str(cfg.seed)]
        command += ["--builtin-addition", str(cfg.data.addition_max_operand)]
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=cfg.cluster.call_timeout_s
        )
        lines = [x for x in done.stdout.splitlines() if x.startswith("METRICS ")]
        if done.returncode != 0 or not lines:
            raise RuntimeError(
                f"reward model {m.name}: training {BUILTIN_RM} failed (exit {done.returncode}):\n"
                + (done.stdout[-2000:] + done.stderr[-3000:])
            )
        metrics = json.loads(lines[-1].removeprefix("METRICS "))
        print(
            f"reward model {m.name}: accuracy {metrics['train_accuracy']:.3f} on "
            f"{metrics['pairs_train']:.0f} training pairs, {metrics['held_out_accuracy']:.3f} on "
            f"{metrics['pairs_held_out']:.0f} held-out pairs ({metrics['seconds']:.0f} s)",
            flush=True,
        )
        paths[m.name] = str(out)
    return paths


def start_run_dir(cfg: RunConfig, source: str, policy: str):
    """``(run_dir, resume_from, model_path, tokenizer)``: the run directory made (or found to
    resume) with its ``config.yaml``, the model built or found (``policy``: as located) and its
    tokenizer loaded."""
    from transformers import AutoTokenizer

    run_dir = make_run_dir(cfg, source)
    resume_from = resume_point(cfg, run_dir)
    config_text = yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
    (run_dir / "config.yaml").write_text(config_text)
    model_path = prepare_model(cfg, run_dir, policy)
    tokenizer = AutoTokenizer.from_pretrained(
        model_path, trust_remote_code=cfg.model.trust_remote_code
    )
    return run_dir, resume_from, model_path, tokenizer


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
    ptx: object | None = None  # the PTX term's examples (orchestration.sft_data.SupervisedSet)


def prepare(cfg: RunConfig, source: str) -> Prepared:
    """Make the run directory, build or find the model, load the tokenizer and every prompt.

    Raises:
        DataError: a dataset row cannot be used (the message names it).
    """

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
    if cfg.distill.teacher is not None:
        locate_model("distill.teacher", cfg.distill.teacher)
    run_dir, resume_from, model_path, tokenizer = start_run_dir(cfg, source, policy)
    reward_model_paths = prepare_reward_models(cfg, run_dir, model_path, reward_paths)
    for note in check_inputs(cfg, model_path, tokenizer, reward_model_paths):
        print(f"note: {note}", flush=True)
    data = cfg.data

    def load(
        what: str, source: str, prompt_key: str, label_key: str, split: str, responses=()
    ) -> PromptSet:
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
            responses_keys=responses,
            max_response_tokens=cfg.generator.max_new_tokens,
        )
        print(f"{what}: {prompts.report.summary()}", flush=True)
        for problem in prompts.report.problems[:5]:
            print(f"  skipped: {problem}", flush=True)
        return prompts

    responses = cfg.rrhf.dataset_responses if cfg.stage == "rrhf" else ()
    prompts = load("prompts", data.source, data.prompt_key, data.label_key, data.split, responses)
    ev = cfg.eval
    eval_prompts = (
        load("eval prompts", ev.source, ev.prompt_key, ev.label_key, ev.split)
        if ev.source is not None
        else None
    )
    ptx = None
    if cfg.ptx.coef > 0:
        from orchestration.supervised import load_sft

        ptx = load_sft(cfg, tokenizer, cfg.ptx.source, cfg.ptx.max_tokens)
        print(f"ptx examples: {ptx.report.summary()}", flush=True)
    pad = pad_token(tokenizer)
    return Prepared(
        run_dir=run_dir,
        model_path=model_path,
        resume_from=resume_from,
        prompts=prompts,
        pad_token_id=pad,
        reward_model_paths=reward_model_paths,
        eval_prompts=eval_prompts,
        ptx=ptx,
    )


def pad_token(tokenizer) -> int:
    """The id padding takes: the tokenizer's pad token, else its EOS."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


@dataclass(frozen=True)
class PreparedSupervised:
    """A supervised stage's inputs, checked before any actor starts."""

    run_dir: Path
    model_path: str
    resume_from: Path | None
    pad_token_id: int
    inputs: object  # orchestration.supervised.SupervisedInputs


def prepare_supervised(cfg: RunConfig, source: str) -> PreparedSupervised:
    """The run directory, the model (or ``builtin:tiny``), the tokenizer and the stage's data
    (``orchestration.supervised.load_inputs``), before any actor starts."""
    from orchestration.checks import check_inputs, locate_model
    from orchestration.supervised import load_inputs

    policy = cfg.model.path
    if policy != BUILTIN_MODEL:
        policy = locate_model("model.path", policy)
    run_dir, resume_from, model_path, tokenizer = start_run_dir(cfg, source, policy)
    for note in check_inputs(cfg, model_path, tokenizer, {}):
        print(f"note: {note}", flush=True)
    inputs = load_inputs(cfg, tokenizer)
    print(f"{cfg.stage} data: {inputs.summary}", flush=True)
    for line in inputs.lines:
        print(line, flush=True)
    return PreparedSupervised(run_dir, model_path, resume_from, pad_token(tokenizer), inputs)
