"""msa ingest: the real demo into one shard, joins, provenance, atomicity, the CLI forms."""

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from msa.cli import main
from msa.config import load_config
from msa.data.gaia import read_xp
from msa.data.ingest import ingest_shard
from msa.data.store import Shard
from msa.data.synthetic import synthetic_config, write_sky

REPO = Path(__file__).parents[1]
DEMO = REPO / "resources" / "demo"
SAMPLES = REPO / "tests" / "data" / "gaia_archive_samples"


@pytest.fixture(scope="module")
def demo_shard(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "shard-demo.h5"
    cfg = load_config(REPO / "config" / "config.yaml")
    tmass = {**cfg["ingest"]["surveys"]["tmass"], "path": str(DEMO / "tmass_demo.csv")}
    counts = ingest_shard(DEMO / "XpContinuousMeanSpectrum_demo.csv.gz", DEMO / "GaiaSource_demo.csv.gz",
                          {"tmass": tmass}, out, cfg["ingest"]["source_columns"], show_progress=False)
    return out, counts


def test_demo_ingests_every_star_sorted(demo_shard):
    out, counts = demo_shard
    expected = np.sort(pd.read_csv(DEMO / "GaiaSource_demo.csv.gz", usecols=["source_id"])["source_id"].to_numpy())
    with Shard(out) as shard:
        assert shard.n_rows == 3896 == counts["written"]
        ids = shard.read(["source_id"])["source_id"]
        np.testing.assert_array_equal(ids, expected)
        assert ids.dtype == np.int64
        for c in ("bp_1", "bp_55", "rpe_55", "phot_g_mean_mag", "J", "parallax"):
            assert shard.read([c])[c].dtype == np.float32, c
        for c in ("ra", "dec"):  # float32 degrees resolve only ~0.1 arcsec: positions stay float64
            assert shard.read([c])[c].dtype == np.float64, c
        assert {"bp_1", "bpe_1", "rp_55", "rpe_55", "H", "K", "pmdec_error"} <= set(shard.columns)
        assert len([c for c in shard.columns if c[:3] in ("bp_", "rp_", "bpe", "rpe")]) == 220


def test_demo_values_survive_the_join(demo_shard):
    out, _ = demo_shard
    xp = read_xp(DEMO / "XpContinuousMeanSpectrum_demo.csv.gz")
    tmass = pd.read_csv(DEMO / "tmass_demo.csv").set_index("source_id")
    with Shard(out) as shard:
        d = shard.read(["source_id", "bp_1", "rpe_7", "J", "phot_g_mean_mag", "parallax"])
    row = int(np.flatnonzero(d["source_id"] == xp["source_id"][100])[0])
    assert d["bp_1"][row] == xp["bp_coefficients"][100, 0]
    assert d["rpe_7"][row] == xp["rp_coefficient_errors"][100, 6]
    assert d["J"][row] == np.float32(tmass.loc[xp["source_id"][100], "j_m"])
    assert d["source_id"][0] == 20510156761141888 and d["phot_g_mean_mag"][0] == np.float32(14.521)
    assert np.isnan(d["parallax"]).all()  # empty in the demo file: missing, not zero
    assert np.isnan(d["J"]).sum() == 4  # the README's count of empty j_m


def test_provenance_attrs(demo_shard):
    out, _ = demo_shard
    with Shard(out) as shard:
        attrs = shard.attrs
    inputs = json.loads(attrs["inputs"])
    assert [i["role"] for i in inputs] == ["xp", "source", "survey:tmass"]
    xp_input = inputs[0]
    assert xp_input["size"] == os.path.getsize(DEMO / "XpContinuousMeanSpectrum_demo.csv.gz")
    assert len(xp_input["sha256"]) == 64 and "mtime" in xp_input
    counts = json.loads(attrs["counts"])
    assert counts == {"xp_rows": 3896, "source_rows": 3896, "sources_without_xp": 0,
                      "survey_tmass_rows": 3896, "survey_tmass_matched": 3896, "survey_tmass_unmatched": 0,
                      "survey_tmass_rejected": 0, "written": 3896}
    assert attrs["msa_version"] and int(attrs["n_rows"]) == 3896


@pytest.fixture(scope="module")
def sky(tmp_path_factory):
    return write_sky(tmp_path_factory.mktemp("sky"), 400, n_shards=2, seed=4)


@pytest.mark.parametrize("keep", [True, False])
def test_keep_sources_without_xp(sky, tmp_path, keep):
    cfg = synthetic_config(sky.out_dir, tmp_path)
    src = pd.read_csv(sky.source_paths[0])
    xp_ids = set(pd.read_csv(sky.xp_paths[0], usecols=["source_id"])["source_id"])
    without = int((~src["source_id"].isin(xp_ids)).sum())
    assert without > 0
    surveys = {"tmass": {**cfg["ingest"]["surveys"]["tmass"], "path": str(sky.tmass_paths[0])}}
    counts = ingest_shard(sky.xp_paths[0], sky.source_paths[0], surveys, tmp_path / "s.h5",
                          cfg["ingest"]["source_columns"], keep_sources_without_xp=keep, show_progress=False)
    with Shard(tmp_path / "s.h5") as shard:
        d = shard.read(["source_id", "bp_1", "rpe_55", "phot_g_mean_flux_over_error", "J_err", "parallax"])
    no_xp = np.isnan(d["bp_1"])
    assert counts["sources_without_xp"] == without
    if keep:
        assert len(d["source_id"]) == len(src) and no_xp.sum() == without
        assert np.isnan(d["rpe_55"][no_xp]).all() and np.isfinite(d["parallax"][no_xp]).all()
    else:
        assert len(d["source_id"]) == len(src) - without and not no_xp.any()
    # flux_over_error columns come along because the source file has them; 2MASS errors too
    assert np.isfinite(d["phot_g_mean_flux_over_error"]).all()
    tmass_ids = set(pd.read_csv(sky.tmass_paths[0])["source_id"])
    assert np.isfinite(d["J_err"]).sum() == len(tmass_ids & set(d["source_id"].tolist()))


def test_survey_rows_for_other_stars_are_ignored(sky, tmp_path):
    both = pd.concat([pd.read_csv(p) for p in sky.tmass_paths])
    both.to_csv(tmp_path / "tmass_all.csv", index=False)
    counts = ingest_shard(sky.xp_paths[1], sky.source_paths[1],
                          {"tmass": {"path": tmp_path / "tmass_all.csv", "columns": {"j_m": "J"}}},
                          tmp_path / "s.h5", ["phot_g_mean_mag"], show_progress=False)
    assert counts["survey_tmass_matched"] == len(pd.read_csv(sky.tmass_paths[1]))


def test_duplicate_survey_id_is_an_error(sky, tmp_path):
    t = pd.read_csv(sky.tmass_paths[0])
    pd.concat([t, t.iloc[[0]]]).to_csv(tmp_path / "dup.csv", index=False)
    from msa.data.surveys import SurveyError
    with pytest.raises(SurveyError, match=r"dup\.csv: 1 duplicate source_id"):
        ingest_shard(sky.xp_paths[0], sky.source_paths[0], {"t": {"path": tmp_path / "dup.csv", "columns": {"j_m": "J"}}},
                     tmp_path / "s.h5", ["phot_g_mean_mag"], show_progress=False)
    assert not (tmp_path / "s.h5").exists()


def test_failed_ingest_leaves_no_file_and_keeps_old_one(tmp_path):
    out = tmp_path / "s.h5"
    ingest_shard(SAMPLES / "XP_CONTINUOUS_RAW.csv", None, {}, out, show_progress=False)
    before = out.read_bytes()
    with pytest.raises(ValueError):
        ingest_shard(SAMPLES / "XP_CONTINUOUS_RAW.csv", None,
                     {"x": {"path": DEMO / "tmass_demo.csv", "columns": {"no_such_column": "X"}}}, out,
                     show_progress=False)
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.h5"]  # no temporary left behind


def test_empty_input_gives_empty_valid_shard(tmp_path):
    header = (SAMPLES / "XP_CONTINUOUS_RAW.csv").read_text().splitlines()[0]
    (tmp_path / "xp.csv").write_text(header + "\n")
    (tmp_path / "src.csv").write_text("source_id,phot_g_mean_mag\n")
    counts = ingest_shard(tmp_path / "xp.csv", tmp_path / "src.csv", {}, tmp_path / "s.h5",
                          ["phot_g_mean_mag"], show_progress=False)
    assert counts["written"] == 0
    with Shard(tmp_path / "s.h5") as shard:
        assert shard.n_rows == 0 and {"bp_1", "rpe_55", "phot_g_mean_mag"} <= set(shard.columns)


def test_xp_only_copies_source_columns_from_the_xp_file(tmp_path):
    ingest_shard(SAMPLES / "18Sco-XP-spectra.csv", None, {}, tmp_path / "s.h5",
                 ["phot_g_mean_mag", "parallax"], show_progress=False)
    with Shard(tmp_path / "s.h5") as shard:
        assert shard.read(["phot_g_mean_mag"])["phot_g_mean_mag"].tolist() == [np.float32(5.327651)]
        assert "parallax" not in shard.columns


def test_cli_config_form_substitutes_shard(sky, tmp_path):
    import yaml
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(synthetic_config(sky.out_dir, tmp_path / "results")))
    rc = main(["ingest", "--config", str(cfg_path), "--shard", "s001", "--out", str(tmp_path / "s1.h5"),
               "--no-progress"])
    assert rc == 0
    with Shard(tmp_path / "s1.h5") as shard:
        ids = shard.read(["source_id"])["source_id"]
        assert len(shard.attrs["config_hash"]) == 16 and "K_err" in shard.columns
    np.testing.assert_array_equal(ids, pd.read_csv(sky.source_paths[1])["source_id"].to_numpy())


