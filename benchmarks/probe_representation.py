"""Linear probe of the pretrained representation (issue 30): does the latent carry what the labels need?

For each seed, pretrains (cached in ``--workdir`` by the settings' hash, as bench_accuracy does)
and fits ridge regression per label from the frozen latent of the train split (penalty chosen on
validation), beside the same probe on a random encoder's latent and on the raw scaled inputs, with
and without XP. Prints NMAD per label (median over seeds) and writes ``--workdir/probe.jsonl``.

    python benchmarks/probe_representation.py --workdir /tmp/msa-acc --seeds 0 1 2
    python benchmarks/probe_representation.py --workdir /tmp/msa-acc --set pretrain.xp_entry_masking_ratio=0.5

Score on ``--split validation`` while choosing settings; ``--split test`` only for final figures.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_accuracy import REPO, build_store, pretrained, with_fewer_train_labels, with_overrides  # noqa: E402

from msa.config import load_config  # noqa: E402
from msa.data.features import FeatureTransform  # noqa: E402
from msa.data.labels import LabelSource, label_set, load_split_samples  # noqa: E402
from msa.data.layout import Layout  # noqa: E402
from msa.data.scaling import Scaler  # noqa: E402
from msa.data.splits import split_seed  # noqa: E402
from msa.nn.probe import linear_probe  # noqa: E402
from msa.pretrain import load_pretrained  # noqa: E402

log = logging.getLogger("probe_representation")
FEATURES = ("pretrained", "random_encoder", "raw_inputs")


def probe_seed(config: dict, set_name: str, shards, scaler_path: Path, work: Path, split: str) -> dict:
    layout = Layout.from_config(config["features"])
    transform = FeatureTransform.from_config(config, Scaler.load(scaler_path))
    names = label_set(config, set_name)
    samples = load_split_samples(shards, transform, LabelSource(config["labels"], names), config["splits"],
                                 split_seed(config), sorted({"train", "validation", split}), None)
    model, checkpoint = load_pretrained(pretrained(config, shards, scaler_path, work), layout)
    return linear_probe(model, checkpoint["model_hparams"], layout, {**samples, "evaluation": samples[split]},
                        names, evaluation="evaluation", seed=int(config["seed"]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(REPO / "config" / "config.yaml"))
    p.add_argument("--label-set", default="spectro")
    p.add_argument("--workdir", default="/tmp/msa-bench-accuracy")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="offsets added to the config seed")
    p.add_argument("--split", default="validation", choices=["validation", "test"])
    p.add_argument("--set", dest="overrides", action="append", default=[], help="section.key=YAML value")
    p.add_argument("--tag", default="")
    p.add_argument("--label-fraction", type=float, default=1.0,
                   help="keep this share of the train split's labels (probe and label-target pretraining alike)")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(args.workdir)
    base = with_overrides(load_config(args.config), args.overrides)
    base["splits"]["seed"] = split_seed(base)
    shards, scaler = build_store(base, work)
    if args.label_fraction < 1:
        base = with_fewer_train_labels(base, args.label_fraction, work)
    t0, tables = time.time(), []
    for offset in args.seeds:
        config = copy.deepcopy(base)
        config["seed"] = int(base["seed"]) + offset
        tables.append(probe_seed(config, args.label_set, shards, scaler, work, args.split))
    names = label_set(base, args.label_set)
    print(f"\nlinear probe, NMAD on {args.split} (median of {len(tables)} seeds) {' '.join(args.overrides)}")
    print("| view | features | " + " | ".join(names) + " |")
    print("|---|---|" + "---|" * len(names))
    summary = {}
    for view in ("xp", "no_xp"):
        for kind in FEATURES:
            row = [float(np.median([t[view][kind][n]["nmad"] for t in tables])) for n in names]
            summary[f"{view}/{kind}"] = dict(zip(names, row))
            print(f"| {view} | {kind} | " + " | ".join(f"{v:.4g}" for v in row) + " |")
    with open(work / "probe.jsonl", "a") as f:
        f.write(json.dumps({"tag": args.tag, "overrides": args.overrides, "split": args.split,
                            "label_fraction": args.label_fraction,
                            "seeds": args.seeds, "summary": summary, "per_seed": tables}) + "\n")
    log.info("done in %.0f s", time.time() - t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
