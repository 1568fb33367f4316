"""Readers for Gaia Archive tables: XP continuous spectra and gaia_source columns.

Formats: CSV (plain or ``.gz``), ECSV (``# %ECSV 1.0`` YAML header), FITS binary tables, and for
gaia_source tables also Parquet; which one a file is, :func:`msa.data.tables.table_format` decides.
gaia_source ECSV is read by astropy (:func:`msa.data.tables.read_frame`: declared types, delimiter,
nulls); XP files, CSV or ECSV, are streamed as text (below), because their list columns are
declared as strings in ECSV anyway and astropy would parse the 1485-value correlation columns too. XP list columns are accepted in both Archive spellings,
``"(v1, v2, ...)"`` (CSV) and ``"[v1,v2,...]"`` (ECSV).

Speed: text files are streamed through pyarrow's CSV reader reading only the needed columns (the
1485-value correlation columns are tokenised but never converted), and each list column is
parsed in bulk: the brackets of every row are overwritten in the column's contiguous byte buffer,
which is then parsed by one ``np.fromstring`` call. No per-row Python runs on the fast path.

Every reader raises :class:`ArchiveFormatError` (a ``ValueError``) naming the file, the column and,
where it can, the first bad row (rows count from 0 = the first data row); a ``source_id`` that is not
an exact integer is a :class:`msa.data.source_ids.SourceIdError` in the same form.
"""

from __future__ import annotations

import gzip
import logging
import re
import warnings
import zlib
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv

from msa.data.source_ids import parse_source_ids
from msa.data.tables import TableError, read_frame, table_format
from msa.errors import InputError

log = logging.getLogger(__name__)

SOURCE_ID = "source_id"
N_XP_COEFFICIENTS = 55
XP_LIST_COLUMNS = ("bp_coefficients", "bp_coefficient_errors", "rp_coefficients", "rp_coefficient_errors")
# bytes per pyarrow CSV block: a few hundred XP rows with correlations, bounded memory
BLOCK_BYTES = 1 << 24
_COMMA, _SPACE = ord(","), ord(" ")
_OPENERS = np.array([ord("("), ord("[")], dtype=np.uint8)
_CLOSERS = np.array([ord(")"), ord("]")], dtype=np.uint8)


class ArchiveFormatError(InputError, ValueError):
    """A Gaia Archive (or survey) file is unreadable, incomplete or not in the expected format."""


# --- file kinds and text-file headers -------------------------------------------------------------

def file_kind(path: str | Path) -> str:
    """'text' (CSV or ECSV: both streamed as delimited text), 'fits' or 'parquet', by
    :func:`msa.data.tables.table_format`, the package's one format decision."""
    try:
        fmt = table_format(path)
    except TableError as err:
        raise ArchiveFormatError(str(err)) from None
    if Path(path).name.lower().endswith((".bz2", ".xz")):  # the streaming reader decompresses gzip only
        raise ArchiveFormatError(f"{path}: bz2/xz-compressed Archive files are not streamed; "
                                 "recompress it with gzip (.csv.gz) or decompress it")
    return "text" if fmt in ("csv", "ecsv") else fmt


UTF8_BOM = b"\xef\xbb\xbf"


def _open_text(path: Path):
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")


def text_header(path: str | Path) -> tuple[list[str], int, str]:
    """Column names, number of leading ``#`` lines (ECSV YAML header) and the delimiter."""
    path = Path(path)
    n_comment, delimiter = 0, ","
    try:
        with _open_text(path) as f:
            while True:
                line = f.readline()
                if n_comment == 0 and line.startswith(UTF8_BOM):  # a spreadsheet's export; arrow skips it too
                    line = line[len(UTF8_BOM):]
                if not line.startswith(b"#"):
                    break
                if n_comment == 0 and line.startswith(b"# %ECSV"):
                    delimiter = " "  # ECSV's default when the header names none
                n_comment += 1
                m = re.match(rb"#\s*delimiter:\s*'(.)'", line)
                if m:
                    delimiter = m.group(1).decode()
    except FileNotFoundError:
        raise ArchiveFormatError(f"{path}: file not found") from None
    except (OSError, EOFError, zlib.error) as err:
        raise ArchiveFormatError(f"{path}: cannot read the header ({err}); is the file complete?") from err
    text = line.decode("utf-8", "replace").strip()
    if not text:
        raise ArchiveFormatError(f"{path}: no header line (empty file?); download or export it again")
    names = [c.strip().strip('"') for c in text.split(delimiter)]
    return names, n_comment, delimiter


