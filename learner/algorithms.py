"""RLHF math as pure functions over tensors: advantages, KL, losses, masking and aggregation.

Imports torch only (a test checks that ray, deepspeed and vllm stay unimported), so every formula
here runs and is tested on CPU without the distributed stack.

Conventions (``shared/TECHNIQUES.md``):

1. Per-token tensors are ``(B, T)`` over response tokens with a right-padded ``response_mask``
   (1/True on real tokens). Per-sequence tensors are ``(B,)``.
2. ``logprobs`` is the current policy, ``old_logprobs`` the learner's recomputation for the batch,
   ``ref_logprobs`` the frozen reference; log-ratios are clamped to [-20, 20] before any ``exp``.
3. Losses return ``(loss, metrics)``; ``metrics`` values are detached 0-dim tensors (no device
   sync until the caller reads them). Normalisation is explicit: :func:`aggregate` takes global
   token / sequence counts so that micro-batches and data-parallel ranks add up to exactly the
   full-batch loss.
4. Unscorable samples carry a NaN score: group estimators leave them out of the group statistics
   and give them zero advantage.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

LOG_RATIO_CLAMP = 20.0
"""Bound on log-ratios before ``exp`` so ratios and KL estimates stay finite."""

KLKind = Literal["k1", "k2", "k3"]
AggMode = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"]
Metrics = dict[str, torch.Tensor]


# ==========================================================================================
# Masked statistics
# ==========================================================================================


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``values`` where ``mask`` is set: ``sum(v * m) / sum(m)``.

    Args:
        values: any shape. mask: same shape, bool or 0/1.
        dim: reduce over this dimension only; None reduces over everything.
    Returns:
        0-dim tensor, or ``values`` reduced over ``dim``. An empty selection gives 0, not NaN.
    """
    mask = mask.to(values.dtype)
    total = (values * mask).sum() if dim is None else (values * mask).sum(dim)
    count = mask.sum() if dim is None else mask.sum(dim)
    return total / count.clamp(min=1)


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of the masked entries of ``values`` (0-dim).

    ``var = sum(m (v - mean)^2) / n``, times ``n / (n - 1)`` (Bessel) when ``unbiased``,
    with ``n = sum(m)``.

    Raises:
        ValueError: no entry is selected, or exactly one with ``unbiased=True``.
    """
    n = mask.to(values.dtype).sum()
    if n == 0 or (unbiased and n == 1):
        raise ValueError(
            f"masked_var needs at least {2 if unbiased else 1} selected entries, got {int(n)}"
        )
    centered = values - masked_mean(values, mask)
    var = masked_mean(centered * centered, mask)
    return var * n / (n - 1) if unbiased else var


def masked_whiten(
    values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, unbiased: bool = True
) -> torch.Tensor:
    """Whiten the masked entries: ``(v - mean) / sqrt(var + 1e-8)`` over the selection.

    With ``shift_mean=False`` the mean is added back (only the scale changes), as
    "N+ implementation details of RLHF with PPO" (arXiv 2403.17031) does for rewards.
    Entries outside ``mask`` are 0 in the result. Shape is that of ``values``.
    """
    mean = masked_mean(values, mask)
    whitened = (values - mean) * torch.rsqrt(masked_var(values, mask, unbiased) + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask.to(values.dtype)


# ==========================================================================================
# KL and per-token rewards
# ==========================================================================================


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: KLKind) -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from samples of pi (Schulman, "Approximating KL
    divergence", 2020).

    With ``log_r = ref_logprobs - logprobs`` clamped to [-20, 20]:
    ``k1 = -log_r`` (unbiased, high variance, can be negative), ``k2 = 0.5 log_r^2`` (biased,
    low variance), ``k3 = exp(log_r) - log_r - 1`` (unbiased, non-negative).

    Args:
        logprobs, ref_logprobs: (B, T) log-probabilities of the sampled tokens.
    Returns:
        (B, T) estimates; mask them before reducing.
    """
    log_r = (ref_logprobs - logprobs).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    if kind == "k1":
        return -log_r
    if kind == "k2":
        return 0.5 * log_r * log_r
    if kind == "k3":
        return torch.exp(log_r) - log_r - 1.0
    raise ValueError(f"unknown KL estimator {kind!r}; expected 'k1', 'k2' or 'k3'")


