"""``msa predict``: one shard (or a user's table) → one Parquet file of calibrated quantiles;
``--shards`` many shards → one folder of such files, with the models loaded once.

Three stages overlap, so the accelerator is never waiting on the disk:

1. a reader thread streams ``predict.chunk_rows`` rows at a time, in file order, and applies the
   members' own ``FeatureTransform`` (the one used in training, with the scaler stored in the
   checkpoints), reading only the value columns: the encoder never sees the error columns;
2. the calling thread runs the ensemble on large batches (``predict.batch_size``) and applies the
   split-conformal calibration;
3. a writer thread appends each chunk to the Parquet file as one row group.

Output columns: ``source_id`` (int64, exactly the input's, in input order); ``ra``, ``dec``
(float64 degrees, copied from the input when it has both, for the catalogue's positions); per label
``{label}_q16``, ``{label}_q50``, ``{label}_q84`` (float32, physical units, q16 ≤ q50 ≤ q84);
``has_xp`` (the prediction used an XP spectrum); ``n_inputs`` (features present and visible to the
model); ``flag_too_few_inputs`` (fewer than ``predict.min_inputs``: predictions are NaN);
``n_inputs_rejected`` (input values set to missing as implausible: sentinels such as -999, values
outside a feature's physical range or far outside the scaler's; see :mod:`msa.data.plausible`);
``flag_out_of_range`` (the predictions were not finite or outside a label's physical range, and are
written NaN);
``calibration_group`` (the conformal group whose offsets the star took: XP or not, G bin, bands
present; see :mod:`msa.calibration.calibrate`); ``interval_basis`` (which stars that group's offsets
were fitted on: ``labelled``, ``survey``, ``emulated`` or ``extrapolated``; see
:mod:`msa.calibration.basis`); ``in_training_sample`` (a fit read its labels: the train split, the
validation stars early stopping scored, the calibration stars and survey stars calibration
scored, as the flag of Andrae et al. 2023); ``support`` (float32, 0–1: how well the labelled and
survey stars cover the star's inputs, the fraction of those stars whose distance to their nearest
neighbours in the latent is at least the star's; NaN without a support index or inputs) and
``low_support`` (support below its view's ``calibrate.support.low_threshold``; see
:mod:`msa.calibration.support`); with
``predict.save_latent`` also ``latent_000`` … (the first member's latent). The file's key-value
metadata identifies the model (member sha256s, calibration hash, config hash, msa version), the
label set, the labels and their units, and the input file.

The file is written to a temporary name, its ``source_id`` column read back and checked against
the input's (same ids, same order, none twice), and only then renamed into place. A ``--shards``
folder is built the same way: in a temporary folder, renamed into place once every shard's file is
written, so a failed shard leaves no partial folder.
"""

from __future__ import annotations

import dataclasses

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import pyarrow as pa
import torch

from msa import __version__
from msa.calibration import apply_calibration, interval_basis, load_calibration, star_groups, survey_sources
from msa.calibration import Ensemble, SupportError, SupportIndex, combine_members, support_index_path
from msa.config import config_hash, load_config
from msa.data.features import G_MAG, FeatureTransform
from msa.data.labels import LabelSource, label_set, sample_hash
from msa.data.layout import Feature, Layout
from msa.data.parquet_stream import BackgroundParquetWriter, OutputCheckError, verify_source_ids
from msa.data.plausible import outside_label_range, reject_raw, reject_scaled
from msa.data.prefetch import prefetch
from msa.data.splits import assign_splits, split_seed
from msa.data.star_sources import (StarSource, add_star_source_arguments, check_outputs, open_shard, open_table,
                                   write_each_source)
from msa.data.store import POSITION_COLUMNS, SOURCE_ID, atomic_path
from msa.nn.checkpoint import file_sha256
from msa.nn.training import add_device_argument, resolve_device
from msa.progress import progress

log = logging.getLogger(__name__)

QUANTILE_SUFFIXES = ("q16", "q50", "q84")


class PredictionError(OutputCheckError):
    """The inputs do not fit the model, or the written predictions fail the exactness checks."""


