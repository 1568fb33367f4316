"""Coverage of [q16, q84] per G bin on a faint sky the model never saw labels for.

Run from the repository root (tens of minutes on 2 CPU cores at the default scale)::

    python benchmarks/bench_faint_coverage.py [--n-stars 60000] [--label-g-max 15] [--work DIR]

With the ``msa`` command line only: a synthetic sky (``msa synthesize``, seed ``--seed-train``)
is ingested, pretrained on all its stars, fine-tuned and calibrated with labels of its stars
with G < ``--label-g-max`` only (the real surveys' situation); a second sky of another seed
(``--seed-predict``), every star labelled with its truth, is then scored by ``msa evaluate``
(all its stars in the test split). Printed: per label and G bin, calibrated coverage with XP
and with XP hidden, and the count; ``--legacy`` runs a tree without the per-G calibration
(reads ``model``/``model_no_xp`` ``g_mag_bins`` instead of ``by_g_mag``).

With ``--survey-fraction F`` (issue 28; default 0.1) a faint survey of that fraction of the train
sky's stars at ``--survey-g`` (15 ≤ G < 18) is written (``msa.data.synthetic.write_faint_survey``)
and named in ``calibrate.surveys``: calibration only. A second table then scores every star of
the predict sky by its ``interval_basis``: per label, G bin and view, count and coverage of the
stars whose offsets are ``labelled``/``survey``, ``emulated`` and ``extrapolated``, and the
issue's targets (coverage of labelled+survey stars within 0.68 ± 0.05 in every G bin 10–18 with
≥ 100 of them, those stars ≥ 80 % of the stars at G < 18, none at G ≥ 18). ``--survey-fraction 0``
runs without a survey (copies only: the "before" figures).

A third table scores the ``low_support`` flag (issue 28, item 3). A star is *rare* when its true
(Teff, log g) cell (250 K × 0.25 dex) holds under 0.1 % of the labelled + survey stars (the labels
brighter than ``--label-g-max`` and the survey); the flag's *hit rate* is the share of rare stars
it flags, its *false-flag rate* the share of the other stars it flags (targets: ≥ 80 % and
≤ 15 %). Printed for a range of thresholds on the train sky (every star, labelled or not: where
``calibrate.support.low_threshold`` is tuned, to the largest threshold of the range whose false-flag
rate there is ≤ 15 %, per view) and on the predict sky (where it is scored), in each view.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from msa.config import apply_overrides

EDGES = [10.0, 11.0, 12.0, 13.0, 14.0, 15.0, 16.0, 17.0, 18.0, 19.0, 20.0, 21.0]
LABEL_SET = "spectro"
TARGET, TOLERANCE = 0.68, 0.05
TARGET_BINS = {f"{lo:g}<=G<{lo + 1:g}" for lo in range(10, 20)}
CELL = (250.0, 0.25)  # (Teff K, log g dex): the cell of the (Teff, log g) plane
RARE_SHARE = 0.001  # a cell holding under 0.1 % of the labelled + survey stars is rare
HIT_TARGET, FALSE_TARGET = 0.80, 0.15
THRESHOLDS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.15, 0.2)


def msa(*args: str, log: Path) -> None:
    with open(log, "a") as out:
        res = subprocess.run([sys.executable, "-m", "msa.cli", *args], stdout=out, stderr=subprocess.STDOUT)
    if res.returncode:
        raise SystemExit(f"msa {args[0]} failed; see {log}")


def sky(work: Path, name: str, n_stars: int, seed: int, n_shards: int, log: Path) -> tuple[Path, dict]:
    out = work / name
    cfg_path = work / f"{name}.yaml"
    if not cfg_path.exists():
        msa("synthesize", "--out", str(out), "--n-stars", str(n_stars), "--seed", str(seed), "--n-shards",
            str(n_shards), "--write-config", str(cfg_path), "--results", str(work / f"results-{name}"), log=log)
    return out, yaml.safe_load(cfg_path.read_text())


def labels_brighter_than(sky_dir: Path, g_max: float) -> Path:
    """The sky's labels.csv restricted to stars with G < g_max (their G from the GaiaSource files)."""
    out = sky_dir / f"labels_g_lt_{g_max:g}.csv"
    if not out.exists():
        g = pd.concat([pd.read_csv(p, usecols=["source_id", "phot_g_mean_mag"])
                       for p in sorted(sky_dir.glob("GaiaSource_*.csv.gz"))])
        labels = pd.read_csv(sky_dir / "labels.csv")
        bright = set(g.loc[g["phot_g_mean_mag"] < g_max, "source_id"])
        labels[labels["source_id"].isin(bright)].to_csv(out, index=False)
    return out


