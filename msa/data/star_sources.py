"""Where the per-star commands (``msa predict``, ``reconstruct``, ``embed``) read their stars.

A source is a shard of the store or a user's CSV/ECSV/FITS/Parquet table, read chunk by chunk in
file order (``source_id`` plus the requested columns), and able to re-read its ``source_id``s for
the check every writer makes before renaming its output into place: same ids, same order.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence, TypeVar

import numpy as np

from msa.data.store import SOURCE_ID, Shard, atomic_dir, check_out_dir, check_out_path
from msa.data.tables import iter_table_chunks, read_table_source_ids, table_columns
from msa.errors import InputError
from msa.progress import progress


# what --out-dir holds after a run: one <shard name>.parquet per shard, each with msa's metadata; a
# rerun replaces a folder of these, and refuses one holding anything else (it would be deleted)
OWN_OUTPUTS = {"*.parquet": True}


class SourceError(InputError, RuntimeError):
    """A shard or table that cannot be read as the model needs: missing columns, repeated ids."""


@dataclass
class StarSource:
    path: Path
    n_rows: int
    chunk_rows: int
    present: frozenset[str]  # every column the input has
    _chunks: Callable[[], Iterator[dict[str, np.ndarray]]]
    _expected_ids: Callable[[], Iterable[np.ndarray]]

    @property
    def n_chunks(self) -> int:
        return math.ceil(self.n_rows / self.chunk_rows)

    def chunks(self) -> Iterator[dict[str, np.ndarray]]:
        """Consecutive row blocks: ``source_id`` and the requested columns, in file order."""
        return self._chunks()

    def expected_ids(self) -> Iterable[np.ndarray]:
        """The input's source_ids again, chunk by chunk, for the final check of a written file."""
        return self._expected_ids()


def strictly_increasing_ids(chunks: Iterable[np.ndarray], source: str) -> Iterator[np.ndarray]:
    """Pass id chunks through, raising if an id repeats (a shard is sorted, so repeats are adjacent)."""
    last = None
    for ids in chunks:
        if len(ids) and ((last is not None and ids[0] <= last) or np.any(np.diff(ids) <= 0)):
            raise SourceError(f"{source}: source_ids are not strictly increasing (a duplicate or an "
                              "unsorted shard); re-ingest it with `msa ingest`")
        if len(ids):
            last = ids[-1]
        yield ids


def open_shard(path: str | Path, columns: Sequence[str], chunk_rows: int,
               optional: Sequence[str] = ()) -> StarSource:
    """A shard read for ``columns`` (each required) and ``optional`` columns (read where present)."""
    path = Path(path)
    wanted = [SOURCE_ID, *(c for c in columns if c != SOURCE_ID)]
    with Shard(path) as shard:
        present = set(shard.columns)
        n_rows = shard.n_rows
    missing = [c for c in wanted if c not in present]
    if missing:
        raise SourceError(f"shard {path} lacks column(s) {missing[:8]} that the model reads; "
                          "ingest it with the config the model was trained with")
    wanted += [c for c in optional if c in present and c not in wanted]

    def chunks():
        with Shard(path) as s:  # its own handle: callers read it in a prefetch thread
            yield from s.iter_chunks(wanted, chunk_rows)

    def expected_ids():
        with Shard(path) as s:
            yield from strictly_increasing_ids((c[SOURCE_ID] for c in s.iter_chunks([SOURCE_ID], 1 << 20)),
                                               str(path))

    return StarSource(path, n_rows, chunk_rows, frozenset(present), chunks, expected_ids)


def open_table(path: str | Path, columns: Sequence[str], chunk_rows: int, allow_missing: bool = False,
               optional: Sequence[str] = ()) -> StarSource:
    """A user's table: ``columns`` required (or all-NaN with ``allow_missing``), ``optional`` where present."""
    path = Path(path)
    ids = read_table_source_ids(path)  # refuses repeated source_ids before any work
    wanted = [c for c in columns if c != SOURCE_ID]
    present = set(table_columns(path))
    wanted += [c for c in optional if c in present and c not in wanted]
    return StarSource(path, len(ids), chunk_rows, frozenset(present), lambda: iter_table_chunks(path, wanted, chunk_rows, allow_missing),
                      lambda: iter([ids]))


