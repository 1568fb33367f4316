"""Stream a shard or a user's table, chunk by chunk, through a function into one Parquet file.

The per-star outputs that are not label predictions (``msa reconstruct``, ``msa embed``) share
prediction's machinery: raw chunks are read in a background thread (``msa.prefetch``), turned
into one Arrow table each by the caller's function, appended as one row group by prediction's
background writer, and the written ``source_id`` column is checked against the input's, row for
row, before the file is renamed into place. Memory is bounded by a few chunks, whatever the
input's size.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pyarrow as pa

from msa.predict import BackgroundParquetWriter, verify_source_ids
from msa.prefetch import prefetch
from msa.progress import progress
from msa.star_sources import open_source
from msa.store import atomic_path


@dataclass
class StreamSummary:
    n_rows: int
    seconds: float

    @property
    def stars_per_second(self) -> float:
        return self.n_rows / self.seconds if self.seconds > 0 else float("nan")


def stream_to_parquet(source: str | Path, is_shard: bool, columns: Sequence[str], out: str | Path,
                      schema: pa.Schema, chunk_table: Callable[[dict[str, np.ndarray]], pa.Table], *,
                      chunk_rows: int, allow_missing: bool = False) -> StreamSummary:
    """Write ``chunk_table(raw)`` for every chunk of ``source`` (its ``source_id`` plus ``columns``)
    to ``out`` atomically, in input order; returns the row count and the wall time."""
    source = open_source(source, is_shard, columns, chunk_rows, allow_missing=allow_missing)
    t0 = time.perf_counter()
    with atomic_path(out) as tmp:
        writer = BackgroundParquetWriter(tmp, schema)
        try:
            for raw in progress(prefetch(source.chunks()), total=source.n_chunks, desc=Path(out).name,
                                unit="chunk"):
                writer.put(chunk_table(raw))
        finally:
            writer.close()
        verify_source_ids(tmp, source.expected_ids(), out)
    return StreamSummary(source.n_rows, time.perf_counter() - t0)
