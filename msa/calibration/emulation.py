"""Faint-star emulation: a bright labelled star as the same star would be measured at a fainter G.

Every labelled star is bright (APOGEE and GALAH reach G ≈ 15-16), most of the sky is not. To
calibrate (and optionally train) for the faint sky, a labelled star is moved to a fainter G by
``ΔG = G_target − G`` (as if it were further away, without extra extinction) and measured again:

* magnitudes (Gaia and survey photometry) shift by ``ΔG``; XP coefficients, fluxes, scale by
  ``10^(−0.4 ΔG)``; a parallax scales by ``10^(−0.2 ΔG)`` (the distance grows by ``10^(0.2 ΔG)``);
* each measured value gets the noise the store's stars at ``G_target`` carry: the error of the
  copy is the store's median error of that column at ``G_target`` (:class:`ErrorRelation`, fitted
  on the sky being predicted), and the noise added is ``N(0, σ_new² − σ_old'²)`` where
  ``σ_old'`` is the star's own error carried to the new brightness (noise cannot be removed);
* XP is dropped beyond the store's XP limit (the faintest G with a spectrum) and a survey band
  (2MASS, WISE, ...) beyond its faintest magnitude in the store, as the real surveys lose them;
  Gaia's own bands are kept (they reach G ≈ 21).

Columns without an error column cannot be given new noise: they are only shifted (the demo's
Gaia magnitudes carry no errors, so its emulated photometry is too precise; say so where used).

The relation is plain data (JSON-ready, :meth:`ErrorRelation.to_dict`) saved with the calibration.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from msa.data.features import G_MAG, MAG_PER_LN, flux_over_error_column
from msa.data.layout import PHOTOMETRY_GROUPS, XP_GROUP, Layout

log = logging.getLogger(__name__)

G_STEP = 0.25  # width of the G bins the median errors are taken in
MIN_STARS_PER_STEP = 20  # fewer stars with a value in a bin: that bin is left out of the relation
PARALLAX = "parallax"
SURVEY_GROUP = "survey_photometry"


@dataclass
class ErrorRelation:
    """Median error of each measured store column as a function of Gaia G, from one store.

    ``g``: bin centres (mag); ``median_error``: store value column → median error per bin (in
    the column's own units; NaN where too few stars), ``xp_limit``: the faintest G with an XP
    spectrum; ``faint_limits``: photometric column → its faintest value (mag) in the store.
    """

    g: np.ndarray
    median_error: dict[str, np.ndarray]
    xp_limit: float
    faint_limits: dict[str, float]

    def error_at(self, column: str, g: np.ndarray) -> np.ndarray:
        """Median error of ``column`` at ``g`` (linear in log error between bins, held flat outside)."""
        table = self.median_error[column]
        ok = np.isfinite(table) & (table > 0)
        if not ok.any():
            return np.full(np.shape(g), np.nan)
        return np.exp(np.interp(g, self.g[ok], np.log(table[ok])))

    def to_dict(self) -> dict:
        return {"g": self.g.tolist(), "xp_limit": self.xp_limit, "faint_limits": self.faint_limits,
                "median_error": {c: [None if not np.isfinite(v) else float(v) for v in t]
                                 for c, t in self.median_error.items()}}

    @classmethod
    def from_dict(cls, d: Mapping) -> "ErrorRelation":
        return cls(np.asarray(d["g"], dtype=np.float64),
                   {c: np.array([np.nan if v is None else v for v in t], dtype=np.float64)
                    for c, t in d["median_error"].items()},
                   float(d["xp_limit"]), {c: float(v) for c, v in d["faint_limits"].items()})


def measured_columns(layout: Layout) -> dict[str, str]:
    """Store value column → the store column its error comes from, for every feature with an error."""
    return {f.name: (flux_over_error_column(f.error) or f.error) for f in layout.features if f.error is not None}


def _errors(raw: Mapping[str, np.ndarray], value: str, error_column: str) -> np.ndarray:
    e = np.asarray(raw[error_column], dtype=np.float64)
    if error_column.endswith("_flux_over_error"):
        with np.errstate(divide="ignore", invalid="ignore"):
            e = np.where(e > 0, MAG_PER_LN / e, np.nan)
    return np.where(np.isfinite(raw[value]), e, np.nan)


def fit_error_relation(shard_paths: Sequence[str | Path], layout: Layout, max_rows_per_shard: int = 200_000
                       ) -> ErrorRelation:
    """Median error versus G of every measured feature, over (the first rows of) each shard."""
    from msa.data.store import Shard  # the store is a lower layer; imported here to keep the math importable

    measured = measured_columns(layout)
    photometry = [f.name for f in layout.features if f.group in PHOTOMETRY_GROUPS]
    xp = [f.name for f in layout.features if f.group == XP_GROUP]
    parts = []
    for path in shard_paths:
        with Shard(path) as shard:
            wanted = [G_MAG, *measured, *measured.values(), *photometry, *xp[:1]]
            wanted = [c for c in dict.fromkeys(wanted) if c in shard.columns]
            rows = np.arange(min(shard.n_rows, max_rows_per_shard))
            parts.append(shard.read_rows(wanted, rows))
    raw = {c: np.concatenate([p[c] for p in parts if c in p]).astype(np.float64) for c in parts[0]}
    g = raw[G_MAG]
    finite_g = np.isfinite(g)
    if not finite_g.any():
        raise ValueError(f"no star of {len(shard_paths)} shard(s) has {G_MAG}: cannot fit errors versus G")
    edges = np.arange(np.floor(np.nanmin(g) / G_STEP) * G_STEP, np.nanmax(g) + G_STEP, G_STEP)
    centres = 0.5 * (edges[:-1] + edges[1:])
    which = np.clip(np.digitize(g, edges) - 1, 0, len(centres) - 1)
    median_error = {}
    for value, error_column in measured.items():
        if value not in raw or error_column not in raw:
            continue
        err = _errors(raw, value, error_column)
        table = np.full(len(centres), np.nan)
        for b in range(len(centres)):
            sel = err[(which == b) & finite_g]
            sel = sel[np.isfinite(sel)]
            if len(sel) >= MIN_STARS_PER_STEP:
                table[b] = np.median(sel)
        median_error[value] = table
    with_xp = np.isfinite(raw[xp[0]]) & finite_g if xp and xp[0] in raw else np.zeros(len(g), bool)
    xp_limit = float(np.max(g[with_xp])) if with_xp.any() else float("-inf")
    faint = {c: float(np.nanmax(raw[c])) for c in photometry if c in raw and np.isfinite(raw[c]).any()}
    log.info("error relation: %d measured column(s) over G %.2f-%.2f; XP to G = %.2f", len(median_error),
             edges[0], edges[-1], xp_limit)
    return ErrorRelation(centres, median_error, xp_limit, faint)


def degrade(raw: Mapping[str, np.ndarray], target_g: np.ndarray, layout: Layout, relation: ErrorRelation,
            rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Copies of the stars of ``raw`` (store columns, ``(n,)`` each) as measured at ``target_g``.

    ``target_g`` must not be brighter than a star's own G (noise cannot be taken away). Columns of
    ``raw`` that the layout does not measure are copied unchanged.
    """
    g = np.asarray(raw[G_MAG], dtype=np.float64)
    target_g = np.asarray(target_g, dtype=np.float64)
    shift = target_g - g
    if np.any(shift < -1e-9):
        raise ValueError("degrade: a target G is brighter than the star; emulate fainter copies only")
    flux_factor = 10 ** (-0.4 * shift)
    out = {c: np.array(v, dtype=np.float64, copy=True) for c, v in raw.items()}
    out[G_MAG] = target_g
    measured = measured_columns(layout)
    beyond_xp = target_g > relation.xp_limit
    for f in layout.features:
        if f.name not in raw:
            continue
        if f.group == XP_GROUP:
            factor = flux_factor
        elif f.group in PHOTOMETRY_GROUPS:
            factor = None
        elif f.name == PARALLAX:
            factor = np.sqrt(flux_factor)  # 10^(−0.2 ΔG)
        else:
            factor = np.ones_like(shift)
        base = np.asarray(raw[f.name], dtype=np.float64)
        value = base + shift if factor is None else base * factor
        error_column = measured.get(f.name)
        if error_column is not None and error_column in raw and f.name in relation.median_error:
            old = _errors(raw, f.name, error_column) * (1.0 if factor is None else factor)
            new = relation.error_at(f.name, target_g)
            new = np.where(np.isfinite(new), np.fmax(new, np.nan_to_num(old)), old)
            extra = np.sqrt(np.clip(new ** 2 - np.nan_to_num(old) ** 2, 0, None))
            value = value + rng.standard_normal(len(value)) * np.nan_to_num(extra)
            out[error_column] = (MAG_PER_LN / new) if error_column.endswith("_flux_over_error") else new
        if f.group == XP_GROUP:
            value = np.where(beyond_xp, np.nan, value)
            if error_column in out:
                out[error_column] = np.where(beyond_xp, np.nan, out[error_column])
        elif f.group == SURVEY_GROUP and f.name in relation.faint_limits:  # Gaia's own bands reach G ≈ 21
            value = np.where(value > relation.faint_limits[f.name], np.nan, value)
        out[f.name] = value
    return out


def faint_targets(g: np.ndarray, edges: Sequence[float], faintest: float, rng: np.random.Generator
                  ) -> tuple[np.ndarray, np.ndarray]:
    """One target G per star and per G bin fainter than the star (up to ``faintest``), uniform in the bin.

    Returns ``(star_index, target_g)``; bins are ``edges`` plus ``faintest`` as the last edge.
    """
    g = np.asarray(g, dtype=np.float64)
    bounds = [e for e in edges if e < faintest] + [faintest]
    index, target = [], []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        stars = np.flatnonzero(np.isfinite(g) & (g < lo))
        index.append(stars)
        target.append(rng.uniform(lo, hi, len(stars)))
    if not index:
        return np.empty(0, dtype=np.int64), np.empty(0)
    return np.concatenate(index), np.concatenate(target)


def emulate_faint_stars(stars, transform, relation: ErrorRelation, edges: Sequence[float], faintest: float,
                        rng: np.random.Generator, parallax_labels: Sequence[int] = ()):
    """Faint copies of labelled stars (:class:`msa.data.labels.LabelledStars` whose ``extra`` holds
    the raw store columns of ``transform``): one per G bin fainter than each star, up to ``faintest``.

    Returns a ``LabelledStars`` of the copies: inputs ``x``/``err`` re-derived by ``transform``,
    labels copied (the ``parallax_labels`` columns scaled with the distance), ``extra[G_MAG]``
    the copy's G, and ``extra["emulated_from"]`` the row of the star it was made from.
    """
    from msa.data.labels import LabelledStars

    index, target = faint_targets(stars.extra[G_MAG], edges, faintest, rng)
    raw = {c: stars.extra[c][index] for c in transform.store_columns}
    raw[G_MAG] = stars.extra[G_MAG][index]
    copies = degrade(raw, target, transform.layout, relation, rng)
    x, err = transform({c: copies[c].astype(np.float32) for c in transform.store_columns})
    y = stars.y[index].copy()
    for j in parallax_labels:
        y[:, j] *= 10 ** (-0.2 * (target - raw[G_MAG]))
    extra = {c: copies[c] for c in copies}
    extra["emulated_from"] = index.astype(np.float64)
    return LabelledStars(stars.source_id[index], x, err, y, stars.y_err[index], extra)


def read_store_sample(shard_paths: Sequence[str | Path], columns: Sequence[str], max_rows_per_shard: int
                      ) -> dict[str, np.ndarray]:
    """The first ``max_rows_per_shard`` rows of ``columns`` of every shard (absent columns: NaN)."""
    from msa.data.store import Shard

    parts = []
    for path in shard_paths:
        with Shard(path) as shard:
            rows = np.arange(min(shard.n_rows, max_rows_per_shard))
            present = [c for c in columns if c in shard.columns]
            raw = shard.read_rows(present, rows)
            parts.append({c: raw[c] if c in raw else np.full(len(rows), np.nan, np.float32) for c in columns})
    return {c: np.concatenate([p[c] for p in parts]) for c in columns}


def shift_weights(x_copies: np.ndarray, groups_copies: np.ndarray, x_sky: np.ndarray, groups_sky: np.ndarray,
                  seed: int, min_sky_stars: int = 50, max_sky_stars: int = 20000, clip: float = 20.0) -> np.ndarray:
    """Covariate-shift weights of faint copies: how much more often the sky has stars like each copy.

    Faint copies of bright labelled stars are not the faint sky's stars (at G = 19 a copy of a nearby
    bright dwarf competes with distant giants that no survey labelled). Per group (``groups_*``:
    one name per row, e.g. the G-bin level), a classifier (gradient-boosted trees on the scaled
    inputs, NaN allowed) tells copies from the sky's own stars; a copy's weight is the odds it is
    a sky star, ``p / (1 − p)`` × (copies / sky stars), clipped to [1/clip, clip] and normalised to
    mean 1 in its group. A group with fewer than ``min_sky_stars`` sky stars keeps weight 1.
    """
    from sklearn.ensemble import HistGradientBoostingClassifier

    weights = np.ones(len(x_copies))
    rng = np.random.default_rng(seed)
    for name in np.unique(groups_copies):
        copies = np.flatnonzero(groups_copies == name)
        sky = np.flatnonzero(groups_sky == name)
        if len(sky) < min_sky_stars or len(copies) < min_sky_stars:
            continue
        if len(sky) > max_sky_stars:
            sky = rng.choice(sky, max_sky_stars, replace=False)
        x = np.concatenate([x_copies[copies], x_sky[sky]])
        x = x[:, np.isfinite(x).any(axis=0)]  # columns nobody in the group has (XP of no-XP stars) carry nothing
        is_sky = np.r_[np.zeros(len(copies)), np.ones(len(sky))]
        model = HistGradientBoostingClassifier(max_iter=100, learning_rate=0.1, max_leaf_nodes=15,
                                               l2_regularization=1.0, random_state=seed)
        model.fit(x, is_sky)
        p = np.clip(model.predict_proba(x[:len(copies)])[:, 1], 1e-6, 1 - 1e-6)
        w = np.clip(p / (1 - p) * len(copies) / len(sky), 1 / clip, clip)
        weights[copies] = w / w.mean()
    return weights

