"""A reference model for the evaluation: gradient-boosted trees per label on the same inputs.

One scikit-learn ``HistGradientBoostingRegressor`` per label, trained on the TRAIN split's scaled
inputs (the same ``FeatureTransform`` output the network sees; trees handle NaN natively) and
evaluated on the same test split. If the network does not beat this, the pretraining is not
earning its keep.
"""

from __future__ import annotations

import logging
from typing import Mapping, Sequence

import numpy as np
from sklearn.ensemble import HistGradientBoostingRegressor

log = logging.getLogger(__name__)

MIN_TRAIN_ROWS = 10


class BaselineError(ValueError):
    """Too few training stars for a label."""


class GradientBoostingBaseline:
    """Per-label gradient-boosted trees; ``predict`` returns physical point estimates ``(n, L)``."""

    def __init__(self, labels: Sequence[str], max_iter: int = 300, learning_rate: float = 0.1,
                 seed: int = 0, hidden_columns: Sequence[int] = (),
                 label_hidden_columns: Mapping[str, Sequence[int]] | None = None):
        self.labels = list(labels)
        self.max_iter = max_iter
        self.learning_rate = learning_rate
        self.seed = seed
        # columns removed from the inputs (e.g. every XP coefficient for a photometry-only baseline)
        self.hidden_columns = np.asarray(list(hidden_columns), dtype=np.int64)
        # columns removed for one label only (the Gaia parallax input when the label is that parallax)
        self.label_hidden_columns = {k: np.asarray(list(v), dtype=np.int64)
                                     for k, v in (label_hidden_columns or {}).items()}
        self.models: list[HistGradientBoostingRegressor] = []

    def _inputs(self, x: np.ndarray, label: str) -> np.ndarray:
        drop = np.union1d(self.hidden_columns, self.label_hidden_columns.get(label, np.empty(0, np.int64)))
        x = np.asarray(x, dtype=np.float32)
        return np.delete(x, drop.astype(np.int64), axis=1) if len(drop) else x

    def fit(self, x: np.ndarray, y: np.ndarray) -> "GradientBoostingBaseline":
        """``x``: scaled inputs ``(n, F)``; ``y``: physical labels ``(n, L)`` (NaN rows skipped per label)."""
        self.models = []
        for j, name in enumerate(self.labels):
            inputs = self._inputs(x, name)
            ok = np.isfinite(y[:, j])
            if ok.sum() < MIN_TRAIN_ROWS:
                raise BaselineError(f"baseline: label {name!r} has {ok.sum()} training stars; "
                                    f"need at least {MIN_TRAIN_ROWS}")
            model = HistGradientBoostingRegressor(max_iter=self.max_iter, learning_rate=self.learning_rate,
                                                  early_stopping=True, random_state=self.seed)
            model.fit(inputs[ok], y[ok, j])
            log.info("baseline %s: %d trees on %d stars", name, model.n_iter_, ok.sum())
            self.models.append(model)
        return self

    def predict(self, x: np.ndarray) -> np.ndarray:
        if not self.models:
            raise BaselineError("baseline: call fit() before predict()")
        return np.column_stack([m.predict(self._inputs(x, name)) for m, name in zip(self.models, self.labels)])