def settings(cfg: dict, legacy: bool, epochs: int, overrides: list[str]) -> dict:
    cfg["label_sets"] = {LABEL_SET: ["teff", "logg", "fe_h", "alpha_m"]}
    cfg = apply_overrides(cfg, overrides)  # section.key=YAML, e.g. finetune.epochs=8
    cfg["pretrain"].update(epochs=epochs, epochs_per_job=epochs)
    cfg["finetune"].update(epochs=max(2 * epochs, 4), patience=4)
    cfg["evaluate"] = {"baseline": False, "baseline_mlp": False, "from_scratch": False, "g_mag_bins": EDGES}
    if not legacy:
        cfg["evaluate"]["coverage_g_bins"] = EDGES
    return cfg


def ingest(cfg_path: Path, sky_dir: Path, store: Path, log: Path) -> list[Path]:
    shards = []
    for xp in sorted(sky_dir.glob("XpContinuousMeanSpectrum_*.csv.gz")):
        name = xp.name.split("_", 1)[1].split(".")[0]
        out = store / f"{name}.h5"
        if not out.exists():
            msa("ingest", "--config", str(cfg_path), "--shard", name, "--out", str(out), log=log)
        shards.append(out)
    return shards


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", type=Path, default=Path("bench-faint-coverage"))
    p.add_argument("--n-stars", type=int, default=60000)
    p.add_argument("--n-shards", type=int, default=2)
    p.add_argument("--label-g-max", type=float, default=15.0)
    p.add_argument("--seed-train", type=int, default=1)
    p.add_argument("--seed-predict", type=int, default=2)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--set", action="append", default=[], metavar="KEY=YAML",
                   help="override a setting of both skies' configs (calibration settings only: the "
                        "cached stages are not re-run when their settings change)")
    p.add_argument("--legacy", action="store_true", help="the tree predates by_g_mag (before/after runs)")
    p.add_argument("--survey-fraction", type=float, default=0.1,
                   help="fraction of the train sky's stars in --survey-g in the faint calibration survey (0: none)")
    p.add_argument("--survey-g", type=float, nargs=2, default=[15.0, 18.0], metavar=("G_MIN", "G_MAX"))
    args = p.parse_args()
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    log = work / "msa.log"

    train_dir, train_cfg = sky(work, "train-sky", args.n_stars, args.seed_train, args.n_shards, log)
    train_cfg = settings(train_cfg, args.legacy, args.epochs, args.set)
    train_cfg["labels"]["catalogue"] = str(labels_brighter_than(train_dir, args.label_g_max))
    train_cfg["splits"] = {"train": 0.6, "validation": 0.1, "calibration": 0.25, "test": 0.05}
    if args.survey_fraction > 0:
        from msa.data.synthetic import survey_config, write_faint_survey

        survey = write_faint_survey(train_dir, args.survey_fraction, *args.survey_g, seed=args.seed_train)
        train_cfg.setdefault("calibrate", {})["surveys"] = survey_config(survey)
    train_cfg_path = work / "train.yaml"
    train_cfg_path.write_text(yaml.safe_dump(train_cfg, sort_keys=False))
    results = work / "results-train"
    results.mkdir(exist_ok=True)
    shards = ingest(train_cfg_path, train_dir, results / "store", log)
    scaler = results / "scaler.json"
    if not scaler.exists():
        msa("fit-scaler", "--config", str(train_cfg_path), "--shards", *map(str, shards), "--out", str(scaler),
            log=log)
    pretrained = results / "pretrain" / "segment-0.pt"
    if not pretrained.exists():
        msa("pretrain", "--config", str(train_cfg_path), "--shards", *map(str, shards), "--scaler", str(scaler),
            "--out-dir", str(results / "pretrain"), "--segment", "0", log=log)
    members = []
    for k in range(train_cfg["finetune"]["members"]):
        member = results / "finetune" / f"member-{k}"
        if not (member / "model.pt").exists():
            msa("finetune", "--config", str(train_cfg_path), "--label-set", LABEL_SET, "--member", str(k),
                "--pretrained", str(pretrained), "--shards", *map(str, shards), "--scaler", str(scaler),
                "--out-dir", str(member), log=log)
        members.append(str(member / "model.pt"))
    calibration = results / "calibration.json"
    msa("calibrate", "--config", str(train_cfg_path), "--label-set", LABEL_SET, "--members", *members,
        "--shards", *map(str, shards), "--out", str(calibration), log=log)

    predict_dir, predict_cfg = sky(work, "predict-sky", args.n_stars, args.seed_predict, args.n_shards, log)
    predict_cfg = settings(predict_cfg, args.legacy, args.epochs, args.set)
    predict_cfg["splits"] = {"train": 0.0, "validation": 0.0, "calibration": 0.0, "test": 1.0}
    predict_cfg_path = work / "predict.yaml"
    predict_cfg_path.write_text(yaml.safe_dump(predict_cfg, sort_keys=False))
    predict_shards = ingest(predict_cfg_path, predict_dir, work / "results-predict" / "store", log)
    out_dir = work / "evaluate"
    msa("evaluate", "--config", str(predict_cfg_path), "--label-set", LABEL_SET, "--members", *members,
        "--calibration", str(calibration), "--shards", *map(str, predict_shards), "--out-dir", str(out_dir), log=log)
    print_table(json.loads((out_dir / "metrics.json").read_text()), args.legacy)
    if not args.legacy:
        print_basis_table(coverage_by_basis(json.loads((out_dir / "metrics.json").read_text())))
        reference = [train_cfg["labels"]["catalogue"]]
        if args.survey_fraction > 0:
            reference.append(train_cfg["calibrate"]["surveys"]["faint"]["catalogue"])
        rare = RareCells(pd.concat([pd.read_csv(path, usecols=["teff", "logg"]) for path in reference]))
        full_train_cfg = dict(train_cfg, labels=dict(train_cfg["labels"], catalogue=str(train_dir / "labels.csv")))
        tables = {name: support_rates(cfg, members, calibration, sky_shards, rare)
                  for name, cfg, sky_shards in (("train sky (tuning)", full_train_cfg, shards),
                                                ("predict sky (scored)", predict_cfg, predict_shards))}
        configured = json.loads(calibration.read_text())["support_index"]["low_threshold"]
        for name, table in tables.items():
            print_support_table(name, table, configured)
        tuned = tables["train sky (tuning)"]
        tuned = tuned[tuned["false_flag"] <= FALSE_TARGET].groupby("view")["threshold"].max()
        print("tuned on the train sky (largest threshold with false-flag rate <= "
              f"{FALSE_TARGET:.0%}): " + ", ".join(f"{v}: {t:g}" for v, t in tuned.items()))


