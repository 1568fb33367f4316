"""How far may a calibrated model's test coverage stray from 0.68 by the luck of the split alone?

Run after a workflow run (``snakemake --cores 2`` on the demo)::

    python benchmarks/probe_coverage_spread.py --results results

Split-conformal calibration promises the nominal coverage on average over draws of calibration
and test stars, not on one draw. This probe pools the run's calibration and test stars, predicts
them once with the run's ensemble (with XP, and with every XP column hidden, as ``msa calibrate``
does), and then, many times over, deals the pool afresh into a calibration and a test part of the
run's sizes, fits the offsets (coarse and per G-bin/band group, as ``msa calibrate`` fits them; no
emulated faint groups, which only stars fainter than the labelled ones take) and scores the test
part. Printed per label, with and without XP: the run's own test coverage (``run``, from its
``metrics.json``; ``refit``, the probe's fit of the run's own deal, which must repeat it), the
mean, standard deviation and 5–95 % range of the re-dealt test coverage, the share of draws
outside 0.68 ± 0.03, and the share of draws below the run's figure (its percentile). A run's
coverage inside that range is what a calibrated model gives.
"""

from __future__ import annotations

import argparse
import glob
import json
from pathlib import Path

import numpy as np

from msa.calibration.calibrate import calibration_views, coverage_report, fit_calibration, fit_group_offsets, star_groups
from msa.calibration.ensemble import Ensemble
from msa.config import load_config
from msa.data.features import G_MAG
from msa.data.labels import LabelSource, label_set, load_split_samples
from msa.data.splits import split_seed

TOLERANCE = 0.03


def calibrate_and_score(q, y, levels, cal, test, names, cfg, logs) -> np.ndarray:
    """Test coverage per label after offsets fitted on the ``cal`` rows (as ``msa calibrate``)."""
    result = fit_calibration(q[cal], y[cal], names, cfg["coverage"], cfg["mode"], log_labels=logs)
    result["per_label_without_xp"] = result["per_label"]  # each view is its own coarse group
    result["groups"] = fit_group_offsets(q[cal], y[cal], names, [level[cal] for level in levels],
                                         cfg["coverage"], cfg["mode"], cfg["min_group_size"], log_labels=logs)
    test_levels = [level[test] for level in levels]
    report = coverage_report(q[test], y[test], result, groups=star_groups(result, test_levels))
    return np.array([report[n]["after"] for n in names], dtype=np.float64)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", default="results", help="the workflow's results folder")
    p.add_argument("--label-set", default="spectro")
    p.add_argument("--draws", type=int, default=500)
    args = p.parse_args(argv)
    results = Path(args.results)
    config = load_config(results / ".msa" / "config.yaml")
    names = label_set(config, args.label_set)
    members = sorted(glob.glob(str(results / "finetune" / args.label_set / "*" / "model.pt")))
    ensemble = Ensemble.load(members)
    shards = sorted(glob.glob(str(results / "store" / "*.h5")))
    samples = load_split_samples(shards, ensemble.transform, LabelSource(config["labels"], names), config["splits"],
                                 split_seed(config), ("calibration", "test"), None, [G_MAG])
    cfg, edges, logs = config["calibrate"], list(config["calibrate"]["g_mag_bins"]), ensemble.log_labels
    n_cal = len(samples["calibration"].y)
    x = np.concatenate([samples[s].x for s in ("calibration", "test")])
    y = np.concatenate([samples[s].y for s in ("calibration", "test")])
    g = np.concatenate([samples[s].extra[G_MAG] for s in ("calibration", "test")])
    both = calibration_views(ensemble, x, g, edges, config["predict"]["batch_size"])
    views = {"with XP": (both.q_xp, y[both.has_xp], both.levels_xp, both.has_xp),
             "without XP": (both.q_no_xp, y, both.levels_no_xp, np.ones(len(y), bool))}
    metrics = json.loads((results / "evaluate" / args.label_set / "metrics.json").read_text())
    rng = np.random.default_rng(0)
    print(f"{results}: {n_cal} calibration + {len(y) - n_cal} test stars, {args.draws} re-dealt splits; "
          f"coverage of [q16, q84] on the test part, target {cfg['coverage']}")
    print(f"{'view':>10} {'label':>8} {'run':>6} {'refit':>6} {'mean':>6} {'sd':>6} {'5%':>6} {'95%':>6} "
          f"{'outside ±0.03':>13} {'run pct':>7}")
    for view, (q, yv, levels, rows) in views.items():
        run_cal = np.arange(len(y))[rows] < n_cal  # the run's own deal, in this view's rows
        draws = []
        for _ in range(args.draws):
            cal = np.zeros(len(yv), dtype=bool)
            cal[rng.choice(len(yv), int(run_cal.sum()), replace=False)] = True
            draws.append(calibrate_and_score(q, yv, levels, cal, ~cal, names, cfg, logs))
        draws = np.array(draws)
        # the run's own deal refitted here: must repeat the run's figure, or this probe is not
        # calibrating as `msa calibrate` does
        own = calibrate_and_score(q, yv, levels, run_cal, ~run_cal, names, cfg, logs)
        key = "model" if view == "with XP" else "model_no_xp"
        for j, name in enumerate(names):
            run = metrics[key][name]["overall"]["coverage"]
            d = draws[:, j]
            outside = np.mean(np.abs(d - cfg["coverage"]) > TOLERANCE)
            print(f"{view:>10} {name:>8} {run:6.3f} {own[j]:6.3f} {d.mean():6.3f} {d.std():6.3f} "
                  f"{np.quantile(d, 0.05):6.3f} {np.quantile(d, 0.95):6.3f} {outside:13.0%} {np.mean(d < run):7.0%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
