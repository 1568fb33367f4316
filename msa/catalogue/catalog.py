"""``msa catalog``: prediction files → one HATS catalogue per label set (opened by LSDB, hats, astropy).

Layout (HATS, https://www.ivoa.net/documents/Notes/HATS/)::

    results/catalog/{label_set}/                    the HATS catalogue: ``lsdb.read_hats(this folder)``
        properties                                  HATS properties (name, row count, ra/dec columns, ...)
        partition_info.csv                          the partitions (Norder, Npix)
        skymap.fits                                 star counts per HEALPix pixel at ``catalog.highest_order``
        dataset/_metadata, dataset/_common_metadata  every row group's footer; the schema
        dataset/Norder=K/Dir=D/Npix=N.parquet       the stars of nested HEALPix pixel N at order K
    results/catalog/{label_set}_margin/             its margin cache (HATS type ``margin``; :mod:`msa.catalogue.margin`):
                                                    ``lsdb.read_hats(catalogue, margin_cache=this folder)``
    results/catalog/{label_set}.summary.json        row counts, fractions, per-label percentiles
    results/catalog/{label_set}.skymap.png          median {catalog.sky_map_label}_q50 per pixel (two frames)
                                                    and the fraction of low_support stars per pixel
    results/catalog/{label_set}.distributions.png   per-label q50 and interval-width histograms
    results/catalog/{label_set}.kiel.png            Kiel diagram: density of median T_eff against log g

Partitions are adaptive: pixels of order ≤ ``catalog.highest_order`` holding at most
``catalog.max_rows_per_partition`` stars each (hats' own alignment, so dense regions get small
pixels). Rows in a partition are sorted by ``_healpix_29``, the nested HEALPix index of (ra, dec) at
order 29 (hats' spatial index; for Gaia, ``_healpix_29 >> 34`` is the level-12 pixel that
``source_id // 2**35`` encodes, bar stars on a pixel edge).

Columns (each with an IVOA UCD, :mod:`msa.catalogue.ucd`): ``_healpix_29``, ``source_id``, ``ra``, ``dec`` (deg, ICRS, epoch J2016.0, from the store);
per label ``{label}_q16``, ``{label}_q50``, ``{label}_q84`` (the label's unit): the 16th, 50th and 84th
percentiles of the calibrated predictive distribution. In Gaia DR3's astrophysical-parameter tables
the same three are ``{label}_lower``, ``{label}`` and ``{label}_upper`` (e.g. ``teff_gspphot_lower``):
our q50 is their value column, q16 their ``_lower``, q84 their ``_upper``. Then ``has_xp``,
``n_inputs``, ``flag_too_few_inputs``, ``n_inputs_rejected``, ``flag_out_of_range``,
``calibration_group``, ``interval_basis``, ``in_training_sample``, ``support``, ``low_support`` (see
:mod:`msa.catalogue.predict` and :mod:`msa.calibration.support`). Every column carries its unit and description twice: in the Arrow field
metadata (``unit``, ``description``, ``ucd``: what LSDB and pyarrow show) and in astropy's
serialisation header (``table_meta_yaml``: ``astropy.table.Table.read(partition)`` gives
``Quantity``-ready units, the UCD in ``t[column].meta["ucd"]``, and the provenance in ``t.meta``:
msa version and git commit, creation date, config hash, data release, model checksums,
:mod:`msa.catalogue.provenance`; the header gives each string column's length, so astropy reads
it without a warning). The file metadata identifies the model (member sha256s, calibration, config
hash); every input must come from the same model. ``properties`` adds the HATS provenance keys
(``hats_builder``, ``hats_creation_date``, ``hats_version``, ``hats_estsize``), ``moc_sky_fraction``
(the sky fraction of the order-``highest_order`` pixels holding stars) and ``hats_skymap_order``. An input folder (``msa predict --shards --out-dir``: one per batch of
shards) stands for its ``*.parquet`` files, in name order.

Memory: three passes, one input or one partition at a time. Pass 1 counts stars per pixel of
``catalog.highest_order`` (positions only) and chooses the partitions; pass 2 splits each input
into per-partition fragments; pass 3 joins each partition's fragments, sorts it, refuses a
source_id found twice, writes the final file and adds to the summary. Percentiles and the sky map
come from a deterministic sample of at most ``catalog.percentile_sample_rows`` stars (chosen by a
hash of source_id; exact when smaller). The catalogue is built in a temporary folder beside the
destination and renamed into place: a failed build leaves the old catalogue (or nothing).
"""

from __future__ import annotations

import json
import logging
import shutil
from collections import defaultdict
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from msa.catalogue.margin import write_margin
from msa.catalogue.provenance import provenance
from msa.catalogue.ucd import column_ucd
from msa.config import load_config
from msa.data.star_hash import unit_hash
from msa.data.store import (
    POSITION_COLUMNS,
    SOURCE_ID,
    atomic_dir,
    atomic_path,
    check_out_dir,
)
from msa.errors import InputError
from msa.figures import axis_label, percentile_range, plt, save_figure
from msa.progress import progress

