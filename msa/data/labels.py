"""Labels: catalogues keyed by ``source_id``, joined to the stars of the shard store, and scaled.

The ``labels`` config section names one catalogue (CSV / CSV.gz / FITS / Parquet) and, per label,
where its value and error come from::

    labels:
      catalogue: resources/demo/apogee_labels_demo.csv
      columns:
        teff: {value: teff, error: teff_err}             # catalogue columns
        parallax: {store: parallax, error: parallax_error}  # columns of the shard store
        # (+ zero_point: lindegren2021 subtracts Gaia DR3's parallax zero-point: msa.data.parallax_zero_point)

A label missing for a star is NaN (the fine-tuning losses mask it); a ``source_id`` that appears
twice in the catalogue is an error. Labels are standard-scaled per label with statistics fitted on
the TRAIN split only (:class:`LabelScaler`); errors are divided by the same scale. The feature
scaler is never touched here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from msa.data.parallax_zero_point import METHODS, ZERO_POINT_COLUMNS, zero_point
from msa.data.source_ids import SOURCE_ID
from msa.data.tables import TableError, read_frame
from msa.errors import InputError

log = logging.getLogger(__name__)


class LabelError(InputError, ValueError):
    """The ``labels`` / ``label_sets`` config or a label catalogue is inconsistent."""


@dataclass(frozen=True)
class LabelColumn:
    """Where one label's value and error come from (exactly one of ``value`` / ``store``)."""

    name: str
    value: str | None = None
    store: str | None = None
    error: str | None = None
    zero_point: str | None = None  # a parallax zero-point subtracted from a store value (msa.data.parallax_zero_point)


def _numeric(df: pd.DataFrame, column: str, path: Path) -> np.ndarray:
    """Column ``column`` as float64; a LabelError naming the file, column, row and value otherwise."""
    values = pd.to_numeric(df[column], errors="coerce")
    bad = values.isna() & df[column].notna() & (df[column].astype(str).str.strip() != "")
    if bad.any():
        row = int(np.argmax(bad.to_numpy()))
        raise LabelError(f"label catalogue {path}: column {column!r} row {row} is not a number "
                         f"({df[column].iloc[row]!r}); leave a missing label empty")
    return values.to_numpy(dtype=np.float64)


def _drop_implausible(values: np.ndarray, column: str, path: Path, ids) -> np.ndarray:
    """``values`` with infinite or absurd labels (beyond :data:`msa.data.plausible.LABEL_LIMIT`)
    set to NaN, as missing labels are, with a warning giving the count and a few source_ids."""
    from msa.data.plausible import LABEL_LIMIT  # local: a sibling leaf

    with np.errstate(invalid="ignore"):
        bad = np.isinf(values) | (np.abs(values) > LABEL_LIMIT)
    if bad.any():
        log.warning("label catalogue %s: %d value(s) of column %r are infinite or beyond %g (e.g. source_id %s): "
                    "dropped, as missing labels are", path, int(bad.sum()), column, LABEL_LIMIT,
                    np.asarray(ids)[bad][:3].tolist())
        values = np.where(bad, np.nan, values)
    return values


def label_set(config: Mapping, name: str) -> list[str]:
    """The ordered label names of ``label_sets[name]``, each checked against ``labels.columns``."""
    sets = config.get("label_sets") or {}
    if name not in sets:
        raise LabelError(f"label_sets: no label set {name!r}; known: {sorted(sets)}")
    names = list(sets[name])
    known = (config.get("labels") or {}).get("columns") or {}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise LabelError(f"label_sets.{name}: label(s) {unknown} have no entry in labels.columns; add them there")
    return names


