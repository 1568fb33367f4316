"""The sampled flux as a pretraining target: a reconstruction error where every coefficient counts
as much as it shapes the spectrum.

The error-weighted loss weights each XP coefficient by its inverse variance, so the first few
coefficients (the highest S/N) carry nearly all of it, and the ones where [Fe/H] and [α/M] leave
their small marks next to none. With ``pretrain.flux_target_weight`` > 0 the loss gains a second
term: each star's relative error ‖f_rec − f_obs‖ / ‖f_obs‖ of its sampled flux
(:class:`msa.nn.flux_loss.FluxMap`, GaiaXPy's grid), the decoder's whole XP output against its
observed XP, averaged over the batch's stars whose XP is complete. The entries a star showed count
too (they are cheap to reconstruct; the hidden ones make the error). The validation loss stays
the reconstruction term alone, so runs with and without this term are early-stopped alike.
"""

from __future__ import annotations

import numpy as np
import torch

from msa.data.layout import Layout
from msa.data.scaling import Scaler
from msa.errors import InputError
from msa.nn.flux_loss import FluxMap, relative_flux_error


class FluxTarget(torch.nn.Module):
    """The flux term of one batch: decoder output and clean targets ``(n, n_reconstructed)`` → scalar."""

    def __init__(self, layout: Layout, scaler: Scaler, weight: float):
        super().__init__()
        recon = list(layout.reconstruct_indices)
        xp = layout.xp_indices
        missing = [layout.names[i] for i in xp if i not in recon]
        if not len(xp) or missing:
            raise InputError("pretrain.flux_target_weight needs every XP coefficient reconstructed; "
                             f"the layout {'has no XP' if not len(xp) else f'does not reconstruct {missing[:3]}'}: "
                             "set pretrain.flux_target_weight to 0 or reconstruct the xp group")
        self.weight = float(weight)
        self.register_buffer("positions", torch.as_tensor(np.array([recon.index(i) for i in xp]), dtype=torch.long))
        self.flux = FluxMap(layout, scaler)

    def forward(self, recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        observed = target[:, self.positions]
        whole = torch.isfinite(observed).all(dim=1)
        if not bool(whole.any()):
            return recon.sum() * 0.0
        predicted = recon[whole][:, self.positions]
        return self.weight * relative_flux_error(self.flux(predicted), self.flux(observed[whole])).mean()
