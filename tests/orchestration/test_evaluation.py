import itertools
import math

import numpy as np
import pyarrow as pa
import pytest
import torch

from orchestration.advantages import throughput
from orchestration.evaluation import eval_metrics, ks_up_to, pass_at_k
from rollout import schema as S
from rollout.groups import zero_spread_fraction

pytestmark = pytest.mark.unit  # pure code in this process


def brute_pass_at_k(n: int, c: int, k: int) -> float:
    """The fraction of k-subsets of n samples (c correct) that hold a correct one."""
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(samples, k))
    return sum(any(s) for s in subsets) / len(subsets)


@pytest.mark.parametrize(("n", "c", "k"), [(1, 0, 1), (1, 1, 1), (4, 1, 2), (5, 2, 3), (8, 3, 8)])
def test_pass_at_k_is_the_chance_a_k_subset_holds_a_correct_sample(n, c, k):
    assert pass_at_k(n, c, k) == pytest.approx(brute_pass_at_k(n, c, k))


def test_pass_at_k_refuses_impossible_counts():
    with pytest.raises(ValueError, match="0 <= c <= n"):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError, match="1 <= k <= n"):
        pass_at_k(4, 1, 5)


def test_ks_are_powers_of_two_and_the_sample_count():
    assert ks_up_to(1) == [1]
    assert ks_up_to(4) == [1, 2, 4]
    assert ks_up_to(6) == [1, 2, 4, 6]


def table(prompt_ids, scores, finish, lengths):
    return pa.table(
        {
            S.PROMPT_ID: pa.array(prompt_ids, pa.int64()),
            S.RESPONSE_TOKEN_IDS: pa.array([[1] * n for n in lengths], S.TOKEN_IDS_TYPE),
            S.FINISH_REASON: pa.array(finish),
            "reward/exact": pa.array(scores, pa.float32()),
            "reward/length": pa.array([0.5] * len(scores), pa.float32()),
        }
    )


def test_eval_metrics_per_prompt_pass_at_k_and_unscorable_counts_as_wrong():
    # prompt 0: one of two correct; prompt 1: an unscorable and a wrong one
    t = table([0, 0, 1, 1], [1.0, 0.1, None, 0.1], ["stop", "length", "stop", "stop"], [2, 4, 3, 3])
    m = eval_metrics(t, "exact", 1.0)
    assert m["eval/prompts"] == 2
    assert m["eval/pass@1"] == pytest.approx((0.5 + 0.0) / 2)
    assert m["eval/pass@2"] == pytest.approx((1.0 + 0.0) / 2)
    assert m["eval/exact/mean"] == pytest.approx((1.0 + 0.1 + 0.1) / 3)  # NaN left out
    assert m["eval/length/mean"] == pytest.approx(0.5)
    assert m["eval/response_length"] == 3.0 and m["eval/truncated_fraction"] == 0.25
    assert eval_metrics(t, "exact", 0.1)["eval/pass@1"] == pytest.approx((1.0 + 0.5) / 2)


def test_zero_spread_counts_groups_whose_scores_are_all_equal():
    scores = np.array([1, 1, 0, 1, 0.5, 0.5, np.nan, 2], np.float32)
    groups = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    # group 0 flat, 1 varied, 2 flat, 3 has one finite score (left out)
    assert zero_spread_fraction(scores, groups) == pytest.approx(2 / 3)
    assert math.isnan(zero_spread_fraction(np.array([1.0]), torch.tensor([0])))


def test_throughput_divides_by_the_stage_times():
    metrics = {
        "rollout/samples": 8.0,
        "rollout/prompt_tokens": 30.0,
        "rollout/response_tokens": 10.0,
    }
    perf = throughput(metrics, {"timing/iteration": 2.0, "timing/generate": 0.5})
    assert perf == {
        "perf/samples_per_s": 4.0,
        "perf/tokens_per_s": 20.0,
        "perf/generated_tokens_per_s": 20.0,
    }