def label_columns(labels_cfg: Mapping, names: Sequence[str]) -> list[LabelColumn]:
    """The column specification of each label in ``names`` (from ``labels.columns``)."""
    out = []
    for name in names:
        entry = (labels_cfg.get("columns") or {}).get(name)
        if entry is None:
            raise LabelError(f"labels.columns: no entry for label {name!r}")
        if ("value" in entry) == ("store" in entry):
            raise LabelError(
                f"labels.columns.{name}: give exactly one of 'value' (a catalogue column) or "
                f"'store' (a shard-store column), got {sorted(entry)}"
            )
        zp = entry.get("zero_point")
        if zp is not None and (entry.get("store") is None or zp not in METHODS):
            raise LabelError(f"labels.columns.{name}.zero_point = {zp!r}: a zero-point applies to a parallax taken "
                             f"from the store ('store' key) and is one of {list(METHODS)}")
        out.append(LabelColumn(name, entry.get("value"), entry.get("store"), entry.get("error"), zp))
    return out


def store_label_columns(config: Mapping) -> list[str]:
    """The store columns that a label set of ``config`` takes a label's value from (e.g. the Gaia
    ``parallax`` of a ``parallax`` label set): inputs that are also the target some stage scores."""
    labels_cfg = config.get("labels") or {}
    names = dict.fromkeys(n for members in (config.get("label_sets") or {}).values() for n in members)
    return list(dict.fromkeys(c.store for c in label_columns(labels_cfg, list(names)) if c.store is not None))


def read_table(path: str | Path, columns: Sequence[str], id_column: str | None = None) -> pd.DataFrame:
    """The named columns of a label catalogue (any format of :func:`msa.data.tables.table_format`);
    ``id_column`` (one of ``columns``) read as exact int64 source_ids."""
    try:
        return read_frame(path, columns, id_column)
    except TableError as err:
        raise LabelError(f"label catalogue {path}: cannot read column(s) {list(columns)} ({err}); "
                         "fix labels.catalogue, labels.columns or labels.source_id_column") from err


