"""The yardstick of XP reconstruction: a k-nearest-neighbour average of spectra on colours.

A star's XP spectrum (G-normalised and scaled) is predicted as the distance-weighted mean of the
spectra of its k nearest training stars in the space of its colours (each magnitude minus G,
:func:`msa.spectra.colours.colour_features`): apparent G says nothing about a spectrum normalised
to G, so distance is never measured in it. Each colour is standardised on the training stars
(median and scaled IQR), then weighted: the number of neighbours and the weights (one pass of
coordinate descent over ``WEIGHT_GRID`` per colour) are chosen on a hash-chosen fifth of the
training stars, by the median of a caller's per-star error, then the kNN is refitted on every
training star. A missing colour is set to the centre (0): the neighbours are found on what the
star has.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from sklearn.neighbors import KNeighborsRegressor

from msa.data.star_hash import unit_hash

TUNING_FRACTION = 0.2
WEIGHT_GRID = (0.0, 0.5, 1.0, 2.0)


@dataclass
class Standardiser:
    """Per-column centre and scale (median, IQR / 1.349) of the training inputs."""

    centre: np.ndarray
    scale: np.ndarray

    @classmethod
    def fit(cls, x: np.ndarray) -> Standardiser:
        x = np.asarray(x, dtype=np.float64)
        with np.errstate(all="ignore"):
            centre = np.nan_to_num(np.nanmedian(x, axis=0)) if len(x) else np.zeros(x.shape[1])
            q75, q25 = (np.nan_to_num(np.nanpercentile(x, q, axis=0)) for q in (75, 25)) if len(x) else (1, 0)
        scale = np.where(np.asarray(q75 - q25) > 0, (q75 - q25) / 1.349, 1.0)
        return cls(centre, scale)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        z = (np.asarray(x, dtype=np.float64) - self.centre) / self.scale
        return np.nan_to_num(z, nan=0.0, posinf=0.0, neginf=0.0)


@dataclass
class KnnSpectra:
    """A fitted kNN from colours ``(n, C)`` to scaled XP ``(n, n_xp)``."""

    model: KNeighborsRegressor
    n_neighbours: int
    tuning_errors: dict[int, float]
    standardise: Standardiser
    weights: np.ndarray

    def predict(self, colours: np.ndarray) -> np.ndarray:
        return self.model.predict(self.standardise(colours) * self.weights)


def _fit(z: np.ndarray, xp: np.ndarray, k: int) -> KNeighborsRegressor:
    return KNeighborsRegressor(n_neighbors=min(k, len(xp)), weights="distance").fit(z, xp)


def fit_knn_spectra(colours: np.ndarray, xp_scaled: np.ndarray, source_id: np.ndarray,
                    neighbours: Sequence[int], star_error: Callable[[np.ndarray, np.ndarray], np.ndarray],
                    seed: int, tune_weights: bool = True) -> KnnSpectra:
    """Choose k, then the colour weights, on a hash-held-out fifth of the training stars
    (``star_error(predicted, rows)`` gives each tuning star's error; ``rows`` index the training
    arrays), then refit on every training star."""
    if len(xp_scaled) < 2:
        raise ValueError("the kNN baseline needs at least two training stars with XP")
    standardise = Standardiser.fit(colours)
    z = standardise(colours)
    weights = np.ones(z.shape[1])
    tuning = unit_hash(source_id, seed) < TUNING_FRACTION
    errors: dict[int, float] = {}
    best = int(neighbours[0])
    if tuning.any() and (~tuning).any():
        rows = np.flatnonzero(tuning)

        def score(k: int, w: np.ndarray) -> float:
            predicted = _fit(z[~tuning] * w, xp_scaled[~tuning], k).predict(z[tuning] * w)
            return float(np.nanmedian(star_error(predicted, rows)))

        if len(neighbours) > 1:
            errors = {int(k): score(int(k), weights) for k in neighbours}
            best = min(errors, key=errors.get)
        if tune_weights and z.shape[1] > 1:
            current = errors.get(best, score(best, weights))
            for j in range(z.shape[1]):
                for w in WEIGHT_GRID:
                    if w == weights[j] or (w == 0 and np.count_nonzero(weights) == 1):
                        continue
                    trial = weights.copy()
                    trial[j] = w
                    err = score(best, trial)
                    if err < current:
                        current, weights = err, trial
    return KnnSpectra(_fit(z * weights, xp_scaled, best), best, errors, standardise, weights)
