"""A reference model for the evaluation: gradient-boosted trees per label on the same inputs.

One scikit-learn ``HistGradientBoostingRegressor`` per label, trained on the TRAIN split's scaled
inputs (the same ``FeatureTransform`` output the network sees; trees handle NaN natively) and
evaluated on the same test split. If the network does not beat this, the pretraining is not
earning its keep.

The number of trees is chosen on the VALIDATION split, the one every other model stops on:
sklearn's own early stopping would hold out a random 10 % of train instead, so the trees would
learn from 10 % fewer stars and stop on other ones. Each label grows ``max_iter`` trees without
early stopping; the count whose staged validation prediction has the lowest NMAD (the metric
the evaluation reports) is kept, and predictions stop at that tree.
"""

from __future__ import annotations

import logging
from itertools import islice
from typing import Mapping, Sequence

import numpy as np
from sklearn.ensemble import HistGradientBoostingRegressor
from threadpoolctl import threadpool_limits

from msa.nn.robust_stats import nmad

log = logging.getLogger(__name__)

MIN_TRAIN_ROWS = 10
MIN_VALIDATION_ROWS = 2


class BaselineError(ValueError):
    """Too few training or validation stars for a label."""


def best_tree_count(model: HistGradientBoostingRegressor, x_val: np.ndarray, y_val: np.ndarray) -> tuple[int, float]:
    """The number of trees (1 … ``model.n_iter_``) whose prediction of ``x_val`` has the lowest NMAD
    of residuals against ``y_val``, and that NMAD; the fewest trees on a tie."""
    scores = np.array([nmad(pred - y_val) for pred in model.staged_predict(x_val)])
    best = int(np.argmin(scores))
    return best + 1, float(scores[best])


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
        self.n_trees: list[int] = []  # per label, the count chosen on the validation split

    def _inputs(self, x: np.ndarray, label: str) -> np.ndarray:
        drop = np.union1d(self.hidden_columns, self.label_hidden_columns.get(label, np.empty(0, np.int64)))
        x = np.asarray(x, dtype=np.float32)
        return np.delete(x, drop.astype(np.int64), axis=1) if len(drop) else x

    def fit(self, x: np.ndarray, y: np.ndarray, x_val: np.ndarray, y_val: np.ndarray) -> "GradientBoostingBaseline":
        """``x``, ``x_val``: scaled inputs ``(n, F)`` of the train and validation splits; ``y``,
        ``y_val``: their physical labels ``(n, L)`` (NaN rows skipped per label)."""
        # one OpenMP thread: trees on a few thousand stars are too small to share, and on a busy
        # 2-core machine two threads spin-wait on each other (tests/test_baselines.py: 1 s against 45 s)
        with threadpool_limits(limits=1, user_api="openmp"):
            return self._fit(x, y, x_val, y_val)

    def _fit(self, x, y, x_val, y_val) -> "GradientBoostingBaseline":
        self.models, self.n_trees = [], []
        for j, name in enumerate(self.labels):
            inputs, inputs_val = self._inputs(x, name), self._inputs(x_val, name)
            ok, ok_val = np.isfinite(y[:, j]), np.isfinite(y_val[:, j])
            if ok.sum() < MIN_TRAIN_ROWS or ok_val.sum() < MIN_VALIDATION_ROWS:
                raise BaselineError(f"baseline: label {name!r} has {ok.sum()} training and {ok_val.sum()} "
                                    f"validation stars; need at least {MIN_TRAIN_ROWS} and {MIN_VALIDATION_ROWS}")
            model = HistGradientBoostingRegressor(max_iter=self.max_iter, learning_rate=self.learning_rate,
                                                  early_stopping=False, random_state=self.seed)
            model.fit(inputs[ok], y[ok, j])
            n_trees, score = best_tree_count(model, inputs_val[ok_val], y_val[ok_val, j])
            if n_trees == model.n_iter_:
                log.warning("baseline %s: the validation split chose the last of %d trees; more might help",
                            name, n_trees)
            log.info("baseline %s: %d of %d trees chosen on %d validation stars (NMAD %.4g), %d train stars",
                     name, n_trees, model.n_iter_, ok_val.sum(), score, ok.sum())
            self.models.append(model)
            self.n_trees.append(n_trees)
        return self

    def predict(self, x: np.ndarray) -> np.ndarray:
        if not self.models:
            raise BaselineError("baseline: call fit() before predict()")
        # the prediction after the chosen tree: staged_predict is sklearn's public way to stop early
        with threadpool_limits(limits=1, user_api="openmp"):
            return np.column_stack([next(islice(m.staged_predict(self._inputs(x, name)), n - 1, None))
                                    for m, n, name in zip(self.models, self.n_trees, self.labels)])