log = logging.getLogger(__name__)

IDENTITY_KEYS = ("label_set", "labels", "member_sha256", "calibration_sha256", "config_hash")
PERCENTILES = (1, 5, 16, 50, 84, 95, 99)
SPATIAL_INDEX = "_healpix_29"
SPATIAL_ORDER = 29
QUANTILE_WORDS = {"q16": ("16th percentile", "_lower"), "q50": ("median", ""), "q84": ("84th percentile", "_upper")}
FIXED_DESCRIPTIONS = {
    SPATIAL_INDEX: ("", "nested HEALPix index of (ra, dec) at order 29 (HATS spatial index)"),
    SOURCE_ID: ("", "Gaia DR3 source_id"),
    "ra": ("deg", "right ascension, ICRS, epoch J2016.0 (Gaia DR3)"),
    "dec": ("deg", "declination, ICRS, epoch J2016.0 (Gaia DR3)"),
    "has_xp": ("", "the prediction used the star's XP spectrum"),
    "n_inputs": ("", "number of input features present and visible to the model"),
    "flag_too_few_inputs": ("", "fewer inputs than predict.min_inputs: the predictions are NaN"),
    "n_inputs_rejected": ("", "input values treated as missing as implausible (sentinels such as -999, "
                              "values outside the feature's physical range or far outside the scaler's)"),
    "flag_out_of_range": ("", "the predictions were not finite or outside a label's physical range: they are NaN"),
    "calibration_group": ("", "conformal calibration group whose offsets the star took"),
    "interval_basis": ("", "which stars the group's conformal offsets were fitted on: labelled (the label set's "
                           "calibration stars), survey (a calibration survey's), emulated (faint copies of bright "
                           "stars) or extrapolated (coarse offsets outside their G range: no coverage promise)"),
    "in_training_sample": ("", "a fit read the star's labels: fine-tuning (train split, early-stopping sample) or "
                               "calibration (its calibration and survey samples)"),
    "support": ("", "0-1: fraction of the labelled and survey stars whose latent distance to their nearest "
                    "neighbours is at least this star's to them (1: as well covered as a labelled star, 0: "
                    "farther than all); NaN without a prediction"),
    "low_support": ("", "support below its view's calibrate.support.low_threshold: the labelled and survey stars hardly cover "
                        "this star's inputs, its interval's promise is for stars unlike it"),
}


# what the catalogue folder holds (HATS, written by hats and by this module): a rebuild replaces a
# folder of these and refuses one holding anything else, which the replacement would delete
OWN_LAYOUT = {"properties": False, "hats.properties": False, "partition_info.csv": False, "skymap*.fits": False,
              "dataset/_metadata": True, "dataset/_common_metadata": True, "dataset/*.parquet": True,
              "dataset/Norder=*/Dir=*/Npix=*.parquet": True}


class CatalogError(InputError, RuntimeError):
    """Inputs that cannot form one catalogue: different models, duplicate stars, unreadable files."""


def output_paths(out_dir: str | Path, label_set: str) -> dict[str, Path]:
    """Where the catalogue of ``label_set`` and its summary files go (beside ``out_dir``)."""
    out_dir = Path(out_dir)
    parent = out_dir.parent
    return {"dataset": out_dir, "summary": parent / f"{label_set}.summary.json",
            "margin": parent / f"{label_set}_margin",
            "skymap": parent / f"{label_set}.skymap.png",
            "distributions": parent / f"{label_set}.distributions.png",
            "kiel": parent / f"{label_set}.kiel.png"}


def _metadata(path: Path) -> dict[str, str]:
    try:
        raw = pq.read_schema(path).metadata or {}
    except (OSError, pa.ArrowInvalid) as err:
        raise CatalogError(f"cannot read prediction file {path}: {err}") from err
    return {k.decode(): v.decode() for k, v in raw.items()}


def prediction_files(inputs: Sequence[str | Path]) -> list[Path]:
    """The inputs with each folder replaced by its ``*.parquet`` files, sorted; an empty folder is
    refused (its shards' predictions would be missing from the catalogue without a word)."""
    files = []
    for given in map(Path, inputs):
        if not given.is_dir():
            files.append(given)
            continue
        found = sorted(given.glob("*.parquet"))
        if not found:
            raise CatalogError(f"--inputs folder {given} holds no .parquet file; is it an `msa predict --out-dir`?")
        files += found
    return files


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


