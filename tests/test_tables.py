"""msa.data.tables is the one reader of table formats: survey tables, label catalogues and Archive files
take their format from it, and ECSV is read by astropy (declared types, delimiter and masks)."""

from __future__ import annotations

import numpy as np
import pytest
from astropy import units as u
from astropy.table import MaskedColumn, Table

from msa.data.gaia import ArchiveFormatError, file_kind
from msa.data.labels import LabelError, read_table as read_label_table
from msa.data.surveys import SurveyError, read_survey
from msa.data.tables import TableError, read_frame, table_format

# ids above 2**53: exact only when never passed through float
IDS = np.array([4295806720, 6917528997577384320, 6917528997577384321], dtype=np.int64)


def ecsv_survey(path, delimiter=" "):
    """A 2MASS-like cross-match as astropy writes ECSV: space-delimited by default, with units,
    an int64 source_id and a masked (missing) magnitude."""
    table = Table({"source_id": IDS,
                   "j_m": MaskedColumn([10.5, 11.25, 12.0], mask=[False, True, False], unit=u.mag),
                   "j_msigcom": [0.02, 0.03, 0.04] * u.mag})
    table.write(path, format="ascii.ecsv", delimiter=delimiter)
    return path


@pytest.mark.parametrize("delimiter", [" ", ","])
def test_an_ecsv_survey_table_is_read_with_its_declared_types_and_delimiter(tmp_path, delimiter):
    survey = read_survey(ecsv_survey(tmp_path / "tmass.ecsv", delimiter), {"j_m": "J"}, {"j_msigcom": "J_err"})
    assert survey["source_id"].dtype == np.int64 and (survey["source_id"] == IDS).all()
    np.testing.assert_array_equal(survey["J"], [10.5, np.nan, 12.0])  # masked → missing
    np.testing.assert_allclose(survey["J_err"], [0.02, 0.03, 0.04])


def test_an_ecsv_label_catalogue_is_read_like_any_other(tmp_path):
    path = tmp_path / "labels.ecsv"
    Table({"source_id": IDS, "teff": [5000.0, 5100.0, 5200.0] * u.K}).write(path, format="ascii.ecsv")
    frame = read_label_table(path, ["source_id", "teff"], id_column="source_id")
    assert frame["source_id"].tolist() == IDS.tolist()
    assert frame["teff"].tolist() == [5000.0, 5100.0, 5200.0]


@pytest.mark.parametrize("name, fmt, kind", [
    ("XpContinuousMeanSpectrum_000000-003111.csv.gz", "csv", "text"), ("x.ecsv", "ecsv", "text"),
    ("x.ecsv.gz", "ecsv", "text"), ("x.txt.gz", "csv", "text"), ("x.fits", "fits", "fits"),
    ("x.fits.gz", "fits", "fits"), ("x.parquet", "parquet", "parquet"), ("X.PQ", "parquet", "parquet")])
def test_archive_files_take_their_format_from_the_one_decision(name, fmt, kind):
    assert table_format(name) == fmt and file_kind(name) == kind


def test_an_unknown_format_is_an_error_listing_the_suffixes():
    with pytest.raises(TableError, match=r"x\.xlsx: unknown table format.*\.ecsv"):
        table_format("x.xlsx")
    with pytest.raises(ArchiveFormatError, match=r"x\.xlsx: unknown table format"):
        file_kind("x.xlsx")


def test_missing_columns_are_named_with_the_file(tmp_path):
    path = ecsv_survey(tmp_path / "t.ecsv")
    with pytest.raises(TableError, match=r"t\.ecsv: missing column\(s\) \['h_m'\]"):
        read_frame(path, ["source_id", "h_m"])
    with pytest.raises(SurveyError, match=r"t\.ecsv: missing column\(s\) \['h_m'\].*ingest\.surveys"):
        read_survey(path, {"h_m": "H"})
    with pytest.raises(LabelError, match=r"t\.ecsv.*missing column\(s\) \['teff'\].*labels\.columns"):
        read_label_table(path, ["source_id", "teff"], id_column="source_id")


def test_a_gaia_source_ecsv_is_read_with_its_declared_types(tmp_path):
    from msa.data.gaia import read_table as read_gaia_source

    path = tmp_path / "GaiaSource.ecsv"
    Table({"source_id": IDS, "parallax": MaskedColumn([1.5, 0.25, 2.0], mask=[False, False, True], unit=u.mas),
           "phot_g_mean_mag": [12.0, 13.0, 14.0] * u.mag}).write(path, format="ascii.ecsv")  # space-delimited
    source = read_gaia_source(path, ["parallax", "phot_g_mean_mag"])
    assert source["source_id"].tolist() == IDS.tolist()
    np.testing.assert_array_equal(source["parallax"], [1.5, 0.25, np.nan])
    np.testing.assert_array_equal(source["phot_g_mean_mag"], [12.0, 13.0, 14.0])