def test_cli_explicit_form(sky, tmp_path):
    rc = main(["ingest", "--xp", str(sky.xp_paths[0]), "--source", str(sky.source_paths[0]),
               "--photometry", f"tmass={sky.tmass_paths[0]}", "--no-keep-sources-without-xp",
               "--out", str(tmp_path / "s0.h5"), "--no-progress"])
    assert rc == 0
    with Shard(tmp_path / "s0.h5") as shard:
        # no config: 2MASS columns keep their own names; only stars with XP (flag given)
        assert {"j_m", "ks_msigcom", "phot_g_mean_mag"} <= set(shard.columns)
        assert not np.isnan(shard.read(["bp_1"])["bp_1"]).any()
    rc = main(["ingest", "--xp", str(tmp_path / "missing.csv"), "--out", str(tmp_path / "x.h5"), "--no-progress"])
    assert rc == 2 and not (tmp_path / "x.h5").exists()  # bad input


def test_survey_formats_agree_and_rename(tmp_path):
    from astropy.table import Table

    from msa.data.surveys import SurveyError, read_survey

    t = pd.read_csv(DEMO / "tmass_demo.csv").head(300)
    t.to_parquet(tmp_path / "t.parquet")
    Table.from_pandas(t).write(tmp_path / "t.fits")
    ref = read_survey(DEMO / "tmass_demo.csv", {"j_m": "J", "ks_m": "K"})
    assert set(ref) == {"source_id", "J", "K"} and np.isnan(ref["J"]).sum() == 4
    for name in ("t.parquet", "t.fits"):
        got = read_survey(tmp_path / name, {"j_m": "J", "ks_m": "K"})
        for c in ("source_id", "J", "K"):
            np.testing.assert_array_equal(got[c], ref[c][:300])
    with pytest.raises(SurveyError, match=r"t\.parquet: missing column\(s\) \['j_msigcom'\]"):
        read_survey(tmp_path / "t.parquet", {"j_m": "J"}, {"j_msigcom": "J_err"})


def test_survey_with_empty_or_float_source_ids_is_refused(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from msa.data.source_ids import SourceIdError
    from msa.data.surveys import read_survey

    ids = pa.array([75527034260250932, None, 75527034260250934], pa.int64())
    pq.write_table(pa.table({"source_id": ids, "j_m": [10.0, 11.0, 12.0]}), tmp_path / "null.parquet")
    with pytest.raises(SourceIdError, match=r"null\.parquet: column 'source_id' row 1: '' is empty"):
        read_survey(tmp_path / "null.parquet", {"j_m": "J"})
    # float ids would merge neighbouring Gaia stars (75527034260250932 → …928)
    pq.write_table(pa.table({"source_id": [7.5527034260250932e16], "j_m": [10.0]}), tmp_path / "float.parquet")
    with pytest.raises(SourceIdError, match=r"float\.parquet: column 'source_id' has type double, not integer"):
        read_survey(tmp_path / "float.parquet", {"j_m": "J"})
