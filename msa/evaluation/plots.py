"""The evaluation's figures: predicted against true, residuals against G, interval coverage."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

from msa.calibration import BASES
from msa.figures import axis_label, label_symbol, percentile_range, plt, save_figure


def _panels(n: int, size: float = 3.2):
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(size * cols, size * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:n])


def plot_predicted_vs_true(y, q, labels: Sequence[str], path: str | Path, baseline=None,
                           units: dict[str, str] | None = None) -> Path:
    """Predicted median (with calibrated [q16, q84] bars) against the true value, one panel per label.

    ``y``: ``(n, L)`` true values; ``q``: ``(n, L, 3)`` quantiles; ``baseline``: optional ``(n, L)``;
    ``units``: label → unit, on the axes. Both axes span the 0.5–99.5th percentiles of the true and
    predicted values (a count of the stars outside is printed in the panel), so a few outliers do not
    squeeze the bulk.
    """
    import numpy as np

    units = units or {}
    fig, axes = _panels(len(labels))
    for j, (ax, name) in enumerate(zip(axes, labels)):
        ok = np.isfinite(y[:, j]) & np.isfinite(q[:, j, 1])
        t, m = y[ok, j], q[ok, j]
        if baseline is not None:
            ax.scatter(t, baseline[ok, j], s=3, color="C1", alpha=0.4, label="baseline", zorder=1)
        ax.errorbar(t, m[:, 1], yerr=[m[:, 1] - m[:, 0], m[:, 2] - m[:, 1]], fmt=".", ms=2, lw=0.3,
                    color="C0", alpha=0.5, label="model", zorder=2)
        limits = percentile_range(t, m[:, 1])
        if limits is not None:
            ax.plot(limits, limits, "k-", lw=0.8)
            ax.set_xlim(limits)
            ax.set_ylim(limits)
            outside = int(np.sum((t < limits[0]) | (t > limits[1]) | (m[:, 1] < limits[0]) | (m[:, 1] > limits[1])))
            if outside:
                ax.text(0.97, 0.03, f"{outside} outside", transform=ax.transAxes, ha="right", fontsize=7)
        unit = units.get(name, "")
        ax.set_xlabel(axis_label(name, unit, "true "))
        ax.set_ylabel(axis_label(name, unit, "predicted "))
        ax.set_title(f"{label_symbol(name)} (n={int(ok.sum())})", fontsize=9)
        ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    return save_figure(fig, path)


def plot_residuals_vs_g(y, q, g_mag, labels: Sequence[str], path: str | Path,
                        units: dict[str, str] | None = None) -> Path:
    """Residual Δ = predicted median − true against Gaia G, one panel per label, with a running
    median; the Δ axis is symmetric about 0 and spans the 1–99th percentiles of |Δ|."""
    import numpy as np

    units = units or {}
    fig, axes = _panels(len(labels))
    for j, (ax, name) in enumerate(zip(axes, labels)):
        ok = np.isfinite(y[:, j]) & np.isfinite(q[:, j, 1]) & np.isfinite(g_mag)
        g, d = g_mag[ok], q[ok, j, 1] - y[ok, j]
        ax.scatter(g, d, s=3, alpha=0.4)
        ax.axhline(0, color="k", lw=0.8)
        if len(d):
            reach = float(np.percentile(np.abs(d), 99)) * 1.1 or 1.0
            ax.set_ylim(-reach, reach)
        if len(g) >= 20:
            edges = np.quantile(g, np.linspace(0, 1, 9))
            centres, medians = [], []
            for lo, hi in zip(edges[:-1], edges[1:]):
                sel = (g >= lo) & (g <= hi)
                if sel.any():
                    centres.append(np.median(g[sel]))
                    medians.append(np.median(d[sel]))
            ax.plot(centres, medians, "r-", lw=1.5, label="running median")
            ax.legend(fontsize=7)
        ax.set_xlabel("G / mag")
        ax.set_ylabel(axis_label(name, units.get(name, ""), "Δ ") + "  (predicted − true)")
    fig.tight_layout()
    return save_figure(fig, path)


def plot_coverage(metrics: dict, path: str | Path) -> Path:
    """Coverage of [q16, q84] per label: before/after calibration, XP on and off, vs the target."""
    import numpy as np

    labels = metrics["labels"]
    bars = [("model", "coverage_before", "XP on, uncalibrated"), ("model", "coverage", "XP on, calibrated"),
            ("model_no_xp", "coverage_before", "XP off, uncalibrated"),
            ("model_no_xp", "coverage", "XP off, calibrated")]
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(labels), 3.6))
    x = np.arange(len(labels))
    width = 0.8 / len(bars)
    for i, (section, key, text) in enumerate(bars):
        values = [((metrics.get(section) or {}).get(n, {}).get("overall", {}).get(key)) for n in labels]
        ax.bar(x + (i - (len(bars) - 1) / 2) * width, [np.nan if v is None else v for v in values], width,
               label=text)
    target = metrics.get("coverage_target")
    if target is not None:
        ax.axhline(target, color="k", ls="--", lw=1, label=f"target {target:g}")
    ax.set_xticks(x, [label_symbol(n) for n in labels])
    ax.set_ylim(0, 1)
    ax.set_ylabel("fraction inside [q16, q84]")
    ax.legend(fontsize=7, loc="lower right")
    return save_figure(fig, path)


def _g_bin_centres(edges: Sequence[float]) -> list[float]:
    """x positions of the bins of ``bin_masks`` (``edges``): open-ended bins half a bin beyond their edge."""
    import numpy as np

    if not edges:
        return [0.0]
    step = float(np.median(np.diff(edges))) if len(edges) > 1 else 1.0
    return [edges[0] - step / 2] + [0.5 * (a + b) for a, b in zip(edges[:-1], edges[1:])] + [edges[-1] + step / 2]


def _coverage_panels(metrics: dict, curves, min_stars: int, path: str | Path) -> Path:
    """One panel per label of coverage against G: the target, ±0.05 (grey band) and each curve
    ``(bins of the label → {bin: {n, coverage}}, matplotlib style keywords)`` of ``curves(label)``;
    bins with fewer than ``min_stars`` stars are not drawn."""
    centres = _g_bin_centres(list((metrics.get("by_g_mag") or {}).get("bins") or []))
    labels = metrics["labels"]
    fig, axes = _panels(len(labels))
    target = metrics.get("coverage_target") or 0.68
    for ax, name in zip(axes, labels):
        ax.axhspan(target - 0.05, target + 0.05, color="grey", alpha=0.2, lw=0)
        ax.axhline(target, color="k", lw=0.8)
        for bins, style in curves(name):
            points = [(centre, entry["coverage"]) for centre, entry in zip(centres, bins.values())
                      if entry["n"] >= min_stars and entry["coverage"] is not None]
            if points:
                ax.plot(*zip(*points), marker="o", ms=3, **style)
        ax.set_ylim(0, 1)
        ax.set_xlabel("G / mag")
        ax.set_ylabel("coverage of [q16, q84]")
        ax.set_title(label_symbol(name), fontsize=9)
        ax.legend(fontsize=6, loc="lower left")
    fig.tight_layout()
    return save_figure(fig, path)


def plot_coverage_vs_g(metrics: dict, path: str | Path, min_stars: int = 20) -> Path:
    """Calibrated [q16, q84] coverage per G bin, one panel per label: test stars with XP and with XP
    hidden (solid), their emulated faint copies (dashed), the target and ±0.05 (grey band).

    Reads ``metrics["by_g_mag"]`` (:func:`msa.evaluation.evaluate.magnitude_report` sections); bins with fewer
    than ``min_stars`` stars are not drawn. Open-ended bins sit half a bin beyond their edge.
    """
    section = metrics.get("by_g_mag") or {}
    styles = [("test", "with_xp", "C0", "-", "test, XP"), ("test", "without_xp", "C1", "-", "test, XP hidden"),
              ("emulated", "with_xp", "C0", "--", "faint copies, XP"),
              ("emulated", "without_xp", "C1", "--", "faint copies, no XP")]

    def curves(name):
        return [(((section.get(source) or {}).get(view) or {}).get(name) or {},
                 {"color": colour, "ls": style, "label": text}) for source, view, colour, style, text in styles]

    return _coverage_panels(metrics, curves, min_stars, path)


BASIS_COLOURS = dict(zip(BASES, ("C0", "C2", "C1", "C3")))  # one colour per interval basis, in BASES' order


def plot_coverage_vs_g_by_basis(metrics: dict, path: str | Path, min_stars: int = 20) -> Path:
    """Calibrated [q16, q84] coverage per G bin of the test stars by ``interval_basis`` (colour),
    with XP (solid: the stars that have it) and with XP hidden (dashed), one panel per label: which
    promise holds where. Reads ``metrics["by_g_mag"]["by_basis"]``; bins with fewer than
    ``min_stars`` stars are not drawn."""
    section = (metrics.get("by_g_mag") or {}).get("by_basis") or {}

    def curves(name):
        return [((section.get(view) or {}).get(basis, {}).get(name) or {},
                 {"color": colour, "ls": style, "label": f"{basis}, {text}"})
                for view, style, text in (("with_xp", "-", "XP"), ("without_xp", "--", "XP hidden"))
                for basis, colour in BASIS_COLOURS.items()]

    return _coverage_panels(metrics, curves, min_stars, path)
