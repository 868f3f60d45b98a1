"""RLHF math as pure functions over tensors: advantages, KL, losses, masking and aggregation.

Imports torch only (a test checks that ray, deepspeed and vllm stay unimported), so every formula
here runs and is tested on CPU without the distributed stack.

Conventions:

1. Per-token tensors are ``(B, T)`` over response tokens with a right-padded ``response_mask``
   (1/True on real tokens). Per-sequence tensors are ``(B,)``.
2. ``logprobs`` is the current policy, ``old_logprobs`` the learner's recomputation for the batch,
   ``ref_logprobs`` the frozen reference; log-ratios are clamped to [-20, 20] before any ``exp``.
3. Losses return ``(loss, metrics)``; ``metrics`` values are detached 0-dim tensors (no device
   sync until the caller reads them). Normalisation is explicit: :func:`aggregate` takes global
   token / sequence counts so that micro-batches and data-parallel ranks add up to exactly the
   full-batch loss.
4. Unscorable samples carry a NaN score (a null ``score`` in the rollout table). They get zero
   advantage under every estimator: group estimators leave them out of the group statistics,
   and token-reward estimators drop their rows (see :func:`scorable_mask`).

Per-token helpers (masked statistics, KL estimators, log-probabilities and entropy from logits)
live in ``learner.functional``, the losses with their aggregation in ``learner.losses``, the
off-policy correction (importance weights between the behaviour and the proximal policy) in
``learner.off_policy``; all are re-exported here, so ``learner.algorithms`` is the one import for
all of the math. The
estimator names and their setup choices (``AdvantageEstimator``, ``EstimatorSpec``) live in the
torch-free ``learner.estimators``, for the config; they are re-exported here too.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from learner.estimators import ESTIMATOR_SPECS, AdvantageEstimator, EstimatorSpec
from learner.functional import (
    LOG_RATIO_CLAMP,
    KLKind,
    entropy_from_logits,
    kl_estimate,
    logprobs_from_logits,
    masked_mean,
    masked_var,
    masked_whiten,
)
from learner.losses import (
    AggMode,
    Metrics,
    aggregate,
    global_counts,
    kl_loss,
    policy_loss,
    preference_loss,
    rrhf_loss,
    value_loss,
)
from learner.off_policy import OffPolicySpec, behaviour_weights

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "AdaptiveKLController",
    "AdvantageEstimator",
    "AdvantageInputs",
    "EstimatorSpec",
    "FixedKLController",
    "KLKind",
    "LOG_RATIO_CLAMP",
    "AggMode",
    "Metrics",
    "OffPolicySpec",
    "aggregate",
    "behaviour_weights",
    "compute_advantages",
    "entropy_from_logits",
    "gae",
    "global_counts",
    "group_advantages",
    "kl_estimate",
    "kl_loss",
    "logprobs_from_logits",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "policy_loss",
    "preference_loss",
    "reinforce_returns",
    "rloo_advantages",
    "rrhf_loss",
    "scorable_mask",
    "token_rewards",
    "value_loss",
]


# ==========================================================================================
# KL and per-token rewards
# ==========================================================================================


def _last_token_index(response_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B,) index of each row's last token in the mask, and (B,) bool 'row has any token'. The
    mask may have gaps (a multi-turn episode's observation tokens are not the model's)."""
    mask = response_mask.bool()
    has_tokens = mask.any(dim=1)
    last = mask.shape[1] - 1 - mask.flip(1).to(torch.int64).argmax(dim=1)
    return torch.where(has_tokens, last, torch.zeros_like(last)), has_tokens


def token_rewards(
    scores: torch.Tensor,
    kl: torch.Tensor,
    response_mask: torch.Tensor,
    kl_coef: float | torch.Tensor,
) -> torch.Tensor:
    """Per-token rewards for PPO / REINFORCE++ with the KL penalty in the reward (InstructGPT).

    ``r_t = -kl_coef * KL_t`` on every response token in the mask, plus the sequence score on the
    last one. A row with no response tokens, or with a non-finite (unscorable) score, gets
    no reward at all; drop such rows from the loss with :func:`scorable_mask`.

    Args:
        scores: (B,) sequence scores. kl: (B, T) per-token KL estimates.
        response_mask: (B, T): the model's tokens (gaps allowed). kl_coef: scalar beta.
    Returns:
        (B, T) rewards, 0 outside ``response_mask``.
    """
    mask = scorable_mask(scores, response_mask)
    rewards = torch.where(mask, -kl_coef * kl, torch.zeros_like(kl))
    last, has_tokens = _last_token_index(mask)
    placed = torch.where(has_tokens, scores.to(kl.dtype), torch.zeros_like(scores, dtype=kl.dtype))
    return rewards.scatter_add(1, last.unsqueeze(1), placed.unsqueeze(1))


