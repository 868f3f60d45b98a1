"""Off-policy correction: importance weights between the policy that sampled and the one the
update starts from (pure torch; re-exported by ``learner.algorithms``).

Three policies meet in an update: the behaviour policy ``mu`` that
sampled the tokens (vLLM's ``rollout_logprobs``), the proximal policy ``pi_old`` (the learner's
own recomputation at the start of the update, ``old_logprobs``) and the current ``pi``. The PPO
ratio and its clip are always taken around ``pi_old`` (``learner.losses.policy_loss``); this
module gives the weight that corrects for ``mu != pi_old``, multiplied into each token's loss:

    L_t = -w_t * min(rho_t A_t, clip(rho_t, 1 - eps_low, 1 + eps_high) A_t),
    rho_t = pi(y_t) / pi_old(y_t),   r_t = pi_old(y_t) / mu(y_t)

which is the decoupled PPO objective (Hilton et al. 2021; AReaL) when ``pi_old`` is newer than
``mu`` (asynchronous training: the samples are some versions old), and truncated importance
sampling (TIS) against the numerical gap between vLLM and the learner when they are the same
weights (synchronous training in bf16). The weight:

- ``weight="token"``: ``w_t = min(r_t, cap)`` (TIS);
- ``weight="sequence"``: ``w = min(prod_t r_t, cap)`` for every token of the sample;
- ``weight="none"``: ``w = 1``.

and the mask (masked importance sampling: leave out what the weight cannot repair), with
``band = B > 1``:

- ``mask="token"``: a token with ``r_t`` outside ``[1/B, B]`` gets weight 0;
- ``mask="sequence"``: a sample whose geometric-mean ratio ``exp(mean_t log r_t)`` is outside
  ``[1/B, B]`` gets weight 0 on every token;
- ``mask="none"``: nothing is masked.

A masked token still counts in the loss's normalisation (the global token and sequence counts
are fixed before the update), so masking removes its gradient and nothing else. Log-ratios are
clamped to ``[-20, 20]`` before any ``exp``, as everywhere here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from learner.functional import LOG_RATIO_CLAMP

WeightMode = Literal["none", "token", "sequence"]
MaskMode = Literal["none", "token", "sequence"]
Metrics = dict[str, torch.Tensor]

DEFAULT_CAP = 2.0  # TIS's truncation, as veRL and the TIS write-up use
DEFAULT_BAND = 2.0


@dataclass(frozen=True)
class OffPolicySpec:
    """The correction: the weight (``none``, ``token``, ``sequence``) truncated at ``cap``, and
    the mask (``none``, ``token``, ``sequence``) of ratios outside ``[1/band, band]``."""

    weight: WeightMode = "none"
    cap: float = DEFAULT_CAP
    mask: MaskMode = "none"
    band: float = DEFAULT_BAND

    def __post_init__(self):
        if self.weight not in ("none", "token", "sequence"):
            raise ValueError(f"weight={self.weight!r}; expected 'none', 'token' or 'sequence'")
        if self.mask not in ("none", "token", "sequence"):
            raise ValueError(f"mask={self.mask!r}; expected 'none', 'token' or 'sequence'")
        if not self.cap > 0:
            raise ValueError(f"cap must be > 0, got {self.cap}")
        if not self.band > 1:
            raise ValueError(f"band must be > 1, got {self.band}")

    @property
    def enabled(self) -> bool:
        return self.weight != "none" or self.mask != "none"


def behaviour_weights(
    old_logprobs: torch.Tensor,
    rollout_logprobs: torch.Tensor,
    response_mask: torch.Tensor,
    spec: OffPolicySpec,
    num_tokens: int | float | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """The per-token weights of ``spec`` (see the module docstring), detached, 0 off the mask.

    Args:
        old_logprobs: (B, T) the proximal policy's log-probabilities (``old_logprobs``).
        rollout_logprobs: (B, T) the behaviour policy's (``rollout_logprobs``).
        response_mask: (B, T) 1/True on the tokens in the loss.
        num_tokens: the batch's token count over every micro-batch and rank, so the metrics
            that are shares add up to the batch's (None: this micro-batch's).
    Returns:
        ``(weights, metrics)``: ``off_policy/weight_mean`` (mean weight over the tokens, masked
        ones at 0), ``off_policy/truncated_fraction`` (tokens whose weight the cap lowered),
        ``off_policy/masked_fraction`` (tokens masked), each a share of the batch's mean over
        ``num_tokens``; ``off_policy/weight_max`` and ``off_policy/ratio_max`` (the largest token
        ratio ``r_t`` before any cap).
    """
    mask = response_mask.bool()
    log_r = torch.where(mask, old_logprobs.detach() - rollout_logprobs.detach(), 0.0)
    log_r = log_r.float().clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = torch.exp(log_r)
    lengths = mask.sum(dim=1, keepdim=True)
    if spec.weight == "token":
        raw = ratio
    elif spec.weight == "sequence":
        seq = log_r.sum(dim=1, keepdim=True).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        raw = torch.exp(seq).expand_as(ratio)
    else:
        raw = torch.ones_like(ratio)
    weights = raw.clamp(max=spec.cap) if spec.weight != "none" else raw
    truncated = (raw > spec.cap) & mask if spec.weight != "none" else torch.zeros_like(mask)
    low, high = 1.0 / spec.band, spec.band
    if spec.mask == "token":
        keep = (ratio >= low) & (ratio <= high)
    elif spec.mask == "sequence":
        geo = torch.exp(log_r.sum(dim=1, keepdim=True) / lengths.clamp(min=1))
        keep = ((geo >= low) & (geo <= high)).expand_as(mask)
    else:
        keep = torch.ones_like(mask)
    weights = torch.where(mask & keep, weights, 0.0)
    n = float(num_tokens) if num_tokens is not None else float(mask.sum().clamp(min=1))
    n = max(n, 1.0)
    big = torch.finfo(ratio.dtype).max
    any_token = bool(mask.any())

    def largest(values: torch.Tensor) -> torch.Tensor:
        return torch.where(mask, values, -big).max() if any_token else values.new_tensor(1.0)

    metrics = {
        "off_policy/weight_mean": weights.sum() / n,
        "off_policy/truncated_fraction": (truncated & keep).float().sum() / n,
        "off_policy/masked_fraction": (mask & ~keep).float().sum() / n,
        "off_policy/weight_max": largest(weights),
        "off_policy/ratio_max": largest(ratio),
    }
    return weights.detach(), {k: v.detach() for k, v in metrics.items()}
