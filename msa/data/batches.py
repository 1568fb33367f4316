"""Streaming batches from the shard store: chunked reads → shuffle buffer → prefetched tensors.

Memory is bounded by the shuffle buffer (``buffer_rows``) and the prefetch queue, never by the
size of the store: shards are read in contiguous, storage-chunk-aligned slices (``Shard.read``),
transformed with the pipeline's single :class:`~msa.data.features.FeatureTransform`, collected in a
buffer that is permuted and cut into batches when full. A background thread does the reading,
decompression and transform while the training step runs (h5py and torch both release the
interpreter during their heavy work), and hands batches over through a bounded queue.

A ``row_join`` attaches per-row values that are not store columns (fine-tuning's labels, looked
up by ``source_id`` per chunk) and drops the rows without them; a :class:`ChunkCache` keeps the
transformed chunks of a small selection in memory, so its later epochs read no file.

Under DDP each rank streams a disjoint set of shards (shard ``i`` → rank ``i % world_size``).
The order of shards and of chunks inside them is a pure function of ``(seed, epoch, rank)``, so
an epoch can be replayed exactly (``skip_batches`` resumes mid-epoch).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from msa.data.features import FeatureTransform
from msa.data.prefetch import prefetch
from msa.data.star_hash import hash_uniform
from msa.data.store import SOURCE_ID, Shard, StoreError

log = logging.getLogger(__name__)

VALIDATION_SALT = 0x5A11D  # keeps the validation hash independent of the mask hash for the same seed


@dataclass
class Batch:
    """One batch: scaled inputs and errors ``(B, F)`` float32 (NaN = missing), the Gaia
    ``source_id`` of each row (int64 numpy), and any extra raw store columns (float32 tensors)."""

    x: torch.Tensor
    err: torch.Tensor
    source_id: np.ndarray
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.source_id)

    def to(self, device: torch.device) -> "Batch":
        nb = device.type == "cuda"
        return Batch(self.x.to(device, non_blocking=nb), self.err.to(device, non_blocking=nb), self.source_id,
                     {k: v.to(device, non_blocking=nb) for k, v in self.extra.items()})


def hash_fraction(source_id: np.ndarray, seed: int) -> np.ndarray:
    """A number in [0, 1) per star, fixed by its ``source_id`` and ``seed`` (validation split:
    a star is a validation star iff ``hash_fraction < validation_fraction``)."""
    return hash_uniform(source_id, seed, VALIDATION_SALT)


def assign_shards(shard_paths: Sequence[str | Path], rank: int, world_size: int) -> list[Path]:
    """This rank's shards: shard ``i`` of the given list goes to rank ``i % world_size``."""
    mine = [Path(p) for i, p in enumerate(shard_paths) if i % world_size == rank]
    if not mine:
        raise ValueError(f"rank {rank} of {world_size} gets no shard out of {len(shard_paths)}; "
                         "run with at most as many processes as shards")
    return mine


def _storage_chunk(shard: Shard) -> int:
    chunks = shard._file[SOURCE_ID].chunks
    return int(chunks[0]) if chunks else 0


def _read_block(shard: Shard, names: Sequence[str], start: int, stop: int) -> dict[str, np.ndarray]:
    try:
        return shard.read(names, start, stop)
    except StoreError:
        raise
    except Exception as err:  # h5py raises several types for corrupt data; name the shard either way
        raise StoreError(f"shard {shard.path}: reading rows {start}:{stop} failed: {err}") from err


RowJoin = Callable[[dict[str, np.ndarray]], tuple[np.ndarray, dict[str, np.ndarray]]]