# --- positions and partitions ------------------------------------------------------------------
def spatial_index(path: Path, table: pa.Table) -> np.ndarray:
    """``_healpix_29`` (int64) of every row of ``table`` (read from ``path``), from its ra/dec."""
    from hats.pixel_math.spatial_index import compute_spatial_index

    missing = [c for c in (SOURCE_ID, *POSITION_COLUMNS) if c not in table.column_names]
    if missing:
        raise CatalogError(f"{path} has no column(s) {missing}: the catalogue needs each star's position. "
                           "Re-run `msa predict` (it copies ra/dec from the store; ingest.source_columns must "
                           "list ra and dec)")
    ra, dec = (table.column(c).to_numpy(zero_copy_only=False) for c in POSITION_COLUMNS)
    bad = ~(np.isfinite(ra) & np.isfinite(dec))
    if bad.any():
        sid = table.column(SOURCE_ID).to_numpy()[bad]
        raise CatalogError(f"{path}: {int(bad.sum())} star(s) without a finite ra/dec, e.g. source_id "
                           f"{sid[:3].tolist()}; a catalogue row needs a position")
    with np.errstate(invalid="ignore"):
        outside = np.abs(dec) > 90
    if outside.any():
        i = np.flatnonzero(outside)
        sid = table.column(SOURCE_ID).to_numpy()[i]
        raise CatalogError(f"{path}: {len(i)} star(s) with dec outside [-90, 90] deg, e.g. source_id "
                           f"{sid[:3].tolist()} (dec {dec[i[:3]].tolist()}); fix their positions in the store")
    return np.asarray(compute_spatial_index(ra, dec), dtype=np.int64)


def count_stars(inputs: Sequence[Path], highest_order: int) -> np.ndarray:
    """Pass 1: stars per nested pixel of ``highest_order`` over all inputs (reads positions only)."""
    counts = np.zeros(12 * 4**highest_order, dtype=np.int64)
    shift = 2 * (SPATIAL_ORDER - highest_order)
    for path in progress(inputs, desc="catalogue: count", unit="file"):
        table = pq.read_table(path, columns=[c for c in (SOURCE_ID, *POSITION_COLUMNS)
                                             if c in pq.read_schema(path).names])
        counts += np.bincount(spatial_index(path, table) >> shift, minlength=len(counts))
    return counts


def choose_partitions(counts: np.ndarray, highest_order: int, max_rows: int) -> tuple[list[tuple[int, int]], np.ndarray]:
    """Adaptive partitions: (order, pixel) of each, and the partition of every ``highest_order`` pixel (−1: empty)."""
    from hats.pixel_math.partition_stats import generate_alignment

    if counts.max(initial=0) > max_rows:
        raise CatalogError(f"a HEALPix pixel of order {highest_order} holds {int(counts.max())} stars, more than "
                           f"catalog.max_rows_per_partition = {max_rows}; raise catalog.highest_order (finer "
                           "pixels) or catalog.max_rows_per_partition")
    alignment = generate_alignment(counts, highest_order=highest_order, lowest_order=0, threshold=max_rows,
                                   drop_empty_siblings=True)
    occupied = np.flatnonzero(counts)
    destinations = sorted({(int(alignment[i][0]), int(alignment[i][1])) for i in occupied})
    number = {dest: k for k, dest in enumerate(destinations)}
    partition_of = np.full(len(counts), -1, dtype=np.int64)
    partition_of[occupied] = [number[(int(alignment[i][0]), int(alignment[i][1]))] for i in occupied]
    return destinations, partition_of


def write_fragments(inputs: Sequence[Path], fragment_dir: Path, partition_of: np.ndarray,
                    highest_order: int) -> dict[str, int]:
    """Pass 2: each input's rows (with ``_healpix_29`` first) split into one file per partition;
    return the longest value (characters) of each string column, which astropy's header records."""
    import pyarrow.compute as pc

    shift = 2 * (SPATIAL_ORDER - highest_order)
    longest: dict[str, int] = {}
    for i, path in enumerate(progress(inputs, desc="catalogue: partition", unit="file")):
        table = pq.read_table(path)
        for field in table.schema:
            if pa.types.is_string(field.type) and table.num_rows:
                n = pc.max(pc.utf8_length(table.column(field.name))).as_py() or 0
                longest[field.name] = max(longest.get(field.name, 1), n)
        index = spatial_index(path, table)
        table = table.add_column(0, SPATIAL_INDEX, pa.array(index, pa.int64()))
        partition = partition_of[index >> shift]
        order = np.argsort(partition, kind="stable")
        partition = partition[order]
        table = table.take(pa.array(order))
        bounds = np.flatnonzero(np.diff(partition)) + 1
        for start, stop in zip(np.r_[0, bounds], np.r_[bounds, len(partition)]):
            if stop == start:
                continue
            part_dir = fragment_dir / f"{int(partition[start]):07d}"
            part_dir.mkdir(parents=True, exist_ok=True)
            pq.write_table(table.slice(start, stop - start), part_dir / f"part-{i:05d}.parquet")
    return longest


