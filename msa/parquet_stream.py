"""Stream a shard or a user's table, chunk by chunk, through a function into one Parquet file.

The per-star outputs that are not label predictions (``msa reconstruct``, ``msa embed``) share
prediction's machinery: raw chunks are read in a background thread (``msa.prefetch``), turned
into one Arrow table each by the caller's function, appended as one row group by prediction's
background writer, and the written ``source_id`` column is checked against the input's, row for
row, before the file is renamed into place. Memory is bounded by a few chunks, whatever the
input's size.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pyarrow as pa

from msa.errors import InputError
from msa.predict import BackgroundParquetWriter, strictly_increasing_ids, verify_source_ids
from msa.prefetch import prefetch
from msa.progress import progress
from msa.store import SOURCE_ID, Shard, atomic_path
from msa.tables import iter_table_chunks, read_table_source_ids


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
    source = Path(source)
    wanted = [SOURCE_ID, *columns]
    if is_shard:
        with Shard(source) as shard:
            missing = [c for c in wanted if c not in set(shard.columns)]
            n_rows = shard.n_rows
        if missing:
            raise InputError(f"shard {source} lacks column(s) {missing[:8]} that the model reads; "
                             "ingest it with the config the model was trained with")

        def chunks():
            with Shard(source) as s:  # its own handle: read in the prefetch thread
                yield from s.iter_chunks(wanted, chunk_rows)

        def expected_ids():
            with Shard(source) as s:
                yield from strictly_increasing_ids((c[SOURCE_ID] for c in s.iter_chunks([SOURCE_ID], 1 << 20)),
                                                   str(source))
    else:
        ids = read_table_source_ids(source)  # refuses repeated source_ids before any work
        n_rows = len(ids)

        def chunks():
            yield from iter_table_chunks(source, list(columns), chunk_rows, allow_missing)

        def expected_ids():
            return iter([ids])

    t0 = time.perf_counter()
    with atomic_path(out) as tmp:
        writer = BackgroundParquetWriter(tmp, schema)
        try:
            for raw in progress(prefetch(chunks()), total=math.ceil(n_rows / chunk_rows), desc=Path(out).name,
                                unit="chunk"):
                writer.put(chunk_table(raw))
        finally:
            writer.close()
        verify_source_ids(tmp, expected_ids(), out)
    return StreamSummary(n_rows, time.perf_counter() - t0)
