"""Figures (PNG, matplotlib's Agg backend): training curves, and evaluation figures appended below.

Every figure is written atomically (temporary file in the same folder, then rename), so a killed
job never leaves a half-written PNG that Snakemake would take for a finished output.

This module is a leaf: it imports nothing from the package.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def save_figure(fig, path: str | Path, dpi: int = 120) -> Path:
    """Save ``fig`` to ``path`` atomically and close it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)
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