class ChunkCache:
    """Transformed chunks of a stream, kept across epochs when the whole selection fits.

    All or nothing: a stream fills the cache only if ``enabled`` (the caller decides, from a row
    count, that every selected row fits in ``max_rows``), so memory never grows past that bound
    and a cached epoch yields exactly the batches a read one would (same order, same rows).
    """

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self._chunks: dict[tuple[Path, int], dict[str, np.ndarray]] = {}

    def get(self, path: Path, start: int) -> dict[str, np.ndarray] | None:
        return self._chunks.get((path, start))

    def put(self, path: Path, start: int, arrays: dict[str, np.ndarray]) -> None:
        if self.enabled:
            self._chunks[(path, start)] = arrays

    def __len__(self) -> int:
        return sum(len(a[SOURCE_ID]) for a in self._chunks.values())


def _open(path: Path) -> Shard:
    try:
        return Shard(path)
    except StoreError:
        raise
    except Exception as err:
        raise StoreError(f"cannot open shard {path}: {err}") from err


class ShardStream:
    """Iterable of :class:`Batch` over one epoch of this rank's shards.

    ``chunk_rows`` rows are read per HDF5 read (rounded up to whole storage chunks so no chunk is
    decompressed twice); ``buffer_rows`` bounds the shuffle buffer; ``row_filter(source_id) ->
    bool mask`` keeps a subset of stars (e.g. the validation split); ``extra_columns`` are raw
    store columns returned unscaled in ``Batch.extra``. ``row_join(raw) -> (keep, arrays)`` sees
    each chunk's raw columns (``source_id``, the transform's, ``join_columns``) after
    ``row_filter``, keeps the rows of ``keep`` and adds its per-row ``arrays`` (float32, one row
    per kept row) to ``Batch.extra``. ``cache`` serves chunks already read in an earlier epoch
    (an empty chunk, with no row kept, is cached too). ``skip_batches`` drops the first batches of
    the (deterministic) epoch; ``max_batches`` stops early (DDP ranks agree on a common count).
    """

    def __init__(
        self,
        shard_paths: Sequence[str | Path],
        transform: FeatureTransform,
        chunk_rows: int = 8192,
        buffer_rows: int = 131072,
        batch_size: int = 2048,
        seed: int = 0,
        epoch: int = 0,
        rank: int = 0,
        world_size: int = 1,
        row_filter: Callable[[np.ndarray], np.ndarray] | None = None,
        extra_columns: Sequence[str] = (),
        drop_last: bool = False,
        shuffle: bool = True,
        prefetch_batches: int = 6,
        pin_memory: bool | None = None,
        skip_batches: int = 0,
        max_batches: int | None = None,
        shards_in_flight: int = 4,
        row_join: RowJoin | None = None,
        join_columns: Sequence[str] = (),
        cache: ChunkCache | None = None,
    ):
        if batch_size < 1 or chunk_rows < 1 or buffer_rows < 1:
            raise ValueError("ShardStream: batch_size, chunk_rows and buffer_rows must be positive")
        self.shards = assign_shards(shard_paths, rank, world_size)
        self.transform = transform
        self.chunk_rows = chunk_rows
        self.buffer_rows = max(buffer_rows, batch_size)
        self.batch_size = batch_size
        self.seed, self.epoch, self.rank = seed, epoch, rank
        self.row_filter = row_filter
        self.extra_columns = list(extra_columns)
        self.drop_last = drop_last
        self.shuffle = shuffle
        self.prefetch_batches = prefetch_batches
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.skip_batches = skip_batches
        self.max_batches = max_batches
        self.shards_in_flight = max(1, shards_in_flight)
        self.row_join = row_join
        self.join_columns = list(join_columns)
        self.cache = cache
        self.columns = list(dict.fromkeys([SOURCE_ID, *transform.store_columns, *self.extra_columns,
                                           *self.join_columns]))

    # --- sizes --------------------------------------------------------------------------------
    def count_rows(self) -> int:
        """Rows this rank will stream per epoch (after ``row_filter``); reads only ``source_id``."""
        total = 0
        names = [SOURCE_ID, *self.join_columns]
        for path in self.shards:
            with _open(path) as shard:
                if self.row_filter is None and self.row_join is None:
                    total += shard.n_rows
                    continue
                step = max(self.chunk_rows, 65536)
                for start in range(0, shard.n_rows, step):
                    raw = _read_block(shard, names, start, start + step)
                    keep = self._kept(raw)
                    total += len(raw[SOURCE_ID]) if keep is None else int(np.count_nonzero(keep))
        return total

    def _kept(self, raw: dict[str, np.ndarray]) -> np.ndarray | None:
        """Rows of a raw chunk that ``row_filter`` and ``row_join`` keep (None: every row)."""
        keep = None if self.row_filter is None else self.row_filter(raw[SOURCE_ID])
        if self.row_join is not None:
            rows = raw if keep is None else {c: v[keep] for c, v in raw.items()}
            joined = self.row_join(rows)[0]
            if keep is None:
                keep = joined
            else:
                keep = keep.copy()
                keep[keep] = joined
        return keep

    def n_batches(self, n_rows: int) -> int:
        """Batches an epoch of ``n_rows`` rows yields (before ``skip``/``max_batches``)."""
        return n_rows // self.batch_size if self.drop_last else -(-n_rows // self.batch_size)

    # --- the synchronous pipeline -------------------------------------------------------------
    def _chunks(self, rng: np.random.Generator) -> Iterator[dict[str, np.ndarray]]:
        """Transformed chunks (``_as_arrays``) in the epoch's order, from the cache where it has them."""
        order = rng.permutation(len(self.shards)) if self.shuffle else np.arange(len(self.shards))
        for g in range(0, len(order), self.shards_in_flight):
            group = [self.shards[i] for i in order[g:g + self.shards_in_flight]]
            opened: list[Shard] = []
            try:
                blocks = []
                for k, path in enumerate(group):
                    shard = _open(path)
                    opened.append(shard)
                    storage = _storage_chunk(shard) or self.chunk_rows
                    step = -(-self.chunk_rows // storage) * storage
                    blocks += [(k, s, s + step) for s in range(0, shard.n_rows, step)]
                # interleave the chunks of a few shards so a buffer mixes stars from several files
                if self.shuffle:
                    blocks = [blocks[i] for i in rng.permutation(len(blocks))]
                for k, start, stop in blocks:
                    path = opened[k].path
                    arrays = self.cache.get(path, start) if self.cache is not None else None
                    if arrays is None:
                        arrays = self._read_chunk(opened[k], start, stop)
                        if self.cache is not None:
                            self.cache.put(path, start, arrays)
                    if len(arrays[SOURCE_ID]):
                        yield arrays
            finally:
                for shard in opened:
                    shard.close()

    def _read_chunk(self, shard: Shard, start: int, stop: int) -> dict[str, np.ndarray]:
        raw = _read_block(shard, self.columns, start, stop)
        joined: dict[str, np.ndarray] = {}
        if self.row_filter is not None:
            keep = self.row_filter(raw[SOURCE_ID])
            if not keep.all():
                raw = {c: v[keep] for c, v in raw.items()}
        if self.row_join is not None:
            keep, joined = self.row_join(raw)
            raw = {c: v[keep] for c, v in raw.items()}
        return self._as_arrays(shard.path, raw, joined)

    def _as_arrays(self, path: Path, raw: dict[str, np.ndarray], joined: dict[str, np.ndarray]
                   ) -> dict[str, np.ndarray]:
        try:
            x, err = self.transform(raw)
        except Exception as error:
            raise StoreError(f"shard {path}: deriving the model inputs failed: {error}") from error
        out = {"x": np.ascontiguousarray(x, dtype=np.float32), "err": np.ascontiguousarray(err, dtype=np.float32),
               SOURCE_ID: raw[SOURCE_ID]}
        for c in self.extra_columns:
            out["extra:" + c] = raw[c].astype(np.float32, copy=False)
        for c, values in joined.items():
            out["extra:" + c] = np.ascontiguousarray(values, dtype=np.float32)
        return out

    def _make_batch(self, arrays: dict[str, np.ndarray], idx: np.ndarray) -> Batch:
        def tensor(a: np.ndarray) -> torch.Tensor:
            t = torch.from_numpy(a[idx])
            return t.pin_memory() if self.pin_memory else t

        extra = {k[len("extra:"):]: tensor(v) for k, v in arrays.items() if k.startswith("extra:")}
        return Batch(tensor(arrays["x"]), tensor(arrays["err"]), arrays[SOURCE_ID][idx], extra)

    def batches(self) -> Iterator[Batch]:
        """The epoch's batches, without a background thread."""
        rng = np.random.default_rng([self.seed, self.epoch, self.rank])
        pending: list[dict[str, np.ndarray]] = []
        n_pending = 0
        emitted = 0
        limit = self.max_batches

        def flush(final: bool):
            nonlocal pending, n_pending, emitted
            merged = {k: np.concatenate([p[k] for p in pending]) for k in pending[0]}
            n = len(merged[SOURCE_ID])
            perm = rng.permutation(n) if self.shuffle else np.arange(n)
            n_full = n // self.batch_size
            for b in range(n_full):
                if limit is not None and emitted >= limit:
                    return
                if emitted >= self.skip_batches:
                    yield self._make_batch(merged, perm[b * self.batch_size:(b + 1) * self.batch_size])
                emitted += 1
            rest = perm[n_full * self.batch_size:]
            if final:
                pending, n_pending = [], 0
                if len(rest) and not self.drop_last and (limit is None or emitted < limit):
                    if emitted >= self.skip_batches:
                        yield self._make_batch(merged, rest)
                    emitted += 1
            else:
                # the partial remainder waits for the next fill (keeps every batch full-sized)
                pending = [{k: v[rest] for k, v in merged.items()}]
                n_pending = len(rest)

        for arrays in self._chunks(rng):
            pending.append(arrays)
            n_pending += len(arrays[SOURCE_ID])
            if n_pending >= self.buffer_rows:
                yield from flush(final=False)
            if limit is not None and emitted >= limit:
                return
        if n_pending:
            yield from flush(final=True)

    def __iter__(self) -> Iterator[Batch]:
        """Batches, produced by a background thread ``prefetch_batches`` ahead (0: inline)."""
        yield from prefetch(self.batches(), self.prefetch_batches)


def load_rows(shard_paths: Sequence[str | Path], transform: FeatureTransform, source_ids: np.ndarray,
              chunk_rows: int = 65536) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scaled inputs of the wanted stars: ``(x, err, source_id)`` numpy arrays, rows in shard
    order (each shard sorted by source_id). Stars not in any shard are simply absent.

    Reads ``source_id`` chunk-wise and, only for chunks that hold wanted stars, those rows of the
    feature columns; memory grows with the number of wanted stars, not with the store.
    """
    wanted = np.unique(np.asarray(source_ids, dtype=np.int64))
    xs, errs, sids = [], [], []
    columns = transform.store_columns
    for path in shard_paths:
        with _open(Path(path)) as shard:
            for start in range(0, shard.n_rows, chunk_rows):
                sid = _read_block(shard, [SOURCE_ID], start, start + chunk_rows)[SOURCE_ID]
                hit = np.isin(sid, wanted, assume_unique=True)
                if not hit.any():
                    continue
                rows = np.flatnonzero(hit)
                # a contiguous read of the span is cheaper than point selection when hits are dense
                lo, hi = int(rows[0]), int(rows[-1]) + 1
                raw = _read_block(shard, columns, start + lo, start + hi)
                raw = {c: v[rows - lo] for c, v in raw.items()}
                raw[SOURCE_ID] = sid[rows]
                x, err = transform(raw)
                xs.append(x)
                errs.append(err)
                sids.append(sid[rows])
    n_features = transform.layout.n_features
    if not sids:
        empty = np.empty((0, n_features), dtype=np.float32)
        return empty, empty.copy(), np.empty(0, dtype=np.int64)
    return np.concatenate(xs), np.concatenate(errs), np.concatenate(sids)
