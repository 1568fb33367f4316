"""Benchmark of ``msa ingest`` on a bulk-sized Archive XP file, against ``zcat`` and the upstream parser.

Writes (once; reused with --workdir) a synthetic sky whose XP CSV.gz has ≥ 50,000 rows WITH the
1485-value correlation columns, like the Archive's XpContinuousMeanSpectrum_*.csv.gz bulk files,
then prints:

* rows/s and MB/s (compressed and uncompressed) of ``msa ingest`` (the CLI, as Snakemake runs it:
  XP + GaiaSource + 2MASS → one HDF5 shard);
* the ratio time(msa ingest) / time(``zcat FILE > /dev/null``), target ≤ 2.0;
* the upstream approach (pandas ``read_csv`` + ``ast.literal_eval`` per list cell) on the first
  ``--upstream-rows`` rows of the same file, extrapolated to the whole file (it is too slow to
  run whole).

Times are the best of ``--repeat`` runs (the machine is shared). Usage::

    python benchmarks/bench_ingest.py --workdir /tmp/msa-bench-ingest
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from msa.data.store import Shard
from msa.data.synthetic import synthetic_config, write_sky

MB = 1e6
UPSTREAM_LIST_COLUMNS = ["bp_coefficients", "bp_coefficient_errors", "rp_coefficients", "rp_coefficient_errors"]


def best_time(fn, repeat: int) -> tuple[float, float]:
    """Best wall time and best CPU time (user + sys, this process and its children) of ``repeat`` runs."""
    walls, cpus = [], []
    for _ in range(repeat):
        before = _cpu_seconds()
        t0 = time.perf_counter()
        fn()
        walls.append(time.perf_counter() - t0)
        cpus.append(_cpu_seconds() - before)
    return min(walls), min(cpus)


def _cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def uncompressed_size(path: Path) -> int:
    out = subprocess.run(f"zcat '{path}' | wc -c", shell=True, check=True, capture_output=True, text=True)
    return int(out.stdout.strip())


def upstream_parse(path: Path, nrows: int) -> None:
    """The research code's way: pandas reads every column, then literal_eval on each list cell."""
    df = pd.read_csv(path, nrows=nrows)
    for column in UPSTREAM_LIST_COLUMNS:
        np.array([ast.literal_eval(v) if isinstance(v, str) else [np.nan] * 55 for v in df[column]])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default=None, help="where the sky is written/reused (default: a temp dir)")
    parser.add_argument("--n-stars", type=int, default=70000, help="stars in the sky (~75%% get an XP row)")
    parser.add_argument("--min-xp-rows", type=int, default=50000)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--upstream-rows", type=int, default=2000)
    args = parser.parse_args(argv)

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="msa-bench-ingest-"))
    sky_dir = workdir / "sky"
    xp_path = sky_dir / "XpContinuousMeanSpectrum_s000.csv.gz"
    if not (sky_dir / "labels.csv").exists():
        print(f"writing the synthetic sky ({args.n_stars} stars, correlations on) to {sky_dir} ...", flush=True)
        t0 = time.perf_counter()
        write_sky(sky_dir, args.n_stars, n_shards=1, seed=7, correlations=True)
        print(f"  written in {time.perf_counter() - t0:.0f} s")
    size_gz = xp_path.stat().st_size
    size_raw = uncompressed_size(xp_path)
    cfg = synthetic_config(sky_dir, workdir / "results")
    out = workdir / "shard-s000.h5"
    ingest_cmd = [sys.executable, "-m", "msa.cli", "ingest", "--xp", str(xp_path),
                  "--source", cfg["ingest"]["source"].format(shard="s000"),
                  "--photometry", f"tmass={cfg['ingest']['surveys']['tmass']['path'].format(shard='s000')}",
                  "--out", str(out), "--no-progress"]
    env = {**os.environ, "MSA_NO_PROGRESS": "1"}

    (t_zcat, cpu_zcat) = best_time(lambda: subprocess.run(f"zcat '{xp_path}' > /dev/null", shell=True, check=True), args.repeat)
    (t_ingest, cpu_ingest) = best_time(lambda: subprocess.run(ingest_cmd, check=True, env=env, capture_output=True), args.repeat)
    with Shard(out) as shard:
        n_rows = json.loads(shard.attrs["counts"])["xp_rows"]
    if n_rows < args.min_xp_rows:
        print(f"only {n_rows} XP rows in {xp_path}; raise --n-stars", file=sys.stderr)
        return 1
    n_up = min(args.upstream_rows, n_rows)
    t_up_sample, _ = best_time(lambda: upstream_parse(xp_path, n_up), 1)
    t_upstream = t_up_sample * n_rows / n_up

    print(f"file            {xp_path}")
    print(f"rows            {n_rows} XP rows (with correlations), {size_gz / MB:.1f} MB gzip, "
          f"{size_raw / MB:.1f} MB uncompressed")
    print(f"zcat            {t_zcat:.2f} s wall, {cpu_zcat:.2f} s CPU  ({size_raw / MB / t_zcat:.0f} MB/s uncompressed)")
    print(f"msa ingest      {t_ingest:.2f} s wall, {cpu_ingest:.2f} s CPU  {n_rows / t_ingest:,.0f} rows/s  "
          f"{size_gz / MB / t_ingest:.1f} MB/s compressed  {size_raw / MB / t_ingest:.1f} MB/s uncompressed "
          f"(CLI incl. start-up, GaiaSource + 2MASS joins and the HDF5 write)")
    print(f"ratio           msa ingest / zcat = {t_ingest / t_zcat:.2f} wall (target <= 2.0), "
          f"{cpu_ingest / cpu_zcat:.2f} CPU (less sensitive to other load on the machine)")
    print(f"upstream        pandas read_csv + ast.literal_eval: {t_up_sample:.2f} s for the first {n_up} rows, "
          f"extrapolated to {t_upstream:.0f} s for {n_rows} rows ({t_upstream / t_ingest:.0f}x msa ingest)")
    print(f"best of {args.repeat} runs each; {os.cpu_count()} CPU cores visible, shared with other work")
    return 0


if __name__ == "__main__":
    sys.exit(main())
