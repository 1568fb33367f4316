"""Fine-tuning's data: labels joined to the shard stream per chunk, the train split's label
statistics, and the validation sample on the device.

Nothing here holds the train split in memory: :class:`LabelJoin` is the ``row_join`` of a
:class:`~msa.data.batches.ShardStream` (pretraining's bounded, prefetched stream), which looks up the
labels of each chunk's stars by ``source_id`` (or takes them from the chunk's store columns) and
keeps the labelled stars of one split; :func:`summarise_train_split` reads ``source_id`` and the
label columns once to count the train stars and fit the :class:`~msa.data.labels.LabelScaler`. The
validation split is a bounded seeded sample (``finetune.max_validation_rows``), small enough to
live on the device like the model.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch

from msa.data.batches import Batch, RowJoin
from msa.data.labels import LabelScaler, LabelSource, LabelledStars, check_catalogue_join
from msa.data.parallax_zero_point import ZERO_POINT_COLUMNS, zero_point
from msa.data.source_ids import SOURCE_ID
from msa.data.splits import assign_splits
from msa.data.star_hash import unit_hash
from msa.data.store import Shard

MAX_INVERSE_VARIANCE_WEIGHT = 10.0
ERROR_SAMPLE_ROWS = 100_000  # label errors kept for their median (exact below this many train stars)
ERROR_SAMPLE_SALT = 0xE4404  # the error sample's hash differs from the split hash of the same seed


def inverse_variance_weights(y_err_scaled: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """``(reference / σ)²`` capped at :data:`MAX_INVERSE_VARIANCE_WEIGHT`; NaN or non-positive σ → 1."""
    with np.errstate(divide="ignore", invalid="ignore"):
        w = (reference[None, :] / y_err_scaled) ** 2
    w = np.where(np.isfinite(w) & (y_err_scaled > 0), w, 1.0)
    return np.minimum(w, MAX_INVERSE_VARIANCE_WEIGHT)


def reference_errors(y_err_scaled: np.ndarray) -> np.ndarray:
    """Median positive scaled label error per label (1 for a label without errors)."""
    positive = np.where(y_err_scaled > 0, y_err_scaled, np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a label without any error column: all NaN
        return np.nan_to_num(np.nanmedian(positive, axis=0), nan=1.0)


class LabelJoin:
    """The labelled stars of one split in a chunk of raw store rows, with their labels.

    ``columns``: the store columns it reads besides ``source_id`` (labels taken from the store,
    their errors, the Gaia parallax of the MLE term and, with ``mle_zero_point``, what its
    zero-point needs). :meth:`physical` gives physical labels; :meth:`scaled` makes the
    ``row_join`` of the training stream.
    """

    def __init__(self, source: LabelSource, splits_cfg: Mapping, split_seed: int, split: str,
                 parallax_columns: Sequence[str | None] = (None, None), mle_zero_point: bool = False):
        self.source, self.splits_cfg, self.split_seed, self.split = source, splits_cfg, split_seed, split
        self.parallax_columns = tuple(parallax_columns)
        self.mle_zero_point = mle_zero_point and self.parallax_columns[0] is not None
        self.extra_columns = [c for c in self.parallax_columns if c] + (
            list(ZERO_POINT_COLUMNS) if self.mle_zero_point else [])
        self.columns = list(dict.fromkeys(source.store_columns + self.extra_columns))

    def physical(self, raw: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(keep, y, y_err)``: which rows are labelled stars of the split, and their labels."""
        sid = raw[SOURCE_ID]
        y, y_err = self.source.lookup(sid, {c: raw[c] for c in self.source.store_columns})
        keep = np.any(np.isfinite(y), axis=1)
        keep[keep] = assign_splits(sid[keep], self.splits_cfg, self.split_seed) == self.split
        return keep, y[keep], y_err[keep]

    def scaled(self, label_scaler: LabelScaler, err_reference: np.ndarray, inverse_variance: bool) -> RowJoin:
        """The stream's ``row_join``: scaled ``y``/``y_err``, loss ``weights`` and the Gaia
        parallax ``plx_obs``/``plx_err`` (mas, NaN without an MLE term) per kept row."""

        def join(raw: Mapping[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
            keep, y, y_err = self.physical(raw)
            return keep, label_arrays(y, y_err, {c: raw[c][keep] for c in self.extra_columns}, label_scaler,
                                      self.parallax_columns, inverse_variance, err_reference, self.mle_zero_point)

        return join


def label_arrays(y: np.ndarray, y_err: np.ndarray, extra: Mapping[str, np.ndarray], label_scaler: LabelScaler,
                 parallax_columns: Sequence[str | None], inverse_variance: bool, err_reference: np.ndarray,
                 mle_zero_point: bool = False) -> dict[str, np.ndarray]:
    """What the loss needs per star besides its inputs: scaled labels and errors, weights, and the
    Gaia parallax (minus its zero-point with ``mle_zero_point``, which needs those columns in ``extra``)."""
    ys, ys_err = label_scaler.transform(y, y_err)
    w = inverse_variance_weights(ys_err, err_reference) if inverse_variance else np.ones_like(ys)
    nan = np.full(len(y), np.nan)
    plx_obs, plx_err = (extra.get(c, nan) if c else nan for c in parallax_columns)
    if mle_zero_point:
        plx_obs = plx_obs - zero_point(extra)
    return {"y": ys, "y_err": ys_err, "weights": w, "plx_obs": plx_obs, "plx_err": plx_err}


@dataclass(frozen=True)
class TrainSplit:
    """What one pass over the train split's labels gives: its size and the label scaling."""

    rows_per_shard: dict[Path, int]
    label_scaler: LabelScaler
    err_reference: np.ndarray  # median positive scaled label error (of a seeded sample when large)

    @property
    def n_rows(self) -> int:
        return sum(self.rows_per_shard.values())


class _Moments:
    """Per-label count, mean and sum of squared deviations, merged chunk by chunk (Chan et al.)."""

    def __init__(self, n_labels: int):
        self.n = np.zeros(n_labels)
        self.mean = np.zeros(n_labels)
        self.m2 = np.zeros(n_labels)

    def add(self, y: np.ndarray) -> None:
        ok = np.isfinite(y)
        n_b = ok.sum(axis=0).astype(np.float64)
        has = n_b > 0
        if not has.any():
            return
        y0 = np.where(ok, y, 0.0)
        mean_b = np.where(has, y0.sum(axis=0) / np.maximum(n_b, 1), 0.0)
        m2_b = np.where(ok, (y0 - mean_b) ** 2, 0.0).sum(axis=0)
        n = self.n + n_b
        delta = mean_b - self.mean
        with np.errstate(invalid="ignore", divide="ignore"):
            self.mean = np.where(has, self.mean + delta * n_b / np.maximum(n, 1), self.mean)
            self.m2 = np.where(has, self.m2 + m2_b + delta ** 2 * self.n * n_b / np.maximum(n, 1), self.m2)
        self.n = n

    def variance(self) -> np.ndarray:
        return self.m2 / np.maximum(self.n, 1)


def _in_sorted(values: np.ndarray, sorted_ids: np.ndarray) -> int:
    """How many of ``values`` are in the sorted ``sorted_ids`` (a search, not a sort, per chunk)."""
    if not len(sorted_ids):
        return 0
    pos = np.clip(np.searchsorted(sorted_ids, values), 0, len(sorted_ids) - 1)
    return int(np.count_nonzero(sorted_ids[pos] == values))


def summarise_train_split(shard_paths: Sequence[Path], join: LabelJoin, names: Sequence[str],
                          chunk_rows: int = 65536, log_labels: Sequence[str] = ()) -> TrainSplit:
    """Count the train split's labelled stars per shard and fit the label scaler on them, reading
    only ``source_id`` and ``join.columns``; the label errors' median comes from the
    :data:`ERROR_SAMPLE_ROWS` train stars with the smallest hash (all of them in a small set).
    The catalogue join is checked on the way (``labels.min_match_fraction``)."""
    # the moments are taken where the scaling is fitted: log10 for log_labels
    fitted_space = LabelScaler(tuple(names), np.zeros(len(names)), np.ones(len(names)), tuple(log_labels))
    moments = _Moments(len(names))
    in_catalogue = 0
    counts: dict[Path, int] = {}
    sample_hash, sample_err = np.empty(0), np.empty((0, len(names)))
    for path in shard_paths:
        path = Path(path)
        counts[path] = 0
        with Shard(path) as shard:
            for raw in shard.iter_chunks([SOURCE_ID, *join.columns], chunk_rows):
                keep, y, y_err = join.physical(raw)
                y, y_err = fitted_space.to_fitted_space(y, y_err)
                in_catalogue += _in_sorted(raw[SOURCE_ID], join.source.catalogue_ids)
                counts[path] += len(y)
                moments.add(y)
                sample_hash = np.concatenate([sample_hash, unit_hash(raw[SOURCE_ID][keep],
                                                                     join.split_seed ^ ERROR_SAMPLE_SALT)])
                sample_err = np.concatenate([sample_err, y_err])
                if len(sample_hash) > ERROR_SAMPLE_ROWS:
                    smallest = np.argpartition(sample_hash, ERROR_SAMPLE_ROWS - 1)[:ERROR_SAMPLE_ROWS]
                    sample_hash, sample_err = sample_hash[smallest], sample_err[smallest]
    check_catalogue_join(join.source, in_catalogue, len(shard_paths))
    label_scaler = LabelScaler.from_moments(names, moments.n, moments.mean, moments.variance(), log_labels)
    return TrainSplit(counts, label_scaler, reference_errors(sample_err / label_scaler.scale))


# --- on the device -------------------------------------------------------------------------------------
@dataclass
class Tensors:
    """A batch of labelled stars on the device: scaled inputs and labels, weights, Gaia parallax (mas)."""

    x: torch.Tensor
    err: torch.Tensor
    y: torch.Tensor
    y_err: torch.Tensor
    weights: torch.Tensor
    plx_obs: torch.Tensor
    plx_err: torch.Tensor

    def __len__(self) -> int:
        return self.x.shape[0]

    def rows(self, idx) -> tuple[torch.Tensor, ...]:
        return (self.x[idx], self.err[idx], self.y[idx], self.y_err[idx], self.weights[idx],
                self.plx_obs[idx], self.plx_err[idx])

    @classmethod
    def from_batch(cls, batch: Batch) -> "Tensors":
        """A training-stream batch (already on the device) whose extras hold :func:`label_arrays`."""
        e = batch.extra
        return cls(batch.x, batch.err, e["y"], e["y_err"], e["weights"], e["plx_obs"], e["plx_err"])


def to_tensors(stars: LabelledStars, join: LabelJoin, label_scaler: LabelScaler, inverse_variance: bool,
               err_reference: np.ndarray, device: torch.device) -> Tensors:
    """Labelled stars in memory (the validation sample, read with ``join.extra_columns``) as
    :class:`Tensors` on ``device``, with the values the training stream's ``join`` would attach."""
    arrays = label_arrays(stars.y, stars.y_err, stars.extra, label_scaler, join.parallax_columns, inverse_variance,
                          err_reference, join.mle_zero_point)

    def t(a):
        return torch.as_tensor(np.asarray(a, dtype=np.float32), device=device)

    return Tensors(t(stars.x), t(stars.err), *(t(arrays[k]) for k in ("y", "y_err", "weights", "plx_obs",
                                                                         "plx_err")))