# --- per-column units and descriptions ---------------------------------------------------------
def column_description(name: str, labels: Sequence[str], units: dict[str, str]) -> tuple[str, str]:
    """(unit, description) of a catalogue column."""
    if name in FIXED_DESCRIPTIONS:
        return FIXED_DESCRIPTIONS[name]
    label, _, suffix = name.rpartition("_")
    if label in labels and suffix in QUANTILE_WORDS:
        words, gaia = QUANTILE_WORDS[suffix]
        return units.get(label, ""), (f"{label}: {words} of the calibrated predictive distribution "
                                      f"(Gaia DR3 convention: {label}{gaia})")
    if name.startswith("latent_"):
        return "", "first ensemble member's latent representation"
    return "", ""


def astropy_header(schema: pa.Schema, described: dict[str, tuple[str, str]], ucds: dict[str, str],
                   meta: dict[str, str]) -> str:
    """astropy's Parquet serialisation header (``table_meta_yaml``): each column's unit, description
    and UCD (``Column.meta["ucd"]``), and the table's ``meta`` (the provenance)."""
    from astropy.table import Column, Table
    from astropy.table.meta import get_yaml_from_table

    columns = []
    for field in schema:
        unit, description = described[field.name]
        dtype = str if pa.types.is_string(field.type) else field.type.to_pandas_dtype()
        columns.append(Column(np.empty(0, dtype=dtype), name=field.name, unit=unit or None,
                              description=description or None, meta={"ucd": ucds[field.name]}))
    return "\n".join(get_yaml_from_table(Table(columns, meta=dict(meta))))


def catalog_schema(schema: pa.Schema, labels: Sequence[str], units: dict[str, str],
                   model_metadata: dict[str, str], origin: dict[str, str] | None = None,
                   string_lengths: dict[str, int] | None = None) -> pa.Schema:
    """The input schema with unit, description and UCD on every field, and the model identity and
    provenance (``origin``) on the file; ``string_lengths``: the longest value of each string column."""
    described = {f.name: column_description(f.name, labels, units) for f in schema}
    ucds = {f.name: column_ucd(f.name, f.type, labels) for f in schema}
    fields = [f.with_metadata({**{k.decode(): v.decode() for k, v in (f.metadata or {}).items()},
                               "unit": described[f.name][0], "description": described[f.name][1],
                               "ucd": ucds[f.name]})
              for f in schema]
    metadata = {k: v for k, v in model_metadata.items() if k != "input_file"}  # inputs differ; listed in the summary
    metadata.update(origin or {})
    # astropy reads a string column's width from here; without it every Table.read warns
    lengths = string_lengths or {}
    metadata.update({f"table::len::{f.name}": str(max(lengths.get(f.name, 1), 1))
                     for f in schema if pa.types.is_string(f.type)})
    metadata["table_meta_yaml"] = astropy_header(schema, described, ucds, origin or {})
    return pa.schema(fields, metadata=metadata)


# --- pass 3: final partition files and the summary ---------------------------------------------
def partition_file(catalog_dir: Path, order: int, pixel: int) -> Path:
    """HATS path of a partition: Dir groups pixels by ten thousands."""
    return catalog_dir / "dataset" / f"Norder={order}" / f"Dir={pixel // 10_000 * 10_000}" / f"Npix={pixel}.parquet"


def check_unique(source_id: np.ndarray, where: str) -> None:
    uniq, counts = np.unique(source_id, return_counts=True)
    if np.any(counts > 1):
        raise CatalogError(f"{int(np.sum(counts > 1))} source_id(s) appear more than once ({where}), e.g. "
                           f"{uniq[counts > 1][:3].tolist()}; two inputs overlap — pass each shard's predictions once")


