"""``msa catalog``: prediction files → one HEALPix-partitioned Parquet catalogue per label set.

Layout (hive partitioning, readable by ``pyarrow.dataset``, ``pandas.read_parquet`` and, file by
file, ``astropy.table.Table.read``)::

    results/catalog/{label_set}/healpix_{L}={pixel}/part-{input:05d}.parquet
    results/catalog/{label_set}.summary.json        row counts, fractions, per-label percentiles
    results/catalog/{label_set}.skymap.png          median {catalog.sky_map_label}_q50 per pixel
    results/catalog/{label_set}.distributions.png   per-label q50 and interval-width histograms

``L`` is ``catalog.healpix_level``; a star's pixel comes from its Gaia ``source_id`` (nested
scheme), so partitions need no positions. Rows keep the prediction files' columns and
key-value metadata (model identity); every input must come from the same model. The dataset
is built in a temporary folder beside the destination and renamed into place; a source_id
found twice (in one input or across inputs) stops the build.

Memory: one input file at a time while writing, one pixel at a time while checking and
summarising; percentiles come from a deterministic sample of at most
``catalog.percentile_sample_rows`` stars (chosen by a hash of source_id; exact when smaller).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections import defaultdict
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from msa.errors import InputError
from msa.config import load_config
from msa.healpix import n_pixels, pixel_centres, source_id_to_pixel
from msa.plots import plt, save_figure
from msa.splits import unit_hash
from msa.store import SOURCE_ID, atomic_path, make_temp_dir

log = logging.getLogger(__name__)

IDENTITY_KEYS = ("label_set", "labels", "member_sha256", "calibration_sha256", "config_hash")
PERCENTILES = (1, 5, 16, 50, 84, 95, 99)


class CatalogError(InputError, RuntimeError):
    """Inputs that cannot form one catalogue: different models, duplicate stars, unreadable files."""


def partition_column(level: int) -> str:
    return f"healpix_{level}"


def output_paths(out_dir: str | Path, label_set: str) -> dict[str, Path]:
    """Where the catalogue of ``label_set`` and its summary files go (beside ``out_dir``)."""
    out_dir = Path(out_dir)
    parent = out_dir.parent
    return {"dataset": out_dir, "summary": parent / f"{label_set}.summary.json",
            "skymap": parent / f"{label_set}.skymap.png",
            "distributions": parent / f"{label_set}.distributions.png"}


def _metadata(path: Path) -> dict[str, str]:
    try:
        raw = pq.read_schema(path).metadata or {}
    except (OSError, pa.ArrowInvalid) as err:
        raise CatalogError(f"cannot read prediction file {path}: {err}") from err
    return {k.decode(): v.decode() for k, v in raw.items()}


def check_same_model(inputs: Sequence[Path], label_set: str) -> dict[str, str]:
    """All inputs carry the same model identity and label set; return the first one's metadata."""
    if not inputs:
        raise CatalogError("no prediction files given; pass --inputs results/predict/<label_set>/*.parquet")
    first = _metadata(inputs[0])
    missing = [k for k in IDENTITY_KEYS if k not in first]
    if missing:
        raise CatalogError(f"{inputs[0]} lacks metadata {missing}; is it an `msa predict` output?")
    if first["label_set"] != label_set:
        raise CatalogError(f"{inputs[0]} holds label set {first['label_set']!r}, not {label_set!r}")
    for path in inputs[1:]:
        meta = _metadata(path)
        differ = [k for k in IDENTITY_KEYS if meta.get(k) != first[k]]
        if differ:
            raise CatalogError(f"{path} and {inputs[0]} differ in {differ}: they were predicted by different "
                               "models; re-run `msa predict` for the stale files")
    return first


