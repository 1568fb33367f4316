"""Target-aware pretraining: the train split's labels as targets of the masked autoencoder.

With ``pretrain.label_targets`` (label names of ``labels.columns``), a star of the TRAIN split that
has a label gets it as one more target, read from the latent by the model's linear
``label_head``; every other star (no label, or a validation, calibration or test star) has NaN
there and only reconstructs its hidden inputs. Labels are never inputs: the encoder sees the
same columns as at inference, where no star has one. This is what "target-aware" pretraining
(Rubachev et al. 2022) and labels as tokens (Leung & Bovy 2024) mean here: the many unlabelled
spectra shape the latent by reconstruction, the few labels point it at what they need.

Only the train split's labels are read, so the probe, early stopping, calibration and the test
score never see a label that pretraining fitted. The scaling is the train split's mean and
standard deviation per label, from the catalogue.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np
import torch
import torch.nn.functional as F

from msa.data.labels import LabelScaler, LabelSource
from msa.data.source_ids import SOURCE_ID
from msa.data.splits import assign_splits, split_seed
from msa.errors import InputError

HUBER_DELTA = 1.0  # in scaled units: a label 1σ of the train split off counts quadratically, beyond linearly


class LabelTargetError(InputError, ValueError):
    """``pretrain.label_targets`` names a label that cannot be a pretraining target."""


@dataclass
class LabelTargets:
    """The labels pretraining fits, their train-split scaling and the lookup per star."""

    names: tuple[str, ...]
    source: LabelSource
    scaler: LabelScaler
    splits_cfg: Mapping
    seed: int
    weight: float

    @classmethod
    def from_config(cls, config: Mapping) -> "LabelTargets | None":
        """None without ``pretrain.label_targets``; else the targets, refusing a label that is
        unknown or comes from the store (a store column is an input already: hide it with
        ``force_mask_cols`` to make it a target)."""
        section = config["pretrain"]
        names = tuple(section["label_targets"])
        if not names:
            return None
        unknown = [n for n in names if n not in config["labels"]["columns"]]
        if unknown:
            raise LabelTargetError(f"pretrain.label_targets: {unknown} are not in labels.columns "
                                   f"{sorted(config['labels']['columns'])}")
        source = LabelSource(config["labels"], names)
        from_store = [c.name for c in source.columns if c.store is not None]
        if from_store:
            raise LabelTargetError(f"pretrain.label_targets: {from_store} come from store columns, which are "
                                   "inputs already; list them in pretrain.force_mask_cols instead")
        seed = split_seed(config)
        ids = source.catalogue_ids
        y, _ = source.lookup(ids)
        train = assign_splits(ids, config["splits"], seed) == "train"
        scaler = LabelScaler.fit(names, y[train])
        return cls(names, source, scaler, config["splits"], seed, float(section["label_target_weight"]))

    def scaled_labels(self, source_id: np.ndarray) -> np.ndarray:
        """Scaled labels ``(n, L)`` float32 of the train split's stars, NaN for every other star."""
        y, _ = self.source.lookup(source_id)
        labelled = np.isfinite(y).any(axis=1)
        labelled[labelled] = assign_splits(source_id[labelled], self.splits_cfg, self.seed) == "train"
        y[~labelled] = np.nan
        return self.scaler.transform(y).astype(np.float32)

    def row_join(self, base: Callable | None = None) -> Callable:
        """A ``ShardStream`` ``row_join`` that adds ``label_targets`` to every row ``base`` keeps
        (every row without ``base``); rows are never dropped for lacking a label."""

        def join(raw: Mapping[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
            keep, arrays = base(raw) if base is not None else (np.ones(len(raw[SOURCE_ID]), dtype=bool), {})
            return keep, {**arrays, "label_targets": self.scaled_labels(raw[SOURCE_ID][keep])}

        return join

    def to_dict(self) -> dict:
        """What a checkpoint records: the names and scaling the label head was trained with."""
        return {"names": list(self.names), "centre": self.scaler.centre.tolist(),
                "scale": self.scaler.scale.tolist(), "weight": self.weight}


def label_target_loss(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean Huber loss over the present (star, label) entries of ``(B, L)`` scaled labels; zero
    with a gradient path when none is present, so the head takes part in every step (DDP
    expects every parameter to receive a gradient)."""
    present = torch.isfinite(target)
    diff = F.huber_loss(predicted.float(), torch.where(present, target, predicted.detach().float()),
                        reduction="none", delta=HUBER_DELTA)
    return torch.where(present, diff, torch.zeros_like(diff)).sum() / present.sum().clamp_min(1)
