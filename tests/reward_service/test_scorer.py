import math

import pyarrow as pa
import pytest
from transformers import AutoTokenizer

from reward_service.scorer import RuleScorer, WeightedReward
from rollout import GeneratedSample, build_rollout_table, validate


def boom(prompt, response, label):
    if response == "1":
        raise RuntimeError("reward function bug")
    return 0.5


def nan_for_two(prompt, response, label):
    return float("nan") if response == "2" else 1.0


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
    return RuleScorer([WeightedReward(*n) for n in names], tiny_model, **kwargs)


def test_score_is_the_weighted_sum_and_missing_labels_are_unscorable(tiny_model, table):
    names = [("exact_integer", 2.0), ("tests.reward_service.test_scorer:nan_for_two", 1.0)]
    out, metrics = scorer(tiny_model, *names).score(table)
    validate(out, require=["score", "reward/exact_integer"])
    # Row 0 "3" right: 2*1 + 1*1; row 1 "1" wrong integer: 2*0.1 + 1; row 2 "2": the second
    # function returns NaN -> unscorable; row 3 has no label -> exact_integer says None.
    assert out["reward/exact_integer"].to_pylist()[:3] == pytest.approx([1.0, 0.1, 0.1])
    assert out["reward/exact_integer"].to_pylist()[3] is None
    score = out["score"].to_pylist()
    assert score[:2] == pytest.approx([3.0, 1.2])
    assert score[2] is None and score[3] is None
    assert metrics["reward/unscorable"] == 2


def test_a_raising_function_marks_the_sample_unscorable_and_is_counted(tiny_model, table):
    out, metrics = scorer(tiny_model, ("tests.reward_service.test_scorer:boom", 1.0)).score(table)
    assert out["score"].to_pylist() == [0.5, None, 0.5, 0.5]
    assert metrics["reward/errors/tests.reward_service.test_scorer:boom"] == 1
    assert metrics["reward/unscorable"] == 1


def test_eos_trick_replaces_the_score_of_cut_off_responses(tiny_model, table):
    fn = ("tests.reward_service.test_scorer:boom", 1.0)
    out, metrics = scorer(tiny_model, fn, no_eos_penalty=-1.0).score(table)
    assert out["score"].to_pylist() == [0.5, None, 0.5, -1.0]
    assert metrics["reward/no_eos"] == 1


def test_scores_never_default_to_zero(tiny_model, table):
    out, _ = scorer(tiny_model, ("exact_integer", 1.0)).score(table)
    values = out["score"].to_pylist()
    assert values[3] is None and not any(v is not None and math.isnan(v) for v in values)
    assert out.schema.field("score").type == pa.float32()
