"""Table operations every stage uses: append columns, concatenate, split, group, Parquet I/O.

Tables are immutable: every function returns a new table sharing the old buffers (zero-copy),
and none rewrites an existing column.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from rollout import schema as S
from rollout.validate import validate


def append_columns(
    table: pa.Table, columns: Mapping[str, pa.Array | pa.ChunkedArray | Sequence]
) -> pa.Table:
    """Return ``table`` with ``columns`` appended, cast to their contract types.

    Values may be Arrow arrays or anything ``pyarrow.array`` takes (lists, numpy arrays).

    Raises:
        ValueError: a column already exists (stages append, they never overwrite), has the
            wrong number of rows, or cannot be cast to its contract type.
    """
    for name, values in columns.items():
        if not isinstance(values, (pa.Array, pa.ChunkedArray)):
            values = pa.array(values, type=S.expected_type(name))
        if name in table.column_names:
            raise ValueError(
                f"column '{name}' already exists; stages append columns, never overwrite"
            )
        if len(values) != table.num_rows:
            raise ValueError(f"column '{name}' has {len(values)} rows, table has {table.num_rows}")
        want = S.expected_type(name)
        if want is not None and values.type != want:
            try:
                values = values.cast(want)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
                raise ValueError(
                    f"column '{name}' ({values.type}) does not cast to {want}: {e}"
                ) from e
        table = table.append_column(name, values)
    return table


def concat(tables: list[pa.Table]) -> pa.Table:
    """Concatenate tables with the same columns (in any order) into one table, zero-copy."""
    if not tables:
        raise ValueError("concat needs at least one table")
    first = tables[0].schema
    for i, t in enumerate(tables[1:], start=1):
        if set(t.column_names) != set(first.names):
            raise ValueError(
                f"table {i} has columns {sorted(t.column_names)}, table 0 has {sorted(first.names)}"
            )
    # Permissive promotion: a table built elsewhere may differ only in field nullability, or a
    # passthrough column may be all-null in one table and typed in another.
    return pa.concat_tables([t.select(first.names) for t in tables], promote_options="permissive")


def split_rows(table: pa.Table, rows_per_part: int) -> list[pa.Table]:
    """Split into consecutive parts of ``rows_per_part`` rows (the last may be shorter)."""
    if rows_per_part <= 0:
        raise ValueError(f"rows_per_part must be positive, got {rows_per_part}")
    return [table.slice(i, rows_per_part) for i in range(0, table.num_rows, rows_per_part)]


def split_by_tokens(table: pa.Table, max_tokens: int) -> list[pa.Table]:
    """Split into consecutive micro-batches of at most ``max_tokens`` prompt+response tokens
    (unpadded, summed over the rows; see :func:`token_ranges`).

    A row longer than ``max_tokens`` on its own gets a micro-batch to itself.
    """
    if max_tokens <= 0:
        raise ValueError(f"max_tokens must be positive, got {max_tokens}")
    tokens = np.asarray(
        pc.list_value_length(S.column_array(table, S.PROMPT_TOKEN_IDS))
    ) + np.asarray(pc.list_value_length(S.column_array(table, S.RESPONSE_TOKEN_IDS)))
    return [table.slice(r.start, len(r)) for r in token_ranges(tokens, max_tokens)]


def token_ranges(lengths: Sequence[int], max_tokens: int) -> list[range]:
    """Consecutive index ranges whose ``lengths`` sum to at most ``max_tokens`` each, a longer
    item alone: the cut of :func:`split_by_tokens`, for callers holding token sequences rather
    than a rollout table (the reward model).
    """
    if max_tokens <= 0:
        raise ValueError(f"max_tokens must be positive, got {max_tokens}")
    ranges, start, used = [], 0, 0
    for i, n in enumerate(lengths):
        if i > start and used + n > max_tokens:
            ranges.append(range(start, i))
            start, used = i, 0
        used += int(n)
    if len(lengths):
        ranges.append(range(start, len(lengths)))
    return ranges


def group_ids(table: pa.Table) -> torch.Tensor:
    """(B,) int64 dense group index per row: rows with the same ``prompt_id`` share an index,
    numbered 0.. in order of first appearance. The input ``learner.algorithms`` expects."""
    prompt_ids = S.column_array(table, S.PROMPT_ID).to_numpy()
    _, first, inverse = np.unique(prompt_ids, return_index=True, return_inverse=True)
    # np.unique numbers groups by sorted prompt_id; renumber by first appearance.
    rank = np.empty_like(first)
    rank[np.argsort(first)] = np.arange(first.size)
    return torch.from_numpy(rank[inverse].astype(np.int64))


def iter_groups(table: pa.Table) -> Iterator[tuple[int, pa.Table]]:
    """Yield ``(prompt_id, rows of that prompt)`` in order of first appearance."""
    ids = group_ids(table).numpy()
    prompt_ids = S.column_array(table, S.PROMPT_ID).to_numpy()
    order = np.argsort(ids, kind="stable")
    bounds = np.flatnonzero(np.diff(ids[order])) + 1
    for rows in np.split(order, bounds) if order.size else []:
        yield int(prompt_ids[rows[0]]), table.take(pa.array(rows))


def write_parquet(table: pa.Table, path: str | os.PathLike) -> None:
    """Validate and write ``table`` to Parquet, atomically (a reader never sees half a file)."""
    validate(table)
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def read_parquet(path: str | os.PathLike) -> pa.Table:
    """Read a rollout table written by :func:`write_parquet`, validated, with the same schema."""
    return validate(pq.read_table(os.fspath(path)))
