"""msa catalog: prediction files → HATS catalogue (read back by LSDB, hats, astropy) + summary + figures."""

from __future__ import annotations

import json
import re
import shutil
import warnings
from datetime import datetime, timedelta, timezone
from pathlib import Path

import astropy.units as u
import hats
import lsdb
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from astropy.coordinates import SkyCoord
from astropy.table import Table
from hats.io.validation import is_valid_catalog
from hats.pixel_math.spatial_index import compute_spatial_index

from msa.calibration.ensemble import Ensemble
from msa.catalogue.catalog import CatalogError, build_catalog, output_paths, partition_file
from msa.catalogue.predict import predict_shard
from msa.cli import main
from msa.data.store import write_shard
from test_ensemble import FEATURES_CFG, LABELS, small_layout, unit_scaler, write_member
from test_predict import CALIBRATION, star_columns

torch.set_num_threads(1)

DEMO_SOURCE = Path(__file__).resolve().parents[1] / "resources" / "demo" / "GaiaSource_demo.csv.gz"
# small partitions, so 1,200 stars make partitions of several orders
OPTIONS = dict(max_rows_per_partition=60, highest_order=7, sky_map_level=3, sky_map_label="teff")


@pytest.fixture(scope="module")
def predictions(tmp_path_factory):
    """Two prediction files of real Gaia stars (source_id, ra, dec), from a small random ensemble."""
    tmp = tmp_path_factory.mktemp("predictions")
    layout = small_layout()
    scaler = unit_scaler(layout)
    members = [write_member(tmp / f"m{k}.pt", layout, scaler, seed=k, label_centre=[4800.0, 2.5, 1.0],
                            label_scale=[700.0, 1.0, 0.4], label_set="spectro") for k in range(2)]
    ensemble = Ensemble.load(members)
    demo = pd.read_csv(DEMO_SOURCE, usecols=["source_id", "ra", "dec"]).sort_values("source_id").iloc[:1200]
    files = []
    for i, part in enumerate(np.array_split(np.arange(len(demo)), 2)):
        cols = star_columns(len(part), seed=i)
        for c in ("source_id", "ra", "dec"):
            cols[c] = demo[c].to_numpy()[part]
        shard = tmp / f"shard-{i}.h5"
        write_shard(shard, cols)
        out = tmp / f"pred-{i}.parquet"
        predict_shard(shard, ensemble, CALIBRATION, out, chunk_rows=256, batch_size=256, min_inputs=3,
                      metadata={"label_set": "spectro", "labels": json.dumps(LABELS),
                                "units": json.dumps({"teff": "K", "logg": "dex", "parallax": "mas"}),
                                "member_sha256": json.dumps(ensemble.checksums), "calibration_sha256": "abc",
                                "config_hash": "0123", "msa_version": "test"})
        files.append(out)
    return {"files": files, "demo": demo, "members": members, "ensemble": ensemble, "dir": tmp}


@pytest.fixture(scope="module")
def catalogue(predictions, tmp_path_factory):
    out = tmp_path_factory.mktemp("built") / "catalog" / "spectro"
    summary = build_catalog(predictions["files"], out, "spectro", **OPTIONS)
    return {"path": out, "summary": summary}


def inputs_frame(files) -> pd.DataFrame:
    return pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)


def as_comparable(frame: pd.DataFrame) -> pd.DataFrame:
    """NumPy columns, strings as Python str (LSDB gives pyarrow dtypes and pandas StringDtype), by source_id."""
    frame = pd.DataFrame({c: frame[c].to_numpy() for c in frame.columns})
    frame["calibration_group"] = frame["calibration_group"].astype(str).astype(object)
    return frame.set_index("source_id").sort_index()


def test_lsdb_opens_every_star_with_positions_and_predictions(predictions, catalogue):
    cat = lsdb.read_hats(catalogue["path"])
    frame = as_comparable(pd.DataFrame(cat.compute()))
    ref = as_comparable(inputs_frame(predictions["files"]))
    assert len(frame) == len(ref) == catalogue["summary"]["n_rows"] == 1200
    pd.testing.assert_frame_equal(frame[ref.columns], ref, check_dtype=False)
    # adaptive partitions: several orders, none above the row limit
    pixels = cat.get_healpix_pixels()
    assert len({p.order for p in pixels}) > 1 and len(pixels) == catalogue["summary"]["n_partitions"]
    assert hats.read_hats(catalogue["path"]).catalog_info.total_rows == 1200


