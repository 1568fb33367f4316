"""Evaluation of a label set's calibrated ensemble on the TEST split: ``msa evaluate``.

Per label: RMSE, MAE, NMAD (1.4826 · median |Δ − median Δ|), median bias (median Δ) with
Δ = predicted median − true value, and the coverage of [q16, q84] before and after the conformal
calibration, overall and in bins of true [Fe/H] (``evaluate.fe_h_bins`` edges) and of Gaia G
(``evaluate.g_mag_bins`` edges). The same with every XP coefficient hidden (photometry only).
Yardsticks scored on the same test stars, each trained on the same train split with the same
inputs (and, where they stop early, the same validation split), with XP and photometry only:

* ``baseline``: gradient-boosted trees, their number of trees chosen on the validation split
  (:mod:`msa.evaluation.baselines`);
* ``baseline_mlp``: an ensemble of as many plain supervised MLPs as the model has members, tuned on
  the validation split (:mod:`msa.evaluation.baseline_mlp`), so that the model's gain from
  ensembling is not counted as the architecture's; ``baseline_mlp_single``: its first network alone
  (``baseline_mlp_seeds``, ``baseline_mlp_settings``: the networks' seeds and the grid's choice;
  ``baseline_trees``: the trees' count per label);
* ``from_scratch``: this model's architecture and fine-tuning from a randomly initialised encoder
  (members from ``msa finetune --from-scratch``, given with ``--scratch-members``), so the gain of
  pretraining is measured, not assumed. A parallax label is always scored from
the ensemble's masked pass (the Gaia parallax input hidden), which :mod:`msa.calibration.ensemble` applies.

Beside the mixture, each of its members alone (``model_members``, a list in member order, and
``model_member_mean``, the mean over members of each metric; each also ``*_no_xp``; point metrics
of the member's own median and its uncalibrated coverage): how much of the model's figure is the
mixture's. (``members`` holds the member files.)

Each star is calibrated with the offsets of its own conditional group (:mod:`msa.calibration.calibrate`).
``metrics.json``'s ``by_g_mag`` section gives, per label and ``evaluate.coverage_g_bins`` bin up
to G = 21, the count, calibrated coverage and NMAD, with XP and with XP hidden, for the test
stars and (when the calibration used faint copies) for faint copies of the test stars degraded
with the calibration's own error-versus-G relation: the only measure there is where no labelled
star is that faint. Its ``by_basis`` part splits the test stars by their ``interval_basis`` (which
stars their group's offsets were fitted on: :mod:`msa.calibration.basis`): per view, basis, label
and G bin, with XP the test stars that have XP, without XP every test star with its XP hidden.

Writes ``metrics.json`` and figures (predicted vs true, residuals vs G, coverage per label with
XP on and off, coverage versus G, and coverage versus G by interval basis) into ``--out-dir`` and
prints a model-vs-baseline table.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Mapping, NamedTuple, Sequence

import numpy as np

from msa.calibration import (BASES, apply_calibration, interval_basis, interval_coverage, load_calibration,
                             star_groups)
from msa.config import load_config
from msa.data.labels import LabelSource, label_set, load_split_samples
from msa.data.splits import split_seed
from msa.data.store import atomic_path
from msa.evaluation.baseline_mlp import PlainMLPEnsemble
from msa.evaluation.baselines import GradientBoostingBaseline
from msa.nn.robust_stats import nmad
from msa.nn.training import add_device_argument, resolve_device

log = logging.getLogger(__name__)

G_MAG = "phot_g_mean_mag"
# metrics.json sections, each also *_no_xp; the single MLP too, so "best yardstick" is never the weaker one
YARDSTICKS = ("baseline", "baseline_mlp", "baseline_mlp_single", "from_scratch")
COLUMN_NAMES = {"model": "NMAD", "baseline": "trees", "baseline_mlp": "MLPens", "baseline_mlp_single": "MLP1",
                "from_scratch": "scratch", "model_member_mean": "members"}


def _float(v) -> float | None:
    return float(v) if v is not None and np.isfinite(v) else None


def point_metrics(pred: np.ndarray, true: np.ndarray) -> dict:
    """RMSE, MAE, NMAD, median bias and count of ``pred − true`` over finite pairs (1-D arrays)."""
    ok = np.isfinite(pred) & np.isfinite(true)
    d = np.asarray(pred, dtype=np.float64)[ok] - np.asarray(true, dtype=np.float64)[ok]
    if not len(d):
        return {"n": 0, "rmse": None, "mae": None, "nmad": None, "bias": None}
    med = np.median(d)
    return {"n": int(len(d)), "rmse": _float(np.sqrt(np.mean(d ** 2))), "mae": _float(np.mean(np.abs(d))),
            "nmad": _float(nmad(d)), "bias": _float(med)}


def quantile_metrics(q: np.ndarray, q_calibrated: np.ndarray, true: np.ndarray) -> dict:
    """Point metrics of the median plus coverage before/after calibration, for ``(n, 3)`` quantiles."""
    out = point_metrics(q[:, 1], true)
    before, _ = interval_coverage(q[:, None, :], true[:, None])
    after, _ = interval_coverage(q_calibrated[:, None, :], true[:, None])
    out["coverage_before"] = _float(before[0])
    out["coverage"] = _float(after[0])
    return out


def bin_masks(values: np.ndarray, edges: Sequence[float], name: str) -> dict[str, np.ndarray]:
    """Masks of ``values`` below the first edge, between consecutive edges, and from the last edge up."""
    edges = list(edges)
    if not edges:
        return {}
    out = {f"{name}<{edges[0]:g}": values < edges[0]}
    for lo, hi in zip(edges[:-1], edges[1:]):
        out[f"{lo:g}<={name}<{hi:g}"] = (values >= lo) & (values < hi)
    out[f"{name}>={edges[-1]:g}"] = values >= edges[-1]
    return out


def label_report(q: np.ndarray, q_cal: np.ndarray, y: np.ndarray, labels: Sequence[str],
                 bins: Mapping[str, Mapping[str, np.ndarray]]) -> dict:
    """Per label: ``overall`` and, for each binning, per-bin :func:`quantile_metrics`."""
    report = {}
    for j, name in enumerate(labels):
        entry = {"overall": quantile_metrics(q[:, j], q_cal[:, j], y[:, j])}
        for binning, masks in bins.items():
            entry[binning] = {b: quantile_metrics(q[m, j], q_cal[m, j], y[m, j]) for b, m in masks.items()}
        report[name] = entry
    return report


def baseline_report(pred: np.ndarray, y: np.ndarray, labels: Sequence[str]) -> dict:
    return {name: {"overall": point_metrics(pred[:, j], y[:, j])} for j, name in enumerate(labels)}


def comparison_table(metrics: dict) -> str:
    """Plain-text model vs yardsticks table (NMAD, RMSE, bias, coverage; XP on/off). ``MLPens`` is the
    MLP ensemble, ``MLP1`` its first network alone, ``members`` the mean NMAD of the model's members."""
    sections = ("model", *YARDSTICKS, "model_member_mean")
    columns = [COLUMN_NAMES[s] for s in sections] + \
        ["noXP" if s == "model" else COLUMN_NAMES[s] + "NoXP" for s in sections]
    header = (f"{'label':>10} {'n':>5} | " + " ".join(f"{c:>9}" for c in columns[:len(sections)]) + " | "
              + " ".join(f"{c:>11}" for c in columns[len(sections):]) + " | "
              f"{'RMSE':>9} | {'bias':>9} | {'cov0':>5} {'cov':>5} {'covNoXP':>7}")
    lines = [header, "-" * len(header)]

    def g(section, name, key):
        v = (metrics.get(section) or {}).get(name, {}).get("overall", {}).get(key)
        return "—" if v is None else f"{v:.4g}"

    for name in metrics["labels"]:
        nmads = " | ".join(" ".join(f"{g(sec + suffix, name, 'nmad'):>{width}}" for sec in sections)
                           for suffix, width in (("", 9), ("_no_xp", 11)))
        lines.append(
            f"{name:>10} {g('model', name, 'n'):>5} | {nmads} | {g('model', name, 'rmse'):>9} | "
            f"{g('model', name, 'bias'):>9} | "
            f"{g('model', name, 'coverage_before'):>5} {g('model', name, 'coverage'):>5} "
            f"{g('model_no_xp', name, 'coverage'):>7}")
    return "\n".join(lines)


