"""Normalised median absolute deviation, the scatter every accuracy figure in MSA is quoted in."""
from __future__ import annotations

import warnings

import numpy as np

# 1 / Φ⁻¹(3/4): makes the median absolute deviation of a Gaussian equal to its σ
NMAD_FACTOR = 1.4826


def nmad(d: np.ndarray, axis: int | None = None) -> np.ndarray | float:
    """1.4826 · median |d − median d| along ``axis`` (all of ``d`` when None), NaN entries ignored."""
    d = np.asarray(d, dtype=np.float64)
    with warnings.catch_warnings():  # a label no star has gives NaN, which callers report as missing
        warnings.simplefilter("ignore", RuntimeWarning)
        med = np.nanmedian(d, axis=axis, keepdims=True)
        return NMAD_FACTOR * np.nanmedian(np.abs(d - med), axis=axis)