# --- one chunk -----------------------------------------------------------------------------------
@dataclass
class PreparedChunk:
    source_id: np.ndarray  # int64 (n,)
    x: torch.Tensor  # float32 (n, F) scaled inputs, NaN = missing (pinned when predicting on CUDA)
    n_inputs: np.ndarray  # int16 (n,)
    has_xp: np.ndarray  # bool (n,)
    calibration_group: np.ndarray  # object (n,): the group whose offsets the star takes ("" uncalibrated)
    in_training_sample: np.ndarray  # bool (n,)
    positions: dict = field(default_factory=dict)  # ra, dec float64 (n,) when the input has them
    interval_basis: np.ndarray | None = None  # object (n,): labelled/survey/emulated/extrapolated ("" uncalibrated)
    n_inputs_rejected: np.ndarray | None = None  # int16 (n,): inputs set to missing as implausible


@dataclass(frozen=True)
class TrainingSample:
    """Which stars' labels a fit read: a label of the set and a split other than test (train
    fine-tunes, validation stops it early, calibration calibrates), and, with the calibration's
    ``training_sample`` record, only the stars that each split's bounded sample (and each
    calibration survey's) held: their :func:`msa.data.labels.sample_hash` at most its limit."""

    labels: LabelSource
    splits_cfg: dict
    seed: int
    split_limits: dict | None = None  # split → hash limit; None: every labelled star of the split
    surveys: tuple = ()  # (LabelSource, hash limit) of each calibration survey

    @classmethod
    def from_config(cls, config: dict, label_set_name: str,
                    calibration: dict | None = None) -> "TrainingSample | None":
        """None (with a warning) when the config does not say where the label set's labels come from."""
        names = list((config.get("label_sets") or {}).get(label_set_name) or [])
        known = (config.get("labels") or {}).get("columns") or {}
        if not names or any(n not in known for n in names):
            log.warning("labels.columns lacks label(s) of %r: in_training_sample is written false for every "
                        "star; predict with the config the members were fine-tuned with", label_set_name)
            return None
        names = label_set(config, label_set_name)
        record = (calibration or {}).get("training_sample")
        surveys = ()
        if record is not None:
            sources = survey_sources(config["calibrate"]["surveys"], names)
            surveys = tuple((sources[n], float(limit)) for n, limit in record["surveys"].items() if n in sources)
        return cls(LabelSource(config["labels"], names), config["splits"], split_seed(config),
                   None if record is None else dict(record["splits"]), surveys)

    @property
    def store_columns(self) -> list[str]:
        return self.labels.store_columns

    def contains(self, source_id: np.ndarray, raw: dict[str, np.ndarray]) -> np.ndarray:
        """Bool ``(n,)``; ``raw`` holds the stars' store columns that labels come from."""
        y, _ = self.labels.lookup(source_id, raw)
        labelled = np.any(np.isfinite(y), axis=1)
        split = assign_splits(source_id, self.splits_cfg, self.seed)
        if self.split_limits is None:
            return labelled & (split != "test")
        h = sample_hash(source_id, self.seed)
        limit = np.array([self.split_limits.get(s, -1.0) for s in split.tolist()])  # test: no limit reaches it
        read = labelled & (h <= limit)
        for survey, survey_limit in self.surveys:  # survey stars calibrate unless the set's own labels cover them
            y_survey, _ = survey.lookup(source_id)
            read |= ~labelled & np.any(np.isfinite(y_survey), axis=1) & (h <= survey_limit)
        return read


def input_transform(ensemble: Ensemble) -> FeatureTransform:
    """The members' transform without the error columns: the encoder reads values only, so prediction
    reads about half the XP bytes of training. Values are derived and scaled exactly as in training."""
    layout = ensemble.layout
    # replace() keeps every other property of the layout (colours relative to a reference, ...)
    values_only = dataclasses.replace(layout, features=tuple(Feature(f.name, f.group, None) for f in layout.features))
    return FeatureTransform(values_only, ensemble.scaler, ensemble.normalise_xp)