class SummaryAccumulator:
    """Counts, the percentile sample and the sky-map sample, added to one partition at a time."""

    def __init__(self, labels: Sequence[str], sky_label: str, sky_order: int, sample_fraction: float, seed: int):
        self.labels, self.sky_label, self.sky_order = list(labels), sky_label, sky_order
        self.sample_fraction, self.seed = sample_fraction, seed
        self.n_rows = self.n_without_xp = self.n_flagged = self.n_low_support = 0
        self.has_support = False  # prediction files written before support existed lack the column
        self.samples: dict[str, list[np.ndarray]] = defaultdict(list)
        self.sky_pixels: list[np.ndarray] = []

    def add(self, table: pa.Table) -> None:
        sid = table.column(SOURCE_ID).to_numpy()
        self.n_rows += len(sid)
        self.n_without_xp += int(np.sum(~table.column("has_xp").to_numpy(zero_copy_only=False)))
        self.n_flagged += int(np.sum(table.column("flag_too_few_inputs").to_numpy(zero_copy_only=False)))
        keep = unit_hash(sid, self.seed) < self.sample_fraction
        if "low_support" in table.column_names:
            low = table.column("low_support").to_numpy(zero_copy_only=False)
            self.has_support = True
            self.n_low_support += int(low.sum())
            self.samples["low_support"].append(low[keep])
        for label in self.labels:
            for s in QUANTILE_WORDS:
                self.samples[f"{label}_{s}"].append(table.column(f"{label}_{s}").to_numpy(zero_copy_only=False)[keep])
        index = table.column(SPATIAL_INDEX).to_numpy()[keep]
        self.sky_pixels.append(index >> (2 * (SPATIAL_ORDER - self.sky_order)))

    def sample(self) -> dict[str, np.ndarray]:
        return {k: np.concatenate(v) if v else np.empty(0, np.float32) for k, v in self.samples.items()}

    def pixel_median(self) -> dict[int, float]:
        """Median sampled ``{sky_label}_q50`` per nested pixel of ``sky_order``."""
        return self._per_pixel(self.sample().get(f"{self.sky_label}_q50", np.empty(0)), np.median)

    def pixel_low_support(self) -> dict[int, float] | None:
        """Fraction of the sampled stars flagged ``low_support`` per pixel (None: no support column)."""
        if not self.has_support:
            return None
        return self._per_pixel(self.sample()["low_support"].astype(np.float64), np.mean)

    def _per_pixel(self, values: np.ndarray, statistic) -> dict[int, float]:
        pixels = np.concatenate(self.sky_pixels) if self.sky_pixels else np.empty(0, np.int64)
        ok = np.isfinite(values)
        pixels, values = pixels[ok], values[ok]
        order = np.lexsort((values, pixels))
        pixels, values = pixels[order], values[order]
        bounds = np.r_[0, np.flatnonzero(np.diff(pixels)) + 1, len(pixels)]
        return {int(pixels[a]): float(statistic(values[a:b])) for a, b in zip(bounds[:-1], bounds[1:]) if b > a}


def write_partition(fragments: Path, dest: Path, schema: pa.Schema, where: str) -> pa.Table:
    """Join one partition's fragments, sort by ``_healpix_29``, refuse duplicates, write ``dest``."""
    table = pa.concat_tables([pq.read_table(p) for p in sorted(fragments.glob("*.parquet"))])
    table = table.sort_by([(SPATIAL_INDEX, "ascending"), (SOURCE_ID, "ascending")])
    check_unique(table.column(SOURCE_ID).to_numpy(), where)
    dest.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table.cast(schema), dest, compression="zstd")
    shutil.rmtree(fragments)
    return table


def write_partitions(fragment_dir: Path, catalog_dir: Path, partitions: Sequence[tuple[int, int]],
                     schema: pa.Schema, summary: SummaryAccumulator) -> dict[tuple[int, int], int]:
    """Pass 3: every partition's final file; return its row count."""
    rows = {}
    for k, (order, pixel) in enumerate(progress(partitions, desc="catalogue: write", unit="partition")):
        table = write_partition(fragment_dir / f"{k:07d}", partition_file(catalog_dir, order, pixel), schema,
                                f"partition Norder={order} Npix={pixel}")
        summary.add(table)
        rows[(order, pixel)] = table.num_rows
    return rows


def write_hats_metadata(catalog_dir: Path, name: str, partitions: Sequence[tuple[int, int]], counts: np.ndarray | None,
                        total_rows: int, max_rows: int | None = None, schema: pa.Schema | None = None,
                        **extra) -> None:
    """``properties``, ``partition_info.csv``, ``skymap.fits`` (with ``counts``: stars per pixel of the
    skymap order), ``dataset/_metadata`` and ``_common_metadata``; ``extra``: further properties
    (a margin's ``catalog_type``, ``primary_catalog``, ``margin_threshold``)."""
    from hats.catalog import PartitionInfo, TableProperties
    from hats.io.parquet_metadata import write_parquet_metadata
    from hats.io.skymap import write_skymap
    from hats.pixel_math import HealpixPixel

    from msa import __version__

    if partitions:
        write_parquet_metadata(catalog_dir)
    elif schema is not None:  # an empty margin (a catalogue of one partition has no neighbours): its schema only
        (catalog_dir / "dataset").mkdir(parents=True, exist_ok=True)
        for metadata_file in ("_common_metadata", "_metadata"):
            pq.write_metadata(schema, catalog_dir / "dataset" / metadata_file)
    PartitionInfo.from_healpix([HealpixPixel(o, p) for o, p in partitions]).write_to_file(catalog_path=catalog_dir)
    if counts is not None:
        write_skymap(counts, catalog_dir)
        order = round(np.log2(len(counts) / 12) / 2)
        extra.update(skymap_order=order, moc_sky_fraction=round(float(np.count_nonzero(counts)) / len(counts), 6))
    properties = {"catalog_name": name, "catalog_type": "object", "total_rows": total_rows, "ra_column": "ra",
                  "dec_column": "dec", "healpix_column": SPATIAL_INDEX, "healpix_order": SPATIAL_ORDER,
                  "hats_max_rows": max_rows}
    properties.update(extra)
    # builder, creation date, HATS version, size on disk (kB, of what is written so far: all but properties)
    provenance_keys = TableProperties.new_provenance_dict(catalog_dir, builder=f"msa v{__version__}")
    TableProperties(**properties, **provenance_keys).to_properties_file(catalog_dir)


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