def coverage_by_basis(metrics: dict) -> pd.DataFrame:
    """One row per (label, view, G bin, basis) of the predict sky's stars: count and calibrated
    coverage, from ``msa evaluate``'s ``by_g_mag.by_basis`` (with XP: the stars that have XP),
    ``labelled`` and ``survey`` merged."""
    rows = []
    for view, by_kind in metrics["by_g_mag"]["by_basis"].items():
        for name in metrics["labels"]:
            for b, g_bin in enumerate(by_kind["labelled"][name]):
                cells = {kind: by_kind[kind][name][g_bin] for kind in by_kind}
                n_bin = sum(c["n"] for c in cells.values())
                merged = {"labelled+survey": [cells["labelled"], cells["survey"]],
                          "emulated": [cells["emulated"]], "extrapolated": [cells["extrapolated"]]}
                for kind, parts in merged.items():
                    n = sum(c["n"] for c in parts)
                    inside = sum(c["n"] * c["coverage"] for c in parts if c["n"])
                    rows.append({"label": name, "view": view, "g_bin": g_bin, "g_lo": bin_lower_edge(g_bin),
                                 "basis": kind, "n": n, "n_bin": n_bin,
                                 "coverage": inside / n if n else float("nan")})
    return pd.DataFrame(rows)


