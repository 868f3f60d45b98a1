"""Arrow <-> padded tensors: layout on a hand-built table, and round trips on random ones."""

import numpy as np
import pyarrow as pa
import pytest
import torch
from hypothesis import given, settings

from rollout import GeneratedSample, append_columns, build_rollout_table, to_list_column, to_padded
from tests.strategies import rollout_tables

pytestmark = pytest.mark.unit  # pure code in this process

PAD = 99


def small_table():
    return build_rollout_table(
        [
            GeneratedSample(0, 0, [1, 2, 3], [4, 5], [-0.5, -0.25], "stop"),
            GeneratedSample(0, 1, [1], [], [], "abort"),
            GeneratedSample(1, 0, [7, 8], [9, 10, 11], [-1.0, -2.0, -3.0], "length"),
        ],
        weight_version=4,
    )


def test_padded_layout_matches_hand_written_tensors():
    b = to_padded(small_table(), pad_token_id=PAD, per_token_columns=["rollout_logprobs"])
    # Prompt width P = 3 (longest prompt), response width R = 3 (longest response).
    assert b.prompt_width == 3
    assert b.input_ids.tolist() == [
        [1, 2, 3, 4, 5, PAD],
        [PAD, PAD, 1, PAD, PAD, PAD],
        [PAD, 7, 8, 9, 10, 11],
    ]
    assert b.attention_mask.tolist() == [[1, 1, 1, 1, 1, 0], [0, 0, 1, 0, 0, 0], [0, 1, 1, 1, 1, 1]]
    # Position 0 at each row's first real token; padding after the response repeats the last.
    assert b.position_ids.tolist() == [[0, 1, 2, 3, 4, 4], [0, 0, 0, 0, 0, 0], [0, 0, 1, 2, 3, 4]]
    assert b.response_mask.tolist() == [[True, True, False], [False] * 3, [True] * 3]
    assert b.response_lengths.tolist() == [2, 0, 3]
    assert torch.equal(b.response_ids, b.input_ids[:, 3:])
    assert b.per_token["rollout_logprobs"].tolist() == [
        [-0.5, -0.25, 0.0],
        [0.0] * 3,
        [-1.0, -2.0, -3.0],
    ]


def test_response_width_pads_further_and_refuses_to_truncate():
    b = to_padded(small_table(), pad_token_id=0, response_width=5)
    assert b.response_mask.shape == (3, 5) and b.input_ids.shape == (3, 8)
    with pytest.raises(ValueError, match="shorter than the longest response"):
        to_padded(small_table(), pad_token_id=0, response_width=2)


def test_to_list_column_rejects_a_mask_that_is_not_right_padded():
    mask = torch.tensor([[False, True]])
    with pytest.raises(ValueError, match="right-padded"):
        to_list_column(torch.zeros(1, 2), mask)


@settings(max_examples=60, deadline=None)
@given(rollout_tables())
def test_padding_round_trips_every_token_and_logprob(table):
    b = to_padded(table, pad_token_id=PAD, per_token_columns=["rollout_logprobs"])
    P = b.prompt_width
    prompts = table.column("prompt_token_ids").to_pylist()
    responses = table.column("response_token_ids").to_pylist()
    for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        row = b.input_ids[i].tolist()
        assert row[P - len(p) : P] == p and row[: P - len(p)] == [PAD] * (P - len(p))
        assert row[P : P + len(r)] == r
        assert b.response_mask[i].sum().item() == len(r)
        real = b.attention_mask[i].bool()
        assert b.position_ids[i][real].tolist() == list(range(len(p) + len(r)))
    back = to_list_column(b.per_token["rollout_logprobs"], b.response_mask)
    assert back.equals(table.column("rollout_logprobs").combine_chunks())


@settings(max_examples=40, deadline=None)
@given(rollout_tables())
def test_per_token_tensor_appends_as_a_valid_column(table):
    b = to_padded(table, pad_token_id=0)
    ref = torch.randn(b.response_mask.shape) * b.response_mask
    out = append_columns(table, {"ref_logprobs": to_list_column(ref, b.response_mask)})
    again = to_padded(out, pad_token_id=0, per_token_columns=["ref_logprobs"])
    np.testing.assert_array_equal(
        again.per_token["ref_logprobs"].numpy(), ref.numpy().astype(np.float32)
    )
    assert out.schema.field("ref_logprobs").type == pa.list_(pa.float32())


def test_to_padded_names_the_row_of_a_ragged_per_token_column_in_an_unvalidated_table():
    from rollout import RolloutValidationError

    t = small_table()
    bad = t.append_column("values", pa.array([[0.1, 0.2], [], [0.3]], pa.list_(pa.float32())))
    with pytest.raises(RolloutValidationError, match="column 'values', row 2: has 1 entries"):
        to_padded(bad, pad_token_id=0, per_token_columns=["values"])
