"""Sampled XP spectra (flux against wavelength) from continuous coefficients, via GaiaXPy.

GaiaXPy's ``calibrate`` turns a star's Archive coefficients (continuous representation) into the
externally calibrated flux (W m⁻² nm⁻¹) on a wavelength grid, 336–1020 nm in 2 nm steps by
default. It runs offline: its basis functions and instrument model ship with the package. The
map is linear in the coefficients (BP and RP sampled, then merged with fixed per-wavelength
weights), so this module calls ``calibrate`` once, on the 110 unit coefficient vectors, and keeps
the resulting ``(110, n_wavelengths)`` matrix: sampling any number of stars is then one matrix
product (``sample_flux``), thousands of times faster than a call per star, and exactly GaiaXPy's
answer (tested against ``calibrate`` on real stars).
"""

from __future__ import annotations

import contextlib
import io
from functools import lru_cache

import numpy as np

N_COEFFICIENTS = 55  # per band in Gaia DR3
_N_CORRELATIONS = N_COEFFICIENTS * (N_COEFFICIENTS - 1) // 2


def gaiaxpy_input(bp: np.ndarray, rp: np.ndarray, source_id: np.ndarray | None = None):
    """A DataFrame in the Archive's continuous layout, as ``gaiaxpy.calibrate`` reads it, for
    coefficients ``bp``, ``rp`` of shape ``(n, 55)``. Errors and correlations are not used by the
    flux (only by its error), so they are set to ones and zeros."""
    import pandas as pd

    n = len(bp)
    ids = np.arange(n, dtype=np.int64) if source_id is None else np.asarray(source_id, dtype=np.int64)
    rows = {"source_id": ids}
    for band, coefficients in (("bp", bp), ("rp", rp)):
        rows[f"{band}_coefficients"] = list(np.asarray(coefficients, dtype=np.float64))
        rows[f"{band}_coefficient_errors"] = [np.ones(N_COEFFICIENTS)] * n
        rows[f"{band}_coefficient_correlations"] = [np.zeros(_N_CORRELATIONS)] * n
        rows[f"{band}_n_parameters"] = np.full(n, N_COEFFICIENTS)
        rows[f"{band}_standard_deviation"] = np.ones(n)
    return pd.DataFrame(rows)


def calibrate_quietly(frame):
    """``gaiaxpy.calibrate`` without its progress output; returns (fluxes ``(n, W)``, wavelengths nm)."""
    import matplotlib

    with matplotlib.rc_context():  # importing GaiaXPy sets matplotlib's text.usetex globally: undo it
        import gaiaxpy.calibrator.calibrator as calibrator_module
        from gaiaxpy import calibrate

    # its tqdm bar writes to the sys.stdout that the module bound when imported, which a redirect
    # cannot reach ("Calibrating data: 0/110" leaked into every job log): swap that name too
    sink = io.StringIO()
    bound = getattr(calibrator_module, "stdout", None)
    with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        if bound is not None:
            calibrator_module.stdout = sink
        try:
            spectra, wavelengths = calibrate(frame, save_file=False, truncation=False)
        finally:
            if bound is not None:
                calibrator_module.stdout = bound
    # rows matched to the input by source_id, not by position: the row order of the output is not documented
    order = spectra.set_index("source_id").loc[frame["source_id"].to_numpy()]
    return np.stack(order["flux"].to_numpy()).astype(np.float64), np.asarray(wavelengths, dtype=np.float64)


@lru_cache(maxsize=1)
def sampling_matrix() -> tuple[np.ndarray, np.ndarray]:
    """(wavelengths in nm ``(W,)``, matrix ``(110, W)``): row *i* is the flux of unit coefficient *i*
    (BP 1–55, then RP 1–55)."""
    eye = np.eye(2 * N_COEFFICIENTS)
    flux, wavelengths = calibrate_quietly(gaiaxpy_input(eye[:, :N_COEFFICIENTS], eye[:, N_COEFFICIENTS:]))
    return wavelengths, flux


def full_coefficients(coefficients: np.ndarray, n_bp: int, n_rp: int) -> np.ndarray:
    """``(n, n_bp + n_rp)`` coefficients (a layout may keep fewer than 55 per band) → ``(n, 110)``,
    the missing higher orders zero."""
    coefficients = np.asarray(coefficients, dtype=np.float64)
    out = np.zeros((len(coefficients), 2 * N_COEFFICIENTS))
    out[:, :n_bp] = coefficients[:, :n_bp]
    out[:, N_COEFFICIENTS:N_COEFFICIENTS + n_rp] = coefficients[:, n_bp:n_bp + n_rp]
    return out


def sample_flux(coefficients: np.ndarray, n_bp: int = N_COEFFICIENTS,
                n_rp: int = N_COEFFICIENTS) -> tuple[np.ndarray, np.ndarray]:
    """(wavelengths nm ``(W,)``, flux W m⁻² nm⁻¹ ``(n, W)``) for Archive-unit coefficients ``(n, n_bp + n_rp)``
    (BP then RP); NaN coefficients give NaN fluxes."""
    wavelengths, matrix = sampling_matrix()
    return wavelengths, full_coefficients(coefficients, n_bp, n_rp) @ matrix


def relative_flux_error(flux: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Per star, ‖flux − reference‖ / ‖reference‖ over the wavelength grid (L2): a flux-weighted
    relative error that stays finite where the reference spectrum crosses zero at the grid's ends."""
    return np.linalg.norm(flux - reference, axis=1) / np.linalg.norm(reference, axis=1)
