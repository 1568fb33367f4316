"""``msa probe``: the pretrained representation's own measure, run at the end of pretraining.

Ridge regression per label from the frozen latent of the train split's stars (the penalty chosen
on the validation split), beside the same probe on a random encoder's latent and on the raw
scaled inputs, with XP and with every XP column hidden (:func:`msa.nn.probe.linear_probe`).
A few seconds on the demo, a few minutes on millions of labelled stars (``--max-rows`` per split):
cheap enough to choose a pretraining run by it. Writes ``--out`` (JSON):
``{"validation": table, "test": table, ...}``, each table ``{view: {features: {label: {"nmad",
"lambda"}}}}``. Choose settings on ``validation``; ``test`` is there for the final figures and
``msa evaluate``'s ``metrics.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from msa.config import load_config
from msa.data.features import FeatureTransform
from msa.data.labels import LabelSource, label_set, load_split_samples
from msa.data.layout import Layout
from msa.data.scaling import Scaler
from msa.data.splits import split_seed
from msa.data.store import atomic_path
from msa.nn.masking import MaskSpec
from msa.nn.probe import linear_probe
from msa.pretrain.stage import load_pretrained

log = logging.getLogger(__name__)
SCORED_SPLITS = ("validation", "test")


def probe_pretrained(config: dict, set_name: str, pretrained: str | Path, shards, scaler_path: str | Path,
                     max_rows: int | None = None) -> dict:
    """The probe tables of ``pretrained`` on the label set's stars, per scored split."""
    layout = Layout.from_config(config["features"])
    transform = FeatureTransform.from_config(config, Scaler.load(scaler_path))
    names = label_set(config, set_name)
    samples = load_split_samples(shards, transform, LabelSource(config["labels"], names), config["splits"],
                                 split_seed(config), ("train", *SCORED_SPLITS), max_rows)
    model, checkpoint = load_pretrained(pretrained, layout)
    source = LabelSource(config["labels"], names)
    # what pretraining always hid, and an input that is itself a label (Gaia parallax), stay unseen
    hidden = set(MaskSpec.from_config(layout, checkpoint["config"]["pretrain"]).force_indices)
    hidden |= {layout.index(c.store) for c in source.columns if c.store in layout.names}
    # the random yardstick has the same architecture, without the label head it would not use
    hparams = {k: v for k, v in checkpoint["model_hparams"].items() if k != "n_label_targets"}
    out = {"label_set": set_name, "labels": list(names), "pretrained": str(pretrained),
           "n_stars": {s: int(len(samples[s].y)) for s in ("train", *SCORED_SPLITS)}}
    for split in SCORED_SPLITS:
        out[split] = linear_probe(model, hparams, layout, {**samples, "evaluation": samples[split]}, names,
                                  evaluation="evaluation", seed=int(config["seed"]), always_hidden=sorted(hidden))
    return out


def summary_lines(result: dict, split: str = "validation") -> list[str]:
    """A Markdown table of NMAD per label for one split."""
    names = result["labels"]
    lines = [f"linear probe, NMAD on {split}", "| view | features | " + " | ".join(names) + " |",
             "|---|---|" + "---|" * len(names)]
    for view, table in result[split].items():
        for kind, scores in table.items():
            lines.append(f"| {view} | {kind} | " + " | ".join(f"{scores[n]['nmad']:.4g}" for n in names) + " |")
    return lines


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="pipeline config (YAML)")
    parser.add_argument("--label-set", required=True, help="name in the config's label_sets")
    parser.add_argument("--pretrained", required=True, help="pretraining checkpoint, e.g. results/pretrain/model.pt")
    parser.add_argument("--shards", nargs="+", required=True, help="shard store files holding the labelled stars")
    parser.add_argument("--scaler", required=True, help="scaler JSON from `msa fit-scaler`")
    parser.add_argument("--out", required=True, help="probe JSON, e.g. results/pretrain/probe-spectro.json")
    parser.add_argument("--max-rows", type=int, default=200_000,
                        help="at most this many stars per split (a seeded sample; default %(default)s)")


def run(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    result = probe_pretrained(config, args.label_set, args.pretrained, args.shards, args.scaler, args.max_rows)
    with atomic_path(Path(args.out)) as tmp:
        tmp.write_text(json.dumps(result, indent=1))
    for line in summary_lines(result):
        log.info("%s", line)
    return 0
