"""msa train-reconstruction: the flux loss is the evaluation's relative flux error, training lowers
it, pretraining's held-out stars are never trained on, and the checkpoint reconstructs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from msa.data.features import FeatureTransform
from msa.data.store import write_shard
from msa.data.xp_flux import relative_flux_error as archive_relative_flux_error
from msa.data.xp_flux import sample_flux
from msa.nn.autoencoders import Autoencoders
from msa.nn.flux_loss import FluxMap, coefficient_rows, relative_flux_error
from msa.pretrain.stage import held_out_of_pretraining
from msa.spectra.reconstruct import reconstruct_xp, scaled_xp_to_archive
from msa.spectra.train import ReconstructTrainingError, train_reconstruction, training_stars
from test_ensemble import small_layout, write_member
from test_predict import star_columns
from test_reconstruct import spread_scaler

torch.set_num_threads(1)


def spectra_of_colour(n: int, seed: int = 4) -> dict[str, np.ndarray]:
    """Stars whose XP coefficients are a smooth function of their colour, as a real spectrum is."""
    cols = star_columns(n, seed=seed)
    colour = cols["phot_bp_mean_mag"] - cols["phot_rp_mean_mag"]
    for band, base in (("bp", 6.0), ("rp", 9.0)):
        for k in range(1, 4):
            has = np.isfinite(cols[f"{band}_{k}"])
            cols[f"{band}_{k}"][has] = (base / k + (2.0 - k) * colour[has]).astype(np.float32)
    return cols


@pytest.fixture()
def run(tmp_path):
    layout = small_layout()
    pretrained = write_member(tmp_path / "pretrained.pt", layout, spread_scaler(layout), seed=3)
    cols = spectra_of_colour(900)
    shard = tmp_path / "shard.h5"
    write_shard(shard, cols)
    config = {"seed": 1, "features": {"xp": {"bp": 3, "rp": 3, "normalise": "g_flux"},
                                      "gaia_photometry": {"phot_g_mean_mag": None, "phot_bp_mean_mag": None,
                                                          "phot_rp_mean_mag": None},
                                      "astrometry": {"parallax": "parallax_error"}},
              "pretrain": {"validation_fraction": 0.2, "validation_shards": []},
              "reconstruct": {"batch_size": 64, "training": {"epochs": 8, "lr": 3e-3, "weight_decay": 0.0, "batch_size": 32,
                                           "grad_clip": 1.0, "init": "pretrained", "loss": "relative", "hide_xp_fraction": 1.0, "stop_fraction": 0.2,
                                           "max_stars": 10**6}}}
    return {"layout": layout, "pretrained": pretrained, "cols": cols, "shard": shard, "config": config}


def test_coefficient_rows_follow_the_names_not_the_order():
    np.testing.assert_array_equal(coefficient_rows(["bp_1", "bp_2", "rp_1", "rp_55"]), [0, 1, 55, 109])
    np.testing.assert_array_equal(coefficient_rows(["rp_3", "bp_3"]), [57, 2])
    for bad in ("bp_0", "bp_56", "g_1", "bp1"):
        with pytest.raises(ValueError, match=bad):
            coefficient_rows([bad])


def test_flux_loss_is_the_evaluations_relative_flux_error(run):
    """Through the scaler and the G normalisation: the loss a member trains on is what
    msa evaluate-reconstruction scores, in Archive units on GaiaXPy's grid."""
    aes = Autoencoders.load([run["pretrained"]])
    cols = run["cols"]
    x, _ = FeatureTransform(run["layout"], aes.scaler, True)(cols)
    xp = run["layout"].xp_indices
    rows = np.flatnonzero(np.isfinite(x[:, xp]).all(axis=1))[:50]
    observed = x[rows][:, xp]
    guess = observed + np.random.default_rng(0).normal(0, 0.3, observed.shape).astype(np.float32)
    flux_map = FluxMap(run["layout"], aes.scaler)
    ours = relative_flux_error(flux_map(torch.from_numpy(guess)), flux_map(torch.from_numpy(observed))).numpy()
    g = cols["phot_g_mean_mag"][rows]
    archive = [sample_flux(scaled_xp_to_archive(v, g, aes), 3, 3)[1] for v in (guess, observed)]
    expected = archive_relative_flux_error(*archive)
    assert expected.min() > 1e-3  # the guesses are wrong enough to tell scalings apart
    np.testing.assert_allclose(ours, expected, rtol=2e-3)


