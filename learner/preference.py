"""Preference methods on the policy itself, no reward model: DPO (and IPO, conservative DPO) and
RRHF, on the same engine and prompt groups as reward-model training (``learner.supervised``).

Both read prompt groups as ``orchestration.preferences.preference_table`` writes them: a prompt,
its K distinct responses and the pairs ranked among them (``pair_chosen`` better than
``pair_rejected``). As for the reward model, a group never splits across micro-batches and each
response runs through the policy once however many pairs it is in. A response's log-probability
is the sum of its tokens' ``log pi(y_t | x, y_<t)`` at temperature 1.

``DirectPreference`` (DPO, Rafailov et al. 2023, arXiv 2305.18290) needs ``ref_logps``: per
response, the reference model's summed log-probability (also at temperature 1; a different
temperature on either side changes what the implicit reward ``beta (log pi - log pi_ref)``
means). Each pair's loss is ``-log sigmoid(beta h)``, ``h`` the policy's log-ratio of chosen to
rejected minus the reference's; ``label_smoothing`` gives conservative DPO (labels flipped with
that probability) and ``loss_type="ipo"`` IPO's squared loss ``(h - 1/(2 beta))^2`` (Azar et
al. 2023, arXiv 2310.12036), which does not drive h to infinity on deterministic preferences.
The pair margins are not used. Loss units are pairs.

``RankResponses`` (RRHF, Yuan et al. 2023, arXiv 2304.05302) needs ``best_response``: the index of
each group's highest-scored response. Its loss ranks the responses' length-normalised
log-probabilities in the order of their rewards (a hinge on every pair the wrong way round) and
adds the cross-entropy of the best response, so the policy both orders its candidates and
imitates the best. No reference model. Loss units are groups.

The losses are ``learner.losses.preference_loss`` and ``learner.losses.rrhf_loss``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torch import nn

from learner.losses import check_preference, preference_loss, rrhf_loss
from learner.models import LOGITS_CHUNK_BYTES
from learner.objectives import Counts, Micro, Objective
from learner.supervised import PairwiseRanking, flatten_groups, target_logprobs
from rollout import schema as S
from rollout.schema import PAIR_CHOSEN, PAIR_MARGIN, PAIR_REJECTED, RESPONSES
from rollout.tensors import PaddedBatch, to_padded

GROUP_COLUMNS = (
    S.PROMPT_ID,
    S.PROMPT_TOKEN_IDS,
    RESPONSES,
    PAIR_CHOSEN,
    PAIR_REJECTED,
    PAIR_MARGIN,
)
"""The prompt-group columns both objectives read (``orchestration.preferences``)."""


# ==========================================================================================
# Sequence log-probabilities
# ==========================================================================================


def _summed_logprobs(model: nn.Module, batch: PaddedBatch, chunk_bytes: int) -> torch.Tensor:
    """(B,) each row's summed response log-probability (temperature 1), with grad if enabled."""
    mask = batch.response_mask
    logprobs, _ = target_logprobs(model, batch, mask, chunk_bytes)  # (sum(mask),) row-major
    rows = mask.nonzero()[:, 0]  # the row of each True of the mask, in the same order
    return logprobs.new_zeros(mask.shape[0]).index_add(0, rows, logprobs)


@torch.no_grad()
def sequence_logprobs(
    model: nn.Module, table: pa.Table, pad_token_id: int, chunk_bytes: int = LOGITS_CHUNK_BYTES
) -> np.ndarray:
    """(N,) float32: each (prompt, response) row's summed response log-probability under
    ``model`` at temperature 1, in one forward pass (cut large tables first).

    ``table`` holds rows (``prompt_token_ids``, ``response_token_ids``) or prompt groups (the
    columns of ``GROUP_COLUMNS``): then N runs over every group's responses in order, group by
    group, so splitting it by the groups' K gives each group's ``ref_logps``.
    """
    if RESPONSES in table.column_names:
        batch = flatten_groups(table, pad_token_id).sequences
    else:
        batch = to_padded(table, pad_token_id=pad_token_id)
    device = next(model.parameters()).device
    return _summed_logprobs(model, batch.to(device), chunk_bytes).cpu().numpy()


def _require(table: pa.Table, columns: tuple[str, ...], objective: str) -> None:
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise KeyError(f"objective {objective} reads columns {missing}, which the table lacks")


