"""A pipeline file (``orchestration.pipeline``): its models, the placeholders of its override
values (``{S.policy}``, ``{S.reward_model}``, ``{S.dir}``, ``{demo_data}``, ``{root}``) and
reading it with ``key=value`` overrides; every problem is a :class:`PipelineError` naming the
field."""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from orchestration.config import PRESET_DIR, presets

PIPELINE_DIR = Path(__file__).parent / "pipelines"
STATE_FILE = "pipeline.json"
FIRST_LAST = 5  # records averaged for "before" and "after": orchestration.train.FIRST_LAST
OWNED = ("logging.root", "logging.name", "resume")  # the pipeline sets these for every stage
# What each output placeholder names, and the stage kinds (train's ``stage``) that write it.
POLICY_STAGES = ("sft", "rl", "dpo", "rrhf", "rs")
OUTPUTS = {"policy": POLICY_STAGES, "reward_model": ("rm",), "dir": (*POLICY_STAGES, "rm")}
DEFAULT_METRIC = {
    "rl": "reward/score_mean",
    "sft": "sft/loss",
    "rm": "rm/loss",
    "dpo": "dpo/loss",
    "rrhf": "reward/score_mean",
    "rs": "reward/score_mean",
}
DEMO_FILES = ("sft.jsonl", "preferences.jsonl", "equal_quality.jsonl")
PLACEHOLDER = re.compile(r"\{\{|\}\}|\{([^{}]*)\}")
REFERENCE = re.compile(r"[a-z0-9_-]+\.(policy|reward_model|dir)|demo_data|root")


class PipelineError(ValueError):
    """A pipeline that cannot run as asked; the message lists every problem, one per line."""


# ------------------------------------------------------------------------------ the file


class StageSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[a-z0-9_-]+$")
    """The stage's name ([a-z0-9_-]+): its run directory is ``<root>/<name>``."""
    config: str
    """A preset name or a YAML file, as train's ``--config``."""
    overrides: dict[str, Any] = {}
    """Dotted config keys -> values, passed to train as ``key=value`` (values YAML-dumped)."""
    metric: str | None = None
    """The metrics.jsonl key the table shows; None: the summary's reward (rl) or loss."""

    @field_validator("overrides")
    @classmethod
    def _keys(cls, overrides: dict[str, Any]) -> dict[str, Any]:
        for key in overrides:
            if not re.fullmatch(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*", key):
                raise ValueError(f"{key!r} is not a dotted config key (e.g. learner.lr)")
            if key in OWNED:
                raise ValueError(
                    f"{key} is set by the pipeline for every stage (logging.root=<root>, "
                    "logging.name=<stage>, resume=auto); remove it"
                )
        return overrides


class PipelineSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    """The pipeline's name, for messages."""
    root: str
    """Stage S's run directory is ``<root>/<S>``; ``<root>/pipeline.json`` the pipeline's record."""
    demo_data: str | None = None
    """Where ``orchestration.pipeline_data``'s files are (written first if missing); None: none."""
    stages: list[StageSpec] = Field(min_length=1)
    """The stages, run in this order."""

    @model_validator(mode="after")
    def _stages(self) -> PipelineSpec:
        names = [s.name for s in self.stages]
        problems = [
            f"stages: {n!r} names more than one stage; stage names must be unique"
            for n in sorted({n for n in names if names.count(n) > 1})
        ]
        if not problems:
            problems = [p for i in range(len(self.stages)) for p in reference_problems(self, i)]
        if problems:
            raise ValueError("\n  ".join(problems))
        return self


def placeholders(value: Any) -> list[str]:
    """The placeholder names (``sft.policy``) in an override value, strings in lists and
    mappings included."""
    if isinstance(value, str):
        return [m.group(1) for m in PLACEHOLDER.finditer(value) if m.group(1) is not None]
    if isinstance(value, list):
        return [p for v in value for p in placeholders(v)]
    if isinstance(value, dict):
        return [p for v in value.values() for p in placeholders(v)]
    return []


def substitute(value: Any, table: dict[str, str]) -> Any:
    """``value`` with every placeholder replaced from ``table`` (all of them known: see
    :func:`reference_problems`)."""
    if isinstance(value, str):
        return PLACEHOLDER.sub(
            lambda m: m.group(0)[0] if m.group(1) is None else table[m.group(1)], value
        )
    if isinstance(value, list):
        return [substitute(v, table) for v in value]
    if isinstance(value, dict):
        return {k: substitute(v, table) for k, v in value.items()}
    return value


def _unresolvable(spec: PipelineSpec, index: int, name: str) -> str | None:
    """Why placeholder ``name`` cannot be used by stage ``index`` (None: it can)."""
    if name == "root":
        return None
    if name == "demo_data":
        return None if spec.demo_data else "{demo_data}, but the pipeline sets no demo_data"
    stage, _, output = name.partition(".")
    names = [s.name for s in spec.stages]
    if output not in OUTPUTS or not REFERENCE.fullmatch(name):
        return (
            f"unknown substitution {{{name}}}: use {{<stage>.policy}}, {{<stage>.reward_model}}, "
            "{<stage>.dir}, {demo_data} or {root} ({{ and }} for literal braces)"
        )
    if stage not in names:
        close = difflib.get_close_matches(stage, names[:index], n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        return f"{{{name}}}: no stage is named {stage!r}{hint}"
    if names.index(stage) >= index:
        when = "is this stage" if names.index(stage) == index else "comes later"
        return f"{{{name}}}: stage {stage} {when}; a stage can use only the stages before it"
    return None


def reference_problems(spec: PipelineSpec, index: int) -> list[str]:
    """Every placeholder of stage ``index`` that names nothing it can use, one line each."""
    stage, problems = spec.stages[index], []
    for key, value in stage.overrides.items():
        where = f"stages.{stage.name}.overrides.{key}"
        if isinstance(value, dict) and value and all(v is None for v in value.values()):
            if all(REFERENCE.fullmatch(str(k)) for k in value):  # an unquoted {sft.policy}
                text = ", ".join(f"{{{k}}}" for k in value)
                problems.append(f'{where}: {text} was read as a YAML mapping; quote it: "{text}"')
                continue
        for name in placeholders(value):
            why = _unresolvable(spec, index, name)
            if why:
                problems.append(f"{where}: {why}")
    return problems


def uses(stage: StageSpec) -> list[str]:
    """The earlier stages whose outputs ``stage`` reads, in order of first use."""
    found = [p.split(".")[0] for v in stage.overrides.values() for p in placeholders(v)]
    return list(dict.fromkeys(p for p in found if p not in ("root", "demo_data")))


def outputs_table(spec: PipelineSpec, index: int, root: Path) -> dict[str, str]:
    """Placeholder -> path, for what stage ``index`` may use (the stages before it)."""
    table = {"root": str(root)}
    if spec.demo_data:
        table["demo_data"] = str(Path(spec.demo_data).expanduser().resolve())
    for stage in spec.stages[:index]:
        table[f"{stage.name}.dir"] = str(root / stage.name)
        for output in ("policy", "reward_model"):
            table[f"{stage.name}.{output}"] = str(root / stage.name / output)
    return table


def yaml_value(value: Any) -> str:
    """``value`` as train's ``key=value`` reads it back (YAML): plain strings as they are."""
    if isinstance(value, str):
        try:
            if yaml.safe_load(value) == value:
                return value
        except yaml.YAMLError:  # "{x} y" is no YAML: quoted below
            pass
    text = yaml.safe_dump(value, default_flow_style=True, width=1 << 30)
    return text.removesuffix("\n...\n").strip()


def stage_args(spec: PipelineSpec, index: int, root: Path) -> list[str]:
    """Stage ``index``'s arguments to ``python -m orchestration.train``."""
    stage = spec.stages[index]
    table = outputs_table(spec, index, root)
    config = stage.config if stage.config in presets() else str(Path(stage.config).resolve())
    args = ["--config", config, f"logging.root={root}", f"logging.name={stage.name}"]
    args.append("resume=auto")
    args += [f"{k}={yaml_value(substitute(v, table))}" for k, v in stage.overrides.items()]
    return args


def stage_kind(stage: StageSpec) -> str:
    """What the stage trains (train's ``stage``: rl, sft or rm), from its overrides or its
    config file."""
    if "stage" in stage.overrides:
        return str(stage.overrides["stage"])
    path = PRESET_DIR / f"{stage.config}.yaml" if stage.config in presets() else Path(stage.config)
    if not path.is_file():
        raise PipelineError(
            f"stages.{stage.name}.config: {stage.config!r} is neither a preset "
            f"({', '.join(presets())}) nor a YAML file"
        )
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise PipelineError(f"stages.{stage.name}.config: {path} is not valid YAML ({e})") from e
    return str(tree.get("stage", "rl")) if isinstance(tree, dict) else "rl"


def output_problems(spec: PipelineSpec, kinds: dict[str, str]) -> list[str]:
    """Placeholders naming an output the stage does not write (``{sft.reward_model}``)."""
    problems = []
    for stage in spec.stages:
        for key, value in stage.overrides.items():
            for name in placeholders(value):
                source, _, output = name.partition(".")
                if output in OUTPUTS and kinds[source] not in OUTPUTS[output]:
                    problems.append(
                        f"stages.{stage.name}.overrides.{key}: {{{name}}}: stage {source} is "
                        f"a stage={kinds[source]} run, which writes no {output}/"
                    )
    return problems


# ------------------------------------------------------------------------------ loading


def pipelines() -> list[str]:
    return sorted(p.stem for p in PIPELINE_DIR.glob("*.yaml"))


def set_key(tree: dict, key: str, value: Any) -> None:
    """One ``key=value`` override of the pipeline file: ``root=...``, ``demo_data=...``, or
    ``stages.<name or index>.<field>`` (``stages.sft.overrides.learner.lr=1e-3``)."""
    parts = key.split(".")
    if parts[0] != "stages":
        if len(parts) > 1:
            raise PipelineError(f"override {key}: {parts[0]} is a value, not a section")
        tree[key] = value
        return
    if len(parts) < 3 or (len(parts) > 3 and parts[2] != "overrides"):
        raise PipelineError(
            f"override {key}: give stages.<stage>.<field> or stages.<stage>.overrides.<key>"
        )
    stages = tree.get("stages") if isinstance(tree.get("stages"), list) else []
    found = [
        s
        for i, s in enumerate(stages)
        if isinstance(s, dict) and parts[1] in (s.get("name"), str(i))
    ]
    if not found:
        named = [str(s.get("name")) for s in stages if isinstance(s, dict)]
        raise PipelineError(f"override {key}: no stage {parts[1]!r} (stages: {', '.join(named)})")
    if len(parts) == 3:
        found[0][parts[2]] = value
    else:
        found[0].setdefault("overrides", {})[".".join(parts[3:])] = value


def _describe(error: dict, tree: dict) -> str:
    loc = list(error["loc"])
    if len(loc) > 1 and loc[0] == "stages" and isinstance(loc[1], int):
        stages = tree.get("stages")
        name = stages[loc[1]].get("name") if isinstance(stages[loc[1]], dict) else None
        loc[1] = name if isinstance(name, str) and re.fullmatch(r"[a-z0-9_-]+", name) else loc[1]
    where = ".".join(str(p) for p in loc)
    msg = error["msg"].removeprefix("Value error, ")
    if not where:
        return msg  # the cross-stage rules: every line names its field
    if error["type"] == "extra_forbidden":
        known = list((StageSpec if len(loc) == 3 else PipelineSpec).model_fields)
        close = difflib.get_close_matches(str(loc[-1]), known, n=1)
        hint = f"did you mean '{close[0]}'?" if close else f"known keys: {', '.join(known)}"
        return f"{where}: unknown key; {hint}"
    if "input" in error and error["type"] != "missing" and not isinstance(error["input"], dict):
        return f"{where}: {msg} (got {error['input']!r})"
    return f"{where}: {msg}"


def read_pipeline(source: str, overrides: list[str] = ()) -> PipelineSpec:
    """The validated pipeline from a name in ``orchestration/pipelines/`` or a YAML file, plus
    ``key=value`` overrides.

    Raises:
        PipelineError: listing every problem as ``<field>: <what is wrong and what to do>``.
    """
    path = PIPELINE_DIR / f"{source}.yaml" if source in pipelines() else Path(source)
    if not path.is_file():
        raise PipelineError(
            f"--config {source!r} is neither a pipeline ({', '.join(pipelines())}) nor a file"
        )
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise PipelineError(f"{path}: not valid YAML ({e})") from e
    if not isinstance(tree, dict):
        raise PipelineError(f"{path}: the top level must be a mapping (name, root, stages)")
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise PipelineError(f"override {item!r} is not key=value (e.g. root=runs/p)")
        try:
            set_key(tree, key.strip(), yaml.safe_load(raw) if raw.strip() else None)
        except yaml.YAMLError as e:
            raise PipelineError(f"override {key}: {raw!r} is not valid YAML ({e})") from e
    try:
        spec = PipelineSpec.model_validate(tree)
    except ValidationError as e:
        lines = [_describe(err, tree) for err in e.errors()]
        raise PipelineError(f"{path}: invalid pipeline:\n  " + "\n  ".join(lines)) from None
    problems = output_problems(spec, {s.name: stage_kind(s) for s in spec.stages})
    if problems:
        raise PipelineError(f"{path}: invalid pipeline:\n  " + "\n  ".join(problems))
    return spec
