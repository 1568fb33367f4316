"""Pretraining throughput and memory: streamed shards vs tensors in memory vs the upstream way.

Prints, from ONE run:

(a) pipeline efficiency = rows/s of pretraining steps fed by ``ShardStream`` from gzip HDF5
    shards ÷ rows/s of the same steps (same model, batch size, masking, loss) on batches already
    shuffled and cut in memory (a feed that costs nothing);
(b) ours / upstream rows/s, where "upstream" loads each whole shard into tensors and iterates a
    ``TensorDataset`` through ``DataLoader(batch_size, shuffle=True)`` (loading time included);
(c) peak RSS of a real ``pretrain_segment`` epoch over a store of ≥ 2 M rows (run in a fresh
    process), next to the store's in-memory size and a process that only builds the model.

Usage: ``python benchmarks/bench_pretrain.py [--workdir DIR] [--rows-big 2000000]``
(writes its shards to a temporary folder, removed at the end; a few minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from msa.config import validate
from msa.data.batches import ShardStream
from msa.data.features import FeatureTransform
from msa.data.fit_scaler import fit_scaler
from msa.data.layout import Layout
from msa.data.store import Shard, write_shard
from msa.nn.losses import reconstruction_loss
from msa.nn.masking import MaskSpec, draw_mask
from msa.nn.model import MaskedAutoencoder
from msa.nn.training import make_optimizer

SECTION = {"xp_masking_ratio": 0.3, "m_masking_ratio": 0.15, "force_mask_cols": [], "group_overrides": {}}


def features(n_xp: int) -> dict:
    return {"xp": {"bp": n_xp, "rp": n_xp, "normalise": "g_flux"},
            "gaia_photometry": {"phot_g_mean_mag": None, "phot_bp_mean_mag": None, "phot_rp_mean_mag": None},
            "reconstruct": ["xp", "gaia_photometry"]}


def write_store(directory: Path, n_shards: int, rows: int, n_xp: int, seed: int) -> list[Path]:
    """Shards with XP-like structure (smooth in two hidden parameters), stored float32 with gzip."""
    rng = np.random.default_rng(seed)
    mixing = np.random.default_rng(99).normal(size=(2, 2 * n_xp + 2)).astype(np.float32)
    paths = []
    for k in range(n_shards):
        t = rng.normal(size=(rows, 2)).astype(np.float32)
        g = (12 + 5 * rng.random(rows)).astype(np.float32)
        flux = np.power(10, -0.4 * (g - 15)).astype(np.float32)
        shape = np.tanh(t @ mixing)
        cols = {"source_id": np.arange(rows, dtype=np.int64) * 2 + k * 10 * rows + 4295098369,
                "phot_g_mean_mag": g, "phot_bp_mean_mag": g + 0.4 * shape[:, -2] + 0.5,
                "phot_rp_mean_mag": g + 0.4 * shape[:, -1] - 0.5}
        for b, band in enumerate(("bp", "rp")):
            for i in range(n_xp):
                noise = rng.normal(0, 0.01, rows).astype(np.float32)
                cols[f"{band}_{i + 1}"] = (1 + shape[:, b * n_xp + i] + noise) * flux
                cols[f"{band}e_{i + 1}"] = np.float32(0.01) * flux
        path = directory / f"shard-{k:04d}.h5"
        write_shard(path, cols)
        paths.append(path)
    return paths


class Stepper:
    """One pretraining step (mask, forward, masked loss, backward, AdamW), identical for every feed."""

    def __init__(self, layout: Layout, model_cfg: dict, seed: int = 0):
        torch.manual_seed(seed)
        self.model = MaskedAutoencoder(layout.n_features, len(layout.reconstruct_indices), **model_cfg)
        self.optimizer = make_optimizer(self.model, 1e-3, 0.01)
        self.spec = MaskSpec.from_config(layout, SECTION)
        self.recon = torch.as_tensor(layout.reconstruct_indices)
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, x: torch.Tensor, err: torch.Tensor) -> float:
        hidden = draw_mask(self.spec, len(x), self.generator)
        recon, _ = self.model(x, hidden)
        loss = reconstruction_loss(recon, x[:, self.recon], err[:, self.recon], hidden[:, self.recon], "error_weighted")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return float(loss.item())


def timed_rate(batches, step, n_batches: int, warmup: int) -> float:
    """Rows/s over ``n_batches`` steps after ``warmup`` steps, the feed's own time included."""
    it = iter(batches)
    for _ in range(warmup):
        x, err = next(it)
        step(x, err)
    rows, start = 0, time.perf_counter()
    for _ in range(n_batches):
        x, err = next(it)
        step(x, err)
        rows += len(x)
    return rows / (time.perf_counter() - start)


