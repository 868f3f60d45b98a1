"""Reward-model evaluation metrics on hand-built pairs, expected numbers derived in comments; and
the rm_eval/ files (CPU, numpy only)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from orchestration.rm_eval import _correlation, read_rm_eval, rm_metrics, write_rm_eval

# Four pairs. Scores r_w > r_l: pair 0 right, 1 a tie, 2 wrong, 3 right -> (1 + .5 + 0 + 1) / 4.
CHOSEN = np.array([2.0, 1.0, 0.5, 3.0])
REJECTED = np.array([1.0, 1.0, 1.5, 0.0])
CHOSEN_LEN = np.array([10, 5, 3, 16])
REJECTED_LEN = np.array([4, 5, 8, 18])  # |gap| = 6, 0, 5, 2
EDGES = [0, 3, 6, 50]


def metrics(**kwargs) -> dict:
    return rm_metrics(CHOSEN, REJECTED, CHOSEN_LEN, REJECTED_LEN, EDGES, **kwargs)


@pytest.mark.unit
def test_accuracy_counts_a_tie_half():
    m = metrics()
    assert m["accuracy"] == 0.625 and m["pairs"] == 4


@pytest.mark.unit
def test_buckets_by_length_difference():
    # [0, 3): pairs 1 (gap 0, a tie: 0.5) and 3 (gap 2, right: 1) -> 0.75; only pair 3's lengths
    #   differ, and its longer response (the rejected, 18 tokens) scores lower -> 0.
    # [3, 6): pair 2 (gap 5), wrong -> 0; its longer response (rejected) scores higher -> 1.
    # [6, 50): pair 0 (gap 6), right -> 1; longer (chosen) scores higher -> 1.
    # [50, inf): empty.
    assert metrics()["buckets"] == [
        {"bucket": "[0, 3)", "pairs": 2, "accuracy": 0.75, "longer_preferred": 0.0},
        {"bucket": "[3, 6)", "pairs": 1, "accuracy": 0.0, "longer_preferred": 1.0},
        {"bucket": "[6, 50)", "pairs": 1, "accuracy": 1.0, "longer_preferred": 1.0},
        {"bucket": "[50, inf)", "pairs": 0, "accuracy": None, "longer_preferred": None},
    ]


@pytest.mark.unit
def test_longer_preferred_over_pairs_whose_lengths_differ():
    # Pairs 0, 2, 3 differ in length; the longer scores higher in 0 and 2, not in 3 -> 2/3.
    assert metrics()["longer_preferred"] == pytest.approx(2 / 3)
    # A tie between responses of different lengths counts half; equal lengths: undefined.
    tie = rm_metrics(np.ones(1), np.ones(1), np.array([3]), np.array([7]), [0])
    assert tie["longer_preferred"] == 0.5
    same = rm_metrics(np.ones(2), np.zeros(2), np.array([4, 4]), np.array([4, 4]), [0])
    assert same["longer_preferred"] is None and same["buckets"][0]["longer_preferred"] is None


@pytest.mark.unit
def test_length_correlation_by_hand():
    # Three points: x = (1, 2, 3), y = (1, 3, 2). Deviations (-1, 0, 1), (-1, 1, 0):
    # r = 1 / sqrt(2 * 2) = 0.5.
    assert _correlation(np.array([1.0, 2.0, 3.0]), np.array([1.0, 3.0, 2.0])) == 0.5
    # Over all 2n responses: scores (3, 1 | 2, 0), lengths (4, 1 | 1, 2). Means 1.5 and 2;
    # deviations (1.5, -.5, .5, -1.5), (2, -1, -1, 0): r = 3 / sqrt(5 * 6).
    m = rm_metrics(np.array([3.0, 1.0]), np.array([2.0, 0.0]), [4, 1], [1, 2], [0])
    assert m["length_correlation"] == pytest.approx(3 / math.sqrt(30))
    # Constant lengths or constant scores: undefined.
    assert rm_metrics(np.array([3.0]), np.array([2.0]), [4], [4], [0])["length_correlation"] is None
    assert rm_metrics(np.ones(2), np.ones(2), [1, 2], [3, 4], [0])["length_correlation"] is None


@pytest.mark.unit
def test_perfectly_separated_scores():
    rng = np.random.default_rng(0)
    rejected = rng.normal(size=50)
    lengths = rng.integers(1, 100, size=(2, 50))
    m = rm_metrics(rejected + 5.0, rejected, *lengths, [0, 10, 40])
    assert m["accuracy"] == 1.0
    assert all(b["accuracy"] == 1.0 for b in m["buckets"] if b["pairs"])


@pytest.mark.unit
def test_calibration_bins_mirror_about_one_half():
    rng = np.random.default_rng(1)
    chosen, rejected = rng.normal(0.5, 1.5, size=(2, 200))
    lengths = rng.integers(1, 50, size=(2, 200))
    bins = rm_metrics(chosen, rejected, *lengths, [0], bins=10)["calibration"]
    by_range = {(round(b["lo"], 6), round(b["hi"], 6)): b for b in bins}
    assert sum(b["count"] for b in bins) == 400  # both orientations of every pair
    for (lo, hi), b in by_range.items():
        mirror = by_range[(round(1 - hi, 6), round(1 - lo, 6))]
        assert mirror["count"] == b["count"]
        assert mirror["predicted"] == pytest.approx(1 - b["predicted"])
        assert mirror["observed"] == pytest.approx(1 - b["observed"])
        assert lo <= b["predicted"] <= hi


@pytest.mark.unit
def test_ece_by_hand():
    # One pair, r_w - r_l = ln 3: p = 3 / (1 + 3) = 0.75 with outcome 1 in [0.7, 0.8), and
    # 0.25 with outcome 0 in [0.2, 0.3). ECE = (1 * 0.25 + 1 * 0.25) / 2 = 0.25.
    m = rm_metrics(np.array([math.log(3)]), np.zeros(1), [1], [1], [0])
    assert [(b["lo"], b["hi"], b["count"]) for b in m["calibration"]] == [
        (0.2, 0.3, 1),
        (0.7, 0.8, 1),
    ]
    low, high = m["calibration"]
    assert (low["predicted"], low["observed"]) == (pytest.approx(0.25), 0.0)
    assert (high["predicted"], high["observed"]) == (pytest.approx(0.75), 1.0)
    assert m["ece"] == pytest.approx(0.25)
    # Four pairs at p = 0.75, right three times in four: [0.7, 0.8) holds three outcomes 1 and
    # the wrong pair's 1 - p = 0.75 with outcome 0: observed 0.75 = predicted. ECE = 0.
    d = np.log(3) * np.array([1, 1, 1, -1])
    m = rm_metrics(d, np.zeros(4), [1] * 4, [1] * 4, [0])
    assert [b["observed"] for b in m["calibration"]] == [0.25, 0.75]
    assert m["ece"] == pytest.approx(0.0, abs=1e-12)


@pytest.mark.unit
def test_a_tie_is_calibrated_at_one_half():
    # p = 0.5 with outcome 1/2 in both orientations: [0.4, 0.5) and [0.5, 0.6), each observed
    # 0.5, ECE 0 (outcomes 1 and 0 in the two bins would read as ECE 0.5).
    m = rm_metrics(np.zeros(1), np.zeros(1), [2], [2], [0])
    assert m["accuracy"] == 0.5
    assert [(b["lo"], b["observed"], b["predicted"]) for b in m["calibration"]] == [
        (0.4, 0.5, 0.5),
        (0.5, 0.5, 0.5),
    ]
    assert m["ece"] == 0.0


@pytest.mark.unit
def test_result_is_json_and_an_empty_set_has_no_rates():
    json.dumps(metrics(), allow_nan=False)
    empty = rm_metrics(np.zeros(0), np.zeros(0), [], [], [0, 5])
    assert empty["pairs"] == 0 and empty["accuracy"] is None and empty["ece"] is None
    assert empty["calibration"] == [] and empty["buckets"][1]["accuracy"] is None


@pytest.mark.unit
@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((np.zeros(2), np.zeros(3), [1, 1], [1, 1], [0]), "four 1-D arrays of one length"),
        ((np.array([0.0, np.nan]), np.zeros(2), [1, 1], [1, 1], [0]), "1 non-finite score"),
        ((np.zeros(1), np.zeros(1), [1], [1], [1, 5]), "starting at 0"),
        ((np.zeros(1), np.zeros(1), [1], [1], [0, 5, 5]), "ascending integers"),
    ],
)
def test_bad_input_is_an_error_that_says_what(args, message):
    with pytest.raises(ValueError, match=message):
        rm_metrics(*args)


@pytest.mark.unit
def test_write_and_read_back(tmp_path):
    m = metrics()
    path = write_rm_eval(tmp_path, "held_out", m)
    write_rm_eval(tmp_path, "equal_quality", metrics(bins=4))
    assert path == tmp_path / "rm_eval" / "held_out.json"
    assert sorted(p.name for p in path.parent.iterdir()) == ["equal_quality.json", "held_out.json"]
    read = read_rm_eval(tmp_path)
    assert list(read) == ["equal_quality", "held_out"] and read["held_out"] == m
    write_rm_eval(tmp_path, "held_out", {"accuracy": 1.0})  # replaced whole
    assert read_rm_eval(tmp_path)["held_out"] == {"accuracy": 1.0}


@pytest.mark.unit
def test_read_without_evals_and_bad_files(tmp_path):
    assert read_rm_eval(tmp_path) == {}
    with pytest.raises(ValueError, match="rm eval name '../x'"):
        write_rm_eval(tmp_path, "../x", {})
    (tmp_path / "rm_eval").mkdir()
    (tmp_path / "rm_eval" / "broken.json").write_text("{")
    with pytest.raises(ValueError, match="broken.json: not valid JSON"):
        read_rm_eval(tmp_path)


@pytest.mark.component  # a fresh interpreter
def test_importing_it_imports_no_torch():
    code = "import sys, orchestration.rm_eval; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stderr[-2000:]