def _last_token_index(response_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B,) index of each row's last response token, and (B,) bool 'row has any token'."""
    lengths = response_mask.to(torch.int64).sum(dim=1)
    return (lengths - 1).clamp(min=0), lengths > 0


def token_rewards(
    scores: torch.Tensor,
    kl: torch.Tensor,
    response_mask: torch.Tensor,
    kl_coef: float | torch.Tensor,
) -> torch.Tensor:
    """Per-token rewards for PPO / REINFORCE++ with the KL penalty in the reward (InstructGPT).

    ``r_t = -kl_coef * KL_t`` on every response token, plus the sequence score on the last
    response token. A row with no response tokens gets no reward at all.

    Args:
        scores: (B,) sequence scores. kl: (B, T) per-token KL estimates.
        response_mask: (B, T), right-padded. kl_coef: scalar beta.
    Returns:
        (B, T) rewards, 0 outside ``response_mask``.
    """
    mask = response_mask.to(kl.dtype)
    rewards = -kl_coef * kl * mask
    last, has_tokens = _last_token_index(response_mask)
    placed = torch.where(has_tokens, scores.to(kl.dtype), torch.zeros_like(scores, dtype=kl.dtype))
    return rewards.scatter_add(1, last.unsqueeze(1), placed.unsqueeze(1))


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

    Args:
        token_rewards: (B, T). values: (B, T) critic values. response_mask: (B, T), right-padded.
    Returns:
        ``(advantages, returns)``, both (B, T) and 0 outside ``response_mask``. Not whitened.
    """
    mask = response_mask.to(values.dtype)
    values = values * mask
    rewards = token_rewards * mask
    T = values.shape[1]
    advantages = torch.zeros_like(values)
    next_value = torch.zeros_like(values[:, 0])
    next_adv = torch.zeros_like(values[:, 0])
    for t in reversed(range(T)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_adv = (delta + gamma * lam * next_adv) * mask[:, t]
        advantages[:, t] = next_adv
        next_value = values[:, t]
    return advantages, (advantages + values) * mask


def _group_stats(scores: torch.Tensor, group_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Per-row (count, sum, sum of squares) of the finite scores in the row's group."""
    valid = torch.isfinite(scores)
    s = torch.where(valid, scores, torch.zeros_like(scores)).to(torch.float64)
    groups = int(group_ids.max()) + 1 if group_ids.numel() else 0
    count = torch.zeros(groups, dtype=torch.float64, device=scores.device)
    total = torch.zeros_like(count)
    total_sq = torch.zeros_like(count)
    count.index_add_(0, group_ids, valid.to(torch.float64))
    total.index_add_(0, group_ids, s)
    total_sq.index_add_(0, group_ids, s * s)
    return valid, s, count[group_ids], total[group_ids], total_sq[group_ids]


def group_advantages(
    scores: torch.Tensor, group_ids: torch.Tensor, scale_by_std: bool = True, eps: float = 1e-6
) -> torch.Tensor:
    """GRPO outcome advantages (DeepSeekMath, arXiv 2402.03300):
    ``A_i = (s_i - mean_g) / (std_g + eps)``.


    ``mean_g`` and the unbiased ``std_g`` are over the scorable samples of sample i's group.
    ``scale_by_std=False`` is Dr. GRPO (arXiv 2503.20783): ``A_i = s_i - mean_g``.
    A group with a single scorable sample, and any unscorable (NaN) sample, gets advantage 0.

    Args:
        scores: (B,) float, NaN for unscorable. group_ids: (B,) int64 in ``[0, G)``.
    Returns:
        (B,) advantages in the dtype of ``scores``.
    """
    valid, s, n, total, total_sq = _group_stats(scores, group_ids)
    mean = total / n.clamp(min=1)
    adv = s - mean
    if scale_by_std:
        var = (total_sq - n * mean * mean).clamp(min=0) / (n - 1).clamp(min=1)
        adv = adv / (var.sqrt() + eps)
    adv = torch.where(valid & (n > 1), adv, torch.zeros_like(adv))
    return adv.to(scores.dtype)


