"""Split-conformal calibration of the [q16, q84] intervals (conformalised quantile regression).

On the calibration split, per label, the conformity score of a star is how far its true value lies
outside the predicted interval: ``E = max(q16 − y, y − q84)`` (negative inside). With ``n`` scored
stars and miscoverage ``α = 1 − coverage``, the offset is the ``⌈(n+1)(1−α)⌉``-th smallest score
(the finite-sample correction: the ``⌈(n+1)(1−α)⌉/n`` empirical quantile, not the plain
``1−α`` one), and the calibrated interval is ``[q16 − offset, q84 + offset]``; on exchangeable
data its coverage is at least ``coverage`` and at most ``coverage + 1/(n+1)`` in expectation.
``mode: per_side`` calibrates the two ends separately (scores ``q16 − y`` and ``y − q84`` at
``1 − α/2`` each), which keeps each tail near 16 %.

Offsets are conditional (Mondrian conformal prediction by group). Every star belongs to a group
at three levels, coarsest first:

1. ``xp`` or ``no_xp``: whether its prediction used an XP spectrum. The photometry-only offsets
   are fitted on the calibration stars predicted with every XP column hidden;
2. ``xp|14<=G<15``: plus its Gaia G bin (``calibrate.g_mag_bins``; ``G?`` when G is missing);
3. ``xp|14<=G<15|phot_g_mean_mag+J+H``: plus which photometric bands it has.

A finer group gets its own offsets only when it holds at least ``calibrate.min_group_size``
calibration stars for every label; a star takes the offsets of its finest group that has them
and falls back to the coarser group otherwise (level 1 always has offsets). The coverage
guarantee then holds within each group that was fitted, for stars exchangeable with that
group's calibration stars; :func:`star_groups` names the group each star used.

The offsets are in physical label units (log10 units for the members' ``log_labels``, so a
calibrated age stays positive) and may be negative (intervals that were too wide
shrink); :func:`apply_calibration` clips each end at the median, so q16 ≤ q50 ≤ q84 always holds.

The math is a leaf (numpy only). The ``msa calibrate`` command (``add_arguments``/``run``) imports
the ensemble and label loading inside ``run`` so that prediction can import this module alone.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np

from msa.calibration.basis import coarse_g_range, merge_group_bases
from msa.calibration.groups import LEVEL_NAMES
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


def conformal_quantile(scores: np.ndarray, level: float, weights: np.ndarray | None = None) -> float:
    """The ``⌈(n+1)·level⌉``-th smallest of ``scores``: the finite-sample conformal quantile.

    With ``weights`` (covariate-shift weights, > 0): the smallest score whose cumulative weight
    reaches ``level`` × (total + one mean weight standing in for the star being predicted), which
    equals the unweighted rule when all weights are equal (weighted conformal prediction,
    Tibshirani et al. 2019, with the test star's weight replaced by the average).
    """
    if weights is not None:
        return _weighted_conformal_quantile(scores, level, weights)
    scores = np.sort(np.asarray(scores, dtype=np.float64))
    n = len(scores)
    k = math.ceil((n + 1) * level)
    if k > n:
        need = math.ceil(level / (1 - level))
        raise CalibrationError(f"{n} calibration star(s) are too few for a {level:.3g} conformal quantile; "
                               f"need at least {need}: enlarge splits.calibration")
    return float(scores[k - 1])


def _weighted_conformal_quantile(scores: np.ndarray, level: float, weights: np.ndarray) -> float:
    order = np.argsort(np.asarray(scores, dtype=np.float64))
    scores = np.asarray(scores, dtype=np.float64)[order]
    w = np.asarray(weights, dtype=np.float64)[order]
    cumulative = np.cumsum(w) / (w.sum() + w.mean())
    k = int(np.searchsorted(cumulative, level * (1 - 1e-12)))
    if k >= len(scores):
        raise CalibrationError(f"{len(scores)} weighted calibration star(s) are too few for a {level:.3g} "
                               "conformal quantile: enlarge splits.calibration")
    return float(scores[k])


def conformal_offsets(q: np.ndarray, y: np.ndarray, coverage: float, mode: str = "symmetric",
                      weights: np.ndarray | None = None) -> tuple[float, float, int]:
    """Lower and upper offsets (physical units) and the number of stars, for one label.

    ``q``: ``(n, 3)`` uncalibrated quantiles, ``y``: ``(n,)`` true values; NaN rows are ignored;
    ``weights``: optional ``(n,)`` covariate-shift weights (:func:`conformal_quantile`).
    """
    if mode not in MODES:
        raise CalibrationError(f"calibrate.mode: {mode!r} is not one of {list(MODES)}")
    q = np.asarray(q, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    ok = np.isfinite(y) & np.all(np.isfinite(q), axis=1)
    q, y = q[ok], y[ok]
    w = None if weights is None else np.asarray(weights, dtype=np.float64)[ok]
    below, above = q[:, 0] - y, y - q[:, 2]
    if mode == "symmetric":
        offset = conformal_quantile(np.maximum(below, above), coverage, w)
        return offset, offset, int(ok.sum())
    level = 1 - (1 - coverage) / 2
    return conformal_quantile(below, level, w), conformal_quantile(above, level, w), int(ok.sum())


def to_log_space(values: np.ndarray, labels: Sequence[str], log_labels: Sequence[str]) -> np.ndarray:
    """``log10`` of the label-axis (axis 1) columns named in ``log_labels``; values ≤ 0 become NaN.
    A log-scaled label's offsets live in log10 units, so its calibrated q16 stays above zero."""
    out = np.array(values, dtype=np.float64, copy=True)
    for j, name in enumerate(labels):
        if name in log_labels:
            with np.errstate(divide="ignore", invalid="ignore"):
                out[:, j] = np.where(out[:, j] > 0, np.log10(np.where(out[:, j] > 0, out[:, j], 1.0)), np.nan)
    return out


def fit_calibration(q: np.ndarray, y: np.ndarray, labels: Sequence[str], coverage: float = 0.68,
                    mode: str = "symmetric", weights: np.ndarray | None = None,
                    log_labels: Sequence[str] = ()) -> dict:
    """Calibration dict (JSON-ready) from calibration-split quantiles ``(n, L, 3)`` and labels ``(n, L)``
    (``weights``: optional ``(n,)`` covariate-shift weights; ``log_labels``: labels whose offsets
    are fitted, and applied, in log10 units)."""
    q = np.asarray(q, dtype=np.float64)
    if q.ndim != 3 or q.shape[1] != len(labels) or q.shape[2] != 3:
        raise CalibrationError(f"quantiles of shape {q.shape} do not fit {len(labels)} labels × 3")
    q, y = to_log_space(q, labels, log_labels), to_log_space(np.asarray(y, dtype=np.float64), labels, log_labels)
    per_label = {}
    for j, name in enumerate(labels):
        try:
            lo, hi, n = conformal_offsets(q[:, j], y[:, j], coverage, mode, weights)
        except CalibrationError as err:
            raise CalibrationError(f"label {name!r}: {err}") from None
        per_label[name] = {"offset_lower": lo, "offset_upper": hi, "n_calibration": n}
    return {"coverage_target": coverage, "mode": mode, "labels": list(labels), "per_label": per_label,
            "log_labels": list(log_labels)}


# --- conditional (Mondrian) groups ---------------------------------------------------------------
COARSE_GROUPS = {"xp": "per_label", "no_xp": "per_label_without_xp"}  # group → its top-level key
_COARSE_MEANING = {"xp": "stars with XP", "no_xp": "stars without XP"}
def fit_group_offsets(q: np.ndarray, y: np.ndarray, labels: Sequence[str], levels: Sequence[np.ndarray],
                      coverage: float, mode: str, min_group_size: int, weights: np.ndarray | None = None,
                      log_labels: Sequence[str] = ()) -> dict:
    """Offsets of every finer group (levels 2 and up) with ≥ ``min_group_size`` stars per label.

    Returns ``{group: {"level": i, "per_label": {label: offsets}}}``; the coarse level is fitted
    by :func:`fit_calibration`. ``weights``: optional ``(n,)`` covariate-shift weights.
    """
    q = np.asarray(q, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    finite = np.isfinite(y) & np.all(np.isfinite(q), axis=-1)
    groups = {}
    for i, level in enumerate(levels[1:], start=1):
        for name in np.unique(level):
            rows = level == name
            if finite[rows].sum(axis=0).min() < min_group_size:
                continue
            fitted = fit_calibration(q[rows], y[rows], labels, coverage, mode,
                                     None if weights is None else np.asarray(weights)[rows], log_labels)
            groups[str(name)] = {"level": LEVEL_NAMES[i], "per_label": fitted["per_label"]}
    return groups


def star_groups(calibration: dict, levels: Sequence[np.ndarray]) -> np.ndarray:
    """The group whose offsets each star takes: its finest group that the calibration has offsets for."""
    chosen = np.array(levels[0], dtype=object, copy=True)
    fitted = calibration.get("groups") or {}
    for level in levels[1:]:
        names, inverse = np.unique(level, return_inverse=True)
        has_offsets = np.array([str(n) in fitted for n in names], dtype=bool)
        use = has_offsets[inverse.reshape(-1)]
        chosen[use] = level[use]
    return chosen


def group_entry(calibration: dict, group: str) -> dict:
    """Per-label offsets of one group (``xp``/``no_xp`` are the top-level entries)."""
    if group in COARSE_GROUPS:
        entry = calibration.get(COARSE_GROUPS[group])
    else:
        entry = (calibration.get("groups") or {}).get(group, {}).get("per_label")
    if entry is None:
        meaning = f" ({_COARSE_MEANING[group]})" if group in _COARSE_MEANING else ""
        raise CalibrationError(f"the calibration has no offsets for group {group!r}{meaning}; "
                               "re-run `msa calibrate`")
    return entry


def apply_calibration(q: np.ndarray, calibration: dict, labels: Sequence[str] | None = None,
                      has_xp: np.ndarray | None = None, groups: np.ndarray | None = None) -> np.ndarray:
    """Calibrated quantiles ``(n, L, 3)``: q16 − offset_lower, q84 + offset_upper, clipped at q50.

    ``labels`` names the label axis of ``q`` (default: the calibration's own label order); every
    one must have an entry in the calibration. ``groups`` (``(n,)`` names from
    :func:`star_groups`) selects each star's offsets; without it ``has_xp`` (bool ``(n,)``)
    selects the coarse ``xp``/``no_xp`` offsets, and None treats every star as having XP.
    """
    labels = list(calibration["labels"] if labels is None else labels)
    q = np.array(q, dtype=np.float64 if np.asarray(q).dtype == np.float64 else np.float32, copy=True)
    if q.ndim != 3 or q.shape[1] != len(labels) or q.shape[2] != 3:
        raise CalibrationError(f"quantiles of shape {q.shape} do not fit labels {labels} × 3")
    missing = [n for n in labels if n not in calibration["per_label"]]
    if missing:
        raise CalibrationError(f"calibration has no entry for label(s) {missing}; it was made for "
                               f"{calibration['labels']}. Re-run `msa calibrate` for this label set")
    if groups is None:
        groups = np.where(np.ones(len(q), dtype=bool) if has_xp is None else np.asarray(has_xp, dtype=bool),
                          "xp", "no_xp")
    names, inverse = np.unique(np.asarray(groups, dtype=object).astype(str), return_inverse=True)
    inverse = inverse.reshape(-1)
    entries = [group_entry(calibration, str(g)) for g in names]
    log_labels = calibration.get("log_labels") or []
    for j, name in enumerate(labels):
        lower = np.array([e[name]["offset_lower"] for e in entries])[inverse]
        upper = np.array([e[name]["offset_upper"] for e in entries])[inverse]
        column = to_log_space(q[:, j:j + 1], [name], log_labels)[:, 0] if name in log_labels else q[:, j]
        column[:, 0] = np.minimum(column[:, 0] - lower, column[:, 1])
        column[:, 2] = np.maximum(column[:, 2] + upper, column[:, 1])
        q[:, j] = 10 ** column if name in log_labels else column
    return q


def load_calibration(path: str | Path, ensemble=None) -> dict:
    """The calibration JSON; with ``ensemble``, refused unless it was made for exactly those members
    (the sha256s ``msa calibrate`` records): offsets fitted to other members promise nothing."""
    try:
        calibration = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CalibrationError(f"cannot read calibration {path}: {err}") from err
    if "per_label" not in calibration or "labels" not in calibration:
        raise CalibrationError(f"{path} is not an `msa calibrate` output (no 'labels'/'per_label')")
    if ensemble is not None:
        check_members(calibration, path, ensemble)
    return calibration


def check_members(calibration: dict, path: str | Path, ensemble) -> None:
    """Refuse members whose sha256s are not those ``calibration`` (read from ``path``) was made for."""
    recorded = calibration.get("member_sha256")
    if recorded is None:  # written by hand or before msa recorded its members: nothing to compare
        log.warning("%s records no member_sha256: cannot check it was made for these members", path)
        return
    fix = "pass the members it was made for, or calibrate these members with `msa calibrate`"
    for member in ensemble.members:
        if member.sha256 not in recorded:
            raise CalibrationError(f"member {member.path} (sha256 {member.sha256}) is not among the members "
                                   f"{path} was made for ({', '.join(recorded)}); {fix}")
    if sorted(recorded) != sorted(ensemble.checksums):
        raise CalibrationError(f"{path} was made for {len(recorded)} member(s), --members gives "
                               f"{len(ensemble.checksums)}; {fix}")


def coverage_report(q: np.ndarray, y: np.ndarray, calibration: dict, has_xp: np.ndarray | None = None,
                    groups: np.ndarray | None = None) -> dict:
    """Per label: coverage of [q16, q84] before and after calibration, and the count."""
    before, n = interval_coverage(q, y)
    after, _ = interval_coverage(apply_calibration(q, calibration, has_xp=has_xp, groups=groups), y)
    return {name: {"before": _num(before[j]), "after": _num(after[j]), "n": int(n[j])}
            for j, name in enumerate(calibration["labels"])}


def _num(v) -> float | None:
    return None if not np.isfinite(v) else float(v)


# --- command line --------------------------------------------------------------------------------
class CalibrationViews(NamedTuple):
    """A set of stars as calibration fits and scores them: the stars with XP as predicted with it
    (``q_xp``, ``levels_xp``: rows ``has_xp``), and every star with each XP column hidden."""
    has_xp: np.ndarray
    q_xp: np.ndarray
    levels_xp: list[np.ndarray]
    q_no_xp: np.ndarray
    levels_no_xp: list[np.ndarray]


def calibration_views(ensemble, x: np.ndarray, g_mag: np.ndarray, g_edges, batch: int) -> CalibrationViews:
    """Predict scaled inputs ``x`` in both views, with each star's group at every level."""
    xp_hidden = np.zeros(ensemble.layout.n_features, dtype=bool)
    xp_hidden[ensemble.layout.xp_indices] = True
    has_xp = ensemble.has_xp(x)  # labelled stars without a spectrum belong to the other group
    q_xp = ensemble.predict(x, batch_size=batch)[has_xp]
    levels_xp = [level[has_xp] for level in ensemble.calibration_levels(x, g_mag, g_edges)]
    q_no_xp = ensemble.predict(x, extra_hidden=xp_hidden, batch_size=batch)
    levels_no_xp = ensemble.calibration_levels(x, g_mag, g_edges, xp_hidden=True)
    return CalibrationViews(has_xp, q_xp, levels_xp, q_no_xp, levels_no_xp)


def emulated_copies(ensemble, stars, relation, cfg: dict, seed: int):
    """The faint copies of the calibration ``stars`` that ``msa calibrate`` fits its finer groups on
    (``cfg`` is the calibrate section; the same copies for the same run seed)."""
    from msa.calibration.emulation import emulate_faint_stars

    rng = np.random.default_rng([seed, 12])  # the number: a stream of its own, fixed per run
    return emulate_faint_stars(stars, ensemble.transform, relation, cfg["g_mag_bins"],
                               cfg["faint_copies"]["faintest_g"], rng, parallax_label_columns(ensemble))


def fit_emulated_groups(ensemble, stars, relation, names: Sequence[str], cfg: dict, xp_hidden: np.ndarray,
                        seed: int, batch: int, shards: Sequence) -> dict:
    """Finer-group offsets from faint copies of the calibration stars (:mod:`msa.calibration.emulation`), each
    copy seen with its (degraded) XP where it keeps one, and with every XP column hidden; with
    ``faint_copies.reweight`` the copies are weighted towards the store's own stars of their group."""
    from msa.calibration.emulation import shift_weights
    from msa.data.features import G_MAG

    copies = emulated_copies(ensemble, stars, relation, cfg, seed)
    if not len(copies):
        return {}
    views = calibration_views(ensemble, copies.x, copies.extra[G_MAG], cfg["g_mag_bins"], batch)
    has_xp = views.has_xp
    log.info("%d emulated faint copies of %d calibration stars (%d keep XP)", len(copies), len(stars),
             int(has_xp.sum()))
    levels_all = [np.concatenate(pair) for pair in zip(views.levels_xp, views.levels_no_xp)]
    q_all = np.concatenate([views.q_xp, views.q_no_xp])
    weights = None
    if cfg["faint_copies"]["reweight"]:
        x_copies = np.concatenate([copies.x[has_xp], copies.x])
        x_copies[int(has_xp.sum()):, ensemble.layout.xp_indices] = np.nan  # the no-XP view, as the model saw it
        x_sky, q_sky, sky_groups = sky_as_calibrated(ensemble, shards, cfg, xp_hidden, batch)
        weights = shift_weights(with_predictions(x_copies, q_all), levels_all[1],
                                with_predictions(x_sky, q_sky), sky_groups, seed)
        log.info("covariate-shift weights of the copies: median %.3g, 5-95 %% %.3g-%.3g", np.median(weights),
                 *np.percentile(weights, [5, 95]))
    return fit_group_offsets(q_all, np.concatenate([copies.y[has_xp], copies.y]),
                             names, levels_all, cfg["coverage"], cfg["mode"], cfg["min_group_size"], weights,
                             ensemble.log_labels)


def populated_g_bins(levels_xp: Sequence[np.ndarray], levels_no_xp: Sequence[np.ndarray]) -> set:
    """The G-bin (level-2) groups that a set of stars populates, in both views."""
    return set(np.unique(np.concatenate([levels_xp[1], levels_no_xp[1]]).astype(str)).tolist())


def fit_star_groups(ensemble, stars, names: Sequence[str], cfg: dict, batch: int) -> tuple[dict, set]:
    """Finer-group offsets from labelled ``stars`` (e.g. a calibration survey's), each star seen with
    its XP where it has one, and with every XP column hidden; and the G-bin groups they populate."""
    from msa.data.features import G_MAG

    views = calibration_views(ensemble, stars.x, stars.extra[G_MAG], cfg["g_mag_bins"], batch)
    return (fit_group_offsets(np.concatenate([views.q_xp, views.q_no_xp]),
                              np.concatenate([stars.y[views.has_xp], stars.y]), names,
                              [np.concatenate(pair) for pair in zip(views.levels_xp, views.levels_no_xp)],
                              cfg["coverage"], cfg["mode"], cfg["min_group_size"], log_labels=ensemble.log_labels),
            populated_g_bins(views.levels_xp, views.levels_no_xp))


def training_sample_limits(shards: Sequence, config: dict, source, seed: int, surveys) -> dict:
    """Which stars' labels the fits of this label set read, as hash limits per split and survey
    (:func:`msa.data.labels.split_sample_limits`): the train split whole (every row, or up to
    ``finetune.max_train_rows`` an epoch of a changing part of it), the validation sample early
    stopping scored, the calibration sample, each survey's sample. Prediction's
    ``in_training_sample`` is computed from these."""
    from msa.data.labels import split_sample_limits

    limits = split_sample_limits(shards, source, config["splits"], seed,
                                 {"validation": config["finetune"]["max_validation_rows"],
                                  "calibration": config["calibrate"]["max_rows"]})
    return {"splits": {"train": 1.0, **limits}, "surveys": {} if surveys is None else surveys.hash_limits,
            "max_train_rows": config["finetune"]["max_train_rows"]}


SKY_SAMPLE_ROWS = 200_000  # sky stars read and predicted for the shift weights (a group uses at most 20,000)


def sky_as_calibrated(ensemble, shards: Sequence, cfg: dict, xp_hidden: np.ndarray,
                      batch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A sample of the store's own stars as the faint copies are scored: those with XP as they are,
    and every star with its XP hidden (the no-XP view that no-XP coverage is measured in). Returns
    their scaled inputs, the ensemble's quantiles and their G-bin group. At most
    ``SKY_SAMPLE_ROWS`` stars, an equal share from every shard, so a full-sky store is not read whole."""
    from msa.calibration.emulation import read_store_sample
    from msa.data.features import G_MAG

    columns = list(dict.fromkeys([G_MAG, *ensemble.transform.store_columns]))
    per_shard = min(cfg["faint_copies"]["max_rows_per_shard"], -(-SKY_SAMPLE_ROWS // max(1, len(shards))))
    raw = read_store_sample(shards, columns, per_shard)
    x, _ = ensemble.transform({c: raw[c] for c in ensemble.transform.store_columns})
    g_mag = raw[G_MAG].astype(np.float64)
    with_xp = ensemble.has_xp(x)
    hidden = x.copy()
    hidden[:, ensemble.layout.xp_indices] = np.nan
    groups = np.concatenate([ensemble.calibration_levels(x[with_xp], g_mag[with_xp], cfg["g_mag_bins"])[1],
                             ensemble.calibration_levels(x, g_mag, cfg["g_mag_bins"], xp_hidden=True)[1]])
    q = np.concatenate([ensemble.predict(x[with_xp], batch_size=batch),
                        ensemble.predict(x, extra_hidden=xp_hidden, batch_size=batch)])
    return np.concatenate([x[with_xp], hidden]), q, groups


def with_predictions(x: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Inputs beside the model's median and interval width per label: what the shift classifier sees.
    Noisy faint photometry hides who a star is; the model's own summary of it tells a faint dwarf
    from a degraded copy of a bright giant far better."""
    return np.column_stack([x, q[:, :, 1], q[:, :, 2] - q[:, :, 0]])


def parallax_label_columns(ensemble) -> list[int]:
    """Label columns that scale with distance in a faint copy: the members' parallax label."""
    member = ensemble.members[0]
    return [] if member.parallax_label is None else [int(member.parallax_label)]


def add_arguments(parser) -> None:
    from msa.nn.training import add_device_argument  # torch: kept out of the numpy-only math above

    parser.add_argument("--config", required=True, help="pipeline config (YAML)")
    parser.add_argument("--label-set", required=True, help="name in the config's label_sets")
    parser.add_argument("--members", nargs="+", required=True, help="fine-tuned member model.pt files")
    parser.add_argument("--shards", nargs="+", required=True, help="shard store files holding the labelled stars")
    parser.add_argument("--out", required=True, help="calibration JSON to write")
    add_device_argument(parser)


def run(args) -> int:
    # stage-level imports live here: the math above stays a leaf that prediction imports alone
    from msa.calibration.emulation import fit_error_relation
    from msa.calibration.surveys import load_survey_stars, survey_sources
    from msa.calibration.ensemble import Ensemble
    from msa.config import load_config
    from msa.data.features import G_MAG
    from msa.data.labels import LabelSource, label_set, load_split_samples
    from msa.data.splits import split_seed
    from msa.data.store import atomic_path, check_out_path
    from msa.nn.checkpoint import file_sha256
    from msa.nn.training import resolve_device

    check_out_path(args.out, [args.config, *args.members, *args.shards], (".json",))
    config = load_config(args.config)
    names = label_set(config, args.label_set)
    ensemble = Ensemble.load(args.members, device=resolve_device(args.device))
    if ensemble.labels != names:
        raise CalibrationError(f"members predict {ensemble.labels}, label set {args.label_set!r} is {names}; "
                               "pass the members fine-tuned for this label set")
    cfg = config["calibrate"]
    faint = cfg["faint_copies"]
    # faint copies are made from the raw store columns of the calibration stars
    raw_columns = [G_MAG, *ensemble.transform.store_columns] if faint["enabled"] else [G_MAG]
    seed = split_seed(config)
    # bounded seeded samples: a label set of every star of the sky must not be read whole
    source = LabelSource(config["labels"], names)
    samples = load_split_samples(args.shards, ensemble.transform, source,
                                 config["splits"], seed, ("calibration", "test"), cfg["max_rows"],
                                 list(dict.fromkeys(raw_columns)))
    surveys = load_survey_stars(args.shards, ensemble.transform, survey_sources(cfg["surveys"], names), source,
                                seed, cfg["max_rows"], [G_MAG])
    edges = list(cfg["g_mag_bins"])
    relation = fit_error_relation(args.shards, ensemble.layout, faint["max_rows_per_shard"]) \
        if faint["enabled"] else None
    xp_hidden = np.zeros(ensemble.layout.n_features, dtype=bool)
    xp_hidden[ensemble.layout.xp_indices] = True
    result = None
    reports = {"with_xp": {}, "without_xp": {}}
    for split in ("calibration", "test"):
        part = samples[split]
        batch = config["predict"]["batch_size"]
        # with XP, and the same stars as photometry-only stars: every XP column hidden
        has_xp, q, levels, q_no_xp, levels_no_xp = calibration_views(ensemble, part.x, part.extra[G_MAG], edges,
                                                                     batch)
        if split == "calibration":
            logs = ensemble.log_labels
            result = fit_calibration(q, part.y[has_xp], names, cfg["coverage"], cfg["mode"],
                                     log_labels=logs)
            result["per_label_without_xp"] = fit_calibration(q_no_xp, part.y, names, cfg["coverage"],
                                                             cfg["mode"], log_labels=logs)["per_label"]
            # both views together: every group name starts with xp/no_xp, so none mixes the two
            fitted = [("labelled", fit_group_offsets(
                np.concatenate([q, q_no_xp]), np.concatenate([part.y[has_xp], part.y]), names,
                [np.concatenate(pair) for pair in zip(levels, levels_no_xp)], cfg["coverage"], cfg["mode"],
                cfg["min_group_size"], log_labels=logs), populated_g_bins(levels, levels_no_xp))]
            g_cal = part.extra[G_MAG]
            result.update(g_mag_bins=edges, min_group_size=cfg["min_group_size"], bands=ensemble.photometric_bands,
                          calibration_g_mag_max=float(np.nanmax(g_cal)) if np.isfinite(g_cal).any() else None,
                          labelled_g_mag_range={"xp": coarse_g_range(g_cal[has_xp]), "no_xp": coarse_g_range(g_cal)})
            log.info("%d finer calibration group(s) with ≥ %d labelled stars: %s", len(fitted[0][1]),
                     cfg["min_group_size"], sorted(fitted[0][1]))
            if surveys is not None:
                fitted.append(("survey", *fit_star_groups(ensemble, surveys.stars, names, cfg, batch)))
                result["surveys"] = surveys.counts
            if relation is not None:
                fitted.append(("emulated", fit_emulated_groups(ensemble, part, relation, names, cfg, xp_hidden,
                                                               seed, batch, args.shards), set()))
                result["emulation"] = {"faintest_g": faint["faintest_g"], "relation": relation.to_dict()}
            # one basis per group: labelled, else survey, else copies; never a lower one under a higher one
            result["groups"], result["group_basis"] = merge_group_bases(fitted)
            for basis in ("survey", "emulated"):
                mine = sorted(g for g, b in result["group_basis"].items() if b == basis)
                result[f"{basis}_groups"] = mine
                log.info("%d group(s) calibrated on %s stars: %s", len(mine), basis, mine)
            result["training_sample"] = training_sample_limits(args.shards, config, source, seed, surveys)
        reports["with_xp"][split] = coverage_report(q, part.y[has_xp], result,
                                                    groups=star_groups(result, levels))
        reports["without_xp"][split] = coverage_report(q_no_xp, part.y, result,
                                                       groups=star_groups(result, levels_no_xp))
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
    support_path = write_support_index(ensemble, samples["calibration"], surveys, cfg["support"], seed,
                                       config["predict"]["batch_size"], args.out)
    result["support_index"] = {"path": support_path.name, "sha256": file_sha256(support_path), **cfg["support"]}
    with atomic_path(args.out) as tmp:
        tmp.write_text(json.dumps(result, indent=1))
    log.info("wrote %s", args.out)
    return 0


def write_support_index(ensemble, labelled, surveys, support_cfg: dict, seed: int, batch: int, out) -> Path:
    """The support index of the labelled calibration stars and the survey stars
    (:mod:`msa.calibration.support`), written beside the calibration ``out``; returns its path."""
    from msa.calibration.support import SupportIndex, index_latents, support_index_path

    x = labelled.x if surveys is None else np.concatenate([labelled.x, surveys.stars.x])
    cap = support_cfg["max_rows"]
    index = SupportIndex.build(index_latents(ensemble, x, cap, seed, batch), support_cfg["neighbours"], cap,
                               support_cfg["low_threshold"], ensemble.checksums, seed, ensemble.device)
    path = support_index_path(out)
    index.save(path)
    log.info("wrote %s", path)
    return path
