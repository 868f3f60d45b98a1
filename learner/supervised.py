"""The supervised objectives: next-token prediction (SFT, and PTX inside RL) and pairwise ranking
(reward-model training), on the same engine as the policy gradient (``learner.engine``).

``NextToken`` reads rows of ``prompt_token_ids``, ``response_token_ids`` and, when present, the
per-token ``sft_mask`` (``orchestration.sft_data``: chat rows keep only assistant turns in the
loss); the loss is the token-mean negative log-likelihood of the response tokens in the mask.
A micro-batch is padded (prompt left, response right, as rollouts are) or *packed*: several
samples end to end in one row, first-fit-decreasing into rows as long as the micro-batch's
longest sample, with position ids restarting at 0 for each sample and a block-diagonal causal
mask, so no token attends across samples and each sample's loss is what it is alone. ``packing``
``"auto"`` packs when that needs fewer rows than padding.

``PairwiseRanking`` reads prompt groups (``orchestration.preferences.preference_table``): a
prompt, its K distinct responses, and the pairs ranked among them with their margins. A group
never splits across micro-batches: every pair of a K-response ranking trains in the same
micro-batch and the same step (InstructGPT), and each response runs through the model once
however many pairs it is in. The score is the value head's output at the last token of prompt
+ response; the loss is ``learner.losses.pairwise_loss`` (Llama 2's margin, ChatGLM-RLHF's L2
regulariser), averaged over the mini-batch's pairs on every rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torch import nn

from learner.losses import next_token_loss, pairwise_loss
from learner.models import LOGITS_CHUNK_BYTES, plain_head
from learner.objectives import Counts, Micro, Objective
from rollout import schema as S
from rollout.schema import PAIR_CHOSEN, PAIR_MARGIN, PAIR_REJECTED, RESPONSES
from rollout.tensors import PaddedBatch, to_padded


@dataclass(frozen=True)
class PackedBatch:
    """Samples packed end to end into rows (B rows of width L).

    ``input_ids`` (B, L); ``position_ids`` (B, L), 0 at each sample's first token (the padding
    at a row's end counts as one more sample); ``segments`` (B, L), the sample each token
    belongs to within its row (-1: padding); ``targets`` (B, L), the next token at each
    position, and ``loss_mask`` (B, L), True where that target is in the loss.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    segments: torch.Tensor
    targets: torch.Tensor
    loss_mask: torch.Tensor

    def to(self, device) -> PackedBatch:
        return PackedBatch(*(getattr(self, f).to(device) for f in self.__dataclass_fields__))

    @property
    def attention_mask(self) -> torch.Tensor:
        """(B, 1, L, L) bool: query ``i`` attends key ``j <= i`` of its own sample. Padding
        attends itself only, so no row of the mask is empty."""
        seg = self.segments
        same = seg.unsqueeze(2) == seg.unsqueeze(1)
        n = seg.shape[1]
        causal = torch.ones(n, n, dtype=torch.bool, device=seg.device).tril()
        eye = torch.eye(n, dtype=torch.bool, device=seg.device)
        return ((same & causal) | eye).unsqueeze(1)


def first_fit_decreasing(lengths: np.ndarray, capacity: int) -> list[list[int]]:
    """Item indices packed into bins of ``capacity`` (longest first, each into the first bin
    with room); an item longer than ``capacity`` gets a bin of its own."""
    bins: list[list[int]] = []
    room: list[int] = []
    for i in np.argsort(-np.asarray(lengths), kind="stable"):
        n = int(lengths[i])
        for b, free in enumerate(room):
            if n <= free:
                bins[b].append(int(i))
                room[b] -= n
                break
        else:
            bins.append([int(i)])
            room.append(capacity - n)
    return bins


def _row_lists(table: pa.Table) -> tuple[list, list, list | None]:
    prompts = S.column_array(table, S.PROMPT_TOKEN_IDS).to_pylist()
    responses = S.column_array(table, S.RESPONSE_TOKEN_IDS).to_pylist()
    masks = (
        S.column_array(table, S.SFT_MASK).to_pylist() if S.SFT_MASK in table.column_names else None
    )
    return prompts, responses, masks


def pack(table: pa.Table, pad_token_id: int, capacity: int | None = None) -> PackedBatch:
    """The rows of ``table`` packed (see :class:`PackedBatch`) into rows of ``capacity`` tokens
    (default: the longest row's prompt + response)."""
    prompts, responses, masks = _row_lists(table)
    lengths = np.array([len(p) + len(r) for p, r in zip(prompts, responses, strict=True)])
    width = int(capacity or lengths.max())
    bins = first_fit_decreasing(lengths, width)
    shape = (len(bins), width)
    ids = torch.full(shape, pad_token_id, dtype=torch.long)
    pos = torch.zeros(shape, dtype=torch.long)
    seg = torch.full(shape, -1, dtype=torch.long)
    targets = torch.zeros(shape, dtype=torch.long)
    loss = torch.zeros(shape, dtype=torch.bool)
    for b, items in enumerate(bins):
        at = 0
        for s, i in enumerate(items):
            tokens = prompts[i] + responses[i]
            n, p = len(tokens), len(prompts[i])
            ids[b, at : at + n] = torch.tensor(tokens)
            pos[b, at : at + n] = torch.arange(n)
            seg[b, at : at + n] = s
            # position at + p - 1 + t predicts response token t
            targets[b, at + p - 1 : at + n - 1] = torch.tensor(responses[i])
            keep = torch.ones(len(responses[i]), dtype=torch.bool)
            if masks is not None:
                keep = torch.tensor(masks[i]) > 0.5
            loss[b, at + p - 1 : at + n - 1] = keep
            at += n
        pos[b, at:] = torch.arange(width - at)
    return PackedBatch(ids, pos, seg, targets, loss)