def write_partitions(inputs: Sequence[Path], dataset_dir: Path, level: int) -> dict[int, int]:
    """Split every input by HEALPix pixel into ``dataset_dir``; return rows per pixel."""
    key = partition_column(level)
    rows_per_pixel: dict[int, int] = defaultdict(int)
    for i, path in enumerate(tqdm(inputs, desc="catalogue: partition", unit="file", disable=None)):
        table = pq.read_table(path)
        if SOURCE_ID not in table.column_names:
            raise CatalogError(f"{path} has no {SOURCE_ID!r} column")
        pixel = source_id_to_pixel(table.column(SOURCE_ID).to_numpy(), level)
        order = np.argsort(pixel, kind="stable")  # prediction files are sorted already; tables may not be
        pixel = pixel[order]
        table = table.take(pa.array(order))
        bounds = np.flatnonzero(np.diff(pixel)) + 1
        for start, stop in zip(np.r_[0, bounds], np.r_[bounds, len(pixel)]):
            if stop == start:
                continue
            p = int(pixel[start])
            part_dir = dataset_dir / f"{key}={p}"
            part_dir.mkdir(parents=True, exist_ok=True)
            pq.write_table(table.slice(start, stop - start), part_dir / f"part-{i:05d}.parquet", compression="zstd")
            rows_per_pixel[p] += int(stop - start)
    return dict(rows_per_pixel)


def summarise_partitions(dataset_dir: Path, level: int, labels: Sequence[str], sky_label: str | None,
                         sample_fraction: float, seed: int) -> dict:
    """One pass over the pixels: duplicate check, counts, per-pixel median, percentile sample."""
    key = partition_column(level)
    columns = [SOURCE_ID, "has_xp", "flag_too_few_inputs"] + [f"{l}_{s}" for l in labels for s in ("q16", "q50", "q84")]
    n_rows = n_without_xp = n_flagged = 0
    pixel_median: dict[int, float] = {}
    pixel_count: dict[int, int] = {}
    samples: dict[str, list[np.ndarray]] = defaultdict(list)
    for part_dir in tqdm(sorted(dataset_dir.glob(f"{key}=*")), desc="catalogue: check", unit="pixel", disable=None):
        pixel = int(part_dir.name.split("=", 1)[1])
        table = pa.concat_tables([pq.read_table(p, columns=columns) for p in sorted(part_dir.glob("*.parquet"))])
        sid = table.column(SOURCE_ID).to_numpy()
        uniq, counts = np.unique(sid, return_counts=True)
        if np.any(counts > 1):
            raise CatalogError(f"{int(np.sum(counts > 1))} source_id(s) appear more than once (pixel {pixel} of "
                               f"level {level}), e.g. {uniq[counts > 1][:3].tolist()}; two inputs overlap — "
                               "pass each shard's predictions once")
        n_rows += len(sid)
        n_without_xp += int(np.sum(~table.column("has_xp").to_numpy()))
        n_flagged += int(np.sum(table.column("flag_too_few_inputs").to_numpy()))
        pixel_count[pixel] = len(sid)
        if sky_label:
            values = table.column(f"{sky_label}_q50").to_numpy(zero_copy_only=False)
            finite = values[np.isfinite(values)]
            if len(finite):
                pixel_median[pixel] = float(np.median(finite))
        keep = unit_hash(sid, seed) < sample_fraction
        for label in labels:
            for s in ("q16", "q50", "q84"):
                samples[f"{label}_{s}"].append(table.column(f"{label}_{s}").to_numpy(zero_copy_only=False)[keep])
    return {"n_rows": n_rows, "n_without_xp": n_without_xp, "n_flagged": n_flagged,
            "pixel_median": pixel_median, "pixel_count": pixel_count,
            "samples": {k: np.concatenate(v) if v else np.empty(0, np.float32) for k, v in samples.items()}}


def label_statistics(samples: dict[str, np.ndarray], labels: Sequence[str], units: dict) -> dict:
    out = {}
    for label in labels:
        q16, q50, q84 = (samples[f"{label}_{s}"].astype(np.float64) for s in ("q16", "q50", "q84"))
        ok = np.isfinite(q50)
        entry = {"unit": units.get(label, ""), "n_sampled": int(ok.sum())}
        if ok.any():
            values = np.percentile(q50[ok], PERCENTILES)
            entry["q50_percentiles"] = {f"p{p}": float(v) for p, v in zip(PERCENTILES, values)}
            entry["median_half_width"] = float(np.median((q84[ok] - q16[ok]) / 2))
        out[label] = entry
    return out