def table_columns(path: str | Path) -> list[str]:
    """The column names of any supported table file (reads only the header)."""
    path = Path(path)
    kind = file_kind(path)
    if kind == "text":
        return text_header(path)[0]
    if not path.exists():
        raise ArchiveFormatError(f"{path}: file not found")
    try:
        if kind == "parquet":
            import pyarrow.parquet as pq
            return list(pq.ParquetFile(path).schema_arrow.names)
        from astropy.io import fits
        with fits.open(path, memmap=True) as hdul:
            return list(_fits_table(hdul, path).columns.names)
    except (OSError, pa.ArrowInvalid, zlib.error) as err:  # astropy and arrow say "not this format" so
        raise ArchiveFormatError(f"{path}: not a readable {kind.upper()} file ({err}); check that its "
                                 "content matches its suffix (.fits, .parquet, .csv, ...)") from err


def _require(path: Path, available: Sequence[str], required: Sequence[str]) -> None:
    missing = [c for c in required if c not in available]
    if missing:
        raise ArchiveFormatError(
            f"{path}: missing required column(s) {missing}; the file has {len(available)} columns "
            f"({', '.join(list(available)[:8])}{', ...' if len(available) > 8 else ''}). "
            "Export the table with these columns, or remove them from the config.")


# --- streaming text tables ------------------------------------------------------------------------

def _text_batches(path: Path, columns: Sequence[str], types: dict[str, pa.DataType],
                  block_bytes: int = BLOCK_BYTES,
                  progress: Callable[[int], None] | None = None) -> Iterator[pa.RecordBatch]:
    """Stream record batches of ``columns`` from a CSV/ECSV(.gz) file, errors named by file."""
    names, n_comment, delimiter = text_header(path)
    _require(path, names, columns)
    # a native file, not pa.PythonFile: arrow's reader threads calling back into Python were left
    # running after an error and aborted the interpreter at exit (SIGABRT)
    raw = pa.OSFile(str(path), "r")
    try:
        stream = raw
        if path.name.lower().endswith(".gz"):
            stream = pa.CompressedInputStream(stream, "gzip")
        reader = pcsv.open_csv(
            stream,
            read_options=pcsv.ReadOptions(skip_rows=n_comment, block_size=block_bytes, use_threads=True),
            parse_options=pcsv.ParseOptions(delimiter=delimiter, newlines_in_values=False),
            convert_options=pcsv.ConvertOptions(
                include_columns=list(columns), column_types=types, strings_can_be_null=True,
                quoted_strings_can_be_null=True),
        )
        while True:
            try:
                batch = reader.read_next_batch()
            except StopIteration:
                return
            if progress is not None:
                progress(raw.tell())
            yield batch
    except pa.ArrowInvalid as err:
        raise _conversion_error(path, names, str(err)) from err
    except (OSError, EOFError, zlib.error) as err:
        raise ArchiveFormatError(
            f"{path}: the file is truncated or corrupt ({err}); download it again") from err
    finally:
        raw.close()


def _conversion_error(path: Path, names: list[str], message: str) -> ArchiveFormatError:
    """Turn pyarrow's conversion error into one naming the column and the first bad row."""
    m = re.search(r"column #(\d+)", message)
    if m is None:
        return ArchiveFormatError(f"{path}: cannot parse the file: {message}")
    column = names[int(m.group(1))]  # pyarrow counts the file's columns, not the included ones
    row, value = _first_non_numeric(path, column)
    where = f" at row {row} (value {value!r})" if row is not None else ""
    return ArchiveFormatError(f"{path}: column {column!r} holds a non-numeric value{where}; "
                              f"numbers or empty fields expected ({message})")


def _first_non_numeric(path: Path, column: str) -> tuple[int | None, str | None]:
    """Slow path, only after a failure: the first row whose ``column`` value is not a number."""
    offset = 0
    for batch in _text_batches(path, [column], {column: pa.string()}):
        values = batch.column(0).to_pylist()
        for i, v in enumerate(values):
            if v is None or v.strip() == "":
                continue
            try:
                float(v)
            except ValueError:
                return offset + i, v
        offset += len(values)
    return None, None


