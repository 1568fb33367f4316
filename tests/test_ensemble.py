"""Ensemble inference on member checkpoints built here from randomly initialised networks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from msa.nn.checkpoint import save_checkpoint
from scipy.special import ndtr

from msa.calibration.ensemble import Ensemble, EnsembleError, combine_members, member_distribution
from msa.data.layout import Layout
from msa.data.scaling import Scaler
from msa.nn.model import MaskedAutoencoder, QuantileHead

torch.set_num_threads(1)

FEATURES_CFG = {
    "xp": {"bp": 3, "rp": 3, "normalise": "g_flux"},
    "gaia_photometry": {"phot_g_mean_mag": None, "phot_bp_mean_mag": None, "phot_rp_mean_mag": None},
    "astrometry": {"parallax": "parallax_error"},
}
LABELS = ["teff", "logg", "parallax"]


def small_layout(features_cfg: dict = FEATURES_CFG) -> Layout:
    return Layout.from_config(features_cfg)


def unit_scaler(layout: Layout) -> Scaler:
    return Scaler.from_stats(layout.names, np.zeros(layout.n_features), np.ones(layout.n_features))


def write_member(path, layout: Layout, scaler: Scaler, labels=LABELS, *, seed: int = 0,
                 label_centre=None, label_scale=None, force_mask_indices=(), parallax=None,
                 normalise_xp: bool = True, label_set: str = "test", encoder_widths=(24, 12)):
    """A fine-tuned member checkpoint in the contract format, from random initial weights."""
    torch.manual_seed(seed)
    model = MaskedAutoencoder(layout.n_features, len(layout.reconstruct_indices), d_embedding=4,
                              n_frequencies=4, frequency_init_scale=1.0, encoder_widths=list(encoder_widths))
    head = QuantileHead(model.latent_dim, len(labels), widths=[16])
    if parallax is None:
        parallax = {"label_index": None, "feature_index": None, "masked_pass": False}
    save_checkpoint(path, {
        "kind": "finetune", "model": model.state_dict(), "model_hparams": model.hparams,
        "head": head.state_dict(), "head_hparams": head.hparams, "labels": list(labels),
        "label_centre": list(label_centre if label_centre is not None else [0.0] * len(labels)),
        "label_scale": list(label_scale if label_scale is not None else [1.0] * len(labels)),
        "layout": layout.to_dict(), "scaler": scaler.to_dict(), "normalise_xp": normalise_xp,
        "force_mask_indices": [int(i) for i in force_mask_indices], "parallax": parallax,
        "member": seed, "seed": seed, "label_set": label_set, "config_hash": "test",
    })
    return path


def random_inputs(n: int, layout: Layout, seed: int = 1, missing: float = 0.1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, layout.n_features)).astype(np.float32)
    x[rng.random(x.shape) < missing] = np.nan
    return x


@pytest.fixture()
def layout():
    return small_layout()


def test_quantiles_are_ordered_and_physical(tmp_path, layout):
    scaler = unit_scaler(layout)
    centre, scale = [4500.0, 2.5, 1.0], [800.0, 1.2, 0.5]
    paths = [write_member(tmp_path / f"m{k}.pt", layout, scaler, seed=k, label_centre=centre, label_scale=scale)
             for k in range(3)]
    ens = Ensemble.load(paths)
    x = random_inputs(200, layout)
    q = ens.predict(x, batch_size=64)
    assert q.shape == (200, 3, 3) and q.dtype == np.float32
    assert np.all(np.isfinite(q))
    assert np.all(q[..., 0] <= q[..., 1]) and np.all(q[..., 1] <= q[..., 2])
    # members' scaled outputs are O(1): physical medians sit around the label centre in label units
    assert abs(np.median(q[:, 0, 1]) - 4500.0) < 5 * 800.0
    assert ens.labels == LABELS and len(ens.members) == 3 and len(ens.checksums) == 3


def test_label_scale_and_centre_are_applied(tmp_path, layout):
    scaler = unit_scaler(layout)
    plain = Ensemble.load([write_member(tmp_path / "a.pt", layout, scaler, seed=5)])
    scaled = Ensemble.load([write_member(tmp_path / "b.pt", layout, scaler, seed=5,
                                         label_centre=[10.0, -1.0, 0.0], label_scale=[2.0, 3.0, 0.5])])
    x = random_inputs(50, layout)
    qa, qb = plain.predict_members(x)[0], scaled.predict_members(x)[0]
    expected = qa * np.array([2.0, 3.0, 0.5])[:, None] + np.array([10.0, -1.0, 0.0])[:, None]
    np.testing.assert_allclose(qb, expected, rtol=1e-5, atol=1e-5)


def test_single_member_ensemble_is_that_member(tmp_path, layout):
    ens = Ensemble.load([write_member(tmp_path / "m.pt", layout, unit_scaler(layout), seed=3)])
    x = random_inputs(100, layout)
    members = ens.predict_members(x)
    assert members.shape == (1, 100, 3, 3)
    np.testing.assert_array_equal(ens.predict(x), members[0])


def sampled_mixture(q: np.ndarray, n: int = 400_000, seed: int = 0) -> np.ndarray:
    """Brute force: draw ``n`` values from every member's two-piece normal, pool them, take percentiles."""
    rng = np.random.default_rng(seed)
    median, below, above = member_distribution(q)
    out = np.empty(q.shape[1:])
    for m in range(q.shape[1]):
        z = rng.standard_normal((q.shape[0], n))
        pooled = median[:, m, None] + np.where(z < 0, below[:, m, None], above[:, m, None]) * z
        out[m] = np.quantile(pooled.ravel(), [0.16, 0.5, 0.84])
    return out


