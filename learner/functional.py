"""Tensor helpers the RLHF math is built from: masked statistics, KL estimators and per-token
quantities from logits. Imports torch only; ``learner.algorithms`` re-exports all of it.

Masks select with ``torch.where`` rather than multiplying, so an inf or NaN sitting on a padded
position never leaks into a result.
"""

from __future__ import annotations

from typing import Literal

import torch

LOG_RATIO_CLAMP = 20.0
"""Bound on log-ratios before ``exp`` so ratios and KL estimates stay finite."""

KLKind = Literal["k1", "k2", "k3"]


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
    selected = torch.where(mask.bool(), values, torch.zeros_like(values))
    count = mask.to(values.dtype)
    total = selected.sum() if dim is None else selected.sum(dim)
    count = count.sum() if dim is None else count.sum(dim)
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
    return torch.where(mask.bool(), whitened, torch.zeros_like(whitened))


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
