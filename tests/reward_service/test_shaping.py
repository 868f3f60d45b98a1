import numpy as np
import pytest
import torch

from learner.functional import masked_whiten
from reward_service.shaping import (
    RewardShaper,
    RunningMoments,
    SafetyGate,
    ShapingSpec,
    combine,
    overlong_penalty,
    whiten,
)

pytestmark = pytest.mark.unit  # pure code in this process

NAN = float("nan")


def test_weighted_sum_keeps_unscorable_samples_unscorable():
    components = {"helpful": np.array([1.0, 2.0, NAN]), "safety": np.array([0.5, -1.0, 0.3])}
    out = combine(components, {"helpful": 1.0, "safety": 0.5})
    # 1 + 0.25, 2 - 0.5, NaN + 0.15
    np.testing.assert_allclose(out[:2], [1.25, 1.5])
    assert np.isnan(out[2])


def test_safety_gate_uses_the_safety_score_where_it_falls_below_the_threshold():
    components = {
        "helpful": np.array([1.0, 2.0, 3.0, 4.0]),
        "safety": np.array([0.5, -1.0, 0.1, NAN]),
    }
    # Llama 2: helpfulness only in the sum; safety decides where it is below 0.15.
    out = combine(components, {"helpful": 1.0}, SafetyGate("safety", 0.15))
    # 0.5 >= 0.15 -> 1.0; -1 < 0.15 -> -1; 0.1 < 0.15 -> 0.1; NaN never fires -> 4.0
    np.testing.assert_allclose(out, [1.0, -1.0, 0.1, 4.0])


def test_running_moments_match_numpy_over_all_batches_and_ignore_nan():
    rng = np.random.default_rng(0)
    batches = [rng.normal(3, 2, size=n) for n in (5, 1, 17)]
    batches[1] = np.array([NAN])
    m = RunningMoments()
    for b in batches:
        m.update(b)
    seen = np.concatenate([b[np.isfinite(b)] for b in batches])
    assert m.count == seen.size == 22
    assert m.mean == pytest.approx(seen.mean())
    assert m.std == pytest.approx(seen.std(ddof=1))
    restored = RunningMoments()
    restored.load_state_dict(m.state_dict())
    assert (restored.mean, restored.std) == (m.mean, m.std)


def test_overlong_penalty_ramps_over_the_last_buffer_tokens():
    # Budget 10, buffer 4: free up to 6 tokens, then -(L - 6) / 4, -1 at 10.
    out = overlong_penalty(np.array([5, 6, 8, 10]), max_tokens=10, buffer=4, penalty=1.0)
    np.testing.assert_allclose(out, [0.0, 0.0, -0.5, -1.0])


def shaper(**kwargs) -> RewardShaper:
    return RewardShaper(ShapingSpec(weights={"r": 1.0}, max_new_tokens=10, **kwargs))


def call(s: RewardShaper, raw, finish=None, lengths=None, rows=None):
    n = len(raw)
    return s(
        {"r": np.array(raw, np.float64)},
        finish_reasons=np.array(finish or ["stop"] * n),
        response_lengths=np.array(lengths or [1] * n),
        rows=np.array(rows if rows is not None else range(n)),
    )


def test_reference_baseline_is_subtracted_per_dataset_row():
    s = shaper(reference_baseline=True)
    metrics = s.set_baselines(np.array([0, 0, 1, 2]), np.array([1.0, 3.0, 5.0, NAN]))
    assert s.baselines == {0: 2.0, 1: 5.0}  # row 0 averaged; row 2's only score was NaN
    assert metrics["reward/baseline_prompts"] == 2
    score, metrics = call(s, [2.0, 5.0, 7.0], rows=[0, 1, 2])
    np.testing.assert_allclose(score, [0.0, 0.0, 7.0])  # row 2 has no baseline: left as is
    assert metrics["reward/baseline_missing"] == 1


