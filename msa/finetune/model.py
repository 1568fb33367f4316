"""The fine-tuning model: the pretrained encoder, a quantile head, and every loss term.

:func:`build_objective` loads the pretrained autoencoder (or a fresh one of the config's
architecture: the from-scratch yardstick), checks it was trained with the pipeline's scaler, adds
a :class:`~msa.nn.model.QuantileHead` and returns the :class:`Objective`: ``batch_losses`` for a
training batch, ``predict_scaled`` for the inference path, ``parallax_nll`` for the MLE term.
The loss terms are described in :mod:`msa.finetune.stage`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import torch
from torch import nn

from msa.data.labels import LabelScaler
from msa.finetune.schedule import encoder_parameter_groups
from msa.data.layout import Layout
from msa.data.scaling import Scaler
from msa.nn.checkpoint import load_checkpoint
from msa.nn.losses import pinball_loss, reconstruction_objective
from msa.nn.masking import MaskSpec, draw_mask
from msa.nn.model import QuantileHead
from msa.nn.perturbation import perturb, perturbed_columns
from msa.nn.training import parameter_groups

log = logging.getLogger(__name__)


class FinetuneError(RuntimeError):
    """Inconsistent fine-tuning inputs (labels, layout, pretrained model, in-progress state)."""


@dataclass(frozen=True)
class ParallaxSetup:
    """Which label and input are the parallax, and whether the label uses the masked pass."""

    label_index: int | None
    feature_index: int | None
    masked_pass: bool
    gaia_column: str | None  # raw store column of the Gaia parallax (for the MLE term)
    gaia_error_column: str | None

    def to_dict(self) -> dict:
        return {"label_index": self.label_index, "feature_index": self.feature_index,
                "masked_pass": self.masked_pass}


def parallax_setup(cfg: Mapping, labels: Sequence[str], layout: Layout) -> ParallaxSetup:
    label_index = labels.index(cfg["parallax_label"]) if cfg["parallax_label"] in labels else None
    feature = cfg["parallax_feature"]
    feature_index = layout.index(feature) if feature in layout.names else None
    masked = bool(cfg["parallax_use_masked_pred"]) and label_index is not None and feature_index is not None
    if label_index is not None and feature_index is not None and not masked:
        log.warning("the parallax label %r is predicted with the parallax input %r visible "
                    "(finetune.parallax_use_masked_pred is false): the model can copy its answer",
                    cfg["parallax_label"], feature)
    error = layout.features[feature_index].error if feature_index is not None else f"{feature}_error"
    return ParallaxSetup(label_index, feature_index, masked, feature if label_index is not None else None,
                         error if label_index is not None else None)


class Objective:
    """Model + head + every loss term; ``batch_losses`` for training, ``predict_scaled`` for inference."""

    def __init__(self, model: nn.Module, head: QuantileHead, cfg: Mapping, layout: Layout,
                 mask_spec: MaskSpec, plx: ParallaxSetup, label_scaler: LabelScaler, pretrain_cfg: Mapping,
                 device: torch.device):
        self.model, self.head, self.cfg, self.plx = model, head, cfg, plx
        self.mask_spec = mask_spec
        self.device = device
        # the multitask term is the pretraining objective, as pretraining defines it
        self.recon_kind = pretrain_cfg["loss"]
        self.recon_balance = pretrain_cfg["loss_balance"]
        self.recon_min_error = pretrain_cfg["min_error"]
        self.recon_groups = layout.reconstruct_groups_positions()
        n_features = layout.n_features
        force = torch.zeros(n_features, dtype=torch.bool)
        force[torch.as_tensor(mask_spec.force_indices, dtype=torch.long)] = True
        self.force_mask = force.to(device)
        self.recon_idx = torch.as_tensor(layout.reconstruct_indices, dtype=torch.long, device=device)
        xp = torch.zeros(n_features, dtype=torch.bool)
        xp[torch.as_tensor(layout.xp_indices, dtype=torch.long)] = True
        self.xp_mask = xp.to(device)
        # a photometry-only member's every pass is already XP-free
        self.no_xp_weight = float(cfg["no_xp_weight"]) if len(layout.xp_indices) and not cfg["photometry_only"] \
            else 0.0
        self.pert_idx = torch.as_tensor(perturbed_columns(layout, cfg["pert_features"], "finetune.pert_features"),
                                        dtype=torch.long, device=device)
        weights = [float(cfg["label_weights"].get(n, 1.0)) for n in label_scaler.names]
        unknown = sorted(set(cfg["label_weights"]) - set(label_scaler.names))
        if unknown:
            raise FinetuneError(f"finetune.label_weights: {unknown} are not labels of this set "
                                f"{list(label_scaler.names)}")
        self.label_weights = torch.tensor(weights, dtype=torch.float32, device=device)
        self.label_centre = torch.tensor(label_scaler.centre, dtype=torch.float32, device=device)
        self.label_scale = torch.tensor(label_scaler.scale, dtype=torch.float32, device=device)
        self.frozen = bool(cfg["freeze_encoder"])

    def parameter_groups(self) -> list[dict]:
        wd = self.cfg["weight_decay"]
        groups = parameter_groups(self.head, wd, lr=self.cfg["lr_head"])
        if not self.frozen:
            groups += encoder_parameter_groups(self.model, wd, self.cfg["lr_encoder"], self.cfg["layer_lr_decay"])
        return groups

    def train(self) -> None:
        self.head.train()
        self.model.train(not self.frozen)  # a frozen encoder keeps its eval-mode behaviour (dropout off)

    def eval(self) -> None:
        self.head.eval()
        self.model.eval()

    def _quantiles(self, x: torch.Tensor, hidden: torch.Tensor, latent: torch.Tensor | None = None
                   ) -> torch.Tensor:
        """Scaled quantiles ``(B, L, 3)``; the parallax label from a pass without the parallax input."""
        q = self.head(self.model.encode(x, hidden) if latent is None else latent, x, hidden)
        if self.plx.masked_pass:
            hidden_plx = hidden.clone()
            hidden_plx[:, self.plx.feature_index] = True
            q_plx = self.head(self.model.encode(x, hidden_plx), x, hidden_plx)
            keep = torch.zeros(q.shape[1], dtype=torch.bool, device=q.device)
            keep[self.plx.label_index] = True
            q = torch.where(keep[None, :, None], q_plx, q)
        return q

    def predict_scaled(self, x: torch.Tensor, hide_xp: bool = False) -> torch.Tensor:
        """Inference path: hide the forced columns only (+ the parallax masked pass); with
        ``hide_xp`` every XP column too (the photometry-only prediction)."""
        hidden = self.force_mask | self.xp_mask if hide_xp else self.force_mask
        return self._quantiles(x, hidden.expand(x.shape[0], -1))

    def batch_losses(self, x, err, y, y_err, weights, plx_obs, plx_err, generator: torch.Generator
                     ) -> dict[str, torch.Tensor]:
        """Loss terms of one training batch (scaled inputs/labels; Gaia parallax in mas)."""
        cfg = self.cfg
        x = perturb(x, err, self.pert_idx, cfg["pert_scale"], generator)
        if cfg["pert_labels"]:
            noise = torch.randn(y.shape, generator=generator, device=y.device)
            y = y + torch.nan_to_num(y_err, nan=0.0) * noise
        base = self.force_mask.expand(x.shape[0], -1)
        use_recon = cfg["multitask_weight"] > 0 and not self.frozen
        need_masked = cfg["mask"] and (use_recon or cfg["mask_prediction"])
        hidden = (draw_mask(self.mask_spec, x.shape[0], generator, x.device) | base) if need_masked else base
        latent = self.model.encode(x, hidden)
        out = {}
        if use_recon:
            recon = self.model.decode(latent)
            out["recon"] = reconstruction_objective(recon, x[:, self.recon_idx], err[:, self.recon_idx],
                                                    hidden[:, self.recon_idx], self.recon_kind, self.recon_groups,
                                                    self.recon_balance, self.recon_min_error)
        head_hidden = hidden if cfg["mask_prediction"] else base
        q = self._quantiles(x, head_hidden, latent if cfg["mask_prediction"] else None)
        label_weights = weights * self.label_weights[None, :]
        out["pinball"] = pinball_loss(q.float(), y, label_weights)
        if self.no_xp_weight > 0:  # the same pass as the head's, with XP hidden too
            q_no_xp = self._quantiles(x, head_hidden | self.xp_mask)
            out["pinball_no_xp"] = pinball_loss(q_no_xp.float(), y, label_weights)
        if cfg["parallax_mle_weight"] > 0 and self.plx.label_index is not None:
            out["mle"] = self.parallax_nll(q, plx_obs, plx_err)
        total = out["pinball"]
        if "pinball_no_xp" in out:
            total = total + self.no_xp_weight * out["pinball_no_xp"]
        if "recon" in out:
            total = total + cfg["multitask_weight"] * out["recon"]
        if "mle" in out:
            total = total + cfg["parallax_mle_weight"] * out["mle"]
        out["total"] = total
        return out

    def parallax_nll(self, q: torch.Tensor, plx_obs: torch.Tensor, plx_err: torch.Tensor) -> torch.Tensor:
        """Mean Gaussian NLL of the Gaia parallax given the photometric one (in label-scale units)."""
        j = self.plx.label_index
        scale = self.label_scale[j]
        mu = q[:, j, 1].float() * scale + self.label_centre[j]
        sigma_phot = self.cfg["parallax_sigma_scale"] * (q[:, j, 2] - q[:, j, 0]).float() * scale / 2
        ok = torch.isfinite(plx_obs) & torch.isfinite(plx_err)
        obs = torch.where(ok, plx_obs, mu.detach())
        sig = torch.where(ok, plx_err, torch.zeros_like(plx_err))
        var = (sig ** 2 + sigma_phot ** 2 + self.cfg["parallax_sigma_floor"] ** 2) / scale ** 2
        var = var.clamp_min(1e-8)
        nll = 0.5 * (((mu - obs) / scale) ** 2 / var + torch.log(var))
        return torch.where(ok, nll, torch.zeros_like(nll)).sum() / ok.sum().clamp_min(1)


def pretrained_encoder(path: str | Path | None, layout: Layout, model_cfg: Mapping) -> tuple[nn.Module, dict]:
    """The pretrained autoencoder and its checkpoint (layout checked by ``load_pretrained``);
    with no path, a randomly initialised one of the config's architecture (the from-scratch
    yardstick that measures what pretraining adds) and an empty checkpoint."""
    from msa.nn.model import MaskedAutoencoder
    from msa.pretrain import load_pretrained

    if path is None:
        return MaskedAutoencoder(layout.n_features, len(layout.reconstruct_indices), **model_cfg), {}

    loaded = load_pretrained(path, layout)
    model, ckpt = loaded if isinstance(loaded, tuple) else (loaded, load_checkpoint(path))
    return model.drop_label_head(), ckpt


def build_objective(config: Mapping, layout: Layout, names: Sequence[str], plx: ParallaxSetup,
                    label_scaler: LabelScaler, pretrained: Path | None, scaler: Scaler, scaler_path: Path,
                    device: torch.device) -> tuple[Objective, MaskSpec]:
    """The member's model (weights initialised under the current torch seed), on ``device``."""
    cfg = config["finetune"]
    model, pre_ckpt = pretrained_encoder(pretrained, layout, config["model"])
    if "scaler" in pre_ckpt and pre_ckpt["scaler"] != scaler.to_dict():
        raise FinetuneError(f"the scaler {scaler_path} differs from the one {pretrained} was pretrained "
                            "with; fine-tune with the pipeline's own scaler.json")
    head = QuantileHead(model.latent_dim, len(names), widths=cfg["head_widths"],
                        n_inputs=layout.n_features if cfg["head_reads_inputs"] else 0)
    model.to(device)
    head.to(device)
    if cfg["freeze_encoder"]:
        model.requires_grad_(False)
    mask_spec = MaskSpec.from_config(layout, cfg, fallback=config["pretrain"])
    objective = Objective(model, head, cfg, layout, mask_spec, plx, label_scaler, config["pretrain"], device)
    return objective, mask_spec
