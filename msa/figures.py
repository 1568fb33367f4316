"""Figures (PNG, matplotlib's Agg backend): the atomic writer every stage's figures use, and training curves.

Every figure is written atomically (``msa.data.store.atomic_path``: temporary file in the same folder,
then rename), so a killed job never leaves a half-written PNG that Snakemake would take for a
finished output. Apart from that helper, imported where it is used, this module is a leaf.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


# how astronomers write each label on an axis; a unit of "dex" goes unsaid ([Fe/H], log g)
LABEL_SYMBOLS = {"teff": r"$T_\mathrm{eff}$", "logg": r"$\log g$", "fe_h": "[Fe/H]", "m_h": "[M/H]",
                 "alpha_m": r"[$\alpha$/M]", "alpha_fe": r"[$\alpha$/Fe]", "age": "age", "parallax": r"$\varpi$",
                 "mass": "mass", "radius": "radius"}


def label_symbol(label: str) -> str:
    """The symbol of ``label`` on a figure (``teff`` → T_eff), or the name itself."""
    return LABEL_SYMBOLS.get(label, label)


def axis_label(label: str, unit: str = "", prefix: str = "") -> str:
    """``prefix`` + symbol + `` / unit`` (the IAU style), e.g. ``T_eff / K``; no unit for dex or none."""
    text = f"{prefix}{label_symbol(label)}"
    return f"{text} / {unit}" if unit and unit != "dex" else text


def percentile_range(*arrays, low: float = 0.5, high: float = 99.5, pad: float = 0.05) -> tuple[float, float] | None:
    """An axis range holding the finite values between the ``low`` and ``high`` percentiles of all
    ``arrays`` (so one outlier does not squeeze the bulk), widened by ``pad`` of its width each side."""
    import numpy as np

    values = np.concatenate([np.ravel(np.asarray(a, dtype=np.float64)) for a in arrays]) if arrays else np.empty(0)
    values = values[np.isfinite(values)]
    if not len(values):
        return None
    lo, hi = np.percentile(values, [low, high])
    width = hi - lo if hi > lo else max(abs(lo), 1.0) * 0.1
    return float(lo - pad * width), float(hi + pad * width)


def save_figure(fig, path: str | Path, dpi: int = 120) -> Path:
    """Save ``fig`` to ``path`` atomically and close it."""
    from msa.data.store import atomic_path  # the package's one atomic writer

    path = Path(path)
    try:
        with atomic_path(path) as tmp:  # the temporary ends in .tmp: name the format explicitly
            fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format=path.suffix.lstrip(".") or "png")
    finally:
        plt.close(fig)
    return path


def _finite(values: Sequence) -> bool:
    return any(v is not None and math.isfinite(v) for v in values)


def plot_loss_curves(metrics: Sequence[dict], path: str | Path, title: str = "pretraining") -> Path:
    """Training and validation loss per epoch (plus each group's validation loss, dashed).

    ``metrics``: one dict per epoch with ``epoch``, ``train_loss``, optional ``val_loss`` and
    ``val_loss_groups`` (group → loss). Log y-axis when every plotted loss is positive.
    """
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    epochs = [m["epoch"] + 1 for m in metrics]
    plotted = []
    train = [m.get("train_loss") for m in metrics]
    if _finite(train):
        ax.plot(epochs, train, "o-", label="train", color="C0")
        plotted += train
    val = [m.get("val_loss") for m in metrics]
    if _finite(val):
        ax.plot(epochs, val, "s-", label="validation", color="C1")
        plotted += val
    groups = sorted({g for m in metrics for g in (m.get("val_loss_groups") or {})})
    for i, group in enumerate(groups):
        values = [(m.get("val_loss_groups") or {}).get(group) for m in metrics]
        if _finite(values):
            ax.plot(epochs, values, "--", lw=1, color=f"C{i + 2}", label=f"val: {group}")
            plotted += values
    finite = [v for v in plotted if v is not None and math.isfinite(v)]
    if finite and min(finite) > 0:
        ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("masked reconstruction loss")
    ax.set_title(title)
    if not metrics:
        ax.text(0.5, 0.5, "no completed epoch yet", ha="center", va="center", transform=ax.transAxes)
    else:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


# --- fine-tuning and evaluation figures ------------------------------------------------------------
def plot_finetune_loss(metrics: Sequence[dict], path: str | Path, title: str = "fine-tuning") -> Path:
    """Fine-tuning curves per epoch: train total and pinball, validation pinball (and per label, dashed).

    ``metrics``: one dict per epoch with ``epoch``, ``train_total``, ``train_pinball``,
    ``val_pinball`` and ``val_pinball_<label>``.
    """
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    epochs = [m["epoch"] + 1 for m in metrics]
    for key, style, label in (("train_total", "o-", "train (total)"), ("train_pinball", ".-", "train pinball"),
                              ("val_pinball", "s-", "validation pinball")):
        values = [m.get(key) for m in metrics]
        if _finite(values):
            ax.plot(epochs, values, style, label=label)
    per_label = sorted({k for m in metrics for k in m if k.startswith("val_pinball_")})
    for key in per_label:
        values = [m.get(key) for m in metrics]
        if _finite(values):
            ax.plot(epochs, values, "--", lw=1, label=key[len("val_pinball_"):])
    best = [m["epoch"] + 1 for m in metrics if m.get("best")]
    if best:
        ax.axvline(best[-1], color="grey", lw=0.8, ls=":", label="best epoch")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss (scaled labels)")
    ax.set_title(title)
    if metrics:
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "no completed epoch yet", ha="center", va="center", transform=ax.transAxes)
    ax.grid(alpha=0.3)
    return save_figure(fig, path)
