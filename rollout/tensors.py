"""Arrow rollout table <-> padded torch tensors.

The model sees one row per sample laid out as ``[left-padded prompt | right-padded response]``::

    input_ids        pad pad p0 p1 p2 | r0 r1 r2 pad      (B, P + R)
    attention_mask     0   0  1  1  1 |  1  1  1   0      (B, P + R)
    position_ids       0   0  0  1  2 |  3  4  5   5      (B, P + R)
    response_mask                     |  1  1  1   0      (B, R)

so every response starts at column ``P`` (the longest prompt) and per-token quantities over the
response are ``(B, R)`` tensors with a right-padded ``response_mask``, the layout that
``learner.algorithms`` expects. Conversions are vectorised numpy over Arrow buffers.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from rollout import schema as S
from rollout.validate import RolloutValidationError


@dataclass(frozen=True)
class PaddedBatch:
    """A rollout table as padded tensors (shapes use B rows, P prompt width, R response width).

    Attributes:
        input_ids: (B, P+R) int64, prompt left-padded and response right-padded with
            ``pad_token_id``.
        attention_mask: (B, P+R) int64, 1 on real tokens.
        position_ids: (B, P+R) int64, 0 at each row's first real token, counting real tokens.
        response_ids: (B, R) int64, the response tokens (``input_ids[:, P:]``).
        response_mask: (B, R) bool, True on real response tokens.
        prompt_width: P; the response of every row starts at column P of ``input_ids``.
        per_token: (B, R) float32 tensors for each per-token column that was asked for, zero
            outside ``response_mask``.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    prompt_width: int
    per_token: dict[str, torch.Tensor] = field(default_factory=dict)

    def to(self, device: torch.device | str) -> PaddedBatch:
        """The same batch with every tensor on ``device``."""
        moved = {
            name: getattr(self, name).to(device)
            for name in ("input_ids", "attention_mask", "position_ids", "response_ids")
        }
        return PaddedBatch(
            **moved,
            response_mask=self.response_mask.to(device),
            prompt_width=self.prompt_width,
            per_token={k: v.to(device) for k, v in self.per_token.items()},
        )

    @property
    def response_lengths(self) -> torch.Tensor:
        """(B,) int64 number of response tokens per row."""
        return self.response_mask.sum(dim=1)


def _pad(
    arr: pa.ListArray, width: int, *, left: bool, pad_value, dtype
) -> tuple[np.ndarray, np.ndarray]:
    """Scatter a list array into a (len(arr), width) matrix; returns (values, mask)."""
    lengths = np.asarray(pc.list_value_length(arr).fill_null(0), dtype=np.int64)
    rows = len(arr)
    out = np.full((rows, width), pad_value, dtype=dtype)
    mask = np.zeros((rows, width), dtype=bool)
    flat = np.asarray(arr.flatten().to_numpy(zero_copy_only=False), dtype=dtype)
    if flat.size:
        parent = np.repeat(np.arange(rows), lengths)
        starts = np.cumsum(lengths) - lengths
        pos = np.arange(flat.size) - np.repeat(starts, lengths)
        if left:
            pos = pos + (width - lengths)[parent]
        out[parent, pos] = flat
        mask[parent, pos] = True
    return out, mask


def to_padded(
    table: pa.Table,
    *,
    pad_token_id: int,
    per_token_columns: Iterable[str] = (),
    response_width: int | None = None,
) -> PaddedBatch:
    """Pad a rollout table's token columns (and chosen per-token columns) into tensors.

    Args:
        table: a rollout table (see :mod:`rollout.schema`).
        pad_token_id: the id written into padding positions of ``input_ids``.
        per_token_columns: list<float32> columns to return as (B, R) tensors in ``per_token``.
        response_width: R; defaults to the longest response. Must be >= the longest response.
    """
    prompts = S.column_array(table, S.PROMPT_TOKEN_IDS)
    responses = S.column_array(table, S.RESPONSE_TOKEN_IDS)
    p_width = int(pc.max(pc.list_value_length(prompts)).as_py() or 0)
    longest = int(pc.max(pc.list_value_length(responses)).as_py() or 0)
    r_width = longest if response_width is None else response_width
    if r_width < longest:
        raise ValueError(
            f"response_width={r_width} is shorter than the longest response ({longest})"
        )

    prompt_ids, prompt_mask = _pad(
        prompts, p_width, left=True, pad_value=pad_token_id, dtype=np.int64
    )
    response_ids, response_mask = _pad(
        responses, r_width, left=False, pad_value=pad_token_id, dtype=np.int64
    )
    attention = np.concatenate([prompt_mask, response_mask], axis=1).astype(np.int64)
    position = np.clip(np.cumsum(attention, axis=1) - 1, 0, None)

    response_len = np.asarray(pc.list_value_length(responses).fill_null(0))
    per_token = {}
    for name in per_token_columns:
        column = S.column_array(table, name)
        lengths = np.asarray(pc.list_value_length(column).fill_null(0))
        if (bad := np.flatnonzero(lengths != response_len)).size:
            row = int(bad[0])
            raise RolloutValidationError(
                f"has {lengths[row]} entries but the response has {response_len[row]} tokens",
                column=name,
                row=row,
            )
        values, _ = _pad(column, r_width, left=False, pad_value=0.0, dtype=np.float32)
        per_token[name] = torch.from_numpy(values)

    response_ids_t = torch.from_numpy(response_ids)
    return PaddedBatch(
        input_ids=torch.cat([torch.from_numpy(prompt_ids), response_ids_t], dim=1),
        attention_mask=torch.from_numpy(attention),
        position_ids=torch.from_numpy(position),
        response_ids=response_ids_t,
        response_mask=torch.from_numpy(response_mask),
        prompt_width=p_width,
        per_token=per_token,
    )


def model_token_mask(table: pa.Table, response_mask: torch.Tensor) -> torch.Tensor:
    """The response tokens the model sampled: ``response_mask`` (B, R) cleared where the table's
    ``loss_mask`` is 0 (multi-turn episodes: tool results and environment feedback, tokens no
    policy sampled). Without a ``loss_mask`` column every response token is the model's."""
    if S.LOSS_MASK not in table.column_names:
        return response_mask
    values, _ = _pad(
        S.column_array(table, S.LOSS_MASK),
        response_mask.shape[1],
        left=False,
        pad_value=0.0,
        dtype=np.float32,
    )
    return response_mask.bool() & torch.from_numpy(values > 0.5).to(response_mask.device)


def to_list_column(values: torch.Tensor, response_mask: torch.Tensor) -> pa.ListArray:
    """Turn a (B, R) per-token tensor back into a list<float32> column.

    Row b keeps ``values[b, :L_b]`` where ``L_b = response_mask[b].sum()``; the mask must be
    right-padded (True entries first in each row), as :func:`to_padded` makes it.
    """
    if values.shape != response_mask.shape:
        raise ValueError(
            f"values {tuple(values.shape)} and response_mask {tuple(response_mask.shape)} differ"
        )
    mask = response_mask.detach().to("cpu", torch.bool).numpy()
    lengths = mask.sum(axis=1)
    if not (mask == (np.arange(mask.shape[1]) < lengths[:, None])).all():
        raise ValueError(
            "response_mask must be right-padded: each row's True entries must come first"
        )
    flat = values.detach().to("cpu", torch.float32).numpy()[mask]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, pa.float32()))
