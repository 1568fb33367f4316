"""The foundation model's own outputs: K autoencoders (pretrained and/or fine-tuned) run on one batch.

``Autoencoders.load(paths)`` reads pretraining checkpoints (``kind: pretrain``, e.g.
``results/pretrain/model.pt``), fine-tuned members (``kind: finetune``: their encoder and decoder,
trained further with the multitask reconstruction loss) and reconstruction members (``kind:
reconstruct``, ``msa train-reconstruction``: trained further on the sampled flux) alike, and refuses a set that disagrees on
the feature layout, the scaler or the XP normalisation, naming the two files. Each model hides its
own forced-mask features, as in its training.

``run(x_scaled, hidden)`` returns the decoder outputs ``(K, N, n_reconstruct)`` (scaled, derived
features: ``layout.reconstruct_indices``) and the latents ``(K, N, latent_dim)``; the spread over
the K models is the uncertainty ``msa reconstruct`` reports.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from msa.data.features import FeatureTransform, xp_normalises
from msa.data.layout import Feature, Layout
from msa.data.scaling import Scaler
from msa.errors import InputError
from msa.nn.checkpoint import CheckpointError, file_sha256, load_checkpoint
from msa.nn.masking import MaskSpec
from msa.nn.model import MaskedAutoencoder

log = logging.getLogger(__name__)

AUTOENCODER_KINDS = ("pretrain", "finetune", "reconstruct")
_SAVES_OWN_MASK = ("finetune", "reconstruct")  # kinds that record their forced mask and XP normalisation


class AutoencoderError(InputError, ValueError):
    """Checkpoints that are not autoencoders, or that do not belong together."""


def _force_mask_indices(ckpt: dict, layout: Layout) -> list[int]:
    """Features the checkpoint's training always hid (and inference must hide too)."""
    if ckpt["kind"] in _SAVES_OWN_MASK:
        return [int(i) for i in ckpt.get("force_mask_indices") or []]
    return [int(i) for i in MaskSpec.from_config(layout, ckpt["config"]["pretrain"]).force_indices]


def held_out_definition(ckpt: dict) -> dict | None:
    """Which stars pretraining held out around this checkpoint's training: the config seed and the
    ``pretrain`` keys that choose them (None when the checkpoint does not record them, e.g. a
    fine-tuned member). Two runs with equal definitions hold out the same stars of a store."""
    if "held_out" in ckpt:
        return ckpt["held_out"]
    config = ckpt.get("config") or {}
    if "seed" not in config or "pretrain" not in config:
        return None
    section = config["pretrain"]
    return {"seed": int(config["seed"]), "validation_fraction": float(section.get("validation_fraction", 0.0)),
            "validation_shards": sorted(section.get("validation_shards") or [])}


def _normalises_xp(ckpt: dict) -> bool:
    if ckpt["kind"] in _SAVES_OWN_MASK:
        return bool(ckpt["normalise_xp"])
    return xp_normalises(ckpt["config"]["features"])