def plot_sky_map(pixel_median: dict[int, float], level: int, label: str, unit: str, path: Path) -> Path:
    """Mollweide map of the median ``{label}_q50`` per HEALPix pixel (RA increasing to the left)."""
    fig = plt.figure(figsize=(8.5, 4.8))
    ax = fig.add_subplot(111, projection="mollweide")
    if pixel_median:
        pixels = np.fromiter(pixel_median, dtype=np.int64)
        values = np.array([pixel_median[p] for p in pixels])
        ra, dec = pixel_centres(pixels, level)
        lon = np.radians(-((ra + 180.0) % 360.0 - 180.0))  # RA 0° in the middle, increasing to the left
        size = max(1.0, 4.0e4 / n_pixels(level))
        sc = ax.scatter(lon, np.radians(dec), c=values, s=size, marker="s", cmap="viridis", linewidths=0)
        fig.colorbar(sc, ax=ax, orientation="horizontal", pad=0.06, fraction=0.05,
                     label=f"median {label} q50" + (f" [{unit}]" if unit else ""))
    ax.set_xticks(np.radians(np.arange(-150, 151, 30)))
    ax.set_xticklabels([f"{(-t) % 360}°" for t in range(-150, 151, 30)], fontsize=7)
    ax.grid(True, alpha=0.3)
    ax.set_title(f"median {label} per HEALPix level-{level} pixel ({len(pixel_median)} pixels)", fontsize=10)
    return save_figure(fig, path)


def plot_distributions(samples: dict[str, np.ndarray], labels: Sequence[str], units: dict, path: Path) -> Path:
    """Per label: histogram of the medians (top) and of the half-widths (q84 − q16) / 2 (bottom)."""
    fig, axes = plt.subplots(2, len(labels), figsize=(3.2 * len(labels), 5.2), squeeze=False)
    for j, label in enumerate(labels):
        q16, q50, q84 = (samples[f"{label}_{s}"] for s in ("q16", "q50", "q84"))
        ok = np.isfinite(q50)
        unit = units.get(label, "")
        suffix = f" [{unit}]" if unit else ""
        axes[0, j].hist(q50[ok], bins=60, color="C0")
        axes[0, j].set_xlabel(f"{label} q50{suffix}")
        axes[1, j].hist(((q84 - q16) / 2)[ok], bins=60, color="C1")
        axes[1, j].set_xlabel(f"{label} (q84 − q16)/2{suffix}")
        axes[1, j].set_yscale("log")
    axes[0, 0].set_ylabel("stars")
    axes[1, 0].set_ylabel("stars")
    fig.tight_layout()
    return save_figure(fig, path)


def _replace_dir(tmp_dir: Path, dest: Path) -> None:
    """Put ``tmp_dir`` at ``dest``; an existing ``dest`` is moved aside first and removed after."""
    old = None
    if dest.exists():
        old = make_temp_dir(dest)
        os.replace(dest, old / dest.name)
    os.replace(tmp_dir, dest)
    if old is not None:
        shutil.rmtree(old)


