"""The reward service's scoring and arguments, without starting Ray: the weighted sum and its
unscorable cases, and the forms the app builder takes its functions in."""

from __future__ import annotations

import logging
import math

import pytest
from pydantic import ValidationError

from reward_service import server
from reward_service.protocol import Sample
from reward_service.server import FunctionSpec, SampleScorer, ServerArgs

pytestmark = pytest.mark.unit  # pure code in this process


def const(value: float | None):
    def fn(prompt: str, response: str, label: str | None) -> float | None:
        return value

    return fn


def boom(prompt: str, response: str, label: str | None) -> float:
    raise ZeroDivisionError("user code failed")


def by_label(prompt: str, response: str, label: str | None) -> float | None:
    return None if label is None else float(label)


@pytest.fixture
def registry(monkeypatch) -> dict[str, object]:
    """Names the scorer resolves, without touching reward_service.rules."""
    functions = {"half": const(0.5), "none": const(None), "nan": const(math.nan), "boom": boom}
    functions["label"] = by_label
    monkeypatch.setattr(server, "resolve", lambda name, params=None: functions[name])
    return functions


def scorer(*terms: tuple[str, float]) -> SampleScorer:
    return SampleScorer(ServerArgs(functions=[FunctionSpec(name=n, weight=w) for n, w in terms]))


def test_the_score_is_the_weighted_sum(registry):
    samples = [Sample(prompt="p", response="r", label=x) for x in ("1", "3")]
    # 2 x label + 4 x 0.5: 2 + 2 = 4 and 6 + 2 = 8
    assert scorer(("label", 2.0), ("half", 4.0)).score(samples) == [4.0, 8.0]


@pytest.mark.parametrize("bad", ["none", "nan", "boom"])
def test_a_term_that_is_none_nan_or_raises_makes_the_sample_unscorable(registry, bad):
    samples = [Sample(prompt="p", response="r", label="1"), Sample(prompt="p", response="r")]
    assert scorer(("label", 1.0), (bad, 1.0)).score(samples) == [None, None]
    # and only that sample, when the term is fine elsewhere
    assert scorer(("label", 1.0), ("half", 1.0)).score(samples) == [1.5, None]


def test_failures_are_counted_over_calls_and_logged_with_the_first_error(registry, caplog):
    samples = [Sample(prompt="p", response="r", label="1"), Sample(prompt="p", response="r")]
    s = scorer(("label", 1.0), ("boom", 1.0))
    with caplog.at_level(logging.WARNING, "reward_service.server"):
        s.score(samples)
        s.score(samples)
    # sample 2 has no label, so "label" makes it unscorable and "boom" is not asked about it
    assert (s.problems[0].errors, s.problems[0].samples) == (0, 4)
    assert (s.problems[1].errors, s.problems[1].samples) == (2, 2)
    line = boom.__code__.co_firstlineno + 1  # the raise
    assert [r.getMessage() for r in caplog.records][-1] == (
        "reward function 'boom' failed on 2 of 2 samples so far; first error: ZeroDivisionError: "
        f"user code failed (test_server_scoring.py:{line} in boom); its failed samples are "
        "unscorable"
    )


def test_params_go_to_resolve_only_when_given(monkeypatch):
    calls = []

    def resolve(*args):
        calls.append(args)
        return const(1.0)

    monkeypatch.setattr(server, "resolve", resolve)
    args = ServerArgs.model_validate(
        {"functions": '[{"name": "a", "params": {"k": 3}}, {"name": "b", "weight": 0.5}]'}
    )
    server.resolve_functions(args.functions)
    assert calls == [("a", {"k": 3}), ("b",)]


@pytest.mark.parametrize(
    ("functions", "expected"),
    [
        ("exact_integer", [("exact_integer", 1.0)]),
        (" exact_integer , pkg.mod:fn ", [("exact_integer", 1.0), ("pkg.mod:fn", 1.0)]),
        ('[{"name": "exact_integer", "weight": 0.5}, "x"]', [("exact_integer", 0.5), ("x", 1.0)]),
        ([{"name": "exact_integer", "weight": 2}], [("exact_integer", 2.0)]),  # from a YAML config
    ],
)
def test_functions_are_taken_as_names_or_json(functions, expected):
    args = ServerArgs.model_validate({"functions": functions})
    assert [(f.name, f.weight) for f in args.functions] == expected


def test_cli_strings_are_parsed():
    args = ServerArgs.model_validate(
        {"functions": "a", "insecure_no_auth": "true", "model_weight": "0.25"}
    )
    assert args.insecure_no_auth is True
    assert args.model_weight == 0.25


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ({}, "nothing to serve"),
        ({"functions": " , "}, "nothing to serve"),
        ({"functions": "[{"}, "not valid JSON"),
        ({"functions": "a", "colour": "red"}, "colour"),
        ({"functions": '[{"name": "a", "weight": "NaN"}]'}, "weight"),
    ],
)
def test_bad_arguments_fail_naming_the_problem(args, match):
    with pytest.raises(ValidationError, match=match):
        ServerArgs.model_validate(args)


def test_build_app_fails_on_a_name_that_does_not_resolve():
    with pytest.raises(ValueError, match="unknown reward function 'no_such_function'"):
        server.build_app({"functions": "no_such_function"})


def test_real_functions_with_params_are_summed():
    args = ServerArgs.model_validate(
        {
            "functions": '[{"name": "exact_integer"}, '
            '{"name": "length_in_range", "weight": 0.5, "params": {"max_chars": 1}}]'
        }
    )
    samples = [Sample(prompt="3+4=", response=r, label="7") for r in ("7", "17", "x")]
    # exact_integer: 1, 0.1, 0; plus 0.5 x (1 when the response is at most 1 character, else 0)
    assert SampleScorer(args).score(samples) == pytest.approx([1.5, 0.1, 0.5])


def test_bad_params_fail_when_the_app_is_built():
    with pytest.raises(ValueError, match="length_in_range"):
        server.build_app({"functions": '[{"name": "length_in_range", "params": {"colour": 1}}]'})
