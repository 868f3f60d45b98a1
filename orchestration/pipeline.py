"""Pipelines of training stages: each stage one run of ``orchestration.train``, its outputs the
inputs of the stages after it; a finished stage is skipped, an interrupted one resumed.

    python -m orchestration.pipeline --config demo [--from STAGE | --only STAGE] [key=value ...]

``--config`` takes a pipeline in ``orchestration/pipelines/`` (``demo``: SFT -> reward model ->
PPO on the built-in task) or a YAML file; ``key=value`` overrides apply to that file, values
parsed as YAML (``root=/tmp/p``, ``stages.sft.overrides.iterations=10``). The file::

    name: demo                   # for messages
    root: runs/pipeline          # stage S runs in <root>/S
    demo_data: data/pipeline     # optional: orchestration.pipeline_data's files, written if missing
    stages:
      - name: sft                # [a-z0-9_-]+, unique
        config: pipeline-sft     # a preset or a YAML file, as train's --config
        overrides: {iterations: 150}
        metric: sft/loss         # optional: the metrics.jsonl key the table shows
      - name: rm
        config: pipeline-rm
        overrides: {model.path: "{sft.policy}"}

Override values may name what an earlier stage wrote: ``{S.policy}`` (``<root>/S/policy``),
``{S.reward_model}``, ``{S.dir}`` (``<root>/S``), and ``{demo_data}`` and ``{root}``; ``{{`` and
``}}`` are literal braces. Quote them in YAML (``"{sft.policy}"``), or they read as a mapping.

Stage S runs as ``python -m orchestration.train --config C logging.root=<root> logging.name=S
resume=auto <overrides>``, a process (and a Ray) of its own, its output on the console. The
pipeline's record is ``<root>/pipeline.json``: per stage its arguments and their hash, status,
wall time and metric, and the table. Before anything runs, each stage is decided:

1. ``summary.json`` written and recorded with these arguments: done, skipped;
2. done but its arguments changed, or an earlier stage it reads from was made again since: an
   error naming the changes; ``--from S`` redoes S and every stage after it, their directories
   renamed to ``<root>/<S>.replaced-<UTC time>`` (never deleted);
3. a directory without ``summary.json``: interrupted; run again, and ``resume=auto`` continues
   from its newest checkpoint;
4. no directory: run.

``--only S`` runs S alone (the outputs it reads must exist). Exit codes: 0 done; 2 a bad pipeline
file or state (nothing runs); a failing stage's own code (the pipeline stops there); 130 Ctrl-C.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path

from orchestration.pipeline_spec import (
    DEFAULT_METRIC,
    DEMO_FILES,
    FIRST_LAST,
    STATE_FILE,
    PipelineError,
    PipelineSpec,
    outputs_table,
    pipelines,
    placeholders,
    read_pipeline,
    stage_args,
    stage_kind,
    uses,
)

# ------------------------------------------------------------------------------ decisions


class Action(str, Enum):
    SKIP = "skip"  # done with these arguments
    RUN = "run"  # no directory yet
    RESUME = "resume"  # interrupted: resume=auto continues from its newest checkpoint
    REDO = "redo"  # --from: the directory renamed away, then run


@dataclass(frozen=True)
class OnDisk:
    """What a stage's run directory holds."""

    exists: bool
    finished: bool  # summary.json written


@dataclass(frozen=True)
class Step:
    stage: str
    action: Action
    note: str = ""


def args_hash(args: list[str]) -> str:
    return hashlib.sha256(json.dumps(args).encode()).hexdigest()[:16]


def _as_map(args: list[str]) -> dict[str, str]:
    out = {"--config": args[args.index("--config") + 1]} if "--config" in args else {}
    out |= dict(a.partition("=")[::2] for a in args if "=" in a)
    return out


def changed_args(old: list[str], new: list[str]) -> list[str]:
    """``key: old -> new`` for every argument that differs between two stage argument lists."""
    a, b = _as_map(old), _as_map(new)
    return [
        f"{k}: {a.get(k, '<absent>')} -> {b.get(k, '<absent>')}"
        for k in sorted(set(a) | set(b))
        if a.get(k) != b.get(k)
    ]


