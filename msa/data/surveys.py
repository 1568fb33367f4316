"""Survey tables keyed by Gaia ``source_id`` (2MASS, WISE, PS1, ...), renamed for the store.

A survey is configured as ``{path, columns: {survey_column: store_name}, errors:
{survey_error_column: store_name}}``; :func:`read_survey` returns ``source_id`` (int64) and the
renamed columns (float64, NaN = missing), and :func:`join_survey` lines them up with a shard's
sorted source_ids. Survey tables are small next to XP files, so they are read whole
by :func:`msa.data.tables.read_frame` (ECSV with its declared types and delimiter).
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np
import pandas as pd

from msa.data.source_ids import SOURCE_ID
from msa.data.tables import TableError, read_frame
from msa.errors import InputError


class SurveyError(InputError, ValueError):
    """A survey table is unreadable, lacks a configured column, or repeats a source_id."""


def _read_frame(path: Path, columns: list[str]) -> pd.DataFrame:
    try:
        return read_frame(path, columns)
    except TableError as err:
        raise SurveyError(f"survey table {err}; check ingest.surveys (path, columns, errors) in the "
                          "config") from err


def read_survey(path: str | Path, columns: Mapping[str, str],
                errors: Mapping[str, str] | None = None) -> dict[str, np.ndarray]:
    """``source_id`` and each configured column under its store name (float64, NaN = missing)."""
    path = Path(path)
    mapping = {**dict(columns), **dict(errors or {})}
    names = list(mapping.values())
    dup_names = sorted({n for n in names if names.count(n) > 1})
    if dup_names:
        raise SurveyError(f"survey table {path}: store name(s) {dup_names} used twice in columns/errors")
    frame = _read_frame(path, [SOURCE_ID, *mapping])
    out = {SOURCE_ID: frame[SOURCE_ID].to_numpy(dtype=np.int64)}
    for column, store_name in mapping.items():
        values = pd.to_numeric(frame[column], errors="coerce")
        bad = values.isna() & frame[column].notna() & (frame[column].astype(str).str.strip() != "")
        if bad.any():
            row = int(np.argmax(bad.to_numpy()))
            raise SurveyError(f"survey table {path}: column {column!r} row {row} is not a number "
                              f"({frame[column].iloc[row]!r})")
        out[store_name] = values.to_numpy(dtype=np.float64)
    ids = np.sort(out[SOURCE_ID])
    dup = np.unique(ids[1:][ids[1:] == ids[:-1]])
    if len(dup):
        raise SurveyError(f"survey table {path}: {len(dup)} duplicate source_id(s), e.g. {dup[:3].tolist()}; "
                          "keep one row per star (e.g. the best cross-match) before ingesting")
    return out


def join_survey(shard_ids: np.ndarray, survey: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], int]:
    """Survey columns aligned to ``shard_ids``: NaN for stars without a survey row.

    Survey rows for stars not in the shard are ignored. Returns the columns and the match count.
    """
    sid = survey[SOURCE_ID]
    order = np.argsort(sid, kind="stable")
    sorted_ids = sid[order]
    pos = np.clip(np.searchsorted(sorted_ids, shard_ids), 0, max(len(sorted_ids) - 1, 0))
    matched = (sorted_ids[pos] == shard_ids) if len(sorted_ids) else np.zeros(len(shard_ids), bool)
    rows = order[pos[matched]]
    out = {}
    for name, values in survey.items():
        if name == SOURCE_ID:
            continue
        column = np.full(len(shard_ids), np.nan)
        column[matched] = values[rows]
        out[name] = column
    return out, int(matched.sum())
