"""msa catalog: prediction files → HATS catalogue (read back by LSDB, hats, astropy) + summary + figures."""

from __future__ import annotations

import json
import shutil
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

from msa.calibration.ensemble import Ensemble
from msa.catalogue.catalog import CatalogError, build_catalog, output_paths
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
    for key in ("skymap", "distributions"):
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
