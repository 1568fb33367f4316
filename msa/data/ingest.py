"""``msa ingest``: one XP file (+ its gaia_source file, + survey tables) → one HDF5 shard.

The shard holds, per star and as delivered by the Archive (no derived features):
``source_id``; ``bp_1..bp_55``, ``rp_1..rp_55`` (coefficients, e-/s) and ``bpe_1..``, ``rpe_1..``
(their errors); the configured gaia_source columns plus any ``phot_*_mean_flux_over_error`` the
source file has; every survey column and error under its configured store name.

Joins are by ``source_id``. Every XP star must be in the source file (an error otherwise); source
stars without XP are kept with NaN XP (``keep_sources_without_xp``) or dropped with a logged count;
survey rows for other stars are ignored and stars without a survey row get NaN. A repeated
source_id in any input is an error. The XP file is streamed in blocks, so peak memory is about the
float32 output plus one block, even for a 500k-row bulk file with correlations.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import time
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from msa import __version__
from msa.config import config_hash, load_config, validate
from msa.data.gaia import (N_XP_COEFFICIENTS, SOURCE_ID, check_unique_ids, concat_blocks,
                           file_kind, iter_xp, read_table, table_columns)
from msa.data.layout import xp_coefficient_names, xp_error_names
from msa.data.plausible import SURVEY_LIMIT, reject_survey_values
from msa.data.store import CHUNK_ROWS, check_out_path, write_shard
from msa.data.surveys import join_survey, read_survey
from msa.errors import InputError
from msa.progress import progress

log = logging.getLogger(__name__)

FLUX_OVER_ERROR_COLUMNS = ("phot_g_mean_flux_over_error", "phot_bp_mean_flux_over_error",
                           "phot_rp_mean_flux_over_error")
SHARD_SUFFIXES = (".h5", ".hdf5")
FULL_HASH_MAX_BYTES = 16 << 20  # larger files: sha256 of the first MiB, plus size and mtime
_XP_STORE_NAMES = {
    "bp_coefficients": xp_coefficient_names("bp", N_XP_COEFFICIENTS),
    "bp_coefficient_errors": xp_error_names("bp", N_XP_COEFFICIENTS),
    "rp_coefficients": xp_coefficient_names("rp", N_XP_COEFFICIENTS),
    "rp_coefficient_errors": xp_error_names("rp", N_XP_COEFFICIENTS),
}


class IngestError(InputError, ValueError):
    """The inputs of one shard do not fit together (ids missing, duplicated, ...)."""


def file_fingerprint(path: str | Path) -> dict:
    """Path, size, mtime and a sha256 (of the whole file if ≤ 16 MiB, else of its first MiB)."""
    path = Path(path)
    stat = path.stat()
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        digest.update(f.read(FULL_HASH_MAX_BYTES if stat.st_size <= FULL_HASH_MAX_BYTES else 1 << 20))
    key = "sha256" if stat.st_size <= FULL_HASH_MAX_BYTES else "sha256_first_mib"
    return {"path": str(path.resolve()), "size": stat.st_size,
            "mtime": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(stat.st_mtime)), key: digest.hexdigest()}


def _read_xp_streaming(xp_path: Path, extra_columns: Sequence[str], show_progress: bool) -> dict[str, np.ndarray]:
    total = xp_path.stat().st_size
    with progress(total=total, unit="B", unit_scale=True, desc=f"ingest {xp_path.name}",
                  enabled=show_progress and file_kind(xp_path) == "text") as bar:
        def bytes_read(done: int) -> None:
            bar.update(max(done - bar.n, 0))
        blocks = list(iter_xp(xp_path, extra_columns, progress=bytes_read))
    if not blocks:  # a header-only file: an empty, valid block
        blocks = [{SOURCE_ID: np.empty(0, np.int64),
                   **{c: np.empty((0, N_XP_COEFFICIENTS), np.float32) for c in _XP_STORE_NAMES},
                   **{c: np.empty(0) for c in extra_columns if c in table_columns(xp_path)}}]
    return concat_blocks(blocks, xp_path)


def _check_inputs_exist(xp_path: Path, source_path, surveys: Mapping[str, Mapping], out) -> None:
    for role, given in [("xp", xp_path), ("source", source_path),
                        *((f"survey {n}", spec["path"]) for n, spec in surveys.items())]:
        if given is not None and not Path(given).is_file():
            raise IngestError(f"{given}: {role} file not found; fix the path (--xp/--source/--photometry "
                              "or the config's ingest section)")
    check_out_path(out, [xp_path, source_path, *(spec["path"] for spec in surveys.values())], SHARD_SUFFIXES)


def _join_source(xp: dict, xp_path: Path, source_path: Path, source_columns: Sequence[str],
                 keep_sources_without_xp: bool, counts: dict) -> dict[str, np.ndarray]:
    """Shard columns of the source file's stars, with the XP of those that have it (NaN elsewhere)."""
    xp_ids = xp[SOURCE_ID]
    source = read_table(source_path, source_columns, optional=FLUX_OVER_ERROR_COLUMNS)
    src_ids = source[SOURCE_ID]
    check_unique_ids(src_ids, source_path)
    counts["source_rows"] = int(len(src_ids))
    has_xp = np.isin(src_ids, xp_ids)
    orphans = np.setdiff1d(xp_ids, src_ids)
    if len(orphans):
        raise IngestError(
            f"{len(orphans)} of {len(xp_ids)} stars in {xp_path} are not in {source_path}, "
            f"e.g. {orphans[:3].tolist()}; pair each XP file with the gaia_source file of the same "
            "sky region (same {shard})")
    counts["sources_without_xp"] = int((~has_xp).sum())
    if not keep_sources_without_xp and counts["sources_without_xp"]:
        log.info("%s: dropping %d source(s) without XP (keep_sources_without_xp is false)",
                 source_path.name, counts["sources_without_xp"])
    keep = np.ones(len(src_ids), bool) if keep_sources_without_xp else has_xp
    ids = src_ids[keep]
    columns = {SOURCE_ID: ids, **{c: v[keep] for c, v in source.items() if c != SOURCE_ID}}
    xp_order = np.argsort(xp_ids, kind="stable")
    in_xp = has_xp[keep]
    xp_rows = xp_order[np.searchsorted(xp_ids, ids[in_xp], sorter=xp_order)]
    for list_column, store_names in _XP_STORE_NAMES.items():
        block = np.full((len(ids), N_XP_COEFFICIENTS), np.nan, dtype=np.float32)
        block[in_xp] = xp[list_column][xp_rows]
        columns.update({n: block[:, i] for i, n in enumerate(store_names)})
    return columns


