"""Label catalogues: join by source_id, NaN for missing, duplicates refused, train-only scaling."""

import numpy as np
import pandas as pd
import pytest

from msa.data.labels import LabelError, LabelScaler, LabelSource, label_set

CFG_COLUMNS = {
    "teff": {"value": "teff", "error": "teff_err"},
    "fe_h": {"value": "fe_h", "error": "fe_h_err"},
    "parallax": {"store": "parallax", "error": "parallax_error"},
}


def write_catalogue(path, ids, teff, fe_h):
    pd.DataFrame({"source_id": ids, "teff": teff, "teff_err": np.full(len(ids), 50.0),
                  "fe_h": fe_h, "fe_h_err": np.full(len(ids), 0.02)}).to_csv(path, index=False)


def test_join_by_source_id_in_any_order_with_missing(tmp_path):
    path = tmp_path / "labels.csv"
    write_catalogue(path, [30, 10, 20], [5000.0, 4000.0, 4500.0], [0.1, np.nan, -0.5])
    cfg = {"catalogue": str(path), "columns": CFG_COLUMNS}
    src = LabelSource(cfg, ["teff", "fe_h", "parallax"])
    assert src.store_columns == ["parallax", "parallax_error"]
    ids = np.array([20, 99, 10, 30], dtype=np.int64)  # 99 is not in the catalogue
    store = {"parallax": np.array([1.0, 2.0, 3.0, 4.0]), "parallax_error": np.array([.1, .2, .3, .4])}
    y, y_err = src.lookup(ids, store)
    np.testing.assert_array_equal(y[:, 0], [4500.0, np.nan, 4000.0, 5000.0])
    np.testing.assert_array_equal(y[:, 1], [-0.5, np.nan, np.nan, 0.1])
    np.testing.assert_array_equal(y[:, 2], store["parallax"])
    np.testing.assert_array_equal(y_err[:, 2], store["parallax_error"])
    assert y_err[0, 0] == 50.0 and np.isnan(y_err[1, 0])


def test_duplicates_and_bad_config_raise(tmp_path):
    path = tmp_path / "dup.csv"
    write_catalogue(path, [1, 2, 2], [1.0, 2.0, 3.0], [0.0, 0.0, 0.0])
    with pytest.raises(LabelError, match="duplicate source_id"):
        LabelSource({"catalogue": str(path), "columns": CFG_COLUMNS}, ["teff"])
    with pytest.raises(LabelError, match="cannot read column"):
        LabelSource({"catalogue": str(path), "columns": {"teff": {"value": "TEFF"}}}, ["teff"])
    with pytest.raises(LabelError, match="exactly one"):
        LabelSource({"catalogue": str(path), "columns": {"teff": {"value": "teff", "store": "x"}}}, ["teff"])
    config = {"labels": {"columns": CFG_COLUMNS}, "label_sets": {"spec": ["teff", "logg"]}}
    with pytest.raises(LabelError, match="logg"):
        label_set(config, "spec")


def test_parquet_catalogue(tmp_path):
    path = tmp_path / "labels.parquet"
    pd.DataFrame({"source_id": np.array([5, 6], dtype=np.int64), "teff": [1.0, 2.0],
                  "teff_err": [0.1, 0.2]}).to_parquet(path)
    src = LabelSource({"catalogue": str(path), "columns": CFG_COLUMNS}, ["teff"])
    y, _ = src.lookup(np.array([6, 5]))
    np.testing.assert_array_equal(y[:, 0], [2.0, 1.0])


def test_label_scaler_uses_only_given_rows_and_round_trips():
    rng = np.random.default_rng(0)
    train = np.column_stack([rng.normal(4800, 300, 500), rng.normal(-0.3, 0.4, 500)])
    train[::7, 1] = np.nan
    scaler = LabelScaler.fit(["teff", "fe_h"], train)
    np.testing.assert_allclose(scaler.centre, np.nanmean(train, axis=0))
    np.testing.assert_allclose(scaler.scale, np.nanstd(train, axis=0))
    other = np.array([[6000.0, 0.2]])
    scaled, err = scaler.transform(other, np.array([[30.0, 0.04]]))
    np.testing.assert_allclose(err, [[30.0 / scaler.scale[0], 0.04 / scaler.scale[1]]])
    np.testing.assert_allclose(scaler.inverse(scaled), other)
    q = np.stack([scaled - 1, scaled, scaled + 1], axis=-1)  # (n, L, 3) quantiles
    np.testing.assert_allclose(scaler.inverse(q)[:, :, 1], other)
    with pytest.raises(LabelError, match="fewer than 2"):
        LabelScaler.fit(["a"], np.array([[1.0], [np.nan]]))