# --- XP list columns ------------------------------------------------------------------------------

def parse_list_column(array: pa.Array, path: Path, column: str, first_row: int,
                      length: int = N_XP_COEFFICIENTS) -> np.ndarray:
    """``"(v1, ...)"`` / ``"[v1,...]"`` strings → float64 ``(n, length)``; empty/null → NaN row.

    Raises ArchiveFormatError naming ``path``, ``column`` and the first bad row (``first_row`` is
    the file row of ``array[0]``) for a wrong list length or a non-numeric element.
    """
    if isinstance(array, pa.ChunkedArray):
        array = array.combine_chunks()
    if pa.types.is_large_string(array.type):
        array = array.cast(pa.string())
    n = len(array)
    out = np.full((n, length), np.nan)
    if n == 0:
        return out
    _, offsets_buf, data_buf = array.buffers()
    offsets = np.frombuffer(offsets_buf, dtype=np.int32)[array.offset:array.offset + n + 1]
    starts, ends = offsets[:-1].astype(np.int64), offsets[1:].astype(np.int64)
    if data_buf is None or offsets[-1] == offsets[0]:
        return out
    text = np.frombuffer(data_buf, dtype=np.uint8)[offsets[0]:offsets[-1]].copy()
    starts, ends = starts - offsets[0], ends - offsets[0]  # null rows have start == end
    nonempty = np.flatnonzero(ends > starts)
    s, e = starts[nonempty], ends[nonempty]
    bad = ~np.isin(text[s], _OPENERS) | ~np.isin(text[e - 1], _CLOSERS) | (e - s < 2)
    if bad.any():
        r = nonempty[np.argmax(bad)]
        raise ArchiveFormatError(
            f"{path}: column {column!r} row {first_row + r}: expected a list like '(v1, v2, ...)' or "
            f"'[v1,v2,...]', got {bytes(text[starts[r]:min(ends[r], starts[r] + 40)]).decode(errors='replace')!r}")
    # "()" / "[]" (an empty list) is missing, like an empty field: blank it out of the byte stream
    empty = e - s == 2
    text[s[empty]] = _SPACE
    text[s[empty] + 1] = _SPACE
    rows = nonempty[~empty]
    if len(rows) == 0:
        return out
    s, e = starts[rows], ends[rows]
    # "(a, b)" → " a, b," : every present row then holds exactly one comma per element
    text[s] = _SPACE
    text[e - 1] = _COMMA
    commas = np.flatnonzero(text == _COMMA)
    counts = np.searchsorted(commas, e) - np.searchsorted(commas, s)
    wrong = counts != length
    if wrong.any():
        r = rows[np.argmax(wrong)]
        raise ArchiveFormatError(
            f"{path}: column {column!r} row {first_row + r} has {counts[np.argmax(wrong)]} values, "
            f"expected {length} (Gaia DR3 XP lists have {length})")
    # the rows' bytes are contiguous except for gaps of missing rows, which are empty: one parse
    body = text[s[0]:e[-1] - 1].tobytes()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        try:
            values = np.fromstring(body, dtype=np.float64, sep=",")
        except (ValueError, DeprecationWarning):
            values = None
    if values is None or len(values) != len(rows) * length:
        r = _first_unparsable_row(text, starts, ends, rows)
        raise ArchiveFormatError(
            f"{path}: column {column!r} row {first_row + r}: a list element is not a number")
    out[rows] = values.reshape(len(rows), length)
    return out


def _first_unparsable_row(text: np.ndarray, starts, ends, rows) -> int:
    for r in rows:
        try:
            [float(v) for v in bytes(text[starts[r]:ends[r] - 1]).decode().split(",")]
        except ValueError:
            return int(r)
    return int(rows[0])


def _xp_from_fits_column(values, path: Path, column: str, length: int = N_XP_COEFFICIENTS) -> np.ndarray:
    """FITS fixed (n, 55) or variable-length (``PD()``) array column → float64 (n, 55), NaN if empty."""
    arr = np.asarray(values) if getattr(values, "ndim", 1) == 2 else None
    if arr is not None and arr.dtype != object:
        if arr.shape[1] != length:
            raise ArchiveFormatError(f"{path}: column {column!r} has {arr.shape[1]} values per row, expected {length}")
        return arr.astype(np.float64)
    out = np.full((len(values), length), np.nan)
    for i, row in enumerate(values):
        row = np.asarray(row, dtype=np.float64)
        if row.size == 0:
            continue
        if row.size != length:
            raise ArchiveFormatError(f"{path}: column {column!r} row {i} has {row.size} values, expected {length}")
        out[i] = row
    return out


