"""HEALPix in the nested scheme, as Gaia encodes it in ``source_id``.

A Gaia DR3 ``source_id`` holds the level-12 nested HEALPix index of the source in its top bits:
``pixel_12 = source_id // 2**35``; the index at a coarser level L is ``source_id // (2**35 · 4**(12 − L))``.
``pixel_centres`` gives the (ra, dec) of nested pixel centres (healpy's ``pix2ang``; Górski et al.
2005, ApJ 622, 759), used to place the stars of synthetic skies. The index itself stays integer
arithmetic on ``source_id``: exact, where a float round trip through healpy would not be.

This module is a leaf: it imports nothing from the package.
"""

from __future__ import annotations

import healpy
import numpy as np

GAIA_LEVEL = 12
GAIA_SHIFT = 2**35
MAX_LEVEL = 29


def n_pixels(level: int) -> int:
    """Number of pixels of the whole sky at ``level`` (12 · 4**level)."""
    _check_level(level, MAX_LEVEL)
    return 12 * 4**level


def _check_level(level: int, highest: int) -> None:
    if not 0 <= int(level) <= highest:
        raise ValueError(f"HEALPix level {level} is outside 0..{highest}")


def source_id_to_pixel(source_id, level: int) -> np.ndarray:
    """Nested HEALPix index (int64) at ``level`` (0–12) of Gaia ``source_id``s (int64, vectorised).

    Integer arithmetic only: exact for every 64-bit source_id (no float round trip).
    """
    _check_level(level, GAIA_LEVEL)
    sid = np.asarray(source_id)
    if sid.dtype.kind not in "iu":
        raise TypeError(f"source_id must be an integer array (int64), got dtype {sid.dtype}; "
                        "a float source_id has already lost digits above 2**53")
    sid = sid.astype(np.int64, copy=False)
    if sid.size and sid.min() < 0:
        raise ValueError("source_id must be non-negative (Gaia source_ids are)")
    return sid // np.int64(GAIA_SHIFT * 4 ** (GAIA_LEVEL - int(level)))


def pixel_centres(pixels, level: int) -> tuple[np.ndarray, np.ndarray]:
    """(ra, dec) in degrees (float64) of the centres of nested-scheme pixels at ``level``."""
    _check_level(level, MAX_LEVEL)
    pix = np.asarray(pixels, dtype=np.int64)
    nside = 2**int(level)
    if pix.size and (pix.min() < 0 or pix.max() >= 12 * nside * nside):
        raise ValueError(f"pixel index outside 0..{12 * nside * nside - 1} for level {level}")
    ra, dec = healpy.pix2ang(nside, pix, nest=True, lonlat=True)
    return np.asarray(ra, dtype=np.float64) % 360.0, np.asarray(dec, dtype=np.float64)