def _chunk_stats(head: nn.Module, hidden: torch.Tensor, ids: torch.Tensor, chunk_bytes: int):
    """Log-probabilities of ``ids`` (N,) from hidden states (N, H), and whether each is the
    argmax, computed in chunks of at most ``chunk_bytes`` of float32 logits (each chunk
    recomputed in backward when there are several)."""
    vocab = head.out_features if isinstance(head, nn.Linear) else hidden.shape[-1]
    chunk = max(1, chunk_bytes // (4 * vocab))

    def stats(h: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logp = head(h).float().log_softmax(-1)
        return logp.gather(-1, t.unsqueeze(-1)).squeeze(-1), logp.argmax(-1) == t

    recompute = torch.is_grad_enabled() and hidden.requires_grad and hidden.shape[0] > chunk
    logprobs, correct = [], []
    for start in range(0, hidden.shape[0], chunk):
        h, t = hidden[start : start + chunk], ids[start : start + chunk]
        if recompute:
            from torch.utils.checkpoint import checkpoint

            lp, ok = checkpoint(stats, h, t, use_reentrant=False)
        else:
            lp, ok = stats(h, t)
        logprobs.append(lp)
        correct.append(ok)
    if not logprobs:
        return hidden.new_zeros(0, dtype=torch.float32), torch.zeros(0, dtype=torch.bool)
    return torch.cat(logprobs), torch.cat(correct)


def target_logprobs(
    model: nn.Module, batch, mask: torch.Tensor, chunk_bytes: int = LOGITS_CHUNK_BYTES
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logprobs, correct)`` of the target tokens in ``mask``, flat (N,), for a padded batch
    (``mask`` (B, R) over its responses) or a packed one (``mask`` (B, L))."""
    head = plain_head(model)
    if head is None:  # the model's own forward gives the logits
        head, decoder = nn.Identity(), None
    else:
        decoder = model.get_decoder()
    packed = isinstance(batch, PackedBatch)
    inputs = {
        "input_ids": batch.input_ids,
        "attention_mask": batch.attention_mask,  # packed: block-diagonal causal (B, 1, L, L)
        "position_ids": batch.position_ids,
        "use_cache": False,
    }
    out = (decoder or model)(**inputs)
    states = out.last_hidden_state if decoder is not None else out.logits
    if packed:
        return _chunk_stats(head, states[mask], batch.targets[mask], chunk_bytes)
    p, r = batch.prompt_width, batch.response_ids.shape[1]
    predicting = states[:, p - 1 : p - 1 + r][mask]  # position P - 1 + t predicts token t
    return _chunk_stats(head, predicting, batch.response_ids[mask], chunk_bytes)


@dataclass(frozen=True)
class NextToken(Objective):
    """Next-token prediction on the response tokens in the mask: SFT as a stage, and the PTX
    term in RL (``prefix="actor/ptx_"``). Metrics ``<prefix>loss`` and ``<prefix>accuracy``
    (the share of masked tokens whose target is the argmax), shares of the mini-batch's."""

    packing: str = "auto"
    prefix: str = "sft/"
    logits_chunk_bytes: int = LOGITS_CHUNK_BYTES

    name = "next_token"
    models = ("actor",)

    def __post_init__(self):
        if self.packing not in ("auto", "always", "never"):
            raise ValueError(f"packing={self.packing!r}: give auto, always or never")

    @property
    def shares(self) -> frozenset[str]:
        return frozenset({f"{self.prefix}loss", f"{self.prefix}accuracy"})

    def collate(self, table: pa.Table, pad_token_id: int) -> Micro:
        lengths = self.lengths(table)
        packed = None
        if self.packing != "never":
            packed = pack(table, pad_token_id)
            if self.packing == "auto" and packed.input_ids.shape[0] >= table.num_rows:
                packed = None
        if packed is not None:
            mask = packed.loss_mask
            return Micro(packed, mask, float(mask.sum()), float(len(lengths)))
        columns = (S.SFT_MASK,) if S.SFT_MASK in table.column_names else ()
        batch = to_padded(table, pad_token_id=pad_token_id, per_token_columns=columns)
        mask = batch.response_mask
        if columns:
            mask = mask & (batch.per_token[S.SFT_MASK] > 0.5)
        return Micro(batch, mask, float(mask.sum()), float((mask.sum(1) > 0).sum()))

    def micro_loss(self, model, models, batch, mask, counts: Counts, settings):
        logprobs, correct = target_logprobs(models[model], batch, mask, self.logits_chunk_bytes)
        flat = torch.ones_like(logprobs, dtype=torch.bool)
        loss, _ = next_token_loss(logprobs, flat, counts.tokens)
        accuracy = correct.float().sum() / max(counts.tokens, 1.0)
        return loss, {f"{self.prefix}loss": loss.detach(), f"{self.prefix}accuracy": accuracy}


@dataclass(frozen=True)
class GroupBatch:
    """A micro-batch of prompt groups: every response of every group once, as a padded batch
    (``sequences``), and the pairs as indices into its rows with their margins."""

    sequences: PaddedBatch
    chosen: torch.Tensor
    rejected: torch.Tensor
    margin: torch.Tensor

    def to(self, device) -> GroupBatch:
        return GroupBatch(
            self.sequences.to(device),
            self.chosen.to(device),
            self.rejected.to(device),
            self.margin.to(device),
        )


def flatten_groups(table: pa.Table, pad_token_id: int) -> GroupBatch:
    """Prompt groups -> one row per (prompt, response) and the pairs' row indices."""
    prompts = S.column_array(table, S.PROMPT_TOKEN_IDS).to_pylist()
    groups = table.column(RESPONSES).to_pylist()
    chosen, rejected, margins = (
        table.column(c).to_pylist() for c in (PAIR_CHOSEN, PAIR_REJECTED, PAIR_MARGIN)
    )
    rows_p, rows_r, c_idx, r_idx, m = [], [], [], [], []
    for prompt, responses, cs, rs, ms in zip(
        prompts, groups, chosen, rejected, margins, strict=True
    ):
        base = len(rows_r)
        rows_p += [prompt] * len(responses)
        rows_r += responses
        c_idx += [base + c for c in cs]
        r_idx += [base + r for r in rs]
        m += ms
    flat = pa.table(
        {
            S.PROMPT_ID: pa.array(np.arange(len(rows_r)), pa.int64()),
            S.PROMPT_TOKEN_IDS: pa.array(rows_p, S.KNOWN_FIELDS[S.PROMPT_TOKEN_IDS].type),
            S.RESPONSE_TOKEN_IDS: pa.array(rows_r, S.KNOWN_FIELDS[S.RESPONSE_TOKEN_IDS].type),
        }
    )
    return GroupBatch(
        to_padded(flat, pad_token_id=pad_token_id),
        torch.tensor(c_idx, dtype=torch.long),
        torch.tensor(r_idx, dtype=torch.long),
        torch.tensor(m, dtype=torch.float32),
    )


def last_token_scores(model: nn.Module, batch: PaddedBatch) -> torch.Tensor:
    """(B,) the value head's output at each row's last real token (its response's last)."""
    values = model(batch.input_ids, batch.attention_mask, batch.position_ids)
    last = batch.prompt_width + batch.response_lengths - 1
    return values[torch.arange(values.shape[0], device=values.device), last].float()


@dataclass(frozen=True)
class PairwiseRanking(Objective):
    """Reward-model training on prompt groups (see the module docstring). ``reg``: lambda of
    the L2 regulariser on both scores. Loss units are pairs (``Counts.tokens`` and
    ``Counts.sequences`` both count them)."""

    reg: float = 0.0

    name = "pairwise_ranking"
    models = ("rm",)
    shares = frozenset({"rm/loss", "rm/accuracy", "rm/margin_mean"})

    def lengths(self, table: pa.Table) -> np.ndarray:
        """Tokens each group puts through the model: K prompts and its K responses."""
        k = np.asarray(pc.list_value_length(table.column(RESPONSES)))
        prompt = np.asarray(pc.list_value_length(S.column_array(table, S.PROMPT_TOKEN_IDS)))
        flat = pc.list_flatten(table.column(RESPONSES))
        per_response = np.asarray(pc.list_value_length(flat))
        owner = np.repeat(np.arange(table.num_rows), k)
        total = np.bincount(owner, weights=per_response, minlength=table.num_rows)
        return (k * prompt + total).astype(np.int64)

    def collate(self, table: pa.Table, pad_token_id: int) -> Micro:
        batch = flatten_groups(table, pad_token_id)
        pairs = float(batch.chosen.numel())
        return Micro(batch, None, pairs, pairs)

    def micro_loss(self, model, models, batch: GroupBatch, mask, counts: Counts, settings):
        scores = last_token_scores(models[model], batch.sequences)
        loss, stats = pairwise_loss(
            scores[batch.chosen],
            scores[batch.rejected],
            batch.margin,
            reg=self.reg,
            num_pairs=counts.tokens,
        )
        return loss, {
            "rm/loss": loss.detach(),
            "rm/accuracy": stats["accuracy"],
            "rm/margin_mean": stats["margin_mean"],
        }