def decide(name: str, args: list[str], disk: OnDisk, record: dict | None) -> Step:
    """What to do with one stage left to the rules (no ``--from``): see the module docstring.

    Raises:
        PipelineError: a finished stage whose arguments changed, or one with no record.
    """
    if not disk.exists:
        return Step(name, Action.RUN, "new")
    same = record is not None and record.get("args_hash") == args_hash(args)
    redo = (
        f"pass --from {name} to redo it and every stage after it (their directories are "
        "kept, renamed)"
    )
    if disk.finished and same and record.get("status") != "failed":
        return Step(name, Action.SKIP, "done")
    if disk.finished and record is None:
        raise PipelineError(
            f"stage {name}: its directory holds a finished run this pipeline has no record of; "
            + redo
        )
    if disk.finished and not same:
        changes = changed_args(record.get("args", []), args)
        raise PipelineError(
            f"stage {name} is done, but its arguments changed:\n    "
            + "\n    ".join(changes)
            + f"\n  {redo}"
        )
    note = "interrupted (no summary.json): resume=auto continues from its newest checkpoint"
    if record is not None and not same:
        changes = changed_args(record.get("args", []), args)
        note += "; its arguments changed since (" + "; ".join(changes) + ")"
    return Step(name, Action.RESUME, note)


def plan(
    stages: list[str],
    args: dict[str, list[str]],
    inputs: dict[str, list[str]],
    disk: dict[str, OnDisk],
    records: dict[str, dict],
    *,
    only: str | None = None,
    start: str | None = None,
) -> list[Step]:
    """The steps of this invocation, in order (``inputs``: the stages each one reads from;
    ``records``: pipeline.json's; ``start``: ``--from``). Pure: nothing is read or run.

    Raises:
        PipelineError: every stage that cannot be decided, one line (or block) each.
    """
    problems, steps, remade = [], [], set()
    first_redo = stages.index(start) if start is not None else len(stages)
    for i, name in enumerate(stages):
        if only is not None and name != only:
            continue
        if i >= first_redo:
            action = Action.REDO if disk[name].exists else Action.RUN
            steps.append(Step(name, action, f"--from {start}"))
            remade.add(name)
            continue
        try:
            step = decide(name, args[name], disk[name], records.get(name))
        except PipelineError as e:
            problems.append(str(e))
            continue
        if start is not None and step.action is not Action.SKIP:
            problems.append(
                f"stage {name} comes before --from {start} but is not done ({step.note}); run "
                f"the pipeline without --from first, or pass --from {name}"
            )
            continue
        if step.action is Action.SKIP:
            made = records[name].get("inputs", {})
            stale = [
                u
                for u in inputs[name]
                if u in remade or records.get(u, {}).get("finished_at") != made.get(u)
            ]
            if stale:
                problems.append(
                    f"stage {name} is done, but {', '.join(stale)}, whose outputs it reads, was "
                    f"made again since (or will be now); pass --from {name} to redo it and every "
                    "stage after it"
                )
                continue
        else:
            remade.add(name)
        steps.append(step)
    if problems:
        raise PipelineError("\n".join(problems))
    return steps


# ------------------------------------------------------------------------------ the table


@dataclass(frozen=True)
class Row:
    stage: str
    status: str
    wall_s: float | None
    metric: str
    before: float | None
    after: float | None


def metric_change(run_dir: Path, metric: str | None) -> tuple[float | None, float | None]:
    """``(before, after)``: the mean of ``metric`` over the first and the last FIRST_LAST records
    of ``metrics.jsonl`` that have it; with no metric, the summary's reward (or loss) first and
    last. None where there is nothing to read."""
    if metric is None:
        path = run_dir / "summary.json"
        summary = json.loads(path.read_text()) if path.is_file() else {}
        for what in ("reward", "loss"):
            if f"{what}_first" in summary:
                return summary[f"{what}_first"], summary[f"{what}_last"]
        return None, None
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    values = [r[metric] for r in map(json.loads, filter(str.strip, lines)) if metric in r]
    if not values:
        return None, None
    n = min(FIRST_LAST, len(values))
    return sum(values[:n]) / n, sum(values[-n:]) / n


def _number(x: float | None, spec: str = ".4g") -> str:
    return "-" if x is None else format(x, spec)


def format_table(rows: list[Row]) -> str:
    """The pipeline's table, columns aligned: stage | status | wall time (s) | metric | before
    -> after."""
    head = ("stage", "status", "wall time (s)", "metric", "before -> after")
    body = [
        (
            r.stage,
            r.status,
            _number(r.wall_s, ".1f"),
            r.metric,
            "-" if r.before is None else f"{_number(r.before)} -> {_number(r.after)}",
        )
        for r in rows
    ]
    widths = [max(len(line[i]) for line in (head, *body)) for i in range(len(head))]
    lines = [
        " | ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) for line in (head, *body)
    ]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(line.rstrip() for line in lines)


