"""The preference methods' batch builders (orchestration.candidates) and on-policy
distillation's token reward (orchestration.advantages.distill_advantages)."""

from __future__ import annotations

import dataclasses

import pyarrow as pa
import pytest
import torch

from orchestration import candidates
from orchestration.advantages import advantages
from rollout import schema as S
from tests.orchestration.helpers import grpo_spec, scored_rollout

pytestmark = pytest.mark.unit  # pure code in this process


def scored(groups: list[list[tuple[list[int], float | None]]]) -> pa.Table:
    """One row per sample: prompt g has prompt tokens [g + 1] and the given responses/scores."""
    rows = [(g, [g + 1], r, s) for g, group in enumerate(groups) for r, s in group]
    return pa.table(
        {
            S.PROMPT_ID: pa.array([r[0] for r in rows], pa.int64()),
            S.PROMPT_TOKEN_IDS: pa.array([r[1] for r in rows], S.TOKEN_IDS_TYPE),
            S.RESPONSE_TOKEN_IDS: pa.array([r[2] for r in rows], S.TOKEN_IDS_TYPE),
            S.SCORE: pa.array([r[3] for r in rows], pa.float32()),
        }
    )


def test_rejection_sampling_keeps_each_prompts_argmax_above_the_threshold():
    table = scored(
        [
            [([7], 0.1), ([8], 1.0), ([9], 0.5), ([6], 1.0)],  # argmax: the first 1.0
            [([3], 0.1), ([4], 0.0)],  # best 0.1: under the threshold
            [([5], None), ([2], 0.7)],  # the unscorable sample is never kept
        ]
    )
    rows, metrics = candidates.best_of_n(table, threshold=0.5)
    assert rows[S.PROMPT_ID].to_pylist() == [0, 2]
    assert rows[S.RESPONSE_TOKEN_IDS].to_pylist() == [[8], [2]]
    assert rows[S.PROMPT_TOKEN_IDS].to_pylist() == [[1], [3]]
    assert metrics["rs/kept_fraction"] == pytest.approx(2 / 3)
    assert metrics["rs/best_of_n"] == pytest.approx((1.0 + 0.1 + 0.7) / 3)
    assert metrics["rs/mean_score"] == pytest.approx((0.1 + 1 + 0.5 + 1 + 0.1 + 0 + 0.7) / 7)
    everything, _ = candidates.best_of_n(table)  # no threshold: every prompt's best
    assert everything[S.RESPONSE_TOKEN_IDS].to_pylist() == [[8], [3], [2]]


def test_the_online_dpo_pair_is_each_prompts_best_over_its_worst():
    table = scored(
        [
            [([7], 0.1), ([8], 1.0), ([9], 0.0), ([6], 0.5)],
            [([3], 0.5), ([4], 0.5)],  # tied: no pair
            [([5, 5], 1.0), ([5, 5], 0.0)],  # one response: no pair
            [([2], 0.3), ([1], None), ([0], 0.2)],
        ]
    )
    pairs, metrics = candidates.best_worst_pairs(table)
    assert pairs[S.PROMPT_ID].to_pylist() == [0, 3]
    assert pairs[S.RESPONSES].to_pylist() == [[[8], [9]], [[2], [0]]]
    assert pairs[S.PAIR_CHOSEN].to_pylist() == [[0], [0]]
    assert pairs[S.PAIR_REJECTED].to_pylist() == [[1], [1]]
    flat = [x for g in pairs[S.RESPONSE_SCORES].to_pylist() for x in g]
    assert flat == pytest.approx([1.0, 0.0, 0.3, 0.2])
    assert metrics["pairs/kept_fraction"] == pytest.approx(2 / 4)
    assert metrics["pairs/score_gap"] == pytest.approx((1.0 + 0.1) / 2)
    wide, _ = candidates.best_worst_pairs(table, min_gap=0.5)
    assert wide[S.PROMPT_ID].to_pylist() == [0]


def test_ranked_groups_order_every_distinct_candidate_by_score():
    table = scored([[([7], 0.1), ([8], 1.0), ([7], 0.4), ([9], 0.0)], [([3], 0.5), ([4], 0.5)]])
    groups, metrics = candidates.ranked_groups(table)
    first = {k: groups[k][0].as_py() for k in groups.column_names}
    assert first[S.RESPONSES] == [[7], [8], [9]]  # [7] sampled twice counts once, at 0.4
    assert first[S.RESPONSE_SCORES] == pytest.approx([0.4, 1.0, 0.0])
    pairs = set(zip(first[S.PAIR_CHOSEN], first[S.PAIR_REJECTED], strict=True))
    assert pairs == {(0, 2), (1, 0), (1, 2)}
    assert first[S.BEST_RESPONSE] == 1
    tied = {k: groups[k][1].as_py() for k in groups.column_names}
    assert tied[S.PAIR_CHOSEN] == [] and tied[S.BEST_RESPONSE] == 0  # only its ft term
    assert metrics["rrhf/pairs"] == pytest.approx(3 / 2)
    assert metrics["rrhf/candidates"] == pytest.approx(5 / 2)