def full_sky_map(pixel_median: dict[int, float], order: int) -> np.ndarray:
    """Nested-scheme map of ``order`` with the medians; pixels without stars are healpy's UNSEEN."""
    import healpy

    sky = np.full(12 * 4**order, healpy.UNSEEN)
    if pixel_median:
        sky[np.fromiter(pixel_median, dtype=np.int64)] = np.fromiter(pixel_median.values(), dtype=np.float64)
    return sky


def plot_sky_map(pixel_median: dict[int, float], order: int, label: str, unit: str, path: Path,
                 pixel_low_support: dict[int, float] | None = None) -> Path:
    """Mollweide maps (equatorial and Galactic) of the median ``{label}_q50`` per HEALPix pixel of ``order``:
    each pixel drawn as its true shape (healpy), longitude increasing to the left; with
    ``pixel_low_support`` a second row: the fraction of the pixel's stars flagged ``low_support``."""
    import healpy

    rows = [(full_sky_map(pixel_median, order), axis_label(label, unit, "median "), "viridis", None)]
    if pixel_low_support is not None:
        # a fixed 0-1 scale: a map of few flagged stars must look nearly empty, not saturated
        rows.append((full_sky_map(pixel_low_support, order), "fraction of stars with low_support", "magma",
                     {"min": 0.0, "max": 1.0}))
    fig = plt.figure(figsize=(13, 4.6 * len(rows)))
    frames = ((["C"], "RA", "Dec", "equatorial (ICRS)"), (["C", "G"], "Galactic l", "Galactic b", "Galactic"))
    for r, (sky, unit_text, cmap, limits) in enumerate(rows):
        limits = limits or colour_scale(sky[sky != healpy.UNSEEN])
        for k, (coord, xlabel, ylabel, frame) in enumerate(frames):
            healpy.projview(sky, nest=True, coord=coord, fig=fig.number, sub=(len(rows), 2, 2 * r + k + 1),
                            projection_type="mollweide", graticule=True, graticule_labels=True, xlabel=xlabel,
                            ylabel=ylabel, cmap=cmap, unit=unit_text, cb_orientation="horizontal",
                            title=f"{frame}: {len(pixel_median)} pixels of order {order}", fontsize={"title": 10},
                            **limits)
    return save_figure(fig, path)


def colour_scale(values: np.ndarray) -> dict:
    """healpy ``min``/``max``/``cbar_ticks`` of a sky map: the 2nd–98th percentiles of ``values``
    (one odd pixel does not wash out the rest), on round ticks (matplotlib's MaxNLocator)."""
    from matplotlib.ticker import MaxNLocator

    values = values[np.isfinite(values)]
    if not len(values):
        return {}
    lo, hi = (float(v) for v in np.percentile(values, [2, 98]))
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    ticks = [float(f"{t:.10g}") for t in MaxNLocator(5).tick_values(lo, hi) if lo - 1e-9 * (hi - lo) <= t <= hi + 1e-9 * (hi - lo)]
    return {"min": lo, "max": hi, "cbar_ticks": ticks or [lo, hi], "format": "%g", "extend": "both"}


def plot_kiel(samples: dict[str, np.ndarray], units: dict, path: Path) -> Path:
    """Kiel diagram: density of the catalogue's median T_eff against log g, as astronomers draw it
    (T_eff decreasing to the right, log g increasing downwards), on the 0.5–99.5th percentiles, with
    the count of stars outside; a panel that says so when the label set has no teff or logg."""
    from matplotlib.colors import LogNorm

    fig, ax = plt.subplots(figsize=(5.6, 4.6))
    teff, logg = samples.get("teff_q50"), samples.get("logg_q50")
    if teff is None or logg is None:
        ax.text(0.5, 0.5, "no Kiel diagram: the label set has no teff and logg", ha="center", va="center",
                transform=ax.transAxes)
        ax.set_axis_off()
        return save_figure(fig, path)
    ok = np.isfinite(teff) & np.isfinite(logg)
    x_range, y_range = percentile_range(teff[ok]), percentile_range(logg[ok])
    if x_range is not None:
        inside = ok & (teff >= x_range[0]) & (teff <= x_range[1]) & (logg >= y_range[0]) & (logg <= y_range[1])
        counts = ax.hist2d(teff[inside], logg[inside], bins=80, range=[x_range, y_range], norm=LogNorm(), cmap="viridis",
                           cmin=1)[3]
        fig.colorbar(counts, ax=ax, label="stars per bin")
        ax.set_xlim(x_range[1], x_range[0])
        ax.set_ylim(y_range[1], y_range[0])
        ax.set_title(f"{int(inside.sum())} stars ({int(ok.sum() - inside.sum())} outside the axes)", fontsize=9)
    ax.set_xlabel(axis_label("teff", units.get("teff", "K"), "median "))
    ax.set_ylabel(axis_label("logg", units.get("logg", "dex"), "median "))
    return save_figure(fig, path)


