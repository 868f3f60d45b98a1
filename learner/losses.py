"""Policy, value and KL losses, and how a per-token loss is reduced to a scalar.

Every loss returns ``(loss, metrics)`` and takes its normalisation explicitly (``agg`` and the
global ``num_tokens`` / ``num_seqs``), so micro-batches and data-parallel ranks add up to exactly
the full-batch loss. Imports torch only; ``learner.algorithms`` re-exports all of it.
"""

from __future__ import annotations

import torch

from learner.estimators import AggMode
from learner.functional import LOG_RATIO_CLAMP, KLKind, kl_estimate, masked_mean

Metrics = dict[str, torch.Tensor]


# ==========================================================================================
# Aggregation and losses
# ==========================================================================================


def global_counts(response_mask: torch.Tensor) -> tuple[int, int]:
    """``(num_tokens, num_seqs)`` of a batch: the denominators to pass to :func:`aggregate` for
    every micro-batch of it. Sum these over data-parallel ranks (all-reduce) first.

    Args:
        response_mask: (B, T). A sequence counts only if it has at least one response token.
    """
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
    keep = mask.bool()
    m = keep.to(loss_mat.dtype)
    per_token = torch.where(keep, loss_mat, torch.zeros_like(loss_mat))
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

    Args:
        logprobs: (B, T) current policy, with grad. ref_logprobs: (B, T). response_mask: (B, T).
        num_tokens, num_seqs: global counts, see :func:`aggregate`.
    Returns:
        ``(loss, metrics)`` with ``actor/kl_loss``.
    """
    kl = kl_estimate(logprobs, ref_logprobs, kind)
    loss = aggregate(kl, response_mask, agg, num_tokens=num_tokens, num_seqs=num_seqs)
    return loss, {"actor/kl_loss": loss.detach()}


def next_token_loss(
    logprobs: torch.Tensor, mask: torch.Tensor, num_tokens: int | float
) -> tuple[torch.Tensor, Metrics]:
    """The supervised (SFT, pretraining) loss: the token-mean negative log-likelihood of the
    target tokens, ``-sum_bt logp m / N_tok``.

    Args:
        logprobs: (B, T) log-probability of each target token under the model.
        mask: (B, T) True on the tokens in the loss.
        num_tokens: N_tok, the tokens in the loss over the whole batch (every micro-batch and
            rank), so that the parts add up to the full-batch loss.
    """
    return aggregate(-logprobs, mask, "token-mean", num_tokens=num_tokens), {}


def pairwise_loss(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    margin: torch.Tensor,
    *,
    reg: float = 0.0,
    num_pairs: int | float,
) -> tuple[torch.Tensor, Metrics]:
    """The reward model's pairwise ranking loss with Llama 2's margin and ChatGLM-RLHF's score
    regulariser, summed over pairs and divided by the batch's ``num_pairs``:

        sum_p [-log sigmoid(r_w - r_l - m) + reg (r_w^2 + r_l^2)] / N_pairs

    At ``r_w == r_l``, ``m = 0``, ``reg = 0`` each pair contributes ``ln 2``.

    Args:
        chosen, rejected: (P,) scores ``r_w``, ``r_l`` of each pair's preferred and other
            response.
        margin: (P,) ``m`` (0 where the data gives none).
        reg: lambda of the L2 regulariser on both scores.
        num_pairs: N_pairs over the whole batch (every micro-batch and rank).

    Metrics (shares of the batch's means): ``accuracy`` (a tie counts half) and ``margin_mean``
    (``r_w - r_l``).
    """
    diff = chosen.float() - rejected.float()
    ranking = -torch.nn.functional.logsigmoid(diff - margin)
    total = ranking + reg * (chosen.float() ** 2 + rejected.float() ** 2)
    n = max(float(num_pairs), 1.0)
    right = (diff > 0).float() + 0.5 * (diff == 0).float()
    return total.sum() / n, {
        "accuracy": right.sum().detach() / n,
        "margin_mean": diff.sum().detach() / n,
    }