# --- command line -------------------------------------------------------------------------------------
def add_arguments(parser) -> None:
    parser.add_argument("--config", required=True, help="pipeline config (YAML)")
    parser.add_argument("--label-set", required=True, help="name in the config's label_sets")
    parser.add_argument("--members", nargs="+", required=True, help="fine-tuned member model.pt files")
    parser.add_argument("--calibration", required=True, help="calibration JSON from `msa calibrate`")
    parser.add_argument("--shards", nargs="+", required=True, help="shard store files holding the labelled stars")
    parser.add_argument("--out-dir", required=True, help="folder for metrics.json and the figures")
    parser.add_argument("--scratch-members", nargs="*", default=[],
                        help="members of `msa finetune --from-scratch` (the no-pretraining yardstick)")
    parser.add_argument("--probe", default=None,
                        help="`msa probe` JSON of the pretrained model: its table goes into metrics.json")
    add_device_argument(parser)


def evaluate(config: dict, label_set_name: str, members: Sequence[str | Path], calibration_path: str | Path,
             shards: Sequence[str | Path], out_dir: str | Path, device: str = "auto",
             scratch_members: Sequence[str | Path] = (), probe: str | Path | None = None) -> dict:
    """Score the ensemble and the yardsticks on the test split; write metrics.json + figures."""

    from msa.calibration import Ensemble
    from msa.evaluation.plots import (plot_coverage, plot_coverage_vs_g, plot_coverage_vs_g_by_basis,
                                      plot_predicted_vs_true, plot_residuals_vs_g)

    names = label_set(config, label_set_name)
    ensemble = Ensemble.load(members, device=resolve_device(device))
    if ensemble.labels != names:
        raise ValueError(f"members predict {ensemble.labels}, label set {label_set_name!r} is {names}; "
                         "pass the members fine-tuned for this label set")
    calibration = load_calibration(calibration_path, ensemble)  # made for these members, or refused
    ecfg = config["evaluate"]
    # faint copies of the test stars are made from their raw store columns
    raw_columns = [G_MAG, *(ensemble.transform.store_columns if calibration.get("emulation") else [])]
    # bounded seeded samples: a label set of every star of the sky must not be read whole
    samples = load_split_samples(shards, ensemble.transform, LabelSource(config["labels"], names), config["splits"],
                                 split_seed(config), ("train", "validation", "test"), ecfg["max_rows"],
                                 list(dict.fromkeys(raw_columns)))
    test, train = samples["test"], samples["train"]
    if len(test) == 0:
        raise ValueError("the test split holds no labelled star; raise splits.test")
    batch = config["predict"]["batch_size"]
    xp_hidden = np.zeros(ensemble.layout.n_features, dtype=bool)
    xp_hidden[ensemble.layout.xp_indices] = True

    views = calibrated_views(ensemble, calibration, test, xp_hidden, batch)
    q, q_cal, q_noxp, q_noxp_cal = views.q, views.q_cal, views.q_noxp, views.q_noxp_cal

    bins = {"g_mag_bins": bin_masks(test.extra[G_MAG], ecfg["g_mag_bins"], "G")}
    fe_h = ecfg["fe_h_label"]
    if fe_h in names:
        fe_h_true = test.y[:, names.index(fe_h)]
    elif fe_h in ((config["labels"].get("columns")) or {}):
        fe_h_true = LabelSource(config["labels"], [fe_h]).lookup(test.source_id)[0][:, 0]
    else:
        fe_h_true = None
    if fe_h_true is not None:
        bins["fe_h_bins"] = bin_masks(fe_h_true, ecfg["fe_h_bins"], fe_h)

    metrics = {"label_set": label_set_name, "labels": names, "n_test": int(len(test)),
               "n_train": int(len(train)), "members": [str(m) for m in members],
               "member_sha256": ensemble.checksums, "calibration": str(calibration_path),
               "coverage_target": calibration.get("coverage_target"),
               "model": label_report(q, q_cal, test.y, names, bins),
               "model_no_xp": label_report(q_noxp, q_noxp_cal, test.y, names, bins)}
    for suffix, hidden in (("", None), ("_no_xp", xp_hidden)):
        metrics.update(member_reports(ensemble.predict_members(test.x, extra_hidden=hidden, batch_size=batch),
                                      test.y, names, suffix))
    pred_base = None
    if ecfg["baseline"]:
        pred_base = _add_tree_baselines(metrics, ensemble, names, train, samples["validation"], test,
                                        int(config["seed"]))
    if ecfg["baseline_mlp"]:
        val = samples["validation"]
        _add_mlp_baselines(metrics, ensemble, names, train, val, test, int(config["seed"]), ecfg["mlp_grid"])
    if scratch_members:
        scratch = Ensemble.load(scratch_members, device=ensemble.device)
        if scratch.labels != names or scratch.layout.diff(ensemble.layout):
            raise ValueError(f"--scratch-members predict {scratch.labels} on another layout than the model's "
                             "members; pass the from-scratch members of this label set")
        metrics["from_scratch"] = yardstick_report(scratch.predict(test.x, batch_size=batch), test.y, names)
        metrics["from_scratch_no_xp"] = yardstick_report(
            scratch.predict(test.x, extra_hidden=xp_hidden, batch_size=batch), test.y, names)
    metrics["comparison"] = comparison(metrics, names)
    metrics["by_g_mag"] = {"bins": list(ecfg["coverage_g_bins"]),
                           "test": {"with_xp": magnitude_report(q_cal, test.y, test.extra[G_MAG], names,
                                                                ecfg["coverage_g_bins"]),
                                    "without_xp": magnitude_report(q_noxp_cal, test.y, test.extra[G_MAG], names,
                                                                   ecfg["coverage_g_bins"])},
                           "by_basis": basis_magnitude_report(ensemble, calibration, test, views, names,
                                                              ecfg["coverage_g_bins"])}
    if calibration.get("emulation"):
        metrics["by_g_mag"]["emulated"] = emulated_magnitude_report(ensemble, calibration, test, config, names,
                                                                    xp_hidden, batch)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if probe is not None:  # the representation's own measure: ridge from the frozen pretrained latent
        table = json.loads(Path(probe).read_text())
        metrics["probe"] = {"test": table["test"], "validation": table["validation"], "n_stars": table["n_stars"]}
    with atomic_path(out_dir / "metrics.json") as tmp:
        tmp.write_text(json.dumps(metrics, indent=1))
    units = (config.get("predict") or {}).get("label_units") or {}
    plot_predicted_vs_true(test.y, q_cal, names, out_dir / "predicted_vs_true.png", baseline=pred_base, units=units)
    plot_residuals_vs_g(test.y, q_cal, test.extra[G_MAG], names, out_dir / "residuals_vs_g.png", units=units)
    plot_coverage(metrics, out_dir / "coverage.png")
    plot_coverage_vs_g(metrics, out_dir / "coverage_vs_g.png")
    plot_coverage_vs_g_by_basis(metrics, out_dir / "coverage_vs_g_by_basis.png")
    table = comparison_table(metrics)
    print(table)
    log.info("wrote %s", out_dir / "metrics.json")
    return metrics


