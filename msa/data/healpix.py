"""HEALPix in the nested scheme, as Gaia encodes it in ``source_id`` (no healpy dependency).

A Gaia DR3 ``source_id`` holds the level-12 nested HEALPix index of the source in its top bits:
``pixel_12 = source_id // 2**35``; the index at a coarser level L is ``source_id // (2**35 · 4**(12 − L))``.
``pixel_centres`` gives the (ra, dec) of nested pixel centres (Górski et al. 2005, ApJ 622, 759),
used to place the stars of synthetic skies (the catalogue's sky map uses healpy).

This module is a leaf: it imports nothing from the package.
"""

from __future__ import annotations

import numpy as np

GAIA_LEVEL = 12
GAIA_SHIFT = 2**35
MAX_LEVEL = 29

# base-pixel ring (in units of nside) and longitude index of the 12 faces
_FACE_RING = np.array([2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4], dtype=np.int64)
_FACE_PHI = np.array([1, 3, 5, 7, 0, 2, 4, 6, 1, 3, 5, 7], dtype=np.int64)


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


def _compact_bits(v: np.ndarray) -> np.ndarray:
    """Keep the even-position bits of ``v`` and pack them together (inverse of bit interleaving)."""
    v = v & 0x5555555555555555
    v = (v | (v >> 1)) & 0x3333333333333333
    v = (v | (v >> 2)) & 0x0F0F0F0F0F0F0F0F
    v = (v | (v >> 4)) & 0x00FF00FF00FF00FF
    v = (v | (v >> 8)) & 0x0000FFFF0000FFFF
    v = (v | (v >> 16)) & 0x00000000FFFFFFFF
    return v


def pixel_centres(pixels, level: int) -> tuple[np.ndarray, np.ndarray]:
    """(ra, dec) in degrees (float64) of the centres of nested-scheme pixels at ``level``."""
    _check_level(level, MAX_LEVEL)
    pix = np.asarray(pixels, dtype=np.int64)
    nside = np.int64(2**level)
    if pix.size and (pix.min() < 0 or pix.max() >= 12 * nside * nside):
        raise ValueError(f"pixel index outside 0..{12 * nside * nside - 1} for level {level}")
    face, in_face = np.divmod(pix, nside * nside)
    ix, iy = _compact_bits(in_face), _compact_bits(in_face >> 1)
    ring = _FACE_RING[face] * nside - ix - iy - 1  # ring index 1 … 4·nside − 1, north to south

    north, south = ring < nside, ring > 3 * nside
    nr = np.where(north, ring, np.where(south, 4 * nside - ring, nside))  # pixels per quarter ring
    nr_f = nr.astype(np.float64)
    three_n2 = 3.0 * float(nside) ** 2
    z = np.where(north, 1.0 - nr_f**2 / three_n2,
                 np.where(south, -1.0 + nr_f**2 / three_n2, (2 * nside - ring) * 2.0 / (3.0 * nside)))
    shift = np.where(north | south, 0, (ring - nside) & 1)  # equatorial rings alternate half-pixel offsets
    jp = (_FACE_PHI[face] * nr + ix - iy + 1 + shift) // 2
    jp = np.where(jp > 4 * nside, jp - 4 * nside, jp)
    jp = np.where(jp < 1, jp + 4 * nside, jp)
    phi = (jp - (shift + 1) * 0.5) * (0.5 * np.pi / nr_f)
    ra = np.degrees(phi) % 360.0
    dec = 90.0 - np.degrees(np.arccos(np.clip(z, -1.0, 1.0)))
    return ra, dec
