"""Reward-model evaluation over scored preference pairs: ranking accuracy, overall and by how much
the two responses' lengths differ; the model's preference for length; and the calibration of
``p = sigmoid(r_w - r_l)`` as the probability that the chosen response is preferred.

Pure numpy. Results are JSON-able dicts, one file per evaluation set in ``<run_dir>/rm_eval/``
(``write_rm_eval``, ``read_rm_eval``), which the run report (``orchestration.report``) shows.

1. A tie (``r_w == r_l``) counts half wherever a share of pairs is taken, so a model that cannot
   tell two responses apart scores 0.5, not 0 or 1.
2. Calibration takes both orientations of every pair: ``p`` with outcome 1 and ``1 - p`` with
   outcome 0, so the bins mirror about 0.5 (the InstructGPT and Llama 2 reward-model plots).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

RM_EVAL_DIR = "rm_eval"  # under the run directory: one <name>.json per evaluation set


@dataclass(frozen=True)
class _Pairs:
    """n scored preference pairs: (n,) scores ``r_w``, ``r_l`` and (n,) lengths in tokens."""

    chosen: np.ndarray
    rejected: np.ndarray
    chosen_len: np.ndarray
    rejected_len: np.ndarray

    def __getitem__(self, at: np.ndarray) -> _Pairs:
        return _Pairs(
            self.chosen[at], self.rejected[at], self.chosen_len[at], self.rejected_len[at]
        )


def _wins(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(n,) 1 where ``a > b``, 0.5 on a tie, 0 where ``a < b``."""
    return (a > b) + 0.5 * (a == b)


def _mean(x: np.ndarray) -> float | None:
    return float(np.mean(x)) if len(x) else None


def _longer_preferred(p: _Pairs) -> float | None:
    """Over pairs whose lengths differ, the share where the longer response scores higher (a tie
    half); None when no pair's lengths differ."""
    p = p[p.chosen_len != p.rejected_len]
    longer_first = p.chosen_len > p.rejected_len
    longer = np.where(longer_first, p.chosen, p.rejected)
    return _mean(_wins(longer, np.where(longer_first, p.rejected, p.chosen)))


def _correlation(x: np.ndarray, y: np.ndarray) -> float | None:
    """Pearson's r of ``x`` and ``y``; None when either is constant (r undefined)."""
    if len(x) < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return None
    return float(np.corrcoef(x, y)[0, 1])


def _check(p: _Pairs, edges: Sequence[int], bins: int) -> None:
    shapes = {k: a.shape for k, a in vars(p).items()}
    if len(set(shapes.values())) != 1 or p.chosen.ndim != 1:
        raise ValueError(f"rm_metrics takes four 1-D arrays of one length, got shapes {shapes}")
    for name in ("chosen", "rejected"):
        if bad := int((~np.isfinite(getattr(p, name))).sum()):
            raise ValueError(f"rm_metrics: {bad} non-finite score(s) in {name}")
    ints = all(isinstance(e, (int, np.integer)) for e in edges)
    if not ints or not len(edges) or edges[0] != 0 or (np.diff(edges) <= 0).any():
        raise ValueError(f"edges must be ascending integers starting at 0, got {list(edges)}")
    if bins < 1:
        raise ValueError(f"bins must be at least 1, got {bins}")


def _buckets(p: _Pairs, edges: Sequence[int]) -> list[dict]:
    """Accuracy and preference for length per bucket ``[edges[i], edges[i+1])`` of
    ``|len_chosen - len_rejected|``, the last one open-ended."""
    gap = np.abs(p.chosen_len - p.rejected_len)
    which = np.searchsorted(np.asarray(edges), gap, side="right") - 1  # (n,) bucket index
    out = []
    for i, lo in enumerate(edges):
        hi = edges[i + 1] if i + 1 < len(edges) else "inf"
        at = p[which == i]
        row = {"bucket": f"[{lo}, {hi})", "pairs": len(at.chosen)}
        row |= {"accuracy": _mean(_wins(at.chosen, at.rejected))}
        out.append(row | {"longer_preferred": _longer_preferred(at)})
    return out


