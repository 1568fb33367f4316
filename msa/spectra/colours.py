"""The colours the reconstruction yardsticks read: every photometric magnitude of the layout
minus G (``phot_g_mean_mag``), never apparent G itself, which says nothing about a spectrum
normalised to G = 15."""

from __future__ import annotations

import numpy as np

from msa.data.features import G_MAG
from msa.data.layout import PHOTOMETRY_GROUPS, Layout


def colour_names(layout: Layout) -> list[str]:
    """The magnitudes that give a colour (``name − G``): every photometric feature but G."""
    return [f.name for f in layout.features if f.group in PHOTOMETRY_GROUPS and f.name != G_MAG]


def colour_features(raw: dict[str, np.ndarray], layout: Layout) -> tuple[list[str], np.ndarray]:
    """(names ``m−G``, ``(n, C)`` float64 colours in mag) from raw store columns; NaN where missing."""
    names = colour_names(layout)
    if not names:
        raise ValueError("the layout has no photometric magnitude besides G: the reconstruction yardsticks "
                         "need colours (features.gaia_photometry / survey_photometry)")
    g = np.asarray(raw[G_MAG], dtype=np.float64)
    return [f"{n}-G" for n in names], np.column_stack([np.asarray(raw[n], dtype=np.float64) - g for n in names])