def _per_group(table: pa.Table, column: str) -> np.ndarray:
    """(G,) the length of list column ``column`` in each group."""
    return np.asarray(pc.list_value_length(S.column_array(table, column)).fill_null(0))


# ==========================================================================================
# DPO
# ==========================================================================================


@dataclass(frozen=True)
class PreferenceBatch:
    """A micro-batch of prompt groups for DPO: every response once (``sequences``, N rows), the
    pairs as indices into its rows (``chosen``, ``rejected``: (P,)) and the reference's summed
    log-probability of each row (``ref_logps``: (N,) float32)."""

    sequences: PaddedBatch
    chosen: torch.Tensor
    rejected: torch.Tensor
    ref_logps: torch.Tensor

    def to(self, device) -> PreferenceBatch:
        return PreferenceBatch(
            self.sequences.to(device),
            self.chosen.to(device),
            self.rejected.to(device),
            self.ref_logps.to(device),
        )


@dataclass(frozen=True)
class DirectPreference(Objective):
    """DPO on prompt groups with ``ref_logps`` (see the module docstring). ``beta``: the
    strength of the implicit KL to the reference; ``loss_type``: ``sigmoid`` (DPO) or ``ipo``;
    ``label_smoothing``: conservative DPO's eps. Loss units are pairs (``Counts.tokens`` and
    ``Counts.sequences`` both count them). Metrics, shares of the mini-batch's means over
    pairs: ``dpo/loss``, ``dpo/accuracy`` (h > 0, a tie half), ``dpo/reward_chosen``,
    ``dpo/reward_rejected`` and ``dpo/margin`` (implicit rewards ``beta (log pi - log pi_ref)``
    and their difference).

    ``nll_coef``: with it above 0, each pair's loss gains ``nll_coef`` times the chosen
    response's token-mean negative log-likelihood (RPO, Pang et al. 2024's iterative DPO with
    NLL), which keeps the chosen responses' likelihood from falling with the rejected ones'
    (``dpo/nll``, a share).
    """

    beta: float = 0.1
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    nll_coef: float = 0.0
    logits_chunk_bytes: int = LOGITS_CHUNK_BYTES

    name = "dpo"
    models = ("actor",)
    shares = frozenset(
        {
            "dpo/loss",
            "dpo/accuracy",
            "dpo/reward_chosen",
            "dpo/reward_rejected",
            "dpo/margin",
            "dpo/nll",
        }
    )
    # K prompts and K responses per group, as the reward model's: a group never splits.
    lengths = PairwiseRanking.lengths

    def __post_init__(self):
        check_preference(self.beta, self.loss_type, self.label_smoothing)

    def collate(self, table: pa.Table, pad_token_id: int) -> Micro:
        _require(table, (*GROUP_COLUMNS, S.REF_LOGPS), self.name)
        k, refs = _per_group(table, RESPONSES), _per_group(table, S.REF_LOGPS)
        if (k != refs).any():
            g = int(np.flatnonzero(k != refs)[0])
            prompt_id = S.column_array(table, S.PROMPT_ID)[g].as_py()
            raise ValueError(f"prompt_id {prompt_id}: {refs[g]} {S.REF_LOGPS} for {k[g]} responses")
        groups = flatten_groups(table, pad_token_id)
        ref = pc.list_flatten(S.column_array(table, S.REF_LOGPS)).to_numpy(zero_copy_only=False)
        batch = PreferenceBatch(
            groups.sequences,
            groups.chosen,
            groups.rejected,
            torch.tensor(ref, dtype=torch.float32),
        )
        pairs = float(batch.chosen.numel())
        return Micro(batch, None, pairs, pairs)

    def micro_loss(self, model, models, batch: PreferenceBatch, mask, counts: Counts, settings):
        logps = _summed_logprobs(models[model], batch.sequences, self.logits_chunk_bytes)  # (N,)
        loss, stats = preference_loss(
            logps[batch.chosen],
            logps[batch.rejected],
            batch.ref_logps[batch.chosen],
            batch.ref_logps[batch.rejected],
            beta=self.beta,
            loss_type=self.loss_type,
            label_smoothing=self.label_smoothing,
            num_pairs=counts.tokens,
        )
        metrics = {f"dpo/{k}": v for k, v in stats.items()}
        if self.nll_coef > 0:
            lengths = batch.sequences.response_lengths[batch.chosen].clamp(min=1).float()
            nll = (-logps[batch.chosen] / lengths).sum() / max(counts.tokens, 1.0)
            loss = loss + self.nll_coef * nll
            metrics["dpo/nll"] = nll.detach()
        return loss, {"dpo/loss": loss.detach()} | metrics


