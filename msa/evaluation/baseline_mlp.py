"""A yardstick network: a plain supervised MLP on the same inputs, split and stars as the model.

The question a referee asks of a pretrained model is whether it beats the strongest simple
network trained on the labelled stars alone. This is that network:

* inputs: the pipeline's scaled features (median/IQR from the one feature scaler), NaN filled
  with 0 (the median) plus one 0/1 "missing" channel per column that is ever missing in the
  training split, so a missing band is not mistaken for a median one;
* two hidden layers (Linear → GELU → dropout), one output per label, all labels of the set in
  one model, labels standard-scaled on the train split, NaN labels masked in the loss;
* AdamW, early stopping on the VALIDATION split, best weights kept;
* a small grid of width / dropout / weight decay / loss (mean squared or absolute error), the
  winner chosen by the validation split only (mean over labels of NMAD in scaled units).

Test stars are never seen in fitting or selection. Deterministic for a given seed on the CPU.

The model is a mixture of several fine-tuned members, and an ensemble gains on any one network by
averaging alone; so the fair yardstick is :class:`PlainMLPEnsemble`, as many of these networks as
the model has members, seeds ``seed, seed + 1, ...`` (as the model's members). The first one
searches the grid; the others train at its choice only (the choice is the grid's, not a seed's,
and the search is most of the cost).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import nn

from msa.errors import InputError
from msa.nn.robust_stats import nmad

log = logging.getLogger(__name__)

# the schema's evaluate.mlp_grid default, for callers without a config
DEFAULT_GRID = {"width": [256, 512], "dropout": [0.2], "weight_decay": [1e-4], "loss": ["l1", "mse"]}


@contextlib.contextmanager
def one_torch_thread():
    """Run the enclosed block on one intra-op thread: matrices of a two-layer MLP on a thousand
    stars are too small to share, so more threads only wait on each other (the no-XP fit on the
    demo: 20 s on one thread, 55 s on two of a busy 2-core machine, the same weights)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class MLPBaselineError(InputError, ValueError):
    """Too few training or validation stars for the plain MLP."""


@dataclass(frozen=True)
class MLPSettings:
    width: int = 256
    dropout: float = 0.1
    weight_decay: float = 1e-4
    loss: str = "mse"
    lr: float = 1e-3
    batch_size: int = 128
    max_epochs: int = 300
    patience: int = 25


def _nmad_scaled(pred: np.ndarray, y: np.ndarray) -> float:
    """Mean over labels of the NMAD of ``pred − y`` (both scaled), NaN labels ignored."""
    values = []
    for j in range(y.shape[1]):
        ok = np.isfinite(y[:, j])
        if ok.sum() >= 2:
            d = pred[ok, j] - y[ok, j]
            values.append(nmad(d))
    return float(np.mean(values)) if values else float("inf")


