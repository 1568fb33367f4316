"""Reading tables of stars: the one home of table formats (CSV / ECSV / FITS / Parquet).

:func:`table_format` decides a file's format from its name for every reader of the package
(Gaia Archive files in :mod:`msa.data.gaia`, survey tables, label catalogues, a user's own table);
:func:`read_frame` reads named columns of a whole table (survey tables, label catalogues), ECSV
and FITS through astropy so the file's declared types, delimiter and masks are honoured (values
are taken in the file's declared units); :func:`iter_table_chunks` streams a user's table.

A user's own table of stars read as store-like columns:

``msa predict --table FILE`` predicts stars that are not in the shard store. The table must use
the store's column names (``source_id``, ``bp_1`` … ``rp_55``, ``phot_g_mean_mag``, survey feature
names, ...; see config/README.md), so the same ``FeatureTransform`` applies. Error columns are not
needed for prediction.
Rows keep the table's order; ``source_id`` is read exactly by :mod:`msa.data.source_ids` (text is never
passed through float; a float column or float text is refused naming the row).
"""

from __future__ import annotations

import logging
import zlib
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from msa.data.source_ids import SOURCE_ID, parse_source_ids
from msa.errors import InputError

log = logging.getLogger(__name__)

CSV_SUFFIXES = (".csv", ".csv.gz", ".csv.bz2", ".csv.xz", ".txt", ".txt.gz")
FITS_SUFFIXES = (".fits", ".fit", ".fits.gz", ".fit.gz")
ECSV_SUFFIXES = (".ecsv", ".ecsv.gz")
PARQUET_SUFFIXES = (".parquet", ".pq")


class TableError(InputError, ValueError):
    """The table cannot be read, lacks columns, or has bad source_ids."""


def table_format(path: str | Path) -> str:
    """'csv', 'ecsv', 'fits' or 'parquet' from the file name; an error naming the suffixes."""
    name = Path(path).name.lower()
    for fmt, suffixes in (("csv", CSV_SUFFIXES), ("fits", FITS_SUFFIXES), ("ecsv", ECSV_SUFFIXES),
                          ("parquet", PARQUET_SUFFIXES)):
        if name.endswith(suffixes):
            return fmt
    raise TableError(f"{path}: unknown table format; use one of "
                     f"{list(CSV_SUFFIXES + ECSV_SUFFIXES + FITS_SUFFIXES + PARQUET_SUFFIXES)}")


def table_columns(path: str | Path) -> list[str]:
    """Column names of a table, without reading its rows (CSV: the header line only)."""
    fmt = table_format(path)
    try:
        if fmt == "csv":
            return list(pd.read_csv(path, nrows=0).columns)
        if fmt == "parquet":
            return list(pq.ParquetFile(path).schema_arrow.names)
    except pd.errors.EmptyDataError:
        raise TableError(f"{path}: the file is empty; write a header line and one row per star") from None
    except (OSError, EOFError, ValueError) as err:  # a truncated gzip, not Parquet, ...
        raise TableError(f"{path}: cannot read the table ({err}); is the file complete and in this format?") \
            from err
    return list(_read_astropy(path, fmt).colnames)


def _read_astropy(path: Path, fmt: str):
    from astropy.table import Table  # imported lazily: slow to import, only FITS/ECSV need it

    try:
        if fmt == "fits":
            return Table.read(path, format="fits", memmap=True)
        return Table.read(path, format="ascii.ecsv")
    except Exception as err:  # astropy raises many types for unreadable files
        raise TableError(f"cannot read table {path}: {err}") from err


def read_frame(path: str | Path, columns: Sequence[str], id_column: str | None = SOURCE_ID) -> pd.DataFrame:
    """The named ``columns`` of a whole table; ``id_column`` (one of them) as exact int64
    source_ids, numeric columns as float64 (masked/empty = NaN), other columns as they are.

    Raises :class:`TableError` naming the file and the missing columns or the reading problem."""
    path = Path(path)
    if not path.exists():
        raise TableError(f"{path}: file not found")
    fmt = table_format(path)
    table = _read_astropy(path, fmt) if fmt in ("ecsv", "fits") else None  # read once, header and rows
    available = list(table.colnames) if table is not None else table_columns(path)
    missing = [c for c in columns if c not in available]
    if missing:
        raise TableError(f"{path}: missing column(s) {missing}; it has {available[:10]}"
                         f"{' …' if len(available) > 10 else ''}")
    columns = list(dict.fromkeys(columns))
    if fmt == "csv":
        raw = _read_csv_columns(path, columns, id_column)
    elif fmt == "parquet":
        raw = _read_parquet_columns(path, columns, id_column)
    else:
        raw = _astropy_columns(table, columns, id_column)
    if id_column is not None:
        raw[id_column] = parse_source_ids(raw[id_column], path, id_column)
    return pd.DataFrame(raw, columns=columns)