def prepare_chunk(raw: dict[str, np.ndarray], ensemble: Ensemble, transform: FeatureTransform,
                  pin: bool = False, calibration: dict | None = None,
                  training: TrainingSample | None = None) -> PreparedChunk:
    """Raw store columns → scaled inputs, per-star input counts, calibration group and training flag
    (runs in the reader thread). Implausible inputs (sentinels, absurd values) become missing."""
    raw, rejected = reject_raw(raw, ensemble.layout)
    x, _ = transform(raw)
    infinite = np.isinf(x)
    if infinite.any():
        # an infinite value (e.g. a zero flux turned into a magnitude) carries no information
        x[infinite] = np.nan
    rejected = rejected + reject_scaled(x)
    visible = ensemble.visible_inputs(x)
    has_xp = ensemble.has_xp(x, visible)
    source_id = np.asarray(raw[SOURCE_ID], dtype=np.int64)
    g_mag = raw[G_MAG] if G_MAG in raw else np.full(len(x), np.nan)
    if calibration is None:
        groups = np.full(len(x), "", dtype=object)
    else:
        groups = star_groups(calibration, ensemble.calibration_levels(
            x, g_mag, calibration.get("g_mag_bins") or [], visible=visible))
    basis = interval_basis(calibration, groups, g_mag)
    in_training = training.contains(source_id, raw) if training is not None else np.zeros(len(x), dtype=bool)
    tensor = torch.from_numpy(x)
    positions = {c: np.asarray(raw[c], dtype=np.float64) for c in POSITION_COLUMNS if c in raw}
    return PreparedChunk(source_id, tensor.pin_memory() if pin else tensor, visible.sum(axis=1).astype(np.int16),
                         has_xp, groups, in_training, positions, basis, rejected.astype(np.int16))


def extra_read_columns(training: TrainingSample | None) -> list[str]:
    """Store columns read besides the model's inputs: G (the calibration group) and store labels."""
    return [G_MAG, *(training.store_columns if training is not None else [])]


def position_columns(present) -> list[str]:
    """``ra`` and ``dec`` when the input has both (the catalogue needs both or neither)."""
    return list(POSITION_COLUMNS) if all(c in present for c in POSITION_COLUMNS) else []


def output_schema(labels: Sequence[str], units: dict[str, str], latent_dim: int | None,
                  metadata: dict[str, str], positions: Sequence[str] = ()) -> pa.Schema:
    fields = [pa.field(SOURCE_ID, pa.int64(), nullable=False)]
    fields += [pa.field(c, pa.float64(), metadata={"unit": "deg"}) for c in positions]
    for label in labels:
        for suffix in QUANTILE_SUFFIXES:
            fields.append(pa.field(f"{label}_{suffix}", pa.float32(), metadata={"unit": units.get(label, "")}))
    fields += [pa.field("has_xp", pa.bool_(), nullable=False), pa.field("n_inputs", pa.int16(), nullable=False),
               pa.field("flag_too_few_inputs", pa.bool_(), nullable=False),
               pa.field("n_inputs_rejected", pa.int16(), nullable=False),
               pa.field("flag_out_of_range", pa.bool_(), nullable=False),
               pa.field("calibration_group", pa.string(), nullable=False),
               pa.field("interval_basis", pa.string(), nullable=False),
               pa.field("in_training_sample", pa.bool_(), nullable=False),
               pa.field("support", pa.float32()), pa.field("low_support", pa.bool_(), nullable=False)]
    if latent_dim:
        fields += [pa.field(latent_column(i), pa.float32()) for i in range(latent_dim)]
    return pa.schema(fields, metadata={k: str(v) for k, v in metadata.items()})


def latent_column(i: int) -> str:
    return f"latent_{i:03d}"


def chunk_table(chunk: PreparedChunk, q: np.ndarray, flagged: np.ndarray, latent: np.ndarray | None,
                schema: pa.Schema, labels: Sequence[str], out_of_range: np.ndarray,
                support: np.ndarray, low_support: np.ndarray) -> pa.Table:
    columns = [pa.array(chunk.source_id, pa.int64())]
    columns += [pa.array(chunk.positions[c], pa.float64()) for c in POSITION_COLUMNS if c in schema.names]
    for j in range(len(labels)):
        for k in range(3):
            columns.append(pa.array(q[:, j, k], pa.float32()))
    columns += [pa.array(chunk.has_xp), pa.array(chunk.n_inputs, pa.int16()), pa.array(flagged),
                pa.array(chunk.n_inputs_rejected, pa.int16()), pa.array(out_of_range),
                pa.array(chunk.calibration_group, pa.string()), pa.array(chunk.interval_basis, pa.string()),
                pa.array(chunk.in_training_sample), pa.array(support, pa.float32()), pa.array(low_support)]
    if latent is not None:
        columns += [pa.array(latent[:, i], pa.float32()) for i in range(latent.shape[1])]
    return pa.Table.from_arrays(columns, schema=schema)


