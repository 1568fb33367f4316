"""Masking: group rules, ratios (checked statistically with a fixed seed), fixed validation mask."""

import numpy as np
import pytest
import torch

from msa.data.layout import Layout
from msa.nn.masking import MaskingError, MaskSpec, draw_mask, fixed_validation_mask

torch.set_num_threads(1)


def small_layout(force=()):
    return Layout.from_config({
        "xp": {"bp": 4, "rp": 3},
        "gaia_photometry": {"phot_g_mean_mag": None, "phot_bp_mean_mag": None},
        "survey_photometry": {"J": None, "H": None},
        "astrometry": {"parallax": "parallax_error"},
        "force_mask": list(force),
    })


SECTION = {"xp_masking_ratio": 0.3, "m_masking_ratio": 0.2, "force_mask_cols": [], "group_overrides": {}}


def test_groups_and_ratios():
    layout = small_layout()
    spec = MaskSpec.from_config(layout, SECTION)
    hidden = draw_mask(spec, 20000, torch.Generator().manual_seed(0)).numpy()
    assert hidden.shape == (20000, layout.n_features)
    xp = layout.xp_indices
    # the XP block is all-or-nothing per row
    assert np.all(hidden[:, xp].all(axis=1) | ~hidden[:, xp].any(axis=1))
    assert abs(hidden[:, xp[0]].mean() - 0.3) < 0.015
    others = np.setdiff1d(np.arange(layout.n_features), xp)
    rates = hidden[:, others].mean(axis=0)
    assert np.all(np.abs(rates - 0.2) < 0.015)
    # element masks are independent of each other (not one draw per row)
    both = (hidden[:, others[0]] & hidden[:, others[1]]).mean()
    assert abs(both - 0.04) < 0.01


def test_force_columns_always_hidden_and_layout_force_mask_included():
    layout = small_layout(force=["H"])
    spec = MaskSpec.from_config(layout, {**SECTION, "force_mask_cols": ["parallax"]})
    hidden = draw_mask(spec, 500, torch.Generator().manual_seed(1)).numpy()
    assert hidden[:, layout.index("parallax")].all()
    assert hidden[:, layout.index("H")].all()
    assert not hidden[:, layout.index("J")].all()


def test_group_override_moves_column_into_xp_block():
    layout = small_layout()
    spec = MaskSpec.from_config(layout, {**SECTION, "group_overrides": {"phot_bp_mean_mag": "xp"}})
    hidden = draw_mask(spec, 2000, torch.Generator().manual_seed(2)).numpy()
    np.testing.assert_array_equal(hidden[:, layout.index("phot_bp_mean_mag")], hidden[:, 0])


def test_fallback_ratios_and_unknown_names():
    layout = small_layout()
    spec = MaskSpec.from_config(layout, {"xp_masking_ratio": None, "m_masking_ratio": 0.5}, fallback=SECTION)
    assert spec.xp_ratio == 0.3 and spec.element_ratio == 0.5
    with pytest.raises(MaskingError, match="nope"):
        MaskSpec.from_config(layout, {**SECTION, "force_mask_cols": ["nope"]})
    with pytest.raises(MaskingError, match="xp_masking_ratio"):
        MaskSpec.from_config(layout, {"m_masking_ratio": 0.1})


def test_same_generator_state_same_mask():
    spec = MaskSpec.from_config(small_layout(), SECTION)
    g = torch.Generator().manual_seed(5)
    state = g.get_state()
    a = draw_mask(spec, 100, g)
    g.set_state(state)
    b = draw_mask(spec, 100, g)
    assert torch.equal(a, b)
    assert not torch.equal(a, draw_mask(spec, 100, g))


def test_fixed_validation_mask_is_stable_per_star():
    layout = small_layout()
    spec = MaskSpec.from_config(layout, SECTION)
    sid = np.arange(10_000, dtype=np.int64) * 7919 + 4295098369
    m1 = fixed_validation_mask(spec, sid, seed=3).numpy()
    # same stars in another order and subset: each star keeps its mask
    perm = np.random.default_rng(0).permutation(len(sid))[:3000]
    m2 = fixed_validation_mask(spec, sid[perm], seed=3).numpy()
    np.testing.assert_array_equal(m1[perm], m2)
    # other seed, other mask; ratios still as configured
    assert (fixed_validation_mask(spec, sid, seed=4).numpy() != m1).any()
    assert abs(m1[:, 0].mean() - 0.3) < 0.02
    assert abs(m1[:, layout.index("J")].mean() - 0.2) < 0.02


def test_band_masking_hides_bp_only_rp_only_or_both_a_third_each():
    layout = small_layout()
    spec = MaskSpec.from_config(layout, {**SECTION, "xp_masking_ratio": 0.6, "xp_band_masking": True})
    hidden = draw_mask(spec, 30000, torch.Generator().manual_seed(1)).numpy()
    bp = hidden[:, [layout.index(f"bp_{i}") for i in range(1, 5)]]
    rp = hidden[:, [layout.index(f"rp_{i}") for i in range(1, 4)]]
    # a band is hidden whole or not at all
    assert np.all(bp.all(1) == bp.any(1)) and np.all(rp.all(1) == rp.any(1))
    bp, rp = bp[:, 0], rp[:, 0]
    for share in (bp & ~rp, rp & ~bp, bp & rp):
        assert abs(share.mean() - 0.2) < 0.015
    # the same rule in the fixed validation mask
    val = fixed_validation_mask(spec, np.arange(30000, dtype=np.int64), seed=3).numpy()
    vbp, vrp = val[:, layout.index("bp_1")], val[:, layout.index("rp_1")]
    assert abs((vbp & ~vrp).mean() - 0.2) < 0.015 and abs((vbp & vrp).mean() - 0.2) < 0.015