def _xp_only_columns(xp: dict, xp_path: Path, source_columns: Sequence[str], counts: dict) -> dict[str, np.ndarray]:
    """Shard columns without a source file: the XP stars, and what source columns the XP file has."""
    counts["sources_without_xp"] = 0
    columns = {SOURCE_ID: xp[SOURCE_ID]}
    for list_column, store_names in _XP_STORE_NAMES.items():
        columns.update({n: xp[list_column][:, i] for i, n in enumerate(store_names)})
    copied = [c for c in xp if c not in _XP_STORE_NAMES and c != SOURCE_ID]
    absent = [c for c in source_columns if c not in copied]
    if absent:
        log.warning("%s: no gaia_source file given; source column(s) %s are not in the XP file and are "
                    "left out of the shard", xp_path.name, absent)
    columns.update({c: xp[c] for c in copied})
    return columns


def _join_surveys(columns: dict, surveys: Mapping[str, Mapping], xp_path: Path,
                  min_survey_match_fraction: float, counts: dict, inputs: list) -> None:
    """Add each survey's columns to ``columns`` (NaN for stars without a row), with counts and checks."""
    ids = columns[SOURCE_ID]
    for name, spec in surveys.items():
        path = Path(spec["path"])
        inputs.append({"role": f"survey:{name}", **file_fingerprint(path)})
        table = read_survey(path, spec["columns"], spec.get("errors") or {})
        clash = sorted(set(table) - {SOURCE_ID} & set(columns))
        if clash:
            raise IngestError(f"survey {name!r} ({path}): store name(s) {clash} are already taken by another "
                              "input; rename them in ingest.surveys.{name}.columns/errors")
        joined, matched = join_survey(ids, table)
        rejected = {}
        for column in list(joined):  # sentinels (-999) and absurd values (1e8) are missing, not data
            joined[column], rejected[column] = reject_survey_values(joined[column])
        if any(rejected.values()):
            log.warning("survey %s (%s): implausible values (sentinels such as -999, |value| > %g) stored as "
                        "missing: %s", name, path, SURVEY_LIMIT, {c: n for c, n in rejected.items() if n})
        counts[f"survey_{name}_rejected"] = int(sum(rejected.values()))
        columns.update(joined)
        n_rows = int(len(table[SOURCE_ID]))
        counts[f"survey_{name}_rows"] = n_rows
        counts[f"survey_{name}_matched"] = matched
        counts[f"survey_{name}_unmatched"] = n_rows - matched
        log.info("survey %s (%s): %d of %d shard stars matched; %d of its %d rows are for other stars",
                 name, path, matched, len(ids), n_rows - matched, n_rows)
        if len(ids) and matched < min_survey_match_fraction * len(ids):
            raise IngestError(
                f"survey {name!r} ({path}): only {matched} of {len(ids)} stars of {xp_path} have a row "
                f"(below ingest.min_survey_match_fraction = {min_survey_match_fraction}); check that the "
                "file covers this shard and that its source_id column holds Gaia DR3 ids, or lower the fraction")


