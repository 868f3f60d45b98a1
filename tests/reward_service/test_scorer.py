import math

import pyarrow as pa
import pytest
from transformers import AutoTokenizer

from reward_service.scorer import RuleScorer, RuleSpec
from rollout import GeneratedSample, build_rollout_table

pytestmark = pytest.mark.component  # child processes (the contained functions)


def boom(prompt, response, label):
    if response == "1":
        raise RuntimeError("reward function bug")
    return 0.5


def nan_for_two(prompt, response, label):
    return float("nan") if response == "2" else 1.0


def scaled(prompt, response, label, *, k=1.0):
    return k


TESTS = "tests.reward_service.test_scorer:"


@pytest.fixture
def table(tiny_model):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    eos = tok.eos_token_id
    prompt = tok("1+2=")["input_ids"]
    rows = [("3", "stop", "3"), ("1", "stop", "3"), ("2", "stop", "3"), ("3", "length", None)]
    samples = [
        GeneratedSample(
            prompt_id=0,
            sample_index=i,
            prompt_token_ids=prompt,
            response_token_ids=tok(text)["input_ids"] + ([eos] if finish == "stop" else []),
            rollout_logprobs=[-1.0] * (len(tok(text)["input_ids"]) + (finish == "stop")),
            finish_reason=finish,
        )
        for i, (text, finish, _) in enumerate(rows)
    ]
    return build_rollout_table(samples, weight_version=0, metadata={"label": [r[2] for r in rows]})


def scorer(tiny_model, *names, **kwargs):
    return RuleScorer([RuleSpec(n) for n in names], tiny_model, **kwargs)


def test_each_function_is_its_own_column_and_missing_labels_are_unscorable(tiny_model, table):
    out, metrics = scorer(tiny_model, "exact_integer", TESTS + "nan_for_two").score(table)
    assert out.column_names == ["reward/exact_integer", f"reward/{TESTS}nan_for_two"]
    assert out.num_rows == table.num_rows
    # Row 0 "3" right; row 1 "1" wrong integer; row 2 "2" wrong; row 3 has no label -> None.
    assert out["reward/exact_integer"].to_pylist()[:3] == pytest.approx([1.0, 0.1, 0.1])
    assert out["reward/exact_integer"].to_pylist()[3] is None
    # NaN from a function is unscorable, never a number to train on, and counted as an error.
    assert out[f"reward/{TESTS}nan_for_two"].to_pylist() == [1.0, 1.0, None, 1.0]
    assert metrics[f"reward/errors/{TESTS}nan_for_two"] == 1
    assert metrics["reward/exact_integer/mean"] == pytest.approx(1.2 / 3)
    # A missing label is the function's own "cannot judge": unscorable, not an error.
    assert metrics["reward/errors/exact_integer"] == 0
    assert metrics["reward/exact_integer/unscorable"] == 1


def test_a_raising_function_marks_the_sample_unscorable_and_is_counted(tiny_model, table):
    rules = scorer(tiny_model, TESTS + "boom")
    assert rules.problems() == {}
    out, metrics = rules.score(table)
    assert out[f"reward/{TESTS}boom"].to_pylist() == [0.5, None, 0.5, 0.5]
    assert metrics[f"reward/errors/{TESTS}boom"] == 1
    rules.score(table)
    # The run keeps the first error and counts every failure and every sample asked.
    (problem,) = rules.problems().values()
    assert problem.first_error.startswith("RuntimeError: reward function bug (test_scorer.py:")
    assert (problem.errors, problem.samples) == (2, 8)
    assert problem.describe("boom") == (
        f"reward function 'boom' failed on 2 of 8 samples so far; first error: "
        f"{problem.first_error}"
    )


def test_a_string_return_and_a_hang_are_unscorable_and_named(tiny_model, table):
    """A user's function returning "high", and one that hangs on every sample: the batch is
    scored within a few timeouts, never a crash."""
    m = "tests.reward_service.misbehaving:"
    rules = scorer(tiny_model, m + "high", m + "always_hangs", timeout_s=0.5)
    out, metrics = rules.score(table)
    assert out[f"reward/{m}high"].to_pylist() == [None] * 4
    assert out[f"reward/{m}always_hangs"].to_pylist() == [None] * 4
    assert metrics[f"reward/errors/{m}high"] == metrics[f"reward/errors/{m}always_hangs"] == 4
    problems = rules.problems()
    assert problems[m + "high"].first_error == "returned 'high' (str), not a number"
    assert problems[m + "always_hangs"].first_error == (
        "no answer within reward.function_timeout_s=0.5"
    )
    rules.close()


def test_params_and_column_names_come_from_the_spec(tiny_model, table):
    rules = [RuleSpec("exact_integer", column="answer"), RuleSpec(TESTS + "scaled", {"k": 3.0})]
    out, _ = RuleScorer(rules, tiny_model).score(table)
    assert out["reward/answer"].to_pylist()[0] == 1.0
    assert out[f"reward/{TESTS}scaled"].to_pylist() == [3.0] * 4


def test_scores_are_float32_and_never_default_to_zero(tiny_model, table):
    out, _ = scorer(tiny_model, "exact_integer").score(table)
    values = out["reward/exact_integer"].to_pylist()
    assert values[3] is None and not any(v is not None and math.isnan(v) for v in values)
    assert out.schema.field("reward/exact_integer").type == pa.float32()