def build_catalog(inputs: Sequence[str | Path], out_dir: str | Path, label_set: str, level: int,
                  sky_map_label: str | None = None, percentile_sample_rows: int = 2_000_000, seed: int = 0,
                  paths: dict[str, Path] | None = None) -> dict:
    """Build the catalogue and its summary/figures; return the summary dict."""
    inputs = [Path(p) for p in inputs]
    paths = paths or output_paths(out_dir, label_set)
    meta = check_same_model(inputs, label_set)
    labels = json.loads(meta["labels"])
    units = json.loads(meta.get("units", "{}"))
    if sky_map_label is not None and sky_map_label not in labels:
        log.warning("catalog.sky_map_label %r is not a label of %r (%s); sky map shows %r instead",
                    sky_map_label, label_set, labels, labels[0])
        sky_map_label = labels[0]
    sky_map_label = sky_map_label or labels[0]
    total_rows = sum(pq.ParquetFile(p).metadata.num_rows for p in inputs)
    sample_fraction = min(1.0, percentile_sample_rows / max(total_rows, 1))
    dest = paths["dataset"]
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = make_temp_dir(dest)  # sweeps the folders of killed runs first
    try:
        rows_per_pixel = write_partitions(inputs, tmp_dir, level)
        stats = summarise_partitions(tmp_dir, level, labels, sky_map_label, sample_fraction, seed)
        if stats["n_rows"] != total_rows or sum(rows_per_pixel.values()) != total_rows:
            raise CatalogError(f"catalogue holds {stats['n_rows']} rows but the inputs hold {total_rows}; "
                               "a bug: the catalogue was not written")
        _replace_dir(tmp_dir, dest)
    finally:
        if tmp_dir.exists():
            shutil.rmtree(tmp_dir)
    n = max(stats["n_rows"], 1)
    summary = {
        "label_set": label_set, "labels": labels, "units": units,
        "dataset": str(dest), "partitioning": f"hive, {partition_column(level)} = nested HEALPix index at level "
                                              f"{level} from source_id // (2**35 * 4**(12 - {level}))",
        "healpix_level": level, "n_inputs": len(inputs), "n_rows": stats["n_rows"],
        "n_pixels": len(stats["pixel_count"]),
        "n_without_xp": stats["n_without_xp"], "fraction_without_xp": stats["n_without_xp"] / n,
        "n_flagged_too_few_inputs": stats["n_flagged"], "fraction_flagged": stats["n_flagged"] / n,
        "percentile_sample_fraction": sample_fraction,
        "per_label": label_statistics(stats["samples"], labels, units),
        "sky_map_label": sky_map_label,
        "model": {k: meta.get(k) for k in ("msa_version", *IDENTITY_KEYS)},
        "inputs": [str(p) for p in inputs],
    }
    with atomic_path(paths["summary"]) as tmp:
        tmp.write_text(json.dumps(summary, indent=1))
    plot_sky_map(stats["pixel_median"], level, sky_map_label, units.get(sky_map_label, ""), paths["skymap"])
    plot_distributions(stats["samples"], labels, units, paths["distributions"])
    log.info("catalogue %s: %d stars in %d pixels (%.1f %% without XP, %.2f %% flagged)", dest, stats["n_rows"],
             summary["n_pixels"], 100 * summary["fraction_without_xp"], 100 * summary["fraction_flagged"])
    return summary


def add_arguments(parser) -> None:
    parser.add_argument("--config", required=True, help="pipeline config (YAML)")
    parser.add_argument("--label-set", required=True, help="name in the config's label_sets")
    parser.add_argument("--inputs", nargs="+", required=True, help="prediction Parquet files of that label set")
    parser.add_argument("--out-dir", required=True, help="catalogue folder, e.g. results/catalog/<label_set>")
    parser.add_argument("--summary", help="summary JSON (default: <out-dir>/../<label_set>.summary.json)")
    parser.add_argument("--skymap", help="sky map PNG (default: <out-dir>/../<label_set>.skymap.png)")
    parser.add_argument("--distributions",
                        help="distributions PNG (default: <out-dir>/../<label_set>.distributions.png)")


def run(args) -> int:
    config = load_config(args.config)
    ccfg = config["catalog"]
    paths = output_paths(args.out_dir, args.label_set)
    for key in ("summary", "skymap", "distributions"):
        if getattr(args, key):
            paths[key] = Path(getattr(args, key))
    build_catalog(args.inputs, args.out_dir, args.label_set, ccfg["healpix_level"], ccfg["sky_map_label"],
                  ccfg["percentile_sample_rows"], config["seed"], paths)
    return 0
