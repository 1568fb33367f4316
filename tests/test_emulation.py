"""Faint-star emulation: the error-versus-G relation of a store, and degraded copies of bright stars."""

from __future__ import annotations

import numpy as np
import pytest

from msa.calibration.emulation import ErrorRelation, degrade, faint_targets, fit_error_relation
from msa.data.features import MAG_PER_LN
from msa.data.layout import Layout
from msa.data.store import write_shard

FEATURES = {"xp": {"bp": 1, "rp": 0, "normalise": "g_flux"},
            "gaia_photometry": {"phot_g_mean_mag": "phot_g_mean_mag_error"},
            "survey_photometry": {"J": "J_err"}, "astrometry": {"parallax": "parallax_error"}}
XP_LIMIT, J_LIMIT = 17.5, 16.0


def g_error(g):
    return 0.001 * 10 ** (0.2 * (g - 12))


def sky_columns(n: int, seed: int) -> dict[str, np.ndarray]:
    """A store whose errors follow known laws of G: XP only to G = 17.5, J only to J = 16."""
    rng = np.random.default_rng(seed)
    g = rng.uniform(8, 21, n)
    j = g - 1.0
    flux = 10 ** (-0.4 * (g - 15))
    cols = {"source_id": np.arange(1, n + 1, dtype=np.int64) * 2, "phot_g_mean_mag": g,
            "phot_g_mean_flux_over_error": MAG_PER_LN / g_error(g), "J": j, "J_err": 0.02 + 0.01 * (j - 10),
            "bp_1": 1000 * flux, "bpe_1": 5 * np.sqrt(flux), "parallax": rng.uniform(0.5, 2, n),
            "parallax_error": 0.02 * 10 ** (0.2 * (g - 15))}
    cols["bp_1"][g > XP_LIMIT] = np.nan
    cols["bpe_1"][g > XP_LIMIT] = np.nan
    cols["J"][j > J_LIMIT] = np.nan
    cols["J_err"][j > J_LIMIT] = np.nan
    return {k: v.astype(np.float32) if k != "source_id" else v for k, v in cols.items()}


@pytest.fixture()
def relation(tmp_path):
    write_shard(tmp_path / "a.h5", sky_columns(30000, 0))
    return fit_error_relation([tmp_path / "a.h5"], Layout.from_config(FEATURES))


def test_relation_recovers_the_stores_error_laws_and_limits(relation):
    g = np.array([10.0, 14.0, 18.0, 20.5])
    np.testing.assert_allclose(relation.error_at("phot_g_mean_mag", g), g_error(g), rtol=0.03)
    np.testing.assert_allclose(relation.error_at("parallax", g), 0.02 * 10 ** (0.2 * (g - 15)), rtol=0.03)
    np.testing.assert_allclose(relation.error_at("bp_1", g[:2]), 5 * np.sqrt(10 ** (-0.4 * (g[:2] - 15))), rtol=0.03)
    assert relation.xp_limit == pytest.approx(XP_LIMIT, abs=0.01)
    assert relation.faint_limits["J"] == pytest.approx(J_LIMIT, abs=0.01)
    again = ErrorRelation.from_dict(relation.to_dict())  # saved with the calibration as JSON
    np.testing.assert_allclose(again.error_at("J", g), relation.error_at("J", g))


def test_faint_copies_carry_the_noise_and_losses_of_their_new_magnitude(relation):
    rng = np.random.default_rng(1)
    n = 20000
    bright = {k: np.full(n, v, dtype=np.float64) for k, v in
              {"phot_g_mean_mag": 12.0, "phot_g_mean_flux_over_error": MAG_PER_LN / g_error(12.0), "J": 11.0,
               "J_err": 0.03, "bp_1": 1000 * 10 ** (-0.4 * (12 - 15)), "bpe_1": 5 * 10 ** (-0.2 * (12 - 15)),
               "parallax": 2.0, "parallax_error": 0.02 * 10 ** (0.2 * (12 - 15))}.items()}
    layout = Layout.from_config(FEATURES)
    for target, keeps_xp, keeps_j in ((13.0, True, True), (16.0, True, True), (17.4, True, False), (19.0, False, False)):
        copy = degrade(bright, np.full(n, target), layout, relation, rng)
        shift = target - 12.0
        sigma_g = g_error(target)
        # G's noise grows to the store's error at the new G; the reported error says so
        assert np.std(copy["phot_g_mean_mag"] - target) == pytest.approx(np.sqrt(sigma_g**2 - g_error(12) ** 2),
                                                                         rel=0.05)
        np.testing.assert_allclose(MAG_PER_LN / copy["phot_g_mean_flux_over_error"], sigma_g, rtol=0.03)
        # parallax shrinks with the distance, XP flux with the brightness
        assert np.median(copy["parallax"]) == pytest.approx(2.0 * 10 ** (-0.2 * shift), rel=0.02)
        assert np.all(np.isfinite(copy["bp_1"])) == keeps_xp and np.all(np.isnan(copy["bp_1"])) != keeps_xp
        if keeps_xp:
            assert np.median(copy["bp_1"]) == pytest.approx(bright["bp_1"][0] * 10 ** (-0.4 * shift), rel=0.02)
        assert np.all(np.isfinite(copy["J"])) == keeps_j and np.all(np.isnan(copy["J"])) != keeps_j
    with pytest.raises(ValueError, match="brighter"):
        degrade(bright, np.full(n, 11.0), layout, relation, rng)


