import numpy as np
import pyarrow as pa
import pytest

from orchestration.reward_stage import Scored, enough_groups, select_groups

pytestmark = pytest.mark.unit  # pure code in this process


def batch(scores: list[float], group_size: int, first_id: int) -> Scored:
    n = len(scores)
    ids = np.repeat(np.arange(first_id, first_id + n // group_size), group_size)
    return Scored(
        table=None, columns=pa.table({}), score=np.array(scores), prompt_ids=ids, metrics={}
    )


def test_dynamic_sampling_refills_the_batch_with_groups_that_have_spread():
    # 4 groups of 2 per round; wanted 4 groups. Round 1: groups 0 and 2 are flat.
    first = batch([1, 1, 0, 1, 0.1, 0.1, 1, 0], 2, first_id=0)
    assert not enough_groups([first], 4, min_std=0.0)
    # Round 2: group 4 flat, 5 and 6 informative, 7 informative (one more than needed).
    second = batch([0, 0, 1, 0, 0, 1, 1, 0.1], 2, first_id=4)
    assert enough_groups([first, second], 4, min_std=0.0)
    keep, metrics = select_groups([first, second], 4, min_std=0.0)
    assert keep[0].tolist() == [2, 3, 6, 7]  # groups 1 and 3
    assert keep[1].tolist() == [2, 3, 4, 5]  # groups 5 and 6; 7 is surplus
    assert sum(len(k) for k in keep) == 8  # full size: 4 groups x 2 samples
    assert metrics["rollout/groups_dropped_fraction"] == 3 / 8
    assert metrics["rollout/groups_refilled_with_dropped"] == 0


def test_when_rounds_run_out_the_batch_is_filled_with_dropped_groups():
    only = batch([1, 1, 0, 1, 0, 0], 2, first_id=0)  # one informative group of three
    keep, metrics = select_groups([only], 3, min_std=0.0)
    assert keep[0].tolist() == [0, 1, 2, 3, 4, 5]
    assert metrics["rollout/groups_refilled_with_dropped"] == 2


def test_min_std_sets_what_counts_as_flat():
    b = batch([0.0, 0.1, 0.0, 1.0], 2, first_id=0)  # spreads 0.05 and 0.5
    keep, metrics = select_groups([b], 1, min_std=0.1)
    assert keep[0].tolist() == [2, 3]
    assert metrics["rollout/groups_dropped_fraction"] == 0.5


def test_episodes_a_tool_broke_are_unscorable_and_the_environment_reward_is_a_component():
    from orchestration.reward_stage import (
        ENVIRONMENT_COMPONENT,
        FAULTED,
        RewardStage,
        _reward_inputs,
    )
    from reward_service.shaping import ShapingSpec
    from rollout import GeneratedSample, build_rollout_table
    from rollout.build import EpisodeRecord

    ends = ["done", "calc:timeout", "max_turns", "environment:raised"]
    samples = [
        GeneratedSample(
            i,
            0,
            [1],
            [2, 3, 4],
            [-1.0, 0.0, -1.0],
            "stop",
            episode=EpisodeRecord([1.0, 0.0, 1.0], 2, 1, end, reward=0.5 * i),
        )
        for i, end in enumerate(ends)
    ]
    table = build_rollout_table(samples, weight_version=0)
    inputs = _reward_inputs._function(table)  # the remote function's body, here
    assert inputs[FAULTED].tolist() == [False, True, False, True]
    assert inputs[ENVIRONMENT_COMPONENT].to_pylist() == [0.0, 0.5, 1.0, 1.5]

    stage = RewardStage(ShapingSpec(weights={"exact": 1.0, ENVIRONMENT_COMPONENT: 2.0}), [], 10)
    columns = pa.table(
        {
            "reward/exact": pa.array([1.0, 1.0, 0.0, 0.0], pa.float32()),
            "reward/" + ENVIRONMENT_COMPONENT: inputs.pop(ENVIRONMENT_COMPONENT),
        }
    )
    stage._components = lambda _: (columns, inputs, {})
    scored = stage.score(None)
    assert scored.score[0] == 1.0 and scored.score[2] == 2.0  # 1 x exact + 2 x environment
    assert np.isnan(scored.score[[1, 3]]).all()  # a broken tool trains nothing
    assert scored.metrics["episode/faulted_fraction"] == 0.5
    stage.problems = lambda: {}  # no reward actor here
    assert "2 episodes ended by a tool or environment fault" in stage.describe_unscorable()