def rloo_advantages(scores: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """REINFORCE leave-one-out (Ahmadian et al. 2024, arXiv 2402.14740):
    ``A_i = s_i - (sum_g - s_i) / (n_g - 1)``, the mean of the other samples as baseline.

    Over scorable samples only; a group with one scorable sample, and any NaN sample, gets 0.

    Args:
        scores: (B,) float, NaN for unscorable. group_ids: (B,) int64 in ``[0, G)``.
    Returns:
        (B,) advantages.
    """
    valid, s, n, total, _ = _group_stats(scores, group_ids)
    adv = s - (total - s) / (n - 1).clamp(min=1)
    adv = torch.where(valid & (n > 1), adv, torch.zeros_like(adv))
    return adv.to(scores.dtype)


def reinforce_returns(
    token_rewards: torch.Tensor, response_mask: torch.Tensor, gamma: float
) -> torch.Tensor:
    """Discounted returns ``G_t = r_t + gamma G_{t+1}`` within each response (REINFORCE++,
    arXiv 2501.03262, before its batch whitening).

    Args:
        token_rewards: (B, T). response_mask: (B, T), right-padded.
    Returns:
        (B, T) returns, 0 outside ``response_mask``.
    """
    mask = response_mask.to(token_rewards.dtype)
    rewards = token_rewards * mask
    returns = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        running = (rewards[:, t] + gamma * running) * mask[:, t]
        returns[:, t] = running
    return returns


# ==========================================================================================
# Aggregation and losses
# ==========================================================================================


def global_counts(response_mask: torch.Tensor) -> tuple[int, int]:
    """``(num_tokens, num_seqs)`` of a batch: the denominators to pass to :func:`aggregate` for
    every micro-batch of it. Sum these over data-parallel ranks (all-reduce) first.
    A sequence counts only if it has at least one response token."""
    lengths = response_mask.to(torch.int64).sum(dim=1)
    return int(lengths.sum()), int((lengths > 0).sum())


def aggregate(
    loss_mat: torch.Tensor,
    mask: torch.Tensor,
    mode: AggMode,
    num_tokens: int | float | None = None,
    num_seqs: int | float | None = None,
) -> torch.Tensor:
    """Reduce a (B, T) per-token loss to a scalar.

    Modes, with ``m`` the mask and ``L_b = sum_t m_bt``:

    - ``token-mean``: ``sum_bt loss m / N_tok`` (every token weighs the same; DAPO).
    - ``seq-mean-token-mean``: ``sum_b [sum_t loss m / L_b] / N_seq`` (every sequence weighs the
      same; original GRPO).
    - ``seq-mean-token-sum``: ``sum_b sum_t loss m / N_seq`` (no length normalisation; Dr. GRPO).

    ``N_tok`` / ``N_seq`` default to this batch's counts. To make micro-batches (and ranks) sum to
    the full-batch loss, pass the full batch's counts from :func:`global_counts` to each part and
    add the parts' losses (with ranks whose gradients are averaged, multiply by the world size).
    Sequences with no tokens contribute nothing.
    """
    m = mask.to(loss_mat.dtype)
    per_token = loss_mat * m
    if mode == "token-mean":
        denom = m.sum().clamp(min=1) if num_tokens is None else max(float(num_tokens), 1.0)
        return per_token.sum() / denom
    lengths = m.sum(dim=1)
    if mode == "seq-mean-token-mean":
        per_seq = per_token.sum(dim=1) / lengths.clamp(min=1)
    elif mode == "seq-mean-token-sum":
        per_seq = per_token.sum(dim=1)
    else:
        raise ValueError(
            f"unknown aggregation {mode!r}; expected 'token-mean', 'seq-mean-token-mean' "
            "or 'seq-mean-token-sum'"
        )
    if num_seqs is None:
        return per_seq.sum() / (lengths > 0).sum().clamp(min=1)
    return per_seq.sum() / max(float(num_seqs), 1.0)


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = None,
    agg: AggMode = "token-mean",
    num_tokens: int | float | None = None,
    num_seqs: int | float | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """PPO clipped surrogate (Schulman et al. 2017, arXiv 1707.06347), with optional dual clip
    (Ye et al. 2020, arXiv 1912.09729) and asymmetric bounds (DAPO's clip-higher).

    ``rho = exp(logprobs - old_logprobs)``;
    ``l = max(-A rho, -A clip(rho, 1 - clip_low, 1 + clip_high))``; with ``dual_clip = c > 1``,
    ``l = min(l, -c A)`` where ``A < 0``. Reduced with :func:`aggregate`.

    Args:
        logprobs: (B, T) current policy, with grad. old_logprobs, advantages: (B, T).
        response_mask: (B, T). num_tokens, num_seqs: global counts, see :func:`aggregate`.
    Returns:
        ``(loss, metrics)`` with ``actor/clipfrac`` (share of tokens where the clipped term is
        active), ``actor/approx_kl`` (k3 of old vs new), ``actor/ratio_mean|min|max`` and, with
        dual clip, ``actor/dual_clipfrac``; metrics are over this micro-batch's tokens.
    """
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
    log_ratio = (logprobs - old_logprobs).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    loss_mat = torch.maximum(unclipped, clipped)
    mask = response_mask.bool()
    metrics: Metrics = {}
    if dual_clip is not None:
        dual = -advantages * dual_clip
        dual_active = (advantages < 0) & (loss_mat > dual)
        loss_mat = torch.where(advantages < 0, torch.minimum(loss_mat, dual), loss_mat)
        metrics["actor/dual_clipfrac"] = masked_mean(dual_active.float(), mask).detach()
    loss = aggregate(loss_mat, mask, agg, num_tokens=num_tokens, num_seqs=num_seqs)
    with torch.no_grad():
        big = torch.finfo(ratio.dtype).max
        metrics |= {
            "actor/clipfrac": masked_mean((clipped > unclipped).float(), mask),
            "actor/approx_kl": masked_mean(ratio - 1.0 - log_ratio, mask),
            "actor/ratio_mean": masked_mean(ratio, mask),
            "actor/ratio_min": torch.where(mask, ratio, big).min()
            if mask.any()
            else ratio.new_tensor(1.0),
            "actor/ratio_max": torch.where(mask, ratio, -big).max()
            if mask.any()
            else ratio.new_tensor(1.0),
        }
    return loss, {k: v.detach() for k, v in metrics.items()}


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    response_mask: torch.Tensor,
    clip: float | None = 0.2,
    agg: AggMode = "token-mean",
    num_tokens: int | float | None = None,
    num_seqs: int | float | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """Clipped value loss (PPO as in OpenAI baselines / arXiv 2403.17031):
    ``0.5 max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2)``; with ``clip=None``,
    ``0.5 (V - R)^2``. Reduced with :func:`aggregate`.

    Args:
        values: (B, T) critic output, with grad. old_values, returns: (B, T).
    Returns:
        ``(loss, metrics)`` with ``critic/vf_clipfrac`` and ``critic/vpred_mean``.
    """
    unclipped = (values - returns) ** 2
    if clip is None:
        loss_mat = 0.5 * unclipped
        clipped_active = torch.zeros_like(values, dtype=torch.bool)
    else:
        v_clipped = old_values + (values - old_values).clamp(-clip, clip)
        clipped_sq = (v_clipped - returns) ** 2
        loss_mat = 0.5 * torch.maximum(unclipped, clipped_sq)
        clipped_active = clipped_sq > unclipped
    loss = aggregate(loss_mat, response_mask, agg, num_tokens=num_tokens, num_seqs=num_seqs)
    mask = response_mask.bool()
    metrics = {
        "critic/vf_clipfrac": masked_mean(clipped_active.float(), mask).detach(),
        "critic/vpred_mean": masked_mean(values.detach(), mask),
    }
    return loss, metrics


def kl_loss(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    response_mask: torch.Tensor,
    kind: KLKind = "k3",
    agg: AggMode = "token-mean",
    num_tokens: int | float | None = None,
    num_seqs: int | float | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """KL to the reference as a loss term (GRPO puts it here instead of in the reward):
    ``aggregate(kl_estimate(logprobs, ref_logprobs, kind))``. Multiply by the KL coefficient.

    Returns:
        ``(loss, metrics)`` with ``actor/kl_loss``.
    """
    kl = kl_estimate(logprobs, ref_logprobs, kind)
    loss = aggregate(kl, response_mask, agg, num_tokens=num_tokens, num_seqs=num_seqs)
    return loss, {"actor/kl_loss": loss.detach()}


# ==========================================================================================
# Logits -> per-token quantities
# ==========================================================================================


def logprobs_from_logits(
    logits: torch.Tensor, token_ids: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Log-probability of each token: ``logit[token] / tau - logsumexp(logits / tau)``.

    Computed in float32 as gathered logit minus logsumexp, never through a full-vocabulary
    ``log_softmax`` tensor. ``temperature`` must match the sampler's so that these agree with
    the generator's ``rollout_logprobs``.

    Args:
        logits: (B, T, V) next-token logits aligned with ``token_ids`` (position t predicts
            ``token_ids[:, t]``). token_ids: (B, T) int64.
    Returns:
        (B, T) float32.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    picked = logits.gather(-1, token_ids.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the categorical distribution given by ``logits``:
    ``H = logsumexp(z) - sum_v softmax(z)_v z_v``.

    Args:
        logits: (..., V). Returns: (...), float32.
    """
    logits = logits.float()
    probs = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(dim=-1)


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
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
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
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])
        self.target = float(state["target"])
        self.horizon = int(state["horizon"])


# ==========================================================================================
# Advantage estimator registry
# ==========================================================================================


class AdvantageEstimator(str, enum.Enum):
    """How advantages are computed; the config names one of these."""

    GAE = "gae"  # PPO with a critic
    GRPO = "grpo"
    DR_GRPO = "dr_grpo"
    RLOO = "rloo"
    REINFORCE_PP = "reinforce_pp"


@dataclass(frozen=True)
class AdvantageInputs:
    """Everything an estimator may read. Shapes: B rows, T response tokens.

    Attributes:
        response_mask: (B, T) right-padded.
        scores: (B,) sequence scores, NaN for unscorable (group estimators).
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


def _broadcast(seq_adv: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    adv = seq_adv.unsqueeze(1) * mask.to(seq_adv.dtype)
    return adv, adv


def _gae_estimator(x: AdvantageInputs) -> tuple[torch.Tensor, torch.Tensor]:
    rewards, values = _need(x, "gae", "token_rewards", "values")
    adv, ret = gae(rewards, values, x.response_mask, x.gamma, x.lam)
    return (masked_whiten(adv, x.response_mask) if x.whiten_advantages else adv), ret


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
    returns = reinforce_returns(rewards, x.response_mask, x.gamma)
    return masked_whiten(returns, x.response_mask), returns


@dataclass(frozen=True)
class EstimatorSpec:
    """An estimator's function and the setup choices that follow from it.

    Attributes:
        fn: ``AdvantageInputs -> (advantages, returns)``, both (B, T).
        needs_critic: a value model is trained (PPO).
        kl_in_reward: the KL penalty goes into :func:`token_rewards` (True) or into the loss
            as :func:`kl_loss` (False, GRPO-style).
    """

    fn: Callable[[AdvantageInputs], tuple[torch.Tensor, torch.Tensor]]
    needs_critic: bool
    kl_in_reward: bool


ADVANTAGE_ESTIMATORS: dict[AdvantageEstimator, EstimatorSpec] = {
    AdvantageEstimator.GAE: EstimatorSpec(_gae_estimator, needs_critic=True, kl_in_reward=True),
    AdvantageEstimator.GRPO: EstimatorSpec(_grpo_estimator, needs_critic=False, kl_in_reward=False),
    AdvantageEstimator.DR_GRPO: EstimatorSpec(
        _dr_grpo_estimator, needs_critic=False, kl_in_reward=False
    ),
    AdvantageEstimator.RLOO: EstimatorSpec(_rloo_estimator, needs_critic=False, kl_in_reward=False),
    AdvantageEstimator.REINFORCE_PP: EstimatorSpec(
        _reinforce_pp_estimator, needs_critic=False, kl_in_reward=True
    ),
}
"""The one table from estimator to function; the driver looks its estimator up once at setup."""


def compute_advantages(
    estimator: AdvantageEstimator | str, inputs: AdvantageInputs
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(advantages, returns)``, both (B, T) and 0 outside the mask, by the named estimator."""
    return ADVANTAGE_ESTIMATORS[AdvantageEstimator(estimator)].fn(inputs)