def measure_rates(paths, transform, layout, model_cfg, batch_size, n_batches, warmup, chunk_rows, buffer_rows):
    n_total = warmup + n_batches

    def streamed():
        epoch = 0
        while True:  # as many epochs as the measurement needs
            for b in ShardStream(paths, transform, chunk_rows=chunk_rows, buffer_rows=buffer_rows,
                                 batch_size=batch_size, seed=0, epoch=epoch, drop_last=True):
                yield b.x, b.err
            epoch += 1

    # in memory: the same number of rows, transformed beforehand
    with Shard(paths[0]) as shard:
        raw = shard.read(["source_id", *transform.store_columns], 0, n_total * batch_size)
    x_all, err_all = (torch.from_numpy(a) for a in transform(raw))

    # batches shuffled and cut beforehand: the feed costs nothing, the strictest reference
    perm = torch.randperm(len(x_all), generator=torch.Generator().manual_seed(0))
    ready = [(x_all[perm[i:i + batch_size]], err_all[perm[i:i + batch_size]])
             for i in range(0, len(perm) - batch_size + 1, batch_size)]

    def in_memory():
        while True:
            yield from ready

    def upstream():
        while True:
            for path in paths:  # whole shard → tensors → TensorDataset → DataLoader
                with Shard(path) as shard:
                    x, err = transform(shard.read(["source_id", *transform.store_columns]))
                loader = DataLoader(TensorDataset(torch.from_numpy(x), torch.from_numpy(err)),
                                    batch_size=batch_size, shuffle=True, drop_last=True)
                yield from loader

    rates = {}
    # interleave the three measurements twice, keep the best of each (the machine is shared)
    for _ in range(2):
        for name, feed in (("in_memory", in_memory), ("streamed", streamed), ("upstream", upstream)):
            rate = timed_rate(feed(), Stepper(layout, model_cfg), n_batches, warmup)
            rates[name] = max(rates.get(name, 0.0), rate)
    return rates


MEMORY_CHILD = r"""
import json, sys, torch
torch.set_num_threads(1)
from msa.pretrain.stage import pretrain_segment
config, shards, scaler, out, mode = json.loads(sys.argv[1])
if mode == "model_only":
    from msa.data.layout import Layout
    from msa.nn.model import MaskedAutoencoder
    layout = Layout.from_config(config["features"])
    MaskedAutoencoder(layout.n_features, len(layout.reconstruct_indices), **config["model"])
    result = {"rows": 0}
else:
    r = pretrain_segment(config, shards, scaler, out, 0)
    result = {"rows": r.metrics[-1]["rows"], "rows_per_s": r.metrics[-1]["rows_per_s"]}
# VmHWM (peak RSS of this process image); ru_maxrss would carry the parent's peak across exec
status = open("/proc/self/status").read()
result["peak_rss_mb"] = int(status.split("VmHWM:")[1].split()[0]) / 1024
print(json.dumps(result))
"""