def ingest_shard(
    xp_path: str | Path,
    source_path: str | Path | None,
    surveys: Mapping[str, Mapping] | None,
    out: str | Path,
    source_columns: Sequence[str] = (),
    keep_sources_without_xp: bool = True,
    config_digest: str | None = None,
    compression: str | None = "gzip",
    chunk_rows: int = CHUNK_ROWS,
    show_progress: bool = True,
    min_survey_match_fraction: float = 0.0,
) -> dict:
    """Ingest one shard and write it atomically to ``out``; returns the provenance counts.

    ``surveys`` maps a survey name to ``{"path", "columns": {col: store_name}, "errors": {...}}``.
    ``source_path=None``: XP stars only; the ``source_columns`` the XP file itself has are copied.
    Each survey join is reported (log and the shard's ``counts``); one matching fewer than
    ``min_survey_match_fraction`` of the shard's stars is an error (a wrong file or id column
    otherwise gives a shard without that survey, silently).
    """
    xp_path, surveys = Path(xp_path), dict(surveys or {})
    source_path = None if source_path is None else Path(source_path)
    _check_inputs_exist(xp_path, source_path, surveys, out)
    inputs = [{"role": "xp", **file_fingerprint(xp_path)}]
    source_columns = list(dict.fromkeys(c for c in source_columns if c != SOURCE_ID))
    xp = _read_xp_streaming(xp_path, [] if source_path is not None
                            else [*source_columns, *FLUX_OVER_ERROR_COLUMNS], show_progress)
    check_unique_ids(xp[SOURCE_ID], xp_path)
    if not len(xp[SOURCE_ID]):
        log.warning("%s: no XP rows (a header only?); the shard will hold no XP spectrum", xp_path)
    counts = {"xp_rows": int(len(xp[SOURCE_ID]))}

    if source_path is not None:
        inputs.append({"role": "source", **file_fingerprint(source_path)})
        columns = _join_source(xp, xp_path, source_path, source_columns, keep_sources_without_xp, counts)
    else:
        columns = _xp_only_columns(xp, xp_path, source_columns, counts)
    _join_surveys(columns, surveys, xp_path, min_survey_match_fraction, counts, inputs)

    counts["written"] = int(len(columns[SOURCE_ID]))
    attrs = {"inputs": inputs, "counts": counts, "msa_version": __version__,
             "keep_sources_without_xp": bool(keep_sources_without_xp),
             "created_by": "msa ingest"}
    if config_digest is not None:
        attrs["config_hash"] = config_digest
    write_shard(out, columns, attrs, compression=compression, chunk_rows=chunk_rows)
    log.info("%s: %d stars written (%d XP rows, %d without XP)", out, counts["written"],
             counts["xp_rows"], counts["sources_without_xp"])
    return counts


