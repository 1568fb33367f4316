"""Which stars a star's conformal offsets were fitted on: its ``interval_basis``.

A finer calibration group (G bin, G bin × bands) takes its offsets from one basis only, the first
that has enough stars for it, in this order:

1. ``labelled``: the real calibration stars of the label set (the calibration split);
2. ``survey``: stars of the ``calibrate.surveys`` catalogues (faint surveys that label the stars the
   label set lacks; calibration only, never fine-tuning);
3. ``emulated``: faint copies of the calibration stars (:mod:`msa.calibration.emulation`), only
   for groups that neither of the above fits.

A lower basis never overrides a higher one along a star's chain of groups: a survey or copy
group is dropped when a higher basis has stars in its G-bin group at all, even too few for
offsets, so real stars' groups keep their own offsets (a real group too small for its band
pattern or its G bin falls back to the coarser real offsets, never to copies). A star that falls back to its coarse group (``xp``/``no_xp``, fitted on the labelled
stars) is ``labelled`` when its G lies within the G range of those stars and ``extrapolated``
otherwise (or without G): no star of its kind was scored.

Numpy only, like :mod:`msa.calibration.calibrate`, so prediction imports it alone.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

BASES = ("labelled", "survey", "emulated", "extrapolated")
BASIS_MEANING = {
    "labelled": "offsets fitted on the label set's own calibration stars",
    "survey": "offsets fitted on stars of a calibration survey (calibrate.surveys) in the star's group",
    "emulated": "offsets fitted on bright calibration stars degraded to the star's G (faint copies)",
    "extrapolated": "no calibration star of the star's kind: coarse offsets used beyond the G range they were "
                    "fitted on",
}
COARSE = ("xp", "no_xp")


def g_bin_group(name: str, level: str) -> str | None:
    """The G-bin (level-2) group a finer group belongs to: itself at level 2, its parent at level 3."""
    if level == "g_mag":
        return name
    if level == "g_mag_bands":
        return name.rsplit("|", 1)[0]
    return None


def merge_group_bases(fitted: Sequence[tuple[str, dict, set]]) -> tuple[dict, dict]:
    """Groups of each basis merged: ``[(basis, groups from fit_group_offsets, the G-bin groups its
    stars populate)]``, highest basis first.

    Returns ``(groups, group_basis)``: a basis's group is kept only where no higher basis has a
    star in its G-bin group.
    """
    groups: dict = {}
    basis_of: dict = {}
    higher: set = set()  # G-bin groups that the stars of the bases before this one populate
    for basis, candidates, populated in fitted:
        for name, entry in sorted(candidates.items()):
            if g_bin_group(name, entry["level"]) in higher:
                continue
            groups[name] = entry
            basis_of[name] = basis
        higher |= set(populated)
    return groups, basis_of


def coarse_g_range(g_mag: np.ndarray) -> list[float] | None:
    """``[min, max]`` of the finite G of a coarse group's calibration stars (None without any)."""
    g = np.asarray(g_mag, dtype=np.float64)
    g = g[np.isfinite(g)]
    return [float(g.min()), float(g.max())] if len(g) else None


def interval_basis(calibration: dict | None, groups: np.ndarray, g_mag: np.ndarray) -> np.ndarray:
    """Each star's basis (object array of :data:`BASES`), from the group whose offsets it took
    (:func:`msa.calibration.calibrate.star_groups`) and its G; ``""`` for an uncalibrated star.

    Calibrations written before bases were recorded count their ``emulated_groups`` as
    ``emulated``, every other finer group as ``labelled``, and the coarse groups up to
    ``calibration_g_mag_max``."""
    groups = np.asarray(groups, dtype=object)
    out = np.full(len(groups), "" if calibration is None else "extrapolated", dtype=object)
    if calibration is None or not len(groups):
        return out
    g_mag = np.asarray(g_mag, dtype=np.float64)
    recorded = calibration.get("group_basis")
    if recorded is None:
        recorded = {name: "emulated" for name in calibration.get("emulated_groups") or []}
    ranges = calibration.get("labelled_g_mag_range") or {}
    g_max = calibration.get("calibration_g_mag_max")
    names, inverse = np.unique(groups.astype(str), return_inverse=True)
    inverse = inverse.reshape(-1)
    for k, name in enumerate(names):
        rows = inverse == k
        if name in COARSE:
            span = ranges.get(name, None if g_max is None else [-np.inf, g_max])
            if span is not None:
                with np.errstate(invalid="ignore"):
                    inside = (g_mag[rows] >= span[0]) & (g_mag[rows] <= span[1])
                out[rows] = np.where(inside, "labelled", "extrapolated")
        elif name:
            out[rows] = recorded.get(name, "labelled")
    return out
