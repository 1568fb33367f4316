"""Which input entries the encoder must not see: random training masks and a fixed validation mask.

Two masking groups: the XP block (all XP coefficients of a star hidden together, for a fraction
``xp_ratio`` of rows, so the model learns to predict a whole spectrum from photometry; with
``xp_band_masking`` a chosen row loses BP only, RP only or both, a third of the time each, so the
model also learns one band from the other; with ``xp_entry_masking_ratio`` every row also loses
that fraction of its BP and of its RP coefficients, half of it in contiguous runs of ``xp_span``
coefficients and half as single entries, as a masked autoencoder hides most of each sample, so the
encoder must infer one part of a spectrum from the rest) and the element group (every other feature hidden
independently with probability ``element_ratio``). Forced columns (``force_mask_cols`` plus the
layout's ``force_mask``) are always hidden. The fixed validation mask draws from the per-star hash
(:func:`msa.data.star_hash.hash_uniform`), so it does not depend on row order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import torch

from msa.data.layout import XP_GROUP, Layout
from msa.data.star_hash import hash_uniform


class MaskingError(ValueError):
    """A masking section names unknown columns or groups."""


@dataclass(frozen=True)
class MaskSpec:
    """Masking ratios and the feature positions (layout order) each rule applies to."""

    xp_ratio: float
    element_ratio: float
    force_indices: np.ndarray
    xp_indices: np.ndarray
    element_indices: np.ndarray
    n_features: int | None = None
    # per-band XP masking: positions of the BP coefficients, of the RP coefficients, and of any
    # other column of the XP group (moved there by group_overrides: hidden with either band)
    band_indices: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
    # entry masking inside the spectrum: per band, the positions of its coefficients in order
    xp_entry_ratio: float = 0.0
    xp_span: int = 4
    entry_bands: tuple[np.ndarray, ...] = ()

    @property
    def _runs_per_band(self) -> int:
        """Runs of ``xp_span`` a band spans, with room for the row's random phase."""
        return max((len(b) for b in self.entry_bands), default=0) // self.xp_span + 2

    @property
    def _entry_draws(self) -> int:
        """Per-row numbers of entry masking: the runs' phase, then one per run of each band."""
        return 1 + len(self.entry_bands) * self._runs_per_band if self.xp_entry_ratio > 0 else 0

    @property
    def n_row_draws(self) -> int:
        """Uniform numbers drawn per row besides one per feature: the XP choice (+ the band,
        + entry masking's); without entry masking the draws are exactly those of earlier runs."""
        return (2 if self.band_indices is not None else 1) + self._entry_draws

    def __post_init__(self) -> None:
        if self.xp_span < 1:
            raise MaskingError(f"masking: xp_span = {self.xp_span} must be at least 1")
        for name in ("xp_ratio", "element_ratio", "xp_entry_ratio"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise MaskingError(f"masking: {name} = {value} must lie in [0, 1]")

    @property
    def width(self) -> int:
        """Number of features the masks cover."""
        if self.n_features is not None:
            return int(self.n_features)
        idx = np.concatenate([self.force_indices, self.xp_indices, self.element_indices])
        return int(idx.max()) + 1 if len(idx) else 0

    @classmethod
    def from_config(cls, layout: Layout, section: Mapping, fallback: Mapping | None = None) -> "MaskSpec":
        """From a config section with ``xp_masking_ratio``, ``m_masking_ratio``, ``force_mask_cols``
        and ``group_overrides`` (feature → ``xp`` or any other group name). A ratio that is None
        (or absent) is taken from ``fallback`` (e.g. fine-tuning falls back to pretraining)."""
        fallback = fallback or {}

        def pick(key: str):
            value = section.get(key)
            if value is None:
                value = fallback.get(key)
            if value is None:
                raise MaskingError(f"masking: {key} is not set in the section nor in its fallback")
            return float(value)

        overrides = section.get("group_overrides")
        if overrides is None:
            overrides = fallback.get("group_overrides") or {}
        unknown = sorted(set(overrides) - set(layout.names))
        if unknown:
            raise MaskingError(f"group_overrides: unknown feature(s) {unknown}; use names from the features section")
        force_names = list(dict.fromkeys(list(section.get("force_mask_cols") or []) + list(layout.force_mask)))
        unknown = sorted(set(force_names) - set(layout.names))
        if unknown:
            raise MaskingError(f"force_mask_cols: unknown feature(s) {unknown}; use names from the features section")
        groups = [overrides.get(f.name, f.group) for f in layout.features]
        xp_idx = np.array([i for i, g in enumerate(groups) if g == XP_GROUP], dtype=np.int64)
        el_idx = np.array([i for i, g in enumerate(groups) if g != XP_GROUP], dtype=np.int64)
        force_idx = np.array([layout.index(n) for n in force_names], dtype=np.int64)
        if section.get("photometry_only"):
            # a photometry-only member never sees XP: it serves the stars that have none
            force_idx = np.union1d(force_idx, layout.xp_indices).astype(np.int64)
        band_masking = section.get("xp_band_masking")
        if band_masking is None:
            band_masking = fallback.get("xp_band_masking", False)
        bands = None
        if band_masking:
            band_of = {i: f.name[:3] for i, f in enumerate(layout.features) if i in set(xp_idx.tolist())}
            bands = tuple(np.array([i for i, b in band_of.items() if keep(b)], dtype=np.int64)
                          for keep in (lambda b: b == "bp_", lambda b: b == "rp_",
                                       lambda b: b not in ("bp_", "rp_")))
        # entry masking is the section's own (fine-tuning does not inherit pretraining's)
        entry_ratio = float(section.get("xp_entry_masking_ratio") or 0.0)
        xp_set = set(xp_idx.tolist())
        entry_bands = tuple(np.array([i for i, f in enumerate(layout.features) if i in xp_set
                                      and f.name.startswith(prefix)], dtype=np.int64)
                            for prefix in ("bp_", "rp_"))
        return cls(pick("xp_masking_ratio"), pick("m_masking_ratio"), force_idx, xp_idx, el_idx,
                   layout.n_features, bands, entry_ratio, int(4 if section.get("xp_span") is None else section["xp_span"]),
                   tuple(b for b in entry_bands if len(b)))

    def _assemble(self, row_u: torch.Tensor, elem_u: torch.Tensor) -> torch.Tensor:
        """Mask from per-row uniforms (n, n_row_draws) and per-entry uniforms (n, F)."""
        n, width = elem_u.shape
        hidden = torch.zeros((n, width), dtype=torch.bool, device=elem_u.device)
        chosen = row_u[:, 0] < self.xp_ratio
        if self.band_indices is not None:
            band = row_u[:, 1]  # < 1/3: BP only, < 2/3: RP only, else both
            for cols, lost in zip(self.band_indices, (band < 2 / 3, band >= 1 / 3, torch.ones_like(chosen))):
                cols = torch.as_tensor(cols, device=elem_u.device)
                if len(cols):
                    hidden[:, cols] = (chosen & lost).unsqueeze(1).expand(n, len(cols))
        elif len(self.xp_indices):
            xp_cols = torch.as_tensor(self.xp_indices, device=elem_u.device)
            hidden[:, xp_cols] = chosen.unsqueeze(1).expand(n, len(self.xp_indices))
        if self._entry_draws:
            self._hide_entries(hidden, row_u[:, row_u.shape[1] - self._entry_draws:], elem_u)
        if len(self.element_indices):
            el_cols = torch.as_tensor(self.element_indices, device=elem_u.device)
            hidden[:, el_cols] = elem_u[:, el_cols] < self.element_ratio
        if len(self.force_indices):
            hidden[:, torch.as_tensor(self.force_indices, device=elem_u.device)] = True
        return hidden


    def _hide_entries(self, hidden: torch.Tensor, draws: torch.Tensor, elem_u: torch.Tensor) -> None:
        """Hide runs and single coefficients of each band, each with probability p, so that a
        fraction 1 − (1 − p)² = ``xp_entry_ratio`` of the entries is hidden on average."""
        p = 1.0 - math.sqrt(1.0 - self.xp_entry_ratio)
        phase = (draws[:, 0] * self.xp_span).long().clamp_max(self.xp_span - 1)
        runs = self._runs_per_band
        for b, cols in enumerate(self.entry_bands):
            pos = torch.arange(len(cols), device=elem_u.device)
            run_of = (pos.unsqueeze(0) + phase.unsqueeze(1)) // self.xp_span
            run_hidden = torch.gather(draws[:, 1 + b * runs:1 + (b + 1) * runs], 1, run_of) < p
            cols_t = torch.as_tensor(cols, device=elem_u.device)
            hidden[:, cols_t] |= run_hidden | (elem_u[:, cols_t] < p)


def draw_mask(spec: MaskSpec, n_rows: int, generator: torch.Generator,
              device: torch.device | str = "cpu") -> torch.Tensor:
    """A fresh random mask, BoolTensor ``(n_rows, n_features)`` on ``device`` (True = hidden).

    Numbers come from ``generator`` only, so a checkpointed generator state reproduces the masks.
    They are drawn on the generator's device and moved to ``device`` if that differs.
    """
    width = spec.width
    gen_device = generator.device
    u = torch.rand((n_rows, width + spec.n_row_draws), generator=generator, device=gen_device)
    hidden = spec._assemble(u[:, width:], u[:, :width])
    return hidden.to(device, non_blocking=True)


def fixed_validation_mask(spec: MaskSpec, source_id: np.ndarray, seed: int,
                          device: torch.device | str = "cpu") -> torch.Tensor:
    """The mask a star always gets in validation: a hash of its ``source_id`` and ``seed``.

    Same rules and ratios as :func:`draw_mask`, but identical for a given star in every epoch
    and every run, so validation curves are comparable across epochs and runs.
    """
    width = spec.width
    u = hash_uniform(source_id, seed, np.arange(width + spec.n_row_draws))
    u = torch.from_numpy(u.astype(np.float32))
    return spec._assemble(u[:, width:], u[:, :width]).to(device)
