"""``msa reconstruct``: the autoencoder's XP spectrum of every star, in the Archive's units.

The decoder reconstructs scaled, derived features; this stage undoes both steps exactly, the
scaler (``Scaler.inverse_values``) and the G normalisation (``features.xp_to_archive_units``), so
its coefficients compare directly with ``XpContinuousMeanSpectrum`` rows and feed GaiaXPy
(``msa.data.xp_flux``). Stars without a G magnitude get NaN coefficients: their scale is unknown; so
do stars the models cannot reconstruct (a G so extreme that the scale over- or underflows, a
non-finite output), never 0 or inf.

Output (Parquet, one row per input star, input order, ``source_id`` checked as in prediction):
``source_id``; ``has_xp`` (the input had an XP spectrum); per coefficient ``c`` in ``bp_1`` …
``rp_55``: ``c_reconstructed`` (mean over the models), ``c_spread`` (standard deviation over the
models, only with two or more: the uncertainty the model has), ``c_observed`` and
``c_observed_error`` (the input's own coefficient and error, NaN without XP). With ``--hide-xp``
every XP coefficient is hidden from the encoder: the spectrum the model infers from photometry and
astrometry alone, what a star fainter than G = 17.65 gets, and the validation of
``msa evaluate-reconstruction``. The file's metadata names the models (sha256), ``xp_hidden`` and
the units.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import pyarrow as pa

from msa import __version__
from msa.config import config_hash, load_config
from msa.data.features import G_MAG, g_flux_factor, xp_to_archive_units
from msa.data.layout import Layout
from msa.data.parquet_stream import stream_to_parquet
from msa.data.star_sources import add_star_source_arguments, check_outputs, write_each_source
from msa.data.store import SOURCE_ID
from msa.errors import InputError
from msa.nn.autoencoders import Autoencoders
from msa.nn.training import add_device_argument, resolve_device

log = logging.getLogger(__name__)

XP_UNITS = "Gaia DR3 XP continuous coefficients, Archive units (as XpContinuousMeanSpectrum)"


class ReconstructionError(InputError, ValueError):
    """The models do not reconstruct the XP block, or the config does not fit them."""


@dataclass
class XpReconstruction:
    """One chunk's XP: ``mean``, ``spread`` (None with one model), ``observed``, ``observed_error``
    (all float64 ``(n, n_xp)``, Archive units), ``has_xp`` (bool ``(n,)``); ``names`` the coefficients."""

    names: list[str]
    mean: np.ndarray
    spread: np.ndarray | None
    observed: np.ndarray
    observed_error: np.ndarray
    has_xp: np.ndarray
    per_model: np.ndarray  # (K, n, n_xp)


def xp_error_names(layout: Layout) -> list[str]:
    return [layout.features[i].error for i in layout.xp_indices]


def xp_decoder_positions(aes: Autoencoders) -> np.ndarray:
    """Positions of the XP coefficients within the decoder output (which covers ``reconstruct_indices``)."""
    recon = list(aes.layout.reconstruct_indices)
    xp = aes.layout.xp_indices
    if not len(xp):
        raise ReconstructionError("the models' layout has no XP coefficients (features.xp); nothing to reconstruct")
    missing = [aes.layout.names[i] for i in xp if i not in recon]
    if missing:
        raise ReconstructionError(f"the models do not reconstruct {missing[:3]}…: features.reconstruct leaves out "
                                  "the xp group; pretrain with xp among the reconstructed groups")
    return np.array([recon.index(i) for i in xp], dtype=np.int64)


def scaled_xp_to_archive(scaled_xp: np.ndarray, g_mag: np.ndarray | None, aes: Autoencoders) -> np.ndarray:
    """Scaled XP values ``(..., n, n_xp)`` (layout order) → Archive-unit coefficients, float64: the scaler
    undone, then the G normalisation."""
    derived = aes.scaler.inverse_values(scaled_xp, aes.layout.xp_indices)
    if derived.ndim == 3:
        archive = np.stack([xp_to_archive_units(d, g_mag if aes.normalise_xp else None) for d in derived])
    else:
        archive = xp_to_archive_units(derived, g_mag if aes.normalise_xp else None)
    if aes.normalise_xp and g_mag is not None:
        # a G so far out that 10^(0.4 (G − 15)) overflows (G = 1e300) or underflows would give 0 or inf
        with np.errstate(over="ignore"):
            factor = g_flux_factor(g_mag)
        archive[..., ~(np.isfinite(factor) & (factor > 0)), :] = np.nan
    # a star the models cannot reconstruct gets no coefficient at all: NaN, never 0 or inf
    archive[~np.isfinite(archive).all(axis=-1)] = np.nan
    return archive


def read_columns(aes: Autoencoders) -> list[str]:
    """Store columns a reconstruction reads: the encoder's inputs, the observed XP and its errors."""
    names = aes.input_transform().store_columns + [aes.layout.names[i] for i in aes.layout.xp_indices]
    errors = [e for e in xp_error_names(aes.layout) if e is not None]
    if aes.normalise_xp:
        names.append(G_MAG)
    return list(dict.fromkeys(names + errors))


