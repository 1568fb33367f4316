"""The sampled-flux pretraining term (``pretrain.flux_target_weight``): it is the reconstruction's
relative flux error, reads complete XP only, reaches every coefficient, and is refused where the
decoder does not reconstruct the XP."""

import numpy as np
import pytest
import torch
from test_batches import make_store, small_features
from test_ensemble import small_layout
from test_pretrain_label_targets import make_config
from test_reconstruct import spread_scaler

from msa.data.fit_scaler import fit_scaler
from msa.data.layout import Layout
from msa.errors import InputError
from msa.nn.flux_loss import FluxMap, relative_flux_error
from msa.pretrain.flux_target import FluxTarget
from msa.pretrain.stage import pretrain_segment

torch.set_num_threads(1)


def decoder_output(layout, n=40, seed=0):
    """Clean targets and a wrong reconstruction of them, in decoder-output order."""
    rng = np.random.default_rng(seed)
    target = torch.as_tensor(rng.normal(size=(n, len(layout.reconstruct_indices))), dtype=torch.float32)
    return target, target + torch.as_tensor(rng.normal(0, 0.3, size=target.shape), dtype=torch.float32)


def xp_positions(layout):
    recon = list(layout.reconstruct_indices)
    return [recon.index(i) for i in layout.xp_indices]


def test_the_term_is_the_weighted_mean_relative_flux_error_of_complete_xp():
    layout, scaler = small_layout(), spread_scaler(small_layout())
    term = FluxTarget(layout, scaler, weight=3.0)
    target, recon = decoder_output(layout)
    assert term(target, target).item() == pytest.approx(0.0, abs=1e-6)
    xp = xp_positions(layout)
    target[:5, xp[2]] = float("nan")  # five stars with an XP coefficient missing
    flux = FluxMap(layout, scaler)
    expected = relative_flux_error(flux(recon[5:, xp]), flux(target[5:, xp])).mean()
    assert term(recon, target).item() == pytest.approx(3.0 * expected.item(), rel=1e-5)
    # what the incomplete stars' reconstruction is does not matter
    other = recon.clone()
    other[:5] += 10.0
    assert term(other, target).item() == pytest.approx(term(recon, target).item(), rel=1e-6)
    # photometry is not in the term: only the XP columns of the decoder output are read
    photometry = [p for p in range(recon.shape[1]) if p not in xp]
    other = recon.clone()
    other[:, photometry] += 10.0
    assert term(other, target).item() == pytest.approx(term(recon, target).item(), rel=1e-6)


def test_every_xp_coefficient_gets_a_gradient():
    layout = small_layout()
    term = FluxTarget(layout, spread_scaler(layout), weight=1.0)
    target, recon = decoder_output(layout)
    recon.requires_grad_(True)
    term(recon, target).backward()
    gradient = recon.grad.abs().sum(0)
    xp = xp_positions(layout)
    assert (gradient[xp] > 0).all()
    assert (gradient[[p for p in range(recon.shape[1]) if p not in xp]] == 0).all()


def test_a_decoder_without_the_xp_is_refused():
    features = {**small_features(), "reconstruct": ["gaia_photometry"]}
    layout = Layout.from_config(features)
    with pytest.raises(InputError, match="pretrain.flux_target_weight"):
        FluxTarget(layout, spread_scaler(layout), weight=1.0)


def test_pretraining_adds_the_term_to_the_training_loss(tmp_path):
    paths = make_store(tmp_path, n_shards=2, rows=300, missing=0.0)
    layout = Layout.from_config(small_features())
    scaler, meta = fit_scaler(paths, layout, True, shards=2, max_rows=10_000, seed=0)
    scaler.save(tmp_path / "scaler.json", meta)
    catalogue = tmp_path / "labels.csv"
    catalogue.write_text("source_id,colour\n1,0\n")
    losses = {}
    for weight in (0.0, 50.0):
        config = make_config(catalogue, epochs=1, epochs_per_job=1, flux_target_weight=weight)
        result = pretrain_segment(config, paths, tmp_path / "scaler.json", tmp_path / f"w{weight}", 0)
        losses[weight] = result.metrics[-1]
    # the same seed and batches: the term raises the training loss, the validation loss (the
    # reconstruction alone) is of the same kind for both
    assert losses[50.0]["train_loss"] > losses[0.0]["train_loss"] + 1e-3
    assert np.isfinite(losses[50.0]["val_loss"])
