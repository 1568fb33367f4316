"""The margin cache of a HATS catalogue: for each partition, the stars of other partitions within
``threshold`` arcsec of its boundary, so a cross-match near a partition edge finds its partner
(``lsdb.read_hats(catalogue, margin_cache=margin)``).

Built as hats-import's margin step builds one, with the ``hats`` library only (no dask cluster):
every star's pixel at the margin order ``m`` (the finest order whose pixels are at least
``threshold`` across, ``hats.pixel_math.healpix_shim.margin2order``) is looked up among the order-m
pixels that border each partition (``hats.pixel_math.pixel_margins.get_margin``); a star in such a
pixel goes to that partition's margin. So every star within ``threshold`` of a partition is in its
margin, with some a little farther (up to about one order-m pixel). Partitions must be coarser
than ``m``: a finer one would need stars beyond its bordering pixels.

Layout: a HATS catalogue of type ``margin`` beside the primary (``properties`` with
``hats_primary_table_url`` and ``hats_margin_threshold``), one ``Norder=K/Dir=D/Npix=N.parquet``
per partition with a non-empty margin, in the primary's schema. One partition read at a time.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from itertools import pairwise
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from msa.errors import InputError
from msa.progress import progress

SPATIAL_ORDER = 29


class MarginError(InputError, ValueError):
    """A margin threshold the catalogue's partitions cannot carry."""


def margin_order(threshold_arcsec: float, highest_partition_order: int) -> int:
    """The order of the pixels a margin is assembled from; refuses partitions as fine as it."""
    import hats.pixel_math.healpix_shim as hp

    order = int(hp.margin2order(threshold_arcsec / 60.0))
    if order <= highest_partition_order:
        raise MarginError(f"catalog.margin_threshold_arcsec = {threshold_arcsec} needs partitions coarser than "
                          f"order {order}, but one has order {highest_partition_order}; lower the threshold or "
                          "catalog.highest_order")
    return order


def bordering_pixels(partitions: Sequence[tuple[int, int]], order: int) -> tuple[np.ndarray, np.ndarray]:
    """(order-``order`` pixel, partition number) of every pixel that borders a partition, sorted by pixel."""
    from hats.pixel_math.pixel_margins import get_margin

    pixels, owners = [], []
    for k, (o, p) in enumerate(partitions):
        border = np.asarray(get_margin(o, p, order - o), dtype=np.int64)
        pixels.append(border)
        owners.append(np.full(len(border), k, dtype=np.int64))
    pixels = np.concatenate(pixels) if pixels else np.empty(0, np.int64)
    owners = np.concatenate(owners) if owners else np.empty(0, np.int64)
    sort = np.argsort(pixels, kind="stable")
    return pixels[sort], owners[sort]


def margin_destinations(index: np.ndarray, order: int, border: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(row, partition number) pairs: which rows (``_healpix_29`` values) lie in which partitions' margins."""
    pixels, owners = border
    star_pixel = index >> (2 * (SPATIAL_ORDER - order))
    lo, hi = np.searchsorted(pixels, star_pixel, "left"), np.searchsorted(pixels, star_pixel, "right")
    n = hi - lo
    rows = np.repeat(np.arange(len(index)), n)
    offsets = np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n)  # 0, 1, … within each row's run
    return rows, owners[np.repeat(lo, n) + offsets]


def write_margin(partition_paths: Sequence[Path], partitions: Sequence[tuple[int, int]],
                 margin_paths: Sequence[Path], threshold_arcsec: float, spatial_index: str,
                 schema: pa.Schema, scratch: Path) -> dict[tuple[int, int], int]:
    """Write the margin of each of ``partitions`` (order, pixel; files ``partition_paths``) to
    ``margin_paths`` (one per partition, written only when not empty), with fragments in ``scratch``;
    return the row count of each margin written."""
    if not partitions:
        return {}
    order = margin_order(threshold_arcsec, max(o for o, _ in partitions))
    border = bordering_pixels(partitions, order)
    fragments = scratch
    for source, path in enumerate(progress(partition_paths, desc="catalogue: margin", unit="partition")):
        table = pq.read_table(path)
        rows, dest = margin_destinations(table.column(spatial_index).to_numpy(), order, border)
        sort = np.argsort(dest, kind="stable")
        rows, dest = rows[sort], dest[sort]
        bounds = np.r_[0, np.flatnonzero(np.diff(dest)) + 1, len(dest)]
        for a, b in pairwise(bounds):
            if b > a:
                part = fragments / f"{int(dest[a]):07d}"
                part.mkdir(parents=True, exist_ok=True)
                pq.write_table(table.take(pa.array(rows[a:b])), part / f"from-{source:07d}.parquet")
    counts = {}
    for k, (partition, dest) in enumerate(zip(partitions, margin_paths)):
        part = fragments / f"{k:07d}"
        if not part.exists():
            continue
        table = pa.concat_tables([pq.read_table(f) for f in sorted(part.glob("*.parquet"))])
        table = table.sort_by([(spatial_index, "ascending")])
        dest.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table.cast(schema), dest, compression="zstd")
        counts[partition] = table.num_rows
    shutil.rmtree(fragments, ignore_errors=True)
    return counts