class CalibratedViews(NamedTuple):
    """Raw and calibrated quantiles ``(n, L, 3)`` of stars as they are and with XP hidden, and the
    group whose offsets each star took in each view."""

    q: np.ndarray
    q_cal: np.ndarray
    q_noxp: np.ndarray
    q_noxp_cal: np.ndarray
    groups: np.ndarray
    groups_noxp: np.ndarray


def calibrated_views(ensemble, calibration: dict, stars, xp_hidden: np.ndarray, batch: int) -> CalibratedViews:
    """Raw and calibrated quantiles of ``stars`` as they are and with every XP column hidden, each
    star calibrated with the offsets of its own group."""
    g_mag, edges = stars.extra[G_MAG], calibration.get("g_mag_bins") or []
    q = ensemble.predict(stars.x, batch_size=batch).astype(np.float64)
    groups = star_groups(calibration, ensemble.calibration_levels(stars.x, g_mag, edges))
    q_cal = apply_calibration(q, calibration, ensemble.labels, groups=groups)
    q_noxp = ensemble.predict(stars.x, extra_hidden=xp_hidden, batch_size=batch).astype(np.float64)
    groups_noxp = star_groups(calibration, ensemble.calibration_levels(stars.x, g_mag, edges, xp_hidden=True))
    q_noxp_cal = apply_calibration(q_noxp, calibration, ensemble.labels, groups=groups_noxp)
    return CalibratedViews(q, q_cal, q_noxp, q_noxp_cal, groups, groups_noxp)


