"""The Gaia DR3 parallax zero-point of Lindegren et al. (2021, A&A 649, A4), for parallax labels.

Gaia's parallaxes are offset by a few tens of µas, depending on magnitude, colour and ecliptic
latitude; ``parallax − zero_point`` is the corrected value. The correction is the published fit,
computed by the ``gaiadr3-zeropoint`` package from five gaia_source columns (ingest them with
``ingest.source_columns``). It is defined for 5- and 6-parameter solutions with 6 < G < 21 and
the fit's colour range; elsewhere (2-parameter solutions, a missing input, outside the range) it
is NaN, and so is the corrected parallax: a value whose offset is unknown is no label.

A leaf: imports nothing from the package.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

METHODS = ("lindegren2021",)
ZERO_POINT_COLUMNS = ("phot_g_mean_mag", "nu_eff_used_in_astrometry", "pseudocolour", "ecl_lat",
                      "astrometric_params_solved")
FIVE_PARAMETER, SIX_PARAMETER = 31, 95  # astrometric_params_solved of the solutions it covers

_tables_loaded = False


def zero_point(raw: Mapping[str, np.ndarray]) -> np.ndarray:
    """The zero-point (mas, float64) of each row of ``raw`` (the :data:`ZERO_POINT_COLUMNS`)."""
    global _tables_loaded
    from zero_point import zpt

    if not _tables_loaded:
        zpt.load_tables()
        _tables_loaded = True
    g, nu_eff, pseudocolour, ecl_lat = (np.asarray(raw[c], dtype=np.float64) for c in ZERO_POINT_COLUMNS[:4])
    solved = np.nan_to_num(np.asarray(raw["astrometric_params_solved"], dtype=np.float64), nan=0).astype(int)
    colour_known = np.where(solved == FIVE_PARAMETER, np.isfinite(nu_eff), np.isfinite(pseudocolour))
    ok = np.isin(solved, (FIVE_PARAMETER, SIX_PARAMETER)) & np.isfinite(g) & np.isfinite(ecl_lat) & colour_known
    out = np.full(len(g), np.nan)
    if ok.any():
        # outside the fit's validity range the package returns NaN when its warnings are off
        out[ok] = zpt.get_zpt(g[ok], nu_eff[ok], pseudocolour[ok], ecl_lat[ok], solved[ok], _warnings=False)
    return out
