"""The run-health guards on metric sequences: a warning while a condition lasts less than its
limit, a stop with its exit code when it lasts, a reset on a good iteration."""

from __future__ import annotations

import pytest

from orchestration.config import load_config
from orchestration.guards import Guards, NothingScorable, NumericalFault, OffPolicy, max_mismatch

pytestmark = pytest.mark.unit  # pure code in this process


def guards(*overrides: str, describe=lambda: "") -> Guards:
    return Guards(load_config("demo", list(overrides)), describe)


def test_the_mismatch_bound_defaults_by_dtype_and_can_be_set():
    assert max_mismatch(load_config("demo", [])) == 1e-3
    assert max_mismatch(load_config("demo", ["model.dtype=bfloat16"])) == 0.1
    assert max_mismatch(load_config("demo", ["generator.max_logprob_mismatch=0.2"])) == 0.2


def test_mismatch_warns_then_stops_after_its_limit_in_a_row():
    g = guards("generator.max_mismatch_in_a_row=3")
    assert g.check(0, {"rollout/logprob_mismatch": 3e-7}) == []
    (warning,) = g.check(1, {"rollout/logprob_mismatch": 0.02})
    assert warning.startswith(
        "warning: iteration 1: the generators are off the learner's policy: "
        "rollout/logprob_mismatch=0.02 > generator.max_logprob_mismatch=0.001 (1 of 3"
    )
    assert "likely causes:" in warning and "weight_sync.verify_checksum=true" in warning
    assert g.check(2, {"rollout/logprob_mismatch": 1e-4}) == []  # a good one resets the count
    g.check(3, {"rollout/logprob_mismatch": 0.02})
    g.check(4, {"rollout/logprob_mismatch": float("nan")})  # NaN: nothing matched, bad
    with pytest.raises(OffPolicy, match="for 3 iterations in a row") as stop:
        g.check(5, {"rollout/logprob_mismatch": 0.05})
    assert stop.value.exit_code == 4
    assert "generator.max_mismatch_in_a_row=3" in str(stop.value)
    assert "resume=auto" in str(stop.value)


def test_nothing_scorable_stops_after_its_limit_and_says_why():
    g = guards("reward.max_unscorable_in_a_row=2", describe=lambda: "'f' raised ValueError.")
    assert g.check(0, {"reward/unscorable_fraction": 0.5}) == []
    (warning,) = g.check(1, {"reward/unscorable_fraction": 1.0})
    assert "iteration 1: no sample could be scored (1 of 2 in a row" in warning
    with pytest.raises(NothingScorable) as stop:
        g.check(2, {"reward/unscorable_fraction": 1.0})
    assert stop.value.exit_code == 5
    message = str(stop.value)
    assert "2 iterations in a row (reward.max_unscorable_in_a_row=2)" in message
    assert "'f' raised ValueError." in message


def test_dropped_updates_stop_at_the_learners_limit():
    g = guards("learner.max_skipped_in_a_row=4")
    assert g.numerical(0, skipped_in_a_row=3) == []  # the train stage's count, not a metric
    with pytest.raises(NumericalFault, match="4 updates in a row were dropped") as stop:
        g.numerical(1, skipped_in_a_row=4)
    assert stop.value.exit_code == 3
