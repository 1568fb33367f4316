"""The shard store: one columnar HDF5 file per input file pair.

Each shard holds one 1-D dataset per column at the file's root (float32; ``source_id`` int64;
``ra``/``dec`` float64, since float32 degrees keep only ~0.1 arcsec, too coarse to cross-match),
all of one length, rows sorted by ``source_id``, chunked and compressed. Provenance lives in
the root attributes (``msa_version``, ``n_rows``, ``created``, ``inputs`` as JSON, ...).
Reading a subset of columns over a row range touches only those columns' chunks.

It is also the package's one atomic writer (:func:`atomic_path` for a file, :func:`atomic_dir`
for a folder, :func:`make_temp_dir` beneath them) and the
checks that an output does not overwrite an input (:func:`check_out_path`, :func:`check_out_dir`).

This module is a leaf: it imports nothing from the package but the version and the error base.
"""

from __future__ import annotations

import errno
import fnmatch
import glob
import json
import os
import shutil
import socket
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Sequence

import h5py
import numpy as np

from msa import __version__
from msa.errors import InputError

SOURCE_ID = "source_id"
POSITION_COLUMNS = ("ra", "dec")  # degrees, ICRS; kept float64 (see the module docstring)
CHUNK_ROWS = 16384
SPAN_FACTOR = 16  # read_rows reads a contiguous span when it is at most this much larger than the rows
CHUNK_CACHE_BYTES = 256 * 1024  # per dataset; h5py's default of 1 MiB × 450 columns costs ~0.5 GB a shard


class StoreError(InputError, RuntimeError):
    """A shard is missing, unreadable, or lacks a column that was asked for."""


STALE_TEMP_SECONDS = 24 * 3600  # any temporary this old is swept (its writer's host may be another)


def _umask() -> int:
    mask = os.umask(0o022)  # the only way to read the umask is to set it; put it straight back
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode ``open()`` would give a new file (0644 under umask 022): mkstemp's 0600 would
    hide a shared catalogue from the rest of the group."""
    return 0o666 & ~_umask()


def dir_mode() -> int:
    """The mode ``mkdir`` would give a new folder (0755 under umask 022); mkdtemp makes 0700."""
    return 0o777 & ~_umask()


def _temp_prefix(path: Path) -> str:
    return f".{path.name}."


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def sweep_temporaries(path: str | os.PathLike) -> list[Path]:
    """Remove the temporaries that killed writers of ``path`` left beside it; returns them.

    A temporary (file or folder) is named ``.NAME.HOST.PID.XXXX.tmp``: it is stale when HOST is this
    machine and PID is no longer running, or whatever its name when a day old.
    """
    path = Path(path)
    host, removed = socket.gethostname(), []
    for tmp in path.parent.glob(f"{glob.escape(_temp_prefix(path))}*.tmp"):
        parts = tmp.name[len(_temp_prefix(path)):-len(".tmp")].rsplit(".", 2)
        try:
            same_host, pid = parts[0] == host, int(parts[1])
        except (IndexError, ValueError):
            same_host, pid = False, -1
        try:
            # a day old is stale on any machine: a pid can be reused, no write here takes that long
            stale = (same_host and not _pid_alive(pid)) or time.time() - tmp.stat().st_mtime > STALE_TEMP_SECONDS
            if stale:
                shutil.rmtree(tmp) if tmp.is_dir() and not tmp.is_symlink() else tmp.unlink()
                removed.append(tmp)
        except FileNotFoundError:  # another process swept it first
            continue
    return removed


def _temp_name_prefix(path: Path) -> str:
    return f"{_temp_prefix(path)}{socket.gethostname()}.{os.getpid()}."


def make_temp_dir(path: str | os.PathLike) -> Path:
    """A new folder beside ``path`` (for building a folder output, then renaming it into place),
    named so that :func:`sweep_temporaries` removes it if this process is killed; umask mode."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_temporaries(path)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_name_prefix(path), suffix=".tmp", dir=path.parent))
    os.chmod(tmp, dir_mode())  # mkdtemp's 0700 would hide a shared catalogue from the group
    return tmp


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    The one way the package writes a file: the temporary is removed on any failure, stale ones
    of killed writers are swept first, and the result gets the umask's mode (not mkstemp's 0600).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=_temp_name_prefix(path), suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        if tmp.exists():
            os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except OSError as err:
        if is_disk_full(err):  # h5py and others bury the errno in a long message
            raise DiskFullError(errno.ENOSPC, f"no space left on the device writing {path}: free space on its "
                                "filesystem or write elsewhere (nothing was written)") from err
        raise
    finally:
        if tmp.exists():
            tmp.unlink()


