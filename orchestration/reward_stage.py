"""The reward stage of an iteration: every reward actor scores the batch, the driver combines
and shapes the components into ``score``, and (optionally) drops groups that teach nothing.

The reward actors (rule functions, each reward model, each remote service) score the same table
in parallel and return only their small ``reward/<name>`` columns; the big table stays in the
object store. The combination and the shaping (``reward_service.shaping``) run here because
they keep state across iterations: the running statistics and the reference baselines.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from orchestration import calls
from reward_service.shaping import RewardShaper, ShapingSpec
from rollout import schema as S
from rollout.groups import group_spread
from rollout.ops import append_columns

DATASET_ROW = S.DATASET_ROW  # which dataset prompt a sample answers
ENVIRONMENT_COMPONENT = "environment"  # multi-turn episodes: the environment's own rewards
FAULTED = "faulted"  # multi-turn episodes ended by a tool or environment fault


@ray.remote(num_cpus=0)
def warm_worker() -> None:
    """Nothing, in a task worker: run while the actors start, it leaves an idle worker with
    this module imported for the first reward stage, whose tasks otherwise wait for a new
    worker process (about 2.3 s of the first iteration on two cores)."""


@ray.remote(num_cpus=0)
def _reward_inputs(table: pa.Table) -> dict[str, np.ndarray]:
    """The few per-row values shaping needs, so the driver never pulls the whole table."""
    rows = table[DATASET_ROW] if DATASET_ROW in table.column_names else table[S.PROMPT_ID]
    extra = {}
    if S.EPISODE_REWARD in table.column_names:
        extra[ENVIRONMENT_COMPONENT] = S.column_array(table, S.EPISODE_REWARD)
        # "<tool or environment>:<fault>": the episode ended by no doing of the model's
        ends = S.column_array(table, S.EPISODE_END)
        extra[FAULTED] = np.asarray(pc.match_substring(ends, ":").to_numpy(zero_copy_only=False))
    return extra | {
        "finish_reason": np.asarray(S.column_array(table, S.FINISH_REASON).to_pylist()),
        "response_length": pc.list_value_length(S.column_array(table, S.RESPONSE_TOKEN_IDS))
        .to_numpy()
        .astype(np.int64),
        "row": rows.to_numpy(),
        "prompt_id": S.column_array(table, S.PROMPT_ID).to_numpy(),
    }


@ray.remote(num_cpus=0)
def _finish(table: pa.Table, columns: pa.Table, score: np.ndarray, keep) -> pa.Table:
    """``table`` with the reward columns and ``score`` appended, then only rows ``keep``."""
    new = {name: columns[name] for name in columns.column_names}
    new[S.SCORE] = pa.array([None if not np.isfinite(v) else float(v) for v in score], pa.float32())
    out = append_columns(table, new)
    return out if keep is None else out.take(pa.array(keep, pa.int64()))


@dataclass
class Scored:
    """One batch after the reward actors: the table (ref), its components and shaped score."""

    table: ray.ObjectRef  # the generated table, columns not yet appended
    columns: pa.Table  # reward/<name> columns
    score: np.ndarray  # (N,) float32, NaN = unscorable
    prompt_ids: np.ndarray  # (N,)
    metrics: dict[str, float]

    def finish(self, keep: np.ndarray | None = None) -> ray.ObjectRef:
        return _finish.remote(self.table, self.columns, self.score, keep)


class RewardStage:
    """Scores batches with the run's reward actors and shapes the result.

    A reward component that fails on some samples (a rule function that raises, returns a
    non-number or hangs; a remote service whose batch fails) is reported once per run, when it
    first fails, with its first error; later failures are only counted in the metrics.
    """

    def __init__(self, shaping: ShapingSpec, scorers: list, timeout: float):
        self.scorers, self.timeout = scorers, timeout
        self.shaper = RewardShaper(shaping)
        self.reported: set[str] = set()  # components whose first failure was printed
        self.last_metrics: dict[str, float] = {}
        self.last_faulted = 0  # episodes of the last batch a tool or environment fault ended

    def _components(self, table: ray.ObjectRef) -> tuple[pa.Table, dict, dict[str, float]]:
        parts = [s.score.options(num_returns=2).remote(table) for s in self.scorers]
        inputs = _reward_inputs.remote(table)
        tables = calls.wait([c for c, _ in parts], "reward", self.timeout)
        metrics: dict[str, float] = {}
        for m in calls.wait([m for _, m in parts], "reward", self.timeout):
            metrics |= m
        columns = tables[0]
        for t in tables[1:]:
            for name in t.column_names:
                columns = columns.append_column(name, t[name])
        inputs = calls.wait(inputs, "reward", self.timeout)
        if ENVIRONMENT_COMPONENT in inputs:  # multi-turn episodes: the environment's rewards
            name = S.REWARD_COLUMN_PREFIX + ENVIRONMENT_COMPONENT
            columns = columns.append_column(name, inputs.pop(ENVIRONMENT_COMPONENT))
        self.last_metrics = metrics
        failing = {k for k in _failing(metrics) if k not in self.reported}
        if failing:
            for name, problem in sorted(self.problems().items()):
                if name in failing:
                    print(
                        f"warning: {problem.describe(name)}; its failed samples are unscorable "
                        f"and counted in reward/errors/{name} (reported once)",
                        flush=True,
                    )
                    self.reported.add(name)
        return columns, inputs, metrics

    def problems(self) -> dict:
        """Every reward actor's failing components: name -> ``scorer.Problem``."""
        out: dict = {}
        for part in calls.wait([s.problems.remote() for s in self.scorers], "reward", self.timeout):
            out |= part
        return out

    def describe_unscorable(self) -> str:
        """Why samples were unscorable, per component, for the run's stop message: each failing
        function's first error, and the components that judged every sample unscorable."""
        lines = [p.describe(name) for name, p in sorted(self.problems().items())]
        if self.last_faulted:
            lines.append(
                f"{self.last_faulted} episodes ended by a tool or environment fault "
                "(episode/end/<tool>:<reason>; the generator's log has the first of each)"
            )
        for key, count in sorted(self.last_metrics.items()):
            name = key.removeprefix("reward/").removesuffix("/unscorable")
            failed = self.last_metrics.get(f"reward/errors/{name}", 0)
            if key.endswith("/unscorable") and count > 0 and not failed and name != "unscorable":
                lines.append(f"{name!r} returned None (unscorable) for {count:.0f} samples")
        return "; ".join(lines) + "." if lines else ""

    def components(self, table: ray.ObjectRef) -> tuple[pa.Table, dict[str, float]]:
        """Every component's ``reward/<name>`` column and the scorers' metrics, unshaped."""
        columns, _, metrics = self._components(table)
        return columns, metrics

    def score(self, table: ray.ObjectRef) -> Scored:
        """Components from every reward actor, then the shaped ``score``."""
        columns, inputs, metrics = self._components(table)
        score, shaping = self.shaper(
            _as_numpy(columns),
            finish_reasons=inputs["finish_reason"],
            response_lengths=inputs["response_length"],
            rows=inputs["row"],
        )
        if FAULTED in inputs:  # a broken tool says nothing of the policy: unscorable, no update
            score = np.where(inputs[FAULTED], np.float32("nan"), score).astype(np.float32)
            shaping["episode/faulted_fraction"] = float(inputs[FAULTED].mean())
            self.last_faulted = int(inputs[FAULTED].sum())
        return Scored(table, columns, score, inputs["prompt_id"], metrics | shaping)

    def set_baselines(self, table: ray.ObjectRef) -> dict[str, float]:
        """Reference baselines from a table of the reference policy's own responses: the
        combined (unshaped) score of each dataset prompt's responses, averaged."""
        columns, inputs, _ = self._components(table)
        raw = self.shaper.raw(_as_numpy(columns))
        return self.shaper.set_baselines(inputs["row"], raw)


