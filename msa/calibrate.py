"""Split-conformal calibration of the [q16, q84] intervals (conformalised quantile regression).

On the calibration split, per label, the conformity score of a star is how far its true value lies
outside the predicted interval: ``E = max(q16 − y, y − q84)`` (negative inside). With ``n`` scored
stars and miscoverage ``α = 1 − coverage``, the offset is the ``⌈(n+1)(1−α)⌉``-th smallest score
(the finite-sample correction: the ``⌈(n+1)(1−α)⌉/n`` empirical quantile, not the plain
``1−α`` one), and the calibrated interval is ``[q16 − offset, q84 + offset]``; on exchangeable
data its coverage is at least ``coverage`` and at most ``coverage + 1/(n+1)`` in expectation.
``mode: per_side`` calibrates the two ends separately (scores ``q16 − y`` and ``y − q84`` at
``1 − α/2`` each), which keeps each tail near 16 %.

Stars with and without XP spectra get separate offsets (Mondrian conformal prediction by group):
the photometry-only intervals are calibrated on the calibration stars predicted with every XP
column hidden, so the coverage guarantee holds for each group, not only on average over both.

The offsets are in physical label units and may be negative (intervals that were too wide
shrink); :func:`apply_calibration` clips each end at the median, so q16 ≤ q50 ≤ q84 always holds.

The math is a leaf (numpy only). The ``msa calibrate`` command (``add_arguments``/``run``) imports
the ensemble and label loading inside ``run`` so that prediction can import this module alone.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Sequence

import numpy as np

from msa.errors import InputError

log = logging.getLogger(__name__)

MODES = ("symmetric", "per_side")


class CalibrationError(InputError, ValueError):
    """Too few calibration stars, or a calibration file that does not fit the predictions."""


def interval_coverage(q: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Fraction of finite ``y`` inside ``[q16, q84]`` per label, and the count used.

    ``q``: ``(n, L, 3)``; ``y``: ``(n, L)``. A label without any finite pair gets NaN coverage.
    """
    q = np.asarray(q, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    ok = np.isfinite(y) & np.all(np.isfinite(q), axis=-1)
    inside = (y >= q[..., 0]) & (y <= q[..., 2]) & ok
    n = ok.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        cov = np.where(n > 0, inside.sum(axis=0) / np.maximum(n, 1), np.nan)
    return cov, n


def conformal_quantile(scores: np.ndarray, level: float) -> float:
    """The ``⌈(n+1)·level⌉``-th smallest of ``scores``: the finite-sample conformal quantile."""
    scores = np.sort(np.asarray(scores, dtype=np.float64))
    n = len(scores)
    k = math.ceil((n + 1) * level)
    if k > n:
        need = math.ceil(level / (1 - level))
        raise CalibrationError(f"{n} calibration star(s) are too few for a {level:.3g} conformal quantile; "
                               f"need at least {need}: enlarge splits.calibration")
    return float(scores[k - 1])


def conformal_offsets(q: np.ndarray, y: np.ndarray, coverage: float, mode: str = "symmetric"
                      ) -> tuple[float, float, int]:
    """Lower and upper offsets (physical units) and the number of stars, for one label.

    ``q``: ``(n, 3)`` uncalibrated quantiles, ``y``: ``(n,)`` true values; NaN rows are ignored.
    """
    if mode not in MODES:
        raise CalibrationError(f"calibrate.mode: {mode!r} is not one of {list(MODES)}")
    q = np.asarray(q, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    ok = np.isfinite(y) & np.all(np.isfinite(q), axis=1)
    q, y = q[ok], y[ok]
    below, above = q[:, 0] - y, y - q[:, 2]
    if mode == "symmetric":
        offset = conformal_quantile(np.maximum(below, above), coverage)
        return offset, offset, int(ok.sum())
    level = 1 - (1 - coverage) / 2
    return conformal_quantile(below, level), conformal_quantile(above, level), int(ok.sum())


def fit_calibration(q: np.ndarray, y: np.ndarray, labels: Sequence[str], coverage: float = 0.68,
                    mode: str = "symmetric") -> dict:
    """Calibration dict (JSON-ready) from calibration-split quantiles ``(n, L, 3)`` and labels ``(n, L)``."""
    q = np.asarray(q, dtype=np.float64)
    if q.ndim != 3 or q.shape[1] != len(labels) or q.shape[2] != 3:
        raise CalibrationError(f"quantiles of shape {q.shape} do not fit {len(labels)} labels × 3")
    per_label = {}
    for j, name in enumerate(labels):
        try:
            lo, hi, n = conformal_offsets(q[:, j], y[:, j], coverage, mode)
        except CalibrationError as err:
            raise CalibrationError(f"label {name!r}: {err}") from None
        per_label[name] = {"offset_lower": lo, "offset_upper": hi, "n_calibration": n}
    return {"coverage_target": coverage, "mode": mode, "labels": list(labels), "per_label": per_label}


def apply_calibration(q: np.ndarray, calibration: dict, labels: Sequence[str] | None = None,
                      has_xp: np.ndarray | None = None) -> np.ndarray:
    """Calibrated quantiles ``(n, L, 3)``: q16 − offset_lower, q84 + offset_upper, clipped at q50.

    ``labels`` names the label axis of ``q`` (default: the calibration's own label order); every
    one must have an entry in the calibration. ``has_xp`` (bool, ``(n,)``) selects the offsets of
    the stars' group; None treats every star as having XP.
    """
    labels = list(calibration["labels"] if labels is None else labels)
    q = np.array(q, dtype=np.float64 if np.asarray(q).dtype == np.float64 else np.float32, copy=True)
    if q.ndim != 3 or q.shape[1] != len(labels) or q.shape[2] != 3:
        raise CalibrationError(f"quantiles of shape {q.shape} do not fit labels {labels} × 3")
    missing = [n for n in labels if n not in calibration["per_label"]]
    if missing:
        raise CalibrationError(f"calibration has no entry for label(s) {missing}; it was made for "
                               f"{calibration['labels']}. Re-run `msa calibrate` for this label set")
    without_xp = calibration.get("per_label_without_xp")
    if has_xp is not None and without_xp is None and not np.all(has_xp):
        raise CalibrationError("the calibration has no offsets for stars without XP; re-run `msa calibrate`")
    no_xp = np.zeros(len(q), dtype=bool) if has_xp is None else ~np.asarray(has_xp, dtype=bool)
    for j, name in enumerate(labels):
        lower, upper = _offsets_per_row(calibration["per_label"][name], (without_xp or {}).get(name), no_xp)
        q[:, j, 0] = np.minimum(q[:, j, 0] - lower, q[:, j, 1])
        q[:, j, 2] = np.maximum(q[:, j, 2] + upper, q[:, j, 1])
    return q


def _offsets_per_row(with_xp: dict, without_xp: dict | None, no_xp: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if without_xp is None or not no_xp.any():
        return np.full(len(no_xp), with_xp["offset_lower"]), np.full(len(no_xp), with_xp["offset_upper"])
    return (np.where(no_xp, without_xp["offset_lower"], with_xp["offset_lower"]),
            np.where(no_xp, without_xp["offset_upper"], with_xp["offset_upper"]))


def load_calibration(path: str | Path) -> dict:
    try:
        calibration = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CalibrationError(f"cannot read calibration {path}: {err}") from err
    if "per_label" not in calibration or "labels" not in calibration:
        raise CalibrationError(f"{path} is not an `msa calibrate` output (no 'labels'/'per_label')")
    return calibration


def coverage_report(q: np.ndarray, y: np.ndarray, calibration: dict, has_xp: np.ndarray | None = None) -> dict:
    """Per label: coverage of [q16, q84] before and after calibration, and the count."""
    before, n = interval_coverage(q, y)
    after, _ = interval_coverage(apply_calibration(q, calibration, has_xp=has_xp), y)
    return {name: {"before": _num(before[j]), "after": _num(after[j]), "n": int(n[j])}
            for j, name in enumerate(calibration["labels"])}


def _num(v) -> float | None:
    return None if not np.isfinite(v) else float(v)


# --- command line --------------------------------------------------------------------------------
def add_arguments(parser) -> None:
    parser.add_argument("--config", required=True, help="pipeline config (YAML)")
    parser.add_argument("--label-set", required=True, help="name in the config's label_sets")
    parser.add_argument("--members", nargs="+", required=True, help="fine-tuned member model.pt files")
    parser.add_argument("--shards", nargs="+", required=True, help="shard store files holding the labelled stars")
    parser.add_argument("--out", required=True, help="calibration JSON to write")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")


def run(args) -> int:
    # stage-level imports live here: the math above stays a leaf that prediction imports alone
    from msa.config import load_config
    from msa.ensemble import Ensemble
    from msa.labels import LabelSource, label_set, load_split_samples
    from msa.splits import split_seed
    from msa.store import atomic_path, check_out_path

    import torch

    check_out_path(args.out, [args.config, *args.members, *args.shards], (".json",))
    config = load_config(args.config)
    names = label_set(config, args.label_set)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    ensemble = Ensemble.load(args.members, device=device)
    if ensemble.labels != names:
        raise CalibrationError(f"members predict {ensemble.labels}, label set {args.label_set!r} is {names}; "
                               "pass the members fine-tuned for this label set")
    cfg = config["calibrate"]
    # bounded seeded samples: a label set of every star of the sky must not be read whole
    samples = load_split_samples(args.shards, ensemble.transform, LabelSource(config["labels"], names),
                                 config["splits"], split_seed(config), ("calibration", "test"), cfg["max_rows"])
    xp_hidden = np.zeros(ensemble.layout.n_features, dtype=bool)
    xp_hidden[ensemble.layout.xp_indices] = True
    result = None
    reports = {"with_xp": {}, "without_xp": {}}
    for split in ("calibration", "test"):
        part = samples[split]
        batch = config["predict"]["batch_size"]
        q = ensemble.predict(part.x, batch_size=batch)
        # the same stars as photometry-only stars: every XP column hidden
        q_no_xp = ensemble.predict(part.x, extra_hidden=xp_hidden, batch_size=batch)
        has_xp = ensemble.has_xp(part.x)  # labelled stars without a spectrum belong to the other group
        if split == "calibration":
            result = fit_calibration(q[has_xp], part.y[has_xp], names, cfg["coverage"], cfg["mode"])
            result["per_label_without_xp"] = fit_calibration(q_no_xp, part.y, names, cfg["coverage"],
                                                             cfg["mode"])["per_label"]
        reports["with_xp"][split] = coverage_report(q[has_xp], part.y[has_xp], result)
        reports["without_xp"][split] = coverage_report(q_no_xp, part.y, result, has_xp=np.zeros(len(part), bool))
    for group, key in (("with_xp", "per_label"), ("without_xp", "per_label_without_xp")):
        for name in names:
            entry = result[key][name]
            entry["coverage"] = {split: reports[group][split][name] for split in reports[group]}
            log.info("%s, %s: offsets %+.4g / %+.4g (n=%d); coverage cal %.3f→%.3f, test %.3f→%.3f", name,
                     group, entry["offset_lower"], entry["offset_upper"], entry["n_calibration"],
                     *(reports[group][s][name][k] or np.nan for s in ("calibration", "test")
                       for k in ("before", "after")))
    result.update(label_set=args.label_set, members=[str(p) for p in args.members],
                  member_sha256=ensemble.checksums)
    with atomic_path(args.out) as tmp:
        tmp.write_text(json.dumps(result, indent=1))
    log.info("wrote %s", args.out)
    return 0