@dataclass
class Autoencoders:
    """K autoencoders sharing one layout, scaler and XP normalisation, on one device."""

    models: list[MaskedAutoencoder]
    paths: list[Path]
    sha256: list[str]
    layout: Layout
    scaler: Scaler
    normalise_xp: bool
    force_masks: torch.Tensor  # bool (K, F)
    device: torch.device
    held_out: list[dict | None]  # per model: :func:`held_out_definition`

    @classmethod
    def load(cls, paths: Sequence[str | Path], device: str | torch.device = "cpu") -> "Autoencoders":
        paths = [Path(p) for p in paths]
        if not paths:
            raise AutoencoderError("no models given; pass results/pretrain/model.pt and/or fine-tuned members")
        device = torch.device(device)
        ckpts = [load_checkpoint(p) for p in paths]
        for ckpt, path in zip(ckpts, paths):
            if ckpt.get("kind") not in AUTOENCODER_KINDS:
                raise AutoencoderError(f"{path} is a {ckpt.get('kind')!r} checkpoint; pass a pretrained model "
                                       "(results/pretrain/model.pt), fine-tuned members (…/member-<k>/model.pt) "
                                       "or reconstruction members (results/reconstruct/member-<k>.pt)")
        layout = Layout.from_dict(ckpts[0]["layout"])
        for ckpt, path in zip(ckpts[1:], paths[1:]):
            difference = layout.diff(Layout.from_dict(ckpt["layout"]))
            if difference:
                raise AutoencoderError(f"{paths[0]} and {path} have different feature layouts: {difference}; "
                                       "pass models of one pipeline run")
            for what, value, first in (("scaler", ckpt["scaler"], ckpts[0]["scaler"]),
                                       ("XP normalisation", _normalises_xp(ckpt), _normalises_xp(ckpts[0]))):
                if value != first:
                    raise AutoencoderError(f"{paths[0]} and {path} differ in their {what}; pass models of "
                                           "one pipeline run (one `msa fit-scaler` and pretraining)")
        models, masks = [], []
        for ckpt, path in zip(ckpts, paths):
            try:
                model = MaskedAutoencoder(**ckpt["model_hparams"])
                model.load_state_dict(ckpt["model"])
            except (KeyError, RuntimeError, TypeError) as err:
                raise CheckpointError(f"{path}: no loadable autoencoder weights ({err})") from err
            models.append(model.to(device).eval())
            mask = torch.zeros(layout.n_features, dtype=torch.bool)
            mask[_force_mask_indices(ckpt, layout)] = True
            masks.append(mask)
        log.info("loaded %d autoencoder(s) (%s) on %s", len(models),
                 ", ".join(c["kind"] for c in ckpts), device)
        return cls(models, paths, [file_sha256(p) for p in paths], layout, Scaler.from_dict(ckpts[0]["scaler"]),
                   _normalises_xp(ckpts[0]), torch.stack(masks).to(device), device,
                   [held_out_definition(c) for c in ckpts])

    @property
    def latent_dim(self) -> int:
        return self.models[0].latent_dim

    def input_transform(self) -> FeatureTransform:
        """The training transform without the error columns: the encoder reads values only."""
        values_only = Layout(tuple(Feature(f.name, f.group, None) for f in self.layout.features),
                             self.layout.force_mask, self.layout.reconstruct_groups, self.layout.colour_reference)
        return FeatureTransform(values_only, self.scaler, self.normalise_xp)

    def scaled_inputs(self, raw) -> np.ndarray:
        """Scaled encoder inputs ``(N, F)`` of raw store columns; an infinite value carries no
        information and is missing (NaN), as in prediction."""
        x, _ = self.input_transform()(raw)
        x[np.isinf(x)] = np.nan
        return x

    def xp_mask(self) -> np.ndarray:
        """Bool ``(F,)``: the XP columns (to hide them all: the photometry-only view)."""
        mask = np.zeros(self.layout.n_features, dtype=bool)
        mask[self.layout.xp_indices] = True
        return mask

    def run(self, x_scaled: np.ndarray, hidden: np.ndarray | None = None,
            batch_size: int = 8192) -> tuple[np.ndarray, np.ndarray]:
        """Decoder outputs ``(K, N, n_reconstruct)`` and latents ``(K, N, latent_dim)``, float32, for
        scaled inputs ``(N, F)`` (NaN = missing); ``hidden`` (bool ``(F,)`` or ``(N, F)``) hides
        entries in addition to each model's forced mask."""
        x_all = torch.from_numpy(np.ascontiguousarray(x_scaled, dtype=np.float32))
        n, f = x_all.shape
        if f != self.layout.n_features:
            raise ValueError(f"x_scaled: expected (N, {self.layout.n_features}) inputs, got {tuple(x_all.shape)}")
        hidden_all = torch.zeros((1, f), dtype=torch.bool) if hidden is None else \
            torch.as_tensor(np.asarray(hidden, dtype=bool)).reshape(-1, f)
        k = len(self.models)
        recon = np.empty((k, n, self.models[0].reconstruct.out_features), dtype=np.float32)
        latent = np.empty((k, n, self.latent_dim), dtype=np.float32)
        with torch.inference_mode():
            for start in range(0, n, batch_size):
                stop = min(start + batch_size, n)
                x = x_all[start:stop].to(self.device)
                h = (hidden_all if hidden_all.shape[0] == 1 else hidden_all[start:stop]).to(self.device)
                h = h.expand(stop - start, -1)
                for j, model in enumerate(self.models):
                    r, z = model(x, h | self.force_masks[j])
                    recon[j, start:stop] = r.float().cpu().numpy()
                    latent[j, start:stop] = z.float().cpu().numpy()
        return recon, latent
