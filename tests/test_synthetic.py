"""The synthetic sky: Archive-format files, known truth, determinism and learnable physics.

The files are parsed here with plain pandas (not msa.data.gaia), so these tests check the generator
independently of the readers.
"""

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from msa.config import validate
from msa.data.healpix import pixel_centres, source_id_to_pixel
from msa.data.layout import Layout
from msa.data.synthetic import (LABEL_COLUMNS, N_COEFF, N_CORRELATIONS, SOURCE_COLUMNS, XP_LIMIT_MAG,
                                synthetic_config, write_sky, xp_column_names)

N_STARS = 1500


def parse_lists(column: pd.Series) -> np.ndarray:
    """'"(v1, v2, ...)"' strings → (n, k) float64, the slow obvious way."""
    return np.array([np.array(v.strip("()").split(","), dtype=float) for v in column])


@pytest.fixture(scope="module")
def sky(tmp_path_factory):
    return write_sky(tmp_path_factory.mktemp("sky"), N_STARS, n_shards=3, seed=11)


@pytest.fixture(scope="module")
def tables(sky):
    xp = pd.concat([pd.read_csv(p) for p in sky.xp_paths], ignore_index=True)
    source = pd.concat([pd.read_csv(p) for p in sky.source_paths], ignore_index=True)
    tmass = pd.concat([pd.read_csv(p) for p in sky.tmass_paths], ignore_index=True)
    labels = pd.read_csv(sky.labels_path)
    return xp, source, tmass, labels


def test_files_have_the_archive_schemas(sky, tables):
    xp, source, tmass, labels = tables
    assert list(xp.columns) == xp_column_names(correlations=False)
    assert list(source.columns) == list(SOURCE_COLUMNS)
    assert list(tmass.columns) == ["source_id", "j_m", "h_m", "ks_m", "j_msigcom", "h_msigcom", "ks_msigcom"]
    assert list(labels.columns) == list(LABEL_COLUMNS)
    first = xp["bp_coefficients"].iloc[0]
    assert first.startswith("(") and first.endswith(")") and ", " in first
    assert parse_lists(xp["rp_coefficient_errors"]).shape == (len(xp), N_COEFF)
    assert sky.shards == ["s000", "s001", "s002"]


def test_counts_ids_and_shard_order(sky, tables):
    xp, source, tmass, labels = tables
    assert len(source) == len(labels) == N_STARS == sum(sky.shard_rows)
    sid = source["source_id"].to_numpy()
    assert sid.dtype == np.int64
    assert np.all(np.diff(sid) > 0), "ids ascend within and across shards"
    assert np.all(sid > 2**53) and np.all(sid % 2 == 0)
    assert set(xp["source_id"]) <= set(sid) and set(tmass["source_id"]) <= set(sid)
    # each shard's id range lies entirely before the next one's
    ranges = [pd.read_csv(p, usecols=["source_id"])["source_id"].agg(["min", "max"]) for p in sky.source_paths]
    assert all(a["max"] < b["min"] for a, b in zip(ranges, ranges[1:]))


def test_positions_lie_in_the_pixel_the_source_id_encodes(tables):
    _, source, _, _ = tables
    pixel_of_id = source_id_to_pixel(source["source_id"].to_numpy(), 9)
    ra, dec = pixel_centres(pixel_of_id, 9)
    # a level-9 pixel is ~7 arcmin wide: each star must sit within its own pixel's reach
    assert np.all(np.abs(source["dec"].to_numpy() - dec) < 0.12)
    dra = np.abs((source["ra"].to_numpy() - ra + 180.0) % 360.0 - 180.0) * np.cos(np.radians(dec))
    assert np.all(dra < 0.12)


def test_faint_stars_have_no_xp(sky, tables):
    xp, source, _, _ = tables
    faint = source["phot_g_mean_mag"] > XP_LIMIT_MAG
    assert 0.15 < faint.mean() < 0.35
    assert set(xp["source_id"]) == set(source.loc[~faint, "source_id"])
    assert len(xp) == sky.n_with_xp


def test_truth_and_noise_models(tables):
    xp, source, tmass, labels = tables
    m = source.merge(labels, on="source_id")
    assert labels[["teff", "logg", "fe_h", "alpha_m", "age", "parallax_true"]].notna().all().all()
    assert m["teff"].between(3000, 8000).all() and m["age"].between(0.3, 14).all()
    # Gaia parallax = truth + N(0, parallax_error): pulls are unit normal
    pull = (m["parallax"] - m["parallax_true"]) / m["parallax_error"]
    assert abs(pull.mean()) < 0.1 and 0.9 < pull.std() < 1.1
    # errors grow with magnitude
    assert np.corrcoef(m["phot_g_mean_mag"], np.log(m["parallax_error"]))[0, 1] > 0.95
    bright = xp.merge(source, on="source_id")
    rel = parse_lists(bright["bp_coefficient_errors"])[:, 0] / parse_lists(bright["bp_coefficients"])[:, 0]
    assert np.corrcoef(bright["phot_g_mean_mag"], np.log(rel))[0, 1] > 0.9
    # 2MASS lists only stars with J < 16.5 (printed to 3 decimals)
    assert (tmass["j_m"] <= 16.5).all() and len(tmass) < len(source)