def _read_csv_columns(path: Path, columns: list[str], id_column: str | None) -> dict:
    # ids as text, parsed exactly later: pandas would round float text such as "…504.0"
    try:
        frame = pd.read_csv(path, usecols=columns, dtype={id_column: str} if id_column else None,
                            low_memory=False)
    except (OSError, EOFError, zlib.error, ValueError) as err:
        raise TableError(f"{path}: cannot read the table ({err}); is the file complete?") from err
    return {c: frame[c] for c in columns}


def _read_parquet_columns(path: Path, columns: list[str], id_column: str | None) -> dict:
    try:
        table = pq.read_table(path, columns=columns)
    except (OSError, ValueError) as err:
        raise TableError(f"{path}: cannot read this Parquet file ({err}); is it complete?") from err
    # the id column stays Arrow: parse_source_ids checks its type and nulls, naming them
    return {c: table[c] if c == id_column else table[c].to_pandas() for c in columns}


def _astropy_columns(table, columns: list[str], id_column: str | None) -> dict:
    """Columns of an astropy Table: numbers as float64 with masked entries NaN."""
    out = {}
    for c in columns:
        column = table[c]
        if c != id_column and column.dtype.kind in "iuf":
            column = np.ma.filled(np.ma.asarray(column).astype(np.float64), np.nan)
        out[c] = column
    return out


def _non_numeric_type(values) -> str | None:
    """The type of a feature column that is not a number (None when it is one): booleans would
    read as 0 and 1, text as whatever digits it holds; an Arrow column is judged by its type."""
    arrow_type = getattr(values, "type", None)
    if isinstance(arrow_type, pa.DataType):
        numeric = pa.types.is_integer(arrow_type) or pa.types.is_floating(arrow_type) or \
            pa.types.is_decimal(arrow_type) or pa.types.is_null(arrow_type)
        return None if numeric else str(arrow_type)
    kind = getattr(getattr(values, "dtype", None), "kind", None)
    if kind in ("b", "U", "S"):
        return {"b": "bool", "U": "string", "S": "bytes"}[kind]
    if kind == "O" and any(isinstance(v, (bool, np.bool_)) for v in np.asarray(values).ravel()):
        return "bool"
    return None


def _as_columns(frame_like, names: Sequence[str], path: Path, first_row: int) -> dict[str, np.ndarray]:
    out = {SOURCE_ID: parse_source_ids(frame_like[SOURCE_ID], path, SOURCE_ID, first_row)}
    for c in names:
        values = frame_like[c]
        wrong = _non_numeric_type(values)
        if wrong is not None:
            raise TableError(f"{path}: column {c!r} has type {wrong}, not a number; the model reads it as a "
                             "number: write it as floats or integers (missing values empty, NaN or null)")
        if isinstance(getattr(values, "type", None), pa.DataType):
            values = values.to_numpy(zero_copy_only=False)
        if hasattr(values, "filled"):  # astropy masked column → NaN where masked
            values = values.astype(np.float64).filled(np.nan)
        try:
            out[c] = np.asarray(values, dtype=np.float32)
        except (ValueError, TypeError):
            raise TableError(f"{path}: column {c!r} is not numeric (rows {first_row}…); "
                             "write numbers, or leave a field empty for a missing value") from None
    return out


