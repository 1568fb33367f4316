"""Figures of sampled XP spectra and of the reconstruction's error by magnitude (PNG, atomic writes).

A leaf beside ``msa.figures``: the spectra figures of ``msa evaluate-reconstruction``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from msa.figures import plt, save_figure

_STYLES = {"observed": dict(color="black", lw=1.6), "kNN on photometry": dict(color="0.55", lw=1.2, ls="--")}


def plot_spectra(path: str | Path, wavelengths: np.ndarray, source_ids: np.ndarray, fluxes: dict[str, np.ndarray],
                 spread: np.ndarray | None = None, errors: dict[str, np.ndarray] | None = None,
                 title: str | None = None) -> Path:
    """One panel per star: each entry of ``fluxes`` (name → ``(n_stars, W)``, W m⁻² nm⁻¹) against
    wavelength (nm); ``spread`` shades ±1 model spread around the first non-observed curve;
    ``errors`` (name → per-star relative flux error) goes into the legend."""
    n = len(source_ids)
    shaded = next((name for name in fluxes if name != "observed"), None)
    fig, axes = plt.subplots(n, 1, figsize=(7.0, 2.2 * n), sharex=True, squeeze=False)
    for i, ax in enumerate(axes[:, 0]):
        for name, flux in fluxes.items():
            label = name if not errors or name not in errors else f"{name} (rel. err. {errors[name][i]:.3f})"
            ax.plot(wavelengths, flux[i], label=label, **_STYLES.get(name, dict(lw=1.2)))
            if spread is not None and name == shaded:
                ax.fill_between(wavelengths, flux[i] - spread[i], flux[i] + spread[i], alpha=0.3, lw=0)
        ax.set_ylabel("flux (W m⁻² nm⁻¹)", fontsize=7)
        ax.set_title(f"source_id {int(source_ids[i])}", fontsize=8)
        ax.legend(fontsize=7, loc="upper right")
    axes[-1, 0].set_xlabel("wavelength (nm)")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_error_by_g(path: str | Path, by_g: list[dict]) -> Path:
    """Median relative flux error of the model and of the kNN per G bin (``metrics.json``'s ``by_g``)."""
    labels = [f"{'' if b['g_min'] is None else b['g_min']:}–{'' if b['g_max'] is None else b['g_max']}\n"
              f"n={b['n']}" for b in by_g]
    pos = np.arange(len(by_g))
    fig, ax = plt.subplots(figsize=(6.0, 3.2))
    for offset, who, colour in ((-0.2, "model", "C0"), (0.2, "knn", "0.55")):
        ax.bar(pos + offset, [b["relative_flux_error"][who] for b in by_g], width=0.4, color=colour,
               label="model, XP hidden" if who == "model" else "kNN on photometry")
    ax.set_xticks(pos, labels, fontsize=7)
    ax.set_xlabel("G (mag)")
    ax.set_ylabel("median relative flux error")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)