# --- a whole input -------------------------------------------------------------------------------
@dataclass
class PredictSummary:
    n_rows: int = 0
    n_without_xp: int = 0
    n_flagged: int = 0
    n_inputs_rejected: int = 0  # input values set to missing as implausible
    n_out_of_range: int = 0  # stars whose predictions were absurd, written NaN
    n_low_support: int = 0  # stars the labelled and survey stars hardly cover (low_support)
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def stars_per_second(self) -> float:
        return self.n_rows / self.seconds if self.seconds > 0 else float("nan")


def predict_chunks(
    chunks: Iterable[dict[str, np.ndarray]],
    expected_ids: Callable[[], Iterable[np.ndarray]],
    ensemble: Ensemble,
    calibration: dict | None,
    out: str | Path,
    *,
    batch_size: int,
    min_inputs: int,
    save_latent: bool = False,
    units: dict[str, str] | None = None,
    metadata: dict[str, str] | None = None,
    n_chunks: int | None = None,
    prefetch_depth: int = 2,
    training: TrainingSample | None = None,
    positions: Sequence[str] = (),
    support: SupportIndex | None = None,
) -> PredictSummary:
    """Predict raw store-column chunks into the Parquet file ``out`` (atomically).

    ``expected_ids()`` re-reads the input's source_ids (chunk by chunk, in order) for the final
    check; ``calibration`` None leaves the ensemble quantiles uncalibrated; ``training`` None
    writes ``in_training_sample`` False for every star; ``positions`` names the position columns
    (``ra``, ``dec``) the chunks carry, copied to the output; ``support`` None writes ``support``
    NaN and ``low_support`` False for every star.
    """
    labels = ensemble.labels
    want_latent = save_latent or support is not None
    pin = ensemble.device.type == "cuda"
    schema = output_schema(labels, units or {}, ensemble.latent_dim if save_latent else None, metadata or {},
                           positions)
    summary = PredictSummary()
    t0 = time.perf_counter()
    with atomic_path(out) as tmp:
        writer = BackgroundParquetWriter(tmp, schema)
        try:
            transform = input_transform(ensemble)
            prepared = prefetch((prepare_chunk(raw, ensemble, transform, pin, calibration, training)
                                 for raw in chunks),
                                depth=prefetch_depth)
            for chunk in progress(prepared, total=n_chunks, desc=f"predict {Path(out).name}", unit="chunk"):
                # the latent only where a column needs it: it is a copy out of every member batch
                result = ensemble.predict_members(chunk.x, batch_size=batch_size, return_latent=want_latent)
                member_q, latent = result if want_latent else (result, None)
                star_support, low_support = chunk_support(support, latent, chunk, ensemble.device)
                q = _combine_and_calibrate(member_q, calibration, labels, chunk.calibration_group)
                flagged = chunk.n_inputs < min_inputs
                # one absurd star is NaN and flagged, never the end of the whole file (issue 27)
                out_of_range = ~flagged & outside_label_range(q, labels, units or {})
                q[flagged | out_of_range] = np.nan
                latent = latent if save_latent else None
                if latent is not None:
                    latent[flagged] = np.nan
                star_support[flagged] = np.nan  # no prediction: nothing to support
                low_support &= ~flagged
                _check_quantiles(q, flagged | out_of_range, chunk.source_id, out)
                writer.put(chunk_table(chunk, q, flagged, latent, schema, labels, out_of_range, star_support,
                                       low_support))
                summary.n_low_support += int(low_support.sum())
                summary.n_inputs_rejected += int(chunk.n_inputs_rejected.sum())
                summary.n_out_of_range += int(out_of_range.sum())
                summary.n_rows += len(chunk.source_id)
                summary.n_without_xp += int(np.sum(~chunk.has_xp))
                summary.n_flagged += int(np.sum(flagged))
        finally:
            writer.close()
        verify_source_ids(tmp, expected_ids(), out)
    summary.seconds = time.perf_counter() - t0
    if summary.n_inputs_rejected or summary.n_out_of_range:
        log.warning("%s: %d implausible input value(s) (sentinels such as -999, absurd values) treated as "
                    "missing (n_inputs_rejected); %d star(s) with predictions outside the labels' physical "
                    "range written NaN (flag_out_of_range)", out, summary.n_inputs_rejected,
                    summary.n_out_of_range)
    return summary


