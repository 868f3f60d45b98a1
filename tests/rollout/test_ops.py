"""Append / concat / split / group and the Parquet round trip."""

import numpy as np
import pyarrow as pa
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

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
    to_list_column,
    to_padded,
    validate,
    write_parquet,
)
from tests.strategies import rollout_tables

pytestmark = pytest.mark.unit  # pure code in this process


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


def test_concat_promotes_nullability_and_all_null_passthrough_columns():
    built = build_rollout_table(
        [GeneratedSample(0, 0, [1], [2], [-0.1], "stop")],
        weight_version=0,
        metadata={"label": ["a"]},
    )
    # Built elsewhere: from_pydict makes every field nullable, and this label is all null.
    other = pa.Table.from_pydict(
        {
            name: pa.array(values, built.schema.field(name).type)
            for name, values in {
                "prompt_id": [1],
                "sample_index": [0],
                "prompt_token_ids": [[3]],
                "response_token_ids": [[4]],
                "rollout_logprobs": [[-0.2]],
                "finish_reason": ["length"],
                "weight_version": [0],
            }.items()
        }
    ).append_column("label", pa.array([None]))
    out = concat([built, other])
    assert out.column("label").to_pylist() == ["a", None]
    assert out.column("prompt_id").to_pylist() == [0, 1]


def test_append_columns_takes_plain_sequences_and_names_a_bad_cast():
    t = rows([1, 2])
    out = append_columns(t, {"score": [1.0, None], "reward/format": np.array([0.5, 1.0])})
    assert out.column("score").type == pa.float32() and out.column("score").to_pylist()[1] is None
    assert out.column("reward/format").type == pa.float32()
    with pytest.raises(ValueError, match="column 'score' .* does not cast to float"):
        append_columns(t, {"score": pa.array(["high", "low"])})


@settings(max_examples=40, deadline=None)
@given(table=rollout_tables(), data=st.data())
def test_sliced_and_multi_chunk_tables_behave_like_fresh_ones(table, data):
    cut = data.draw(st.integers(0, table.num_rows))
    chunked = concat(split_rows(table, max(cut, 1)))  # several chunks per column
    assert chunked.column("prompt_id").num_chunks >= min(2, -(-table.num_rows // max(cut, 1)))
    part = table.slice(cut)  # offset into shared buffers
    for t, rows_of in ((chunked, table), (part, table.slice(cut).combine_chunks())):
        validate(t)
        a = to_padded(t, pad_token_id=0, per_token_columns=["rollout_logprobs"])
        b = to_padded(rows_of, pad_token_id=0, per_token_columns=["rollout_logprobs"])
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(
            a.response_mask, b.response_mask
        )
        assert torch.equal(a.per_token["rollout_logprobs"], b.per_token["rollout_logprobs"])
        assert group_ids(t).tolist() == group_ids(rows_of).tolist()
        back = to_list_column(a.per_token["rollout_logprobs"], a.response_mask)
        assert back.equals(rows_of.column("rollout_logprobs").combine_chunks())


def test_zero_row_table_validates_and_pads_to_empty_tensors():
    empty = rows([1, 2]).slice(2)
    assert validate(empty).num_rows == 0
    b = to_padded(empty, pad_token_id=0, per_token_columns=["rollout_logprobs"])
    assert b.input_ids.shape == (0, 0) and b.response_mask.shape == (0, 0)
    assert group_ids(empty).tolist() == [] and list(iter_groups(empty)) == []
    assert len(to_list_column(b.per_token["rollout_logprobs"], b.response_mask)) == 0
