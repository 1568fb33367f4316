"""Benchmark of ``msa reconstruct`` and ``msa embed`` beside ``msa predict``: bounded memory, throughput.

Run from the repository root (a few minutes on 2 CPU cores)::

    python benchmarks/bench_reconstruct.py [--rows 262144,1048576] [--chunk-rows 16384,65536] [--work DIR]

The shard is the bundled real demo (ingested with ``msa ingest``) tiled to each of ``--rows`` stars
with a 0.1 % jitter, as in ``bench_predict.py`` (whose helpers this reuses). Each command runs in
a fresh process on that shard with a one-layer model (the data path is what is measured) and
prints, side by side per chunk size: peak RSS (VmHWM), wall time and stars/s, next to the
shard's in-memory size. Bounded memory means the peak stays near the import footprint plus a few
chunks, however many rows the shard has; ``msa reconstruct`` writes 4 columns per coefficient
(440 for the demo layout), so its chunks, not its shard, set its peak.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).parent))
import bench_predict as bp  # noqa: E402  (the shared demo-tiling and child-process helpers)

from msa.config import load_config  # noqa: E402
from msa.data.store import SOURCE_ID  # noqa: E402
from msa.nn.checkpoint import save_checkpoint  # noqa: E402
from msa.nn.model import MaskedAutoencoder  # noqa: E402


def pretrained_model(work: Path, layout, scaler, model_cfg: dict) -> Path:
    """A pretraining checkpoint of ``model_cfg`` with random weights (speed does not depend on them)."""
    path = work / "tiny-pretrain.pt"
    model = MaskedAutoencoder(layout.n_features, len(layout.reconstruct_indices), **model_cfg)
    config = load_config(bp.DEMO_CONFIG)
    save_checkpoint(path, {"kind": "pretrain", "model": model.state_dict(), "model_hparams": model.hparams,
                           "layout": layout.to_dict(), "scaler": scaler.to_dict(), "config": config})
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", default="262144,1048576", help="shard sizes to compare")
    p.add_argument("--chunk-rows", default="16384,65536", help="chunk sizes to compare")
    p.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    args = p.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="msa-bench-reconstruct-"))
    work.mkdir(parents=True, exist_ok=True)
    demo = bp.ingest_demo(work)
    layout, scaler, normalise = bp.demo_layout_and_scaler(demo)
    tiny = {**load_config(bp.DEMO_CONFIG)["model"], "encoder_widths": [16], "d_embedding": 2, "n_frequencies": 2}
    members = bp.write_members(work, layout, scaler, normalise, tiny, 1, "tiny")
    pretrained = pretrained_model(work, layout, scaler, tiny)
    _, calibration = bp.zero_calibration(work)
    code = "import torch, msa.catalogue.predict, msa.spectra.reconstruct; print([l.split()[1] for l in open('/proc/self/status') " \
           "if l.startswith('VmHWM')][0])"
    imports = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                 cwd=bp.REPO).stdout.split()[-1]) / 1024
    bp.log(f"a Python process after importing torch and msa: {imports:,.0f} MiB")
    os.environ["TQDM_DISABLE"] = "1"
    bp.log(f"{'command':<14} {'stars':>10} {'in memory MiB':>13} {'chunk_rows':>10} {'peak RSS MiB':>13} "
           f"{'seconds':>8} {'stars/s':>9} {'out MiB':>8}")
    for n_rows in sorted({int(r) for r in args.rows.split(",")}):
        big = bp.tiled_shard(demo, work / f"big-{n_rows}.h5", n_rows, seed=2)
        n, _, whole = bp.shard_sizes(big, [SOURCE_ID])
        for chunk_rows in sorted({int(c) for c in args.chunk_rows.split(",")}):
            config = yaml.safe_load(bp.DEMO_CONFIG.read_text())
            for section in ("predict", "reconstruct", "embed"):
                config[section] = {**(config.get(section) or {}), "chunk_rows": chunk_rows, "batch_size": 4096}
            config["label_sets"] = {"spectro": bp.LABELS}
            cfg = work / f"config-{chunk_rows}.yaml"
            cfg.write_text(yaml.safe_dump(config, sort_keys=False))
            runs = {
                "predict": ["predict", "--label-set", "spectro", "--members", *map(str, members),
                            "--calibration", str(calibration)],
                "reconstruct": ["reconstruct", "--models", str(pretrained)],
                "embed": ["embed", "--models", str(pretrained)],
            }
            for name, argv in runs.items():
                out = work / f"{name}-{n_rows}-{chunk_rows}.parquet"
                rss, sec = bp.child_peak_rss([*argv, "--config", str(cfg), "--shard", str(big), "--out",
                                              str(out), "--device", "cpu"], "msa")
                bp.log(f"{'msa ' + name:<14} {n:>10,} {whole / 2**20:>13,.0f} {chunk_rows:>10,} {rss:>13,.0f} "
                       f"{sec:>8.0f} {n / sec:>9,.0f} {out.stat().st_size / 2**20:>8,.0f}")
                out.unlink()


if __name__ == "__main__":
    main()
