"""Benchmark of ``msa predict``: overlap efficiency, the upstream way, bounded memory, full-sky projection.

Run from the repository root (a few minutes on 2 CPU cores)::

    python benchmarks/bench_predict.py [--rows 262144] [--big-rows 2097152] [--work DIR]

Inputs are realistic: the bundled real demo (APOGEE × Gaia DR3 XP) is ingested with ``msa ingest``
and its rows are tiled, with a 0.1 % multiplicative jitter so that compression sees no exact
repeats, into a shard of ``--rows`` stars (and one of ``--big-rows`` for the memory test). The
ensemble is ``--members`` randomly initialised members of the demo config's model (speed does not
depend on the weights). Printed:

(a) efficiency = stars/s of prediction from the HDF5 shard to Parquet (reading, decompression,
    feature transform, ensemble, calibration, Parquet writing, source_id check) ÷ stars/s of the
    same ensemble's forward pass on a tensor already in memory, same batch size (best of repeats);
    and the same with a support index of each of ``--support-rows`` stars per view (issue 28: the
    latent and one distance product per chunk), as a ratio to the run without;
(b) ours ÷ the upstream way (whole shard read into pandas, then sliced into torch batches), and
    the ensemble combination's (mixture percentiles) share of the shard → Parquet time;
(c) peak RSS of ``msa predict`` (a child process) on a ≥ 2 M-row shard, next to the shard's
    in-memory size and the same for the small shard: bounded by the chunk size, not the shard;
(d) per-star matmul FLOPs of the full-sky model (counted by ``torch.utils.flop_counter``) and the
    store bytes read per star (real XP data), projected to 1.8 billion stars on one H100 in bf16
    at the compute bound and at the I/O bound (assumptions printed).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import torch
import yaml
from torch.utils.flop_counter import FlopCounterMode

from msa.calibration.ensemble import Ensemble, combine_members
from msa.calibration.support import SupportIndex
from msa.catalogue.predict import input_transform, predict_shard
from msa.config import load_config
from msa.data.features import derive, store_columns, xp_normalises
from msa.data.layout import Layout
from msa.data.scaling import Scaler
from msa.data.store import SOURCE_ID, Shard, write_shard
from msa.nn.checkpoint import save_checkpoint
from msa.nn.model import MaskedAutoencoder, QuantileHead

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO / "config" / "config.yaml"
LABELS = ["teff", "logg", "fe_h", "alpha_m"]
N_GAIA_STARS = 1.8e9

# full-sky model (schema defaults) and a full-sky layout: 110 XP, G/BP/RP, 2MASS JHKs, WISE W1/W2, parallax
FULL_SKY_MODEL = dict(d_embedding=16, n_frequencies=48, lite=True,
                      encoder_widths=[2048, 2048, 1024, 1024, 512, 512, 256, 256])
FULL_SKY_EXTRA_FEATURES = ["phot_g_mean_mag", "phot_bp_mean_mag", "phot_rp_mean_mag", "J", "H", "K", "W1", "W2",
                           "parallax"]
FULL_SKY_LABELS = ["teff", "logg", "fe_h", "alpha_m", "age", "parallax"]
FULL_SKY_MEMBERS = 3  # finetune.members default
FULL_SKY_STORE_COLUMNS = 110 + len(FULL_SKY_EXTRA_FEATURES)  # value columns read per star (no errors)

# projection assumptions (printed)
H100_BF16_DENSE_PEAK = 989e12  # FLOP/s, H100 SXM dense bf16
ASSUMED_MFU = 0.35  # MLP of widths 256–2048 at batch 8192+; elementwise embeddings cost extra
ASSUMED_DISK_BYTES_PER_S = 2.0e9  # sustained parallel-filesystem read per GPU node
ASSUMED_DECOMPRESS_CORES = 16  # CPU cores feeding one GPU


def log(msg: str) -> None:
    print(msg, flush=True)


def ingest_demo(work: Path) -> Path:
    out = work / "demo.h5"
    if not out.exists():
        subprocess.run(["msa", "ingest", "--config", str(DEMO_CONFIG), "--shard", "demo", "--out", str(out)],
                       check=True, cwd=REPO, capture_output=True)
    return out


def tiled_shard(demo: Path, out: Path, n_rows: int, seed: int) -> Path:
    """A shard of ``n_rows`` stars tiled from the real demo rows, jittered by 0.1 %."""
    if out.exists():
        return out
    with Shard(demo) as s:
        cols = s.read([c for c in s.columns if c != SOURCE_ID])
        ids = s.read([SOURCE_ID])[SOURCE_ID]
    rng = np.random.default_rng(seed)
    n_demo = len(ids)
    pick = np.arange(n_rows) % n_demo
    data = {SOURCE_ID: np.sort(ids)[0] + np.arange(n_rows, dtype=np.int64) * 2**20}
    for name, values in cols.items():
        data[name] = (values[pick] * (1 + 1e-3 * rng.standard_normal(n_rows, dtype=np.float32))).astype(np.float32)
    write_shard(out, data)
    return out


def demo_layout_and_scaler(demo: Path) -> tuple[Layout, Scaler, bool]:
    config = load_config(DEMO_CONFIG)
    layout = Layout.from_config(config["features"])
    normalise = xp_normalises(config["features"])
    with Shard(demo) as s:
        raw = s.read(store_columns(layout, normalise))
    values, _ = derive(raw, layout, normalise)
    q25, q50, q75 = np.nanpercentile(values, [25, 50, 75], axis=0)
    return layout, Scaler.from_stats(layout.names, q50, q75 - q25), normalise


def write_members(work: Path, layout: Layout, scaler: Scaler, normalise: bool, model_cfg: dict, k: int,
                  tag: str) -> list[Path]:
    paths = []
    for member in range(k):
        torch.manual_seed(member)
        model = MaskedAutoencoder(layout.n_features, len(layout.reconstruct_indices), **model_cfg)
        head = QuantileHead(model.latent_dim, len(LABELS), widths=[256])
        path = work / f"{tag}-member-{member}.pt"
        save_checkpoint(path, {
            "kind": "finetune", "model": model.state_dict(), "model_hparams": model.hparams,
            "head": head.state_dict(), "head_hparams": head.hparams, "labels": LABELS,
            "label_centre": [4800.0, 2.5, -0.2, 0.05], "label_scale": [600.0, 1.0, 0.4, 0.1],
            "layout": layout.to_dict(), "scaler": scaler.to_dict(), "normalise_xp": normalise,
            "force_mask_indices": [], "parallax": {"label_index": None, "feature_index": None, "masked_pass": False},
            "member": member, "seed": member, "label_set": "spectro", "config_hash": "bench"})
        paths.append(path)
    return paths


def synthetic_support_index(ensemble: Ensemble, rows: int) -> SupportIndex:
    """A support index of ``rows`` random latents per view: what it costs prediction (one distance
    product a chunk) does not depend on the values, so none is built from real stars."""
    rng = np.random.default_rng(28)
    latent = {view: rng.normal(size=(rows, ensemble.latent_dim)).astype(np.float32) for view in ("xp", "no_xp")}
    reference = {view: np.sort(rng.uniform(0, 1, rows)) for view in latent}
    return SupportIndex(latent, reference, k=10, low_threshold={"xp": 0.1, "no_xp": 0.005},
                        member_sha256=ensemble.checksums)


def zero_calibration(work: Path) -> tuple[dict, Path]:
    cal = {"coverage_target": 0.68, "mode": "symmetric", "labels": LABELS,
           "per_label": {l: {"offset_lower": 0.0, "offset_upper": 0.0, "n_calibration": 1} for l in LABELS},
           "per_label_without_xp": {l: {"offset_lower": 0.0, "offset_upper": 0.0, "n_calibration": 1}
                                    for l in LABELS}}
    path = work / "calibration.json"
    path.write_text(json.dumps(cal))
    return cal, path


def time_best(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def upstream_way(shard: Path, ensemble: Ensemble, batch_size: int, out: Path) -> None:
    """The research code's way: the whole table into pandas, then sliced into torch batches."""
    with h5py.File(shard, "r") as f:
        frame = pd.DataFrame({name: f[name][:] for name in f.keys()})
    results = []
    for start in range(0, len(frame), batch_size):
        batch = frame.iloc[start:start + batch_size]
        x, _ = ensemble.transform({c: batch[c].to_numpy() for c in ensemble.transform.store_columns})
        q = ensemble.predict(torch.from_numpy(x), batch_size=batch_size)
        flat = pd.DataFrame(q.reshape(len(batch), -1), columns=[f"q{i}" for i in range(q[0].size)])
        results.append(flat.assign(source_id=batch[SOURCE_ID].to_numpy()))
    pd.concat(results).to_parquet(out)


