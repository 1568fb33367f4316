"""Gaia Archive readers on real DR3 files (CSV, ECSV, FITS) and on every kind of bad input."""

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from msa.data.gaia import (XP_LIST_COLUMNS, ArchiveFormatError, check_unique_ids, parse_list_column, read_table,
                           read_xp)
from msa.data.ingest import IngestError, ingest_shard

SAMPLES = Path(__file__).parent / "data" / "gaia_archive_samples"
DEMO = Path(__file__).parents[1] / "resources" / "demo"
MISSING_BP_STAR = 5405570973190252288


def archive_csv(name="XP_CONTINUOUS_RAW.csv") -> pd.DataFrame:
    """A sample CSV as text cells, to be edited and written back in the same format."""
    return pd.read_csv(SAMPLES / name, dtype=str, keep_default_na=False)


@pytest.mark.parametrize("path", sorted(p for p in SAMPLES.iterdir() if p.suffix in (".csv", ".ecsv", ".fits")),
                         ids=lambda p: p.name)
def test_every_sample_file_parses(path):
    xp = read_xp(path)
    n = len(xp["source_id"])
    assert n >= 1 and xp["source_id"].dtype == np.int64
    for column in XP_LIST_COLUMNS:
        assert xp[column].shape == (n, 55) and xp[column].dtype == np.float32
    # every star has at least one complete band
    assert np.all(np.isfinite(xp["rp_coefficients"]).all(axis=1) | np.isfinite(xp["bp_coefficients"]).all(axis=1))


@pytest.mark.parametrize("stem", ["XP_CONTINUOUS_RAW", "XP_CONTINUOUS_RAW_with_missing_BP"])
def test_csv_ecsv_fits_identical(stem):
    csv, ecsv, fits = (read_xp(SAMPLES / f"{stem}.{ext}") for ext in ("csv", "ecsv", "fits"))
    for column in ("source_id", *XP_LIST_COLUMNS):
        np.testing.assert_array_equal(csv[column], ecsv[column])
        np.testing.assert_array_equal(csv[column], fits[column])


def test_values_equal_the_numbers_in_the_file():
    xp = read_xp(SAMPLES / "XP_CONTINUOUS_RAW.csv")
    assert xp["source_id"].tolist() == [5853498713190525696, 5762406957886626816]
    # literals copied from the CSV text
    assert xp["bp_coefficients"][0, :3].tolist() == pytest.approx(
        [56947.03696840172, 13812.466168611605, 6752.473789122322], rel=1e-7)
    assert xp["bp_coefficients"][1, 1] == pytest.approx(-4139.830509078302, rel=1e-7)
    assert xp["rp_coefficient_errors"][0, -2:].tolist() == pytest.approx([10.642432, 4.6984973], rel=1e-7)
    assert xp["bp_coefficient_errors"][1, 0] == pytest.approx(3.431035, rel=1e-7)


def test_missing_bp_star_has_nan_bp_and_finite_rp():
    for ext in ("csv", "ecsv", "fits"):
        xp = read_xp(SAMPLES / f"XP_CONTINUOUS_RAW_with_missing_BP.{ext}")
        row = xp["source_id"].tolist().index(MISSING_BP_STAR)
        assert np.isnan(xp["bp_coefficients"][row]).all() and np.isnan(xp["bp_coefficient_errors"][row]).all()
        assert np.isfinite(xp["rp_coefficients"][row]).all()
        assert xp["rp_coefficients"][row, 0] == pytest.approx(38.18018501664883, rel=1e-7)
        others = [i for i in range(3) if i != row]
        assert np.isfinite(xp["bp_coefficients"][others]).all()


def test_correlation_columns_are_not_parsed(tmp_path):
    # garbage in the correlation columns cannot matter if they are skipped
    df = archive_csv()
    df["bp_coefficient_correlations"] = "not a list"
    df["rp_coefficient_correlations"] = "(1, 2"
    df.to_csv(tmp_path / "xp.csv", index=False)
    xp = read_xp(tmp_path / "xp.csv")
    np.testing.assert_array_equal(xp["bp_coefficients"], read_xp(SAMPLES / "XP_CONTINUOUS_RAW.csv")["bp_coefficients"])


def test_gzip_and_demo_file():
    xp = read_xp(DEMO / "XpContinuousMeanSpectrum_demo.csv.gz")
    assert len(xp["source_id"]) == 3896
    assert xp["source_id"][0] == 20510156761141888
    assert xp["bp_coefficients"][0, :2].tolist() == pytest.approx([1649.3280110337173, 2.761001005169034], rel=1e-7)


def test_parse_list_column_both_spellings_and_missing():
    values = [f"({', '.join(map(str, range(5)))})", None, "[]", "", f"[{','.join(map(str, range(5, 10)))}]"]
    out = parse_list_column(pa.array(values, pa.string()), Path("x.csv"), "c", 0, length=5)
    assert out[0].tolist() == [0, 1, 2, 3, 4] and out[4].tolist() == [5, 6, 7, 8, 9]
    assert np.isnan(out[1:4]).all()


# --- bad inputs -----------------------------------------------------------------------------------

def test_missing_column_names_file_and_column(tmp_path):
    df = archive_csv().drop(columns=["rp_coefficient_errors"])
    df.to_csv(tmp_path / "xp.csv", index=False)
    with pytest.raises(ArchiveFormatError, match=r"xp\.csv.*rp_coefficient_errors"):
        read_xp(tmp_path / "xp.csv")