def test_mixture_of_disagreeing_members_matches_a_sampled_mixture():
    # two members 2 sigma apart hold only ~0.59 of their mixture inside a moment-matched interval
    d = 2.0
    disagree = np.array([[[-d - 1, -d, -d + 1]], [[d - 1, d, d + 1]]])
    rng = np.random.default_rng(3)
    med = rng.normal(0, 2, size=(3, 12))
    skewed = np.stack([med - 0.2 - 2 * rng.random(med.shape), med, med + 0.2 + 3 * rng.random(med.shape)], -1)
    for q in (disagree, skewed):
        combined = combine_members(q[:, :, None, :])[:, 0]
        np.testing.assert_allclose(combined, sampled_mixture(q), atol=0.01)
    # the interval holds 68 % of the mixture: each member's CDF averaged at the combined ends
    lo, hi = combine_members(disagree[:, :, None, :])[0, 0, [0, 2]]
    mass = np.mean([ndtr((hi - m) / 1.0 * 0.9945) - ndtr((lo - m) / 1.0 * 0.9945) for m in (-d, d)])
    assert abs(mass - 0.68) < 1e-3


def test_combine_members_keeps_one_member_and_agreeing_members():
    q = np.array([[[[-3.0, -2.0, -1.5]]], [[[1.0, 2.0, 3.0]]]], dtype=np.float32)
    np.testing.assert_array_equal(combine_members(q[:1]), q[0])
    np.testing.assert_allclose(combine_members(np.concatenate([q[1:], q[1:]])), q[1], atol=1e-5)
    rng = np.random.default_rng(0)
    med = rng.normal(size=(5, 30, 2))
    qq = np.stack([med - rng.random(med.shape), med, med + 3 * rng.random(med.shape)], axis=-1)
    comb = combine_members(qq)
    assert comb.shape == (30, 2, 3)
    assert np.all(comb[..., 0] <= comb[..., 1]) and np.all(comb[..., 1] <= comb[..., 2])
    # every mixture percentile lies between the members' own
    assert np.all(comb >= qq.min(axis=0) - 1e-5) and np.all(comb <= qq.max(axis=0) + 1e-5)


def test_ensemble_quantiles_are_the_mixtures_percentiles(tmp_path, layout):
    scaler = unit_scaler(layout)
    ens = Ensemble.load([write_member(tmp_path / f"m{k}.pt", layout, scaler, seed=10 + k) for k in range(4)])
    x = random_inputs(300, layout)
    members = ens.predict_members(x).astype(np.float64)
    combined = ens.predict(x).astype(np.float64)
    median, below, above = member_distribution(members)
    for j, level in enumerate((0.16, 0.5, 0.84)):
        t = combined[..., j]
        cdf = ndtr((t - median) / np.where(t >= median, above, below)).mean(axis=0)
        np.testing.assert_allclose(cdf, level, atol=2e-4)


