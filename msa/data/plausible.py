"""Finite values no real star has: sentinels and absurd inputs become missing, absurd outputs NaN.

Catalogues write "no value" as a number (-999, -9999, 99999) as often as they leave it empty, and
a broken cross-match or unit slip gives 1e8 or 1e30. A network sees such a value as a real input
and extrapolates: K = -999 gave T_eff = -2556 K, BP = 1e10 gave -9.4e10 K (issue 27). So:

* :func:`reject_raw` sets to NaN (missing) a raw feature value that is a sentinel
  (:data:`SENTINELS`, exactly), a magnitude outside :data:`MAGNITUDE_RANGE` (the Gaia and survey
  photometry groups), or a parallax or proper motion beyond :data:`ASTROMETRY_RANGES`;
* :func:`reject_scaled` sets to NaN a scaled input more than :data:`ROBUST_LIMIT` robust scales
  (the scaler's IQR) from the scaler's centre: the whole training set lies far inside that;
* :func:`outside_label_range` marks predictions outside a label's physical range
  (:data:`LABEL_RANGES`, by label name and unit) or not finite: predict writes them NaN and flags
  the star; a label catalogue's infinite values and those beyond :data:`LABEL_LIMIT` are missing;
* :func:`reject_survey_values` is the ingest check of survey columns (magnitudes, colours and
  their errors): sentinels and values beyond :data:`SURVEY_LIMIT` become NaN in the store.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from msa.data.layout import Layout

# "no value" written as a number; exact matches only (a real XP coefficient or parallax is never
# exactly one of these in float32)
SENTINELS = np.array([-99.0, -999.0, -9999.0, -99999.0, -999999.0, 999.0, 9999.0, 99999.0, 999999.0])
PHOTOMETRY_GROUPS = ("gaia_photometry", "survey_photometry")
MAGNITUDE_RANGE = (-10.0, 40.0)  # brighter than any star's (Betelgeuse K = -4.4), fainter than any survey's
ASTROMETRY_RANGES = {"parallax": (-1000.0, 1000.0),  # mas; Proxima Cen 768
                     "pmra": (-20000.0, 20000.0), "pmdec": (-20000.0, 20000.0)}  # mas/yr; Barnard's 10,393
ROBUST_LIMIT = 1000.0  # robust scales from the scaler's centre
SURVEY_LIMIT = 1e5  # no magnitude, colour or magnitude error reaches it
# physical range of a label, by name, in the unit it holds for (predict.label_units); a label in
# another unit (T_eff in kK, a log age) is checked for finiteness only
LABEL_RANGES = {
    "teff": ("K", 1000.0, 200000.0),
    "logg": ("dex", -2.0, 10.0),  # cgs
    "fe_h": ("dex", -7.0, 2.0), "m_h": ("dex", -7.0, 2.0), "mh": ("dex", -7.0, 2.0),
    "alpha_m": ("dex", -2.0, 2.0), "alpha_fe": ("dex", -2.0, 2.0),
    "age": ("Gyr", 0.0, 20.0),
    "mass": ("Msun", 0.0, 500.0),
    "radius": ("Rsun", 0.0, 5000.0),
}
LABEL_LIMIT = 1e30  # a label catalogue's value beyond it (or infinite) is no measurement, whatever its unit


def is_sentinel(values: np.ndarray) -> np.ndarray:
    return np.isin(np.asarray(values, dtype=np.float64), SENTINELS)


def _raw_range(name: str, group: str) -> tuple[float, float] | None:
    if group in PHOTOMETRY_GROUPS:
        return MAGNITUDE_RANGE
    return ASTROMETRY_RANGES.get(name)


def reject_raw(raw: Mapping[str, np.ndarray], layout: Layout) -> tuple[dict, np.ndarray]:
    """``raw`` with each layout feature's implausible values set to NaN (changed columns copied,
    the caller's arrays untouched) and the per-star count of values rejected (int64 ``(n,)``)."""
    out = dict(raw)
    n = len(next(iter(raw.values()))) if raw else 0
    count = np.zeros(n, dtype=np.int64)
    for f in layout.features:
        if f.name not in raw:
            continue
        values = np.asarray(raw[f.name])
        bad = is_sentinel(values)
        limits = _raw_range(f.name, f.group)
        if limits is not None:
            with np.errstate(invalid="ignore"):
                bad |= np.isfinite(values) & ((values < limits[0]) | (values > limits[1]))
        if bad.any():
            values = values.astype(np.float64 if values.dtype == np.float64 else np.float32, copy=True)
            values[bad] = np.nan
            out[f.name] = values
            count += bad
    return out, count


def reject_scaled(x: np.ndarray) -> np.ndarray:
    """Set to NaN, in place, scaled inputs beyond :data:`ROBUST_LIMIT`; the per-star count."""
    with np.errstate(invalid="ignore"):
        bad = np.abs(x) > ROBUST_LIMIT
    x[bad] = np.nan
    return bad.sum(axis=1)


def label_range(label: str, units: Mapping[str, str]) -> tuple[float, float] | None:
    """``(lo, hi)`` of ``label`` when :data:`LABEL_RANGES` knows it in the unit ``units`` gives it."""
    known = LABEL_RANGES.get(label)
    if known is None or units.get(label) != known[0]:
        return None
    return known[1], known[2]


def outside_label_range(q: np.ndarray, labels, units: Mapping[str, str]) -> np.ndarray:
    """Bool ``(n,)``: a star with any quantile (``q`` of shape ``(n, labels, 3)``) not finite or
    outside its label's physical range (:func:`label_range`; other labels: finite only)."""
    bad = ~np.all(np.isfinite(q), axis=(1, 2))
    for j, label in enumerate(labels):
        limits = label_range(label, units)
        if limits is not None:
            with np.errstate(invalid="ignore"):
                bad |= np.any((q[:, j] < limits[0]) | (q[:, j] > limits[1]), axis=1)
    return bad


def reject_survey_values(values: np.ndarray) -> tuple[np.ndarray, int]:
    """A survey column with sentinels and values beyond :data:`SURVEY_LIMIT` set to NaN, and how
    many were."""
    values = np.asarray(values, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        bad = is_sentinel(values) | (np.isfinite(values) & (np.abs(values) > SURVEY_LIMIT))
    if not bad.any():
        return values, 0
    values = values.copy()
    values[bad] = np.nan
    return values, int(bad.sum())