def test_non_numeric_list_element_names_column_and_row(tmp_path):
    df = archive_csv("example_file_coeff.csv")
    elements = df.loc[3, "rp_coefficients"].split(",")
    elements[1] = " abc"  # same count, one element not a number
    df.loc[3, "rp_coefficients"] = ",".join(elements)
    df.to_csv(tmp_path / "xp.csv", index=False)
    with pytest.raises(ArchiveFormatError, match=r"xp\.csv.*'rp_coefficients' row 3.*not a number"):
        read_xp(tmp_path / "xp.csv")


def test_wrong_list_length_names_column_and_row(tmp_path):
    df = archive_csv("example_file_coeff.csv")
    df.loc[6, "bp_coefficient_errors"] = df.loc[6, "bp_coefficient_errors"].rsplit(",", 1)[0] + ")"
    df.to_csv(tmp_path / "xp.csv", index=False)
    with pytest.raises(ArchiveFormatError, match=r"xp\.csv.*'bp_coefficient_errors' row 6 has 54 values, expected 55"):
        read_xp(tmp_path / "xp.csv")


def test_truncated_gzip_names_file(tmp_path):
    data = (DEMO / "XpContinuousMeanSpectrum_demo.csv.gz").read_bytes()
    (tmp_path / "cut.csv.gz").write_bytes(data[: len(data) // 3])
    with pytest.raises(ArchiveFormatError, match=r"cut\.csv\.gz.*truncated or corrupt"):
        read_xp(tmp_path / "cut.csv.gz")


def test_corrupt_gzip_header_names_file(tmp_path):
    (tmp_path / "bad.csv.gz").write_bytes(b"this is not gzip at all\n")
    with pytest.raises(ArchiveFormatError, match=r"bad\.csv\.gz"):
        read_xp(tmp_path / "bad.csv.gz")


@pytest.mark.parametrize("column", ["dec", "phot_bp_mean_mag"])
def test_non_numeric_source_value_names_column_and_row(tmp_path, column):
    src = pd.read_csv(DEMO / "GaiaSource_demo.csv.gz", dtype=str, keep_default_na=False).head(50)
    src.loc[17, column] = "bright"
    src.to_csv(tmp_path / "src.csv", index=False)
    with pytest.raises(ArchiveFormatError, match=rf"src\.csv.*'{column}'.*row 17.*'bright'"):
        read_table(tmp_path / "src.csv", ["phot_g_mean_mag", "ra", "dec", "pmra", "phot_bp_mean_mag"])


def test_missing_source_column_names_file_and_column(tmp_path):
    src = pd.read_csv(DEMO / "GaiaSource_demo.csv.gz").head(5).drop(columns=["pmra"])
    src.to_csv(tmp_path / "src.csv.gz", index=False)
    with pytest.raises(ArchiveFormatError, match=r"src\.csv\.gz.*\['pmra'\]"):
        read_table(tmp_path / "src.csv.gz", ["ra", "pmra"])


def test_duplicate_source_id_is_an_error(tmp_path):
    df = archive_csv("example_file_coeff.csv")
    pd.concat([df, df.iloc[[4]]]).to_csv(tmp_path / "dup.csv", index=False)
    xp = read_xp(tmp_path / "dup.csv")
    with pytest.raises(ArchiveFormatError, match=rf"dup\.csv: 1 duplicate source_id.*{df.loc[4, 'source_id']}"):
        check_unique_ids(xp["source_id"], tmp_path / "dup.csv")
    with pytest.raises(ArchiveFormatError, match=r"dup\.csv: 1 duplicate"):
        ingest_shard(tmp_path / "dup.csv", None, {}, tmp_path / "out.h5", show_progress=False)
    assert not (tmp_path / "out.h5").exists()


def test_xp_stars_missing_from_source_is_an_error(tmp_path):
    xp = archive_csv("example_file_coeff.csv")
    xp.to_csv(tmp_path / "xp.csv", index=False)
    src = pd.DataFrame({"source_id": xp["source_id"].astype("int64"), "phot_g_mean_mag": 12.0})
    src.drop(index=[2, 5]).to_csv(tmp_path / "src.csv", index=False)
    with pytest.raises(IngestError, match=r"2 of 10 stars in .*xp\.csv are not in .*src\.csv"):
        ingest_shard(tmp_path / "xp.csv", tmp_path / "src.csv", {}, tmp_path / "out.h5",
                     source_columns=["phot_g_mean_mag"], show_progress=False)
    assert not (tmp_path / "out.h5").exists()


def test_source_table_formats_agree(tmp_path):
    src = pd.read_csv(DEMO / "GaiaSource_demo.csv.gz").head(200)
    src.to_parquet(tmp_path / "src.parquet")
    from astropy.table import Table
    Table.from_pandas(src).write(tmp_path / "src.fits")
    cols = ["ra", "dec", "parallax", "phot_g_mean_mag"]
    ref = read_table(DEMO / "GaiaSource_demo.csv.gz", cols)
    for name in ("src.parquet", "src.fits"):
        got = read_table(tmp_path / name, cols)
        for c in ["source_id", *cols]:
            np.testing.assert_array_equal(got[c], ref[c][:200])
    assert np.isnan(ref["parallax"]).all()  # the demo has empty parallaxes: NaN, not 0