def basis_magnitude_report(ensemble, calibration: dict, stars, views: CalibratedViews, names: Sequence[str],
                           edges: Sequence[float]) -> dict:
    """:func:`magnitude_report` per view and ``interval_basis`` (:data:`msa.calibration.BASES`):
    with XP the ``stars`` that have XP, seen with it; without XP every star with its XP hidden."""
    g = stars.extra[G_MAG]
    has_xp = ensemble.has_xp(stars.x)
    out = {}
    for view, rows, q_cal, groups in (("with_xp", has_xp, views.q_cal, views.groups),
                                      ("without_xp", np.ones(len(g), bool), views.q_noxp_cal, views.groups_noxp)):
        basis = interval_basis(calibration, groups[rows], g[rows])
        out[view] = {kind: magnitude_report(q_cal[rows][basis == kind], stars.y[rows][basis == kind],
                                            g[rows][basis == kind], names, edges) for kind in BASES}
    return out


def magnitude_report(q_cal: np.ndarray, y: np.ndarray, g_mag: np.ndarray, labels: Sequence[str],
                     edges: Sequence[float]) -> dict:
    """Per label and G bin (``edges``): count, calibrated [q16, q84] coverage and NMAD of the median."""
    out = {}
    for j, name in enumerate(labels):
        entry = {}
        for b, rows in bin_masks(g_mag, edges, "G").items():
            point = point_metrics(q_cal[rows, j, 1], y[rows, j])
            cov, _ = interval_coverage(q_cal[rows, j:j + 1], y[rows, j:j + 1])
            entry[b] = {"n": point["n"], "coverage": _float(cov[0]), "nmad": point["nmad"]}
        out[name] = entry
    return out


