"""Append / concat / split / group and the Parquet round trip."""

import pyarrow as pa
import pytest
from hypothesis import given, settings

from rollout import (
    GeneratedSample,
    append_columns,
    build_rollout_table,
    concat,
    group_ids,
    iter_groups,
    read_parquet,
    split_by_tokens,
    split_rows,
    write_parquet,
)
from tests.strategies import rollout_tables


def rows(prompt_ids, lengths=None):
    lengths = lengths or [1] * len(prompt_ids)
    seen = {}
    out = []
    for pid, n in zip(prompt_ids, lengths, strict=True):
        seen[pid] = seen.get(pid, -1) + 1
        out.append(GeneratedSample(pid, seen[pid], [1, 2], [5] * n, [-0.5] * n, "stop"))
    return build_rollout_table(out, weight_version=0)


def test_append_never_overwrites_and_checks_length_and_casts():
    t = rows([1, 2])
    with pytest.raises(ValueError, match="already exists"):
        append_columns(t, {"prompt_id": pa.array([1, 2])})
    with pytest.raises(ValueError, match="has 3 rows, table has 2"):
        append_columns(t, {"score": pa.array([1.0, 2.0, 3.0])})
    out = append_columns(t, {"score": pa.array([1.0, None])})  # float64 in, contract float32 out
    assert out.schema.field("score").type == pa.float32() and t.num_columns + 1 == out.num_columns


def test_group_ids_number_groups_by_first_appearance():
    t = rows([42, 7, 42, 9, 7])
    assert group_ids(t).tolist() == [0, 1, 0, 2, 1]
    assert [(pid, g.column("sample_index").to_pylist()) for pid, g in iter_groups(t)] == [
        (42, [0, 1]),
        (7, [0, 1]),
        (9, [0]),
    ]


def test_split_rows_and_concat_restore_the_table():
    t = rows([1, 1, 2, 2, 3])
    parts = split_rows(t, 2)
    assert [p.num_rows for p in parts] == [2, 2, 1]
    assert concat(parts).equals(t)
    with pytest.raises(ValueError, match="positive"):
        split_rows(t, 0)


def test_concat_accepts_reordered_columns_and_rejects_different_ones():
    t = rows([1, 2])
    shuffled = t.select(list(reversed(t.column_names)))
    assert concat([t, shuffled]).num_rows == 4
    with pytest.raises(ValueError, match="table 1 has columns"):
        concat([t, t.drop_columns(["weight_version"])])


def test_split_by_tokens_respects_the_budget():
    # Each row has 2 prompt tokens + n response tokens: 3, 6, 4, 12, 3 tokens.
    t = rows([1, 2, 3, 4, 5], lengths=[1, 4, 2, 10, 1])
    parts = split_by_tokens(t, max_tokens=10)
    # [3 + 6] = 9; next 4 would make 13 -> new part [4]; 12 alone (over budget on its own); [3].
    assert [p.num_rows for p in parts] == [2, 1, 1, 1]
    assert concat(parts).equals(t)


@settings(max_examples=30, deadline=None)
@given(table=rollout_tables())
def test_parquet_round_trip_keeps_schema_and_values(tmp_path_factory, table):
    path = tmp_path_factory.mktemp("pq") / "rollouts.parquet"
    table = append_columns(
        table, {"score": pa.array([None] + [0.5] * (table.num_rows - 1), pa.float32())}
    )
    write_parquet(table, path)
    back = read_parquet(path)
    assert back.schema.equals(table.schema, check_metadata=False)
    assert back.equals(table)


def test_write_parquet_refuses_an_invalid_table_and_leaves_no_file(tmp_path):
    t = rows([1, 1])
    bad = t.set_column(
        t.column_names.index("sample_index"), "sample_index", pa.array([0, 0], pa.int32())
    )
    with pytest.raises(ValueError, match="row 1"):
        write_parquet(bad, tmp_path / "x.parquet")
    assert list(tmp_path.iterdir()) == []