# ------------------------------------------------------------------------------ running


@dataclass(frozen=True)
class Resolved:
    """The pipeline made concrete: absolute root, each stage's train arguments, kind and inputs."""

    spec: PipelineSpec
    root: Path
    args: dict[str, list[str]]
    kinds: dict[str, str]
    inputs: dict[str, list[str]]

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.spec.stages]

    def metric(self, name: str) -> str:
        stage = self.spec.stages[self.names.index(name)]
        return stage.metric or DEFAULT_METRIC.get(self.kinds[name], "summary")


def resolve(spec: PipelineSpec) -> Resolved:
    root = Path(spec.root).expanduser().resolve()
    return Resolved(
        spec,
        root,
        {s.name: stage_args(spec, i, root) for i, s in enumerate(spec.stages)},
        {s.name: stage_kind(s) for s in spec.stages},
        {s.name: uses(s) for s in spec.stages},
    )


def missing_inputs(spec: PipelineSpec, name: str, root: Path) -> list[str]:
    """The paths of earlier stages' outputs that stage ``name`` reads and that do not exist."""
    index = [s.name for s in spec.stages].index(name)
    table = outputs_table(spec, index, root)
    wanted = [
        table[p]
        for v in spec.stages[index].overrides.values()
        for p in placeholders(v)
        if p not in ("root", "demo_data")
    ]
    return [p for p in dict.fromkeys(wanted) if not os.path.exists(p)]


def ensure_demo_data(path: Path) -> None:
    """``orchestration.pipeline_data``'s files in ``path``, written if none is there."""
    missing = [f for f in DEMO_FILES if not (path / f).is_file()]
    if len(missing) == len(DEMO_FILES):
        from orchestration import pipeline_data

        print(f"demo data: writing {path}", flush=True)
        pipeline_data.main(["--out", str(path)])
    elif missing:
        raise PipelineError(
            f"demo_data: {path} lacks {', '.join(missing)}; write all of them with "
            f"python -m orchestration.pipeline_data --out {path}"
        )


def now() -> str:
    return datetime.now(timezone.utc).isoformat()


class State:
    """``<root>/pipeline.json``: the pipeline's record, written whole after every change."""

    def __init__(self, resolved: Resolved):
        self.path = resolved.root / STATE_FILE
        self.resolved = resolved
        data = json.loads(self.path.read_text()) if self.path.is_file() else {}
        self.records: dict[str, dict] = data.get("stages", {})
        self.skipped: set[str] = set()

    def rows(self) -> list[Row]:
        rows = []
        for name in self.resolved.names:
            r = self.records.get(name, {})
            status = "skipped" if name in self.skipped else r.get("status", "pending")
            rows.append(
                Row(
                    name,
                    status,
                    r.get("wall_s"),
                    self.resolved.metric(name),
                    r.get("before"),
                    r.get("after"),
                )
            )
        return rows

    def write(self) -> None:
        rows = self.rows()
        data = {
            "name": self.resolved.spec.name,
            "root": str(self.resolved.root),
            "stages": self.records,
            "table": [vars(r) for r in rows],
            "table_text": format_table(rows),
        }
        self.resolved.root.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(data, indent=2))
        tmp.replace(self.path)