# --- command line ---------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="pipeline config (paths from its ingest section); optional: "
                        "without it, the files given by --xp/--source/--photometry and the schema's defaults")
    parser.add_argument("--shard", help="shard name substituted for {shard} in the config's ingest paths")
    parser.add_argument("--xp", help="XP continuous file (CSV, CSV.gz, ECSV, FITS); overrides the config")
    parser.add_argument("--source", help="gaia_source file; overrides the config")
    parser.add_argument("--photometry", action="append", default=[], metavar="NAME=FILE",
                        help="survey table for survey NAME (its columns from the config, or all "
                             "numeric columns under their own names if NAME is not configured)")
    parser.add_argument("--keep-sources-without-xp", action=argparse.BooleanOptionalAction, default=None,
                        help="override ingest.keep_sources_without_xp")
    parser.add_argument("--out", required=True, help="output shard (.h5), written atomically")


def _survey_from_file(name: str, path: str) -> dict:
    columns = [c for c in table_columns(path) if c != SOURCE_ID]
    return {"path": path, "columns": {c: c for c in columns}, "errors": {}}


def resolve_inputs(args: argparse.Namespace, cfg: dict) -> tuple[str, str | None, dict]:
    """XP path, source path and surveys from the config (with ``{shard}``) and CLI overrides."""
    ingest = cfg["ingest"]
    if args.xp is None and args.shard is None:
        raise IngestError("give --xp FILE, or --config CFG --shard NAME")

    def fill(pattern: str | None) -> str | None:
        if pattern is None:
            return None
        if "{shard}" in pattern and args.shard is None:
            raise IngestError(f"{pattern!r} contains {{shard}}; give --shard NAME")
        return pattern.replace("{shard}", args.shard) if args.shard is not None else pattern

    xp_path = args.xp or fill(ingest["xp"])
    if args.source is not None:
        source_path = args.source
    elif args.xp is not None and args.config is None:
        source_path = None
    else:
        source_path = fill(ingest.get("source"))
    surveys: dict = {}
    if args.xp is None or args.config is not None:
        surveys = {n: {**s, "path": fill(s["path"])} for n, s in (ingest.get("surveys") or {}).items()}
    for item in args.photometry:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise IngestError(f"--photometry expects NAME=FILE, got {item!r}")
        configured = (ingest.get("surveys") or {}).get(name)
        surveys[name] = {**configured, "path": path} if configured else _survey_from_file(name, path)
    return xp_path, source_path, surveys


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config) if args.config else validate({})
    xp_path, source_path, surveys = resolve_inputs(args, cfg)
    keep = cfg["ingest"]["keep_sources_without_xp"] if args.keep_sources_without_xp is None \
        else args.keep_sources_without_xp
    counts = ingest_shard(
        xp_path, source_path, surveys, args.out,
        source_columns=cfg["ingest"]["source_columns"], keep_sources_without_xp=keep,
        config_digest=config_hash(cfg, ["ingest"]) if args.config else None,
        compression=cfg["ingest"]["compression"], chunk_rows=cfg["ingest"]["chunk_rows"],
        show_progress=not args.no_progress,
        min_survey_match_fraction=cfg["ingest"]["min_survey_match_fraction"],
    )
    print(f"{args.out}: {counts['written']} stars ({counts['xp_rows']} with XP)")
    return 0
