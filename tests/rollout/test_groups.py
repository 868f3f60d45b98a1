"""Group spread: unscorable scores and groups of one left out, equal scores flat, each caller's
measure (std for ``min_std`` thresholds, ptp for "all equal")."""

import math

import numpy as np
import pytest

from rollout.groups import group_spread, zero_spread_fraction

pytestmark = pytest.mark.unit  # pure code in this process

NAN = float("nan")


def test_group_spread():
    spread = group_spread(np.array([1.0, 1.0, 0.0, 1.0, NAN, 2.0]), np.array([7, 7, 8, 8, 9, 9]))
    assert spread == {7: 0.0, 8: 0.5, 9: 0.0}  # group 9 has one finite score


def test_unscorable_scores_are_left_out_of_count_mean_and_spread():
    # group 0: finite 1 and 3 -> mean 2, std sqrt(((1-2)^2 + (3-2)^2) / 2) = 1 (ddof 0);
    # NaN and inf would make both NaN if they counted. Group 5: nothing finite.
    g = group_spread(np.array([1.0, NAN, 3.0, np.inf, NAN]), np.array([0, 0, 0, 0, 5]))
    assert g.ids.tolist() == [0, 5]
    assert g.count.tolist() == [2, 0]
    assert g.mean[0] == 2.0 and math.isnan(g.mean[1])
    assert g.spread.tolist() == [1.0, 0.0]
    assert group_spread(np.array([0.0, 1.0, 5.0]), np.array([1, 1, 1]), measure="ptp")[1] == 5.0


def test_a_group_of_one_has_spread_zero_and_no_say_in_the_zero_spread_fraction():
    g = group_spread(np.array([4.0, 0.0, 1.0]), np.array([3, 8, 8]))
    assert (g[3], g.count[0]) == (0.0, 1)
    # group 3 (one score) is left out: of the groups with two, group 8 varies -> 0 of 1 flat
    assert zero_spread_fraction(np.array([4.0, 0.0, 1.0]), np.array([3, 8, 8])) == 0.0
    assert math.isnan(zero_spread_fraction(np.array([4.0, NAN, 1.0]), np.array([3, 8, 8])))


def test_equal_scores_have_zero_ptp_where_their_std_is_a_rounding_error_above_zero():
    # Seven float32 0.1: their float32 mean is not exactly 0.1, so the std is 7.45e-9, not 0.
    # zero_spread_fraction asks "all equal?", so it measures ptp, which is exactly 0.
    scores = np.full(7, 0.1, np.float32)
    groups = np.zeros(7, np.int64)
    assert group_spread(scores, groups, measure="ptp")[0] == 0.0
    assert group_spread(scores, groups)[0] == pytest.approx(7.450581e-09)  # in float32, kept
    assert zero_spread_fraction(scores, groups) == 1.0


def test_zero_spread_fraction_counts_flat_groups_among_those_with_two_finite_scores():
    scores = np.array([1, 1, 0, 1, 0.5, 0.5, np.nan, 2], np.float32)
    groups = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    # group 0 flat, 1 varied, 2 flat, 3 has one finite score (left out): 2 of 3
    assert zero_spread_fraction(scores, groups) == pytest.approx(2 / 3)


def test_ids_name_the_groups_to_report_in_order_even_without_scores():
    g = group_spread(np.array([0.0, 2.0, 5.0]), np.array([2, 2, 0]), ids=np.arange(4))
    assert g.count.tolist() == [1, 0, 2, 0]
    assert g.spread.tolist() == [0.0, 0.0, 1.0, 0.0]
    assert g.mean[0] == 5.0 and g.mean[2] == 1.0 and np.isnan(g.mean[[1, 3]]).all()
    assert list(g) == [0, 1, 2, 3] and len(g) == 4
    with pytest.raises(KeyError):
        g[9]
