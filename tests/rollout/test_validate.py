"""validate() accepts contract tables and names the row and column of every kind of break."""

import pyarrow as pa
import pytest

from rollout import (
    GeneratedSample,
    RolloutValidationError,
    append_columns,
    build_rollout_table,
    validate,
)
from rollout import schema as S

pytestmark = pytest.mark.unit  # pure code in this process


def table():
    return build_rollout_table(
        [
            GeneratedSample(3, 0, [1, 2], [4, 5], [-0.5, -0.25], "stop"),
            GeneratedSample(3, 1, [1, 2], [6], [-0.1], "length"),
            GeneratedSample(4, 0, [7], [], [], "abort"),
        ],
        weight_version=1,
        metadata={"label": ["x", "y", "z"]},
    )


def replace(t: pa.Table, name: str, values) -> pa.Table:
    i = t.column_names.index(name)
    return t.set_column(
        i,
        name,
        values if isinstance(values, pa.Array) else pa.array(values, t.schema.field(name).type),
    )


def raises(t: pa.Table, column: str, row: int | None, match: str, **kw):
    with pytest.raises(RolloutValidationError, match=match) as info:
        validate(t, **kw)
    assert info.value.column == column and info.value.row == row
    assert f"column '{column}'" in str(info.value)
    if row is not None:
        assert f"row {row}" in str(info.value)


def test_a_contract_table_passes_and_comes_back_unchanged():
    t = table()
    assert validate(t) is t


def test_missing_column_is_named():
    raises(table().drop_columns(["finish_reason"]), "finish_reason", None, "is missing")
    raises(table(), "ref_logprobs", None, "is missing", require=["ref_logprobs"])


def test_wrong_type_is_named_with_both_types():
    t = replace(table(), "prompt_id", pa.array([3, 3, 4], pa.int32()))
    raises(t, "prompt_id", None, "has type int32, expected int64")
    t = replace(
        table(), "rollout_logprobs", pa.array([[-0.5, -0.25], [-0.1], []], pa.list_(pa.float64()))
    )
    raises(t, "rollout_logprobs", None, "expected list<item: float>")
    t = table().append_column("score", pa.array([1.0, 0.0, None], pa.float64()))
    raises(t, "score", None, "expected float")


def test_ragged_logprobs_name_the_row():
    t = replace(table(), "rollout_logprobs", [[-0.5, -0.25], [-0.1, -0.2], []])
    raises(t, "rollout_logprobs", 1, "has 2 entries but the response has 1 tokens")


def test_per_token_column_from_a_later_stage_is_checked_too():
    t = append_columns(
        table(), {"ref_logprobs": pa.array([[-1.0, -1.0], [-1.0], [-1.0]], S.PER_TOKEN_TYPE)}
    )
    raises(t, "ref_logprobs", 2, "has 1 entries but the response has 0 tokens")
    t = append_columns(
        table(), {"values": pa.array([[0.0, float("nan")], [0.0], []], S.PER_TOKEN_TYPE)}
    )
    raises(t, "values", 0, "non-finite")


def test_empty_response_is_only_allowed_when_aborted():
    t = replace(table(), "finish_reason", ["stop", "length", "stop"])
    raises(t, "response_token_ids", 2, "only 'abort' may have no tokens")


def test_unknown_finish_reason_and_nulls_and_empty_prompt():
    raises(replace(table(), "finish_reason", ["stop", "eos", "abort"]), "finish_reason", 1, "'eos'")
    raises(replace(table(), "weight_version", [1, None, 1]), "weight_version", 1, "is null")
    raises(replace(table(), "prompt_token_ids", [[1], [], [7]]), "prompt_token_ids", 1, "is empty")
    raises(
        replace(table(), "response_token_ids", [[4, None], [6], []]),
        "response_token_ids",
        0,
        "null entry",
    )


def test_positive_logprob_and_duplicate_keys():
    raises(
        replace(table(), "rollout_logprobs", [[-0.5, -0.25], [0.5], []]),
        "rollout_logprobs",
        1,
        "cannot be positive",
    )
    raises(
        replace(table(), "sample_index", [0, 0, 0]),
        "sample_index",
        1,
        "repeats .prompt_id=3, sample_index=0. first seen at row 0",
    )


def test_null_score_is_allowed_since_it_means_unscorable():
    t = append_columns(
        table(),
        {
            "score": pa.array([1.0, None, 0.0], pa.float32()),
            "reward/format": pa.array([1.0, None, 0.0]),
        },
    )
    assert validate(t, require=["score"]) is t
    assert t.schema.field("reward/format").type == pa.float32()


def test_builder_refuses_bad_metadata_and_bad_samples():
    s = [GeneratedSample(0, 0, [1], [2], [-0.1], "stop")]
    with pytest.raises(ValueError, match="has 2 values for 1 samples"):
        build_rollout_table(s, weight_version=0, metadata={"label": ["a", "b"]})
    with pytest.raises(ValueError, match="rollout-contract column"):
        build_rollout_table(s, weight_version=0, metadata={"score": [1.0]})
    with pytest.raises(RolloutValidationError, match="row 0"):
        build_rollout_table([GeneratedSample(0, 0, [1], [2, 3], [-0.1], "stop")], weight_version=0)


def test_token_versions_one_per_token_never_older_than_the_row_nor_going_back():
    def with_versions(rows):
        return table().append_column(
            S.KNOWN_FIELDS[S.TOKEN_VERSIONS], pa.array(rows, pa.list_(pa.int64()))
        )

    good = with_versions([[1, 2], [1], []])
    assert validate(good) is good
    raises(with_versions([[1, 2], [1, 1], []]), S.TOKEN_VERSIONS, 1, "has 2 entries but")
    raises(with_versions([[1, 2], [0], []]), S.TOKEN_VERSIONS, 1, "version 0, older than the")
    raises(with_versions([[2, 1], [1], []]), S.TOKEN_VERSIONS, 0, "goes back from version 2 to 1")
    # The builder writes the column when the samples carry versions.
    built = build_rollout_table(
        [GeneratedSample(3, 0, [1, 2], [4, 5], [-0.5, -0.25], "stop", token_versions=[1, 2])],
        weight_version=1,
    )
    assert built.column(S.TOKEN_VERSIONS).to_pylist() == [[1, 2]]
