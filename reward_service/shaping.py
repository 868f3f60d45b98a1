"""From reward components to the score the learner trains on: combination and shaping.

Pure numpy, no Ray; the driver holds one :class:`RewardShaper` for the run (it carries the
running statistics and the reference baselines). Unscorable samples are NaN throughout and stay
NaN: shaping never turns "no score" into a number.

The order, each step optional (see ``TECHNIQUES.md``, "Reward shaping and data selection"):

1. combine the components: the weighted sum, or the safety score where the safety gate fires
   (Llama 2: ``R = R_safety if R_safety < threshold else sum_i w_i R_i``);
2. subtract the prompt's reference baseline (ChatGLM-RLHF: ``r(x, y) - r(x, y_ref)``);
3. running normalisation: ``(r - mean) / std`` over every score seen so far;
4. clip to ``[-clip, clip]``;
5. the EOS trick: a response cut off at the token budget gets a fixed score (arXiv 2403.17031);
6. the overlong penalty (DAPO's soft punishment) added for responses in the last
   ``buffer`` tokens of the budget;
7. reward whitening over the batch, keeping its mean: ``(r - mean) / std + mean`` (arXiv
   2403.17031).

Steps 5 and 6 come after 3 and 4 so their values mean the same thing whatever the running
normalisation and the clip do. Whitening comes last, as in N+, where the EOS trick's score is
whitened with the rest: it only rescales the batch's spread around its own mean.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SafetyGate:
    """Use component ``component``'s score alone where it falls below ``threshold``."""

    component: str
    threshold: float


def combine(
    components: Mapping[str, np.ndarray],
    weights: Mapping[str, float],
    gate: SafetyGate | None = None,
) -> np.ndarray:
    """(N,) combined score: ``sum_i weights[i] * components[i]``, NaN where any weighted
    component is NaN; where the gate's component is below its threshold, that component's
    score instead (even if it has weight 0 in the sum).

    Args:
        components: name -> (N,) float scores, NaN = unscorable.
        weights: name -> weight, for the components in the sum.
    """
    if not weights:
        raise ValueError("combine needs at least one weighted component")
    total = sum(weights[name] * np.asarray(components[name], np.float64) for name in weights)
    if gate is not None:
        safety = np.asarray(components[gate.component], np.float64)
        fire = safety < gate.threshold  # NaN < t is False: an unscorable safety score never fires
        total = np.where(fire, safety, total)
    return total


class RunningMoments:
    """Mean and standard deviation of every value seen so far (Chan et al.'s parallel update),
    NaN ignored."""

    def __init__(self):
        self.count, self.mean, self.m2 = 0, 0.0, 0.0

    def update(self, values: np.ndarray) -> None:
        x = np.asarray(values, np.float64)
        x = x[np.isfinite(x)]
        if x.size == 0:
            return
        n, mean = x.size, float(x.mean())
        m2 = float(((x - mean) ** 2).sum())
        total = self.count + n
        delta = mean - self.mean
        self.mean += delta * n / total
        self.m2 += m2 + delta**2 * self.count * n / total
        self.count = total

    @property
    def std(self) -> float:
        return float(np.sqrt(self.m2 / (self.count - 1))) if self.count > 1 else 1.0

    def state_dict(self) -> dict[str, float]:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: Mapping[str, float]) -> None:
        self.count, self.mean, self.m2 = int(state["count"]), state["mean"], state["m2"]


def overlong_penalty(lengths: np.ndarray, max_tokens: int, buffer: int, penalty: float):
    """(N,) DAPO's soft overlong punishment, <= 0: nothing up to ``max_tokens - buffer`` tokens,
    then falling linearly to ``-penalty`` at ``max_tokens`` (and ``-penalty`` beyond)."""
    start = max_tokens - buffer
    over = np.clip((np.asarray(lengths, np.float64) - start) / buffer, 0.0, 1.0)
    return -penalty * over


def whiten(scores: np.ndarray) -> tuple[np.ndarray, float]:
    """``((N,) whitened scores, std)``: reward whitening without shifting the mean (arXiv
    2403.17031), ``(r - mean) / sqrt(var + 1e-8) + mean`` with the mean and the unbiased
    variance of the finite scores; NaN stays NaN. The numpy twin of
    ``learner.functional.masked_whiten(r, finite, shift_mean=False)`` (a test holds them equal;
    ``reward_service`` imports no ``learner``).

    Fewer than 2 finite scores (no variance) or all of them equal (nothing to rescale): the
    scores as they are, with std NaN or 0.
    """
    x = np.asarray(scores, np.float64)
    finite = np.isfinite(x)
    if finite.sum() < 2:
        return x, float("nan")
    values = x[finite]
    if values.min() == values.max():
        return x, 0.0
    mean, var = values.mean(), values.var(ddof=1)
    return np.where(finite, (x - mean) / np.sqrt(var + 1e-8) + mean, x), float(np.sqrt(var))


