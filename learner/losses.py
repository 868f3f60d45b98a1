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
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """PPO clipped surrogate (Schulman et al. 2017, arXiv 1707.06347), with optional dual clip
    (Ye et al. 2020, arXiv 1912.09729) and asymmetric bounds (DAPO's clip-higher).

    ``rho = exp(logprobs - old_logprobs)``;
    ``l = max(-A rho, -A clip(rho, 1 - clip_low, 1 + clip_high))``; with ``dual_clip = c > 1``,
    ``l = min(l, -c A)`` where ``A < 0``; with ``weights`` ``w`` (the behaviour correction,
    ``learner.off_policy.behaviour_weights``), ``w l``: the decoupled objective, its clip
    around ``old_logprobs``. Reduced with :func:`aggregate`.

    Args:
        logprobs: (B, T) current policy, with grad. old_logprobs, advantages: (B, T).
        response_mask: (B, T). num_tokens, num_seqs: global counts, see :func:`aggregate`.
        weights: (B, T) per-token loss weights, detached; None: 1.
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
    if weights is not None:
        loss_mat = loss_mat * weights
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


# ==========================================================================================
# Preference losses on sequence log-probabilities (learner.preference)
# ==========================================================================================

PREFERENCE_LOSS_TYPES = ("sigmoid", "ipo")


def check_preference(beta: float, loss_type: str, label_smoothing: float) -> None:
    """Raise ``ValueError`` naming the argument unless :func:`preference_loss` accepts it."""
    if not beta > 0:
        raise ValueError(f"beta={beta}: must be > 0")
    if loss_type not in PREFERENCE_LOSS_TYPES:
        raise ValueError(f"loss_type={loss_type!r}: give one of {PREFERENCE_LOSS_TYPES}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing={label_smoothing}: must be at least 0 and below 0.5")
    if loss_type == "ipo" and label_smoothing:
        raise ValueError(
            "label_smoothing is conservative DPO's (loss_type='sigmoid'); IPO has none"
        )


def preference_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    *,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    num_pairs: int | float,
) -> tuple[torch.Tensor, Metrics]:
    """Direct preference optimisation and its variants, summed over pairs and divided by the
    batch's ``num_pairs``. With ``h = (pi_w - ref_w) - (pi_l - ref_l)`` on summed sequence
    log-probabilities:

    - ``sigmoid`` (DPO, Rafailov et al. 2023, arXiv 2305.18290): ``-log sigmoid(beta h)``;
      with ``label_smoothing = eps`` (conservative DPO, labels flipped with probability eps):
      ``-(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)``.
    - ``ipo`` (Azar et al. 2023, arXiv 2310.12036): ``(h - 1 / (2 beta))^2``. The paper's h is on
      length-averaged log-probabilities; here it is on the summed ones, as for DPO, so a long
      response's h is larger and ``beta`` scales with the lengths.

    At ``h = 0`` a sigmoid pair contributes ``ln 2`` whatever eps.

    Args:
        policy_chosen, policy_rejected: (P,) summed log-probabilities of each pair's preferred
            and other response under the policy, with grad.
        ref_chosen, ref_rejected: (P,) the same under the reference model.
        beta: the KL strength (> 0). loss_type: ``sigmoid`` or ``ipo``.
        label_smoothing: eps in [0, 0.5), sigmoid only.
        num_pairs: N_pairs over the whole batch (every micro-batch and rank).

    Metrics (shares of the batch's means): ``reward_chosen`` (``beta (pi_w - ref_w)``),
    ``reward_rejected`` (``beta (pi_l - ref_l)``), ``margin`` (``beta h``) and ``accuracy``
    (``h > 0``, a tie counts half).
    """
    check_preference(beta, loss_type, label_smoothing)
    chosen = policy_chosen.float() - ref_chosen.float()  # (P,) implicit rewards / beta
    rejected = policy_rejected.float() - ref_rejected.float()
    h = chosen - rejected
    if loss_type == "ipo":
        per_pair = (h - 1.0 / (2.0 * beta)) ** 2
    else:
        logsigmoid = torch.nn.functional.logsigmoid
        eps = label_smoothing
        per_pair = -(1.0 - eps) * logsigmoid(beta * h) - eps * logsigmoid(-beta * h)
    n = max(float(num_pairs), 1.0)
    with torch.no_grad():
        right = (h > 0).float() + 0.5 * (h == 0).float()
        metrics = {
            "reward_chosen": beta * chosen.sum() / n,
            "reward_rejected": beta * rejected.sum() / n,
            "margin": beta * h.sum() / n,
            "accuracy": right.sum() / n,
        }
    return per_pair.sum() / n, metrics


def rrhf_loss(
    seq_logps: torch.Tensor,
    lengths: torch.Tensor,
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    best: torch.Tensor,
    groups: torch.Tensor,
    *,
    ce_coef: float = 1.0,
    num_groups: int | float,
) -> tuple[torch.Tensor, Metrics]:
    """RRHF (Yuan et al. 2023, arXiv 2304.05302): a ranking loss on length-normalised
    log-probabilities of responses ordered by reward, plus the cross-entropy of each group's
    best response, summed over groups and divided by the batch's ``num_groups``:

        p_i = logp_i / L_i
        sum_g [sum_{(w, l) in g} max(0, p_l - p_w) + ce_coef (-logp_{b_g} / L_{b_g})] / N_groups

    The cross-entropy term is the best response's token-mean negative log-likelihood.

    Args:
        seq_logps: (N,) summed log-probability of each of N responses, with grad.
        lengths: (N,) their token counts ``L_i`` (an empty response counts as 1 token).
        chosen, rejected: (P,) indices into N of each pair's higher- and lower-scored response.
        best: (G,) index into N of each group's best response ``b_g``.
        groups: (P,) the group (0..G-1) of each pair.
        ce_coef: the weight of the cross-entropy term.
        num_groups: N_groups over the whole batch (every micro-batch and rank).

    Metrics: ``rank_loss`` and ``ft_loss`` (the two terms, shares of the batch's means over
    groups), and ``rank_accuracy`` (a rate: the share of *these* P pairs with ``p_w > p_l``,
    a tie counting as wrong; NaN when P is 0).
    """
    p = seq_logps.float() / lengths.float().clamp(min=1.0)  # (N,)
    hinge = torch.relu(p[rejected] - p[chosen])  # (P,)
    rank = p.new_zeros(best.shape[0]).index_add(0, groups, hinge)  # (G,)
    ft = -p[best]  # (G,)
    n = max(float(num_groups), 1.0)
    loss = (rank + ce_coef * ft).sum() / n
    with torch.no_grad():
        right = (p[chosen] > p[rejected]).float()
        accuracy = right.mean() if right.numel() else p.new_tensor(float("nan"))
        metrics = {
            "rank_loss": rank.sum() / n,
            "ft_loss": ft.sum() / n,
            "rank_accuracy": accuracy,
        }
    return loss, metrics
