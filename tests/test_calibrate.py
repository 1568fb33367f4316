"""Conformal calibration: finite-sample coverage, ordering preserved, JSON round trip."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from msa.calibrate import (CalibrationError, apply_calibration, conformal_offsets, conformal_quantile,
                           fit_calibration, interval_coverage)
from msa.model import QuantileHead

torch.set_num_threads(1)


def test_conformal_quantile_is_the_finite_sample_order_statistic():
    scores = np.arange(1.0, 11.0)  # n = 10
    # ⌈11 · 0.68⌉ = 8 → the 8th smallest, not the plain 68th percentile (~7.1)
    assert conformal_quantile(scores, 0.68) == 8.0
    assert conformal_quantile(scores[::-1], 0.9) == 10.0  # ⌈11 · 0.9⌉ = 10
    with pytest.raises(CalibrationError, match="too few"):
        conformal_quantile(scores, 0.95)  # ⌈11 · 0.95⌉ = 11 > n


def predicted_with_wrong_width(rng, n, width_factor):
    """Gaussian truth around a perfect median, with intervals width_factor × the true 1σ."""
    sigma = rng.uniform(0.5, 2.0, n)
    mu = rng.normal(0, 3, n)
    y = mu + sigma * rng.normal(size=n)
    q = np.stack([mu - width_factor * sigma, mu, mu + width_factor * sigma], axis=-1)
    return q[:, None, :], y[:, None]


@pytest.mark.parametrize("mode", ["symmetric", "per_side"])
@pytest.mark.parametrize("width_factor", [0.3, 2.5])
def test_conformal_reaches_nominal_coverage_over_many_trials(mode, width_factor):
    rng = np.random.default_rng(11)
    target, n_cal, n_test, trials = 0.68, 200, 1000, 300
    covs = []
    for _ in range(trials):
        q_cal, y_cal = predicted_with_wrong_width(rng, n_cal, width_factor)
        cal = fit_calibration(q_cal, y_cal, ["a"], target, mode)
        q_test, y_test = predicted_with_wrong_width(rng, n_test, width_factor)
        covs.append(interval_coverage(apply_calibration(q_test, cal), y_test)[0][0])
    covs = np.array(covs)
    before = interval_coverage(*predicted_with_wrong_width(rng, 5000, width_factor))[0][0]
    assert abs(before - target) > 0.2  # the uncalibrated intervals were badly off
    # each trial within binomial noise (calibration + test sampling) of the nominal level
    sd = math.sqrt(target * (1 - target) * (1 / n_cal + 1 / n_test))
    assert np.mean(np.abs(covs - target) < 4 * sd) > 0.99
    # in expectation ≥ nominal, and not much above (finite-sample bound: ≤ target + 1/(n+1) for symmetric)
    se_mean = covs.std() / math.sqrt(trials)
    assert covs.mean() >= target - 3 * se_mean
    assert covs.mean() <= target + 2 / (n_cal + 1) + 3 * se_mean


def test_offsets_ignore_nan_and_fit_checks_shapes():
    q = np.array([[0.0, 1.0, 2.0]] * 5 + [[np.nan, 1.0, 2.0]])
    y = np.array([1.0, 3.0, -1.0, 1.5, np.nan, 0.0])
    lo, hi, n = conformal_offsets(q, y, 0.5)
    assert n == 4
    # scores max(q16 − y, y − q84): −1, 1, 1, −0.5 → sorted −1, −0.5, 1, 1; ⌈5·0.5⌉ = 3rd → 1.0
    assert lo == hi == 1.0
    with pytest.raises(CalibrationError, match="do not fit"):
        fit_calibration(np.zeros((3, 2, 3)), np.zeros((3, 2)), ["a"])


def test_apply_calibration_by_label_name_and_missing_label():
    cal = {"labels": ["a", "b"], "per_label": {"a": {"offset_lower": 1.0, "offset_upper": 2.0},
                                               "b": {"offset_lower": -5.0, "offset_upper": -5.0}}}
    q = np.array([[[0.0, 1.0, 2.0], [10.0, 11.0, 12.0]]])
    out = apply_calibration(q, cal)
    np.testing.assert_allclose(out[0, 0], [-1.0, 1.0, 4.0])
    np.testing.assert_allclose(out[0, 1], [11.0, 11.0, 11.0])  # shrunk past the median → clipped to it
    swapped = apply_calibration(q[:, ::-1], cal, labels=["b", "a"])
    np.testing.assert_allclose(swapped[0, 1], [-1.0, 1.0, 4.0])
    with pytest.raises(CalibrationError, match="no entry"):
        apply_calibration(q, cal, labels=["a", "c"])


def test_stars_without_xp_take_their_own_offsets():
    cal = {"labels": ["a"], "per_label": {"a": {"offset_lower": 1.0, "offset_upper": 2.0}},
           "per_label_without_xp": {"a": {"offset_lower": 3.0, "offset_upper": 4.0}}}
    q = np.array([[[0.0, 1.0, 2.0]], [[0.0, 1.0, 2.0]]])
    out = apply_calibration(q, cal, has_xp=np.array([True, False]))
    np.testing.assert_allclose(out[:, 0], [[-1.0, 1.0, 4.0], [-3.0, 1.0, 6.0]])
    np.testing.assert_allclose(apply_calibration(q, cal)[:, 0], [[-1.0, 1.0, 4.0]] * 2)  # default: with XP
    del cal["per_label_without_xp"]
    with pytest.raises(CalibrationError, match="without XP"):
        apply_calibration(q, cal, has_xp=np.array([True, False]))


finite = st.floats(-1e3, 1e3, allow_nan=False, width=32)


@settings(max_examples=60, deadline=None)
@given(latent=arrays(np.float32, (7, 8), elements=st.floats(-50, 50, allow_nan=False, width=32)),
       seed=st.integers(0, 2**16), offsets=st.lists(finite, min_size=4, max_size=4))
def test_quantiles_never_cross_through_head_and_calibration(latent, seed, offsets):
    torch.manual_seed(seed)
    head = QuantileHead(8, 2, widths=[16])
    with torch.no_grad():
        q = head(torch.from_numpy(latent)).numpy()
    assert np.all(q[..., 0] <= q[..., 1]) and np.all(q[..., 1] <= q[..., 2])
    cal = {"labels": ["a", "b"], "per_label": {
        "a": {"offset_lower": offsets[0], "offset_upper": offsets[1]},
        "b": {"offset_lower": offsets[2], "offset_upper": offsets[3]}}}
    out = apply_calibration(q, cal)
    assert np.all(out[..., 0] <= out[..., 1]) and np.all(out[..., 1] <= out[..., 2])
    np.testing.assert_array_equal(out[..., 1], q[..., 1])  # the median is never moved
