"""Losses: masked reconstruction (pretraining) and the pinball loss for quantiles (fine-tuning).

Reconstruction counts only entries that were hidden from the encoder AND present in the data:
an entry the encoder saw is not a prediction, and a missing entry has no target.

This module is a leaf: it imports nothing from the package.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

LOSS_KINDS = ("mae", "mse", "error_weighted")
BALANCES = ("entries", "groups")
QUANTILES = (0.16, 0.5, 0.84)
MIN_SCALED_ERROR = 1e-2  # floor on σ (scaled units): a reported error of ~0 must not dominate the loss


def _entry_terms(recon: torch.Tensor, target: torch.Tensor, target_err: torch.Tensor | None,
                 hidden: torch.Tensor, kind: str, min_error: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-entry weighted loss and weight, both zero where the entry does not count.

    Shapes ``(B, R)``. Targets are filled before subtracting so that NaN never reaches a gradient.
    """
    if kind not in LOSS_KINDS:
        raise ValueError(f"pretrain.loss: {kind!r} is not one of {list(LOSS_KINDS)}")
    if recon.shape != target.shape or hidden.shape != target.shape:
        raise ValueError(f"reconstruction loss: shapes differ (recon {tuple(recon.shape)}, "
                         f"target {tuple(target.shape)}, hidden {tuple(hidden.shape)})")
    recon = recon.float()
    counted = hidden & ~torch.isnan(target)
    diff = recon - torch.where(counted, target, torch.zeros_like(target)).float()
    if kind == "mae":
        per_entry = diff.abs()
    else:
        per_entry = diff.square()
    weight = counted.to(per_entry.dtype)
    if kind == "error_weighted":
        if target_err is None:
            raise ValueError("error_weighted loss needs target errors; pass target_err or use loss: mse")
        sigma = target_err.float().clamp_min(min_error)
        inv_var = torch.where(torch.isnan(sigma), torch.ones_like(sigma), sigma.pow(-2))
        weight = weight * inv_var
    per_entry = torch.where(counted, per_entry, torch.zeros_like(per_entry))
    return per_entry * weight, weight


def reconstruction_sums(recon, target, target_err, hidden, kind: str,
                        min_error: float = MIN_SCALED_ERROR) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of weighted losses and sum of weights over counted entries (for exact averaging
    across batches and ranks: loss = Σ sums / Σ weights)."""
    terms, weight = _entry_terms(recon, target, target_err, hidden, kind, min_error)
    return terms.sum(), weight.sum()


def reconstruction_loss(recon: torch.Tensor, target: torch.Tensor, target_err: torch.Tensor | None,
                        hidden: torch.Tensor, kind: str = "mse",
                        min_error: float = MIN_SCALED_ERROR) -> torch.Tensor:
    """Weighted mean reconstruction loss over entries hidden AND present; scalar.

    All tensors ``(B, R)`` over the reconstructed features, in scaled units. ``mae``: mean
    |r − t|; ``mse``: mean (r − t)²; ``error_weighted``: Σ w (r − t)² / Σ w with w = 1/σ²
    (σ = scaled error, floored at ``min_error``; NaN σ → w = 1), i.e. an inverse-variance
    weighted mean squared error. Zero (with a gradient path) when nothing counts.
    """
    total, weight = reconstruction_sums(recon, target, target_err, hidden, kind, min_error)
    return total / weight.clamp_min(1e-12)


def per_group_sums(recon, target, target_err, hidden, kind: str, groups: Mapping[str, Sequence[int]],
                   min_error: float = MIN_SCALED_ERROR) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Like :func:`reconstruction_sums`, separately for each group; ``groups`` maps a group name
    to column positions within ``recon``."""
    terms, weight = _entry_terms(recon, target, target_err, hidden, kind, min_error)
    out = {}
    for name, cols in groups.items():
        cols = torch.as_tensor(list(cols), dtype=torch.long, device=terms.device)
        out[name] = (terms[:, cols].sum(), weight[:, cols].sum())
    return out


def per_group_loss(recon, target, target_err, hidden, kind: str, groups: Mapping[str, Sequence[int]],
                   min_error: float = MIN_SCALED_ERROR) -> dict[str, torch.Tensor]:
    """Each group's mean loss (same definition as :func:`reconstruction_loss`); NaN for a group
    with no counted entry."""
    sums = per_group_sums(recon, target, target_err, hidden, kind, groups, min_error)
    return {name: (s / w if w > 0 else torch.full_like(s, float("nan"))) for name, (s, w) in sums.items()}


def reconstruction_objective(recon, target, target_err, hidden, kind: str, groups: Mapping[str, Sequence[int]],
                             balance: str = "entries", min_error: float = MIN_SCALED_ERROR) -> torch.Tensor:
    """The reconstruction term that training minimises; scalar.

    ``balance: entries`` is :func:`reconstruction_loss` over every counted entry: with error
    weights a few high-S/N XP coefficients then carry almost all the weight and photometry next
    to none. ``balance: groups`` is the mean over groups (XP, Gaia photometry, survey photometry,
    …) of each group's own weighted mean, so every kind of input is learned, whatever its count
    of columns or the size of its errors. A group without a counted entry is left out.
    """
    if balance not in BALANCES:
        raise ValueError(f"pretrain.loss_balance: {balance!r} is not one of {list(BALANCES)}")
    if balance == "entries":
        return reconstruction_loss(recon, target, target_err, hidden, kind, min_error)
    sums = per_group_sums(recon, target, target_err, hidden, kind, groups, min_error)
    means = [s / w for s, w in sums.values() if w > 0]
    if not means:
        return recon.float().sum() * 0.0
    return torch.stack(means).mean()


def pinball_loss(q: torch.Tensor, y: torch.Tensor, weights: torch.Tensor | None = None,
                 quantiles: Sequence[float] = QUANTILES) -> torch.Tensor:
    """Quantile (pinball) loss; scalar.

    ``q`` (B, L, 3) predicted quantiles at ``quantiles``; ``y`` (B, L) labels, NaN = no label
    (ignored); ``weights`` (B, L) optional per-element weights. The result is the mean over
    present (star, label) elements of ``weight × Σ_τ ρ_τ(y − q_τ) / 3``; with no weights, the
    plain mean. Zero (with a gradient path) when no label is present.
    """
    if q.shape[:-1] != y.shape or q.shape[-1] != len(quantiles):
        raise ValueError(f"pinball loss: q {tuple(q.shape)} does not fit y {tuple(y.shape)} "
                         f"with {len(quantiles)} quantiles")
    present = ~torch.isnan(y)
    tau = torch.as_tensor(quantiles, dtype=q.dtype, device=q.device)
    resid = torch.where(present, y, torch.zeros_like(y)).unsqueeze(-1) - q
    rho = torch.maximum(tau * resid, (tau - 1) * resid).mean(-1)
    if weights is not None:
        rho = rho * torch.where(present, weights, torch.zeros_like(weights))
    rho = torch.where(present, rho, torch.zeros_like(rho))
    return rho.sum() / present.sum().clamp_min(1)
