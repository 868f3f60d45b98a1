"""Checks that a table honours the rollout contract, naming the offending row and column.

All checks are vectorised Arrow/numpy operations: a 10k-row table validates in milliseconds, so
every stage can afford to validate what it receives.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from rollout import schema as S


class RolloutValidationError(ValueError):
    """A table breaks the rollout contract. ``row`` is None for table-level problems."""

    def __init__(self, message: str, *, column: str, row: int | None = None):
        where = f"column '{column}'" + (f", row {row}" if row is not None else "")
        super().__init__(f"rollout table, {where}: {message}")
        self.column = column
        self.row = row


def _first(bad: np.ndarray) -> int | None:
    idx = np.flatnonzero(bad)
    return int(idx[0]) if idx.size else None


def _check_type(table: pa.Table, name: str) -> None:
    want = S.expected_type(name)
    got = table.schema.field(name).type
    if want is not None and got != want:
        raise RolloutValidationError(f"has type {got}, expected {want}", column=name)


def _check_not_null(arr: pa.Array, name: str) -> None:
    if arr.null_count:
        row = _first(np.asarray(arr.is_null()))
        raise RolloutValidationError(
            "is null; this column may not hold nulls", column=name, row=row
        )


def _check_list_values(arr: pa.ListArray, name: str, *, finite: bool) -> None:
    """List entries themselves must not be null (and, for floats, must be finite)."""
    flat = arr.flatten()
    bad = np.asarray(flat.is_null())
    what = "holds a null entry"
    if finite and not bad.any():
        bad = ~np.isfinite(flat.to_numpy(zero_copy_only=False))
        what = "holds a non-finite value"
    k = _first(bad)
    if k is not None:
        row = int(np.asarray(pc.list_parent_indices(arr))[k])
        raise RolloutValidationError(what, column=name, row=row)


def validate(table: pa.Table, require: Iterable[str] = ()) -> pa.Table:
    """Check ``table`` against the rollout contract and return it unchanged.

    Checks: the generator columns and every name in ``require`` are present; every known column
    has exactly its contract type (no silent casts: no dictionary-encoded strings, no
    ``not null`` list items; :func:`rollout.append_columns` casts on the way in); generator and
    per-token columns hold no nulls and no non-finite floats; ``finish_reason`` is one of
    :data:`rollout.schema.FINISH_REASONS`;
    ``prompt_token_ids`` is non-empty; ``response_token_ids`` is non-empty unless the sample was
    aborted; each per-token column has one entry per response token; ``rollout_logprobs`` are
    <= 0; ``(prompt_id, sample_index)`` pairs are unique.

    Raises:
        RolloutValidationError: naming the first offending column and, where it is a per-row
            problem, the row.
    """
    if not isinstance(table, pa.Table):
        raise TypeError(f"validate expects a pyarrow.Table, got {type(table).__name__}")
    names = set(table.column_names)
    for name in [f.name for f in S.GENERATOR_FIELDS] + list(require):
        if name not in names:
            raise RolloutValidationError(
                f"is missing (table has: {', '.join(table.column_names) or 'no columns'})",
                column=name,
            )
    for name in table.column_names:
        _check_type(table, name)

    for field in S.GENERATOR_FIELDS:
        _check_not_null(S.column_array(table, field.name), field.name)

    reasons = S.column_array(table, S.FINISH_REASON)
    bad = ~np.asarray(pc.is_in(reasons, value_set=pa.array(S.FINISH_REASONS)))
    if (row := _first(bad)) is not None:
        raise RolloutValidationError(
            f"is {reasons[row].as_py()!r}, expected one of {', '.join(S.FINISH_REASONS)}",
            column=S.FINISH_REASON,
            row=row,
        )

    prompt_ids = S.column_array(table, S.PROMPT_TOKEN_IDS)
    _check_list_values(prompt_ids, S.PROMPT_TOKEN_IDS, finite=False)
    if (row := _first(np.asarray(pc.list_value_length(prompt_ids)) == 0)) is not None:
        raise RolloutValidationError(
            "is empty; every sample needs a prompt", column=S.PROMPT_TOKEN_IDS, row=row
        )

    responses = S.column_array(table, S.RESPONSE_TOKEN_IDS)
    _check_list_values(responses, S.RESPONSE_TOKEN_IDS, finite=False)
    response_len = np.asarray(pc.list_value_length(responses))
    aborted = np.asarray(pc.equal(reasons, "abort"))
    if (row := _first((response_len == 0) & ~aborted)) is not None:
        raise RolloutValidationError(
            f"is empty but finish_reason is {reasons[row].as_py()!r}; "
            "only 'abort' may have no tokens",
            column=S.RESPONSE_TOKEN_IDS,
            row=row,
        )

    for name in S.PER_TOKEN_COLUMNS:
        if name not in names:
            continue
        arr = S.column_array(table, name)
        _check_not_null(arr, name)
        _check_list_values(arr, name, finite=True)
        lengths = np.asarray(pc.list_value_length(arr))
        if (row := _first(lengths != response_len)) is not None:
            raise RolloutValidationError(
                f"has {lengths[row]} entries but the response has {response_len[row]} tokens",
                column=name,
                row=row,
            )

    if S.TOKEN_VERSIONS in names:
        _check_token_versions(table, response_len)
    if S.LOSS_MASK in names:
        _check_loss_mask(table)

    # A sampled token cannot be more likely than certain; allow float rounding above 0.
    flat = S.column_array(table, S.ROLLOUT_LOGPROBS).flatten().to_numpy(zero_copy_only=False)
    if flat.size and (k := _first(flat > 1e-4)) is not None:
        parents = np.asarray(pc.list_parent_indices(S.column_array(table, S.ROLLOUT_LOGPROBS)))
        raise RolloutValidationError(
            f"holds {flat[k]:.4g} > 0; a log-probability cannot be positive",
            column=S.ROLLOUT_LOGPROBS,
            row=int(parents[k]),
        )

    keys = np.stack(
        [
            S.column_array(table, S.PROMPT_ID).to_numpy(),
            S.column_array(table, S.SAMPLE_INDEX).to_numpy().astype(np.int64),
        ],
        axis=1,
    )
    if len(keys):
        _, first_idx, counts = np.unique(keys, axis=0, return_index=True, return_counts=True)
        if (counts > 1).any():
            dup = np.sort(first_idx[counts > 1])[0]
            later = np.flatnonzero((keys == keys[dup]).all(axis=1))[1]
            raise RolloutValidationError(
                f"repeats (prompt_id={keys[dup, 0]}, sample_index={keys[dup, 1]}) "
                f"first seen at row {dup}",
                column=S.SAMPLE_INDEX,
                row=int(later),
            )
    return table


def _check_loss_mask(table: pa.Table) -> None:
    """``loss_mask`` (its length is checked with the per-token columns): every entry 0 (an
    observation token) or 1 (the model's), and an episode starts with the model's turn."""
    arr = S.column_array(table, S.LOSS_MASK)
    flat = arr.flatten().to_numpy(zero_copy_only=False)
    parents = np.asarray(pc.list_parent_indices(arr))
    if (k := _first((flat != 0.0) & (flat != 1.0))) is not None:
        raise RolloutValidationError(
            f"holds {flat[k]:g}; a loss mask is 1 (the model's token) or 0 (an observation's)",
            column=S.LOSS_MASK,
            row=int(parents[k]),
        )
    lengths = np.asarray(pc.list_value_length(arr))
    starts = np.cumsum(lengths) - lengths
    opens_with_observation = np.zeros(len(lengths), dtype=bool)
    has = lengths > 0
    opens_with_observation[has] = flat[starts[has]] == 0.0
    if (row := _first(opens_with_observation)) is not None:
        raise RolloutValidationError(
            "starts with an observation token; the response begins with the model's turn",
            column=S.LOSS_MASK,
            row=row,
        )


def _check_token_versions(table: pa.Table, response_len: np.ndarray) -> None:
    """``token_versions``: one version per response token, none before the row's
    ``weight_version`` (the version its first token was sampled with) and none going back."""
    arr = S.column_array(table, S.TOKEN_VERSIONS)
    _check_not_null(arr, S.TOKEN_VERSIONS)
    lengths = np.asarray(pc.list_value_length(arr))
    if (row := _first(lengths != response_len)) is not None:
        raise RolloutValidationError(
            f"has {lengths[row]} entries but the response has {response_len[row]} tokens",
            column=S.TOKEN_VERSIONS,
            row=row,
        )
    flat = arr.flatten().to_numpy(zero_copy_only=False)
    if not flat.size:
        return
    parents = np.asarray(pc.list_parent_indices(arr))
    first = S.column_array(table, S.WEIGHT_VERSION).to_numpy()[parents]
    if (k := _first(flat < first)) is not None:
        raise RolloutValidationError(
            f"holds version {flat[k]}, older than the row's weight_version {first[k]}",
            column=S.TOKEN_VERSIONS,
            row=int(parents[k]),
        )
    back = (np.diff(flat) < 0) & (parents[1:] == parents[:-1])
    if (k := _first(back)) is not None:
        raise RolloutValidationError(
            f"goes back from version {flat[k]} to {flat[k + 1]}; versions only move forward",
            column=S.TOKEN_VERSIONS,
            row=int(parents[k + 1]),
        )
