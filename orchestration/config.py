"""The run's configuration: one typed tree, validated at the boundary, frozen afterwards.

Loaded from a named preset (``orchestration/presets/<name>.yaml``) or a YAML file, then
overridden by dotted ``key=value`` arguments (values parsed as YAML: ``learner.lr=3e-4``,
``reward.functions=[{name: exact_integer}]``). Every error names the field and says what to do.
Batch sizes have three knobs in three units: prompts per iteration, samples per prompt, tokens
per micro-batch.

The tree's sections are in ``orchestration.config_sections`` and its cross-field rules in
``orchestration.config_rules``; this module holds the root (``RunConfig``), loading and
overrides, and re-exports the names of both, so ``orchestration.config`` is the one import.
Importing it imports no torch.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator

from orchestration.config_rules import (
    BUILTIN_MODEL,
    BUILTIN_RM,
    cross_field_problems,
    raise_problems,
    rule_components,
)
from orchestration.config_sections import (
    AlgorithmConfig,
    CheckpointConfig,
    ClusterConfig,
    DataConfig,
    DynamicSamplingConfig,
    EvalConfig,
    ExportConfig,
    GeneratorConfig,
    LearnerConfig,
    LoggingConfig,
    ModelConfig,
    OffPolicyConfig,
    OverlongConfig,
    RemoteRewardConfig,
    RewardConfig,
    RewardFunctionConfig,
    RewardModelConfig,
    RoleResources,
    SafetyGateConfig,
    Section,
    WandbConfig,
    WeightSyncConfig,
)
from orchestration.config_stages import (
    DistillConfig,
    DpoConfig,
    EpisodesConfig,
    PtxConfig,
    RejectionSamplingConfig,
    RewardTrainingConfig,
    RrhfConfig,
    SupervisedConfig,
)

__all__ = [
    "BUILTIN_MODEL",
    "BUILTIN_RM",
    "PRESET_DIR",
    "AlgorithmConfig",
    "CheckpointConfig",
    "ClusterConfig",
    "ConfigError",
    "DataConfig",
    "DistillConfig",
    "DpoConfig",
    "DynamicSamplingConfig",
    "EvalConfig",
    "ExportConfig",
    "GeneratorConfig",
    "LearnerConfig",
    "LoggingConfig",
    "ModelConfig",
    "OffPolicyConfig",
    "OverlongConfig",
    "PtxConfig",
    "RemoteRewardConfig",
    "RewardConfig",
    "RewardFunctionConfig",
    "RewardModelConfig",
    "RejectionSamplingConfig",
    "RewardTrainingConfig",
    "RoleResources",
    "RrhfConfig",
    "RunConfig",
    "SafetyGateConfig",
    "SupervisedConfig",
    "WandbConfig",
    "WeightSyncConfig",
    "load_config",
    "parse_overrides",
    "presets",
]

PRESET_DIR = Path(__file__).parent / "presets"


class ConfigError(ValueError):
    """A configuration that cannot run; the message lists every problem, one per line."""


class RunConfig(Section):
    stage: Literal["rl", "sft", "rm", "dpo", "rrhf", "rs"] = "rl"
    """What the run trains: rl (PPO or GRPO on the prompts; with ``distill``, on-policy
    distillation), sft (supervised fine-tuning, ``sft``), rm (a reward model on preferences,
    ``rm``), dpo (direct preference optimisation, offline or online, ``dpo``), rrhf (ranking
    scored candidates, ``rrhf``) or rs (rejection-sampling fine-tuning, ``rs``). sft, rm and
    offline dpo start only the learner ranks (and, for dpo, the reference), one optimizer step
    per iteration; the others sample with the generators every iteration."""
    iterations: int = Field(20, ge=1)
    """Training iterations (rl: generate -> score -> train -> sync each; sft and rm: one
    optimizer step each)."""
    max_staleness: int = Field(0, ge=0)
    """rl: how many weight versions a training batch's samples may be behind the weights being
    trained. 0: synchronous (generate, then train). k > 0: the generators sample the next k
    batches while the learner trains (``partial_rollouts`` says what a weight update does to a
    generation under way), and ``algorithm.off_policy`` must correct the gap (``off_policy/*``,
    ``rollout/staleness_*``). A row's staleness counts from the version of its first token."""
    partial_rollouts: Literal["continue", "finish"] = "continue"
    """max_staleness > 0: what a weight update does to a generation under way. continue: the
    generation stops between two engine steps, takes the new weights and goes on with them from
    each sample's tokens so far (``token_versions`` records each token's version; the sync
    waits for no generation). finish: the update waits until the generations started before it
    have finished with the weights they started with (the same tokens whatever the timing)."""
    seed: int = 0
    """Seed of the learner's initialisation, eval sampling and the demo reward model's training."""
    resume: str = "never"
    """never: a new run (its directory must not exist). auto: continue the run in
    ``logging.root/logging.name`` from its newest committed checkpoint, or start it if there is
    none. A path: continue from that checkpoint directory."""
    model: ModelConfig = ModelConfig()
    """The policy checkpoint."""
    data: DataConfig = DataConfig()
    """The prompt set and how prompts are drawn."""
    generator: GeneratorConfig = GeneratorConfig()
    """vLLM sampling engines."""
    algorithm: AlgorithmConfig = AlgorithmConfig()
    """Advantage estimator, KL and the clipped policy loss."""
    learner: LearnerConfig = LearnerConfig()
    """DeepSpeed learner ranks and the optimizer."""
    reward: RewardConfig = RewardConfig()
    """What scores a response: rule functions, reward models, remote services, shaping."""
    cluster: ClusterConfig = ClusterConfig()
    """The Ray cluster, the resources of each role and their placement."""
    weight_sync: WeightSyncConfig = WeightSyncConfig()
    """How new policy weights reach the generators after each iteration."""
    logging: LoggingConfig = LoggingConfig()
    """The run directory, and where metrics, rollouts and the report go."""
    sft: SupervisedConfig = SupervisedConfig()
    rm: RewardTrainingConfig = RewardTrainingConfig()
    ptx: PtxConfig = PtxConfig()
    dpo: DpoConfig = DpoConfig()
    rrhf: RrhfConfig = RrhfConfig()
    rs: RejectionSamplingConfig = RejectionSamplingConfig()
    distill: DistillConfig = DistillConfig()
    episodes: EpisodesConfig = EpisodesConfig()
    """rl: multi-turn episodes with tools or an environment (off by default)."""
    eval: EvalConfig = EvalConfig()
    export: ExportConfig = ExportConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()

    @model_validator(mode="after")
    def _cross_field(self) -> RunConfig:
        raise_problems(cross_field_problems(self))
        return self

    @property
    def samples(self) -> bool:
        """Whether the run samples with the generators every iteration (rl, rrhf, rs, online
        dpo); the others read their examples (sft, rm, offline dpo)."""
        return self.stage in ("rl", "rrhf", "rs") or (self.stage == "dpo" and self.dpo.online)

    @property
    def uses_reference(self) -> bool:
        """Whether the run starts the frozen reference actor: rl (the KL term; the teacher of
        distillation) and dpo (the log-ratios). rrhf and rs compare the policy's own
        log-probabilities; sft and rm have no reference."""
        return self.stage in ("rl", "dpo")

    @property
    def eval_component(self) -> str | None:
        """The rule component that decides a correct eval sample."""
        rules = rule_components(self.reward)
        return self.eval.correct_component or (rules[0] if rules else None)


# ------------------------------------------------------------------------------ loading


def _set_dotted(tree: dict, key: str, value: Any) -> None:
    node = tree
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {key}: '{part}' is a value, not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(items: list[str]) -> dict:
    """``["learner.lr=1e-3", ...]`` as a nested dict, values parsed as YAML."""
    tree: dict = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not key=value (e.g. learner.lr=1e-3)")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as e:
            raise ConfigError(f"override {key}: value {raw!r} is not valid YAML ({e})") from e
        _set_dotted(tree, key.strip(), value)
    return tree


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def _read_source(source: str) -> dict:
    path = Path(source)
    if source in presets():
        path = PRESET_DIR / f"{source}.yaml"
    elif not path.is_file():
        raise ConfigError(
            f"--config {source!r} is neither a preset ({', '.join(presets())}) nor a YAML file"
        )
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from e
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return tree


def _field_names(model: type[BaseModel], loc: tuple) -> list[str]:
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        ann = getattr(field, "annotation", None)
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        model = ann
    return list(model.model_fields)


def _describe(error: dict) -> str:
    loc = tuple(error["loc"])
    where = ".".join(str(p) for p in loc) or "config"
    if error["type"] == "extra_forbidden":
        known = _field_names(RunConfig, loc)
        close = difflib.get_close_matches(str(loc[-1]), known, n=1)
        hint = f"did you mean '{close[0]}'?" if close else f"known keys: {', '.join(known)}"
        return f"{where}: unknown key; {hint}"
    msg = error["msg"].removeprefix("Value error, ")
    if "input" in error and error["type"] != "missing" and not isinstance(error["input"], dict):
        return f"{where}: {msg} (got {error['input']!r})"
    return f"{where}: {msg}"


def load_config(source: str, overrides: list[str] = ()) -> RunConfig:
    """The validated config from a preset name or YAML file plus ``key=value`` overrides.

    Raises:
        ConfigError: listing every problem as ``<dotted.field>: <what is wrong and what to do>``.
    """
    tree = _merge(_read_source(source), parse_overrides(list(overrides)))
    try:
        config = RunConfig.model_validate(tree)
    except ValidationError as e:
        lines = [_describe(err) for err in e.errors()]
        raise ConfigError("invalid config:\n  " + "\n  ".join(lines)) from None
    _check_paths(config)
    return config


def _check_paths(config: RunConfig) -> None:
    from learner.models import check_model_path

    if config.model.path != BUILTIN_MODEL:
        try:
            check_model_path(config.model.path)
        except FileNotFoundError as e:
            raise ConfigError(
                f"invalid config:\n  model.path: {e}; give a Hugging Face model directory, "
                f"a hub name, or {BUILTIN_MODEL}"
            ) from None
    from reward_service.rules import resolve

    problems = []
    for section in ("functions", "monitors"):
        for i, f in enumerate(getattr(config.reward, section)):
            try:
                resolve(f.name, dict(f.params))
            except ValueError as e:
                problems.append(f"reward.{section}.{i}: {e}")
    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))
    for m in config.reward.models:
        if m.path != BUILTIN_RM:
            try:
                check_model_path(m.path)
            except FileNotFoundError as e:
                raise ConfigError(
                    f"invalid config:\n  reward.models[{m.name}].path: {e}; give a reward model "
                    f"directory, a hub name, or {BUILTIN_RM}"
                ) from None
    if config.logging.wandb.enabled:
        import importlib.util

        if importlib.util.find_spec("wandb") is None:
            raise ConfigError(
                "invalid config:\n  logging.wandb.enabled: wandb is not installed; "
                "pip install wandb, or set logging.wandb.enabled=false"
            )
    sources = [("data.source", config.data.source), ("eval.source", config.eval.source)]
    sources += [
        ("ptx.source", config.ptx.source),
        ("rm.normalize_source", config.rm.normalize_source),
        ("rm.equal_quality_source", config.rm.equal_quality_source),
    ]
    for key, source in sources:
        if source is not None and not source.startswith("builtin:") and not os.path.exists(source):
            raise ConfigError(
                f"invalid config:\n  {key}: {source!r} does not exist; give a .jsonl, .parquet "
                "or .arrow file, a directory saved by datasets, or builtin:addition"
            )
