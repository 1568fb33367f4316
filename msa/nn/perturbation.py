"""Gaussian perturbation of inputs by their measurement errors, as pretraining and fine-tuning use it.

``pert_features`` names groups of the layout (``xp``, ``gaia_photometry`` …) or single features;
each chosen entry gets ``scale · σ · N(0, 1)``, one independent draw per entry (never one per row
or batch), so the network sees the spread the measurement allows. Entries without an error stay
as they are. The target of a reconstruction is always the clean value.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from msa.config import ConfigError
from msa.data.layout import GROUP_ORDER, Layout


def perturbed_columns(layout: Layout, names: Sequence[str], key: str) -> np.ndarray:
    """Sorted layout positions of ``names`` (group or feature names); ``key`` names the setting in errors."""
    cols: list[int] = []
    for name in names:
        if name in GROUP_ORDER:
            cols += layout.group_indices(name).tolist()
        elif name in layout.names:
            cols.append(layout.index(name))
        else:
            raise ConfigError(f"{key}: {name!r} is neither a group {list(GROUP_ORDER)} nor a feature of the layout")
    return np.unique(np.asarray(cols, dtype=np.int64))


def perturb(x: torch.Tensor, err: torch.Tensor, columns: torch.Tensor, scale: float,
            generator: torch.Generator) -> torch.Tensor:
    """A perturbed copy of ``x`` on ``columns`` (``x`` itself when there is nothing to perturb)."""
    if not len(columns) or scale == 0:
        return x
    noise = torch.randn((x.shape[0], len(columns)), generator=generator, device=generator.device).to(x.device)
    sigma = torch.nan_to_num(err[:, columns], nan=0.0)
    out = x.clone()
    out[:, columns] = x[:, columns] + scale * sigma * noise
    return out