def test_band_masking_falls_back_to_the_pretraining_setting():
    layout = small_layout()
    spec = MaskSpec.from_config(layout, {"xp_masking_ratio": None, "m_masking_ratio": None},
                                fallback={**SECTION, "xp_band_masking": True})
    assert spec.band_indices is not None and spec.n_row_draws == 2
    assert MaskSpec.from_config(layout, SECTION).band_indices is None


def test_band_masking_keeps_columns_moved_into_the_xp_group():
    layout = small_layout()
    section = {**SECTION, "xp_masking_ratio": 0.6, "xp_band_masking": True,
               "group_overrides": {"phot_bp_mean_mag": "xp"}}
    hidden = draw_mask(MaskSpec.from_config(layout, section), 20000, torch.Generator().manual_seed(2)).numpy()
    moved = hidden[:, layout.index("phot_bp_mean_mag")]
    xp_row = hidden[:, layout.index("bp_1")] | hidden[:, layout.index("rp_1")]
    # hidden with the row's XP whichever band goes, never on its own
    np.testing.assert_array_equal(moved, xp_row)
    assert abs(moved.mean() - 0.6) < 0.015


def test_photometry_only_hides_every_xp_column():
    layout = Layout.from_config({"xp": {"bp": 3, "rp": 3, "normalise": "g_flux"},
                                 "gaia_photometry": {"phot_g_mean_mag": None, "phot_bp_mean_mag": None}})
    section = {"xp_masking_ratio": 0.0, "m_masking_ratio": 0.0, "force_mask_cols": ["phot_bp_mean_mag"]}
    plain = MaskSpec.from_config(layout, section)
    only = MaskSpec.from_config(layout, {**section, "photometry_only": True})
    assert set(plain.force_indices) == {layout.index("phot_bp_mean_mag")}
    assert set(only.force_indices) == set(layout.xp_indices) | {layout.index("phot_bp_mean_mag")}


def wide_layout():
    return Layout.from_config({"xp": {"bp": 55, "rp": 55}, "gaia_photometry": {"phot_g_mean_mag": None}})


def test_entry_masking_hides_its_fraction_of_each_band_in_runs_and_singles():
    layout = wide_layout()
    spec = MaskSpec.from_config(layout, {**SECTION, "xp_masking_ratio": 0.0, "xp_entry_masking_ratio": 0.6,
                                         "xp_span": 5})
    hidden = draw_mask(spec, 20000, torch.Generator().manual_seed(1)).numpy()
    bp, rp = hidden[:, :55], hidden[:, 55:110]
    for band in (bp, rp):
        assert abs(band.mean() - 0.6) < 0.01
        assert band.mean(axis=1).std() > 0.05  # rows differ: not one pattern for all
    # runs: neighbours are hidden together more often than independent entries would be; exactly,
    # with p = 1 - sqrt(0.4) each for runs and singles and a pair in one run of 5 four times in five,
    # P(both seen) = (1-p)^2 [0.8 (1-p) + 0.2 (1-p)^2] and P(both hidden) = 1 - 2 (0.4) + P(both seen)
    p = 1 - np.sqrt(1 - 0.6)
    together = (bp[:, :-1] & bp[:, 1:]).mean()
    both_seen = (1 - p) ** 2 * (0.8 * (1 - p) + 0.2 * (1 - p) ** 2)
    assert abs(together - (1 - 0.8 + both_seen)) < 0.01
    assert together > 0.6 ** 2 + 0.05
    # the two bands draw their runs independently
    assert abs((bp[:, 10] & rp[:, 10]).mean() - 0.36) < 0.015
    # photometry keeps its element ratio
    assert abs(hidden[:, 110].mean() - 0.2) < 0.015


def test_entry_masking_off_keeps_the_draws_of_earlier_runs():
    """Without entry masking a generator gives the same masks as before the option existed."""
    layout = wide_layout()
    spec = MaskSpec.from_config(layout, SECTION)
    assert spec.n_row_draws == 1
    a = draw_mask(spec, 64, torch.Generator().manual_seed(3))
    u = torch.rand((64, layout.n_features + 1), generator=torch.Generator().manual_seed(3))
    assert torch.equal(a[:, 0], (u[:, layout.n_features] < 0.3))


def test_entry_masking_is_pretrainings_own_and_validated():
    layout = wide_layout()
    pretrain = {**SECTION, "xp_entry_masking_ratio": 0.5}
    spec = MaskSpec.from_config(layout, {"xp_masking_ratio": None, "m_masking_ratio": None}, fallback=pretrain)
    assert spec.xp_entry_ratio == 0.0  # fine-tuning does not inherit it
    with pytest.raises(MaskingError, match="xp_span"):
        MaskSpec.from_config(layout, {**pretrain, "xp_span": 0})
    fixed = fixed_validation_mask(MaskSpec.from_config(layout, pretrain), np.arange(4000, dtype=np.int64), 5).numpy()
    assert abs(fixed[:, :110][~fixed[:, :110].all(1)].mean() - 0.5) < 0.02