def chunk_support(support: SupportIndex | None, latent: np.ndarray, chunk: PreparedChunk,
                  device) -> tuple[np.ndarray, np.ndarray]:
    """``support`` (float32) and ``low_support`` (bool) of a chunk's stars from the first member's latent."""
    if support is None:
        n = len(chunk.source_id)
        return np.full(n, np.nan, dtype=np.float32), np.zeros(n, dtype=bool)
    values = support.support(latent, chunk.has_xp, device)
    return values, support.low_support(values, chunk.has_xp)


def load_support(calibration_path: str | Path, calibration: dict, ensemble: Ensemble) -> SupportIndex | None:
    """The support index ``msa calibrate`` wrote beside ``calibration_path``, checked against the
    sha256 the calibration records and the members; None (with a warning) for a calibration
    that records none (written before support existed, or by hand)."""
    record = calibration.get("support_index")
    if record is None:
        log.warning("%s records no support index: support is written NaN and low_support false; re-run "
                    "`msa calibrate` for them", calibration_path)
        return None
    path = support_index_path(calibration_path)
    if not path.exists():
        raise SupportError(f"{calibration_path} was written with the support index {path}, which is missing; "
                           "re-run `msa calibrate`")
    if file_sha256(path) != record["sha256"]:
        raise SupportError(f"support index {path} is not the one {calibration_path} was written with "
                           "(sha256 differs); re-run `msa calibrate`")
    return SupportIndex.load(path, ensemble.checksums)


def _combine_and_calibrate(member_q: np.ndarray, calibration: dict | None, labels: Sequence[str],
                           groups: np.ndarray) -> np.ndarray:
    q = combine_members(member_q)
    if calibration is not None:
        q = apply_calibration(q, calibration, labels, groups=groups).astype(np.float32, copy=False)
    return q


def _check_quantiles(q: np.ndarray, flagged: np.ndarray, source_id: np.ndarray, out) -> None:
    ok = ~flagged
    finite = np.all(np.isfinite(q[ok]), axis=(1, 2))
    if not np.all(finite):
        bad = source_id[ok][~finite]
        raise PredictionError(f"{out}: non-finite predictions for {len(bad)} star(s), e.g. source_id "
                              f"{bad[:3].tolist()}; check those stars' inputs for extreme values")
    if not (np.all(q[ok, :, 0] <= q[ok, :, 1]) and np.all(q[ok, :, 1] <= q[ok, :, 2])):
        raise PredictionError(f"{out}: quantiles out of order (q16 ≤ q50 ≤ q84 violated); this is a bug")


def predict_shard(shard_path: str | Path, ensemble: Ensemble, calibration: dict | None, out: str | Path,
                  *, chunk_rows: int, batch_size: int, min_inputs: int, **kwargs) -> PredictSummary:
    """Predict every row of one shard, in order; see :func:`predict_chunks` for the other arguments."""
    # G and store labels where the shard has them (a missing G falls back to the coarse group)
    source = open_shard(shard_path, input_transform(ensemble).store_columns, chunk_rows,
                        optional=[*extra_read_columns(kwargs.get("training")), *POSITION_COLUMNS])
    return predict_source(source, ensemble, calibration, out, batch_size=batch_size, min_inputs=min_inputs, **kwargs)