def test_training_stars_are_pretrainings_own_with_full_xp(run):
    aes = Autoencoders.load([run["pretrained"]])
    flux_map = FluxMap(run["layout"], aes.scaler)
    cols, section = run["cols"], run["config"]["pretrain"]
    data = training_stars([run["shard"]], aes, flux_map, section, 1, max_stars=10**6)
    held = held_out_of_pretraining(cols["source_id"], run["shard"], section, 1)
    eligible = ~held & np.isfinite(cols["bp_1"]) & np.isfinite(cols["phot_g_mean_mag"])
    np.testing.assert_array_equal(data.source_id, cols["source_id"][eligible])
    assert held.sum() > 100 and not np.isin(data.source_id, cols["source_id"][held]).any()
    sample = training_stars([run["shard"]], aes, flux_map, section, 1, max_stars=300)
    assert 150 < len(sample) < 300 and np.isin(sample.source_id, data.source_id).all()


def test_training_lowers_the_flux_error_and_the_checkpoint_reconstructs(run, tmp_path):
    out = tmp_path / "member-0.pt"
    summary = train_reconstruction(run["config"], run["pretrained"], [run["shard"]], out)
    assert summary["stop_median_relative_flux_error"] < 0.7 * summary["before_training"]
    assert summary["best_epoch"] >= 1
    aes = Autoencoders.load([out])
    # never trained with XP seen, so it never reads XP: the reconstruction is the photometry-only one
    seen = reconstruct_xp(run["cols"], aes, hide_xp=False)
    hidden = reconstruct_xp(run["cols"], aes, hide_xp=True)
    np.testing.assert_array_equal(seen.mean, hidden.mean)
    again = train_reconstruction(run["config"], run["pretrained"], [run["shard"]], tmp_path / "again.pt")
    assert again["stop_median_relative_flux_error"] == summary["stop_median_relative_flux_error"]


def test_a_member_that_sees_xp_reads_it(run, tmp_path):
    run["config"]["reconstruct"]["training"].update(hide_xp_fraction=0.5, epochs=2)
    out = tmp_path / "member-0.pt"
    train_reconstruction(run["config"], run["pretrained"], [run["shard"]], out)
    aes = Autoencoders.load([out])
    seen = reconstruct_xp(run["cols"], aes, hide_xp=False)
    hidden = reconstruct_xp(run["cols"], aes, hide_xp=True)
    has = seen.has_xp & np.isfinite(run["cols"]["phot_g_mean_mag"])
    assert not np.allclose(seen.mean[has], hidden.mean[has])


def test_too_few_stars_name_the_settings(run, tmp_path):
    run["config"]["reconstruct"]["training"]["max_stars"] = 20
    with pytest.raises(ReconstructTrainingError, match="max_stars"):
        train_reconstruction(run["config"], run["pretrained"], [run["shard"]], tmp_path / "m.pt")
    assert not (tmp_path / "m.pt").exists()


def test_random_init_keeps_the_architecture_but_not_the_weights(run, tmp_path):
    run["config"]["reconstruct"]["training"]["epochs"] = 1
    pretrained = train_reconstruction(run["config"], run["pretrained"], [run["shard"]], tmp_path / "p.pt")
    run["config"]["reconstruct"]["training"]["init"] = "random"
    fresh = train_reconstruction(run["config"], run["pretrained"], [run["shard"]], tmp_path / "r.pt")
    assert fresh["before_training"] != pretrained["before_training"]
    saved = torch.load(tmp_path / "r.pt", weights_only=True)
    assert saved["init"] == "random"
    assert saved["model_hparams"] == torch.load(run["pretrained"], weights_only=True)["model_hparams"]


def test_when_no_epoch_beats_the_start_the_start_is_kept(run, tmp_path):
    run["config"]["reconstruct"]["training"].update(epochs=2, lr=50.0, grad_clip=0.0)  # steps that only harm
    summary = train_reconstruction(run["config"], run["pretrained"], [run["shard"]], tmp_path / "m.pt")
    assert summary["best_epoch"] == 0
    saved = torch.load(tmp_path / "m.pt", weights_only=True)["model"]
    start = torch.load(run["pretrained"], weights_only=True)["model"]
    assert all(torch.equal(saved[k], start[k]) for k in start)


def test_evaluation_refuses_a_member_of_other_held_out_stars(run, tmp_path):
    from msa.spectra.evaluate import HeldOutMismatchError, require_same_held_out

    out = tmp_path / "member-0.pt"
    config = dict(run["config"], reconstruct={**run["config"]["reconstruct"],
                                              "training": {**run["config"]["reconstruct"]["training"], "epochs": 1}})
    train_reconstruction(config, run["pretrained"], [run["shard"]], out)
    aes = Autoencoders.load([out])
    require_same_held_out(config, aes)  # its own run's config: accepted
    for changed in ({"seed": 2}, {"pretrain": {"validation_fraction": 0.3, "validation_shards": []}}):
        with pytest.raises(HeldOutMismatchError, match="member-0.pt"):
            require_same_held_out({**config, **changed}, aes)
