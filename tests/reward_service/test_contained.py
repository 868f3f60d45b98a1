"""Rule reward functions in their own process: every way user code misbehaves makes that
sample unscorable with a one-line reason, and the batch goes on."""

from __future__ import annotations

import time

import pytest

from reward_service.contained import ContainedFunction, Outcome, judge

pytestmark = pytest.mark.component  # child processes (the contained functions)

M = "tests.reward_service.misbehaving:"


def run(name: str, responses: list[str], timeout_s: float = 5.0) -> list[Outcome]:
    fn = ContainedFunction(M + name, {}, timeout_s)
    try:
        return fn(["p"] * len(responses), responses, [None] * len(responses))
    finally:
        fn.close()


def test_judge_takes_real_finite_numbers_and_none_and_names_anything_else():
    assert judge(None) == Outcome(None)
    assert judge(3) == Outcome(3.0) and judge(True) == Outcome(1.0)
    assert judge(float("inf")).error == "returned inf, not a finite number"
    assert judge("high").error == "returned 'high' (str), not a number"
    assert judge([1.0]).error == "returned [1.0] (list), not a number"
    assert judge(1 + 2j).error.endswith("(complex), not a number")


def test_a_string_return_is_an_error_not_a_crash():
    assert run("high", ["a", "b"]) == [Outcome(None, "returned 'high' (str), not a number")] * 2


def test_non_finite_and_numpy_values():
    out = run("nan_or_one", ["nan", "x"])
    assert out == [Outcome(None, "returned nan, not a finite number"), Outcome(1.0)]
    assert run("numpy_and_bool", ["np", "x"]) == [Outcome(0.5), Outcome(1.0)]


def test_an_exception_names_its_type_message_and_where_it_was_raised():
    out = run("raises_on_bad", ["ok", "bad", "ok"])
    assert out[0] == out[2] == Outcome(0.5)
    assert out[1].value is None
    assert out[1].error == ("ValueError: cannot judge 'bad' (misbehaving.py:20 in raises_on_bad)")


def test_a_hanging_call_is_killed_at_the_limit_and_the_rest_of_the_batch_is_scored():
    start = time.perf_counter()
    out = run("hangs_on_slow", ["a", "slow", "b", "c"], timeout_s=1.0)
    elapsed = time.perf_counter() - start
    assert out[0] == out[2] == out[3] == Outcome(1.0)
    assert out[1] == Outcome(None, "no answer within reward.function_timeout_s=1")
    assert elapsed < 10  # one timeout and a restart, not a hang


def test_a_function_that_hangs_on_everything_costs_three_timeouts_per_batch():
    start = time.perf_counter()
    out = run("always_hangs", ["x"] * 50, timeout_s=0.5)
    elapsed = time.perf_counter() - start
    assert all(o.value is None for o in out)
    assert [o.error for o in out[:3]] == ["no answer within reward.function_timeout_s=0.5"] * 3
    assert all(o.error.startswith("not tried: the 3 calls before it") for o in out[3:])
    assert elapsed < 10


def test_a_call_that_takes_its_process_down_is_reported_and_a_new_process_goes_on():
    out = run("exits_on_crash", ["a", "crash", "b"])
    assert out == [
        Outcome(0.25),
        Outcome(None, "its process died (exit code 7)"),
        Outcome(0.25),
    ]


def test_a_bad_name_fails_when_the_function_is_set_up():
    with pytest.raises(ValueError, match="cannot be imported"):
        ContainedFunction(M + "no_such_function", {}, 5.0)