def predict_table(table_path: str | Path, ensemble: Ensemble, calibration: dict | None, out: str | Path,
                  *, chunk_rows: int, batch_size: int, min_inputs: int, allow_missing: bool = False,
                  **kwargs) -> PredictSummary:
    """Predict a user's CSV/ECSV/FITS/Parquet table (store column names), keeping its row order."""
    source = open_table(table_path, input_transform(ensemble).store_columns, chunk_rows, allow_missing,
                        optional=[*extra_read_columns(kwargs.get("training")), *POSITION_COLUMNS])
    return predict_source(source, ensemble, calibration, out, batch_size=batch_size, min_inputs=min_inputs, **kwargs)


def predict_source(source: StarSource, ensemble: Ensemble, calibration: dict | None, out: str | Path,
                   **kwargs) -> PredictSummary:
    return predict_chunks(source.chunks(), source.expected_ids, ensemble, calibration, out,
                          n_chunks=source.n_chunks, positions=position_columns(source.present), **kwargs)


# --- metadata and command line -------------------------------------------------------------------
def file_metadata(ensemble: Ensemble, member_paths: Sequence[str | Path], calibration_path: str | Path | None,
                  config: dict, label_set: str, units: dict[str, str], input_path: str | Path,
                  min_inputs: int, calibration: dict | None = None,
                  training: "TrainingSample | None" = None, support: SupportIndex | None = None) -> dict[str, str]:
    """Key-value metadata that identifies the model and the input of a prediction file."""
    return {
        "msa_version": __version__,
        "label_set": label_set,
        "labels": json.dumps(ensemble.labels),
        "units": json.dumps({label: units.get(label, "") for label in ensemble.labels}),
        "member_sha256": json.dumps(ensemble.checksums),
        "member_paths": json.dumps([str(p) for p in member_paths]),
        "calibration_sha256": file_sha256(calibration_path) if calibration_path else "uncalibrated",
        "config_hash": config_hash(config),
        "input_file": str(input_path),
        "min_inputs": str(min_inputs),
        "quantiles": "q16/q50/q84: 16th, 50th, 84th percentiles of the equal-weight mixture of the members' "
                     "predictive distributions, with split-conformal offsets of each star's calibration_group",
        "calibration_guarantee": calibration_guarantee(calibration),
        "in_training_sample": training_sample_meaning(training),
        "support": support_meaning(support),
    }


def support_meaning(support: SupportIndex | None) -> str:
    """What ``support`` and ``low_support`` mean in this file, for its metadata."""
    if support is None:
        return "unknown (support NaN, low_support false everywhere): the calibration has no support index"
    sizes = ", ".join(f"{v} {len(support.latent[v])}" for v in support.latent)
    return (f"support: fraction of the labelled and survey stars of the support index ({sizes} stars per view) whose "
            f"mean latent distance to their {support.k} nearest other index stars is at least the star's to its "
            f"{support.k} nearest index stars (first member's encoder output; stars with XP against the XP view, "
            f"others against the XP-hidden view); low_support: support < {support.low_threshold['xp']:g} (with XP), "
            f"< {support.low_threshold['no_xp']:g} (without), the interval's "
            "promise was made for stars unlike this one")


def training_sample_meaning(training: "TrainingSample | None") -> str:
    """What ``in_training_sample`` means in this file, for its metadata."""
    if training is None:
        return "unknown (false everywhere): the config names no label columns for this label set"
    if training.split_limits is None:
        return ("true: the star has a label and is in the train, validation or calibration split: its labels may "
                "have been read by fine-tuning or calibration (the calibration records no samples: an upper bound)")
    return ("true: a fit read the star's labels: fine-tuning (the train split, every star of it: with "
            "finetune.max_train_rows an epoch reads a part, so there it is an upper bound; the validation stars "
            "early stopping scored) or calibration (the calibration stars and calibration survey stars it "
            "scored); its predictions are not out-of-sample")