def plot_distributions(samples: dict[str, np.ndarray], labels: Sequence[str], units: dict, path: Path) -> Path:
    """Per label: histogram of the medians (top) and of the half-widths (q84 − q16) / 2 (bottom)."""
    fig, axes = plt.subplots(2, len(labels), figsize=(3.2 * len(labels), 5.2), squeeze=False)
    for j, label in enumerate(labels):
        q16, q50, q84 = (samples[f"{label}_{s}"] for s in ("q16", "q50", "q84"))
        ok = np.isfinite(q50)
        unit = units.get(label, "")
        axes[0, j].hist(q50[ok], bins=60, color="C0")
        axes[0, j].set_xlabel(axis_label(label, unit, "median "))
        axes[1, j].hist(((q84 - q16) / 2)[ok], bins=60, color="C1")
        axes[1, j].set_xlabel(axis_label(label, unit, "half-width (q84 − q16)/2 of "))
        axes[1, j].set_yscale("log")
    axes[0, 0].set_ylabel("stars")
    axes[1, 0].set_ylabel("stars")
    fig.tight_layout()
    return save_figure(fig, path)


def _sky_label(requested: str | None, labels: Sequence[str], label_set: str) -> str:
    if requested is not None and requested not in labels:
        log.warning("catalog.sky_map_label %r is not a label of %r (%s); sky map shows %r instead",
                    requested, label_set, labels, labels[0])
        return labels[0]
    return requested or labels[0]


def build_catalog(inputs: Sequence[str | Path], out_dir: str | Path, label_set: str, *,
                  max_rows_per_partition: int = 1_000_000, highest_order: int = 8, sky_map_level: int = 5,
                  sky_map_label: str | None = None, percentile_sample_rows: int = 2_000_000, seed: int = 0,
                  margin_threshold_arcsec: float = 5.0, data_release: str = "Gaia DR3",
                  paths: dict[str, Path] | None = None) -> dict:
    """Build the HATS catalogue, its margin cache and its summary/figures; return the summary dict."""
    inputs = prediction_files(inputs)
    paths = paths or output_paths(out_dir, label_set)
    meta = check_same_model(inputs, label_set)
    labels = json.loads(meta["labels"])
    units = json.loads(meta.get("units", "{}"))
    sky_map_label = _sky_label(sky_map_label, labels, label_set)
    total_rows = sum(pq.ParquetFile(p).metadata.num_rows for p in inputs)
    sample_fraction = min(1.0, percentile_sample_rows / max(total_rows, 1))
    dest, margin_dest = paths["dataset"], paths.get("margin") or output_paths(out_dir, label_set)["margin"]
    dest.parent.mkdir(parents=True, exist_ok=True)
    origin = provenance(meta, data_release)
    # readers see the old catalogue (and margin) or the new one, never a mix
    with atomic_dir(dest, own=OWN_LAYOUT) as tmp_dir, atomic_dir(margin_dest, own=OWN_LAYOUT) as margin_dir:
        counts = count_stars(inputs, highest_order)
        partitions, partition_of = choose_partitions(counts, highest_order, max_rows_per_partition)
        longest = write_fragments(inputs, tmp_dir / "fragments", partition_of, highest_order)
        schema = catalog_schema(pq.read_schema(next((tmp_dir / "fragments").glob("*/*.parquet"))), labels, units,
                                meta, origin, longest) if partitions else None
        stats = SummaryAccumulator(labels, sky_map_label, sky_map_level, sample_fraction, seed)
        rows = write_partitions(tmp_dir / "fragments", tmp_dir, partitions, schema, stats)
        if stats.n_rows != total_rows or sum(rows.values()) != total_rows:
            raise CatalogError(f"catalogue holds {stats.n_rows} rows but the inputs hold {total_rows}; "
                               "a bug: the catalogue was not written")
        shutil.rmtree(tmp_dir / "fragments", ignore_errors=True)
        margin_rows = write_margin([partition_file(tmp_dir, o, p) for o, p in partitions], partitions,
                                   [partition_file(margin_dir, o, p) for o, p in partitions],
                                   margin_threshold_arcsec, SPATIAL_INDEX, schema, margin_dir / "fragments")
        write_hats_metadata(tmp_dir, label_set, partitions, counts, total_rows, max_rows_per_partition)
        write_hats_metadata(margin_dir, f"{label_set}_margin", sorted(margin_rows), None,
                            sum(margin_rows.values()), schema=schema, catalog_type="margin", primary_catalog=str(dest),
                            margin_threshold=margin_threshold_arcsec)
    n = max(stats.n_rows, 1)
    samples = stats.sample()
    pixel_median = stats.pixel_median()
    summary = {
        "label_set": label_set, "labels": labels, "units": units,
        "dataset": str(dest), "format": "HATS (lsdb.read_hats / hats.read_hats)",
        "partitioning": f"adaptive nested HEALPix pixels of order <= {highest_order}, at most "
                        f"{max_rows_per_partition} rows each, sorted by {SPATIAL_INDEX}",
        "n_partitions": len(partitions), "partition_orders": sorted({o for o, _ in partitions}),
        "max_rows_per_partition": max_rows_per_partition, "highest_order": highest_order,
        "margin": {"path": str(margin_dest), "threshold_arcsec": margin_threshold_arcsec,
                   "n_rows": sum(margin_rows.values()), "n_partitions": len(margin_rows)},
        "n_inputs": len(inputs), "n_rows": stats.n_rows,
        "n_without_xp": stats.n_without_xp, "fraction_without_xp": stats.n_without_xp / n,
        "n_flagged_too_few_inputs": stats.n_flagged, "fraction_flagged": stats.n_flagged / n,
        # None: prediction files without a support column (written before msa calibrate kept a support index)
        "n_low_support": stats.n_low_support if stats.has_support else None,
        "fraction_low_support": stats.n_low_support / n if stats.has_support else None,
        "percentile_sample_fraction": sample_fraction,
        "per_label": label_statistics(samples, labels, units),
        "sky_map_label": sky_map_label, "sky_map_level": sky_map_level, "sky_map_pixels": len(pixel_median),
        "model": {k: meta.get(k) for k in ("msa_version", *IDENTITY_KEYS)},
        "provenance": origin,
        "inputs": [str(p) for p in inputs],
    }
    with atomic_path(paths["summary"]) as tmp:
        tmp.write_text(json.dumps(summary, indent=1))
    plot_sky_map(pixel_median, sky_map_level, sky_map_label, units.get(sky_map_label, ""), paths["skymap"],
                 stats.pixel_low_support())
    plot_distributions(samples, labels, units, paths["distributions"])
    plot_kiel(samples, units, paths.get("kiel") or output_paths(out_dir, label_set)["kiel"])
    log.info("catalogue %s: %d stars in %d partitions (%.1f %% without XP, %.2f %% flagged)", dest, stats.n_rows,
             len(partitions), 100 * summary["fraction_without_xp"], 100 * summary["fraction_flagged"])
    return summary


