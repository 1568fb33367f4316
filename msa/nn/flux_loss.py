"""The XP reconstruction error in sampled-flux space, as a differentiable loss.

``msa evaluate-reconstruction`` scores a reconstructed spectrum by its relative flux error
‖f_rec − f_obs‖ / ‖f_obs‖ on GaiaXPy's sampled grid. Both steps from the decoder's output to that
flux are linear: the scaler (derived = scaled · scale + centre) and GaiaXPy's sampling
(``msa.data.xp_flux.sampling_matrix``); the G normalisation multiplies a star's whole spectrum by one
number, which the relative error does not see. So scaled XP → (G-normalised) flux is one matrix
and one offset, and each star's relative flux error (or its square) is a loss a network can be
trained on directly (``msa.spectra.train``).

The pretraining loss weights each coefficient by its measurement error instead, which suits a
star whose XP is seen, not one whose spectrum is inferred from photometry: there the error that
matters is the model's, spread over the whole spectrum, and the sampled flux weighs the
coefficients as the spectrum does.
"""

from __future__ import annotations

import re

import numpy as np
import torch

from msa.data.layout import Layout
from msa.data.scaling import Scaler
from msa.data.xp_flux import N_COEFFICIENTS, sampling_matrix

_XP_NAME = re.compile(r"^(bp|rp)_(\d+)$")


def coefficient_rows(names: list[str]) -> np.ndarray:
    """Row of GaiaXPy's 110-row sampling matrix for each XP feature name (``bp_k`` → k − 1,
    ``rp_k`` → 55 + k − 1), whatever order or subset of coefficients the layout keeps."""
    rows = []
    for name in names:
        match = _XP_NAME.match(name)
        if not match or not 1 <= int(match.group(2)) <= N_COEFFICIENTS:
            raise ValueError(f"XP feature {name!r} is not bp_<k> or rp_<k> with k in 1..{N_COEFFICIENTS}")
        rows.append((0 if match.group(1) == "bp" else N_COEFFICIENTS) + int(match.group(2)) - 1)
    return np.asarray(rows, dtype=np.int64)


class FluxMap(torch.nn.Module):
    """Scaled XP values ``(n, n_xp)`` (layout order) → sampled flux ``(n, W)``, up to one constant
    factor: the flux of the scaler's centre spectrum has norm 1 (float32 keeps its precision)."""

    def __init__(self, layout: Layout, scaler: Scaler):
        super().__init__()
        xp = layout.xp_indices
        _, unit_flux = sampling_matrix()
        matrix = unit_flux[coefficient_rows([layout.names[i] for i in xp])]  # derived -> flux
        scale, centre = scaler.scale[xp].astype(np.float64), scaler.centre[xp].astype(np.float64)
        offset = centre @ matrix
        unit = float(np.linalg.norm(offset)) or 1.0
        self.register_buffer("matrix", torch.tensor(scale[:, None] * matrix / unit, dtype=torch.float32))
        self.register_buffer("offset", torch.tensor(offset / unit, dtype=torch.float32))

    def forward(self, scaled_xp: torch.Tensor) -> torch.Tensor:
        return scaled_xp @ self.matrix + self.offset


def relative_flux_error(flux: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per star ‖flux − target‖ / ‖target‖ over the grid, as ``msa.data.xp_flux.relative_flux_error``."""
    return torch.linalg.vector_norm(flux - target, dim=1) / torch.linalg.vector_norm(target, dim=1)