def test_parallax_masked_pass_never_sees_the_parallax(tmp_path, layout):
    scaler = unit_scaler(layout)
    plx_feature, plx_label = layout.index("parallax"), LABELS.index("parallax")
    masked = Ensemble.load([write_member(
        tmp_path / "masked.pt", layout, scaler, seed=7,
        parallax={"label_index": plx_label, "feature_index": plx_feature, "masked_pass": True})])
    unmasked = Ensemble.load([write_member(tmp_path / "plain.pt", layout, scaler, seed=7)])
    x = random_inputs(80, layout, missing=0.0)
    x_other = x.copy()
    x_other[:, plx_feature] += 3.0  # a very different Gaia parallax
    a, b = masked.predict(x), masked.predict(x_other)
    # the parallax label is blind to the parallax feature; the other labels still use it
    np.testing.assert_array_equal(a[:, plx_label], b[:, plx_label])
    assert not np.allclose(a[:, 0], b[:, 0])
    # same weights without the masked pass: the parallax answer does depend on the parallax input
    assert not np.allclose(unmasked.predict(x)[:, plx_label], unmasked.predict(x_other)[:, plx_label])
    # and the masked-pass answer equals hiding the parallax feature explicitly
    hide = np.zeros(layout.n_features, dtype=bool)
    hide[plx_feature] = True
    np.testing.assert_allclose(a[:, plx_label], unmasked.predict(x, extra_hidden=hide)[:, plx_label],
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(a[:, 0], unmasked.predict(x)[:, 0])


def test_force_mask_and_extra_hidden_remove_inputs(tmp_path, layout):
    scaler = unit_scaler(layout)
    xp = layout.xp_indices
    forced = Ensemble.load([write_member(tmp_path / "f.pt", layout, scaler, seed=2, force_mask_indices=xp)])
    plain = Ensemble.load([write_member(tmp_path / "p.pt", layout, scaler, seed=2)])
    x = random_inputs(60, layout, missing=0.0)
    x2 = x.copy()
    x2[:, xp] *= -4.0
    np.testing.assert_array_equal(forced.predict(x), forced.predict(x2))
    assert not np.allclose(plain.predict(x), plain.predict(x2))
    hide_xp = np.zeros(layout.n_features, dtype=bool)
    hide_xp[xp] = True
    np.testing.assert_array_equal(plain.predict(x, extra_hidden=hide_xp), plain.predict(x2, extra_hidden=hide_xp))
    # hiding a value equals the value being missing
    x_nan = x.copy()
    x_nan[:, xp] = np.nan
    np.testing.assert_allclose(plain.predict(x_nan), plain.predict(x, extra_hidden=hide_xp), rtol=1e-6)
    # a per-row mask works too: rows with XP hidden match, others differ
    rows = np.zeros((60, layout.n_features), dtype=bool)
    rows[:30][:, xp] = True
    per_row = plain.predict(x, extra_hidden=rows)
    np.testing.assert_allclose(per_row[:30], plain.predict(x_nan)[:30], rtol=1e-6)
    np.testing.assert_allclose(per_row[30:], plain.predict(x)[30:], rtol=1e-6)


def test_batch_size_does_not_change_results(tmp_path, layout):
    ens = Ensemble.load([write_member(tmp_path / f"m{k}.pt", layout, unit_scaler(layout), seed=k) for k in range(2)])
    x = random_inputs(101, layout)
    np.testing.assert_allclose(ens.predict(x, batch_size=7), ens.predict(x, batch_size=1000), rtol=1e-5, atol=1e-6)
    q, z = ens.predict_members(x, batch_size=13, return_latent=True)
    assert z.shape == (101, ens.latent_dim) and np.all(np.isfinite(z))


def test_transform_matches_members(tmp_path, layout):
    ens = Ensemble.load([write_member(tmp_path / "m.pt", layout, unit_scaler(layout))])
    assert ens.transform.layout == layout
    assert "phot_g_mean_mag" in ens.transform.store_columns and "bp_1" in ens.transform.store_columns


def test_layout_mismatch_is_refused(tmp_path, layout):
    other_cfg = {**FEATURES_CFG, "astrometry": {"parallax": "parallax_error", "pmra": None}}
    other = small_layout(other_cfg)
    a = write_member(tmp_path / "a.pt", layout, unit_scaler(layout))
    b = write_member(tmp_path / "b.pt", other, unit_scaler(other))
    with pytest.raises(EnsembleError, match=r"different feature layouts.*pmra"):
        Ensemble.load([a, b])


def test_other_disagreements_are_refused(tmp_path, layout):
    scaler = unit_scaler(layout)
    a = write_member(tmp_path / "a.pt", layout, scaler)
    shifted = Scaler.from_stats(layout.names, np.ones(layout.n_features), np.ones(layout.n_features))
    with pytest.raises(EnsembleError, match="scaler"):
        Ensemble.load([a, write_member(tmp_path / "b.pt", layout, shifted)])
    with pytest.raises(EnsembleError, match="labels"):
        Ensemble.load([a, write_member(tmp_path / "c.pt", layout, scaler, labels=["teff", "logg", "fe_h"])])
    with pytest.raises(EnsembleError, match="XP normalisation"):
        Ensemble.load([a, write_member(tmp_path / "d.pt", layout, scaler, normalise_xp=False)])


def test_pretrain_checkpoint_is_not_a_member(tmp_path, layout):
    path = tmp_path / "pre.pt"
    save_checkpoint(path, {"kind": "pretrain", "model": {}, "layout": layout.to_dict()})
    with pytest.raises(EnsembleError, match="not a fine-tuned member"):
        Ensemble.load([path])
    with pytest.raises(EnsembleError, match="no ensemble members"):
        Ensemble.load([])


def test_stars_without_xp_go_to_the_photometry_only_members(tmp_path, layout):
    scaler = unit_scaler(layout)
    xp = layout.xp_indices
    spectra = [write_member(tmp_path / f"s{k}.pt", layout, scaler, seed=10 + k) for k in range(2)]
    photometry = [write_member(tmp_path / f"p{k}.pt", layout, scaler, seed=20 + k, force_mask_indices=xp)
                  for k in range(2)]
    both = Ensemble.load(spectra + photometry)
    assert len(both.spectrum_members) == 2 and len(both.photometry_members) == 2
    x = random_inputs(40, layout, missing=0.0)
    x[20:, xp] = np.nan  # the last 20 stars have no XP spectrum
    routed = both.predict_members(x)
    assert routed.shape[0] == 2
    np.testing.assert_allclose(routed[:, :20], Ensemble.load(spectra).predict_members(x[:20]), rtol=1e-6)
    np.testing.assert_allclose(routed[:, 20:], Ensemble.load(photometry).predict_members(x[20:]), rtol=1e-6)
    # hiding XP on purpose counts as having none
    hide_xp = np.zeros(layout.n_features, dtype=bool)
    hide_xp[xp] = True
    np.testing.assert_allclose(both.predict(x[:20], extra_hidden=hide_xp), Ensemble.load(photometry).predict(x[:20]),
                               rtol=1e-6)
    with pytest.raises(EnsembleError, match="as many of each"):
        Ensemble.load(spectra + photometry[:1])


def test_head_that_reads_inputs_needs_them_and_uses_them():
    torch.manual_seed(0)
    head = QuantileHead(latent_dim=4, n_labels=2, widths=[8], n_inputs=3)
    latent = torch.zeros(5, 4)
    x = torch.randn(5, 3)
    hidden = torch.zeros(5, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="reads the inputs"):
        head(latent)
    q = head(latent, x, hidden)
    assert q.shape == (5, 2, 3)
    # an input that is hidden or missing reaches the head as unseen, whatever its value
    x_changed = x.clone()
    x_changed[:, 0] = 99.0
    assert not torch.allclose(head(latent, x_changed, hidden), q)
    hidden[:, 0] = True
    x_nan = x.clone()
    x_nan[:, 0] = float("nan")
    torch.testing.assert_close(head(latent, x_changed, hidden), head(latent, x_nan, torch.zeros_like(hidden)))


def test_log_labels_are_predicted_in_linear_units_above_zero(tmp_path, layout):
    from msa.nn.checkpoint import load_checkpoint

    scaler = unit_scaler(layout)
    plain = write_member(tmp_path / "plain.pt", layout, scaler, seed=4, label_centre=[0.5, 0.0, 0.0],
                         label_scale=[3.0, 1.0, 1.0])
    ckpt = load_checkpoint(plain, map_location="cpu")
    ckpt["log_labels"] = ["teff"]
    save_checkpoint(tmp_path / "log.pt", ckpt)
    x = random_inputs(200, layout)
    q_plain = Ensemble.load([plain]).predict(x)
    log_ensemble = Ensemble.load([tmp_path / "log.pt"])
    q_log = log_ensemble.predict(x)
    assert log_ensemble.log_labels == ["teff"]
    assert np.any(q_plain[:, 0, 0] < 0) and np.all(q_log[:, 0, 0] > 0)
    np.testing.assert_allclose(q_log[:, 0], 10 ** q_plain[:, 0], rtol=1e-5)
    np.testing.assert_array_equal(q_log[:, 1:], q_plain[:, 1:])
    with pytest.raises(EnsembleError, match="log-scaled labels"):
        Ensemble.load([plain, tmp_path / "log.pt"])
