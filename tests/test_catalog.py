"""msa catalog: prediction files → HEALPix-partitioned Parquet dataset + summary + figures."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from astropy.table import Table

from msa.catalog import CatalogError, build_catalog, output_paths
from msa.cli import main
from msa.ensemble import Ensemble
from msa.healpix import source_id_to_pixel
from msa.predict import predict_shard
from msa.store import write_shard
from test_ensemble import FEATURES_CFG, LABELS, small_layout, unit_scaler, write_member
from test_predict import CALIBRATION, star_columns

torch.set_num_threads(1)

DEMO_SOURCE = Path(__file__).resolve().parents[1] / "resources" / "demo" / "GaiaSource_demo.csv.gz"
LEVEL = 3


@pytest.fixture(scope="module")
def predictions(tmp_path_factory):
    """Two prediction files of real Gaia source_ids (all over the sky), from a small random ensemble."""
    tmp = tmp_path_factory.mktemp("predictions")
    layout = small_layout()
    scaler = unit_scaler(layout)
    members = [write_member(tmp / f"m{k}.pt", layout, scaler, seed=k, label_centre=[4800.0, 2.5, 1.0],
                            label_scale=[700.0, 1.0, 0.4], label_set="spectro") for k in range(2)]
    ensemble = Ensemble.load(members)
    ids = np.sort(pd.read_csv(DEMO_SOURCE, usecols=["source_id"])["source_id"].to_numpy(np.int64))[:1200]
    files = []
    for i, part in enumerate(np.array_split(ids, 2)):
        cols = star_columns(len(part), seed=i)
        cols["source_id"] = part
        shard = tmp / f"shard-{i}.h5"
        write_shard(shard, cols)
        out = tmp / f"pred-{i}.parquet"
        predict_shard(shard, ensemble, CALIBRATION, out, chunk_rows=256, batch_size=256, min_inputs=3,
                      metadata={"label_set": "spectro", "labels": json.dumps(LABELS),
                                "units": json.dumps({"teff": "K", "logg": "dex", "parallax": "mas"}),
                                "member_sha256": json.dumps(ensemble.checksums), "calibration_sha256": "abc",
                                "config_hash": "0123", "msa_version": "test"})
        files.append(out)
    return {"files": files, "ids": ids, "members": members, "ensemble": ensemble, "dir": tmp}


def inputs_frame(files) -> pd.DataFrame:
    return pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)


def test_catalogue_is_one_row_per_star_in_the_right_partition(predictions, tmp_path):
    out = tmp_path / "catalog" / "spectro"
    summary = build_catalog(predictions["files"], out, "spectro", LEVEL, "teff")
    key = f"healpix_{LEVEL}"
    # pyarrow.dataset with hive partitioning
    table = ds.dataset(out, format="parquet", partitioning="hive").to_table()
    sid = table.column("source_id").to_numpy()
    assert len(sid) == len(predictions["ids"]) == summary["n_rows"]
    assert set(sid.tolist()) == set(predictions["ids"].tolist()) and len(np.unique(sid)) == len(sid)
    np.testing.assert_array_equal(table.column(key).to_numpy(), source_id_to_pixel(sid, LEVEL))
    assert summary["n_pixels"] == len(np.unique(source_id_to_pixel(predictions["ids"], LEVEL))) > 10
    # pandas reads the folder; the values are the predictions, row for row by source_id
    frame = pd.read_parquet(out).set_index("source_id").sort_index()
    ref = inputs_frame(predictions["files"]).set_index("source_id").sort_index()
    pd.testing.assert_frame_equal(frame.drop(columns=key), ref, check_like=True)
    # astropy reads every partition file; the model identity travels with each file
    n_astropy = 0
    for part in out.glob(f"{key}=*/*.parquet"):
        t = Table.read(part, format="parquet")
        pixel = int(part.parent.name.split("=")[1])
        assert np.all(source_id_to_pixel(np.asarray(t["source_id"]), LEVEL) == pixel)
        n_astropy += len(t)
        assert json.loads(pq.read_schema(part).metadata[b"member_sha256"]) == predictions["ensemble"].checksums
    assert n_astropy == len(predictions["ids"])
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporary folders left


def test_summary_and_figures(predictions, tmp_path):
    out = tmp_path / "catalog" / "spectro"
    summary = build_catalog(predictions["files"], out, "spectro", LEVEL, "teff")
    paths = output_paths(out, "spectro")
    assert paths["summary"] == tmp_path / "catalog" / "spectro.summary.json"
    on_disk = json.loads(paths["summary"].read_text())
    assert on_disk["n_rows"] == summary["n_rows"]
    ref = inputs_frame(predictions["files"])
    assert on_disk["fraction_without_xp"] == pytest.approx(np.mean(~ref["has_xp"]))
    assert on_disk["fraction_flagged"] == pytest.approx(np.mean(ref["flag_too_few_inputs"])) and \
        on_disk["fraction_flagged"] > 0
    q50 = ref["logg_q50"].dropna().to_numpy(np.float64)  # small catalogue: the sample is every star
    assert on_disk["per_label"]["logg"]["q50_percentiles"]["p16"] == pytest.approx(np.percentile(q50, 16))
    assert on_disk["per_label"]["teff"]["unit"] == "K"
    assert on_disk["model"]["member_sha256"] == json.dumps(predictions["ensemble"].checksums)
    for key in ("skymap", "distributions"):
        assert paths[key].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and paths[key].stat().st_size > 5000


def test_duplicate_stars_across_inputs_are_refused(predictions, tmp_path):
    out = tmp_path / "catalog" / "spectro"
    with pytest.raises(CatalogError, match="more than once"):
        build_catalog([*predictions["files"], predictions["files"][0]], out, "spectro", LEVEL, "teff")
    assert not out.exists() and not list(out.parent.iterdir())


def test_inputs_from_different_models_are_refused(predictions, tmp_path):
    other = tmp_path / "other.parquet"
    table = pq.read_table(predictions["files"][1])
    meta = dict(table.schema.metadata)
    meta[b"member_sha256"] = b'["deadbeef"]'
    pq.write_table(table.replace_schema_metadata(meta), other)
    with pytest.raises(CatalogError, match="different models"):
        build_catalog([predictions["files"][0], other], tmp_path / "cat" / "spectro", "spectro", LEVEL)
    with pytest.raises(CatalogError, match="label set"):
        build_catalog(predictions["files"], tmp_path / "cat" / "other", "other", LEVEL)


def test_rebuild_replaces_the_old_catalogue(predictions, tmp_path):
    out = tmp_path / "catalog" / "spectro"
    build_catalog(predictions["files"], out, "spectro", LEVEL, "teff")
    build_catalog(predictions["files"][:1], out, "spectro", LEVEL, "teff")
    table = ds.dataset(out, format="parquet", partitioning="hive").to_table()
    assert table.num_rows == pq.ParquetFile(predictions["files"][0]).metadata.num_rows
    assert not list(out.glob("*/part-00001.parquet"))


def test_cli_uses_the_config_level(predictions, tmp_path):
    config = {"features": FEATURES_CFG, "label_sets": {"spectro": LABELS},
              "catalog": {"healpix_level": 2, "sky_map_label": "fe_h"}}  # fe_h is not a label: falls back
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump(config, sort_keys=False))
    out = tmp_path / "results" / "catalog" / "spectro"
    rc = main(["catalog", "--config", str(cfg), "--label-set", "spectro",
               "--inputs", *map(str, predictions["files"]), "--out-dir", str(out)])
    assert rc == 0
    assert all(p.name.startswith("healpix_2=") for p in out.iterdir())
    summary = json.loads((tmp_path / "results" / "catalog" / "spectro.summary.json").read_text())
    assert summary["healpix_level"] == 2 and summary["sky_map_label"] == "teff"
    assert (tmp_path / "results" / "catalog" / "spectro.skymap.png").exists()