def test_label_scaler_fits_log_labels_in_log10_and_inverts_to_linear():
    y = np.array([[1.0, 5000.0], [10.0, 6000.0], [100.0, 7000.0], [-1.0, 5500.0]])
    err = np.array([[0.1, 50.0], [1.0, 50.0], [10.0, 50.0], [1.0, 50.0]])
    scaler = LabelScaler.fit(["age", "teff"], y, log_labels=["age"])
    assert scaler.centre[0] == pytest.approx(1.0) and scaler.centre[1] == pytest.approx(5875.0)
    ys, es = scaler.transform(y, err)
    assert np.isnan(ys[3, 0])  # a non-positive age cannot be a log
    np.testing.assert_allclose(es[:3, 0], 0.1 / np.log(10) / scaler.scale[0])  # 10 % error = 0.0434 dex
    np.testing.assert_allclose(scaler.inverse(ys)[:3], y[:3])
    with pytest.raises(LabelError, match="log_labels"):
        LabelScaler.fit(["teff"], y[:, 1:], log_labels=["age"])


def test_split_samples_are_bounded_seeded_and_order_free(tmp_path):
    """At most max_rows stars per split, the same ones whatever the shard order, each with its own
    inputs and label; every star of the split when it holds fewer (as load_labelled gives them)."""
    from test_batches import identity_transform, make_store

    from msa.data.labels import load_labelled, load_split_samples
    from msa.data.splits import assign_splits

    paths = make_store(tmp_path, n_shards=3, rows=400)  # G is NaN for 5 % of the stars: unlabelled
    source = LabelSource({"columns": {"g": {"store": "phot_g_mean_mag"}}}, ["g"])
    transform = identity_transform()
    splits = {"train": 0.7, "validation": 0.1, "calibration": 0.1, "test": 0.1}
    everything = load_labelled(paths, transform, source)
    split = assign_splits(everything.source_id, splits, 5)
    full = load_split_samples(paths, transform, source, splits, 5, ["train", "test"], None, ["phot_g_mean_mag"])
    for name in ("train", "test"):
        np.testing.assert_array_equal(full[name].source_id, everything.source_id[split == name])
        np.testing.assert_array_equal(full[name].x, everything.x[split == name])

    small = load_split_samples(paths, transform, source, splits, 5, ["train", "test"], 40, ["phot_g_mean_mag"])
    again = load_split_samples(paths[::-1], transform, source, splits, 5, ["train", "test"], 40)
    other_seed = load_split_samples(paths, transform, source, splits, 6, ["train"], 40)
    for name in ("train", "test"):
        part = small[name]
        assert len(part) == 40 and np.all(np.diff(part.source_id) > 0)
        np.testing.assert_array_equal(part.source_id, again[name].source_id)
        rows = np.searchsorted(everything.source_id, part.source_id)
        np.testing.assert_array_equal(split[rows], name)
        np.testing.assert_array_equal(part.x, everything.x[rows])
        np.testing.assert_array_equal(part.y[:, 0], part.extra["phot_g_mean_mag"])
    assert not np.array_equal(small["train"].source_id, other_seed["train"].source_id)


def test_parallax_label_minus_the_lindegren_zero_point():
    """zero_point: lindegren2021 subtracts the published Gaia DR3 fit (the package's own numbers),
    and a star outside it (a 2-parameter solution, a missing colour) has no label."""
    from zero_point import zpt

    zpt.load_tables()
    raw = {"parallax": np.array([1.0, 2.0, 0.5, 3.0]), "parallax_error": np.full(4, 0.1),
           "phot_g_mean_mag": np.array([15.0, 18.0, 12.0, 15.0]),
           "nu_eff_used_in_astrometry": np.array([1.5, 1.6, np.nan, np.nan]),
           "pseudocolour": np.array([np.nan, np.nan, 1.45, 1.5]), "ecl_lat": np.array([10.0, -40.0, 60.0, 0.0]),
           "astrometric_params_solved": np.array([31, 31, 95, 3], dtype=np.float32)}
    columns = {"plx": {"store": "parallax", "error": "parallax_error", "zero_point": "lindegren2021"}}
    source = LabelSource({"columns": columns}, ["plx"])
    assert "pseudocolour" in source.store_columns
    y, y_err = source.lookup(np.arange(4), raw)
    expected = raw["parallax"][:3] - zpt.get_zpt(raw["phot_g_mean_mag"][:3], raw["nu_eff_used_in_astrometry"][:3],
                                                  raw["pseudocolour"][:3], raw["ecl_lat"][:3],
                                                  np.array([31, 31, 95]), _warnings=False)
    np.testing.assert_allclose(y[:3, 0], expected)
    assert np.all(np.abs(y[:3, 0] - raw["parallax"][:3]) > 0.005)  # tens of µas
    assert np.isnan(y[3, 0]) and y_err[3, 0] == 0.1
    with pytest.raises(LabelError, match="zero_point"):
        LabelSource({"columns": {"plx": {"value": "parallax", "zero_point": "lindegren2021"}}, "catalogue": "x.csv"},
                    ["plx"])
