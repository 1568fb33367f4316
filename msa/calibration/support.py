"""How well the labelled stars cover a star's inputs: its ``support`` and ``low_support`` flag.

A conformal interval keeps its promise for stars like the ones its offsets were fitted on. The
support says how like them a star is, in the members' own representation of its inputs:

* at calibration, ``msa calibrate`` keeps an *index*: the latent (encoder output of the first
  member, the one prediction already runs) of the labelled stars it scores (the calibration split,
  a uniform sample of the labelled stars) and of the calibration survey stars, in each view: ``xp``
  (the stars with XP, seen with it) and ``no_xp`` (every one of them with its XP hidden), at most
  ``calibrate.support.max_rows`` stars a view, so that it stays small on the full sky;
* its *reference*: each index star's mean distance to its ``k`` nearest other index stars
  (leave-one-out), ``k`` = ``calibrate.support.neighbours``;
* at prediction, a star's mean distance ``d`` to its ``k`` nearest index stars of its own view
  (with XP where it has XP, the ``no_xp`` view otherwise) gives ``support`` = the fraction of
  reference distances ≥ ``d``: 1 for a star as close to the labelled stars as they are to one
  another, 0 for a star farther than every one of them. ``low_support`` = ``support`` below its
  view's ``calibrate.support.low_threshold``: the labelled and survey stars hardly cover this star,
  so its interval's promise (``interval_basis``) is for stars unlike it.

Why a threshold per view: the two views' supports mean different things in practice. Without XP
the stars fainter than every labelled star sit far from the index whatever their kind, so a low
threshold already flags them; with XP the support has to reach further into the reference
distances to find the stars of kinds the labelled stars lack. Both defaults are the largest
threshold that flags at most 15 % of the common stars of the faint-coverage benchmark's train
sky (``benchmarks/bench_faint_coverage.py``; docs/results.md §7 has the rates).

Why the fine-tuned member's encoder: prediction runs it anyway (no second model to load), and
fine-tuning shaped its latent towards the labels, so distances there follow the differences that
matter for them. An index star predicted itself finds itself at distance 0 among its neighbours,
so its support is a little higher than a new star's in the same place.

Distances run in torch on the ensemble's device: one fused matrix product a chunk, a star costing
one product with the ``max_rows`` index stars (on CPU, with the default 10,000, prediction keeps
0.70 of its rate; with 50,000, 0.24: docs/results.md §7); the rest is numpy.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from msa.errors import InputError

log = logging.getLogger(__name__)

VIEWS = ("xp", "no_xp")
QUERY_ROWS = 2048  # stars a distance matrix holds at once: 2048 × 10,000 float32 = 80 MB


class SupportError(InputError, ValueError):
    """A support index that cannot be read or does not fit the members."""


def support_index_path(calibration_path: str | Path) -> Path:
    """Where ``msa calibrate`` writes the support index of a calibration: beside it, ``X.support.npz``."""
    path = Path(calibration_path)
    return path.with_name(f"{path.stem}.support.npz")


def cap_rows(n: int, max_rows: int, seed: int) -> np.ndarray:
    """Sorted row indices of a uniform seeded sample of at most ``max_rows`` of ``n`` rows."""
    if n <= max_rows:
        return np.arange(n)
    return np.sort(np.random.default_rng([seed, 28]).choice(n, size=max_rows, replace=False))


def neighbour_distances(index, query: np.ndarray, k: int, device="cpu",
                        leave_one_out: bool = False) -> np.ndarray:
    """Mean Euclidean distance ``(n_query,)`` of each query row to its ``k`` nearest ``index`` rows
    (an array, or a float32 tensor already on ``device``); ``leave_one_out`` (query = index) drops
    each row's own zero distance. NaN for a query row that is not finite, or for every row when
    the index holds no star."""
    import torch

    query = np.asarray(query, dtype=np.float32)
    out = np.full(len(query), np.nan, dtype=np.float64)
    k_used = min(k + int(leave_one_out), len(index))
    if k_used - int(leave_one_out) < 1:
        return out
    ok = np.all(np.isfinite(query), axis=1)
    reference = torch.as_tensor(index, dtype=torch.float32, device=device)
    reference_norm = reference.pow(2).sum(1)
    rows = np.flatnonzero(ok)
    with torch.inference_mode():
        for start in range(0, len(rows), QUERY_ROWS):
            part = rows[start:start + QUERY_ROWS]
            q = torch.as_tensor(query[part], device=device)
            # |a-b|² = |a|² + |b|² − 2ab. |a|² is the same along a row, so the nearest are found on
            # |b|² − 2ab (one fused matrix product, no other pass over the n_query × n_index
            # matrix: on CPU those passes cost twice the product) and |a|² is added to the k kept
            nearest = torch.topk(torch.addmm(reference_norm, q, reference.T, alpha=-2), k_used,
                                 dim=1, largest=False).values
            nearest = (nearest + q.pow(2).sum(1, keepdim=True)).clamp_min(0).sqrt()  # ≥ 0 against rounding
            if leave_one_out:
                nearest = nearest[:, 1:]  # the row itself, at distance 0
            out[part] = nearest.mean(dim=1).double().cpu().numpy()
    return out


def support_from_distances(reference: np.ndarray, distance: np.ndarray) -> np.ndarray:
    """Fraction ``(n,)`` float32 of the sorted ``reference`` distances ≥ each ``distance`` (NaN stays NaN)."""
    reference = np.asarray(reference, dtype=np.float64)
    distance = np.asarray(distance, dtype=np.float64)
    out = np.full(len(distance), np.nan, dtype=np.float32)
    if not len(reference):
        return out
    ok = np.isfinite(distance)
    below = np.searchsorted(reference, distance[ok], side="left")  # reference distances < d
    out[ok] = 1.0 - below / len(reference)
    return out


@dataclass
class SupportIndex:
    """Per view: the index stars' latents and their sorted leave-one-out reference distances."""

    latent: dict  # view → (n, D) float32
    reference: dict  # view → (n,) float64, sorted
    k: int
    low_threshold: dict  # view → float: low_support = support below it
    member_sha256: list
    _on_device: dict = field(default_factory=dict, repr=False)  # (view, device) → the latent as a tensor

    @classmethod
    def build(cls, latent_by_view: Mapping[str, np.ndarray], k: int, max_rows: int,
              low_threshold: Mapping[str, float] | float, member_sha256: Sequence[str], seed: int,
              device="cpu") -> "SupportIndex":
        """The index of at most ``max_rows`` stars of each view (``latent_by_view``: view → ``(n, D)``);
        ``low_threshold``: view → threshold, or one number for both views."""
        if k < 1 or max_rows < 2:
            raise SupportError(f"calibrate.support: neighbours ({k}) must be >= 1 and max_rows ({max_rows}) >= 2")
        latent, reference = {}, {}
        for view in VIEWS:
            z = np.asarray(latent_by_view.get(view, np.empty((0, 0))), dtype=np.float32)
            z = z[np.all(np.isfinite(z), axis=1)] if z.ndim == 2 and len(z) else np.empty((0, z.shape[-1]), np.float32)
            z = z[cap_rows(len(z), max_rows, seed)]
            latent[view] = z
            reference[view] = np.sort(neighbour_distances(z, z, k, device, leave_one_out=True))
            log.info("support index, %s view: %d star(s), median distance to %d nearest %.4g", view, len(z), k,
                     np.median(reference[view]) if len(z) else math.nan)
        return cls(latent, reference, int(k), thresholds_by_view(low_threshold), list(member_sha256))

    def support(self, latent: np.ndarray, has_xp: np.ndarray, device="cpu") -> np.ndarray:
        """``support`` ``(n,)`` float32 of stars with first-member ``latent`` ``(n, D)``: those with
        XP against the ``xp`` view, the others against ``no_xp``. NaN where the latent is not finite."""
        latent = np.asarray(latent, dtype=np.float32)
        has_xp = np.asarray(has_xp, dtype=bool)
        out = np.full(len(latent), np.nan, dtype=np.float32)
        for view, rows in (("xp", has_xp), ("no_xp", ~has_xp)):
            if rows.any():
                d = neighbour_distances(self._index_tensor(view, device), latent[rows], self.k, device)
                out[rows] = support_from_distances(self.reference[view], d)
        return out

    def _index_tensor(self, view: str, device):
        """The view's index on ``device``, copied there once (not once a chunk)."""
        import torch

        key = (view, str(device))
        if key not in self._on_device:
            self._on_device[key] = torch.as_tensor(self.latent[view], dtype=torch.float32, device=device)
        return self._on_device[key]

    def low_support(self, support: np.ndarray, has_xp: np.ndarray) -> np.ndarray:
        """Bool: support below the threshold of the star's view (``has_xp``: the XP view's, else the
        XP-hidden view's); a star without a support value is not flagged."""
        threshold = np.where(np.asarray(has_xp, dtype=bool), self.low_threshold["xp"], self.low_threshold["no_xp"])
        with np.errstate(invalid="ignore"):
            return np.asarray(support) < threshold

    def save(self, path: str | Path) -> None:
        """Write the index as ``.npz``, atomically (a temporary name, then renamed)."""
        from msa.data.store import atomic_path

        arrays = {f"{kind}_{view}": getattr(self, kind)[view] for kind in ("latent", "reference") for view in VIEWS}
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as out:  # a file object: np.savez would add .npz to the temporary name
                np.savez(out, k=self.k, **{f"low_threshold_{v}": self.low_threshold[v] for v in VIEWS},
                         member_sha256=np.array(self.member_sha256, dtype=str), **arrays)

    @classmethod
    def load(cls, path: str | Path, member_sha256: Sequence[str] | None = None) -> "SupportIndex":
        """Read an index; with ``member_sha256``, refused unless it was made for exactly those members."""
        try:
            with np.load(path) as data:
                # an index of before the per-view thresholds holds one, ``low_threshold``, for both
                thresholds = ({v: float(data[f"low_threshold_{v}"]) for v in VIEWS} if "low_threshold_xp" in data
                              else float(data["low_threshold"]))
                index = cls({v: data[f"latent_{v}"] for v in VIEWS}, {v: data[f"reference_{v}"] for v in VIEWS},
                            int(data["k"]), thresholds_by_view(thresholds), data["member_sha256"].tolist())
        except (OSError, KeyError, ValueError) as err:
            raise SupportError(f"cannot read support index {path}: {err}; re-run `msa calibrate`") from err
        if member_sha256 is not None and sorted(index.member_sha256) != sorted(member_sha256):
            raise SupportError(f"support index {path} was made for members {index.member_sha256}, not "
                               f"{list(member_sha256)}; re-run `msa calibrate` for these members")
        return index