class DiskFullError(OSError):
    """A write ran out of space; the message names the file (no partial file is left)."""

    def __str__(self) -> str:
        return self.strerror


def is_disk_full(err: BaseException) -> bool:
    return getattr(err, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "No space left on device" in str(err)


@contextmanager
def atomic_dir(path: str | os.PathLike, own: Mapping[str, bool] | None = None,
               option: str = "--out-dir") -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; put it at ``path`` only if the block succeeds.

    An existing ``path`` is moved aside first and removed after, so readers see the old folder or
    the new one, never a mix; the temporary is removed on any failure. With ``own`` (the layout the
    command writes, see :func:`foreign_entry`) an existing folder holding anything else is refused,
    before the build and again just before the replacement."""
    path = Path(path)
    if path.is_symlink():  # write through the link: the output stays on the filesystem it points to
        path = path.resolve()
    if own is not None:
        refuse_foreign(path, own, option)
    tmp = make_temp_dir(path)  # sweeps the folders of killed writers first
    try:
        yield tmp
        old = None
        if path.exists():
            if own is not None:
                refuse_foreign(path, own, option)  # a file put there during the build
            old = make_temp_dir(path)
            os.replace(path, old / path.name)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


SNAKEMAKE_TIMESTAMP = ".snakemake_timestamp"  # `snakemake --touch` marks a directory output with it


def _matches(rel: Sequence[str], pattern: str) -> bool:
    parts = pattern.split("/")
    return len(parts) == len(rel) and all(fnmatch.fnmatchcase(r, p) for r, p in zip(rel, parts))


def _carries_msa_metadata(path: Path) -> bool:
    import pyarrow.parquet as pq  # a footer read; pyarrow only where a folder output is checked

    try:
        return b"msa_version" in (pq.read_schema(path).metadata or {})
    except Exception:  # not Parquet, truncated, unreadable: not the command's own file
        return False


def _first_file(folder: Path) -> Path:
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        if files:
            return Path(root) / sorted(files)[0]
    return folder


def foreign_entry(folder: str | os.PathLike, own: Mapping[str, bool]) -> Path | None:
    """The first file (or empty folder, or link) in ``folder`` that its command would not have written.

    ``own`` maps the paths the command writes, relative to the folder and matched part by part
    (``fnmatch``: ``dataset/Norder=*/Dir=*/Npix=*.parquet``), to whether the file is Parquet and must
    carry the ``msa_version`` metadata every msa output has; the folders on the way are the command's
    too, and so is Snakemake's ``.snakemake_timestamp``. None when everything is the command's own."""
    folder = Path(folder)
    dir_patterns = {"/".join(p.split("/")[:k]) for p in own for k in range(1, p.count("/") + 1)}
    for root, dirs, files in os.walk(folder):
        base = Path(root)
        rel = base.relative_to(folder).parts
        for name in sorted(files):
            path, parts = base / name, (*rel, name)
            if parts == (SNAKEMAKE_TIMESTAMP,):
                continue
            pattern = next((p for p in own if _matches(parts, p)), None)
            if path.is_symlink() or pattern is None or (own[pattern] and not _carries_msa_metadata(path)):
                return path
        for name in sorted(dirs):
            path = base / name
            if path.is_symlink() or not any(_matches((*rel, name), p) for p in dir_patterns):
                return path if path.is_symlink() else _first_file(path)
        dirs.sort()
    return None


def refuse_foreign(out_dir: str | os.PathLike, own: Mapping[str, bool], option: str = "--out-dir") -> None:
    """Refuse an existing output folder that holds a file its command did not write: the folder is
    replaced whole, so that file would be deleted. A rerun over the command's own output passes."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return
    foreign = foreign_entry(out_dir, own)
    if foreign is not None:
        raise StoreError(f"{option} {out_dir} holds {foreign}, which msa did not write; the folder is replaced "
                         f"whole, so it would be deleted. Move it out of the folder, or choose another (new or "
                         f"empty) {option}")


def check_out_path(out: str | os.PathLike, inputs: Iterable[str | os.PathLike | None],
                   suffixes: Sequence[str], option: str = "--out") -> None:
    """Refuse an output that would overwrite an input (same path or same inode, e.g. a hard link)
    or that lacks the expected suffix, with a message naming both files."""
    out = Path(out)
    if not out.name.lower().endswith(tuple(suffixes)):
        raise StoreError(f"{option} {out}: expected a file ending in {' or '.join(suffixes)}; "
                         "give the output its proper suffix (an input passed by mistake would be overwritten)")
    if out.is_dir():
        raise StoreError(f"{option} {out} is a folder; give a file name")
    for given in inputs:
        if given is None:
            continue
        given = Path(given)
        same = out.resolve() == given.resolve()
        if not same and out.exists() and given.exists():
            same = os.path.samefile(out, given)
        if same:
            raise StoreError(f"{option} {out} is the input {given}; writing it would destroy that input. "
                             f"Choose another {option} path")


def check_out_dir(out_dir: str | os.PathLike, inputs: Iterable[str | os.PathLike | None],
                  option: str = "--out-dir", own: Mapping[str, bool] | None = None) -> None:
    """Refuse an output folder that is a file or that holds an input: :func:`atomic_dir` replaces
    the folder whole, so an input inside it would be deleted; with ``own`` (the command's layout,
    see :func:`foreign_entry`) also one that holds any other file the command did not write."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise StoreError(f"{option} {out_dir} is a file; give a folder (it is written whole)")
    folder = out_dir.resolve()
    for given in inputs:
        if given is None:
            continue
        given = Path(given)
        if folder == given.resolve() or folder in given.resolve().parents:
            raise StoreError(f"{option} {out_dir} holds the input {given}; writing the folder would delete "
                             f"that input. Choose another {option}")
    if own is not None:
        refuse_foreign(out_dir, own, option)


def write_shard(
    path: str | os.PathLike,
    columns: Mapping[str, np.ndarray],
    attrs: Mapping[str, object] | None = None,
    compression: str | None = "gzip",
    chunk_rows: int = CHUNK_ROWS,
) -> None:
    """Write a shard atomically. ``columns`` must contain ``source_id``; rows are sorted by it.

    Every column but ``source_id`` (int64) and ``ra``/``dec`` (float64) is stored as float32. ``attrs`` values that are not scalars or
    strings are stored as JSON strings.
    """
    if SOURCE_ID not in columns:
        raise StoreError(f"{path}: no {SOURCE_ID!r} column to write")
    sid = np.asarray(columns[SOURCE_ID], dtype=np.int64)
    n = len(sid)
    order = np.argsort(sid, kind="stable")
    sorted_ids = sid[order]
    if n > 1 and np.any(sorted_ids[1:] == sorted_ids[:-1]):
        dup = np.unique(sorted_ids[1:][sorted_ids[1:] == sorted_ids[:-1]])
        raise StoreError(f"{path}: {len(dup)} duplicate source_id(s), e.g. {dup[:3].tolist()}")
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            for name, values in columns.items():
                values = np.asarray(values)
                if len(values) != n:
                    raise StoreError(f"{path}: column {name!r} has {len(values)} rows, source_id has {n}")
                dtype = np.int64 if name == SOURCE_ID else np.float64 if name in POSITION_COLUMNS else np.float32
                data = values[order].astype(dtype, copy=False)
                chunks = (min(chunk_rows, n),) if n else None
                f.create_dataset(
                    name, data=data, chunks=chunks, compression=compression if n else None,
                    shuffle=bool(compression and n), maxshape=(None,),
                )
            f.attrs["msa_version"] = __version__
            f.attrs["n_rows"] = n
            for key, value in (attrs or {}).items():
                f.attrs[key] = value if isinstance(value, (str, int, float, np.integer, np.floating)) \
                    else json.dumps(value)


class Shard:
    """Read access to one shard. Use as a context manager, or call :meth:`close`."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            # a small chunk cache: reads are contiguous blocks, and a shard has ~450 datasets
            self._file = h5py.File(self.path, "r", rdcc_nbytes=CHUNK_CACHE_BYTES)
        except (OSError, FileNotFoundError) as err:
            raise StoreError(f"cannot open shard {self.path}: {err}") from err
        if SOURCE_ID not in self._file:
            self._file.close()
            raise StoreError(f"shard {self.path} has no {SOURCE_ID!r} dataset; is it an msa shard?")

    def __enter__(self) -> "Shard":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._file.close()

    @property
    def n_rows(self) -> int:
        return int(self._file[SOURCE_ID].shape[0])

    @property
    def columns(self) -> list[str]:
        return list(self._file.keys())

    @property
    def attrs(self) -> dict:
        return dict(self._file.attrs)

    def _check(self, names: Iterable[str]) -> None:
        missing = [c for c in names if c not in self._file]
        if missing:
            raise StoreError(
                f"shard {self.path} lacks column(s) {missing}; re-ingest it with a config that "
                f"provides them, or remove them from the config's features section"
            )

    def read(self, names: Sequence[str], start: int = 0, stop: int | None = None) -> dict[str, np.ndarray]:
        """Contiguous rows ``[start, stop)`` of the named columns."""
        self._check(names)
        stop = self.n_rows if stop is None else min(stop, self.n_rows)
        try:
            return {c: self._file[c][start:stop] for c in names}
        except OSError as err:
            raise StoreError(f"shard {self.path}: reading rows {start}:{stop} failed: {err}") from err

    def read_rows(self, names: Sequence[str], rows: np.ndarray) -> dict[str, np.ndarray]:
        """Arbitrary rows (any order, repeats allowed) of the named columns."""
        self._check(names)
        uniq, back = np.unique(np.asarray(rows, dtype=np.int64), return_inverse=True)
        if not len(uniq):
            return {c: self._file[c][0:0] for c in names}
        lo, hi = int(uniq[0]), int(uniq[-1]) + 1
        # HDF5 point selection is slow; where the rows are dense enough, reading their whole span and
        # picking in memory is cheaper (the span holds at most SPAN_FACTOR times the rows asked for)
        dense = hi - lo <= SPAN_FACTOR * len(uniq)
        out = {}
        try:
            for c in names:
                ds = self._file[c]
                picked = ds[lo:hi][uniq - lo] if dense else ds[uniq]
                out[c] = picked[back]
        except OSError as err:
            raise StoreError(f"shard {self.path}: reading {len(rows)} sampled rows failed: {err}") from err
        return out

    def iter_chunks(self, names: Sequence[str], chunk_rows: int) -> Iterator[dict[str, np.ndarray]]:
        """Consecutive row blocks of ``chunk_rows`` (the last may be shorter)."""
        for start in range(0, self.n_rows, chunk_rows):
            yield self.read(names, start, start + chunk_rows)


def shard_rows(path: str | os.PathLike) -> int:
    with Shard(path) as s:
        return s.n_rows
