"""Layout: built from the config's features section, validated, round-tripped and compared."""

import json

import pytest

from msa.data.layout import Layout, LayoutError

BASE = {
    "xp": {"bp": 3, "rp": 2},
    "gaia_photometry": {"phot_g_mean_mag": "phot_g_mean_mag_error", "phot_bp_mean_mag": None},
    "survey_photometry": {"J": "J_err"},
    "astrometry": {"parallax": "parallax_error"},
    "force_mask": ["parallax"],
}


def test_from_config_order_groups_and_errors():
    layout = Layout.from_config(BASE)
    assert layout.names == ["bp_1", "bp_2", "bp_3", "rp_1", "rp_2", "phot_g_mean_mag", "phot_bp_mean_mag",
                            "J", "parallax"]
    assert layout.features[0].error == "bpe_1" and layout.features[4].error == "rpe_2"
    assert layout.features[layout.index("phot_bp_mean_mag")].error is None
    assert layout.xp_indices.tolist() == [0, 1, 2, 3, 4]
    assert layout.group_indices("astrometry").tolist() == [8]
    assert layout.group_indices("context").tolist() == []
    assert layout.force_mask_indices.tolist() == [8]
    assert layout.groups == ["xp", "gaia_photometry", "survey_photometry", "astrometry"]


def test_duplicate_feature_is_rejected():
    cfg = {**BASE, "astrometry": {"J": None}}
    with pytest.raises(LayoutError, match=r"duplicate feature names \['J'\]"):
        Layout.from_config(cfg)


def test_error_equal_to_its_feature_is_rejected():
    # the upstream fault: an "error" column that is a copy of the feature itself
    cfg = {**BASE, "survey_photometry": {"J": "J"}}
    with pytest.raises(LayoutError, match=r"error column of 'J' is 'J' itself"):
        Layout.from_config(cfg)


def test_error_that_is_another_input_is_rejected():
    cfg = {**BASE, "survey_photometry": {"J": "phot_bp_mean_mag"}}
    with pytest.raises(LayoutError, match=r"'J' uses feature 'phot_bp_mean_mag' as its error column"):
        Layout.from_config(cfg)


def test_unknown_force_mask_column_is_rejected():
    with pytest.raises(LayoutError, match=r"force_mask: unknown feature\(s\) \['pmra'\]"):
        Layout.from_config({**BASE, "force_mask": ["pmra"]})


def test_bad_xp_count_and_group_shape_are_rejected():
    with pytest.raises(LayoutError, match=r"features.xp.bp: 56 coefficients"):
        Layout.from_config({**BASE, "xp": {"bp": 56}})
    with pytest.raises(LayoutError, match=r"features.astrometry: expected a mapping"):
        Layout.from_config({**BASE, "astrometry": ["parallax"]})
    with pytest.raises(LayoutError, match=r"no input features"):
        Layout.from_config({"xp": {"bp": 0, "rp": 0}})
    with pytest.raises(LayoutError, match=r"unknown group\(s\) \['spectra'\]"):
        Layout.from_config({**BASE, "reconstruct": ["xp", "spectra"]})


def test_to_dict_from_dict_round_trip_through_json():
    layout = Layout.from_config({**BASE, "reconstruct": ["xp", "astrometry"]})
    again = Layout.from_dict(json.loads(json.dumps(layout.to_dict())))
    assert again == layout
    assert again.reconstruct_indices.tolist() == [0, 1, 2, 3, 4, 8]


def test_diff_names_what_differs():
    a = Layout.from_config(BASE)
    fewer = Layout.from_config({**BASE, "astrometry": {}, "force_mask": []})
    msg = a.diff(fewer)
    assert "features only in the first layout: ['parallax']" in msg and "force_mask ['parallax'] vs []" in msg
    assert "features only in the second layout: ['parallax']" in fewer.diff(a)

    swapped = Layout.from_config({**BASE, "gaia_photometry": {"phot_bp_mean_mag": None,
                                                              "phot_g_mean_mag": "phot_g_mean_mag_error"}})
    assert "different order (first difference at position 5: 'phot_g_mean_mag' vs 'phot_bp_mean_mag')" \
        in a.diff(swapped)

    other_error = Layout.from_config({**BASE, "survey_photometry": {"J": "J_sigma"}})
    assert "J: group/error survey_photometry/J_err vs survey_photometry/J_sigma" in a.diff(other_error)

    other_recon = Layout.from_config({**BASE, "reconstruct": ["xp"]})
    assert "reconstruct" in a.diff(other_recon) and "['xp']" in a.diff(other_recon)


def test_require_same_refuses_a_config_the_models_were_not_trained_with():
    trained = Layout.from_config(BASE)
    Layout.from_config(dict(BASE)).require_same(trained, "the members")
    with pytest.raises(LayoutError, match=r"layout of the members: features only in the first layout: \['K'\]"):
        Layout.from_config({**BASE, "survey_photometry": {"J": "J_err", "K": "K_err"}}).require_same(
            trained, "the members")


def test_index_of_unknown_feature_names_it():
    with pytest.raises(LayoutError, match=r"feature 'G' is not in the layout"):
        Layout.from_config(BASE).index("G")


def test_colours_relative_to_a_magnitude():
    import numpy as np

    from msa.data.features import derive

    cfg = {"xp": {"bp": 1, "rp": 0}, "gaia_photometry": {"phot_g_mean_mag": None, "phot_bp_mean_mag": None},
           "survey_photometry": {"K": None}, "astrometry": {"parallax": None},
           "colours_relative_to": "phot_g_mean_mag"}
    layout = Layout.from_config(cfg)
    assert [layout.names[i] for i in layout.colour_indices] == ["phot_bp_mean_mag", "K"]
    raw = {"bp_1": np.array([1.0, 2.0]), "bpe_1": np.array([0.1, 0.1]), "phot_g_mean_mag": np.array([15.0, 12.0]),
           "phot_bp_mean_mag": np.array([15.5, 13.0]), "K": np.array([13.0, np.nan]),
           "parallax": np.array([1.0, 2.0])}
    values, _ = derive(raw, layout, normalise_xp=False)
    np.testing.assert_allclose(values[:, layout.index("phot_bp_mean_mag")], [0.5, 1.0])
    np.testing.assert_allclose(values[:, layout.index("K")], [-2.0, np.nan])  # missing stays missing
    np.testing.assert_allclose(values[:, layout.index("phot_g_mean_mag")], [15.0, 12.0])
    np.testing.assert_allclose(values[:, layout.index("parallax")], [1.0, 2.0])  # not a magnitude
    plain = Layout.from_config({**cfg, "colours_relative_to": None})
    assert "colours relative to" in layout.diff(plain)
    assert Layout.from_dict(json.loads(json.dumps(layout.to_dict()))) == layout
    with pytest.raises(LayoutError, match="colours_relative_to"):
        Layout.from_config({**cfg, "colours_relative_to": "parallax"})
