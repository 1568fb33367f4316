"""Catalogue write time: the fixed-level hive layout of ``main`` against the HATS catalogue of this branch.

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python benchmarks/bench_catalog.py --stars 3896 --files 2
    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python benchmarks/bench_catalog.py --stars 2000000 --files 8

Prediction files are synthesised with the schema ``msa.catalogue.predict`` writes (uniform sky, source_ids
encoding each star's level-12 pixel); the old module is loaded from ``git show main:msa/catalogue/catalog.py``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from msa.catalogue import catalog as new_catalog
from msa.catalogue.predict import output_schema

LABELS = ["teff", "logg", "fe_h"]
UNITS = {"teff": "K", "logg": "dex", "fe_h": "dex"}


def synthetic_predictions(n_stars: int, n_files: int, folder: Path) -> list[Path]:
    """``n_files`` prediction files of ``n_stars`` stars in all, uniform over the sky."""
    from hats.pixel_math.spatial_index import compute_spatial_index

    rng = np.random.default_rng(0)
    ra, dec = rng.uniform(0, 360, n_stars), np.degrees(np.arcsin(rng.uniform(-1, 1, n_stars)))
    sid = (compute_spatial_index(ra, dec) >> 34) * 2**35 + rng.integers(0, 2**30, n_stars)
    order = np.argsort(sid)
    meta = {"label_set": "spectro", "labels": json.dumps(LABELS), "units": json.dumps(UNITS),
            "member_sha256": "[]", "calibration_sha256": "x", "config_hash": "x", "msa_version": "bench"}
    schema = output_schema(LABELS, UNITS, None, meta, ["ra", "dec"])
    files = []
    for k, rows in enumerate(np.array_split(order, n_files)):
        n = len(rows)
        cols = [pa.array(sid[rows]), pa.array(ra[rows]), pa.array(dec[rows])]
        for _ in LABELS:
            q = np.sort(rng.normal(size=(n, 3)).astype(np.float32), axis=1)
            cols += [pa.array(q[:, i]) for i in range(3)]
        per_star = {"has_xp": rng.random(n) < 0.9, "n_inputs": np.full(n, 10, np.int16),
                    "flag_too_few_inputs": np.zeros(n, bool), "n_inputs_rejected": np.zeros(n, np.int16),
                    "flag_out_of_range": np.zeros(n, bool), "calibration_group": np.full(n, "xp"),
                    "interval_basis": np.full(n, "labelled"), "in_training_sample": np.zeros(n, bool),
                    "support": rng.random(n).astype(np.float32), "low_support": rng.random(n) < 0.05}
        # by the schema's own names, so that a new prediction column fails here by name, not by count
        cols += [pa.array(per_star[f.name], f.type) for f in schema if f.name not in {"source_id", "ra", "dec"}
                 and not f.name.endswith(("_q16", "_q50", "_q84"))]
        path = folder / f"pred-{k}.parquet"
        pq.write_table(pa.Table.from_arrays(cols, schema=schema), path)
        files.append(path)
    return files


def main_module():
    source = subprocess.run(["git", "show", "main:msa/catalogue/catalog.py"], capture_output=True, text=True, check=True).stdout
    path = Path(tempfile.mkdtemp()) / "catalog_main.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("catalog_main", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stars", type=int, default=3896)
    parser.add_argument("--files", type=int, default=2)
    parser.add_argument("--max-rows", type=int, default=1_000_000)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        files = synthetic_predictions(args.stars, args.files, tmp)
        old = main_module()
        t_old = timed(lambda: old.build_catalog(files, tmp / "old" / "spectro", "spectro", 5, "teff"))
        t_new = timed(lambda: new_catalog.build_catalog(files, tmp / "new" / "spectro", "spectro",
                                                        max_rows_per_partition=args.max_rows, highest_order=8,
                                                        sky_map_level=5, sky_map_label="teff"))
    print(f"{args.stars} stars in {args.files} files: main (hive, level 5) {t_old:.2f} s; "
          f"HATS (max {args.max_rows} rows/partition) {t_new:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
