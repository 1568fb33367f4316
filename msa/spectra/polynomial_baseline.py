"""A second yardstick of XP reconstruction: a cubic polynomial of the colours, fitted by ridge
regression to the (G-normalised, scaled) XP coefficients. Smooth where the kNN is local: between
them they bound what photometry alone says about a spectrum. The colours are standardised as the
kNN's (:class:`msa.spectra.knn_baseline.Standardiser`, a missing colour at 0); the ridge strength
is chosen among ``ALPHAS`` on the same hash-chosen fifth of the training stars, then refitted on all.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from sklearn.linear_model import Ridge
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import PolynomialFeatures

from msa.data.star_hash import unit_hash
from msa.spectra.knn_baseline import TUNING_FRACTION, Standardiser

ALPHAS = (1e-3, 1e-1, 1.0, 10.0, 100.0)
DEGREE = 3


@dataclass
class PolynomialSpectra:
    model: Pipeline
    alpha: float
    tuning_errors: dict[float, float]
    standardise: Standardiser

    def predict(self, colours: np.ndarray) -> np.ndarray:
        return self.model.predict(self.standardise(colours))


def _fit(z: np.ndarray, xp: np.ndarray, alpha: float) -> Pipeline:
    return make_pipeline(PolynomialFeatures(DEGREE), Ridge(alpha=alpha)).fit(z, xp)


def fit_polynomial_spectra(colours: np.ndarray, xp_scaled: np.ndarray, source_id: np.ndarray,
                           star_error: Callable[[np.ndarray, np.ndarray], np.ndarray], seed: int) -> PolynomialSpectra:
    """Choose the ridge strength on a hash-held-out fifth of the training stars, then refit on all."""
    if len(xp_scaled) < 2:
        raise ValueError("the polynomial baseline needs at least two training stars with XP")
    standardise = Standardiser.fit(colours)
    z = standardise(colours)
    tuning = unit_hash(source_id, seed) < TUNING_FRACTION
    errors: dict[float, float] = {}
    if tuning.any() and (~tuning).any():
        rows = np.flatnonzero(tuning)
        for alpha in ALPHAS:
            predicted = _fit(z[~tuning], xp_scaled[~tuning], alpha).predict(z[tuning])
            errors[alpha] = float(np.nanmedian(star_error(predicted, rows)))
    best = min(errors, key=errors.get) if errors else 1.0
    return PolynomialSpectra(_fit(z, xp_scaled, best), best, errors, standardise)
