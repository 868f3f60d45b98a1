"""Objectives: what the learner engine (``learner.engine``) trains towards.

An objective declares what it needs and computes one micro-batch's loss; the engine does the
rest (process group, DeepSpeed, micro-batches cut by tokens, global token and sequence counts
over every rank, skip-or-step on non-finite values, checkpoints, export, weight sync). A new
training method is one small objective here (or in its own file) plus its loss in
``learner.losses``; the engine does not change.

An objective declares:

- ``models``: the engine models it trains, ``"actor"`` (the policy, always) and ``"critic"``
  (a value head on the policy's body);
- ``columns``: the per-token rollout columns it reads (padded onto each micro-batch);
- ``shares``, ``rates`` and ``maxima``: how each metric it reports aggregates. A *share* is
  this micro-batch's part of the mini-batch's loss (computed with the global counts): shares
  are summed over micro-batches and ranks. A *rate* (a clip fraction, a mean ratio) is averaged
  over micro-batches. A *maximum* is the largest over micro-batches and ranks. The engine
  refuses a metric declared as none of them, instead of averaging a loss share by mistake.

and implements ``micro_loss(model, models, batch, mask, counts, settings)``: one model's loss on
a micro-batch and its metrics (the engine calls it per model, backward after each); optionally
``forward`` (the columns a scoring pass adds before training, such as ``old_logprobs``) and
``loss_mask`` (which response tokens count).

The engine's models are ``"actor"`` (a causal LM), ``"critic"`` (a value head on every position)
and ``"rm"`` (a reward model: the same value model, read at the last token); an objective trains
any of them, the supervised ones one alone (``learner.supervised``). A table whose rows are not
one prompt and one response (a reward model's prompt groups) comes with the objective's own
``lengths`` (tokens per row, for cutting micro-batches) and ``collate`` (a micro-batch's tensors,
loss mask and loss units).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from learner.losses import aggregate, kl_loss, policy_loss, value_loss
from learner.models import LOGITS_CHUNK_BYTES, critic_forward, policy_forward
from learner.off_policy import OffPolicySpec, behaviour_weights
from rollout import schema as S
from rollout.tensors import PaddedBatch, model_token_mask, to_padded

Metrics = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Counts:
    """The mini-batch's loss denominators, summed over every rank: response tokens in the loss
    mask, and sequences with at least one of them."""

    tokens: float
    sequences: float


@dataclass(frozen=True)
class Micro:
    """One micro-batch as an objective sees it: its tensors (``batch``, with a ``to(device)``),
    the mask of what counts in the loss (None when the loss units are not tokens), and its
    loss units: ``tokens`` and ``sequences`` (an objective whose units are pairs counts them
    in both)."""

    batch: Any
    mask: torch.Tensor | None
    tokens: float
    sequences: float


class Objective:
    """The seam between the engine and a training method (see the module docstring)."""

    name = "objective"
    models: tuple[str, ...] = ("actor",)
    columns: tuple[str, ...] = ()
    shares: frozenset[str] = frozenset()
    rates: frozenset[str] = frozenset()
    maxima: frozenset[str] = frozenset()

    def loss_mask(self, table: pa.Table, response_mask: torch.Tensor) -> torch.Tensor:
        """The response tokens that count in the loss (and its denominators): the model's
        (a multi-turn episode's observation tokens, ``loss_mask`` 0, never count)."""
        return model_token_mask(table, response_mask)

    def lengths(self, table: pa.Table) -> np.ndarray:
        """(rows,) tokens each row puts through the model: prompt + response."""
        return np.asarray(
            pc.list_value_length(S.column_array(table, S.PROMPT_TOKEN_IDS))
        ) + np.asarray(pc.list_value_length(S.column_array(table, S.RESPONSE_TOKEN_IDS)))

    def collate(self, table: pa.Table, pad_token_id: int) -> Micro:
        """A micro-batch of rows as padded tensors (``rollout.tensors.to_padded``) with the
        objective's columns, its loss mask and the mask's tokens and sequences."""
        batch = to_padded(table, pad_token_id=pad_token_id, per_token_columns=self.columns)
        mask = self.loss_mask(table, batch.response_mask)
        return Micro(batch, mask, float(mask.sum()), float((mask.sum(1) > 0).sum()))

    def forward(self, models: Mapping[str, torch.nn.Module], batch: PaddedBatch) -> dict:
        """Per-token tensors (B, R) to append as columns before training; none by default."""
        return {}

    def micro_loss(
        self,
        model: str,
        models: Mapping[str, torch.nn.Module],
        batch: PaddedBatch,
        mask: torch.Tensor,
        counts: Counts,
        settings: Mapping[str, float],
    ) -> tuple[torch.Tensor, Metrics]:
        """Model ``model``'s loss on this micro-batch (its share of the mini-batch's loss, with
        ``counts`` as denominators) and its metrics. Called once per model in ``models``."""
        raise NotImplementedError


@dataclass(frozen=True)
class LossSpec:
    """The clipped policy loss's settings, and the value loss's (see ``learner.losses``)."""

    clip_low: float = 0.2
    clip_high: float = 0.2
    dual_clip: float | None = None
    agg: str = "token-mean"
    entropy_coef: float = 0.0
    kl_loss_coef: float = 0.0  # GRPO-style KL to the reference as a loss term; 0 = off
    kl_kind: str = "k3"
    value_clip: float | None = 0.2
    off_policy: OffPolicySpec = OffPolicySpec()  # the behaviour correction; off by default


@dataclass(frozen=True)
class PolicyGradient(Objective):
    """PPO / GRPO: the clipped policy loss (with entropy bonus and, GRPO-style, the KL to the
    reference as a loss term) and, with a critic, the clipped value loss.

    ``settings["kl_coef"]`` (the run's KL controller, every step) overrides
    ``loss.kl_loss_coef``, the starting coefficient, when the KL is a loss term.

    ``on_policy``: the update is exactly on-policy (one epoch of one mini-batch, no critic):
    the old log-probabilities are this forward's own, detached, so no scoring pass runs before
    training (``forward`` is still there for probes). The loss and its gradient are those the
    scoring pass would give (the ratio is 1 in value, ``exp(logp - sg(logp))`` in gradient), and
    the rollout metrics that need the learner's log-probabilities (``actor/kl_ref``,
    ``rollout/logprob_mismatch``, ``rollout/logprob_mismatch_max``) come from here, over the
    tokens in the loss.

    ``logits_chunk_bytes``: the most memory full-vocabulary logits take at once
    (``learner.models.policy_forward``).
    """

    loss: LossSpec = LossSpec()
    temperature: float = 1.0
    critic: bool = False
    on_policy: bool = False
    logits_chunk_bytes: int = LOGITS_CHUNK_BYTES

    name = "policy_gradient"
    shares = frozenset(
        {
            "actor/pg_loss",
            "actor/entropy",
            "actor/kl_loss",
            "critic/value_loss",
            "actor/kl_ref",
            "rollout/logprob_mismatch",
            "off_policy/weight_mean",
            "off_policy/truncated_fraction",
            "off_policy/masked_fraction",
        }
    )
    maxima = frozenset(
        {"rollout/logprob_mismatch_max", "off_policy/weight_max", "off_policy/ratio_max"}
    )
    rates = frozenset(
        {
            "actor/clipfrac",
            "actor/dual_clipfrac",
            "actor/approx_kl",
            "actor/ratio_mean",
            "actor/ratio_min",
            "actor/ratio_max",
            "critic/vf_clipfrac",
            "critic/vpred_mean",
        }
    )

    def __post_init__(self):
        if self.on_policy and self.critic:
            raise ValueError("on_policy needs no critic: the critic's values come from a pass")

    @property
    def models(self) -> tuple[str, ...]:
        return ("actor", "critic") if self.critic else ("actor",)

    @property
    def columns(self) -> tuple[str, ...]:
        if self.on_policy:
            return (S.ADVANTAGES, S.ROLLOUT_LOGPROBS, S.REF_LOGPROBS)
        columns = [S.OLD_LOGPROBS, S.ADVANTAGES]
        if self.loss.off_policy.enabled:
            columns.append(S.ROLLOUT_LOGPROBS)
        if self.loss.kl_loss_coef > 0:
            columns.append(S.REF_LOGPROBS)
        if self.critic:
            columns += [S.VALUES, S.RETURNS]
        return tuple(columns)

    def loss_mask(self, table: pa.Table, response_mask: torch.Tensor) -> torch.Tensor:
        # Unscorable rows (null score) teach nothing: they leave every loss term; so do the
        # observation tokens of multi-turn episodes.
        mask = model_token_mask(table, response_mask)
        if S.SCORE not in table.column_names:
            return mask
        valid = pc.is_valid(S.column_array(table, S.SCORE)).to_numpy(zero_copy_only=False)
        return mask & torch.from_numpy(valid).to(response_mask.device).unsqueeze(1)

    def forward(self, models, batch: PaddedBatch) -> dict:
        policy = policy_forward(
            models["actor"],
            batch,
            temperature=self.temperature,
            chunk_bytes=self.logits_chunk_bytes,
        )
        out = {S.OLD_LOGPROBS: policy.logprobs}
        if self.critic:
            out[S.VALUES] = critic_forward(models["critic"], batch)
        return out

    def micro_loss(self, model, models, batch, mask, counts, settings):
        if model == "actor":
            return self._actor(models["actor"], batch, mask, counts, settings)
        t = batch.per_token
        values = critic_forward(models["critic"], batch)
        loss, metrics = value_loss(
            values,
            t[S.VALUES],
            t[S.RETURNS],
            mask,
            clip=self.loss.value_clip,
            num_tokens=counts.tokens,
            num_seqs=counts.sequences,
        )
        metrics["critic/value_loss"] = loss.detach()
        return loss, metrics

    def _actor(self, model, batch, mask, counts: Counts, settings) -> tuple[torch.Tensor, Metrics]:
        spec, agg = self.loss, self.loss.agg
        n_tok, n_seq = counts.tokens, counts.sequences
        out = policy_forward(
            model,
            batch,
            temperature=self.temperature,
            with_entropy=True,
            entropy_grad=spec.entropy_coef != 0,  # else a metric: no backward through it
            chunk_bytes=self.logits_chunk_bytes,
        )
        t = batch.per_token
        old = out.logprobs.detach() if self.on_policy else t[S.OLD_LOGPROBS]
        weights, correction = None, {}
        if spec.off_policy.enabled:
            weights, correction = behaviour_weights(
                old, t[S.ROLLOUT_LOGPROBS], mask, spec.off_policy, num_tokens=n_tok
            )
        pg_loss, metrics = policy_loss(
            out.logprobs,
            old,
            t[S.ADVANTAGES],
            mask,
            clip_low=spec.clip_low,
            clip_high=spec.clip_high,
            dual_clip=spec.dual_clip,
            agg=agg,
            num_tokens=n_tok,
            num_seqs=n_seq,
            weights=weights,
        )
        metrics |= correction
        entropy = aggregate(out.entropy, mask, agg, num_tokens=n_tok, num_seqs=n_seq)
        loss = pg_loss - spec.entropy_coef * entropy if spec.entropy_coef else pg_loss
        metrics["actor/pg_loss"] = pg_loss.detach()
        metrics["actor/entropy"] = entropy.detach()
        if spec.kl_loss_coef > 0:
            kl, kl_metrics = kl_loss(
                out.logprobs, t[S.REF_LOGPROBS], mask, spec.kl_kind, agg, n_tok, n_seq
            )
            loss = loss + settings.get("kl_coef", spec.kl_loss_coef) * kl
            metrics |= kl_metrics
        if self.on_policy:
            metrics |= _rollout_metrics(old, t[S.ROLLOUT_LOGPROBS], t[S.REF_LOGPROBS], mask, n_tok)
        return loss, metrics


def _rollout_metrics(logprobs, rollout, ref, mask, num_tokens: float) -> Metrics:
    """This micro-batch's shares of the batch's mean ``logprobs - ref`` and
    ``|rollout - logprobs|`` over ``num_tokens`` tokens, and the largest gap."""
    gap = torch.where(mask, (rollout - logprobs).abs(), 0.0)
    return {
        "actor/kl_ref": torch.where(mask, logprobs - ref, 0.0).sum() / num_tokens,
        "rollout/logprob_mismatch": gap.sum() / num_tokens,
        "rollout/logprob_mismatch_max": gap.max() if gap.numel() else gap.new_zeros(()),
    }