def _calibration(chosen: np.ndarray, rejected: np.ndarray, bins: int) -> tuple[list[dict], float]:
    """Reliability bins of ``p = sigmoid(r_w - r_l)`` over both orientations, and the ECE.

    ``p`` falls in bin ``floor(p * bins)`` (``[lo, hi)``) and ``1 - p`` in its mirror
    ``bins - 1 - floor(p * bins)``, so each pair's two entries land in mirrored bins even when
    ``p`` is on an edge. A tied pair (``p = 1/2``) has outcome 1/2 in both orientations, as in
    accuracy: its orientation is arbitrary, and outcomes 1 and 0 in the two middle bins would
    read as miscalibration."""
    diff = chosen - rejected
    p = np.exp(-np.logaddexp(0.0, -diff))  # sigmoid without overflow
    outcome = np.where(diff == 0, 0.5, 1.0)
    index = np.minimum(np.floor(p * bins), bins - 1).astype(int)
    predicted = np.concatenate([p, 1 - p])  # (2n,)
    observed = np.concatenate([outcome, 1 - outcome])
    index = np.concatenate([index, bins - 1 - index])
    out, error = [], 0.0
    for i in range(bins):
        at = index == i
        if not at.any():
            continue
        row = {"lo": i / bins, "hi": (i + 1) / bins, "count": int(at.sum())}
        row |= {"predicted": float(predicted[at].mean()), "observed": float(observed[at].mean())}
        error += row["count"] * abs(row["predicted"] - row["observed"])
        out.append(row)
    return out, error / max(len(predicted), 1)


def rm_metrics(
    chosen: np.ndarray,
    rejected: np.ndarray,
    chosen_len: np.ndarray,
    rejected_len: np.ndarray,
    edges: Sequence[int],
    bins: int = 10,
) -> dict:
    """A reward model's metrics over n scored preference pairs (see the module docstring).

    Args:
        chosen, rejected: (n,) scores ``r_w``, ``r_l`` of each pair's preferred and other
            response.
        chosen_len, rejected_len: (n,) the two responses' lengths in tokens.
        edges: ascending integers from 0: bucket i of ``|len_chosen - len_rejected|`` is
            ``[edges[i], edges[i+1])``, the last ``[edges[-1], inf)``.
        bins: calibration bins of equal width over [0, 1].

    Returns a JSON-able dict: ``accuracy`` (share with ``r_w > r_l``), ``pairs``, ``buckets``
    (per bucket ``bucket``, ``pairs``, ``accuracy``, ``longer_preferred``; None when empty),
    ``length_correlation`` (Pearson's r of score and length over all 2n responses; None when
    either is constant), ``longer_preferred`` (over pairs of different lengths, the share where
    the longer response scores higher), ``calibration`` (non-empty bins: ``lo``, ``hi``,
    ``count``, mean ``predicted`` p, mean ``observed`` outcome) and ``ece`` (the count-weighted
    mean of ``|predicted - observed|``). Raises ValueError on mismatched shapes, non-finite
    scores or bad edges.
    """
    scores = np.asarray(chosen, float), np.asarray(rejected, float)
    p = _Pairs(*scores, np.asarray(chosen_len), np.asarray(rejected_len))
    _check(p, edges, bins)
    calibration, ece = _calibration(p.chosen, p.rejected, bins)
    return {
        "accuracy": _mean(_wins(p.chosen, p.rejected)),
        "pairs": len(p.chosen),
        "buckets": _buckets(p, edges),
        "length_correlation": _correlation(
            np.concatenate([p.chosen, p.rejected]), np.concatenate([p.chosen_len, p.rejected_len])
        ),
        "longer_preferred": _longer_preferred(p),
        "calibration": calibration,
        "ece": ece if len(p.chosen) else None,
    }


def write_rm_eval(run_dir: Path, name: str, metrics: dict) -> Path:
    """Write ``metrics`` to ``<run_dir>/rm_eval/<name>.json`` atomically (a temporary file, then
    ``os.replace``: a reader never sees half a file); returns the path."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name) or name.endswith(".json"):
        raise ValueError(f"rm eval name {name!r}: use letters, digits, '_', '-' and '.'")
    folder = Path(run_dir) / RM_EVAL_DIR
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    tmp = folder / f".{name}.json.tmp"
    tmp.write_text(json.dumps(metrics, indent=1, allow_nan=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def read_rm_eval(run_dir: Path) -> dict[str, dict]:
    """Every ``<run_dir>/rm_eval/<name>.json`` as name -> metrics, by name; {} when none.
    Raises ValueError naming a file that is not a JSON object."""
    out = {}
    for path in sorted((Path(run_dir) / RM_EVAL_DIR).glob("*.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
        out[path.stem] = data
    return out
