"""Fine-tuning memory and throughput: ``msa finetune`` on growing stores whose label is in the store.

Prints one table: for synthetic stores of 0.25 M, 1 M and 4 M stars whose every star is labelled
(the label is the store's ``parallax``, as in the full-sky ``parallax`` label set), the peak RSS
and train rows/s of the streaming ``msa finetune`` (this checkout), side by side with the
in-memory fine-tuning of commit :data:`IN_MEMORY_REF` (the last one that copied the train split
to the device) where it fits (``--reference-max-stars``), plus the peak-RSS growth per labelled
star between the smallest and the largest store and the streaming / in-memory rows/s ratio.

Each run is a fresh ``python -m msa.cli finetune --from-scratch`` process (peak RSS from
``os.wait4``); rows/s = rows trained ÷ epoch seconds (training and validation, the definition
both versions' ``metrics.jsonl`` share), summed over the epochs. An epoch of the streaming
path is capped at ``--max-train-rows`` rows (``finetune.max_train_rows``, what bounds the time of
a billion-star label set); the in-memory path has no such setting and trains on its whole train
split each epoch, so its runs take longer but their rows/s is the same kind of rate.

Usage: ``python benchmarks/bench_finetune.py [--workdir DIR] [--sizes 250000 1000000 4000000]``
(about 20 minutes on 2 busy cores; the stores stay in ``--workdir`` for a rerun when it is given).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

from msa.config import validate
from msa.data.fit_scaler import fit_scaler
from msa.data.layout import Layout
from msa.data.store import write_shard

IN_MEMORY_REF = "98ad868"  # the last commit whose `msa finetune` held the train split in memory
SHARD_ROWS = 250_000
N_XP = 16
REPO = Path(__file__).resolve().parents[1]


def features() -> dict:
    return {"xp": {"bp": N_XP, "rp": N_XP, "normalise": "g_flux"},
            "gaia_photometry": {"phot_g_mean_mag": None, "phot_bp_mean_mag": None, "phot_rp_mean_mag": None},
            "astrometry": {"parallax": "parallax_error"}}


def write_store(directory: Path, n_stars: int, seed: int = 0) -> list[Path]:
    """Shards of :data:`SHARD_ROWS` stars: XP-like spectra and magnitudes smooth in two hidden
    parameters, and a parallax that depends on them (so there is something to learn), with errors."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = sorted(directory.glob("shard-*.h5"))
    if len(paths) == -(-n_stars // SHARD_ROWS):
        return paths
    rng = np.random.default_rng(seed)
    mixing = np.random.default_rng(99).normal(size=(2, 2 * N_XP + 2)).astype(np.float32)
    paths = []
    for k, start in enumerate(range(0, n_stars, SHARD_ROWS)):
        rows = min(SHARD_ROWS, n_stars - start)
        t = rng.normal(size=(rows, 2)).astype(np.float32)
        g = (12 + 5 * rng.random(rows)).astype(np.float32)
        flux = np.power(10, -0.4 * (g - 15)).astype(np.float32)
        shape = np.tanh(t @ mixing)
        plx_error = (0.02 + 0.01 * np.exp(g - 14)).astype(np.float32)
        cols = {"source_id": (np.arange(rows, dtype=np.int64) + start) * 2 + 4295098369,
                "phot_g_mean_mag": g, "phot_bp_mean_mag": g + 0.4 * shape[:, -2] + 0.5,
                "phot_rp_mean_mag": g + 0.4 * shape[:, -1] - 0.5,
                "parallax": np.exp(0.5 * t[:, 0] - 0.2 * (g - 14)) + plx_error * rng.normal(size=rows),
                "parallax_error": plx_error}
        for b, band in enumerate(("bp", "rp")):
            for i in range(N_XP):
                cols[f"{band}_{i + 1}"] = (1 + shape[:, b * N_XP + i] + rng.normal(0, 0.01, rows)) * flux
                cols[f"{band}e_{i + 1}"] = np.float32(0.01) * flux
        path = directory / f"shard-{k:04d}.h5"
        write_shard(path, cols)
        paths.append(path)
    return paths


def finetune_config(max_train_rows: int, epochs: int, reference: bool) -> dict:
    finetune = {"members": 1, "epochs": epochs, "batch_size": 512, "patience": epochs + 1,
                "checkpoint_every": 100000}
    if not reference:  # settings the in-memory version does not know
        finetune["max_train_rows"] = max_train_rows
    return {"seed": 1, "features": features(),
            "model": {"d_embedding": 8, "n_frequencies": 16, "encoder_widths": [256, 256, 128, 128, 64],
                      "indicators": False, "raw_inputs": True},
            "labels": {"columns": {"parallax": {"store": "parallax", "error": "parallax_error"}}},
            "label_sets": {"parallax": ["parallax"]},
            "splits": {"train": 0.7, "validation": 0.1, "calibration": 0.1, "test": 0.1},
            "finetune": finetune}


def run_finetune(code: Path, config_path: Path, shards: list[Path], scaler: Path, out: Path, log: Path) -> dict:
    """One `msa finetune` process of the given checkout; its peak RSS and train rows/s."""
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "PYTHONPATH": str(code), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "msa.cli", "finetune", "--config", str(config_path), "--label-set", "parallax",
           "--member", "0", "--from-scratch", "--shards", *map(str, shards), "--scaler", str(scaler),
           "--out-dir", str(out), "--device", "cpu"]
    start = time.perf_counter()
    with open(log, "w") as handle:
        proc = subprocess.Popen(cmd, env=env, cwd=code, stdout=handle, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed; see {log}:\n{log.read_text()[-2000:]}")
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    if "rows" in metrics[0]:
        rows = sum(m["rows"] for m in metrics)
    else:  # the in-memory version trains on its whole train split every epoch
        line = next(l for l in log.read_text().splitlines() if " train / " in l)
        rows = int(line.split(" train / ")[0].rsplit(" ", 1)[1]) * len(metrics)
    return {"peak_rss_mb": usage.ru_maxrss / 1024, "rows_per_s": rows / sum(m["seconds"] for m in metrics),
            "wall_s": wall}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", type=Path, default=None, help="keeps the stores between runs")
    parser.add_argument("--sizes", type=int, nargs="+", default=[250_000, 1_000_000, 4_000_000])
    parser.add_argument("--max-train-rows", type=int, default=50_000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--reference-max-stars", type=int, default=250_000,
                        help="run the in-memory version on stores up to this size")
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-finetune-"))
    work.mkdir(parents=True, exist_ok=True)
    reference = work / f"code-{IN_MEMORY_REF}"
    if not reference.exists():
        archive = subprocess.run(["git", "-C", str(REPO), "archive", IN_MEMORY_REF], check=True,
                                 capture_output=True).stdout
        reference.mkdir()
        subprocess.run(["tar", "-x", "-C", str(reference)], input=archive, check=True)
    configs = {}
    for kind in ("streaming", "in_memory"):
        configs[kind] = work / f"{kind}.yaml"
        configs[kind].write_text(yaml.safe_dump(finetune_config(args.max_train_rows, args.epochs,
                                                                kind == "in_memory"), sort_keys=False))
    layout = Layout.from_config(validate(finetune_config(args.max_train_rows, args.epochs, False))["features"])

    results = []
    for n in args.sizes:
        shards = write_store(work / f"store-{n}", n)
        scaler = work / f"store-{n}" / "scaler.json"
        if not scaler.exists():
            fit_scaler(shards, layout, True, shards=len(shards), max_rows=200_000, seed=0)[0].save(scaler)
        row = {"stars": n, "streaming": run_finetune(REPO, configs["streaming"], shards, scaler, work / "out",
                                                     work / f"streaming-{n}.log")}
        if n <= args.reference_max_stars:
            row["in_memory"] = run_finetune(reference, configs["in_memory"], shards, scaler, work / "out",
                                            work / f"in_memory-{n}.log")
        results.append(row)
        print(json.dumps(row), flush=True)

    print(f"\nmsa finetune, label = store parallax, every star labelled; epoch ≤ {args.max_train_rows:,} rows, "
          f"{args.epochs} epochs, batch 512, CPU, one thread")
    print(f"{'stars':>10} | {'streaming RSS MB':>16} {'rows/s':>8} {'wall s':>7} | "
          f"{'in-memory RSS MB':>16} {'rows/s':>8} {'wall s':>7} | {'rows/s ratio':>12}")
    for row in results:
        s, m = row["streaming"], row.get("in_memory")
        ref = (f"{m['peak_rss_mb']:>16.0f} {m['rows_per_s']:>8.0f} {m['wall_s']:>7.1f}" if m
               else f"{'(not run)':>16} {'':>8} {'':>7}")
        ratio = f"{s['rows_per_s'] / m['rows_per_s']:>12.2f}" if m else f"{'':>12}"
        print(f"{row['stars']:>10,} | {s['peak_rss_mb']:>16.0f} {s['rows_per_s']:>8.0f} {s['wall_s']:>7.1f} | "
              f"{ref} | {ratio}")
    if len(results) > 1:
        first, last = results[0], results[-1]
        growth = (last["streaming"]["peak_rss_mb"] - first["streaming"]["peak_rss_mb"]) * 2 ** 20 \
            / (last["stars"] - first["stars"])
        print(f"streaming peak-RSS growth {first['stars']:,} → {last['stars']:,} stars: "
              f"{growth:.1f} bytes per labelled star")
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
