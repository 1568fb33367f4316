"""The linear probe (msa.nn.probe): ridge from frozen features to labels, λ chosen on validation."""

import numpy as np
import torch

from msa.data.layout import Layout
from msa.nn.model import MaskedAutoencoder
from msa.nn.probe import linear_probe, raw_features, ridge_probe

torch.set_num_threads(1)


def split(rng, n, informative: bool):
    y = rng.normal(size=(n, 2))
    noise = rng.normal(size=(n, 5))
    f = np.column_stack([y[:, 0] * 3 + 0.1 * rng.normal(size=n), noise]) if informative else noise
    return f, y


def test_ridge_recovers_a_linear_label_and_not_an_absent_one():
    rng = np.random.default_rng(0)
    train, val, test = (split(rng, n, True) for n in (2000, 500, 500))
    first, second = ridge_probe(train, val, test)
    assert first["nmad"] < 0.05  # the label is 1/3 of a feature, noise 0.1/3
    assert 0.8 < second["nmad"] < 1.3  # no feature carries it: the label's own spread
    uninformative = ridge_probe(*(split(rng, n, False) for n in (2000, 500, 500)))
    assert uninformative[0]["nmad"] > 0.8


def test_ridge_leaves_missing_labels_out_and_picks_a_strong_penalty_for_noise():
    rng = np.random.default_rng(1)
    f = rng.normal(size=(300, 200))  # more noise features than a small train split can fit
    y = rng.normal(size=(300, 1))
    y[::3] = np.nan
    out = ridge_probe((f[:100], y[:100]), (f[100:200], y[100:200]), (f[200:], y[200:]))
    assert np.isfinite(out[0]["nmad"]) and out[0]["lambda"] >= 1.0


def test_raw_features_mark_what_the_encoder_does_not_see():
    x = np.array([[1.0, np.nan], [2.0, 3.0]])
    hidden = np.array([[False, False], [True, False]])
    assert raw_features(x, hidden).tolist() == [[1.0, 0.0, 0.0, 1.0], [0.0, 3.0, 1.0, 0.0]]


def test_linear_probe_reports_every_view_feature_and_label():
    layout = Layout.from_config({"xp": {"bp": 3, "rp": 3}, "gaia_photometry": {"phot_g_mean_mag": None}})
    hparams = dict(n_features=layout.n_features, n_reconstruct=layout.n_features, d_embedding=4, n_frequencies=4,
                   encoder_widths=[16, 8], decoder_widths=[16])
    torch.manual_seed(0)
    model = MaskedAutoencoder(**hparams)
    rng = np.random.default_rng(2)

    class Stars:
        def __init__(self, n):
            self.x = rng.normal(size=(n, layout.n_features)).astype(np.float32)
            self.y = np.column_stack([self.x[:, 0], self.x[:, 6]])

    table = linear_probe(model, hparams, layout, {"train": Stars(400), "validation": Stars(100),
                                                   "evaluation": Stars(100)}, ["a", "g"], evaluation="evaluation")
    assert set(table) == {"xp", "no_xp"}
    assert set(table["xp"]) == {"pretrained", "random_encoder", "raw_inputs"}
    # the raw inputs hold label a exactly with XP; with XP hidden they cannot
    assert table["xp"]["raw_inputs"]["a"]["nmad"] < 0.01
    assert table["no_xp"]["raw_inputs"]["a"]["nmad"] > 0.5
    assert table["no_xp"]["raw_inputs"]["g"]["nmad"] < 0.01