def iter_table_chunks(path: str | Path, columns: Sequence[str], chunk_rows: int,
                      allow_missing: bool = False) -> Iterator[dict[str, np.ndarray]]:
    """Consecutive row blocks of ``source_id`` (int64) + ``columns`` (float32, NaN = missing), in file order.

    A missing column is an error naming it, unless ``allow_missing``: then it is read as all-NaN
    (the model treats it as missing for every star) and a warning names it.
    """
    path = Path(path)
    if not path.exists():
        raise TableError(f"table {path} does not exist")
    present = table_columns(path)
    if SOURCE_ID not in present:
        raise TableError(f"{path}: no {SOURCE_ID!r} column; the table must carry Gaia DR3 source_ids")
    missing = [c for c in columns if c not in present]
    if missing and not allow_missing:
        raise TableError(f"{path}: lacks column(s) {missing[:8]}{' …' if len(missing) > 8 else ''} "
                         f"({len(missing)} in all) that the model reads; name them as in the store "
                         "(see config/README.md) or pass --allow-missing-columns to treat them as missing")
    if missing:
        log.warning("%s: %d column(s) absent, treated as missing for every star: %s", path, len(missing), missing)
    wanted = [c for c in columns if c in present]
    fmt = table_format(path)
    for chunk in _iter_raw(path, fmt, wanted, chunk_rows):
        n = len(chunk[SOURCE_ID])
        for c in missing:
            chunk[c] = np.full(n, np.nan, dtype=np.float32)
        yield chunk


def _iter_raw(path: Path, fmt: str, wanted: list[str], chunk_rows: int) -> Iterator[dict[str, np.ndarray]]:
    first_row = 0
    if fmt == "csv":
        # ids as text, parsed exactly: pandas' int64 would round float text such as "…504.0"
        dtypes = {SOURCE_ID: str, **{c: "float64" for c in wanted}}
        reader = pd.read_csv(path, usecols=[SOURCE_ID, *wanted], dtype=dtypes, chunksize=chunk_rows)
        while True:
            try:
                frame = next(reader)
            except StopIteration:
                return
            except ValueError as err:  # pandas names the value, not the column: find it
                raise TableError(f"{path}: {_bad_csv_value(path, wanted) or err}; write numbers, "
                                 "or leave a field empty for a missing value") from None
            except (OSError, EOFError, zlib.error) as err:  # e.g. a truncated .csv.gz
                raise TableError(f"{path}: cannot read the table ({err}); is the file complete? "
                                 "Download or export it again") from err
            yield _as_columns(frame, wanted, path, first_row)
            first_row += len(frame)
    elif fmt == "parquet":
        for batch in pq.ParquetFile(path).iter_batches(batch_size=chunk_rows, columns=[SOURCE_ID, *wanted]):
            # Arrow columns: _as_columns judges them by their type before converting
            frame = {SOURCE_ID: batch.column(SOURCE_ID), **{c: batch.column(c) for c in wanted}}
            yield _as_columns(frame, wanted, path, first_row)
            first_row += batch.num_rows
    else:
        table = _read_astropy(path, fmt)
        for start in range(0, len(table), chunk_rows):
            yield _as_columns(table[start:start + chunk_rows], wanted, path, start)


def _bad_csv_value(path: Path, columns: Sequence[str]) -> str | None:
    """Slow path, after a failed read: 'column X row R: value V is not a number' for the first bad value."""
    frame = pd.read_csv(path, usecols=list(columns), dtype=str, keep_default_na=False)
    for c in columns:
        values = pd.to_numeric(frame[c].str.strip().replace("", "nan"), errors="coerce")
        bad = values.isna() & ~frame[c].str.strip().str.lower().isin(["", "nan", "na", "null"])
        if bad.any():
            row = int(np.argmax(bad.to_numpy()))
            return f"column {c!r} row {row}: {frame[c].iloc[row]!r} is not a number"
    return None


def read_table_source_ids(path: str | Path, chunk_rows: int = 1 << 20) -> np.ndarray:
    """All ``source_id``s of a table, in file order; raises if any repeats."""
    ids = np.concatenate([c[SOURCE_ID] for c in iter_table_chunks(path, [], chunk_rows)] or
                         [np.empty(0, np.int64)])
    if not len(ids):
        raise TableError(f"{path}: the table has no rows; give at least one star")
    uniq, counts = np.unique(ids, return_counts=True)
    if np.any(counts > 1):
        raise TableError(f"{path}: {int(np.sum(counts > 1))} source_id(s) appear more than once, "
                         f"e.g. {uniq[counts > 1][:3].tolist()}; keep one row per star")
    return ids