def emulated_magnitude_report(ensemble, calibration: dict, stars, config: dict, names: Sequence[str],
                              xp_hidden: np.ndarray, batch: int) -> dict:
    """:func:`magnitude_report` of faint copies of the test ``stars`` (their ``extra`` holding the raw
    store columns), degraded with the calibration's own error-versus-G relation (another seed than
    the calibration's copies)."""
    from msa.calibration import parallax_label_columns
    from msa.calibration import ErrorRelation, emulate_faint_stars

    emulation = calibration["emulation"]
    copies = emulate_faint_stars(stars, ensemble.transform, ErrorRelation.from_dict(emulation["relation"]),
                                 config["evaluate"]["coverage_g_bins"], emulation["faintest_g"],
                                 np.random.default_rng([split_seed(config), 5]), parallax_label_columns(ensemble))
    views = calibrated_views(ensemble, calibration, copies, xp_hidden, batch)
    q_cal, q_noxp_cal = views.q_cal, views.q_noxp_cal
    edges = config["evaluate"]["coverage_g_bins"]
    g = copies.extra[G_MAG]
    has_xp = ensemble.has_xp(copies.x)
    # with XP: the copies that keep a spectrum; without: every copy with its XP hidden
    return {"n_copies": int(len(copies)),
            "with_xp": magnitude_report(q_cal[has_xp], copies.y[has_xp], g[has_xp], names, edges),
            "without_xp": magnitude_report(q_noxp_cal, copies.y, g, names, edges)}


def _add_tree_baselines(metrics: dict, ensemble, names, train, val, test, seed: int) -> np.ndarray:
    """Gradient-boosted trees with and without XP, their tree counts chosen on ``val``; returns the
    with-XP predictions (for the figure)."""
    plx_hidden = parallax_hidden_columns(ensemble)
    base = GradientBoostingBaseline(names, seed=seed, label_hidden_columns=plx_hidden).fit(
        train.x, train.y, val.x, val.y)
    base_noxp = GradientBoostingBaseline(names, seed=seed, hidden_columns=ensemble.layout.xp_indices,
                                         label_hidden_columns=plx_hidden).fit(train.x, train.y, val.x, val.y)
    pred = base.predict(test.x)
    metrics["baseline"] = baseline_report(pred, test.y, names)
    metrics["baseline_no_xp"] = baseline_report(base_noxp.predict(test.x), test.y, names)
    metrics["baseline_trees"] = {"with_xp": dict(zip(names, base.n_trees)),
                                 "no_xp": dict(zip(names, base_noxp.n_trees))}
    return pred