def reconstruct_xp(raw: Mapping[str, np.ndarray], aes: Autoencoders, *, hide_xp: bool,
                   batch_size: int = 8192) -> XpReconstruction:
    """The models' XP for one chunk of raw store columns (see :class:`XpReconstruction`)."""
    x = aes.scaled_inputs(raw)
    xp_idx = aes.layout.xp_indices
    has_xp = np.isfinite(x[:, xp_idx]).any(axis=1)
    recon, _ = aes.run(x, aes.xp_mask() if hide_xp else None, batch_size=batch_size)
    g_mag = np.asarray(raw[G_MAG], dtype=np.float64) if aes.normalise_xp else None
    per_model = scaled_xp_to_archive(recon[:, :, xp_decoder_positions(aes)], g_mag, aes)
    names = [aes.layout.names[i] for i in xp_idx]
    n = len(x)
    observed = np.column_stack([np.asarray(raw[c], dtype=np.float64) for c in names])
    observed_error = np.column_stack([np.asarray(raw[e], dtype=np.float64) if e is not None
                                      else np.full(n, np.nan) for e in xp_error_names(aes.layout)])
    spread = per_model.std(axis=0, ddof=1) if len(per_model) > 1 else None
    return XpReconstruction(names, per_model.mean(axis=0), spread, observed, observed_error, has_xp, per_model)


# --- the Parquet file ----------------------------------------------------------------------------
def output_schema(names: list[str], with_spread: bool, metadata: dict[str, str]) -> pa.Schema:
    unit = {"unit": XP_UNITS}
    fields = [pa.field(SOURCE_ID, pa.int64(), nullable=False), pa.field("has_xp", pa.bool_(), nullable=False)]
    for name in names:
        fields.append(pa.field(f"{name}_reconstructed", pa.float32(), metadata=unit))
        if with_spread:
            fields.append(pa.field(f"{name}_spread", pa.float32(), metadata=unit))
        fields += [pa.field(f"{name}_observed", pa.float32(), metadata=unit),
                   pa.field(f"{name}_observed_error", pa.float32(), metadata=unit)]
    return pa.schema(fields, metadata=metadata)


def chunk_table(raw: Mapping[str, np.ndarray], rec: XpReconstruction, schema: pa.Schema) -> pa.Table:
    columns = [pa.array(np.asarray(raw[SOURCE_ID], dtype=np.int64)), pa.array(rec.has_xp)]
    for j in range(len(rec.names)):
        columns.append(pa.array(rec.mean[:, j].astype(np.float32)))
        if rec.spread is not None:
            columns.append(pa.array(rec.spread[:, j].astype(np.float32)))
        columns += [pa.array(rec.observed[:, j].astype(np.float32)),
                    pa.array(rec.observed_error[:, j].astype(np.float32))]
    return pa.Table.from_arrays(columns, schema=schema)


def file_metadata(aes: Autoencoders, config: dict, source, hide_xp: bool) -> dict[str, str]:
    return {
        "msa_version": __version__, "model_sha256": json.dumps(aes.sha256),
        "model_paths": json.dumps([str(p) for p in aes.paths]), "config_hash": config_hash(config),
        "input_file": str(source), "xp_hidden": json.dumps(bool(hide_xp)), "units": XP_UNITS,
        "spread": "standard deviation of the models' reconstructions (columns present with two or more models)",
    }


def reconstruct_file(source, is_shard: bool, aes: Autoencoders, out, *, hide_xp: bool, chunk_rows: int,
                     batch_size: int, metadata: dict[str, str], allow_missing: bool = False):
    """Reconstruct every star of a shard (``is_shard``) or a user's table into ``out``."""
    names = [aes.layout.names[i] for i in aes.layout.xp_indices]
    xp_decoder_positions(aes)  # refuse before reading anything
    schema = output_schema(names, len(aes.models) > 1, metadata)

    def table(raw):
        return chunk_table(raw, reconstruct_xp(raw, aes, hide_xp=hide_xp, batch_size=batch_size), schema)

    return stream_to_parquet(source, is_shard, read_columns(aes), out, schema, table, chunk_rows=chunk_rows,
                             allow_missing=allow_missing)


# --- command line --------------------------------------------------------------------------------
def add_source_arguments(parser) -> None:
    """The options ``msa reconstruct`` and ``msa embed`` share."""
    parser.add_argument("--config", required=True, help="pipeline config (YAML)")
    parser.add_argument("--models", nargs="+", required=True,
                        help="results/pretrain/model.pt and/or fine-tuned member model.pt files (same run)")
    add_star_source_arguments(parser, several_shards=True)
    add_device_argument(parser)


def load_for_command(args) -> tuple[dict, Autoencoders]:
    check_outputs(args, [args.config, *args.models])
    config = load_config(args.config)
    aes = Autoencoders.load(args.models, device=resolve_device(args.device))
    Layout.from_config(config["features"]).require_same(aes.layout, "the models")
    return config, aes


def add_arguments(parser) -> None:
    add_source_arguments(parser)
    parser.add_argument("--hide-xp", action="store_true",
                        help="hide every XP coefficient from the encoder (validation; the photometry-only view)")


def run(args) -> int:
    config, aes = load_for_command(args)
    section = config["reconstruct"]

    def reconstruct_one(source, out, shown):
        summary = reconstruct_file(source, args.table is None, aes, out, hide_xp=args.hide_xp,
                                   chunk_rows=section["chunk_rows"], batch_size=section["batch_size"],
                                   metadata=file_metadata(aes, config, source, args.hide_xp),
                                   allow_missing=args.allow_missing_columns)
        log.info("%s: %d stars reconstructed%s in %.1f s (%.0f stars/s)", shown, summary.n_rows,
                 " with XP hidden" if args.hide_xp else "", summary.seconds, summary.stars_per_second)

    write_each_source(args, reconstruct_one, "reconstruct")
    return 0