def test_correlation_columns_when_asked(tmp_path):
    sky = write_sky(tmp_path, 40, seed=2, correlations=True)
    xp = pd.read_csv(sky.xp_paths[0])
    assert list(xp.columns) == xp_column_names(correlations=True)
    assert parse_lists(xp["bp_coefficient_correlations"]).shape == (len(xp), N_CORRELATIONS)


def test_same_seed_same_bytes_other_seed_other_stars(tmp_path):
    a = write_sky(tmp_path / "a", 200, n_shards=2, seed=5)
    b = write_sky(tmp_path / "b", 200, n_shards=2, seed=5)
    c = write_sky(tmp_path / "c", 200, n_shards=2, seed=6)

    def digest(paths):
        # compare decompressed content: gzip headers carry a timestamp
        return [hashlib.sha256(pd.read_csv(p).to_csv().encode()).hexdigest() for p in paths]

    for attr in ("xp_paths", "source_paths", "tmass_paths"):
        assert digest(getattr(a, attr)) == digest(getattr(b, attr))
    assert digest([a.labels_path]) == digest([b.labels_path])
    assert digest([a.labels_path]) != digest([c.labels_path])


def test_fe_h_is_learnable_from_normalised_xp(sky, tables):
    xp, source, _, labels = tables
    m = xp.merge(source, on="source_id").merge(labels, on="source_id")
    m = m[m["phot_g_mean_mag"] < 16.5].reset_index(drop=True)
    flux_to_g15 = 10 ** (0.4 * (m["phot_g_mean_mag"].to_numpy() - 15.0))
    x = np.hstack([parse_lists(m["bp_coefficients"]), parse_lists(m["rp_coefficients"])]) * flux_to_g15[:, None]
    x = np.hstack([x, np.ones((len(m), 1))])
    y = m["fe_h"].to_numpy()
    train = np.arange(len(m)) % 2 == 0
    w, *_ = np.linalg.lstsq(x[train], y[train], rcond=None)
    rms_fit = np.sqrt(np.mean((y[~train] - x[~train] @ w) ** 2))
    rms_mean = np.sqrt(np.mean((y[~train] - y[train].mean()) ** 2))
    assert rms_fit < 0.5 * rms_mean


def test_config_validates_and_points_at_the_files(sky, tmp_path):
    cfg = validate(synthetic_config(sky.out_dir, tmp_path / "results"))
    assert cfg["ingest"]["xp"].format(shard="s001") == str(sky.xp_paths[1])
    assert cfg["ingest"]["surveys"]["tmass"]["path"].format(shard="s000") == str(sky.tmass_paths[0])
    assert cfg["ingest"]["surveys"]["tmass"]["errors"]["j_msigcom"] == "J_err"
    assert cfg["labels"]["columns"]["parallax"]["value"] == "parallax_true"
    assert set(cfg["label_sets"]) == {"spectro", "age", "parallax"}
    layout = Layout.from_config(cfg["features"])
    assert layout.features[layout.index("phot_g_mean_mag")].error == "phot_g_mean_mag_error"
    assert layout.features[layout.index("parallax")].error == "parallax_error"
    assert layout.n_features == 110 + 3 + 3 + 1


def test_cli_writes_sky_and_config(tmp_path):
    from msa.cli import main
    from msa.config import load_config

    rc = main(["synthesize", "--out", str(tmp_path / "sky"), "--n-stars", "30", "--n-shards", "2",
               "--seed", "1", "--write-config", str(tmp_path / "cfg.yaml")])
    assert rc == 0
    cfg = load_config(tmp_path / "cfg.yaml")
    assert (tmp_path / "sky" / "GaiaSource_s001.csv.gz").exists()
    assert cfg["ingest"]["source"].endswith("GaiaSource_{shard}.csv.gz")


def test_a_killed_synthesize_leaves_no_complete_looking_file(tmp_path, monkeypatch):
    """Every file goes through msa.data.store.atomic_path: a write cut short leaves nothing at the name."""
    def write_half_then_die(frame, path, *args, **kwargs):
        Path(path).write_text("source_id\n1\n")
        raise OSError("disk full")

    monkeypatch.setattr(pd.DataFrame, "to_csv", write_half_then_die)
    with pytest.raises(OSError, match="disk full"):
        write_sky(tmp_path / "sky", n_stars=40, n_shards=1, seed=1)
    assert not [p.name for p in (tmp_path / "sky").iterdir() if not p.name.startswith("XpContinuous")]