def _add_mlp_baselines(metrics: dict, ensemble, names, train, val, test, seed: int, grid: dict) -> None:
    """The plain MLP ensemble (as many networks as the model has members) and its first network
    alone, with and without XP. One network serves every label, so a Gaia parallax input that is
    also a label is removed for all of them (the model hides it for that label only)."""
    plx = sorted({c for cols in parallax_hidden_columns(ensemble).values() for c in cols})
    for suffix, hidden in (("", plx), ("_no_xp", sorted(set(plx) | set(ensemble.layout.xp_indices.tolist())))):
        mlps = PlainMLPEnsemble(names, ensemble.n_members, seed=seed, hidden_columns=hidden, grid=grid).fit(
            train.x, train.y, val.x, val.y)
        each = mlps.predict_members(test.x)
        metrics["baseline_mlp" + suffix] = baseline_report(each.mean(axis=0), test.y, names)
        metrics["baseline_mlp_single" + suffix] = baseline_report(each[0], test.y, names)
        tag = "with_xp" if not suffix else "no_xp"
        metrics.setdefault("baseline_mlp_settings", {})[tag] = dict(mlps.chosen.__dict__)
        metrics.setdefault("baseline_mlp_seeds", {})[tag] = [m.seed for m in mlps.members]


def member_reports(q_members: np.ndarray, y: np.ndarray, labels: Sequence[str], suffix: str = "") -> dict:
    """``model_members{suffix}``: :func:`yardstick_report` of each member's quantiles ``(K, n, L, 3)``;
    ``model_member_mean{suffix}``: per label, the mean over members of each of those metrics."""
    each = [yardstick_report(q, y, labels) for q in q_members]
    mean = {}
    for name in labels:
        entries = [e[name]["overall"] for e in each]
        mean[name] = {"overall": {key: _float(np.mean([e[key] for e in entries]))
                                  if all(e[key] is not None for e in entries) else None for key in entries[0]}}
        mean[name]["overall"]["n"] = entries[0]["n"]
    return {"model_members" + suffix: each, "model_member_mean" + suffix: mean}


def yardstick_report(q: np.ndarray, y: np.ndarray, labels: Sequence[str]) -> dict:
    """Point metrics of the median and the uncalibrated [q16, q84] coverage, per label."""
    out = {}
    for j, name in enumerate(labels):
        entry = point_metrics(q[:, j, 1], y[:, j])
        entry["coverage_before"] = _float(interval_coverage(q[:, j:j + 1], y[:, j:j + 1])[0][0])
        out[name] = {"overall": entry}
    return out


def comparison(metrics: dict, names: Sequence[str]) -> dict:
    """Per label, with XP and without: the model's NMAD, each yardstick's, model / best yardstick, and
    model / the mean of its members' NMAD."""
    out = {}
    for name in names:
        entry = {}
        for suffix, tag in (("", "with_xp"), ("_no_xp", "no_xp")):
            model = (metrics.get("model" + suffix) or {}).get(name, {}).get("overall", {}).get("nmad")
            yard = {y: metrics[y + suffix][name]["overall"]["nmad"] for y in YARDSTICKS
                    if y + suffix in metrics and metrics[y + suffix][name]["overall"]["nmad"] is not None}
            best = min(yard, key=yard.get) if yard else None
            members = (metrics.get("model_member_mean" + suffix) or {}).get(name, {}).get("overall", {}).get("nmad")
            entry[tag] = {"nmad_model": model, **{f"nmad_{y}": v for y, v in yard.items()},
                          "best_yardstick": best,
                          "ratio_to_best": None if best is None or model is None or not yard[best]
                          else model / yard[best],
                          # how much of the model's figure is its mixture's, not its members'
                          "nmad_member_mean": members,
                          "ratio_to_member_mean": None if model is None or not members else model / members}
        out[name] = entry
    return out


def parallax_hidden_columns(ensemble) -> dict[str, list[int]]:
    """The baseline must not see the Gaia parallax input for the parallax label either."""
    member = ensemble.members[0]
    if member.parallax_label is None or member.parallax_feature is None:
        return {}
    return {ensemble.labels[member.parallax_label]: [int(member.parallax_feature)]}


def run(args) -> int:
    evaluate(load_config(args.config), args.label_set, args.members, args.calibration, args.shards,
             args.out_dir, args.device, args.scratch_members, args.probe)
    return 0