def test_one_target_per_fainter_bin():
    rng = np.random.default_rng(0)
    index, target = faint_targets(np.array([12.5, 15.5, np.nan]), [12.0, 14.0, 16.0], 18.0, rng)
    # the G = 12.5 star gets copies in 14-16 and 16-18; the 15.5 star only in 16-18; no G: none
    assert sorted(index.tolist()) == [0, 0, 1]
    assert np.all((target[index == 1] >= 16) & (target[index == 1] < 18))
    assert sorted(np.floor(target[index == 0] / 2).tolist()) == [7.0, 8.0]


def test_the_sky_is_seen_as_calibrated_with_xp_and_with_xp_hidden(tmp_path, monkeypatch):
    """The shift weights compare no-XP copies with the sky's stars in the no-XP view (every star's
    XP hidden, as no-XP coverage is measured), and beside the model's own predictions."""
    from msa.calibration.calibrate import sky_as_calibrated, with_predictions
    from msa.calibration.ensemble import Ensemble
    from test_ensemble import small_layout, unit_scaler, write_member
    from test_predict import star_columns

    layout = small_layout()
    members = [write_member(tmp_path / f"m{k}.pt", layout, unit_scaler(layout), seed=k) for k in range(2)]
    ensemble = Ensemble.load(members)
    cols = star_columns(300)
    write_shard(tmp_path / "s.h5", cols)
    xp_hidden = np.zeros(layout.n_features, dtype=bool)
    xp_hidden[layout.xp_indices] = True
    cfg = {"g_mag_bins": [12.0, 15.0], "faint_copies": {"max_rows_per_shard": 10**6}}
    x, q, groups = sky_as_calibrated(ensemble, [tmp_path / "s.h5"], cfg, xp_hidden, 64)
    n_xp = int(np.isfinite(cols["bp_1"]).sum())
    assert len(x) == len(q) == len(groups) == n_xp + 300
    assert all(g.startswith("xp|") for g in groups[:n_xp]) and all(g.startswith("no_xp|") for g in groups[n_xp:])
    assert np.isfinite(x[:n_xp][:, layout.xp_indices]).all() and np.isnan(x[n_xp:][:, layout.xp_indices]).all()
    np.testing.assert_allclose(q[n_xp:], ensemble.predict(x[n_xp:]), rtol=1e-6)
    # the share per shard bounds the sample: two shards under a cap of 100 rows read 50 each
    write_shard(tmp_path / "t.h5", star_columns(300, seed=1))
    monkeypatch.setattr("msa.calibration.calibrate.SKY_SAMPLE_ROWS", 100)
    x_few, _, groups_few = sky_as_calibrated(ensemble, [tmp_path / "s.h5", tmp_path / "t.h5"], cfg, xp_hidden, 64)
    assert sum(g.startswith("no_xp|") for g in groups_few) == 100  # every star read has a no-XP view
    features = with_predictions(x, q)
    assert features.shape == (len(x), layout.n_features + 2 * q.shape[1])
    np.testing.assert_array_equal(features[:, -1], q[:, -1, 2] - q[:, -1, 0])


def test_magnitude_error_of_a_flux_signal_to_noise_is_pinned_by_literals():
    """σ_mag = 2.5 / ln 10 / (flux / σ_flux): written out here, not through MAG_PER_LN, whose wrong
    value the other tests would share and so never notice."""
    from msa.calibration.emulation import _errors
    from msa.data.features import mag_error_from_flux_over_error

    np.testing.assert_allclose(mag_error_from_flux_over_error(np.array([100.0, 50.0, 0.0, -3.0])),
                               [0.010857, 0.021715, np.nan, np.nan], rtol=5e-5)
    raw = {"phot_g_mean_mag": np.array([15.0, 16.0]), "phot_g_mean_flux_over_error": np.array([100.0, 50.0])}
    np.testing.assert_allclose(_errors(raw, "phot_g_mean_mag", "phot_g_mean_flux_over_error"),
                               [0.010857, 0.021715], rtol=5e-5)