def thresholds_by_view(low_threshold: Mapping[str, float] | float) -> dict:
    """``{view: threshold}`` of a ``calibrate.support.low_threshold`` setting (one number: both views)."""
    if isinstance(low_threshold, Mapping):
        missing = [v for v in VIEWS if v not in low_threshold]
        if missing:
            raise SupportError(f"calibrate.support.low_threshold has no {missing}; give a threshold for each of {VIEWS}")
        return {v: float(low_threshold[v]) for v in VIEWS}
    return {v: float(low_threshold) for v in VIEWS}


def first_member_latent(ensemble, x: np.ndarray, extra_hidden=None, batch: int = 4096) -> np.ndarray:
    """The latent ``(n, D)`` the support compares: the first member's encoder output for ``x``, as
    prediction computes it (stars without visible XP through the photometry-only member, if any)."""
    _, latent = ensemble.predict_members(x, extra_hidden=extra_hidden, batch_size=batch, return_latent=True)
    return latent


def index_latents(ensemble, x: np.ndarray, max_rows: int, seed: int, batch: int) -> dict:
    """Latents of the labelled stars ``x`` (scaled inputs) in both views, each capped at ``max_rows``
    stars before the forward pass (the index of a full-sky label set stays cheap to build)."""
    xp_hidden = np.zeros(ensemble.layout.n_features, dtype=bool)
    xp_hidden[ensemble.layout.xp_indices] = True
    with_xp = np.flatnonzero(ensemble.has_xp(x))
    rows_xp = with_xp[cap_rows(len(with_xp), max_rows, seed)]
    rows_all = cap_rows(len(x), max_rows, seed)
    dim = ensemble.latent_dim
    return {"xp": first_member_latent(ensemble, x[rows_xp], batch=batch) if len(rows_xp)
            else np.empty((0, dim), np.float32),
            "no_xp": first_member_latent(ensemble, x[rows_all], xp_hidden, batch) if len(rows_all)
            else np.empty((0, dim), np.float32)}
