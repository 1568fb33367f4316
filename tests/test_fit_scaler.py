"""fit_scaler: equals scikit-learn's RobustScaler on the same derived rows (with NaN); sampling is
seeded and bounded; the CLI writes a scaler the FeatureTransform accepts."""

import json

import numpy as np
import pytest
import yaml
from sklearn.preprocessing import RobustScaler
from test_batches import make_store, small_features

from msa.cli import main
from msa.data.features import FeatureTransform, derive, store_columns
from msa.data.fit_scaler import choose_shards, fit_scaler, sample_derived
from msa.data.layout import Layout
from msa.data.scaling import Scaler
from msa.data.store import Shard


def all_derived(paths, layout):
    parts = []
    for p in paths:
        with Shard(p) as s:
            parts.append(derive(s.read(store_columns(layout, True)), layout, True)[0])
    return np.concatenate(parts)


def test_equals_sklearn_robust_scaler_with_nan(tmp_path):
    paths = make_store(tmp_path, n_shards=3, rows=400, missing=0.1)
    layout = Layout.from_config(small_features())
    scaler, meta = fit_scaler(paths, layout, True, shards=3, max_rows=10_000, seed=0)
    values = all_derived(paths, layout)
    assert np.isnan(values).any()
    reference = RobustScaler(quantile_range=(25.0, 75.0)).fit(values)
    np.testing.assert_allclose(scaler.centre, reference.center_, rtol=1e-5)
    np.testing.assert_allclose(scaler.scale, reference.scale_, rtol=1e-5)
    assert meta["rows"] == 1200 and meta["shards"] == [p.name for p in paths]


def test_sample_is_seeded_and_bounded(tmp_path):
    paths = make_store(tmp_path, n_shards=4, rows=300)
    layout = Layout.from_config(small_features())
    chosen = choose_shards(paths, 2, seed=5)
    assert chosen == choose_shards(paths, 2, seed=5) and len(chosen) == 2
    assert choose_shards(paths, ["shard-001", "shard-003.h5"], seed=0) == [paths[1], paths[3]]
    with pytest.raises(ValueError, match="shard-009"):
        choose_shards(paths, ["shard-009"], seed=0)
    a, info = sample_derived(chosen, layout, True, max_rows=250, seed=5)
    b, _ = sample_derived(chosen, layout, True, max_rows=250, seed=5)
    c, _ = sample_derived(chosen, layout, True, max_rows=250, seed=6)
    assert a.shape == (250, layout.n_features) and info["rows"] == 250
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(np.nan_to_num(a), np.nan_to_num(c))
    # every sampled row is a real row of the chosen shards
    full = all_derived(chosen, layout)
    full_rows = {tuple(np.nan_to_num(r, nan=-9e9)) for r in full}
    assert all(tuple(np.nan_to_num(r, nan=-9e9)) in full_rows for r in a)


def test_constant_and_empty_features_get_scale_one(tmp_path):
    paths = make_store(tmp_path, n_shards=1, rows=200, missing=0.0)
    with Shard(paths[0]) as s:
        cols = s.read(s.columns)
    cols["phot_bp_mean_mag"] = np.full(200, 3.0)
    cols["phot_rp_mean_mag"] = np.full(200, np.nan)
    from msa.data.store import write_shard
    write_shard(paths[0], cols)
    layout = Layout.from_config(small_features())
    scaler, _ = fit_scaler(paths, layout, True, shards=1, max_rows=1000, seed=0)
    j_bp, j_rp = layout.index("phot_bp_mean_mag"), layout.index("phot_rp_mean_mag")
    assert scaler.scale[j_bp] == 1.0 and scaler.centre[j_bp] == 3.0
    assert scaler.scale[j_rp] == 1.0 and scaler.centre[j_rp] == 0.0


def test_cli_writes_scaler_with_meta(tmp_path):
    paths = make_store(tmp_path, n_shards=3, rows=200)
    cfg = {"seed": 9, "features": small_features(), "scaler": {"shards": 2, "max_rows": 300}}
    cfg_path = tmp_path / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    out = tmp_path / "scaler.json"
    assert main(["fit-scaler", "--config", str(cfg_path), "--shards", *map(str, paths), "--out", str(out)]) == 0
    meta = json.loads(out.read_text())["meta"]
    assert meta["seed"] == 9 and meta["rows"] == 300 and len(meta["shards"]) == 2 and meta["config_hash"]
    scaler = Scaler.load(out)
    FeatureTransform(Layout.from_config(small_features()), scaler, True)  # layout matches


def test_scaler_for_reordered_features_names_the_position():
    from msa.data.scaling import Scaler, ScalerError

    layout = Layout.from_config({"gaia_photometry": {"phot_g_mean_mag": None, "phot_bp_mean_mag": None}})
    scaler = Scaler.from_stats(["phot_bp_mean_mag", "phot_g_mean_mag"], [0, 0], [1, 1])
    with pytest.raises(ScalerError, match=r"another order \(position 0: 'phot_bp_mean_mag' vs 'phot_g_mean_mag'\)"):
        scaler.check_layout(layout)
