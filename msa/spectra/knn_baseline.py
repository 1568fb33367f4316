"""The yardstick of XP reconstruction: a k-nearest-neighbour average of spectra on photometry.

A star's XP spectrum is predicted as the distance-weighted mean of the (G-normalised, scaled)
spectra of its k nearest training stars in the space of the inputs the autoencoder sees when XP
is hidden (every non-XP feature, scaled by the one feature scaler; colours when the layout uses
them). A missing input is set to the scaler's centre (0): the neighbours are then found on what
the star has. The number of neighbours is chosen among ``reconstruct.knn_neighbours`` on a
hash-chosen fifth of the training stars, by the median of a caller's per-star error.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
from sklearn.neighbors import KNeighborsRegressor

from msa.data.star_hash import unit_hash

TUNING_FRACTION = 0.2


@dataclass
class KnnSpectra:
    """A fitted kNN from photometry ``(n, P)`` to scaled XP ``(n, n_xp)``."""

    model: KNeighborsRegressor
    n_neighbours: int
    tuning_errors: dict[int, float]

    def predict(self, photometry: np.ndarray) -> np.ndarray:
        return self.model.predict(_filled(photometry))


def _filled(photometry: np.ndarray) -> np.ndarray:
    return np.nan_to_num(np.asarray(photometry, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)


def _fit(photometry: np.ndarray, xp: np.ndarray, k: int) -> KNeighborsRegressor:
    return KNeighborsRegressor(n_neighbors=min(k, len(xp)), weights="distance").fit(_filled(photometry), xp)


def fit_knn_spectra(photometry: np.ndarray, xp_scaled: np.ndarray, source_id: np.ndarray,
                    neighbours: Sequence[int], star_error: Callable[[np.ndarray, np.ndarray], np.ndarray],
                    seed: int) -> KnnSpectra:
    """Choose k on a hash-held-out fifth of the training stars (``star_error(predicted, rows)`` gives
    each tuning star's error; ``rows`` index the training arrays), then refit on every training star."""
    if len(xp_scaled) < 2:
        raise ValueError("the kNN baseline needs at least two training stars with XP")
    tuning = unit_hash(source_id, seed) < TUNING_FRACTION
    errors: dict[int, float] = {}
    if len(neighbours) > 1 and tuning.any() and (~tuning).any():
        rows = np.flatnonzero(tuning)
        for k in neighbours:
            predicted = _fit(photometry[~tuning], xp_scaled[~tuning], k).predict(_filled(photometry[tuning]))
            errors[int(k)] = float(np.nanmedian(star_error(predicted, rows)))
        best = min(errors, key=errors.get)
    else:
        best = int(neighbours[0])
    return KnnSpectra(_fit(photometry, xp_scaled, best), best, errors)
