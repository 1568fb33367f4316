"""The representation's own measure: a linear probe from a frozen latent to the labels.

Ridge regression per label from features of the train split, its penalty chosen on the validation
split, scored (NMAD) on an evaluation split. The same probe reads three kinds of features, so the
pretrained latent is judged against fair yardsticks: the latent of the pretrained encoder, the
latent of the same architecture freshly initialised (a random encoder), and the raw scaled inputs
(missing entries as 0 beside a 0/1 missing indicator). Each is read with the stars' XP and with
every XP column hidden. Cheap: one encoder pass over the labelled stars and a few small solves.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch

from msa.data.layout import Layout
from msa.nn.model import MaskedAutoencoder
from msa.nn.robust_stats import nmad

LAMBDAS = tuple(10.0 ** k for k in range(-3, 5))


def ridge_probe(train: tuple[np.ndarray, np.ndarray], validation: tuple[np.ndarray, np.ndarray],
                evaluation: tuple[np.ndarray, np.ndarray], lambdas: Sequence[float] = LAMBDAS) -> list[dict]:
    """Per label: ``{"nmad", "lambda"}`` of ridge from features to that label.

    Each split is ``(features (n, d), labels (n, L))``; NaN labels are left out of that label's fit
    and scores. Features are standardised with the train split's mean and spread; the intercept is
    not penalised. ``lambda`` is the penalty (on standardised features, per train star) with the
    lowest validation NMAD; ``nmad`` is the evaluation split's at that penalty.
    """
    f_train, y_train = train
    mean, std = f_train.mean(0), f_train.std(0)
    std = np.where(std > 0, std, 1.0)

    def design(f):
        return np.column_stack([(f - mean) / std, np.ones(len(f))])

    a_train, a_val, a_eval = design(f_train), design(validation[0]), design(evaluation[0])
    penalty = np.eye(a_train.shape[1])
    penalty[-1, -1] = 0.0
    out = []
    for j in range(y_train.shape[1]):
        ok = np.isfinite(y_train[:, j])
        a, y = a_train[ok], y_train[ok, j]
        gram, rhs = a.T @ a, a.T @ y
        best = None
        for lam in lambdas:
            w = np.linalg.solve(gram + lam * len(y) * penalty, rhs)
            score = float(nmad(validation[1][:, j] - a_val @ w))
            if best is None or score < best[0]:
                best = (score, lam, w)
        out.append({"nmad": float(nmad(evaluation[1][:, j] - a_eval @ best[2])), "lambda": best[1]})
    return out


def raw_features(x: np.ndarray, hidden: np.ndarray) -> np.ndarray:
    """Scaled inputs with unseen entries as 0, beside a 0/1 unseen indicator per column (a column
    no star misses is constant, and ridge leaves it at zero weight)."""
    unseen = hidden | np.isnan(x)
    return np.column_stack([np.where(unseen, 0.0, x), unseen.astype(np.float64)])


@torch.no_grad()
def encoder_features(model: MaskedAutoencoder, x: np.ndarray, hidden: np.ndarray, batch: int = 4096) -> np.ndarray:
    """The frozen latent ``(n, latent_dim)`` of ``model`` for inputs ``x`` with ``hidden`` entries unseen."""
    model.eval()
    parts = [model.encode(torch.from_numpy(x[i:i + batch]).float(), torch.from_numpy(hidden[i:i + batch]))
             for i in range(0, len(x), batch)]
    return torch.cat(parts).double().numpy() if parts else np.empty((0, model.latent_dim))


def random_encoder(hparams: Mapping, seed: int) -> MaskedAutoencoder:
    """The pretrained model's architecture, freshly initialised from ``seed``."""
    torch.manual_seed(seed)
    return MaskedAutoencoder(**hparams)


def linear_probe(model: MaskedAutoencoder, hparams: Mapping, layout: Layout, splits: Mapping,
                 labels: Sequence[str], evaluation: str = "validation", seed: int = 0,
                 always_hidden: Sequence[int] = ()) -> dict:
    """The probe table: ``{view: {features: {label: {"nmad", "lambda"}}}}``.

    ``splits`` maps ``train``, ``validation`` and ``evaluation`` to objects with ``x`` (scaled
    inputs, NaN = missing) and ``y`` (labels); views ``xp`` (the stars as they are) and ``no_xp``
    (every XP column hidden); features ``pretrained``, ``random_encoder`` and ``raw_inputs``.
    ``always_hidden``: feature positions no view sees (the forced mask, an input that is a label).
    """
    random_model = random_encoder(hparams, seed)
    names = ("train", "validation", evaluation)
    table = {}
    for view in ("xp", "no_xp"):
        def hidden_of(x):
            h = np.isnan(x)
            h[:, list(always_hidden)] = True
            if view == "no_xp":
                h[:, layout.xp_indices] = True
            return h

        per_split = {n: (splits[n].x, hidden_of(splits[n].x), splits[n].y) for n in names}
        extract = {
            "pretrained": lambda x, h: encoder_features(model, x, h),
            "random_encoder": lambda x, h: encoder_features(random_model, x, h),
            "raw_inputs": raw_features,
        }
        table[view] = {}
        for kind, fn in extract.items():
            sets = [(fn(x, h), y) for x, h, y in (per_split[n] for n in names)]
            scores = ridge_probe(*sets)
            table[view][kind] = dict(zip(labels, scores))
    return table
