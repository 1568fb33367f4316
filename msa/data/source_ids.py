"""The one exact reader of Gaia ``source_id`` columns, for every table format the package reads.

Gaia DR3 source_ids reach ~6.9e18, far above 2**53, so a float (or float text such as
``"4295806720.0"`` or ``"5.1e18"``) has lost digits and cannot be trusted: it is refused, naming
the file, the column and the first bad row, never rounded. Accepted: integer columns (any width,
signed or unsigned within int64) and text of decimal digits (surrounding spaces allowed).

Text readers read the column as strings and hand it here; binary formats hand their integer
column. This module is a leaf.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from msa.errors import InputError

SOURCE_ID = "source_id"
_INTEGER_TEXT = r"^\s*\+?[0-9]+\s*$"
_INT64_MAX = np.iinfo(np.int64).max


class SourceIdError(InputError, ValueError):
    """A source_id column holds a value that is not an exact integer."""


def _bad(path, column: str, row: int, value, why: str) -> SourceIdError:
    return SourceIdError(
        f"{path}: column {column!r} row {row}: {value!r} {why}; write Gaia source_ids as integers "
        "(a float, or float text such as '...504.0', has lost digits above 2**53)")


def _as_arrow(values) -> pa.Array:
    """Any column (pyarrow, numpy, masked, pandas, astropy) as one pyarrow array, nulls kept."""
    if isinstance(values, pa.ChunkedArray):
        return values.combine_chunks()
    if isinstance(values, pa.Array):
        return values
    if hasattr(values, "to_numpy") and hasattr(values, "isna"):  # pandas Series
        return pa.Array.from_pandas(values)
    mask = np.ma.getmaskarray(values) if np.ma.isMaskedArray(values) or hasattr(values, "mask") else None
    data = np.asarray(np.ma.getdata(values))
    if data.dtype.kind in "SU" or data.dtype == object:
        data = data.astype(str) if data.dtype.kind == "S" else data
        return pa.array(data.tolist(), mask=mask if mask is not None and mask.any() else None)
    if not data.dtype.isnative:  # FITS columns are big-endian; pyarrow takes native order only
        data = data.astype(data.dtype.newbyteorder("="))
    return pa.array(data, mask=mask if mask is not None and mask.any() else None)


def parse_source_ids(values, path, column: str = SOURCE_ID, first_row: int = 0) -> np.ndarray:
    """``values`` as exact int64 source_ids; a float, float text, empty or out-of-range value is a
    :class:`SourceIdError` naming ``path``, ``column`` and the row (``first_row`` = row of ``values[0]``,
    rows count from 0 = the first data row)."""
    arr = _as_arrow(values)
    if arr.null_count:
        row = int(np.argmax(np.asarray(arr.is_null())))
        raise _bad(path, column, first_row + row, "", "is empty (every row needs a source_id)")
    kind = arr.type
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
        arr = arr.cast(pa.string())
    elif pa.types.is_large_string(kind):
        arr = arr.cast(pa.string())
    if pa.types.is_string(arr.type):
        ok = np.asarray(pc.match_substring_regex(arr, _INTEGER_TEXT))
        if not ok.all():
            row = int(np.argmax(~ok))
            raise _bad(path, column, first_row + row, arr[row].as_py(), "is not an integer")
        trimmed = pc.utf8_trim_whitespace(arr)
        try:
            return np.asarray(trimmed.cast(pa.int64()))
        except pa.ArrowInvalid:  # more digits than int64 holds
            big = np.array([int(v) > _INT64_MAX for v in trimmed.to_pylist()])
            row = int(np.argmax(big))
            raise _bad(path, column, first_row + row, arr[row].as_py(), "exceeds the int64 range") from None
    if pa.types.is_unsigned_integer(arr.type):
        ints = np.asarray(arr)
        if ints.dtype == np.uint64 and len(ints) and ints.max() > _INT64_MAX:
            row = int(np.argmax(ints > _INT64_MAX))
            raise _bad(path, column, first_row + row, int(ints[row]), "exceeds the int64 range")
        return ints.astype(np.int64)
    if pa.types.is_integer(arr.type):
        return np.asarray(arr).astype(np.int64, copy=False)
    if pa.types.is_null(arr.type) and len(arr) == 0:
        return np.empty(0, np.int64)
    example = arr[0].as_py() if len(arr) else None
    raise SourceIdError(
        f"{path}: column {column!r} has type {arr.type}, not integer (row {first_row}: {example!r}); "
        "write Gaia source_ids as 64-bit integers (a float column has lost digits above 2**53)")