@dataclass(frozen=True)
class ShapingSpec:
    """Which shaping steps run (None / False: off); see the module docstring for the order."""

    weights: Mapping[str, float]
    gate: SafetyGate | None = None
    reference_baseline: bool = False
    normalize: bool = False
    clip: float | None = None
    no_eos_penalty: float | None = None
    overlong_buffer: int | None = None
    overlong_penalty: float = 1.0
    max_new_tokens: int = 0
    whiten: bool = False


class RewardShaper:
    """Applies a :class:`ShapingSpec` batch after batch, keeping the running statistics and
    the per-prompt reference baselines."""

    def __init__(self, spec: ShapingSpec):
        self.spec = spec
        self.moments = RunningMoments()
        self.baselines: dict[int, float] = {}  # dataset row -> score of the reference's response

    def raw(self, components: Mapping[str, np.ndarray]) -> np.ndarray:
        """Step 1 alone: the combined score before any shaping."""
        return combine(components, self.spec.weights, self.spec.gate)

    def set_baselines(self, rows: np.ndarray, raw_scores: np.ndarray) -> dict[str, float]:
        """Record each dataset row's reference score (the mean where a row comes several
        times); NaN scores are left out, so such a row gets no baseline."""
        sums: dict[int, list[float]] = {}
        for row, score in zip(rows.tolist(), raw_scores.tolist(), strict=True):
            if np.isfinite(score):
                sums.setdefault(int(row), []).append(score)
        self.baselines = {row: float(np.mean(v)) for row, v in sums.items()}
        values = list(self.baselines.values())
        return {
            "reward/baseline_prompts": float(len(values)),
            "reward/baseline_mean": float(np.mean(values)) if values else float("nan"),
        }

    def __call__(
        self,
        components: Mapping[str, np.ndarray],
        *,
        finish_reasons: np.ndarray,
        response_lengths: np.ndarray,
        rows: np.ndarray,
    ) -> tuple[np.ndarray, dict[str, float]]:
        """``((N,) float32 score, NaN = unscorable; metrics)``.

        Args:
            components: name -> (N,) component scores.
            finish_reasons: (N,) "stop" / "length" / "abort".
            response_lengths: (N,) response tokens.
            rows: (N,) dataset row of each sample's prompt (for the reference baseline).
        """
        spec = self.spec
        score = self.raw(components)
        metrics = {"reward/raw_mean": _nanmean(score)}
        if spec.gate is not None:
            safety = np.asarray(components[spec.gate.component], np.float64)
            metrics["reward/gated_fraction"] = float(np.mean(safety < spec.gate.threshold))
        if spec.reference_baseline:
            base = np.array([self.baselines.get(int(r), np.nan) for r in rows], np.float64)
            missing = ~np.isfinite(base)
            metrics["reward/baseline_missing"] = float(missing.sum())
            score = score - np.where(missing, 0.0, base)
        if spec.normalize:
            self.moments.update(score)
            score = (score - self.moments.mean) / (self.moments.std + 1e-8)
            metrics["reward/running_mean"] = self.moments.mean
            metrics["reward/running_std"] = self.moments.std
        if spec.clip is not None:
            finite = np.isfinite(score)
            metrics["reward/clipped_fraction"] = float(np.mean(np.abs(score[finite]) > spec.clip))
            score = np.clip(score, -spec.clip, spec.clip)
        cut = np.asarray(finish_reasons) == "length"
        if spec.no_eos_penalty is not None:
            score = np.where(cut, spec.no_eos_penalty, score)
            metrics["reward/no_eos"] = float(cut.sum())
        if spec.overlong_buffer is not None:
            penalty = overlong_penalty(
                response_lengths, spec.max_new_tokens, spec.overlong_buffer, spec.overlong_penalty
            )
            score = score + penalty
            metrics["reward/overlong_penalty_mean"] = float(penalty.mean())
        if spec.whiten:
            score, metrics["reward/whiten_std"] = whiten(score)
        metrics["reward/unscorable"] = float((~np.isfinite(score)).sum())
        return score.astype(np.float32), metrics

    def state_dict(self) -> dict:
        return {"moments": self.moments.state_dict(), "baselines": dict(self.baselines)}

    def load_state_dict(self, state: Mapping) -> None:
        self.moments.load_state_dict(state["moments"])
        self.baselines = {int(k): float(v) for k, v in state["baselines"].items()}


def _nanmean(x: np.ndarray) -> float:
    finite = x[np.isfinite(x)]
    return float(finite.mean()) if finite.size else float("nan")