def _failing(metrics: dict[str, float]) -> set[str]:
    """Components with failures in one batch's metrics (``reward/errors/<name>`` of the rule
    functions, ``reward/<name>/failed_batches`` of remote services)."""
    out = set()
    for key, value in metrics.items():
        if value <= 0:
            continue
        if key.startswith("reward/errors/"):
            out.add(key.removeprefix("reward/errors/"))
        elif key.endswith("/failed_batches"):
            out.add(key.removeprefix("reward/").removesuffix("/failed_batches"))
    return out


def _as_numpy(columns: pa.Table) -> dict[str, np.ndarray]:
    """``reward/<name>`` columns as name -> (N,) float64 with NaN for null."""
    prefix = S.REWARD_COLUMN_PREFIX
    return {
        name.removeprefix(prefix): np.array(
            columns[name].combine_chunks().fill_null(float("nan")).to_numpy(zero_copy_only=False),
            np.float64,
        )
        for name in columns.column_names
    }


def select_groups(
    batches: list[Scored], wanted: int, min_std: float
) -> tuple[list[np.ndarray], dict[str, float]]:
    """DAPO's dynamic sampling over the rounds generated so far.

    Keeps the first ``wanted`` groups (prompts) whose score spread (the std of their finite
    scores, ``rollout.groups.group_spread``) is above ``min_std``; if fewer exist, fills up
    with dropped groups, in order. Returns, per batch, the row indices to keep, and the metrics
    (``rollout/groups_dropped_fraction`` over all groups seen).
    """
    informative, flat = [], []
    for b, batch in enumerate(batches):
        spread = group_spread(batch.score, batch.prompt_ids)
        for gid in dict.fromkeys(batch.prompt_ids.tolist()):  # groups in order of appearance
            (informative if spread[gid] > min_std else flat).append((b, gid))
    chosen = informative[:wanted]
    refill = flat[: wanted - len(chosen)]
    chosen_set = set(chosen + refill)
    keep = []
    for b, batch in enumerate(batches):
        mask = np.array([(b, g) in chosen_set for g in batch.prompt_ids.tolist()], bool)
        keep.append(np.flatnonzero(mask))
    seen = len(informative) + len(flat)
    return keep, {
        "rollout/groups_dropped_fraction": len(flat) / seen if seen else 0.0,
        "rollout/sampling_rounds": float(len(batches)),
        "rollout/groups_refilled_with_dropped": float(len(refill)),
    }


def enough_groups(batches: list[Scored], wanted: int, min_std: float) -> bool:
    """Whether the rounds so far hold ``wanted`` informative groups."""
    spreads = [group_spread(batch.score, batch.prompt_ids).spread for batch in batches]
    return sum(int((s > min_std).sum()) for s in spreads) >= wanted