def calibration_guarantee(calibration: dict | None) -> str:
    """Which coverage promise holds for which stars, by ``interval_basis``, in words, for the
    prediction files' metadata."""
    if calibration is None:
        return "none: uncalibrated ensemble quantiles"
    coverage = calibration.get("coverage_target")
    groups = sorted(calibration.get("groups") or {})
    surveys = sorted(calibration.get("surveys") or {})
    emulated = calibration.get("emulated_groups") or []
    text = (f"split-conformal, finite-sample: P(q16 <= true <= q84) >= {coverage} for a star exchangeable with the "
            f"stars its calibration_group's offsets were fitted on, which interval_basis names. Groups with their "
            f"own offsets (G bin and bands present, >= {calibration.get('min_group_size')} stars each): "
            f"{groups or 'none'}. interval_basis 'labelled': the label set's own calibration stars (a star in "
            "no finer group takes its coarse group's offsets, xp or no_xp, whose promise holds only on average "
            "over those stars)")
    if surveys:
        text += (f"; 'survey': stars of the calibration surveys {surveys} in the star's group "
                 f"({sorted(calibration.get('survey_groups') or [])}), a promise for stars like the surveys' own")
    if emulated:
        text += (f"; 'emulated': groups {sorted(emulated)}, calibrated on bright stars degraded to fainter "
                 "magnitudes with the store's own error-versus-magnitude relation: the promise assumes that "
                 "emulation, and bright stars' copies are not the faint sky's population")
    text += ("; 'extrapolated': no promise, the coarse offsets applied outside the G range of the stars they "
             "were fitted on")
    return text


def check_config_fits(config: dict, label_set: str, ensemble: Ensemble) -> None:
    label_sets = config.get("label_sets") or {}
    if label_set not in label_sets:
        raise PredictionError(f"label set {label_set!r} is not in the config's label_sets {sorted(label_sets)}")
    if list(label_sets[label_set]) != ensemble.labels:
        raise PredictionError(f"label_sets.{label_set} is {label_sets[label_set]} in the config but the members "
                              f"were trained for {ensemble.labels}; pass that label set's members")
    Layout.from_config(config["features"]).require_same(ensemble.layout, "the members")


def add_arguments(parser) -> None:
    parser.add_argument("--config", required=True, help="pipeline config (YAML)")
    parser.add_argument("--label-set", required=True, help="name in the config's label_sets")
    parser.add_argument("--members", nargs="+", required=True, help="fine-tuned member model.pt files")
    parser.add_argument("--calibration", required=True, help="calibration JSON from `msa calibrate`")
    add_star_source_arguments(parser, several_shards=True)
    add_device_argument(parser)


def log_summary(out: str | Path, summary: PredictSummary, min_inputs: int) -> None:
    log.info("%s: %d stars (%d without XP, %d flagged with fewer than %d inputs: NaN predictions, %d with "
             "low_support) in %.1f s (%.0f stars/s)", out, summary.n_rows, summary.n_without_xp, summary.n_flagged,
             min_inputs, summary.n_low_support, summary.seconds, summary.stars_per_second)


def run(args) -> int:
    check_outputs(args, [args.config, args.calibration, *args.members])
    config = load_config(args.config)
    pcfg = config["predict"]
    ensemble = Ensemble.load(args.members, device=resolve_device(args.device), amp=pcfg["amp"])
    check_config_fits(config, args.label_set, ensemble)
    calibration = load_calibration(args.calibration, ensemble)  # made for these members, or refused
    units = pcfg["label_units"]
    training = TrainingSample.from_config(config, args.label_set, calibration)
    support = load_support(args.calibration, calibration, ensemble)
    common = dict(chunk_rows=pcfg["chunk_rows"], batch_size=pcfg["batch_size"], min_inputs=pcfg["min_inputs"],
                  save_latent=pcfg["save_latent"], units=units, training=training, support=support)

    def predict_one(source: Path, out: Path, shown: Path) -> PredictSummary:
        """One input with the loaded models: ``out`` is written, ``shown`` is logged (its final path)."""
        metadata = file_metadata(ensemble, args.members, args.calibration, config, args.label_set, units, source,
                                 pcfg["min_inputs"], calibration, training, support)
        if args.table:
            summary = predict_table(source, ensemble, calibration, out, allow_missing=args.allow_missing_columns,
                                    metadata=metadata, **common)
        else:
            summary = predict_shard(source, ensemble, calibration, out, metadata=metadata, **common)
        log_summary(shown, summary, pcfg["min_inputs"])
        return summary

    write_each_source(args, predict_one, "predict")
    return 0