def bin_lower_edge(g_bin: str) -> float:
    """The lower G edge of a bin name of ``bin_masks`` ('12<=G<13', 'G<10' → -inf, 'G>=21')."""
    if g_bin.startswith("G<"):
        return float("-inf")
    return float(g_bin.split("<=")[0]) if "<=" in g_bin else float(g_bin.split(">=")[1])


class RareCells:
    """Which stars' true (Teff, log g) cell holds under ``RARE_SHARE`` of the reference stars."""

    def __init__(self, reference: pd.DataFrame):
        keys = self.cells(reference["teff"].to_numpy(), reference["logg"].to_numpy())
        keys = keys[keys >= 0]
        cells, counts = np.unique(keys, return_counts=True)
        self.share = dict(zip(cells.tolist(), (counts / max(1, len(keys))).tolist()))

    @staticmethod
    def cells(teff: np.ndarray, logg: np.ndarray) -> np.ndarray:
        """One integer key per star (−1 where a label is missing)."""
        ok = np.isfinite(teff) & np.isfinite(logg)
        i = np.floor(np.where(ok, teff, 0) / CELL[0]).astype(np.int64)
        j = np.floor(np.where(ok, logg, 0) / CELL[1]).astype(np.int64)
        return np.where(ok, i * 1000 + (j + 500), -1)

    def __call__(self, teff: np.ndarray, logg: np.ndarray) -> np.ndarray:
        keys = self.cells(teff, logg)
        share = np.array([self.share.get(k, 0.0) for k in keys.tolist()])
        return (keys >= 0) & (share < RARE_SHARE)


def support_rates(cfg: dict, members: list[str], calibration: Path, shards: list[Path],
                  rare: RareCells) -> pd.DataFrame:
    """One row per (view, threshold): the flag's hit and false-flag rates on a sky's stars with
    true labels, each star's support computed as ``msa predict`` does (first member's latent,
    against the index view of its own view), with XP (its stars with XP) and with XP hidden (all)."""
    from msa.calibration import Ensemble
    from msa.calibration.support import SupportIndex, first_member_latent, support_index_path
    from msa.data.labels import LabelSource, load_labelled

    ensemble = Ensemble.load(members)
    index = SupportIndex.load(support_index_path(calibration), ensemble.checksums)
    stars = load_labelled(shards, ensemble.transform, LabelSource(cfg["labels"], ensemble.labels), [])
    is_rare = rare(stars.y[:, ensemble.labels.index("teff")], stars.y[:, ensemble.labels.index("logg")])
    xp_hidden = np.zeros(ensemble.layout.n_features, dtype=bool)
    xp_hidden[ensemble.layout.xp_indices] = True
    has_xp = ensemble.has_xp(stars.x)
    batch = cfg["predict"]["batch_size"]
    rows = []
    for view, keep, hidden in (("with_xp", has_xp, None), ("without_xp", np.ones(len(has_xp), bool), xp_hidden)):
        latent = first_member_latent(ensemble, stars.x[keep], hidden, batch)
        support = index.support(latent, np.full(len(latent), view == "with_xp"), ensemble.device)
        r = is_rare[keep]
        for threshold in THRESHOLDS:
            flag = support < threshold
            rows.append({"view": view, "threshold": threshold, "n_rare": int(r.sum()), "n_other": int((~r).sum()),
                         "hit": float(flag[r].mean()) if r.any() else float("nan"),
                         "false_flag": float(flag[~r].mean()) if (~r).any() else float("nan")})
    return pd.DataFrame(rows)