def measure_memory(workdir: Path, rows_big: int, n_xp: int, batch_size: int, buffer_rows: int) -> dict:
    n_shards = 8
    store = workdir / "big"
    store.mkdir()
    t0 = time.perf_counter()
    paths = write_store(store, n_shards, -(-rows_big // n_shards), n_xp, seed=5)
    write_s = time.perf_counter() - t0
    layout = Layout.from_config(features(n_xp))
    scaler, _ = fit_scaler(paths, layout, True, shards=2, max_rows=50_000, seed=0)
    scaler.save(workdir / "big-scaler.json")
    config = validate({"seed": 1, "features": features(n_xp),
                       "model": {"d_embedding": 4, "n_frequencies": 4, "encoder_widths": [64, 32]},
                       "pretrain": {"epochs": 1, "epochs_per_job": 1, "batch_size": batch_size,
                                    "chunk_rows": 16384, "buffer_rows": buffer_rows, "validation_fraction": 0.01,
                                    "checkpoint_every": 10**9, "loss": "mse"}})
    n_rows = sum(Shard(p).n_rows for p in paths)
    in_memory_mb = n_rows * (len(Shard(paths[0]).columns) - 1) * 4 / 2**20 + n_rows * 8 / 2**20
    results = {}
    for mode in ("model_only", "pretrain"):
        arg = json.dumps([config, [str(p) for p in paths], str(workdir / "big-scaler.json"), str(workdir / "out"), mode])
        proc = subprocess.run([sys.executable, "-c", MEMORY_CHILD, arg], capture_output=True, text=True,
                              env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
        if proc.returncode:
            raise RuntimeError(proc.stderr[-3000:])
        results[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
    disk_mb = sum(p.stat().st_size for p in paths) / 2**20
    return {"store_rows": n_rows, "store_in_memory_mb": in_memory_mb, "store_on_disk_mb": disk_mb,
            "write_s": write_s, "buffer_rows": buffer_rows, **{f"{k}": v for k, v in results.items()}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--rows-big", type=int, default=2_000_000, help="rows of the memory benchmark's store")
    parser.add_argument("--batches", type=int, default=40, help="timed batches per rate measurement")
    parser.add_argument("--batch-size", type=int, default=1024)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # one core computes, the other one is free for the prefetch thread
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench-pretrain-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        n_xp = 55
        layout = Layout.from_config(features(n_xp))
        model_cfg = {"d_embedding": 8, "n_frequencies": 16, "encoder_widths": [256, 256, 128, 128, 64]}
        store = workdir / "rates"
        store.mkdir()
        paths = write_store(store, n_shards=4, rows=25_000, n_xp=n_xp, seed=0)
        scaler, _ = fit_scaler(paths, layout, True, shards=4, max_rows=50_000, seed=0)
        transform = FeatureTransform(layout, scaler, True)
        print(f"layout: {layout.n_features} features ({2 * n_xp} XP + 3 Gaia mags), model "
              f"{model_cfg['encoder_widths']}, batch {args.batch_size}, torch threads 1", flush=True)
        rates = measure_rates(paths, transform, layout, model_cfg, args.batch_size, args.batches, warmup=5,
                              chunk_rows=16384, buffer_rows=65536)
        print(f"(a) rows/s  in memory {rates['in_memory']:,.0f}   streamed from HDF5 {rates['streamed']:,.0f}"
              f"   pipeline efficiency = {rates['streamed'] / rates['in_memory']:.2f}", flush=True)
        print(f"(b) rows/s  upstream (whole shard + TensorDataset/DataLoader) {rates['upstream']:,.0f}"
              f"   ours/theirs = {rates['streamed'] / rates['upstream']:.2f}", flush=True)
        mem = measure_memory(workdir, args.rows_big, n_xp=16, batch_size=4096, buffer_rows=131072)
        print(f"(c) store {mem['store_rows']:,} rows × 67 columns: {mem['store_in_memory_mb']:,.0f} MB in memory "
              f"({mem['store_on_disk_mb']:,.0f} MB gzip on disk); buffer {mem['buffer_rows']:,} rows", flush=True)
        print(f"    peak RSS: import + model only {mem['model_only']['peak_rss_mb']:,.0f} MB, "
              f"full pretraining epoch {mem['pretrain']['peak_rss_mb']:,.0f} MB "
              f"({mem['pretrain']['rows']:,} training rows at {mem['pretrain']['rows_per_s']:,.0f} rows/s)", flush=True)
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