class PlainMLPBaseline:
    """Grid-tuned two-layer MLP; ``predict`` returns physical point estimates ``(n, L)``.

    ``hidden_columns`` are dropped from the inputs (every XP column for the photometry-only
    yardstick); ``label_hidden_columns`` is accepted for symmetry with the tree baseline and
    must be empty (one network serves every label, so a per-label input cannot be dropped).
    """

    def __init__(self, labels: Sequence[str], seed: int = 0, hidden_columns: Sequence[int] = (),
                 grid: dict | None = None, settings: MLPSettings = MLPSettings()):
        self.labels = list(labels)
        self.seed = int(seed)
        self.hidden_columns = np.asarray(list(hidden_columns), dtype=np.int64)
        self.grid = dict(DEFAULT_GRID if grid is None else grid)
        self.base_settings = settings
        self.net: nn.Module | None = None
        self.chosen: MLPSettings | None = None
        self.validation_scores: list[tuple[dict, float]] = []

    # --- inputs ------------------------------------------------------------------------------------
    def _inputs(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        if len(self.hidden_columns):
            x = np.delete(x, self.hidden_columns, axis=1)
        missing = ~np.isfinite(x[:, self._indicator_cols])
        return np.concatenate([np.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0),
                               missing.astype(np.float32)], axis=1)

    def _train_one(self, s: MLPSettings, x_tr, y_tr, x_va, y_va) -> tuple[nn.Module, float]:
        torch.manual_seed(self.seed)
        net = nn.Sequential(nn.Linear(x_tr.shape[1], s.width), nn.GELU(), nn.Dropout(s.dropout),
                            nn.Linear(s.width, s.width), nn.GELU(), nn.Dropout(s.dropout),
                            nn.Linear(s.width, y_tr.shape[1]))
        opt = torch.optim.AdamW(net.parameters(), lr=s.lr, weight_decay=s.weight_decay)
        xt, yt = torch.from_numpy(x_tr), torch.from_numpy(y_tr)
        xv = torch.from_numpy(x_va)
        present = ~torch.isnan(yt)
        y_filled = torch.nan_to_num(yt)
        rng = np.random.default_rng(self.seed)
        best, best_state, bad = float("inf"), None, 0
        for _ in range(s.max_epochs):
            net.train()
            for idx in np.array_split(rng.permutation(len(xt)), max(1, len(xt) // s.batch_size)):
                idx = torch.from_numpy(idx)
                d = net(xt[idx]) - y_filled[idx]
                err = d.abs() if s.loss == "l1" else d.square()
                m = present[idx]
                loss = (err * m).sum() / m.sum().clamp_min(1)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            net.eval()
            with torch.no_grad():
                score = _nmad_scaled(net(xv).numpy(), y_va)
            if score < best - 1e-6:
                best, bad = score, 0
                best_state = {k: v.clone() for k, v in net.state_dict().items()}
            else:
                bad += 1
                if bad >= s.patience:
                    break
        if best_state is not None:  # None: no validation label had two values to score
            net.load_state_dict(best_state)
        net.eval()
        return net, best

    def fit(self, x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray
            ) -> "PlainMLPBaseline":
        """Scaled inputs and PHYSICAL labels of the train and validation splits."""
        y_train = np.asarray(y_train, dtype=np.float64)
        y_val = np.asarray(y_val, dtype=np.float64)
        if len(x_train) < 10 or len(x_val) < 2:
            raise MLPBaselineError(f"plain MLP baseline: {len(x_train)} training and {len(x_val)} validation "
                                   "stars; need at least 10 and 2")
        kept = np.delete(np.asarray(x_train, dtype=np.float32), self.hidden_columns, axis=1) \
            if len(self.hidden_columns) else np.asarray(x_train, dtype=np.float32)
        self._indicator_cols = np.flatnonzero((~np.isfinite(kept)).any(axis=0))
        self.centre = np.nanmean(y_train, axis=0)
        scale = np.nanstd(y_train, axis=0)
        self.scale = np.where(scale > 0, scale, 1.0)
        ys_tr = ((y_train - self.centre) / self.scale).astype(np.float32)
        ys_va = ((y_val - self.centre) / self.scale).astype(np.float32)
        x_tr, x_va = self._inputs(x_train), self._inputs(x_val)
        keys = list(self.grid)
        best = (None, None, float("inf"))
        self.validation_scores = []
        for values in itertools.product(*(self.grid[k] for k in keys)):
            choice = dict(zip(keys, values))
            s = MLPSettings(**{**self.base_settings.__dict__, **choice})
            with one_torch_thread():
                net, score = self._train_one(s, x_tr, ys_tr, x_va, ys_va)
            self.validation_scores.append((choice, score))
            log.info("plain MLP %s: validation NMAD (scaled, mean over labels) %.4f", choice, score)
            if score < best[2]:
                best = (net, s, score)
        self.net, self.chosen = best[0], best[1]
        log.info("plain MLP: chose %s on the validation split", self.chosen)
        return self

    def chosen_grid(self) -> dict:
        """A one-point grid holding this network's chosen settings, to train other seeds at."""
        if self.chosen is None:
            raise MLPBaselineError("plain MLP baseline: call fit() before chosen_grid()")
        return {k: [getattr(self.chosen, k)] for k in self.grid}

    def predict(self, x: np.ndarray) -> np.ndarray:
        if self.net is None:
            raise MLPBaselineError("plain MLP baseline: call fit() before predict()")
        with torch.no_grad():
            ys = self.net(torch.from_numpy(self._inputs(x))).numpy().astype(np.float64)
        return ys * self.scale + self.centre


class PlainMLPEnsemble:
    """``n_members`` :class:`PlainMLPBaseline` networks with seeds ``seed + k``, one grid choice.

    ``predict`` is the MEAN of the members' predictions: the networks share one setting, so none
    is an outlier that a median would guard against, and the mean is the estimate whose variance
    averaging reduces most (with two members mean and median are the same). ``members[0]`` is
    the single network of the same seed and grid (``baseline_mlp_single``).
    """

    def __init__(self, labels: Sequence[str], n_members: int, seed: int = 0, hidden_columns: Sequence[int] = (),
                 grid: dict | None = None, settings: MLPSettings = MLPSettings()):
        if n_members < 1:
            raise MLPBaselineError(f"plain MLP ensemble: n_members is {n_members}; need at least 1")
        self.labels = list(labels)
        self.n_members = int(n_members)
        self.seed = int(seed)
        self.hidden_columns = list(hidden_columns)
        self.grid = grid
        self.settings = settings
        self.members: list[PlainMLPBaseline] = []

    @property
    def chosen(self) -> MLPSettings | None:
        return self.members[0].chosen if self.members else None

    def fit(self, x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray
            ) -> "PlainMLPEnsemble":
        """As :meth:`PlainMLPBaseline.fit`; the first member's grid search picks every member's settings."""
        first = PlainMLPBaseline(self.labels, self.seed, self.hidden_columns, self.grid, self.settings)
        self.members = [first.fit(x_train, y_train, x_val, y_val)]
        for k in range(1, self.n_members):
            self.members.append(PlainMLPBaseline(self.labels, self.seed + k, self.hidden_columns, first.chosen_grid(),
                                                 self.settings).fit(x_train, y_train, x_val, y_val))
        return self

    def predict_members(self, x: np.ndarray) -> np.ndarray:
        """Each member's physical point estimates, ``(K, n, L)``."""
        if not self.members:
            raise MLPBaselineError("plain MLP ensemble: call fit() before predict()")
        return np.stack([m.predict(x) for m in self.members])

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.predict_members(x).mean(axis=0)