def test_reference_logps_are_each_responses_summed_reference_logprobs():
    pairs, _ = candidates.best_worst_pairs(scored([[([7, 8], 1.0), ([9], 0.0)]]))
    seen = []

    def reference(flat: pa.Table) -> pa.Table:
        seen.append(flat)
        lengths = [len(r) for r in flat[S.RESPONSE_TOKEN_IDS].to_pylist()]
        ref = [[-0.5 * (t + 1) for t in range(n)] for n in lengths]
        return flat.append_column(S.REF_LOGPROBS, pa.array(ref, S.PER_TOKEN_TYPE))

    out = candidates.with_reference_logps(pairs, reference)
    assert seen[0][S.RESPONSE_TOKEN_IDS].to_pylist() == [[7, 8], [9]]
    assert seen[0][S.PROMPT_TOKEN_IDS].to_pylist() == [[1], [1]]
    assert out[S.REF_LOGPS].to_pylist() == [pytest.approx([-1.5, -0.5])]


def test_trim_keeps_the_rows_that_split_evenly():
    table = scored([[([i], 1.0)] for i in range(7)])
    assert candidates.trim_to(table, 3).num_rows == 6
    assert candidates.trim_to(table, 8).num_rows == 0


# ------------------------------------------------------------------------------ distillation


def test_a_teacher_equal_to_the_policy_gives_no_distillation_signal():
    table = scored_rollout([1.0, 0.0, 0.5, 0.5])
    teacher_is_policy = table.set_column(
        table.column_names.index(S.REF_LOGPROBS), S.REF_LOGPROBS, table[S.OLD_LOGPROBS]
    )
    plain = advantages(teacher_is_policy, grpo_spec(), kl_coef=0.0, version=3)
    distilled = advantages(teacher_is_policy, grpo_spec(distill_coef=1.0), kl_coef=0.0, version=3)
    assert distilled.table[S.ADVANTAGES].to_pylist() == plain.table[S.ADVANTAGES].to_pylist()
    assert distilled.metrics["distill/reverse_kl"] == 0.0


def test_each_token_gains_the_teachers_log_ratio_times_the_coefficient():
    table = scored_rollout([1.0, 0.0, 0.5, 0.5])  # old: -1.0 - 0.1 t; teacher: -1.5
    spec = grpo_spec(distill_coef=2.0)
    plain = advantages(table, grpo_spec(), 0.0, 3).table[S.ADVANTAGES].to_pylist()
    out = advantages(table, spec, 0.0, 3)
    for row, base in zip(out.table[S.ADVANTAGES].to_pylist(), plain, strict=True):
        expected = [b + 2.0 * (-1.5 - (-1.0 - 0.1 * t)) for t, b in enumerate(base)]
        assert row == pytest.approx(expected, rel=1e-5)
    old = torch.tensor([-1.0 - 0.1 * t for n in [1, 2, 3, 1] for t in range(n)])
    assert out.metrics["distill/reverse_kl"] == pytest.approx(float((old + 1.5).mean()), rel=1e-5)
    no_old = table.drop_columns([S.OLD_LOGPROBS])
    with pytest.raises(ValueError, match="distillation need the learner's old_logprobs"):
        advantages(no_old, dataclasses.replace(spec), 0.0, 3)


def test_dataset_candidates_follow_the_samples_with_the_prompts_columns():
    prompts = pa.table(
        {
            S.PROMPT_ID: pa.array([10, 11], pa.int64()),
            S.PROMPT_TOKEN_IDS: pa.array([[1], [2]], S.TOKEN_IDS_TYPE),
            "label": pa.array(["a", "b"]),
            S.DATASET_ROW: pa.array([1, 0], pa.int64()),
        }
    )
    responses = [[[5, 0]], [[6, 0], [7, 8, 0]]]  # by dataset row
    rows = candidates.dataset_candidates(prompts, responses, first_index=4, version=3)
    got = rows.select([S.PROMPT_ID, S.SAMPLE_INDEX, S.RESPONSE_TOKEN_IDS, "label"]).to_pylist()
    assert [tuple(r.values()) for r in got] == [
        (10, 4, [6, 0], "a"),
        (10, 5, [7, 8, 0], "a"),
        (11, 4, [5, 0], "b"),
    ]
    assert set(S.column_array(rows, S.WEIGHT_VERSION).to_pylist()) == {3}
    assert S.column_array(rows, S.ROLLOUT_LOGPROBS).to_pylist()[1] == [0.0, 0.0, 0.0]


def test_best_sources_count_where_each_prompts_best_candidate_came_from():
    # samples 0-1, beams 2, dataset 3-4; prompt 1's best is a tie won by the earlier sample
    rows = [(0, 0, 0.1), (0, 1, 0.2), (0, 2, 0.1), (0, 3, 0.9), (1, 1, 1.0), (1, 3, 1.0)]
    rows += [(2, 0, None), (2, 2, 0.5), (3, 4, None)]  # prompt 3: nothing scored, not counted
    table = pa.table(
        {
            S.PROMPT_ID: pa.array([r[0] for r in rows], pa.int64()),
            S.SAMPLE_INDEX: pa.array([r[1] for r in rows], pa.int32()),
            S.SCORE: pa.array([r[2] for r in rows], pa.float32()),
        }
    )
    got = candidates.best_sources(table, {"beams": 2, "dataset": 3})
    assert got == {
        "rrhf/best_from_beams": pytest.approx(1 / 3),
        "rrhf/best_from_dataset": pytest.approx(1 / 3),
    }
