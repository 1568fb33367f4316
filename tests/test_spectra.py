"""Sampled XP spectra: the cached GaiaXPy matrix gives GaiaXPy's own fluxes for real Archive rows;
the kNN baseline; the reconstruction validation end to end on a small store."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from msa.data.batches import hash_fraction
from msa.data.gaia import read_xp
from msa.data.xp_flux import full_coefficients, relative_flux_error, sample_flux
from msa.pretrain.stage import held_out_of_pretraining
from msa.spectra.knn_baseline import fit_knn_spectra

torch.set_num_threads(1)
SAMPLES = Path(__file__).parent / "data" / "gaia_archive_samples"


def test_matrix_sampling_equals_gaiaxpy_calibrate_on_archive_rows():
    import matplotlib

    with matplotlib.rc_context():
        from gaiaxpy import calibrate

    path = SAMPLES / "XP_CONTINUOUS_RAW.csv"  # two real DR3 stars, with correlations
    xp = read_xp(path)
    wavelengths, flux = sample_flux(np.hstack([xp["bp_coefficients"], xp["rp_coefficients"]]))
    spectra, sampling = calibrate(str(path), save_file=False, truncation=False)
    assert len(wavelengths) == 343 and wavelengths[0] == 336.0 and wavelengths[-1] == 1020.0
    np.testing.assert_allclose(wavelengths, sampling)
    expected = np.stack(spectra["flux"].to_numpy())
    # msa reads coefficients as float32, GaiaXPy as float64: agreement to float32 precision
    np.testing.assert_allclose(flux, expected, rtol=1e-5, atol=1e-9 * np.abs(expected).max())


def test_gaiaxpy_progress_bar_stays_out_of_the_logs():
    import io

    import gaiaxpy.calibrator.calibrator as calibrator_module

    from msa.data.xp_flux import calibrate_quietly, gaiaxpy_input

    leak = io.StringIO()  # stands for the job log GaiaXPy's bar was bound to when it was imported
    saved, calibrator_module.stdout = calibrator_module.stdout, leak
    try:
        flux, _ = calibrate_quietly(gaiaxpy_input(np.eye(2, 55), np.eye(2, 55)))
    finally:
        calibrator_module.stdout = saved
    assert flux.shape == (2, 343)
    assert leak.getvalue() == ""
    assert calibrator_module.stdout is saved


def test_fewer_coefficients_are_padded_with_zero_high_orders():
    c = np.arange(1, 7, dtype=float)[None, :]  # 3 BP + 3 RP
    full = full_coefficients(c, 3, 3)
    assert full.shape == (1, 110)
    np.testing.assert_array_equal(full[0, :3], [1, 2, 3])
    np.testing.assert_array_equal(full[0, 55:58], [4, 5, 6])
    assert full[0, 3:55].sum() == 0 and full[0, 58:].sum() == 0


def test_relative_flux_error_is_the_l2_ratio():
    ref = np.array([[3.0, 4.0], [1.0, 0.0]])
    got = relative_flux_error(ref * np.array([[1.1], [1.0]]) + np.array([[0, 0], [0, 1.0]]), ref)
    np.testing.assert_allclose(got, [0.1, 1.0])


def test_knn_recovers_a_function_of_colours_and_tunes_k_and_weights_on_held_out_training_stars():
    rng = np.random.default_rng(0)
    n = 2000
    colours = rng.uniform(-1, 1, (n, 3))
    # a fourth input that says nothing about the spectrum and spreads widely: its weight should fall
    noise = rng.normal(0, 1, (n, 1))
    inputs = np.hstack([colours, noise])
    xp = np.column_stack([np.sin(3 * colours[:, 0]), colours[:, 1] ** 2, colours[:, 2]])
    noisy = xp + rng.normal(0, 0.3, xp.shape)  # noisy spectra: averaging more neighbours pays

    def error(pred, rows):
        return np.abs(pred - xp[rows]).mean(axis=1)

    knn = fit_knn_spectra(inputs, noisy, np.arange(n), [1, 20], error, seed=0)
    assert knn.n_neighbours == 20 and knn.tuning_errors[20] < knn.tuning_errors[1]
    assert knn.weights[3] < 1 and knn.weights[0] > 0
    untuned = fit_knn_spectra(inputs, noisy, np.arange(n), [20], error, seed=0, tune_weights=False)
    test = rng.uniform(-1, 1, (200, 3))
    truth = np.column_stack([np.sin(3 * test[:, 0]), test[:, 1] ** 2, test[:, 2]])
    test_inputs = np.hstack([test, rng.normal(0, 1, (200, 1))])
    tuned_error = np.abs(knn.predict(test_inputs) - truth).mean()
    assert tuned_error < 0.12 and tuned_error < np.abs(untuned.predict(test_inputs) - truth).mean()
    with_nan = test_inputs.copy()
    with_nan[:, 2] = np.nan  # a missing input sits at the training median
    filled = np.where(np.isnan(with_nan), np.nanmedian(inputs, axis=0), with_nan)
    np.testing.assert_allclose(knn.predict(with_nan), knn.predict(filled))


def test_polynomial_yardstick_fits_a_smooth_function_of_colours():
    from msa.spectra.polynomial_baseline import fit_polynomial_spectra

    rng = np.random.default_rng(1)
    colours = rng.uniform(-1, 1, (1500, 2))
    xp = np.column_stack([colours[:, 0] ** 3 - colours[:, 1], colours[:, 0] * colours[:, 1]])
    noisy = xp + rng.normal(0, 0.1, xp.shape)
    poly = fit_polynomial_spectra(colours, noisy, np.arange(1500), lambda p, rows: np.abs(p - xp[rows]).mean(axis=1), 0)
    assert len(poly.tuning_errors) > 1 and poly.alpha in poly.tuning_errors
    test = rng.uniform(-1, 1, (200, 2))
    truth = np.column_stack([test[:, 0] ** 3 - test[:, 1], test[:, 0] * test[:, 1]])
    assert np.abs(poly.predict(test) - truth).mean() < 0.03  # a cubic is exact here, bar the noise


def test_held_out_stars_are_pretrainings_validation_stars():
    ids = np.arange(1, 5001, dtype=np.int64) * 7919
    section = {"validation_fraction": 0.1, "validation_shards": []}
    held = held_out_of_pretraining(ids, "shard-a.h5", section, seed=3)
    np.testing.assert_array_equal(held, hash_fraction(ids, 3) < 0.1)
    assert 350 < held.sum() < 650
    by_shard = {"validation_fraction": 0.1, "validation_shards": ["shard-a"]}
    assert held_out_of_pretraining(ids, "dir/shard-a.h5", by_shard, 3).all()
    assert not held_out_of_pretraining(ids, "dir/shard-b.h5", by_shard, 3).any()


@pytest.fixture()
def small_run(tmp_path):
    from msa.data.store import write_shard
    from test_ensemble import small_layout, write_member
    from test_predict import star_columns
    from test_reconstruct import spread_scaler

    layout = small_layout()
    members = [write_member(tmp_path / f"m{k}.pt", layout, spread_scaler(layout), seed=k) for k in range(2)]
    cols = star_columns(600, seed=4)
    cols["bp_1"] = np.abs(cols["bp_1"]) + 5  # a positive continuum, so fluxes are spectra-like
    cols["rp_1"] = np.abs(cols["rp_1"]) + 8
    shard = tmp_path / "shard.h5"
    write_shard(shard, cols)
    config = {"seed": 1, "features": {"xp": {"bp": 3, "rp": 3}},
              "pretrain": {"validation_fraction": 0.2, "validation_shards": []},
              "evaluate": {"g_mag_bins": [12.0, 15.0]},
              "reconstruct": {"knn_neighbours": [3, 10], "spectra_stars": 3, "batch_size": 64}}
    return {"members": members, "shard": shard, "cols": cols, "config": config}


def test_reconstruction_validation_writes_metrics_and_figures(small_run, tmp_path):
    from msa.nn.autoencoders import Autoencoders
    from msa.spectra.evaluate import evaluate_reconstruction

    aes = Autoencoders.load(small_run["members"])
    out = tmp_path / "evaluation"
    metrics = evaluate_reconstruction(small_run["config"], aes, [small_run["shard"]], out)
    cols = small_run["cols"]
    held = (hash_fraction(cols["source_id"], 1) < 0.2) & np.isfinite(cols["bp_1"]) & np.isfinite(cols["phot_g_mean_mag"])
    assert metrics["stars"]["held_out_with_xp"] == int(held.sum())
    assert metrics["stars"]["knn_training"] == int((~held & np.isfinite(cols["bp_1"])).sum())
    assert metrics["knn"]["n_neighbours"] in (3, 10) and set(metrics["knn"]["tuning_median_relative_flux_error"]) == {3, 10}
    overall = metrics["overall"]["relative_flux_error"]
    assert overall["model_over_knn"] == pytest.approx(overall["model"] / overall["knn"])
    # the yardsticks read colours, never apparent G; the polynomial sits beside the kNN
    assert "phot_g_mean_mag" not in metrics["knn"]["features"] and metrics["knn"]["features"]
    assert all(name.endswith("-G") for name in metrics["knn"]["features"])
    assert metrics["polynomial"]["features"] == metrics["knn"]["features"] and metrics["polynomial"]["degree"] == 3
    assert overall["model_over_polynomial"] == pytest.approx(overall["model"] / overall["polynomial"])
    assert all("polynomial" in b["relative_flux_error"] for b in metrics["by_g"])
    assert sum(b["n"] for b in metrics["by_g"]) == metrics["stars"]["held_out_with_xp"]
    assert len(metrics["each_model"]) == 2 and 0 <= metrics["within_one_spread"] <= 1
    from msa.data.store import Shard
    from msa.spectra.evaluate import band_sizes
    from msa.spectra.reconstruct import read_columns, reconstruct_xp
    with Shard(small_run["shard"]) as shard:
        raw = shard.read(["source_id", *read_columns(aes)])
    seen = reconstruct_xp({c: v[held] for c, v in raw.items()}, aes, hide_xp=False)
    n_bp, n_rp = band_sizes(seen.names)
    expected = relative_flux_error(sample_flux(seen.mean, n_bp, n_rp)[1], sample_flux(seen.observed, n_bp, n_rp)[1])
    assert metrics["xp_seen"]["relative_flux_error"] == pytest.approx(float(np.median(expected)))
    assert metrics["xp_seen"]["relative_flux_error"] != pytest.approx(overall["model"])  # XP seen is another view
    assert json.loads((out / "metrics.json").read_text()) == json.loads(json.dumps(metrics))
    for name in ("spectra_observed_vs_reconstructed", "spectra_photometry_only", "relative_flux_error_by_g"):
        assert (out / f"{name}.png").stat().st_size > 1000