def test_normalise_then_clip_then_eos_trick_then_overlong_penalty():
    s = shaper(normalize=True, clip=1.0, no_eos_penalty=-2.0, overlong_buffer=4)
    raw = [0.0, 10.0, 20.0, 30.0]
    score, metrics = call(s, raw, finish=["stop", "stop", "stop", "length"], lengths=[1, 1, 8, 10])
    z = (np.array(raw) - 15.0) / np.std(raw, ddof=1)  # (-1.16, -0.39, 0.39, 1.16)
    clipped = np.clip(z, -1, 1)
    # the last one was cut off: -2 (EOS trick) and -1 (overlong, 10 of 10 tokens);
    # the third is 8 of 10 tokens: -0.5
    expected = [clipped[0], clipped[1], clipped[2] - 0.5, -3.0]
    np.testing.assert_allclose(score, expected, rtol=1e-6)
    assert metrics["reward/clipped_fraction"] == 0.5
    assert metrics["reward/no_eos"] == 1
    assert metrics["reward/raw_mean"] == 15.0


def test_unscorable_stays_unscorable_through_shaping():
    s = shaper(normalize=True, clip=1.0)
    score, metrics = call(s, [1.0, NAN, 3.0])
    assert np.isnan(score[1]) and np.isfinite(score[[0, 2]]).all()
    assert metrics["reward/unscorable"] == 1


def test_shaper_state_round_trips():
    s = shaper(normalize=True, reference_baseline=True)
    s.set_baselines(np.array([3]), np.array([1.5]))
    call(s, [1.0, 2.0, 4.0])
    t = shaper(normalize=True, reference_baseline=True)
    t.load_state_dict(s.state_dict())
    a, _ = call(s, [5.0, 3.0], rows=[3, 1])
    b, _ = call(t, [5.0, 3.0], rows=[3, 1])
    np.testing.assert_array_equal(a, b)


def test_whitening_keeps_the_batch_mean_and_makes_the_spread_one():
    # Scorable [1, 1, 1, 5]: mean 2, deviations (-1, -1, -1, 3), unbiased variance 12 / 3 = 4,
    # std 2. (r - 2) / 2 + 2 = (1.5, 1.5, 1.5, 3.5): mean still 2, std 1. (Not r / std, which
    # would be (0.5, 0.5, 0.5, 2.5) and move the mean to 1.)
    out, std = whiten(np.array([1.0, NAN, 1.0, 1.0, 5.0]))
    assert std == 2.0
    np.testing.assert_allclose(out[[0, 2, 3, 4]], [1.5, 1.5, 1.5, 3.5], rtol=1e-8)
    scored = out[np.isfinite(out)]
    assert scored.mean() == pytest.approx(2.0) and scored.std(ddof=1) == pytest.approx(1.0)
    assert np.isnan(out[1])  # unscorable stays unscorable


def test_whitening_is_masked_whiten_without_shifting_the_mean():
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 2.5, size=9)
    x[[2, 7]] = NAN
    finite = np.isfinite(x)
    expected = masked_whiten(
        torch.tensor(np.nan_to_num(x)), torch.tensor(finite), shift_mean=False
    ).numpy()
    out, _ = whiten(x)
    np.testing.assert_allclose(out[finite], expected[finite], rtol=1e-12)


def test_a_batch_without_spread_is_left_as_it_is():
    # All scorable scores equal: nothing to rescale (no division by a zero std), std 0.
    # One scorable score: no variance at all, std NaN. Either way the scores are unchanged.
    out, std = whiten(np.array([0.1, 0.1, NAN, 0.1]))
    assert std == 0.0
    np.testing.assert_array_equal(out, [0.1, 0.1, NAN, 0.1])
    out, std = whiten(np.array([NAN, 4.0]))
    assert np.isnan(std)
    np.testing.assert_array_equal(out, [NAN, 4.0])


def test_whitening_is_the_last_step_after_the_eos_trick():
    s = shaper(no_eos_penalty=5.0, whiten=True)
    score, metrics = call(s, [1.0, 1.0, 1.0, 7.0], finish=["stop", "stop", "stop", "length"])
    # The EOS trick first: (1, 1, 1, 5); whitened as above: (1.5, 1.5, 1.5, 3.5).
    np.testing.assert_allclose(score, [1.5, 1.5, 1.5, 3.5], rtol=1e-6)
    assert metrics["reward/whiten_std"] == 2.0
    assert "reward/whiten_std" not in call(shaper(), [1.0, 2.0])[1]
