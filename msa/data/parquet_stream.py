"""Stream a shard or a user's table, chunk by chunk, through a function into one Parquet file.

The per-star outputs that are not label predictions (``msa reconstruct``, ``msa embed``) share
prediction's machinery: raw chunks are read in a background thread (``msa.data.prefetch``), turned
into one Arrow table each by the caller's function, appended as one row group by prediction's
background writer, and the written ``source_id`` column is checked against the input's, row for
row, before the file is renamed into place. Memory is bounded by a few chunks, whatever the
input's size.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from msa.data.prefetch import prefetch
from msa.data.star_sources import open_source
from msa.data.store import SOURCE_ID
from msa.data.store import atomic_path
from msa.errors import InputError
from msa.progress import progress


PARQUET_COMPRESSION = "zstd"


class OutputCheckError(InputError, RuntimeError):
    """A written file fails the exactness checks (its rows are not the input's)."""


_DONE = object()


class BackgroundParquetWriter:
    """Appends tables (one row group each) to a Parquet file from a background thread."""

    def __init__(self, path: Path, schema: pa.Schema, depth: int = 2):
        self._writer = pq.ParquetWriter(path, schema, compression=PARQUET_COMPRESSION)
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="msa-parquet-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            table = self._queue.get()
            if table is _DONE:
                return
            if self._error is None:
                try:
                    self._writer.write_table(table, row_group_size=max(table.num_rows, 1))
                except BaseException as err:  # re-raised by put/close in the calling thread
                    self._error = err

    def put(self, table: pa.Table) -> None:
        if self._error is not None:
            raise self._error
        self._queue.put(table)

    def close(self) -> None:
        self._queue.put(_DONE)
        self._thread.join()
        self._writer.close()
        if self._error is not None:
            raise self._error


def verify_source_ids(parquet_path: Path, expected: Iterable[np.ndarray], out) -> None:
    """The written ``source_id`` column must equal the input's, row for row (streamed, bounded memory)."""
    written = (b.column(0).to_numpy() for b in
               pq.ParquetFile(parquet_path).iter_batches(columns=[SOURCE_ID], batch_size=1 << 16))
    n, pending_w, pending_e = 0, np.empty(0, np.int64), np.empty(0, np.int64)
    w_iter, e_iter = iter(written), iter(expected)
    w_done = e_done = False
    while True:
        while len(pending_w) == 0 and not w_done:
            nxt = next(w_iter, None)
            w_done = nxt is None
            pending_w = pending_w if nxt is None else nxt
        while len(pending_e) == 0 and not e_done:
            nxt = next(e_iter, None)
            e_done = nxt is None
            pending_e = pending_e if nxt is None else np.asarray(nxt, dtype=np.int64)
        if len(pending_w) == 0 or len(pending_e) == 0:
            break
        m = min(len(pending_w), len(pending_e))
        if not np.array_equal(pending_w[:m], pending_e[:m]):
            i = int(np.argmax(pending_w[:m] != pending_e[:m]))
            raise OutputCheckError(f"{out}: row {n + i} has source_id {pending_w[i]} but the input has "
                                  f"{pending_e[i]}; the file was not written")
        n += m
        pending_w, pending_e = pending_w[m:], pending_e[m:]
    if len(pending_w) or len(pending_e) or not (w_done and e_done):
        raise OutputCheckError(f"{out}: {'more' if len(pending_w) else 'fewer'} rows written than the input has "
                              f"(agreed on the first {n}); the file was not written")




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
