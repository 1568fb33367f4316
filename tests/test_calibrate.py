"""Conformal calibration: finite-sample coverage, ordering preserved, JSON round trip."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from msa.calibration.calibrate import (CalibrationError, apply_calibration, conformal_offsets, conformal_quantile,
                                       fit_calibration, fit_group_offsets, interval_coverage, star_groups)
from msa.calibration.groups import group_levels
from msa.nn.model import QuantileHead

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


def faint_heavy_sky(rng, n):
    """Intervals of one fixed width while the true scatter grows with G: too wide for bright stars,
    too narrow for faint ones; every star has XP and two bands, a third of them lack the second."""
    g = rng.uniform(10, 18, n)
    sigma = 0.2 * 10 ** (0.12 * (g - 10))
    mu = rng.normal(0, 1, n)
    y = mu + sigma * rng.normal(size=n)
    q = np.stack([mu - 0.6, mu, mu + 0.6], axis=-1)[:, None, :]
    bands = np.column_stack([np.ones(n, bool), rng.random(n) > 1 / 3])
    return q, y[:, None], g, bands


def test_mondrian_offsets_hold_coverage_in_every_g_bin_where_one_offset_does_not():
    rng = np.random.default_rng(5)
    edges, names = [12.0, 14.0, 16.0], ["G", "J"]
    q, y, g, bands = faint_heavy_sky(rng, 8000)
    levels = group_levels(g, np.ones(len(g), bool), bands, names, edges)
    cal = fit_calibration(q, y, ["a"], 0.68)
    cal["groups"] = fit_group_offsets(q, y, ["a"], levels, 0.68, "symmetric", min_group_size=200)
    assert {"xp|G<12", "xp|12<=G<14", "xp|14<=G<16", "xp|G>=16", "xp|G>=16|G+J", "xp|G>=16|G"} <= set(cal["groups"])
    q_t, y_t, g_t, bands_t = faint_heavy_sky(rng, 20000)
    levels_t = group_levels(g_t, np.ones(len(g_t), bool), bands_t, names, edges)
    chosen = star_groups(cal, levels_t)
    assert set(chosen) <= set(cal["groups"])  # every test star found a group with its own offsets
    by_group = apply_calibration(q_t, cal, groups=chosen)
    one_offset = apply_calibration(q_t, cal)
    for lo, hi in zip([10.0, *edges], [*edges, 18.0]):
        rows = (g_t >= lo) & (g_t < hi)
        assert abs(interval_coverage(by_group[rows], y_t[rows])[0][0] - 0.68) < 0.03
        assert abs(interval_coverage(one_offset[rows], y_t[rows])[0][0] - 0.68) > 0.05


def test_small_groups_fall_back_to_the_coarser_group():
    g = np.array([12.5] * 150 + [13.5] * 10 + [np.nan] * 5)
    has_xp = np.array([True] * 100 + [False] * 65)
    bands = np.ones((len(g), 1), bool)
    levels = group_levels(g, has_xp, bands, ["G"], [13.0, 14.0])
    assert levels[0][0] == "xp" and levels[1][0] == "xp|G<13" and levels[2][0] == "xp|G<13|G"
    assert levels[1][-1] == "no_xp|G?"  # a missing G is a bin of its own
    rng = np.random.default_rng(0)
    y = rng.normal(size=(len(g), 1))
    q = np.stack([y[:, 0] - 1, y[:, 0], y[:, 0] + 1], -1)[:, None, :]
    # 100 XP stars at G = 12.5; without XP 50 at 12.5, 10 at 13.5, 5 without G: too few for a group
    groups = fit_group_offsets(q, y, ["a"], levels, 0.68, "symmetric", min_group_size=51)
    assert set(groups) == {"xp|G<13", "xp|G<13|G"}
    chosen = star_groups({"groups": groups}, levels)
    assert list(chosen[:100]) == ["xp|G<13|G"] * 100
    assert set(chosen[100:]) == {"no_xp"}


def test_log_labels_are_calibrated_in_log_units_and_stay_positive():
    rng = np.random.default_rng(2)
    age = 10 ** rng.uniform(-0.5, 1.1, 22000)  # 0.3 to 12.6 Gyr
    true = age * 10 ** (0.25 * rng.normal(size=age.size))  # 0.25 dex scatter
    q = np.stack([age * 10 ** -0.1, age, age * 10 ** 0.1], -1)[:, None, :]  # intervals too narrow
    cal = fit_calibration(q[:2000], true[:2000, None], ["age"], 0.68, log_labels=["age"])
    assert cal["log_labels"] == ["age"]
    # the offset is in dex: 0.25 dex scatter → about 0.25 − 0.1
    assert cal["per_label"]["age"]["offset_lower"] == pytest.approx(0.15, abs=0.03)
    out = apply_calibration(q[2000:], cal)
    assert np.all(out[..., 0] > 0)
    assert abs(interval_coverage(out, true[2000:, None])[0][0] - 0.68) < 0.03
    linear = apply_calibration(q[2000:], fit_calibration(q[:2000], true[:2000, None], ["age"], 0.68))
    assert np.any(linear[..., 0] < 0)  # in Gyr, the same intervals would reach below zero
