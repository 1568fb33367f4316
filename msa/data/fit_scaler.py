"""Fit the pipeline's one feature scaler: robust median / IQR over a seeded sample of the store.

A seeded sample of shards (``scaler.shards``: a count or a list of shard names) and, from those,
a seeded sample of at most ``scaler.max_rows`` rows are read (only the sampled rows, in bounded
groups, through ``Shard.read_rows``), turned into the DERIVED features with
:func:`msa.data.features.derive` (exactly what the model sees, before scaling), and summarised per
feature as scikit-learn's ``RobustScaler`` does: centre = median, scale = 75th − 25th
percentile, NaN ignored, a zero or undefined scale replaced by 1.

CLI: ``msa fit-scaler --config CFG --shards A.h5 B.h5 ... --out results/scaler.json``.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from msa import __version__
from msa.config import config_hash, load_config
from msa.data.features import derive, store_columns, xp_normalises
from msa.data.layout import Layout
from msa.data.scaling import Scaler
from msa.data.store import Shard, StoreError, check_out_path
from msa.progress import progress

log = logging.getLogger(__name__)

READ_GROUP_ROWS = 262_144  # sampled rows are read per span of this many shard rows (bounds memory)


def choose_shards(shard_paths: Sequence[str | Path], shards: int | Sequence[str], seed: int) -> list[Path]:
    """A seeded sample of ``shards`` shards, or the shards named in the list (by file name or
    stem); returned in the order of ``shard_paths``."""
    paths = [Path(p) for p in shard_paths]
    if not paths:
        raise ValueError("fit-scaler: no shards given; pass --shards with the store's files")
    if isinstance(shards, int):
        k = min(shards, len(paths))
        picked = np.sort(np.random.default_rng([seed, 0]).choice(len(paths), size=k, replace=False))
        return [paths[i] for i in picked]
    by_name = {}
    for p in paths:
        by_name[p.name] = p
        by_name[p.stem] = p
    missing = [n for n in shards if n not in by_name]
    if missing:
        raise ValueError(f"scaler.shards names {missing}, which are not among the given shards "
                         f"(e.g. {paths[0].name}); list file names or stems of --shards")
    chosen = {by_name[n] for n in shards}
    return [p for p in paths if p in chosen]


def sample_derived(shard_paths: Sequence[Path], layout: Layout, normalise_xp: bool, max_rows: int,
                   seed: int) -> tuple[np.ndarray, dict]:
    """Derived feature values ``(n, n_features)`` of a seeded row sample of the given shards."""
    sizes = []
    for p in shard_paths:
        with Shard(p) as shard:
            sizes.append(shard.n_rows)
    total = int(sum(sizes))
    rng = np.random.default_rng([seed, 1])
    # a uniform sample of the union of the shards' rows, without replacement
    take = np.sort(rng.choice(total, size=max_rows, replace=False)) if total > max_rows else np.arange(total)
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    columns = store_columns(layout, normalise_xp)
    parts = []
    with progress(total=len(take), desc="fit-scaler rows", unit="row") as bar:
        for k, path in enumerate(shard_paths):
            local = take[(take >= offsets[k]) & (take < offsets[k + 1])] - offsets[k]
            with Shard(path) as shard:
                for lo in range(0, sizes[k], READ_GROUP_ROWS):
                    rows = local[(local >= lo) & (local < lo + READ_GROUP_ROWS)]
                    if not len(rows):
                        continue
                    raw = shard.read_rows(columns, rows)
                    values, _ = derive(raw, layout, normalise_xp)
                    parts.append(values)
                    bar.update(len(rows))
    values = np.concatenate(parts) if parts else np.empty((0, layout.n_features), dtype=np.float32)
    info = {"shards": [p.name for p in shard_paths], "shard_rows": sizes, "rows": int(len(values)),
            "max_rows": int(max_rows)}
    return values, info


def robust_stats(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-column NaN-ignoring median and interquartile range (RobustScaler semantics)."""
    values = np.asarray(values, dtype=np.float64)
    centre = np.full(values.shape[1], np.nan)
    scale = np.full(values.shape[1], np.nan)
    for j in range(values.shape[1]):
        column = values[:, j]
        column = column[np.isfinite(column)]
        if len(column):
            q25, q50, q75 = np.percentile(column, [25.0, 50.0, 75.0])
            centre[j], scale[j] = q50, q75 - q25
    return centre, scale


def fit_scaler(shard_paths: Sequence[str | Path], layout: Layout, normalise_xp: bool,
               shards: int | Sequence[str] = 8, max_rows: int = 1_000_000, seed: int = 0) -> tuple[Scaler, dict]:
    """The robust scaler for ``layout`` and its provenance (shards used, rows, seed, version)."""
    chosen = choose_shards(shard_paths, shards, seed)
    values, info = sample_derived(chosen, layout, normalise_xp, max_rows, seed)
    if not len(values):
        raise StoreError(f"fit-scaler: the sampled shards {info['shards']} hold no rows")
    centre, scale = robust_stats(values)
    empty = [n for n, c in zip(layout.names, centre) if np.isnan(c)]
    if empty:
        log.warning("features with no value in the sample (centre 0, scale 1): %s", empty)
    meta = {**info, "seed": int(seed), "msa_version": __version__, "normalise_xp": bool(normalise_xp),
            "fitted": time.strftime("%Y-%m-%dT%H:%M:%S")}
    return Scaler.from_stats(layout.names, centre, scale), meta


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="pipeline config (features, scaler sections)")
    parser.add_argument("--shards", nargs="+", required=True, help="the store's shard files")
    parser.add_argument("--out", required=True, help="scaler JSON to write (e.g. results/scaler.json)")


def run(args: argparse.Namespace) -> int:
    check_out_path(args.out, [args.config, *args.shards], (".json",))
    config = load_config(args.config)
    layout = Layout.from_config(config["features"])
    section = config["scaler"]
    scaler, meta = fit_scaler(args.shards, layout, xp_normalises(config["features"]), shards=section["shards"],
                              max_rows=section["max_rows"], seed=config["seed"])
    meta["config_hash"] = config_hash(config, ["features", "scaler", "seed"])
    scaler.save(args.out, meta=meta)
    log.info("scaler over %d features from %d rows of %d shard(s) → %s", len(scaler.names), meta["rows"],
             len(meta["shards"]), args.out)
    return 0