def add_arguments(parser) -> None:
    parser.add_argument("--config", required=True, help="pipeline config (YAML)")
    parser.add_argument("--label-set", required=True, help="name in the config's label_sets")
    parser.add_argument("--inputs", nargs="+", required=True, help="prediction Parquet files of that label set, or folders of them (`msa predict --out-dir`)")
    parser.add_argument("--out-dir", required=True, help="catalogue folder, e.g. results/catalog/<label_set>")
    parser.add_argument("--margin", help="margin cache folder (default: <out-dir>/../<label_set>_margin)")
    parser.add_argument("--summary", help="summary JSON (default: <out-dir>/../<label_set>.summary.json)")
    parser.add_argument("--skymap", help="sky map PNG (default: <out-dir>/../<label_set>.skymap.png)")
    parser.add_argument("--kiel", help="Kiel diagram PNG (default: <out-dir>/../<label_set>.kiel.png)")
    parser.add_argument("--distributions",
                        help="distributions PNG (default: <out-dir>/../<label_set>.distributions.png)")


def run(args) -> int:
    check_out_dir(args.out_dir, [args.config, *args.inputs], own=OWN_LAYOUT)  # the folder is replaced whole
    if args.margin:
        check_out_dir(args.margin, [args.config, *args.inputs], option="--margin", own=OWN_LAYOUT)
    config = load_config(args.config)
    ccfg = config["catalog"]
    paths = output_paths(args.out_dir, args.label_set)
    for key in ("margin", "summary", "skymap", "distributions", "kiel"):
        if getattr(args, key):
            paths[key] = Path(getattr(args, key))
    build_catalog(args.inputs, args.out_dir, args.label_set, max_rows_per_partition=ccfg["max_rows_per_partition"],
                  highest_order=ccfg["highest_order"], sky_map_level=ccfg["sky_map_level"],
                  sky_map_label=ccfg["sky_map_label"], percentile_sample_rows=ccfg["percentile_sample_rows"],
                  margin_threshold_arcsec=ccfg["margin_threshold_arcsec"], data_release=ccfg["data_release"],
                  seed=config["seed"], paths=paths)
    return 0