# ==========================================================================================
# RRHF
# ==========================================================================================


@dataclass(frozen=True)
class RankBatch:
    """A micro-batch of G prompt groups for RRHF: every response once (``sequences``, N rows),
    the pairs as indices into its rows (``chosen`` scored higher than ``rejected``: (P,)), the
    group of each pair (``groups``: (P,), 0..G-1) and each group's best row (``best``: (G,))."""

    sequences: PaddedBatch
    chosen: torch.Tensor
    rejected: torch.Tensor
    groups: torch.Tensor
    best: torch.Tensor

    def to(self, device) -> RankBatch:
        return RankBatch(
            self.sequences.to(device),
            *(getattr(self, f).to(device) for f in ("chosen", "rejected", "groups", "best")),
        )


@dataclass(frozen=True)
class RankResponses(Objective):
    """RRHF on prompt groups with ``best_response`` (see the module docstring). ``ce_coef``:
    the weight of the best response's cross-entropy. Loss units are groups. Metrics:
    ``rrhf/loss``, ``rrhf/rank_loss`` and ``rrhf/ft_loss`` (shares of the mini-batch's means
    over groups), and ``rrhf/rank_accuracy`` (a rate: the share of a micro-batch's pairs whose
    chosen response has the higher length-normalised log-probability, averaged over the
    micro-batches that have pairs; ``Engine.evaluate`` reports shares only).
    """

    ce_coef: float = 1.0
    logits_chunk_bytes: int = LOGITS_CHUNK_BYTES

    name = "rrhf"
    models = ("actor",)
    shares = frozenset({"rrhf/loss", "rrhf/rank_loss", "rrhf/ft_loss"})
    rates = frozenset({"rrhf/rank_accuracy"})
    lengths = PairwiseRanking.lengths  # as DirectPreference's: a group never splits

    def collate(self, table: pa.Table, pad_token_id: int) -> Micro:
        _require(table, (*GROUP_COLUMNS, S.BEST_RESPONSE), self.name)
        k = _per_group(table, RESPONSES)
        best = S.column_array(table, S.BEST_RESPONSE).to_numpy(zero_copy_only=False)
        wrong = ~((best >= 0) & (best < k))  # NaN (a null) fails too
        if wrong.any():
            g = int(np.flatnonzero(wrong)[0])
            prompt_id = S.column_array(table, S.PROMPT_ID)[g].as_py()
            raise ValueError(
                f"prompt_id {prompt_id}: {S.BEST_RESPONSE} {best[g]} is not one of its {k[g]} "
                "responses"
            )
        groups = flatten_groups(table, pad_token_id)
        first = np.cumsum(k) - k  # each group's first row
        pairs = _per_group(table, PAIR_CHOSEN)
        batch = RankBatch(
            groups.sequences,
            groups.chosen,
            groups.rejected,
            torch.from_numpy(np.repeat(np.arange(len(k)), pairs)).long(),
            torch.from_numpy(first + best.astype(np.int64)).long(),
        )
        n = float(table.num_rows)
        return Micro(batch, None, n, n)

    def micro_loss(self, model, models, batch: RankBatch, mask, counts: Counts, settings):
        seq = batch.sequences
        logps = _summed_logprobs(models[model], seq, self.logits_chunk_bytes)  # (N,)
        loss, stats = rrhf_loss(
            logps,
            seq.response_lengths,
            batch.chosen,
            batch.rejected,
            batch.best,
            batch.groups,
            ce_coef=self.ce_coef,
            num_groups=counts.tokens,
        )
        metrics = {
            "rrhf/loss": loss.detach(),
            "rrhf/rank_loss": stats["rank_loss"],
            "rrhf/ft_loss": stats["ft_loss"],
        }
        if batch.chosen.numel():  # no pairs, no rate: the engine averages over those that have
            metrics["rrhf/rank_accuracy"] = stats["rank_accuracy"]
        return loss, metrics