class LabelSource:
    """Looks up the labels of a label set for any ``source_id``s (catalogue + store columns)."""

    def __init__(self, labels_cfg: Mapping, names: Sequence[str]):
        self.names = list(names)
        self.columns = label_columns(labels_cfg, names)
        self.catalogue_path = labels_cfg.get("catalogue")
        self.min_match_fraction = float(labels_cfg.get("min_match_fraction", 0.0))
        self._ids = np.empty(0, dtype=np.int64)
        self._values = np.empty((0, 0))
        self._errors = np.empty((0, 0))
        from_catalogue = [c for c in self.columns if c.value is not None]
        if from_catalogue:
            path = labels_cfg.get("catalogue")
            if not path:
                raise LabelError(
                    f"labels.catalogue is not set but label(s) {[c.name for c in from_catalogue]} "
                    "take their values from a catalogue"
                )
            self._load_catalogue(Path(path), labels_cfg.get("source_id_column", SOURCE_ID), from_catalogue)

    def _load_catalogue(self, path: Path, id_column: str, cols: list[LabelColumn]) -> None:
        wanted = [id_column] + [c.value for c in cols] + [c.error for c in cols if c.error]
        df = read_table(path, list(dict.fromkeys(wanted)), id_column=id_column)
        ids = df[id_column].to_numpy(np.int64)
        order = np.argsort(ids, kind="stable")
        ids = ids[order]
        dup = np.unique(ids[1:][ids[1:] == ids[:-1]])
        if len(dup):
            raise LabelError(f"label catalogue {path}: {len(dup)} duplicate source_id(s), e.g. "
                             f"{dup[:3].tolist()}; keep one row per star")
        self._ids = ids
        self._catalogue_index = {c.name: k for k, c in enumerate(cols)}
        self._values = np.stack([_drop_implausible(_numeric(df, c.value, path), c.value, path, df[id_column])
                                 [order] for c in cols], axis=1)
        self._errors = np.stack([
            _numeric(df, c.error, path)[order] if c.error else np.full(len(ids), np.nan) for c in cols
        ], axis=1)

    @property
    def store_columns(self) -> list[str]:
        """Shard-store columns that labels take their values or errors from."""
        cols = []
        for c in self.columns:
            if c.store is not None:
                cols.append(c.store)
                if c.error:
                    cols.append(c.error)
                if c.zero_point:
                    cols.extend(ZERO_POINT_COLUMNS)
        return list(dict.fromkeys(cols))

    @property
    def catalogue_ids(self) -> np.ndarray:
        return self._ids

    def lookup(self, source_id: np.ndarray, store_raw: Mapping[str, np.ndarray] | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        """Label values and errors, float64 ``(n, n_labels)`` in physical units, NaN where missing.

        ``store_raw`` holds the rows' store columns (``store_columns``) for labels taken from the store.
        """
        source_id = np.asarray(source_id, dtype=np.int64)
        n = len(source_id)
        y = np.full((n, len(self.columns)), np.nan)
        y_err = np.full((n, len(self.columns)), np.nan)
        if len(self._ids):
            pos = np.clip(np.searchsorted(self._ids, source_id), 0, len(self._ids) - 1)
            found = self._ids[pos] == source_id
        for j, c in enumerate(self.columns):
            if c.value is not None:
                k = self._catalogue_index[c.name]
                if len(self._ids):
                    y[found, j] = self._values[pos[found], k]
                    y_err[found, j] = self._errors[pos[found], k]
            else:
                if store_raw is None or c.store not in store_raw:
                    raise LabelError(f"label {c.name!r} comes from store column {c.store!r}; "
                                     "pass that column in store_raw")
                y[:, j] = store_raw[c.store]
                if c.zero_point:
                    y[:, j] -= zero_point(store_raw)
                if c.error:
                    y_err[:, j] = store_raw[c.error]
        return y, y_err


@dataclass(frozen=True)
class LabelScaler:
    """Per-label standard scaling: ``scaled = (physical − centre) / scale``, where for the labels in
    ``log_labels`` "physical" is ``log10(value)`` (a label that cannot be negative, e.g. age: its
    quantiles, back in linear units, are then never below zero; values ≤ 0 become missing)."""

    names: tuple[str, ...]
    centre: np.ndarray
    scale: np.ndarray
    log_labels: tuple[str, ...] = ()

    @property
    def log_mask(self) -> np.ndarray:
        return np.array([n in self.log_labels for n in self.names], dtype=bool)

    def to_fitted_space(self, y: np.ndarray, y_err: np.ndarray | None = None):
        """Values (and errors, propagated to first order) in the space the scaling is fitted in."""
        y = np.array(y, dtype=np.float64, copy=True)
        err = None if y_err is None else np.array(y_err, dtype=np.float64, copy=True)
        for j in np.flatnonzero(self.log_mask):
            with np.errstate(divide="ignore", invalid="ignore"):
                positive = y[:, j] > 0
                if err is not None:
                    err[:, j] = np.where(positive, err[:, j] / (np.abs(y[:, j]) * np.log(10.0)), np.nan)
                y[:, j] = np.where(positive, np.log10(np.where(positive, y[:, j], 1.0)), np.nan)
        return y if y_err is None else (y, err)

    @classmethod
    def fit(cls, names: Sequence[str], y_train: np.ndarray, log_labels: Sequence[str] = ()) -> "LabelScaler":
        """Mean and standard deviation per label over the (NaN-free entries of the) TRAIN split."""
        unknown = sorted(set(log_labels) - set(names))
        if unknown:
            raise LabelError(f"finetune.log_labels: {unknown} are not labels of this set {list(names)}; remove them")
        y_train = cls(tuple(names), np.zeros(len(names)), np.ones(len(names)), tuple(log_labels)).to_fitted_space(
            y_train)
        n = np.sum(np.isfinite(y_train), axis=0)
        with np.errstate(invalid="ignore"):
            return cls.from_moments(names, n, np.nanmean(y_train, axis=0), np.nanvar(y_train, axis=0), log_labels)

    @classmethod
    def from_moments(cls, names: Sequence[str], n: np.ndarray, mean: np.ndarray, variance: np.ndarray,
                     log_labels: Sequence[str] = ()) -> "LabelScaler":
        """From per-label counts, means and (population) variances of the TRAIN split in the fitted
        space (log10 for ``log_labels``), e.g. accumulated chunk by chunk; a constant label keeps
        scale 1."""
        few = [name for name, k in zip(names, n) if k < 2]
        if few:
            raise LabelError(f"labels {few}: fewer than 2 training stars with a value; "
                             "check the catalogue join and the splits fractions")
        scale = np.sqrt(np.asarray(variance, dtype=np.float64))
        scale = np.where(scale > 0, scale, 1.0)
        return cls(tuple(names), np.asarray(mean, dtype=np.float64), scale, tuple(log_labels))

    @classmethod
    def from_lists(cls, names, centre, scale, log_labels=()) -> "LabelScaler":
        return cls(tuple(names), np.asarray(centre, dtype=np.float64), np.asarray(scale, dtype=np.float64),
                   tuple(log_labels))

    def transform(self, y: np.ndarray, y_err: np.ndarray | None = None):
        """Scaled values (and errors divided by the scale when given)."""
        if y_err is None:
            return (self.to_fitted_space(y) - self.centre) / self.scale
        y, y_err = self.to_fitted_space(y, y_err)
        return (y - self.centre) / self.scale, y_err / self.scale

    def inverse(self, ys: np.ndarray) -> np.ndarray:
        """Physical values from scaled ones; the label axis is axis 1 (``(n, L)`` or ``(n, L, 3)``)."""
        ys = np.asarray(ys, dtype=np.float64)
        shape = (1, -1) + (1,) * (ys.ndim - 2)
        out = ys * self.scale.reshape(shape) + self.centre.reshape(shape)
        log = self.log_mask
        if log.any():
            out[:, log] = 10 ** out[:, log]
        return out


@dataclass
class LabelledStars:
    """The labelled stars of a set of shards, in memory: scaled inputs plus physical labels.

    ``x``/``err``: float32 ``(n, n_features)`` scaled inputs (NaN = missing); ``y``/``y_err``:
    float64 ``(n, n_labels)`` physical labels (NaN = missing); ``extra``: raw store columns asked
    for (e.g. ``phot_g_mean_mag``, Gaia ``parallax``), float64 ``(n,)``, NaN where absent.
    """

    source_id: np.ndarray
    x: np.ndarray
    err: np.ndarray
    y: np.ndarray
    y_err: np.ndarray
    extra: dict

    def __len__(self) -> int:
        return len(self.source_id)

    def subset(self, mask: np.ndarray) -> "LabelledStars":
        return LabelledStars(self.source_id[mask], self.x[mask], self.err[mask], self.y[mask],
                             self.y_err[mask], {k: v[mask] for k, v in self.extra.items()})


def _report_catalogue_join(source: LabelSource, parts: list[LabelledStars], n_shards: int) -> None:
    matched = int(sum(np.isin(p.source_id, source.catalogue_ids).sum() for p in parts))
    check_catalogue_join(source, matched, n_shards)


def check_catalogue_join(source: LabelSource, matched: int, n_shards: int) -> None:
    """Log how many catalogue stars (``matched``) the shards hold; fewer than
    ``labels.min_match_fraction`` is an error."""
    n_catalogue = len(source.catalogue_ids)
    if not n_catalogue:
        return
    log.info("label catalogue %s: %d of its %d stars are in the %d shard(s); %d unmatched",
             source.catalogue_path, matched, n_catalogue, n_shards, n_catalogue - matched)
    if matched < source.min_match_fraction * n_catalogue:
        raise LabelError(f"label catalogue {source.catalogue_path}: only {matched} of its {n_catalogue} stars are in "
                         f"the store (below labels.min_match_fraction = {source.min_match_fraction}); check that "
                         "the catalogue's source_id column holds Gaia DR3 ids, or lower the fraction")


def _labelled_rows(shard, source: LabelSource) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(source_id, rows with a label, y, y_err)`` of one open shard (``y`` for every row)."""
    ids = shard.read([SOURCE_ID])[SOURCE_ID]
    store_cols = source.store_columns
    y, y_err = source.lookup(ids, shard.read(store_cols) if store_cols else {})
    return ids, np.flatnonzero(np.any(np.isfinite(y), axis=1)), y, y_err


def _read_labelled(shard, transform, ids, rows, y, y_err, extra_columns: Sequence[str]) -> LabelledStars:
    present = [c for c in extra_columns if c in shard.columns]
    raw = shard.read_rows(list(dict.fromkeys(list(transform.store_columns) + present)), rows)
    x, err = transform(raw)
    extra = {c: (raw[c].astype(np.float64) if c in raw else np.full(len(rows), np.nan)) for c in extra_columns}
    return LabelledStars(ids[rows], x, err, y[rows], y_err[rows], extra)


def _concatenate_sorted(parts: list[LabelledStars], extra_columns: Sequence[str]) -> LabelledStars:
    """One table of the parts, sorted by ``source_id``; a star in two shards is an error."""
    stars = LabelledStars(
        np.concatenate([p.source_id for p in parts]), np.concatenate([p.x for p in parts]),
        np.concatenate([p.err for p in parts]), np.concatenate([p.y for p in parts]),
        np.concatenate([p.y_err for p in parts]),
        {c: np.concatenate([p.extra[c] for p in parts]) for c in extra_columns},
    )
    order = np.argsort(stars.source_id, kind="stable")
    ids = stars.source_id[order]
    if len(ids) > 1 and np.any(ids[1:] == ids[:-1]):
        dup = np.unique(ids[1:][ids[1:] == ids[:-1]])
        raise LabelError(f"source_id(s) {dup[:3].tolist()} appear in more than one shard; "
                         "each star must be in exactly one shard")
    return stars.subset(order)


def load_labelled(shard_paths: Sequence[str | Path], transform, source: LabelSource,
                  extra_columns: Sequence[str] = ()) -> LabelledStars:
    """Read every star with at least one label of ``source`` from the shards.

    ``transform`` is the pipeline's :class:`msa.data.features.FeatureTransform` (raw columns → scaled
    ``(x, err)``); only the rows that carry a label are read. ``extra_columns`` absent from a
    shard come back as NaN. Stars are returned sorted by ``source_id``.
    """
    from msa.data.store import Shard  # the store is a lower layer; imported here to keep this module light

    parts = []
    for path in shard_paths:
        with Shard(path) as shard:
            ids, rows, y, y_err = _labelled_rows(shard, source)
            if len(rows):
                parts.append(_read_labelled(shard, transform, ids, rows, y, y_err, extra_columns))
    _report_catalogue_join(source, parts, len(shard_paths))
    if not parts:
        raise LabelError(f"no star in the {len(shard_paths)} shard(s) has a label of {source.names}; "
                         "check labels.catalogue and that the shards hold the catalogue's stars")
    return _concatenate_sorted(parts, extra_columns)


SAMPLE_SALT = 0x5A3D1E  # the sample hash differs from the split hash of the same seed


def sample_hash(source_id: np.ndarray, seed: int) -> np.ndarray:
    """The hash :func:`load_split_samples` ranks a split's stars by (the smallest are sampled)."""
    from msa.data.star_hash import unit_hash

    return unit_hash(np.asarray(source_id, dtype=np.int64), seed ^ SAMPLE_SALT)