def rename_away(run_dir: Path) -> Path:
    """Move ``run_dir`` to ``<run_dir>.replaced-<UTC time>`` (a free name); returns it."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    target, n = run_dir.with_name(f"{run_dir.name}.replaced-{stamp}"), 1
    while target.exists():
        target, n = run_dir.with_name(f"{run_dir.name}.replaced-{stamp}-{n}"), n + 1
    run_dir.rename(target)
    return target


def run_train(args: list[str]) -> int:
    """``python -m orchestration.train <args>`` in a process of its own, output on the console."""
    proc = subprocess.Popen([sys.executable, "-m", "orchestration.train", *args])
    try:
        return proc.wait()
    except KeyboardInterrupt:  # Ctrl-C reached the stage too (one process group): let it stop
        proc.wait()
        return 130


def run_step(state: State, step: Step, position: str) -> int:
    """One stage: run it, and record it in pipeline.json as it starts and ends."""
    resolved, name = state.resolved, step.stage
    run_dir = resolved.root / name
    missing = missing_inputs(resolved.spec, name, resolved.root)
    if missing:
        raise PipelineError(f"stage {name}: its inputs do not exist: {', '.join(missing)}")
    args = resolved.args[name]
    previous = state.records.get(name, {})
    carried = (previous.get("wall_s") or 0.0) if step.action is Action.RESUME else 0.0
    if step.action is Action.RESUME:
        print(f"stage {name} {position}: {step.note}", flush=True)
    print(f"stage {name} {position}: python -m orchestration.train {' '.join(args)}", flush=True)
    state.records[name] = {
        "args": args,
        "args_hash": args_hash(args),
        "status": "running",
        "started_at": now(),
        "inputs": {u: state.records.get(u, {}).get("finished_at") for u in resolved.inputs[name]},
    }
    state.write()
    start = time.perf_counter()
    code = run_train(args)
    before, after = metric_change(run_dir, resolved.spec.stages[resolved.names.index(name)].metric)
    state.records[name] |= {
        "status": "done" if code == 0 else "failed",
        "exit_code": code,
        "finished_at": now(),
        "wall_s": carried + time.perf_counter() - start,
        "metric": resolved.metric(name),
        "before": before,
        "after": after,
    }
    state.write()
    return code


def execute(resolved: Resolved, only: str | None, start: str | None) -> int:
    """Plan, then run the steps in order; returns the exit code."""
    state = State(resolved)
    names = resolved.names
    disk = {
        n: OnDisk((resolved.root / n).is_dir(), (resolved.root / n / "summary.json").is_file())
        for n in names
    }
    steps = plan(names, resolved.args, resolved.inputs, disk, state.records, only=only, start=start)
    if only is not None and steps[0].action is not Action.SKIP:
        missing = missing_inputs(resolved.spec, only, resolved.root)
        if missing:
            raise PipelineError(f"--only {only}: its inputs do not exist: {', '.join(missing)}")
    print(
        f"pipeline {resolved.spec.name} in {resolved.root}: "
        + ", ".join(f"{s.stage} ({s.action.value})" for s in steps),
        flush=True,
    )
    if resolved.spec.demo_data and any(s.action is not Action.SKIP for s in steps):
        ensure_demo_data(Path(resolved.spec.demo_data).expanduser().resolve())
    for step in steps:  # --from: every redone stage moved away before the first one runs
        if step.action is Action.REDO:
            moved = rename_away(resolved.root / step.stage)
            state.records.pop(step.stage, None)
            print(f"stage {step.stage}: {step.note}: moved its directory to {moved}", flush=True)
    for k, step in enumerate(steps, 1):
        if step.action is Action.SKIP:
            r = state.records[step.stage]
            change = f"{_number(r.get('before'))} -> {_number(r.get('after'))}"
            print(
                f"stage {step.stage}: done ({resolved.metric(step.stage)} {change}, "
                f"{_number(r.get('wall_s'), '.0f')} s), skipped",
                flush=True,
            )
            state.skipped.add(step.stage)
            continue
        code = run_step(state, step, f"({k}/{len(steps)})")
        if code != 0 or k < len(steps):
            print(format_table(state.rows()), flush=True)
        if code != 0:
            print(
                f"error: stage {step.stage} failed (exit {code}); its output is above and its "
                f"actors' in {resolved.root / step.stage}/logs/. Fix the cause and run the same "
                f"command again: finished stages are skipped and {step.stage} continues from "
                f"its newest checkpoint (resume=auto); --from {step.stage} starts it over",
                file=sys.stderr,
                flush=True,
            )
            return code
    state.write()
    print(format_table(state.rows()), flush=True)
    print(f"pipeline {resolved.spec.name}: done; record: {state.path}", flush=True)
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m orchestration.pipeline",
        description="Run a pipeline of training stages (each a run of orchestration.train); "
        "finished stages are skipped, an interrupted one resumed.",
    )
    parser.add_argument(
        "--config", default="demo", help=f"a pipeline ({', '.join(pipelines())}) or a YAML file"
    )
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--only", metavar="STAGE", help="run this stage alone")
    which.add_argument(
        "--from",
        dest="start",
        metavar="STAGE",
        help="redo this stage and every stage after it (their directories renamed, not deleted)",
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="overrides of the pipeline file, e.g. root=runs/p stages.sft.overrides.iterations=5",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        resolved = resolve(read_pipeline(args.config, args.overrides))
        for flag, name in (("--only", args.only), ("--from", args.start)):
            if name is not None and name not in resolved.names:
                raise PipelineError(
                    f"{flag} {name}: no such stage (stages: {', '.join(resolved.names)})"
                )
        return execute(resolved, args.only, args.start)
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