def open_source(path: str | Path, is_shard: bool, columns: Sequence[str], chunk_rows: int, *,
                allow_missing: bool = False, optional: Sequence[str] = ()) -> StarSource:
    if is_shard:
        return open_shard(path, columns, chunk_rows, optional)
    return open_table(path, columns, chunk_rows, allow_missing, optional)


def add_star_source_arguments(parser, several_shards: bool = False) -> None:
    """The options every per-star command shares: where the stars come from and the output (the
    command adds ``--device``, a setting of the network layer).

    ``several_shards`` adds ``--shards`` with ``--out-dir`` (one Parquet file per shard), for a
    command that loads its models once and then reads shard after shard."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--shard", help="one shard of the store (HDF5)")
    if several_shards:
        source.add_argument("--shards", nargs="+", help="several shards, one after another, into --out-dir "
                            "(@FILE reads the paths from FILE, one a line)")
    source.add_argument("--table", help="your own CSV/ECSV/FITS/Parquet table with the store's column names")
    out = parser.add_mutually_exclusive_group(required=True) if several_shards else parser
    out.add_argument("--out", required=not several_shards, help="Parquet file to write (--shard, --table)")
    if several_shards:
        out.add_argument("--out-dir", help="--shards: folder to write, one <shard name>.parquet per shard; "
                         "written whole or not at all")
    parser.add_argument("--allow-missing-columns", action="store_true",
                        help="--table only: treat absent feature columns as missing for every star")


def shard_outputs(shards: Sequence[str | Path], out_dir: str | Path) -> list[Path]:
    """``<out_dir>/<shard name>.parquet`` for each shard; two shards of one name would share a file."""
    names = [f"{Path(s).stem}.parquet" for s in shards]
    repeated = sorted(name for name, n in Counter(names).items() if n > 1)
    if repeated:
        raise SourceError(f"--shards: {len(repeated)} output name(s) given by more than one shard, e.g. "
                          f"{repeated[0]}; pass each shard once")
    return [Path(out_dir) / name for name in names]


def check_outputs(args, inputs: Sequence[str | Path | None]) -> None:
    """Before any model is loaded: the output fits the source option (``--out`` for ``--shard`` and
    ``--table``, ``--out-dir`` for ``--shards``), overwrites none of ``inputs``, and every shard of
    a batch exists (not found only after the batch's earlier shards are done)."""
    shards = getattr(args, "shards", None)
    inputs = [*inputs, args.shard, args.table, *(shards or [])]
    if shards is None:
        if args.out is None:
            raise SourceError("--out-dir goes with --shards; give --out FILE for --shard or --table")
        check_out_path(args.out, inputs, (".parquet", ".pq"))
        return
    if args.out_dir is None:
        raise SourceError("--shards writes one file per shard: give --out-dir FOLDER, not --out")
    check_out_dir(args.out_dir, inputs, own=OWN_OUTPUTS)
    shard_outputs(shards, args.out_dir)
    missing = [s for s in shards if not Path(s).is_file()]
    if missing:
        raise FileNotFoundError(f"--shards: {len(missing)} shard(s) not found, e.g. {missing[0]}")


Summary = TypeVar("Summary")


def write_each_source(args, write_one: Callable[[Path, Path, Path], Summary], desc: str) -> list[Summary]:
    """``write_one(source, file to write, its final path)`` for the command's one ``--shard`` or
    ``--table`` into ``--out``, or shard after shard of ``--shards`` into ``--out-dir``. The folder is
    built whole in a temporary one: a failure leaves the previous folder (or none)."""
    shards = getattr(args, "shards", None)
    if not shards:
        out = Path(args.out)
        return [write_one(Path(args.shard or args.table), out, out)]
    outs = shard_outputs(shards, args.out_dir)
    summaries = []
    with atomic_dir(args.out_dir, own=OWN_OUTPUTS) as tmp:
        for shard, out in progress(list(zip(shards, outs)), desc=f"{desc} {Path(args.out_dir).name}", unit="shard"):
            summaries.append(write_one(Path(shard), tmp / out.name, out))
    return summaries
