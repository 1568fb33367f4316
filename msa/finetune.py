"""Fine-tuning one ensemble member on one label set: ``msa finetune``.

In: the pretrained masked autoencoder, the shard store, the pipeline's feature scaler (never
refitted) and a label catalogue. Out (in ``--out-dir``): ``model.pt`` (the member checkpoint, format
below), ``metrics.jsonl`` (one line per epoch) and ``loss.png``; the in-progress state lives in
``out-dir/work/state.pt`` and a rerun resumes from it (after a kill, SIGTERM, or a job that
stopped after ``finetune.epochs_per_job`` epochs).

The training objective per batch (all labels standard-scaled with train-split statistics):

* pinball loss at 0.16 / 0.5 / 0.84 of a :class:`~msa.model.QuantileHead` on the encoder latent,
  NaN labels masked, weighted per label (``label_weights``) and, with ``inverse_variance``, per
  star by the label error (``w = (median σ / σ)²``, capped at 10, NaN σ → 1);
* ``multitask_weight`` × the pretraining reconstruction loss on randomly hidden entries (same
  masking rules and ratios as pretraining unless ``finetune.*_masking_ratio`` are set);
* the head sees either that masked pass (``mask_prediction: true``) or a second pass that hides
  only the forced columns (what inference does);
* ``no_xp_weight`` × the pinball loss of a pass with every XP column hidden as well: most of the
  sky has no XP spectrum, so the photometry-only prediction is trained on every row, not only on
  the rows the random mask happens to strip of XP;
* parallax done right: when the label set holds ``parallax_label`` and the layout has
  ``parallax_feature`` as an input, the parallax quantiles (loss and inference) come from a pass
  with the parallax input hidden, so the model cannot copy its answer;
* optional ``parallax_mle_weight`` × Gaussian negative log-likelihood of the Gaia parallax given
  the photometric one: ``½[(μ − ϖ)² / V + ln V]`` with ``V = σ_Gaia² + σ_phot² + σ_floor²`` and
  ``σ_phot = parallax_sigma_scale · (q84 − q16) / 2`` (the ``ln V`` term keeps the interval from
  inflating to shrink the χ² term);
* Gaussian perturbation of ``pert_features`` (groups or names) by their errors, one draw per
  entry, and, with ``pert_labels``, of the labels by theirs.

Early stopping on the validation split's pinball loss (computed on the inference path, plus
``no_xp_weight`` × the same with XP hidden) with ``patience`` epochs; the best weights are kept.
Member ``k`` uses seed ``config.seed + k``; every member shares the splits (they hash
``source_id`` with the config seed).

Member checkpoint (``kind: finetune``): ``model``, ``model_hparams``, ``head``, ``head_hparams``,
``labels``, ``label_centre``, ``label_scale`` (physical = scaled × scale + centre), ``layout``,
``scaler``, ``normalise_xp``, ``force_mask_indices``, ``parallax`` {``label_index``,
``feature_index``, ``masked_pass``}, ``member``, ``seed``, ``label_set``, ``config_hash``,
``config`` (the finetune section), ``metrics`` and ``epoch``.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from msa.checkpoint import (CheckpointError, load_checkpoint, restore_rng_state, rng_state, set_aside_if_corrupt,
                            save_checkpoint)
from msa.config import config_hash, load_config
from msa.features import FeatureTransform, xp_normalises
from msa.emulation import append_faint_copies
from msa.labels import LabelScaler, LabelSource, LabelledStars, label_set, load_labelled
from msa.layout import GROUP_ORDER, Layout
from msa.losses import pinball_loss, reconstruction_objective
from msa.masking import MaskSpec, draw_mask
from msa.model import QuantileHead
from msa.scaling import Scaler
from msa.splits import assign_splits, split_seed
from msa.training import (GracefulStop, autocast_context, check_finite, make_scheduler,
                          parameter_groups, select_device)

log = logging.getLogger(__name__)

WORK_STATE = "work/state.pt"
MAX_INVERSE_VARIANCE_WEIGHT = 10.0
EXIT_MORE_EPOCHS = 75  # EX_TEMPFAIL: the job stopped after epochs_per_job; rerun to continue
CONFIG_SECTIONS = ("seed", "features", "labels", "label_sets", "splits", "finetune", "model")


class FinetuneError(RuntimeError):
    """Inconsistent fine-tuning inputs (labels, layout, pretrained model, in-progress state)."""


# --- set-up ----------------------------------------------------------------------------------------
def feature_indices(layout: Layout, names_or_groups: Sequence[str]) -> np.ndarray:
    """Layout positions of the named features and of every feature in the named groups."""
    idx: list[int] = []
    for item in names_or_groups:
        if item in GROUP_ORDER:
            idx.extend(layout.group_indices(item).tolist())
        elif item in layout.names:
            idx.append(layout.index(item))
        else:
            raise FinetuneError(f"finetune.pert_features: {item!r} is neither a feature nor a group "
                                f"({list(GROUP_ORDER)})")
    return np.array(sorted(set(idx)), dtype=np.int64)


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


def inverse_variance_weights(y_err_scaled: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """``(reference / σ)²`` capped at :data:`MAX_INVERSE_VARIANCE_WEIGHT`; NaN or non-positive σ → 1."""
    with np.errstate(divide="ignore", invalid="ignore"):
        w = (reference[None, :] / y_err_scaled) ** 2
    w = np.where(np.isfinite(w) & (y_err_scaled > 0), w, 1.0)
    return np.minimum(w, MAX_INVERSE_VARIANCE_WEIGHT)


def reference_errors(y_err_scaled: np.ndarray) -> np.ndarray:
    """Median positive scaled label error per label (1 for a label without errors)."""
    positive = np.where(y_err_scaled > 0, y_err_scaled, np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a label without any error column: all NaN
        return np.nan_to_num(np.nanmedian(positive, axis=0), nan=1.0)


# --- the objective -----------------------------------------------------------------------------------
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
        self.pert_idx = torch.as_tensor(feature_indices(layout, cfg["pert_features"]), dtype=torch.long,
                                        device=device)
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
            groups += parameter_groups(self.model, wd, lr=self.cfg["lr_encoder"])
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
        if len(self.pert_idx) and cfg["pert_scale"] > 0:
            # one Gaussian draw per entry (never one per batch); missing errors add nothing
            noise = torch.randn(x[:, self.pert_idx].shape, generator=generator, device=x.device)
            e = torch.nan_to_num(err[:, self.pert_idx], nan=0.0)
            x = x.clone()
            x[:, self.pert_idx] = x[:, self.pert_idx] + cfg["pert_scale"] * e * noise
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


# --- data ------------------------------------------------------------------------------------------------
@dataclass
class Tensors:
    """One split on the device: scaled inputs and labels, weights, Gaia parallax (mas)."""

    x: torch.Tensor
    err: torch.Tensor
    y: torch.Tensor
    y_err: torch.Tensor
    weights: torch.Tensor
    plx_obs: torch.Tensor
    plx_err: torch.Tensor

    def __len__(self) -> int:
        return self.x.shape[0]

    def rows(self, idx) -> tuple[torch.Tensor, ...]:
        return (self.x[idx], self.err[idx], self.y[idx], self.y_err[idx], self.weights[idx],
                self.plx_obs[idx], self.plx_err[idx])


def to_tensors(stars: LabelledStars, label_scaler: LabelScaler, plx: ParallaxSetup, inverse_variance: bool,
               err_reference: np.ndarray, device: torch.device) -> Tensors:
    y, y_err = label_scaler.transform(stars.y, stars.y_err)
    w = inverse_variance_weights(y_err, err_reference) if inverse_variance else np.ones_like(y)
    nan = np.full(len(stars), np.nan)
    plx_obs = stars.extra.get(plx.gaia_column, nan) if plx.gaia_column else nan
    plx_err = stars.extra.get(plx.gaia_error_column, nan) if plx.gaia_error_column else nan

    def t(a):
        return torch.as_tensor(np.asarray(a, dtype=np.float32), device=device)

    return Tensors(t(stars.x), t(stars.err), t(y), t(y_err), t(w), t(plx_obs), t(plx_err))


# --- the run -----------------------------------------------------------------------------------------------
def _pretrained(path: str | Path | None, layout: Layout, model_cfg: Mapping) -> tuple[nn.Module, dict]:
    """The pretrained autoencoder and its checkpoint (layout checked by ``load_pretrained``);
    with no path, a randomly initialised one of the config's architecture (the from-scratch
    yardstick that measures what pretraining adds) and an empty checkpoint."""
    from msa.model import MaskedAutoencoder
    from msa.pretrain import load_pretrained

    if path is None:
        return MaskedAutoencoder(layout.n_features, len(layout.reconstruct_indices), **model_cfg), {}

    loaded = load_pretrained(path, layout)
    model, ckpt = loaded if isinstance(loaded, tuple) else (loaded, load_checkpoint(path))
    return model, ckpt


@dataclass
class MemberRun:
    """Everything one ``msa finetune`` invocation needs (built by :func:`run` or by tests)."""

    config: dict
    label_set: str
    member: int
    pretrained: Path | None  # None: a randomly initialised encoder (no pretraining)
    shards: list[Path]
    scaler_path: Path
    out_dir: Path
    device: torch.device | None = None


def finetune_member(job: MemberRun, step_callback: Callable[[int], None] | None = None) -> int:
    """Train one member; returns 0 when ``model.pt`` is written, 143 after SIGTERM (state saved),
    :data:`EXIT_MORE_EPOCHS` when ``epochs_per_job`` epochs ran and more remain (state saved).

    ``step_callback(step)`` is called after every optimiser step (progress hooks, tests).
    """
    config, cfg = job.config, job.config["finetune"]
    seed = int(config["seed"]) + int(job.member)
    device = job.device or select_device()
    out_dir = Path(job.out_dir)
    work_path = out_dir / WORK_STATE
    chash = config_hash(config, list(CONFIG_SECTIONS))

    layout = Layout.from_config(config["features"])
    scaler = Scaler.load(job.scaler_path)
    transform = FeatureTransform(layout, scaler, xp_normalises(config["features"]))
    names = label_set(config, job.label_set)
    plx = parallax_setup(cfg, names, layout)
    extras = ["phot_g_mean_mag"] + [c for c in (plx.gaia_column, plx.gaia_error_column) if c]
    extras = list(dict.fromkeys(extras + (transform.store_columns if cfg["faint_copies"] else [])))
    stars = load_labelled(job.shards, transform, LabelSource(config["labels"], names), extras)
    split = assign_splits(stars.source_id, config["splits"], split_seed(config))
    train, val = stars.subset(split == "train"), stars.subset(split == "validation")
    if cfg["faint_copies"] and len(train):
        train = append_faint_copies(train, transform, job.shards, config, seed,
                                    [] if plx.label_index is None else [plx.label_index])
    if len(train) == 0 or len(val) == 0:
        raise FinetuneError(f"{len(train)} training and {len(val)} validation stars with labels {names}; "
                            "both must be non-empty (check splits fractions and the catalogue join)")
    label_scaler = LabelScaler.fit(names, train.y, [n for n in cfg["log_labels"] if n in names])
    _, train_err_scaled = label_scaler.transform(train.y, train.y_err)
    err_ref = reference_errors(train_err_scaled)
    log.info("label set %s %s: %d train / %d validation stars; member %d, seed %d, device %s",
             job.label_set, names, len(train), len(val), job.member, seed, device)

    torch.manual_seed(seed)
    model, pre_ckpt = _pretrained(job.pretrained, layout, config["model"])
    if "scaler" in pre_ckpt and pre_ckpt["scaler"] != scaler.to_dict():
        raise FinetuneError(f"the scaler {job.scaler_path} differs from the one {job.pretrained} was pretrained "
                            "with; fine-tune with the pipeline's own scaler.json")
    head = QuantileHead(model.latent_dim, len(names), widths=cfg["head_widths"],
                        n_inputs=layout.n_features if cfg["head_reads_inputs"] else 0)
    model.to(device)
    head.to(device)
    if cfg["freeze_encoder"]:
        model.requires_grad_(False)
    mask_spec = MaskSpec.from_config(layout, cfg, fallback=config["pretrain"])
    objective = Objective(model, head, cfg, layout, mask_spec, plx, label_scaler, config["pretrain"], device)
    optimizer = torch.optim.AdamW(objective.parameter_groups())
    scheduler = make_scheduler(optimizer, restart_epochs=cfg["epochs"], min_lr=0.0)
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    train_t = to_tensors(train, label_scaler, plx, cfg["inverse_variance"], err_ref, device)
    val_t = to_tensors(val, label_scaler, plx, False, err_ref, device)
    n_batches = max(1, int(np.ceil(len(train_t) / cfg["batch_size"])))

    state = {"epoch": 0, "batch": 0, "step": 0, "metrics": [], "best_val": float("inf"), "bad_epochs": 0,
             "best": None, "sums": {}}
    set_aside_if_corrupt(work_path)  # a corrupt in-progress checkpoint must not block every retry
    if work_path.exists() and load_checkpoint(work_path).get("config_hash") != chash:
        # a killed run with other settings: its state must not leak into this one
        log.warning("ignoring %s: it was made with other fine-tuning settings; this member starts afresh",
                    work_path)
    elif work_path.exists():
        state = _resume(work_path, model, head, optimizer, scheduler, generator)
        log.info("resuming %s at epoch %d, batch %d (step %d)", work_path, state["epoch"], state["batch"],
                 state["step"])

    def save_work() -> None:
        save_checkpoint(work_path, {
            "kind": "finetune-work", "config_hash": chash, "model": model.state_dict(), "head": head.state_dict(),
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "generator": generator.get_state(), "rng": rng_state(), **state})

    amp = autocast_context(device, config["pretrain"]["amp"])
    epochs_this_job = 0
    with GracefulStop() as stop:
        while state["epoch"] < cfg["epochs"] and state["bad_epochs"] < cfg["patience"]:
            epoch = state["epoch"]
            if cfg["epochs_per_job"] and epochs_this_job >= cfg["epochs_per_job"]:
                save_work()
                log.info("stopped after %d epoch(s) (finetune.epochs_per_job); rerun to continue", epochs_this_job)
                return EXIT_MORE_EPOCHS
            order = torch.as_tensor(np.random.default_rng([seed, epoch]).permutation(len(train_t)), device=device)
            objective.train()
            started = time.time()
            bar = tqdm(range(state["batch"], n_batches), desc=f"finetune {job.label_set}/{job.member} ep {epoch}",
                       unit="batch", leave=False, disable=None)
            for b in bar:
                idx = order[b * cfg["batch_size"]:(b + 1) * cfg["batch_size"]]
                with amp:
                    losses = objective.batch_losses(*train_t.rows(idx), generator)
                loss_value = check_finite(losses["total"], state["step"])
                optimizer.zero_grad(set_to_none=True)
                losses["total"].backward()
                if cfg["grad_clip"]:
                    nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]],
                                             cfg["grad_clip"])
                optimizer.step()
                scheduler.step(epoch + (b + 1) / n_batches)
                state["step"] += 1
                state["batch"] = b + 1
                for k, v in losses.items():
                    s = state["sums"].setdefault(k, [0.0, 0])
                    s[0] += loss_value if k == "total" else float(v.detach())
                    s[1] += 1
                if step_callback is not None:
                    step_callback(state["step"])
                if stop.requested:
                    save_work()
                    log.warning("stopped by signal at epoch %d batch %d; state saved to %s", epoch, b + 1, work_path)
                    return GracefulStop.EXIT_CODE
                if state["step"] % cfg["checkpoint_every"] == 0:
                    save_work()
            val = validation_loss(objective, val_t, cfg["batch_size"] * 4, amp)
            row = {"epoch": epoch, "step": state["step"],
                   **{f"train_{k}": s[0] / max(s[1], 1) for k, s in state["sums"].items()},
                   "val_pinball": val["pinball"],
                   **({"val_pinball_with_xp": val["pinball_with_xp"], "val_pinball_no_xp": val["pinball_no_xp"]}
                      if "pinball_no_xp" in val else {}),
                   **{f"val_pinball_{n}": v for n, v in zip(names, val["per_label"])},
                   "lr_head": optimizer.param_groups[0]["lr"], "seconds": time.time() - started}
            improved = val["pinball"] < state["best_val"]
            row["best"] = improved
            if improved:
                state["best_val"] = val["pinball"]
                state["bad_epochs"] = 0
                state["best"] = {"model": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
                                 "head": {k: v.detach().cpu().clone() for k, v in head.state_dict().items()},
                                 "epoch": epoch}
            else:
                state["bad_epochs"] += 1
            state["metrics"].append(row)
            log.info("epoch %d: train %.4f, val pinball %.4f%s", epoch, row["train_total"], val["pinball"],
                     " (best)" if improved else "")
            state.update(epoch=epoch + 1, batch=0, sums={})
            epochs_this_job += 1
            save_work()
    if state["bad_epochs"] >= cfg["patience"]:
        log.info("early stop: no validation improvement for %d epochs", cfg["patience"])
    best = state["best"]
    model.load_state_dict(best["model"])
    head.load_state_dict(best["head"])
    _write_outputs(job, model, head, names, label_scaler, layout, scaler, mask_spec, plx, seed, chash,
                   state["metrics"], best["epoch"])
    shutil.rmtree(out_dir / "work", ignore_errors=True)
    return 0


def validation_loss(objective: Objective, data: Tensors, batch_size: int, amp) -> dict:
    """Mean pinball loss (all labels, and per label) on the inference path; with the objective's
    ``no_xp_weight``, plus that weight × the same with XP hidden (``pinball`` is then the sum)."""
    objective.eval()
    out = {}
    passes = [("", False)] + ([("_no_xp", True)] if objective.no_xp_weight > 0 else [])
    with torch.no_grad(), amp:
        for suffix, hide_xp in passes:
            total = torch.zeros(len(objective.label_scale), dtype=torch.float64)
            count = torch.zeros_like(total)
            for start in range(0, len(data), batch_size):
                sl = slice(start, start + batch_size)
                q = objective.predict_scaled(data.x[sl], hide_xp=hide_xp).float()
                for j in range(q.shape[1]):
                    y = data.y[sl, j:j + 1]
                    n = int((~torch.isnan(y)).sum())
                    if n:
                        total[j] += float(pinball_loss(q[:, j:j + 1], y)) * n
                        count[j] += n
            out["pinball" + suffix] = float(total.sum() / count.sum().clamp_min(1))
            out["per_label" + suffix] = (total / count.clamp_min(1)).tolist()
    objective.train()
    if "pinball_no_xp" in out:
        out["pinball_with_xp"] = out["pinball"]
        out["pinball"] = out["pinball"] + objective.no_xp_weight * out["pinball_no_xp"]
    return out


def _resume(path: Path, model, head, optimizer, scheduler, generator) -> dict:
    ckpt = load_checkpoint(path)
    model.load_state_dict(ckpt["model"])
    head.load_state_dict(ckpt["head"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    generator.set_state(ckpt["generator"])
    restore_rng_state(ckpt["rng"])
    return {k: ckpt[k] for k in ("epoch", "batch", "step", "metrics", "best_val", "bad_epochs", "best", "sums")}


def _write_outputs(job: MemberRun, model, head, names, label_scaler, layout, scaler, mask_spec, plx, seed,
                   chash, metrics, best_epoch) -> None:
    out_dir = Path(job.out_dir)
    payload = {
        "kind": "finetune",
        "model": {k: v.cpu() for k, v in model.state_dict().items()}, "model_hparams": dict(model.hparams),
        "head": {k: v.cpu() for k, v in head.state_dict().items()}, "head_hparams": dict(head.hparams),
        "labels": list(names), "label_centre": [float(c) for c in label_scaler.centre],
        "label_scale": [float(s) for s in label_scaler.scale], "log_labels": list(label_scaler.log_labels),
        "layout": layout.to_dict(), "scaler": scaler.to_dict(),
        "normalise_xp": xp_normalises(job.config["features"]),
        "force_mask_indices": [int(i) for i in mask_spec.force_indices],
        "parallax": plx.to_dict(), "member": int(job.member), "seed": int(seed), "label_set": job.label_set,
        "config_hash": chash, "config": job.config["finetune"], "metrics": metrics, "epoch": int(best_epoch),
    }
    save_checkpoint(out_dir / "model.pt", payload)
    from msa.store import atomic_path

    with atomic_path(out_dir / "metrics.jsonl") as tmp:
        tmp.write_text("".join(json.dumps(row) + "\n" for row in metrics))
    from msa.plots import plot_finetune_loss

    plot_finetune_loss(metrics, out_dir / "loss.png", title=f"{job.label_set} member {job.member}")
    log.info("wrote %s (best epoch %d)", out_dir / "model.pt", best_epoch)


# --- command line -------------------------------------------------------------------------------------------
def add_arguments(parser) -> None:
    parser.add_argument("--config", required=True, help="pipeline config (YAML)")
    parser.add_argument("--label-set", required=True, help="name in the config's label_sets")
    parser.add_argument("--member", type=int, required=True, help="ensemble member index k (seed = seed + k)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--pretrained", help="pretrained model.pt")
    source.add_argument("--from-scratch", action="store_true",
                        help="start from a randomly initialised encoder (the yardstick for what pretraining adds)")
    parser.add_argument("--shards", nargs="+", required=True, help="shard store files")
    parser.add_argument("--scaler", required=True, help="the pipeline's feature scaler JSON")
    parser.add_argument("--out-dir", required=True, help="member folder: model.pt, metrics.jsonl, loss.png")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--photometry-only", action="store_true",
                        help="a member that never sees XP (finetune.photometry_overrides applied): it serves "
                             "the stars without XP")


def photometry_member_config(config: dict) -> dict:
    """The config of a photometry-only member: ``finetune.photometry_overrides`` applied and every
    XP column hidden, so it learns the stars without XP on their own schedule."""
    cfg = config["finetune"]
    overrides = dict(cfg["photometry_overrides"])
    unknown = sorted(set(overrides) - set(cfg) | set(overrides) & {"photometry_members", "photometry_overrides"})
    if unknown:
        raise FinetuneError(f"finetune.photometry_overrides: {unknown} are not fine-tuning keys a member can "
                            "set (see config/README.md, finetune)")
    return {**config, "finetune": {**cfg, **overrides, "photometry_only": True}}


def run(args) -> int:
    config = load_config(args.config)
    if args.photometry_only:
        config = photometry_member_config(config)
    job = MemberRun(config, args.label_set, args.member,
                    None if args.from_scratch else Path(args.pretrained),
                    [Path(s) for s in args.shards], Path(args.scaler), Path(args.out_dir),
                    torch.device(args.device) if args.device else None)
    try:
        return finetune_member(job)
    except CheckpointError as err:
        raise FinetuneError(str(err)) from err