def _fits_table(hdul, path: Path):
    for hdu in hdul[1:]:
        if hdu.columns is not None and hasattr(hdu, "data"):
            return hdu
    raise ArchiveFormatError(f"{path}: no binary table extension in this FITS file")


def iter_xp(path: str | Path, extra_columns: Sequence[str] = (), block_bytes: int = BLOCK_BYTES,
            progress: Callable[[int], None] | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Stream an XP continuous table as dicts of arrays, one per block of rows.

    Each dict holds ``source_id`` (int64, (n,)), the four ``XP_LIST_COLUMNS`` as float32 (n, 55)
    (an empty BP or RP block is NaN for that block only), and ``extra_columns`` (float64) that the
    file has. ``progress(bytes_read)`` is called after each block of a text file.
    """
    path = Path(path)
    kind = file_kind(path)
    if kind == "parquet":
        raise ArchiveFormatError(f"{path}: XP spectra are read from CSV, ECSV or FITS files")
    if kind == "fits":
        yield _read_xp_fits(path, extra_columns)
        return
    names = text_header(path)[0]
    extras = [c for c in extra_columns if c in names and c not in XP_LIST_COLUMNS and c != SOURCE_ID]
    columns = [SOURCE_ID, *XP_LIST_COLUMNS, *extras]
    types = {SOURCE_ID: pa.string(), **{c: pa.string() for c in XP_LIST_COLUMNS},
             **{c: pa.float64() for c in extras}}
    first_row = 0
    for batch in _text_batches(path, columns, types, block_bytes, progress):
        yield _xp_block(batch, path, first_row, extras)
        first_row += batch.num_rows


def _xp_block(batch: pa.RecordBatch, path: Path, first_row: int, extras: Sequence[str]) -> dict[str, np.ndarray]:
    out = {SOURCE_ID: parse_source_ids(batch.column(SOURCE_ID), path, SOURCE_ID, first_row)}
    for column in XP_LIST_COLUMNS:
        out[column] = parse_list_column(batch.column(column), path, column, first_row).astype(np.float32)
    for column in extras:
        out[column] = batch.column(column).to_numpy(zero_copy_only=False).astype(np.float64)
    return out


def _read_xp_fits(path: Path, extra_columns: Sequence[str]) -> dict[str, np.ndarray]:
    from astropy.io import fits
    try:
        with fits.open(path, memmap=True) as hdul:
            hdu = _fits_table(hdul, path)
            names = list(hdu.columns.names)
            _require(path, names, [SOURCE_ID, *XP_LIST_COLUMNS])
            data = hdu.data
            n = 0 if data is None else len(data)
            out = {SOURCE_ID: parse_source_ids(data[SOURCE_ID], path) if n else np.empty(0, np.int64)}
            for column in XP_LIST_COLUMNS:
                out[column] = (_xp_from_fits_column(data[column], path, column) if n
                               else np.empty((0, N_XP_COEFFICIENTS))).astype(np.float32)
            for column in extra_columns:
                if column in names and column not in out:
                    out[column] = _fits_numeric(data, column, path, n)
            return out
    except (OSError, TypeError, zlib.error) as err:
        raise ArchiveFormatError(f"{path}: cannot read this FITS file ({err}); is it complete?") from err


def _fits_numeric(data, column: str, path: Path, n: int) -> np.ndarray:
    if not n:
        return np.empty(0)
    values = np.ma.filled(np.ma.asarray(data[column]).astype(np.float64), np.nan) \
        if np.ma.isMaskedArray(data[column]) else np.asarray(data[column])
    if values.dtype.kind not in "iuf":
        raise ArchiveFormatError(f"{path}: column {column!r} is not numeric ({values.dtype})")
    return values.astype(np.float64)


def read_xp(path: str | Path, extra_columns: Sequence[str] = ()) -> dict[str, np.ndarray]:
    """A whole XP continuous table (see :func:`iter_xp`) concatenated into one dict."""
    return concat_blocks(list(iter_xp(path, extra_columns)), path)


def concat_blocks(blocks: list[dict[str, np.ndarray]], path: str | Path) -> dict[str, np.ndarray]:
    if not blocks:
        raise ArchiveFormatError(f"{path}: no rows could be read")
    return {k: np.concatenate([b[k] for b in blocks]) for k in blocks[0]}


# --- gaia_source tables ---------------------------------------------------------------------------

def read_table(path: str | Path, columns: Sequence[str], optional: Sequence[str] = (),
               block_bytes: int = BLOCK_BYTES) -> dict[str, np.ndarray]:
    """``source_id`` (int64) and numeric ``columns`` (float64, NaN = null) of a gaia_source table.

    ``columns`` are required (missing → ArchiveFormatError naming file and column); ``optional``
    ones are read when the file has them. CSV(.gz), ECSV, FITS or Parquet.
    """
    path = Path(path)
    kind = file_kind(path)
    available = table_columns(path)
    _require(path, available, [SOURCE_ID, *columns])
    wanted = list(dict.fromkeys([*columns, *(c for c in optional if c in available)]))
    wanted = [c for c in wanted if c != SOURCE_ID]
    if table_format(path) == "ecsv":
        return _read_ecsv_table(path, wanted)
    if kind == "text":
        types = {SOURCE_ID: pa.string(), **{c: pa.float64() for c in wanted}}
        batches = list(_text_batches(path, [SOURCE_ID, *wanted], types, block_bytes))
        table = pa.Table.from_batches(batches) if batches else None
        return _arrow_to_numpy(table, path, wanted)
    if kind == "parquet":
        import pyarrow.parquet as pq
        try:
            table = pq.read_table(path, columns=[SOURCE_ID, *wanted])
        except (OSError, pa.ArrowInvalid) as err:
            raise ArchiveFormatError(f"{path}: cannot read this Parquet file ({err})") from err
        for c in wanted:
            if not (pa.types.is_integer(table[c].type) or pa.types.is_floating(table[c].type)):
                raise ArchiveFormatError(f"{path}: column {c!r} is {table[c].type}, not numeric")
        return _arrow_to_numpy(table, path, wanted)
    from astropy.io import fits
    try:
        with fits.open(path, memmap=True) as hdul:
            data = _fits_table(hdul, path).data
            n = 0 if data is None else len(data)
            out = {SOURCE_ID: parse_source_ids(data[SOURCE_ID], path) if n else np.empty(0, np.int64)}
            for c in wanted:
                out[c] = _fits_numeric(data, c, path, n)
            return out
    except (OSError, TypeError, zlib.error) as err:
        raise ArchiveFormatError(f"{path}: cannot read this FITS file ({err}); is it complete?") from err


def _read_ecsv_table(path: Path, wanted: list[str]) -> dict[str, np.ndarray]:
    """A gaia_source ECSV through astropy (msa.data.tables): its declared types, delimiter and nulls."""
    try:
        frame = read_frame(path, [SOURCE_ID, *wanted])
    except TableError as err:
        raise ArchiveFormatError(str(err)) from err
    out = {SOURCE_ID: frame[SOURCE_ID].to_numpy(dtype=np.int64)}
    for c in wanted:
        if frame[c].dtype.kind not in "iuf":
            raise ArchiveFormatError(f"{path}: column {c!r} is {frame[c].dtype}, not numeric; "
                                     "export it as a number column")
        out[c] = frame[c].to_numpy(dtype=np.float64)
    return out


def _arrow_to_numpy(table: pa.Table | None, path: Path, wanted: list[str]) -> dict[str, np.ndarray]:
    if table is None or table.num_rows == 0:
        return {SOURCE_ID: np.empty(0, dtype=np.int64), **{c: np.empty(0) for c in wanted}}
    out = {SOURCE_ID: parse_source_ids(table[SOURCE_ID], path)}
    for c in wanted:
        out[c] = table[c].cast(pa.float64()).to_numpy()  # nulls → NaN
    return out


def check_unique_ids(source_id: np.ndarray, path: str | Path) -> None:
    """Raise naming ``path`` if any source_id occurs more than once."""
    if len(source_id) < 2:
        return
    ids = np.sort(source_id)
    dup = ids[1:][ids[1:] == ids[:-1]]
    if len(dup):
        dup = np.unique(dup)
        raise ArchiveFormatError(
            f"{path}: {len(dup)} duplicate source_id(s), e.g. {dup[:3].tolist()}; each star may appear once")