def child_peak_rss(args: list[str], mode: str) -> tuple[float, float]:
    """Run ``msa predict`` (or the upstream way) in a fresh process: (peak RSS in MiB, seconds)."""
    # VmHWM, not ru_maxrss: Linux carries the parent's ru_maxrss into an exec'd child
    code = ("import sys, time; t0 = time.perf_counter(); "
            + ("from msa.cli import main; main(sys.argv[1:]); " if mode == "msa" else
               "sys.path.insert(0, %r); import bench_predict as b; b.upstream_child(sys.argv[1:]); "
               % str(Path(__file__).parent))
            + "hwm = [l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0]; "
            + "print('PEAK_RSS_KIB', hwm, time.perf_counter() - t0)")
    env = {**os.environ, "TQDM_DISABLE": "1"}
    res = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=REPO, env=env)
    if res.returncode != 0:
        raise RuntimeError(f"child failed:\n{res.stderr[-3000:]}")
    line = next(l for l in res.stdout.splitlines() if l.startswith("PEAK_RSS_KIB"))
    _, kib, sec = line.split()
    return int(kib) / 1024, float(sec)


def upstream_child(argv: list[str]) -> None:
    shard, out, batch_size, *members = argv
    upstream_way(Path(shard), Ensemble.load(members), int(batch_size), Path(out))


