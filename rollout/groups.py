"""How much the scores of one prompt's group of samples vary: the signal a group-relative method
(GRPO, RLOO, DAPO) learns from, since a group whose scores are all equal gets zero advantage.

Pure numpy. Unscorable samples (NaN, inf) are left out of every group; a group with fewer than
two finite scores has spread 0. Used by dynamic sampling (``orchestration.reward_stage``), the
offline prompt filter (``orchestration.filter_prompts``) and the ``reward/zero_spread_groups``
metric (:func:`zero_spread_fraction`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Literal

import numpy as np

SpreadMeasure = Literal["std", "ptp"]
"""``std``: the population standard deviation (ddof 0), what ``min_std`` thresholds compare
with. ``ptp``: max - min, exactly 0 when the scores are all equal (the std of equal floats can
be a rounding error above 0, e.g. seven float32 0.1 give 7.5e-9)."""


@dataclass(frozen=True, eq=False)
class GroupSpread(Mapping[int, float]):
    """Per-group statistics of the finite scores, one entry per group id in ``ids``.

    Also a mapping ``group id -> spread`` (``spread[gid]``, ``dict(spread)``).
    """

    ids: np.ndarray  # (G,) group ids
    count: np.ndarray  # (G,) int64: finite scores in the group
    mean: np.ndarray  # (G,) float64: their mean, NaN when the group has none
    spread: np.ndarray  # (G,) float64: their std or ptp (see SpreadMeasure), 0 when count < 2

    @cached_property
    def _by_id(self) -> dict[int, float]:
        return dict(zip(self.ids.tolist(), self.spread.tolist(), strict=True))

    def __getitem__(self, gid: int) -> float:
        return self._by_id[gid]

    def __iter__(self) -> Iterator[int]:
        return iter(self._by_id)

    def __len__(self) -> int:
        return int(self.ids.size)


def group_spread(
    scores: np.ndarray,
    group_ids: np.ndarray,
    *,
    measure: SpreadMeasure = "std",
    ids: np.ndarray | None = None,
) -> GroupSpread:
    """Spread, count and mean of each group's finite scores.

    Args:
        scores: (N,) float scores, NaN = unscorable. Each group's statistics are computed in
            this dtype (a float32 std is not rounded like a float64 one).
        group_ids: (N,) int group of each score (prompt id, dataset row, dense group index).
        measure: ``"std"`` or ``"ptp"``, see :data:`SpreadMeasure`.
        ids: (G,) the groups to report, in this order, including groups with no scores
            (count 0, spread 0, mean NaN); default: every group in ``group_ids``, sorted.
    """
    scores, group_ids = np.asarray(scores), np.asarray(group_ids)
    ids = np.unique(group_ids) if ids is None else np.asarray(ids)
    spread_of = np.std if measure == "std" else np.ptp
    count = np.zeros(ids.size, np.int64)
    mean = np.full(ids.size, np.nan)
    spread = np.zeros(ids.size)
    finite = np.isfinite(scores)
    for i, gid in enumerate(ids.tolist()):
        s = scores[(group_ids == gid) & finite]
        count[i] = s.size
        if s.size:
            mean[i] = float(s.mean())
        if s.size > 1:
            spread[i] = float(spread_of(s))
    return GroupSpread(ids=ids, count=count, mean=mean, spread=spread)


def zero_spread_fraction(scores: np.ndarray, group_ids: np.ndarray) -> float:
    """Fraction of groups whose finite scores are all equal: with group baselines (GRPO, RLOO)
    they get zero advantage and teach nothing. Groups with fewer than two finite scores are
    left out; NaN when no group has two.

    Args:
        scores: (N,) float scores, NaN = unscorable.
        group_ids: (N,) int group of each score.
    """
    groups = group_spread(scores, group_ids, measure="ptp")
    judged = groups.count >= 2
    if not judged.any():
        return float("nan")
    return int((groups.spread[judged] == 0).sum()) / int(judged.sum())