def print_support_table(name: str, table: pd.DataFrame, configured: float) -> None:
    print(f"\nlow_support on the {name}: hit rate (rare stars flagged; target >= {HIT_TARGET:.0%}) and "
          f"false-flag rate (others flagged; target <= {FALSE_TARGET:.0%}); * = the calibration's low_threshold")
    print(f"{'view':>10} {'threshold':>9} {'n rare':>7} {'n other':>8} {'hit':>6} {'false':>6}")
    for r in table.itertuples():
        mark = "*" if np.isclose(r.threshold, configured["xp" if r.view == "with_xp" else "no_xp"]) else " "
        print(f"{r.view:>10} {r.threshold:>8g}{mark} {r.n_rare:>7} {r.n_other:>8} {r.hit:>6.3f} {r.false_flag:>6.3f}")


def print_basis_table(table: pd.DataFrame) -> None:
    print("\ncoverage by interval_basis (n, coverage); LS = labelled+survey, EM = emulated, EX = extrapolated")
    cell = {(r.label, r.g_bin, r.view, r.basis): (r.n, r.coverage) for r in table.itertuples()}
    views, kinds = ("with_xp", "without_xp"), ("labelled+survey", "emulated", "extrapolated")
    print(f"{'label':>8} {'G bin':>12} | " + " | ".join(f"{v[:7]:>10} {k[:2].upper():>2} {'n':>5} {'cov':>5}"
                                                          for v in views for k in kinds))
    for label, g_bin in dict.fromkeys(zip(table["label"], table["g_bin"])):
        cells = []
        for v in views:
            for k in kinds:
                n, cov = cell[(label, g_bin, v, k)]
                cells.append(f"{'':>13} {n:>5} {'—' if n == 0 else f'{cov:.3f}':>5}")
        print(f"{label:>8} {g_bin:>12} | " + " | ".join(cells))
    ls = table[table["basis"] == "labelled+survey"]
    target = ls[(ls["g_lo"] >= 10) & (ls["g_lo"] < 18) & (ls["n"] >= 100)]
    outside = target[(target["coverage"] - TARGET).abs() > TOLERANCE]
    bright = table[(table["g_lo"] >= 10) & (table["g_lo"] < 18)]
    share = bright.loc[bright["basis"] == "labelled+survey", "n"].sum() / max(1, bright["n"].sum())
    faint_ls = int(ls.loc[ls["g_lo"] >= 18, "n"].sum())
    print(f"labelled+survey cells (10 <= G < 18, n >= 100) outside {TARGET} ± {TOLERANCE}: {len(outside)} of "
          f"{len(target)}; their share of the stars at 10 <= G < 18: {share:.3f}; at G >= 18: {faint_ls} star-cells")


def print_table(metrics: dict, legacy: bool) -> None:
    views = ((("model", "g_mag_bins"), ("model_no_xp", "g_mag_bins")) if legacy else
             (("by_g_mag", "test", "with_xp"), ("by_g_mag", "test", "without_xp")))
    print(f"{'label':>8} {'G bin':>12} | {'n XP':>6} {'cov XP':>7} | {'n noXP':>6} {'cov noXP':>8}")
    scored = outside = 0
    for name in metrics["labels"]:
        tables = []
        for view in views:
            node = metrics
            for key in view[:-1] if legacy else view:
                node = node[key]
            tables.append(node[name][view[-1]] if legacy else node[name])
        for b in tables[0]:
            cells = []
            for t in tables:
                e = t[b]
                cells.append((e["n"], "—" if e["coverage"] is None else f"{e['coverage']:.3f}"))
                if b in TARGET_BINS and e["coverage"] is not None:
                    scored += 1
                    outside += abs(e["coverage"] - TARGET) > TOLERANCE
            print(f"{name:>8} {b:>12} | {cells[0][0]:>6} {cells[0][1]:>7} | {cells[1][0]:>6} {cells[1][1]:>8}")

    print(f"cells outside {TARGET} ± {TOLERANCE} for 10 <= G < 20 (the issue's range): {outside} of {scored}")


if __name__ == "__main__":
    main()