def test_partition_files_hold_their_pixels_stars_sorted(catalogue, predictions):
    n = 0
    for part in catalogue["path"].glob("dataset/Norder=*/Dir=*/Npix=*.parquet"):
        order = int(part.parent.parent.name.split("=")[1])
        pixel = int(part.stem.split("=")[1])
        index = pq.read_table(part, columns=["_healpix_29"]).column(0).to_numpy()
        assert len(index) <= OPTIONS["max_rows_per_partition"] and np.all(np.diff(index) >= 0)
        assert np.all(index >> (2 * (29 - order)) == pixel)
        n += len(index)
    assert n == 1200
    # _healpix_29 comes from ra/dec; for Gaia its level-12 part is the pixel that source_id encodes
    frame = pd.concat([pd.read_parquet(p) for p in catalogue["path"].glob("dataset/Norder=*/Dir=*/*.parquet")])
    same = (frame["_healpix_29"].to_numpy() >> 34) == (frame["source_id"].to_numpy() // 2**35)
    assert same.mean() > 0.99
    assert (catalogue["path"] / "dataset" / "_metadata").exists()
    assert (catalogue["path"] / "dataset" / "_common_metadata").exists()
    assert not [p for p in catalogue["path"].parent.iterdir() if p.name.startswith(".")]  # no temporaries


def test_cone_search_returns_exactly_the_stars_within_the_radius(catalogue, predictions):
    demo = predictions["demo"]
    centre = demo.iloc[len(demo) // 2]
    radius = 4 * u.deg
    found = pd.DataFrame(lsdb.read_hats(catalogue["path"]).cone_search(
        ra=centre["ra"], dec=centre["dec"], radius_arcsec=radius.to_value(u.arcsec)).compute())
    separation = SkyCoord(demo["ra"].to_numpy() * u.deg, demo["dec"].to_numpy() * u.deg).separation(
        SkyCoord(centre["ra"] * u.deg, centre["dec"] * u.deg))
    expected = set(demo["source_id"][separation < radius].tolist())
    assert len(expected) > 5 and set(found["source_id"].tolist()) == expected


def test_crossmatch_with_a_gaia_table_finds_the_right_stars(catalogue, predictions):
    demo = predictions["demo"].iloc[::37]
    rng = np.random.default_rng(3)
    # a "Gaia" table of the same stars, positions moved by up to 0.3 arcsec
    gaia = pd.DataFrame({"gaia_id": demo["source_id"].to_numpy(),
                         "ra": demo["ra"].to_numpy() + rng.uniform(-0.2, 0.2, len(demo)) / 3600,
                         "dec": demo["dec"].to_numpy() + rng.uniform(-0.2, 0.2, len(demo)) / 3600})
    gaia_cat = lsdb.from_dataframe(gaia, ra_column="ra", dec_column="dec")
    matched = pd.DataFrame(lsdb.read_hats(catalogue["path"]).crossmatch(
        gaia_cat, radius_arcsec=1.0, n_neighbors=1, suffixes=("", "_gaia")).compute())
    assert len(matched) == len(gaia)
    np.testing.assert_array_equal(matched["source_id"].to_numpy(), matched["gaia_id_gaia"].to_numpy())


def test_astropy_reads_units_and_descriptions_from_a_partition(catalogue, predictions):
    part = next(catalogue["path"].glob("dataset/Norder=*/Dir=*/Npix=*.parquet"))
    t = Table.read(part, format="parquet")
    assert t["teff_q50"].unit == u.K and t["logg_q16"].unit == u.dex and t["ra"].unit == u.deg
    assert "teff_lower" in t["teff_q16"].description and "84th" in t["teff_q84"].description
    # the same in the Arrow field metadata, and the model identity on the file
    schema = pq.read_schema(part)
    assert schema.field("teff_q50").metadata[b"unit"] == b"K"
    assert json.loads(schema.metadata[b"member_sha256"]) == predictions["ensemble"].checksums


def test_astropy_reads_provenance_and_ucds_without_a_warning(catalogue, predictions):
    part = next(catalogue["path"].glob("dataset/Norder=*/Dir=*/Npix=*.parquet"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # astropy warned "No table::len::calibration_group" on every read
        t = Table.read(part, format="parquet")
    assert t.meta["msa_version"] == "test" and t.meta["config_hash"] == "0123"
    assert t.meta["data_release"] == "Gaia DR3" and t.meta["label_set"] == "spectro"
    assert re.fullmatch(r"([0-9a-f]{40}(-modified)?|unknown)", t.meta["msa_git_commit"])
    assert abs(datetime.now(timezone.utc) - datetime.fromisoformat(t.meta["creation_date"])) < timedelta(days=1)
    # every column has a UCD, in astropy's column meta and in the Arrow field metadata
    schema = pq.read_schema(part)
    for name in t.colnames:
        assert t[name].meta["ucd"] == schema.field(name).metadata[b"ucd"].decode() != ""
    assert t["ra"].meta["ucd"] == "pos.eq.ra;meta.main" and t["dec"].meta["ucd"] == "pos.eq.dec;meta.main"
    assert t["source_id"].meta["ucd"] == "meta.id;meta.main"
    assert t["teff_q50"].meta["ucd"] == "phys.temperature.effective"
    assert t["teff_q16"].meta["ucd"] == "phys.temperature.effective;stat.min"
    assert t["logg_q84"].meta["ucd"] == "phys.gravity;stat.max" and t["parallax_q50"].meta["ucd"] == "pos.parallax"
    assert t["calibration_group"].dtype.itemsize // 4 == max(len(g) for g in t["calibration_group"])


def test_properties_carry_hats_provenance_and_the_skymap_order(catalogue):
    text = (catalogue["path"] / "properties").read_text()
    props = dict(line.split("=", 1) for line in text.splitlines() if "=" in line and not line.startswith("#"))
    assert props["hats_builder"].startswith("msa v") and "hats v" in props["hats_builder"]
    assert props["hats_version"].startswith("v") and props["hats_creation_date"].startswith(
        datetime.now(timezone.utc).strftime("%Y-"))
    assert int(props["hats_skymap_order"]) == OPTIONS["highest_order"]
    size_kb = sum(f.stat().st_size for f in catalogue["path"].rglob("*") if f.is_file()) / 1024
    assert 0.5 * size_kb < int(props["hats_estsize"]) <= size_kb
    # the sky fraction of the order-7 pixels holding a star
    index = np.concatenate([pq.read_table(f, columns=["_healpix_29"]).column(0).to_numpy()
                            for f in catalogue["path"].glob("dataset/Norder=*/Dir=*/Npix=*.parquet")])
    pixels = set((index >> (2 * (29 - 7))).tolist())
    assert float(props["moc_sky_fraction"]) == pytest.approx(len(pixels) / (12 * 4**7), rel=1e-4)
    assert hats.read_hats(catalogue["path"]).catalog_info.skymap_order == OPTIONS["highest_order"]


def distance_to_pixel_deg(ra, dec, order: int, pixel: int) -> np.ndarray:
    """Angular distance (deg) of points to a nested pixel's boundary, sampled every ~1/256 of a side:
    at most half a sample spacing (~0.1 arcmin at order 3) above the true distance."""
    import healpy

    vec = healpy.boundaries(2**order, pixel, step=256, nest=True)  # (3, 4·step) along the edges
    points = healpy.ang2vec(np.asarray(ra), np.asarray(dec), lonlat=True)
    return np.degrees(np.arccos(np.clip(points @ vec, -1, 1)).min(axis=1))


@pytest.fixture(scope="module")
def wide_margin(predictions, tmp_path_factory):
    """A catalogue with a 300 arcsec margin (order-8 margin pixels), so 1,200 stars fill it."""
    out = tmp_path_factory.mktemp("margin") / "catalog" / "spectro"
    summary = build_catalog(predictions["files"], out, "spectro", **OPTIONS, margin_threshold_arcsec=300.0)
    return {"path": out, "margin": out.parent / "spectro_margin", "summary": summary}


def test_margin_holds_every_star_within_the_threshold_of_a_partition(wide_margin):
    import healpy

    margin = hats.read_hats(wide_margin["margin"])
    assert margin.catalog_info.catalog_type == "margin" and margin.catalog_info.margin_threshold == 300.0
    assert is_valid_catalog(wide_margin["margin"], strict=True)
    stars = pd.concat([pd.read_parquet(f) for f in wide_margin["path"].glob("dataset/Norder=*/Dir=*/*.parquet")])
    n_margin = 0
    for pixel in lsdb.read_hats(wide_margin["path"]).get_healpix_pixels():
        inside = (stars["_healpix_29"].to_numpy() >> (2 * (29 - pixel.order))) == pixel.pixel
        outside = stars[~inside]
        near = distance_to_pixel_deg(outside["ra"], outside["dec"], pixel.order, pixel.pixel) < 300 / 3600
        file = partition_file(wide_margin["margin"], pixel.order, pixel.pixel)
        held = pd.read_parquet(file) if file.exists() else outside.iloc[:0]
        assert set(outside["source_id"][near]) <= set(held["source_id"])  # every star within the threshold
        assert not set(held["source_id"]) & set(stars["source_id"][inside])  # none of its own
        # and none much farther: an order-8 margin pixel is at most ~0.23 deg across
        assert np.all(distance_to_pixel_deg(held["ra"], held["dec"], pixel.order, pixel.pixel) <
                      300 / 3600 + 2 * np.degrees(healpy.max_pixrad(2**8)))
        assert held["source_id"].is_unique
        n_margin += len(held)
    assert n_margin == wide_margin["summary"]["margin"]["n_rows"] > 50


def test_lsdb_crossmatch_with_the_margin_cache_finds_partners_across_partition_edges(wide_margin, predictions):
    """Points 150 arcsec from catalogue stars, matched within 200 arcsec: a point that falls in
    another partition than its star is found only through the margin."""
    demo = predictions["demo"]
    rng = np.random.default_rng(5)
    angle = rng.uniform(0, 2 * np.pi, len(demo))
    centre = SkyCoord(demo["ra"].to_numpy() * u.deg, demo["dec"].to_numpy() * u.deg)
    moved = centre.directional_offset_by(angle * u.rad, 150 * u.arcsec)
    points = pd.DataFrame({"point_id": demo["source_id"].to_numpy(), "ra": moved.ra.deg, "dec": moved.dec.deg})
    left = lsdb.from_dataframe(points, ra_column="ra", dec_column="dec")
    right = lsdb.read_hats(wide_margin["path"], margin_cache=wide_margin["margin"])
    assert right.margin is not None
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # "Right catalog does not have a margin cache"
        matched = pd.DataFrame(left.crossmatch(right, radius_arcsec=200, n_neighbors=1,
                                               suffixes=("", "_msa")).compute())
    # the nearest catalogue star of each point within 200 arcsec, by brute force
    index, separation, _ = moved.match_to_catalog_sky(centre)
    expected = dict(zip(points["point_id"][separation < 200 * u.arcsec],
                        demo["source_id"].to_numpy()[index][separation < 200 * u.arcsec]))
    assert dict(zip(matched["point_id"], matched["source_id_msa"])) == expected
    # the test needs the margin: some points lie in another partition than their star
    partitions = lsdb.read_hats(wide_margin["path"]).get_healpix_pixels()
    own = {sid: p for p in partitions for sid in pd.read_parquet(
        partition_file(wide_margin["path"], p.order, p.pixel), columns=["source_id"])["source_id"]}
    point_pixel = compute_spatial_index(points["ra"], points["dec"])
    across = [not (int(h) >> (2 * (29 - own[s].order))) == own[s].pixel
              for h, s in zip(point_pixel, points["point_id"]) if s in expected.values()]
    assert sum(across) >= 3


def test_summary_and_figures(predictions, catalogue):
    paths = output_paths(catalogue["path"], "spectro")
    on_disk = json.loads(paths["summary"].read_text())
    assert on_disk["n_rows"] == catalogue["summary"]["n_rows"]
    ref = inputs_frame(predictions["files"])
    assert on_disk["fraction_without_xp"] == pytest.approx(np.mean(~ref["has_xp"]))
    assert on_disk["fraction_flagged"] == pytest.approx(np.mean(ref["flag_too_few_inputs"])) and \
        on_disk["fraction_flagged"] > 0
    q50 = ref["logg_q50"].dropna().to_numpy(np.float64)  # small catalogue: the sample is every star
    assert on_disk["per_label"]["logg"]["q50_percentiles"]["p16"] == pytest.approx(np.percentile(q50, 16))
    assert on_disk["per_label"]["teff"]["unit"] == "K"
    assert on_disk["model"]["member_sha256"] == json.dumps(predictions["ensemble"].checksums)
    assert on_disk["sky_map_pixels"] > 10
    for key in ("skymap", "distributions", "kiel"):
        assert paths[key].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and paths[key].stat().st_size > 5000


def test_sky_map_pixels_hold_the_median_of_their_stars(predictions):
    from msa.catalogue.catalog import full_sky_map
    import healpy

    sky = full_sky_map({5: 1.0, 7: 2.5}, 1)
    assert len(sky) == 48 and sky[5] == 1.0 and sky[7] == 2.5 and np.sum(sky != healpy.UNSEEN) == 2


def test_duplicate_stars_across_inputs_are_refused(predictions, tmp_path):
    out = tmp_path / "catalog" / "spectro"
    with pytest.raises(CatalogError, match="more than once"):
        build_catalog([*predictions["files"], predictions["files"][0]], out, "spectro", **OPTIONS)
    assert not out.exists() and not list(out.parent.iterdir())


def test_inputs_without_positions_are_refused(predictions, tmp_path):
    bare = tmp_path / "bare.parquet"
    pq.write_table(pq.read_table(predictions["files"][0]).drop_columns(["ra", "dec"]), bare)
    with pytest.raises(CatalogError, match=r"bare.parquet has no column\(s\) \['ra', 'dec'\].*Re-run `msa predict`"):
        build_catalog([bare], tmp_path / "cat" / "spectro", "spectro", **OPTIONS)
    assert not (tmp_path / "cat" / "spectro").exists()


def test_a_pixel_denser_than_a_partition_is_refused_with_the_fix(predictions, tmp_path):
    with pytest.raises(CatalogError, match="raise catalog.highest_order"):
        build_catalog(predictions["files"], tmp_path / "cat" / "spectro", "spectro",
                      **{**OPTIONS, "max_rows_per_partition": 2, "highest_order": 3})


def test_inputs_from_different_models_are_refused(predictions, tmp_path):
    other = tmp_path / "other.parquet"
    table = pq.read_table(predictions["files"][1])
    meta = dict(table.schema.metadata)
    meta[b"member_sha256"] = b'["deadbeef"]'
    pq.write_table(table.replace_schema_metadata(meta), other)
    with pytest.raises(CatalogError, match="different models"):
        build_catalog([predictions["files"][0], other], tmp_path / "cat" / "spectro", "spectro", **OPTIONS)
    with pytest.raises(CatalogError, match="label set"):
        build_catalog(predictions["files"], tmp_path / "cat" / "other", "other", **OPTIONS)


def test_rebuild_replaces_the_old_catalogue(predictions, tmp_path):
    out = tmp_path / "catalog" / "spectro"
    build_catalog(predictions["files"], out, "spectro", **OPTIONS)
    build_catalog(predictions["files"][:1], out, "spectro", **OPTIONS)
    assert len(lsdb.read_hats(out).compute()) == pq.ParquetFile(predictions["files"][0]).metadata.num_rows


def test_batch_folders_stand_for_their_files_in_name_order(predictions, catalogue, tmp_path):
    folders = [tmp_path / "predict" / f"batch-{k}" for k in range(2)]
    for folder, file in zip(folders, predictions["files"]):
        folder.mkdir(parents=True)
        shutil.copy(file, folder / file.name)
    summary = build_catalog(folders, tmp_path / "catalog" / "spectro", "spectro", **OPTIONS)
    assert summary["inputs"] == [str(f / file.name) for f, file in zip(folders, predictions["files"])]
    assert summary["n_rows"] == catalogue["summary"]["n_rows"]
    assert summary["per_label"] == catalogue["summary"]["per_label"]
    (tmp_path / "predict" / "empty").mkdir()
    with pytest.raises(CatalogError, match="holds no .parquet file"):
        build_catalog([*folders, tmp_path / "predict" / "empty"], tmp_path / "catalog" / "spectro", "spectro",
                      **OPTIONS)


def test_cli_uses_the_config(predictions, tmp_path):
    config = {"features": FEATURES_CFG, "label_sets": {"spectro": LABELS},
              "catalog": {"sky_map_level": 2, "max_rows_per_partition": 400, "highest_order": 6,
                          "sky_map_label": "fe_h"}}  # fe_h is not a label: falls back
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump(config, sort_keys=False))
    out = tmp_path / "results" / "catalog" / "spectro"
    rc = main(["catalog", "--config", str(cfg), "--label-set", "spectro",
               "--inputs", *map(str, predictions["files"]), "--out-dir", str(out)])
    assert rc == 0
    summary = json.loads((tmp_path / "results" / "catalog" / "spectro.summary.json").read_text())
    assert summary["sky_map_level"] == 2 and summary["sky_map_label"] == "teff"
    assert summary["max_rows_per_partition"] == 400 and summary["highest_order"] == 6
    assert all(n <= 400 for n in pd.read_csv(out / "partition_info.csv").shape[:1])
    assert (tmp_path / "results" / "catalog" / "spectro.skymap.png").exists()


def test_cli_refuses_an_out_dir_that_holds_its_inputs(predictions, tmp_path, capsys):
    """The catalogue folder is replaced whole: over a folder of inputs it would delete them."""
    folder = tmp_path / "predict"
    folder.mkdir()
    for path in predictions["files"]:
        shutil.copy(path, folder / path.name)
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump({"features": FEATURES_CFG, "label_sets": {"spectro": LABELS}}))
    for out in (folder, tmp_path):
        rc = main(["catalog", "--config", str(cfg), "--label-set", "spectro", "--inputs", str(folder),
                   "--out-dir", str(out)])
        assert rc == 2 and "holds the input" in capsys.readouterr().err
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in predictions["files"])


def test_kiel_diagram_is_drawn_as_astronomers_do(monkeypatch, tmp_path):
    import msa.catalogue.catalog as catalog

    drawn = {}
    monkeypatch.setattr(catalog, "save_figure", lambda fig, path: drawn.setdefault("fig", fig))
    rng = np.random.default_rng(0)
    teff = np.r_[rng.normal(5500, 600, 2000), 40_000.0]  # one absurd star must not set the range
    logg = np.r_[rng.normal(4.0, 0.6, 2000), 6.0]
    catalog.plot_kiel({"teff_q50": teff, "logg_q50": logg}, {"teff": "K", "logg": "dex"}, tmp_path / "k.png")
    ax = drawn["fig"].axes[0]
    (left, right), (bottom, top) = ax.get_xlim(), ax.get_ylim()
    assert left > right and bottom > top  # T_eff falls to the right, log g grows downwards
    assert left < 9000 and right > 3000 and "outside" in ax.get_title()
    assert ax.get_xlabel() == r"median $T_\mathrm{eff}$ / K" and ax.get_ylabel() == r"median $\log g$"


def test_sky_map_colour_scale_comes_from_percentiles_on_round_ticks():
    from msa.catalogue.catalog import colour_scale

    values = np.r_[np.linspace(-1.0, 0.3, 500), -6.0, 2.39271]
    scale = colour_scale(values)
    assert scale["min"] == pytest.approx(np.percentile(values, 2)) and scale["max"] < 0.31
    assert all(scale["min"] <= t <= scale["max"] for t in scale["cbar_ticks"]) and len(scale["cbar_ticks"]) >= 3
    assert all(round(t, 2) == t for t in scale["cbar_ticks"])

