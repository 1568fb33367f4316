"""Calibration groups (Mondrian conformal): each star's group by input pattern, G bin and bands.

Both the calibration (which fits offsets per group) and the ensemble (which names each star's
group at prediction time) read this; it imports neither."""

from __future__ import annotations

from typing import Sequence

import numpy as np

LEVEL_NAMES = ("input", "g_mag", "g_mag_bands")

UNKNOWN_G = "G?"


def g_bin_names(edges: Sequence[float]) -> list[str]:
    """Names of the G bins of ``edges``: below the first, between consecutive edges, from the last up."""
    edges = list(edges)
    if not edges:
        return ["all G"]
    return ([f"G<{edges[0]:g}"] + [f"{lo:g}<=G<{hi:g}" for lo, hi in zip(edges[:-1], edges[1:])]
            + [f"G>={edges[-1]:g}"])


def group_levels(g_mag: np.ndarray, has_xp: np.ndarray, band_present: np.ndarray, band_names: Sequence[str],
                 g_edges: Sequence[float]) -> list[np.ndarray]:
    """Each star's group name at every level (:data:`LEVEL_NAMES`, coarsest first), as object arrays.

    ``g_mag``: Gaia G ``(n,)`` (NaN = missing); ``has_xp``: bool ``(n,)``; ``band_present``: bool
    ``(n, B)``, which of the photometric ``band_names`` the star has.
    """
    g_mag = np.asarray(g_mag, dtype=np.float64)
    band_present = np.asarray(band_present, dtype=bool).reshape(len(g_mag), len(band_names))
    names_g = g_bin_names(g_edges) + [UNKNOWN_G]
    g_bin = np.where(np.isfinite(g_mag), np.searchsorted(np.asarray(g_edges, dtype=np.float64), g_mag,
                                                          side="right"), len(names_g) - 1)
    codes = np.column_stack([np.asarray(has_xp, dtype=bool), g_bin, band_present]).astype(np.int64)
    unique, inverse = np.unique(codes, axis=0, return_inverse=True)
    per_level = [[], [], []]
    for xp, g, *bands in unique.tolist():
        coarse = "xp" if xp else "no_xp"
        by_g = f"{coarse}|{names_g[g]}"
        present = "+".join(b for b, on in zip(band_names, bands) if on) or "no bands"
        for level, name in zip(per_level, (coarse, by_g, f"{by_g}|{present}")):
            level.append(name)
    inverse = inverse.reshape(-1)
    return [np.asarray(level, dtype=object)[inverse] if len(g_mag) else np.empty(0, dtype=object)
            for level in per_level]