def split_sample_limits(shard_paths: Sequence[str | Path], source: LabelSource, splits_cfg: Mapping, seed: int,
                        max_rows: Mapping[str, int | None]) -> dict[str, float]:
    """Per split, the largest :func:`sample_hash` that :func:`load_split_samples` with that
    split's ``max_rows`` samples (1.0: the split is read whole): a star of the split with a label
    was read if and only if its hash is at most this. Reads only ``source_id`` and store labels."""
    from msa.data.splits import assign_splits
    from msa.data.store import Shard

    hashes: dict[str, list[np.ndarray]] = {name: [] for name in max_rows}
    totals = dict.fromkeys(max_rows, 0)
    for path in shard_paths:
        with Shard(path) as shard:
            ids, rows, _, _ = _labelled_rows(shard, source)
        split = assign_splits(ids[rows], splits_cfg, seed)
        h = sample_hash(ids[rows], seed)
        for name, cap in max_rows.items():
            mine = h[split == name]
            totals[name] += len(mine)
            if cap is not None and len(mine) > cap:  # keep only the candidates: memory stays ~cap
                mine = np.partition(mine, int(cap) - 1)[:int(cap)]
            hashes[name].append(mine)
    limits = {}
    for name, cap in max_rows.items():
        every = np.concatenate(hashes[name]) if hashes[name] else np.empty(0)
        limits[name] = (1.0 if cap is None or totals[name] <= cap
                        else float(np.partition(every, int(cap) - 1)[int(cap) - 1]))
    return limits