def scorable_mask(scores: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """``response_mask`` with the rows of unscorable samples (non-finite score) cleared.

    Args:
        scores: (B,) float, NaN for unscorable. response_mask: (B, T).
    Returns:
        (B, T) bool.
    """
    return response_mask.bool() & torch.isfinite(scores).unsqueeze(1)


# ==========================================================================================
# Advantage estimators
# ==========================================================================================


def gae(
    token_rewards: torch.Tensor,
    values: torch.Tensor,
    response_mask: torch.Tensor,
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, arXiv 1506.02438).

    ``delta_t = r_t + gamma V_{t+1} - V_t``, ``A_t = delta_t + gamma lam A_{t+1}``,
    ``R_t = A_t + V_t``, with ``V`` (and ``A``) after the last response token equal to 0.

    Over the tokens in the mask only: in a multi-turn episode ``t + 1`` is the model's next
    token, past the observation tokens between two turns (they are the environment's
    transition, not actions), so the model's turns chain as one trajectory.

    Args:
        token_rewards: (B, T). values: (B, T) critic values. response_mask: (B, T): the
            model's tokens, right-padded, with gaps where observations are.
    Returns:
        ``(advantages, returns)``, both (B, T) and 0 outside ``response_mask``. Not whitened.
    """
    keep = response_mask.bool()
    values = torch.where(keep, values, torch.zeros_like(values))
    rewards = torch.where(keep, token_rewards, torch.zeros_like(token_rewards))
    T = values.shape[1]
    advantages = torch.zeros_like(values)
    next_value = torch.zeros_like(values[:, 0])
    next_adv = torch.zeros_like(values[:, 0])
    for t in reversed(range(T)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        here = keep[:, t]
        next_adv = torch.where(here, delta + gamma * lam * next_adv, next_adv)
        advantages[:, t] = torch.where(here, next_adv, torch.zeros_like(next_adv))
        next_value = torch.where(here, values[:, t], next_value)
    return advantages, advantages + values  # both already 0 outside the mask


def _group_stats(scores: torch.Tensor, group_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-row statistics of the scorable (finite) scores in the row's group, in float64.

    Keys: ``valid`` (row is scorable), ``s`` (score, 0 if not), ``n`` (scorable rows in the
    group), ``total`` (their sum), ``mean``, ``var`` (unbiased, two-pass), ``constant`` (every
    scorable score in the group is equal, so the group carries no signal).
    """
    valid = torch.isfinite(scores)
    s = torch.where(valid, scores, torch.zeros_like(scores)).to(torch.float64)
    groups = int(group_ids.max()) + 1 if group_ids.numel() else 0

    def per_group(values: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(groups, dtype=torch.float64, device=scores.device)
        return out.index_add_(0, group_ids, torch.where(valid, values, torch.zeros_like(values)))[
            group_ids
        ]

    def extreme(fill: float, reduce: str) -> torch.Tensor:
        src = torch.where(valid, s, torch.full_like(s, fill))
        out = torch.full((groups,), fill, dtype=torch.float64, device=scores.device)
        return out.scatter_reduce(0, group_ids, src, reduce=reduce)[group_ids]

    n = per_group(torch.ones_like(s))
    total = per_group(s)
    mean = total / n.clamp(min=1)
    var = per_group((s - mean) ** 2) / (n - 1).clamp(min=1)
    # Equal scores must give exactly 0, which (s - mean) does not promise in floating point.
    constant = extreme(float("inf"), "amin") == extreme(float("-inf"), "amax")
    return {
        "valid": valid,
        "s": s,
        "n": n,
        "total": total,
        "mean": mean,
        "var": var,
        "constant": constant,
    }


def group_advantages(
    scores: torch.Tensor, group_ids: torch.Tensor, scale_by_std: bool = True, eps: float = 1e-6
) -> torch.Tensor:
    """GRPO outcome advantages (DeepSeekMath, arXiv 2402.03300):
    ``A_i = (s_i - mean_g) / (std_g + eps)``.

    ``mean_g`` and the unbiased ``std_g`` are over the scorable samples of sample i's group.
    ``scale_by_std=False`` is Dr. GRPO (arXiv 2503.20783): ``A_i = s_i - mean_g``.
    A group with a single scorable sample or with all scores equal gets exactly 0, and so does
    any unscorable (NaN) sample.

    Args:
        scores: (B,) float, NaN for unscorable. group_ids: (B,) int64 in ``[0, G)``.
    Returns:
        (B,) advantages in the dtype of ``scores``.
    """
    g = _group_stats(scores, group_ids)
    adv = g["s"] - g["mean"]
    if scale_by_std:
        adv = adv / (g["var"].sqrt() + eps)
    informative = g["valid"] & (g["n"] > 1) & ~g["constant"]
    return torch.where(informative, adv, torch.zeros_like(adv)).to(scores.dtype)


def rloo_advantages(scores: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """REINFORCE leave-one-out (Ahmadian et al. 2024, arXiv 2402.14740):
    ``A_i = s_i - (sum_g - s_i) / (n_g - 1)``, the mean of the other samples as baseline.

    Over scorable samples only; a group with one scorable sample or all scores equal, and any
    NaN sample, gets exactly 0.

    Args:
        scores: (B,) float, NaN for unscorable. group_ids: (B,) int64 in ``[0, G)``.
    Returns:
        (B,) advantages.
    """
    g = _group_stats(scores, group_ids)
    adv = g["s"] - (g["total"] - g["s"]) / (g["n"] - 1).clamp(min=1)
    informative = g["valid"] & (g["n"] > 1) & ~g["constant"]
    return torch.where(informative, adv, torch.zeros_like(adv)).to(scores.dtype)


def reinforce_returns(
    token_rewards: torch.Tensor, response_mask: torch.Tensor, gamma: float
) -> torch.Tensor:
    """Discounted returns ``G_t = r_t + gamma G_{t+1}`` within each response (REINFORCE++,
    arXiv 2501.03262, before its batch whitening), ``t + 1`` the next token in the mask.

    Args:
        token_rewards: (B, T). response_mask: (B, T): the model's tokens (gaps allowed).
    Returns:
        (B, T) returns, 0 outside ``response_mask``.
    """
    keep = response_mask.bool()
    rewards = torch.where(keep, token_rewards, torch.zeros_like(token_rewards))
    returns = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        running = torch.where(keep[:, t], rewards[:, t] + gamma * running, running)
        returns[:, t] = torch.where(keep[:, t], running, torch.zeros_like(running))
    return returns


# ==========================================================================================
# KL coefficient controllers
# ==========================================================================================


class FixedKLController:
    """A constant KL coefficient ``beta``."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """No-op; present so both controllers are used the same way."""

    def state_dict(self) -> dict[str, float]:
        """The coefficient, for checkpoints."""
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.value = float(state["value"])


class AdaptiveKLController:
    """The adaptive KL coefficient of Ziegler et al. 2019 (arXiv 1909.08593), used by InstructGPT:

    ``e = clip(KL / target - 1, -0.2, 0.2)``; ``beta <- beta * (1 + e * n_steps / horizon)``.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: int):
        if target <= 0 or horizon <= 0:
            raise ValueError(
                f"target and horizon must be positive, got target={target}, horizon={horizon}"
            )
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = int(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Move beta towards the value that keeps ``current_kl`` at ``target``;
        ``n_steps`` is the number of samples (or steps) since the last update."""
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict[str, float]:
        """Coefficient, target and horizon, for checkpoints."""
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, float]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.value = float(state["value"])
        self.target = float(state["target"])
        self.horizon = int(state["horizon"])


# ==========================================================================================
# Advantage estimator registry
# ==========================================================================================


@dataclass(frozen=True)
class AdvantageInputs:
    """Everything an estimator may read. Shapes: B rows, T response tokens.

    Attributes:
        response_mask: (B, T) right-padded.
        scores: (B,) sequence scores, NaN for unscorable. Group estimators need them; for
            GAE and REINFORCE++ they are optional and, when given, drop unscorable rows.
        group_ids: (B,) int64 prompt group per row (group estimators).
        token_rewards: (B, T) from :func:`token_rewards` (GAE, REINFORCE++).
        values: (B, T) critic values (GAE).
        gamma, lam: discount and GAE lambda.
        whiten_advantages: whiten GAE advantages over the batch (PPO's usual choice).
    """

    response_mask: torch.Tensor
    scores: torch.Tensor | None = None
    group_ids: torch.Tensor | None = None
    token_rewards: torch.Tensor | None = None
    values: torch.Tensor | None = None
    gamma: float = 1.0
    lam: float = 0.95
    whiten_advantages: bool = True


def _need(inputs: AdvantageInputs, estimator: str, *names: str) -> list[torch.Tensor]:
    missing = [n for n in names if getattr(inputs, n) is None]
    if missing:
        raise ValueError(f"advantage estimator '{estimator}' needs {', '.join(missing)}")
    return [getattr(inputs, n) for n in names]


def _whiten_if_possible(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # Fewer than two tokens (say, every sample unscorable) has no variance to whiten by.
    return masked_whiten(values, mask) if int(mask.sum()) >= 2 else values


def _token_mask(x: AdvantageInputs) -> torch.Tensor:
    if x.scores is None:
        return x.response_mask.bool()
    return scorable_mask(x.scores, x.response_mask)


def _broadcast(seq_adv: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    adv = seq_adv.unsqueeze(1) * mask.to(seq_adv.dtype)
    return adv, adv


def _gae_estimator(x: AdvantageInputs) -> tuple[torch.Tensor, torch.Tensor]:
    rewards, values = _need(x, "gae", "token_rewards", "values")
    mask = _token_mask(x)
    adv, ret = gae(rewards, values, mask, x.gamma, x.lam)
    return (_whiten_if_possible(adv, mask) if x.whiten_advantages else adv), ret


def _grpo_estimator(x: AdvantageInputs) -> tuple[torch.Tensor, torch.Tensor]:
    scores, groups = _need(x, "grpo", "scores", "group_ids")
    return _broadcast(group_advantages(scores, groups, scale_by_std=True), x.response_mask)


def _dr_grpo_estimator(x: AdvantageInputs) -> tuple[torch.Tensor, torch.Tensor]:
    scores, groups = _need(x, "dr_grpo", "scores", "group_ids")
    return _broadcast(group_advantages(scores, groups, scale_by_std=False), x.response_mask)


def _rloo_estimator(x: AdvantageInputs) -> tuple[torch.Tensor, torch.Tensor]:
    scores, groups = _need(x, "rloo", "scores", "group_ids")
    return _broadcast(rloo_advantages(scores, groups), x.response_mask)


def _reinforce_pp_estimator(x: AdvantageInputs) -> tuple[torch.Tensor, torch.Tensor]:
    (rewards,) = _need(x, "reinforce_pp", "token_rewards")
    mask = _token_mask(x)
    returns = reinforce_returns(rewards, mask, x.gamma)
    return _whiten_if_possible(returns, mask), returns


ADVANTAGE_ESTIMATORS: dict[AdvantageEstimator, EstimatorSpec] = ESTIMATOR_SPECS
"""Estimator -> its setup choices (critic, KL placement, loss aggregation, groups); the table
lives in ``learner.estimators``, torch-free, so the config reads it without this module."""

_ESTIMATOR_FNS: dict[
    AdvantageEstimator, Callable[[AdvantageInputs], tuple[torch.Tensor, torch.Tensor]]
] = {
    AdvantageEstimator.GAE: _gae_estimator,
    AdvantageEstimator.GRPO: _grpo_estimator,
    AdvantageEstimator.DR_GRPO: _dr_grpo_estimator,
    AdvantageEstimator.RLOO: _rloo_estimator,
    AdvantageEstimator.REINFORCE_PP: _reinforce_pp_estimator,
}
"""Estimator -> ``AdvantageInputs -> (advantages, returns)``, both (B, T)."""


def compute_advantages(
    estimator: AdvantageEstimator | str, inputs: AdvantageInputs
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(advantages, returns)``, both (B, T) and 0 outside the mask, by the named estimator."""
    return _ESTIMATOR_FNS[AdvantageEstimator(estimator)](inputs)
