"""Derived features: from raw store columns to the model's value and error matrices.

The store keeps values as delivered by the Archive; everything the model sees is computed here,
in one place, for every stage (scaler fitting, pretraining, fine-tuning, prediction):

* XP coefficients and their errors, optionally divided by the G-band flux relative to G = 15
  (``features.xp.normalise: g_flux``), so that spectra of stars of any brightness share a scale;
* magnitude errors derived from ``phot_*_mean_flux_over_error`` (σ_m = 2.5 / ln 10 / (F/σ_F))
  for error names of the form ``phot_X_mean_mag_error``;
* with ``features.colours_relative_to: phot_g_mean_mag``, every other magnitude becomes a colour
  ``m − G`` (its error kept as the band's own: G errors are far smaller). Star to star, magnitudes
  differ mostly by distance, colours by temperature, metallicity and extinction; a network given
  magnitudes must resolve differences of a few hundredths of their spread to recover colours;
* every other feature and error column is read from the store unchanged.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from msa.data.layout import XP_GROUP, Layout

G_MAG = "phot_g_mean_mag"
G_REFERENCE_MAG = 15.0
MAG_ERROR_SUFFIX = "_mag_error"
MAG_PER_LN = 2.5 / np.log(10.0)


def flux_over_error_column(error_name: str) -> str | None:
    """``phot_g_mean_mag_error`` → ``phot_g_mean_flux_over_error``; None for other names."""
    if error_name.startswith("phot_") and error_name.endswith("_mean" + MAG_ERROR_SUFFIX):
        return error_name[: -len(MAG_ERROR_SUFFIX)] + "_flux_over_error"
    return None


def mag_error_from_flux_over_error(flux_over_error: np.ndarray) -> np.ndarray:
    """Magnitude error from a flux signal-to-noise ratio (NaN where it is not positive)."""
    foe = np.asarray(flux_over_error, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        err = np.where(foe > 0, MAG_PER_LN / foe, np.nan)
    return err.astype(np.float32)


def xp_normalises(features_cfg: Mapping) -> bool:
    return (features_cfg.get("xp") or {}).get("normalise", "g_flux") == "g_flux"


def g_flux_factor(g_mag: np.ndarray) -> np.ndarray:
    """10^(0.4 (G − 15)), float64: an XP coefficient times this is the spectrum the star would have
    at G = 15 (``features.xp.normalise: g_flux``); NaN where G is missing."""
    return np.power(10.0, 0.4 * (np.asarray(g_mag, dtype=np.float64) - G_REFERENCE_MAG))


def xp_to_archive_units(xp_values: np.ndarray, g_mag: np.ndarray | None) -> np.ndarray:
    """Undo the G normalisation of derived XP values ``(n, k)``: coefficients (or their errors) in
    the Archive's units, float64. ``g_mag`` None: the layout does not normalise, values pass through."""
    values = np.asarray(xp_values, dtype=np.float64)
    return values if g_mag is None else values / g_flux_factor(g_mag)[:, None]


def store_columns(layout: Layout, normalise_xp: bool) -> list[str]:
    """The raw store columns needed to derive ``layout``'s values and errors (without source_id)."""
    cols: list[str] = []
    for f in layout.features:
        cols.append(f.name)
        if f.error is not None:
            cols.append(flux_over_error_column(f.error) or f.error)
    if normalise_xp and len(layout.xp_indices):
        cols.append(G_MAG)
    return list(dict.fromkeys(cols))


def derive(raw: Mapping[str, np.ndarray], layout: Layout, normalise_xp: bool) -> tuple[np.ndarray, np.ndarray]:
    """Values and errors, each float32 of shape ``(n_rows, n_features)`` in layout order.

    Missing values stay NaN. Errors are NaN where a feature has no error column or the error is
    missing for that row (the losses then give that entry weight 1).
    """
    n = len(next(iter(raw.values()))) if raw else 0
    values = np.empty((n, layout.n_features), dtype=np.float32)
    errors = np.full((n, layout.n_features), np.nan, dtype=np.float32)
    xp_scale = None
    if normalise_xp and len(layout.xp_indices):
        xp_scale = g_flux_factor(raw[G_MAG])
    for j, f in enumerate(layout.features):
        v = raw[f.name]
        if f.error is not None:
            foe_col = flux_over_error_column(f.error)
            e = mag_error_from_flux_over_error(raw[foe_col]) if foe_col else raw[f.error]
        else:
            e = None
        if f.group == XP_GROUP and xp_scale is not None:
            values[:, j] = v * xp_scale
            if e is not None:
                errors[:, j] = e * xp_scale
        else:
            values[:, j] = v
            if e is not None:
                errors[:, j] = e
    colours = layout.colour_indices
    if len(colours):
        values[:, colours] -= values[:, [layout.index(layout.colour_reference)]]
    return values, errors


class FeatureTransform:
    """Raw store columns → scaled model inputs: the one transform every stage applies.

    ``transform(raw)`` returns ``(x, err)``, float32 ``(n_rows, n_features)``, scaled by the
    pipeline's single feature scaler (NaN stays NaN).
    """

    def __init__(self, layout: Layout, scaler, normalise_xp: bool):
        scaler.check_layout(layout)
        self.layout = layout
        self.scaler = scaler
        self.normalise_xp = normalise_xp
        self.store_columns = store_columns(layout, normalise_xp)

    @classmethod
    def from_config(cls, config: Mapping, scaler) -> "FeatureTransform":
        return cls(Layout.from_config(config["features"]), scaler, xp_normalises(config["features"]))

    def __call__(self, raw: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        values, errors = derive(raw, self.layout, self.normalise_xp)
        return self.scaler.transform(values, errors)