def load_split_samples(shard_paths: Sequence[str | Path], transform, source: LabelSource, splits_cfg: Mapping,
                       seed: int, split_names: Sequence[str], max_rows: int | None,
                       extra_columns: Sequence[str] = ()) -> dict[str, LabelledStars]:
    """The labelled stars of each named split, at most ``max_rows`` per split (None: all).

    The sample of a split is its ``max_rows`` stars with the smallest hash of ``source_id`` (seeded
    by ``seed``): uniform, fixed whatever the file or row order, and every star when the split
    holds fewer. Memory grows with ``max_rows``, not with the store: a first pass reads only
    ``source_id`` and the labels' store columns, a second the sampled rows' inputs. Splits come
    from :func:`msa.data.splits.assign_splits` with ``seed``; a split without a star is empty.
    """
    from msa.data.splits import assign_splits
    from msa.data.star_hash import unit_hash
    from msa.data.store import Shard

    limit = np.inf if max_rows is None else int(max_rows)
    # per split: (hash, shard index, row) of the smallest hashes seen so far
    chosen = {name: (np.empty(0), np.empty(0, np.int64), np.empty(0, np.int64)) for name in split_names}
    for k, path in enumerate(shard_paths):
        with Shard(path) as shard:
            ids, rows, _, _ = _labelled_rows(shard, source)
        split = assign_splits(ids[rows], splits_cfg, seed)
        h = unit_hash(ids[rows], seed ^ SAMPLE_SALT)
        for name in split_names:
            mine = split == name
            hashes, shards, picked = (np.concatenate(pair) for pair in zip(
                chosen[name], (h[mine], np.full(int(mine.sum()), k), rows[mine])))
            if len(hashes) > limit:
                keep = np.argpartition(hashes, int(limit) - 1)[:int(limit)]
                hashes, shards, picked = hashes[keep], shards[keep], picked[keep]
            chosen[name] = (hashes, shards, picked)
    parts: dict[str, list[LabelledStars]] = {name: [] for name in split_names}
    for k, path in enumerate(shard_paths):
        wanted = {name: np.sort(chosen[name][2][chosen[name][1] == k]) for name in split_names}
        if not any(len(r) for r in wanted.values()):
            continue
        with Shard(path) as shard:
            ids, _, y, y_err = _labelled_rows(shard, source)
            for name, rows in wanted.items():
                if len(rows):
                    parts[name].append(_read_labelled(shard, transform, ids, rows, y, y_err, extra_columns))
    empty = LabelledStars(np.empty(0, np.int64), np.empty((0, transform.layout.n_features), np.float32),
                          np.empty((0, transform.layout.n_features), np.float32),
                          np.empty((0, len(source.names))), np.empty((0, len(source.names))),
                          {c: np.empty(0) for c in extra_columns})
    return {name: _concatenate_sorted(p, extra_columns) if p else empty for name, p in parts.items()}