def shard_sizes(shard: Path, columns: list[str]) -> tuple[int, int, int]:
    """(rows, stored bytes of the columns read, in-memory bytes of the whole shard)."""
    with h5py.File(shard, "r") as f:
        n = f[SOURCE_ID].shape[0]
        stored = sum(f[c].id.get_storage_size() for c in columns)
        whole = sum(f[c].dtype.itemsize * n for c in f.keys())
    return n, stored, whole


def full_sky_flops_per_star() -> tuple[float, int]:
    n_features = 110 + len(FULL_SKY_EXTRA_FEATURES)
    model = MaskedAutoencoder(n_features, n_features, **FULL_SKY_MODEL).eval()
    head = QuantileHead(model.latent_dim, len(FULL_SKY_LABELS), widths=[256]).eval()
    batch = 256
    x = torch.randn(batch, n_features)
    hidden = torch.zeros(batch, n_features, dtype=torch.bool)
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        head(model.encode(x, hidden))
        # second pass with the parallax hidden (the parallax label's masked pass)
        head(model.encode(x, hidden))
    return counter.get_total_flops() / batch, n_features


def decompress_rate(shard: Path, columns: list[str]) -> tuple[float, float]:
    """Single-thread (stored bytes/s, stars/s) reading ``columns`` of ``shard`` chunk by chunk."""
    n, stored, _ = shard_sizes(shard, columns)
    with Shard(shard) as s:
        t0 = time.perf_counter()
        for _ in s.iter_chunks(columns, 65536):
            pass
        dt = time.perf_counter() - t0
    return stored / dt, n / dt


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=65536)
    p.add_argument("--big-rows", type=int, default=2_097_152)
    p.add_argument("--members", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--chunk-rows", type=int, default=16384, help="(a): a few chunks per shard, so overlap counts")
    p.add_argument("--rss-chunk-rows", default="16384,65536", help="(c): chunk sizes to compare")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--support-rows", type=int, nargs="+", default=[10000, 50000],
                   help="(a): support index stars per view, one run each (calibrate.support.max_rows: "
                   "10,000 its default, 50,000 the default before)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads for the model (1: one core computes, like a GPU, the other reads)")
    p.add_argument("--parts", default="abcd", help="which parts to run, e.g. 'ab' or 'cd'")
    p.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    args = p.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="msa-bench-predict-"))
    work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    log(f"scratch: {work}; torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{os.cpu_count()} CPUs, device cpu")

    demo = ingest_demo(work)
    layout, scaler, normalise = demo_layout_and_scaler(demo)
    model_cfg = load_config(DEMO_CONFIG)["model"]
    members = write_members(work, layout, scaler, normalise, model_cfg, args.members, "demo")
    ensemble = Ensemble.load(members)
    calibration, calibration_path = zero_calibration(work)
    t0 = time.perf_counter()
    shard = tiled_shard(demo, work / f"bench-{args.rows}.h5", args.rows, seed=1)
    log(f"bench shard: {args.rows} stars tiled from {shard_sizes(demo, [SOURCE_ID])[0]} real demo stars "
        f"({time.perf_counter() - t0:.0f} s); model {model_cfg['encoder_widths']}, {args.members} members, "
        f"{layout.n_features} features")

    if "a" in args.parts or "b" in args.parts:
        # (a) efficiency and (b) the upstream way, interleaved in rounds so a busy neighbour slows all alike
        with Shard(shard) as s:
            x_mem = torch.from_numpy(ensemble.transform(s.read([SOURCE_ID, *ensemble.transform.store_columns]))[0])
        ensemble.predict_members(x_mem[:args.batch_size], batch_size=args.batch_size)  # warm-up
        os.environ["TQDM_DISABLE"] = "1"
        supports = {rows: synthetic_support_index(ensemble, rows) for rows in args.support_rows}
        t_mem = t_pipe = t_up = float("inf")
        t_support = dict.fromkeys(supports, float("inf"))
        for _ in range(args.repeats):
            t_mem = min(t_mem, time_best(lambda: ensemble.predict_members(x_mem, batch_size=args.batch_size), 1))
            t_pipe = min(t_pipe, time_best(lambda: predict_shard(
                shard, ensemble, calibration, work / "ours.parquet", chunk_rows=args.chunk_rows,
                batch_size=args.batch_size, min_inputs=3), 1))
            for rows, support in supports.items():
                t_support[rows] = min(t_support[rows], time_best(lambda: predict_shard(
                    shard, ensemble, calibration, work / "support.parquet", chunk_rows=args.chunk_rows,
                    batch_size=args.batch_size, min_inputs=3, support=support), 1))
            t_up = min(t_up, time_best(lambda: upstream_way(shard, ensemble, args.batch_size,
                                                             work / "upstream.parquet"), 1))
        rate_mem, rate_pipe, rate_up = args.rows / t_mem, args.rows / t_pipe, args.rows / t_up
        log(f"(a) forward pass on in-memory tensors: {rate_mem:,.0f} stars/s; shard → Parquet: {rate_pipe:,.0f} "
            f"stars/s; efficiency = {rate_pipe / rate_mem:.3f} (target ≥ 0.85; best of {args.repeats} rounds, "
            f"batch {args.batch_size}, chunk {args.chunk_rows})")
        for rows, t in t_support.items():
            log(f"    with a support index of {rows:,} stars per view: {args.rows / t:,.0f} stars/s, "
                f"{t_pipe / t:.3f} of the rate without")
        log(f"(b) upstream way (whole shard → pandas → torch batches): {rate_up:,.0f} stars/s; "
            f"ours/theirs = {rate_pipe / rate_up:.2f}")
        member_q = ensemble.predict_members(x_mem, batch_size=args.batch_size)
        t_mix = time_best(lambda: combine_members(member_q), args.repeats)
        log(f"    ensemble combination (mixture percentiles, {args.members} members × {len(LABELS)} labels): "
            f"{args.rows / t_mix:,.0f} stars/s, {t_mix / t_pipe:.1%} of the shard → Parquet time (target < 10 %)")

    if "c" in args.parts:
        # (c) peak RSS bounded by the chunk size (a cheap model: the data path is what is measured)
        t0 = time.perf_counter()
        big = tiled_shard(demo, work / f"big-{args.big_rows}.h5", args.big_rows, seed=2)
        log(f"(c) big shard: {args.big_rows:,} stars written in {time.perf_counter() - t0:.0f} s")
        tiny_model = {**model_cfg, "encoder_widths": [16], "d_embedding": 2, "n_frequencies": 2}
        tiny_members = write_members(work, layout, scaler, normalise, tiny_model, 1, "tiny")
        code = ("import torch, msa.catalogue.predict; "
                "print([l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0])")
        imports_mib = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                         cwd=REPO).stdout.split()[-1]) / 1024
        log(f"    (a Python process after importing torch and msa: {imports_mib:,.0f} MiB)")
        n, _, whole = shard_sizes(big, [SOURCE_ID])
        log(f"    big shard: {n:,} stars; held in memory it would take {whole / 2**20:,.0f} MiB")
        for chunk_rows in sorted({int(c) for c in args.rss_chunk_rows.split(",")}):
            config = yaml.safe_load(DEMO_CONFIG.read_text())
            config["predict"] = {**config.get("predict", {}), "chunk_rows": chunk_rows,
                                 "batch_size": args.batch_size}
            config["label_sets"] = {"spectro": LABELS}
            cfg_path = work / f"config-{chunk_rows}.yaml"
            cfg_path.write_text(yaml.safe_dump(config, sort_keys=False))
            rss, sec = child_peak_rss(["predict", "--config", str(cfg_path), "--label-set", "spectro",
                                       "--members", *map(str, tiny_members), "--calibration",
                                       str(calibration_path), "--shard", str(big),
                                       "--out", str(work / f"rss-{chunk_rows}.parquet"), "--device", "cpu"], "msa")
            log(f"    msa predict, big shard, chunk_rows {chunk_rows:,}: peak RSS {rss:,.0f} MiB ({sec:.0f} s)")
        rss_up, sec_up = child_peak_rss([str(big), str(work / "rss-up.parquet"), str(args.batch_size),
                                         *map(str, tiny_members)], "upstream")
        log(f"    upstream way, big shard: peak RSS {rss_up:,.0f} MiB ({sec_up:.0f} s)")

    if "d" in args.parts:
        # (d) full-sky projection
        flops_star, n_full = full_sky_flops_per_star()
        flops_ensemble = flops_star * FULL_SKY_MEMBERS
        t_compute = N_GAIA_STARS * flops_ensemble / (H100_BF16_DENSE_PEAK * ASSUMED_MFU)
        read_cols = input_transform(ensemble).store_columns  # values only: what msa predict reads
        n_demo, stored_demo, _ = shard_sizes(demo, read_cols)
        bytes_star = stored_demo / n_demo  # real XP data, gzip + shuffle as ingested
        full_bytes_star = bytes_star / len(read_cols) * FULL_SKY_STORE_COLUMNS  # same bytes per column
        stored_rate, _ = decompress_rate(shard, read_cols)
        decompress_node = stored_rate * ASSUMED_DECOMPRESS_CORES
        io_rate = min(ASSUMED_DISK_BYTES_PER_S, decompress_node)
        t_io = N_GAIA_STARS * full_bytes_star / io_rate
        log(f"(d) full-sky model {FULL_SKY_MODEL['encoder_widths']}, {n_full} features: "
            f"{flops_star / 1e6:.1f} MFLOP/star per member (2 passes: labels + parallax-masked), "
            f"× {FULL_SKY_MEMBERS} members = {flops_ensemble / 1e6:.1f} MFLOP/star")
        log(f"    compute bound: 1.8e9 stars × {flops_ensemble / 1e6:.1f} MFLOP / ({H100_BF16_DENSE_PEAK / 1e12:.0f} "
            f"TFLOP/s bf16 dense × MFU {ASSUMED_MFU}) = {t_compute / 3600:.2f} h on one H100")
        log(f"    bytes/star read: {bytes_star:,.0f} B stored (real demo XP, gzip+shuffle, "
            f"{len(read_cols)} value columns), "
            f"≈ {full_bytes_star:,.0f} B for the full-sky {FULL_SKY_STORE_COLUMNS} columns; "
            f"gzip decompression measured "
            f"{stored_rate / 1e6:.0f} MB/s stored per core here → {decompress_node / 1e9:.2f} GB/s on "
            f"{ASSUMED_DECOMPRESS_CORES} cores; assumed disk {ASSUMED_DISK_BYTES_PER_S / 1e9:.1f} GB/s")
        log(f"    I/O bound: 1.8e9 × {full_bytes_star:,.0f} B / {io_rate / 1e9:.2f} GB/s = {t_io / 3600:.2f} h "
            f"({'decompression' if decompress_node < ASSUMED_DISK_BYTES_PER_S else 'disk'}-limited)")
        log(f"    binds: {'compute' if t_compute > t_io else 'I/O'} "
            f"(projected {max(t_compute, t_io) / 3600:.2f} h for 1.8e9 stars on one GPU, if the other side overlaps)")

if __name__ == "__main__":
    main()
