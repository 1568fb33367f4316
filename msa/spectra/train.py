"""``msa train-reconstruction``: the pretrained autoencoder trained further to infer XP spectra.

Pretraining reconstructs coefficients weighted by their measurement errors, which suits a star
whose XP is seen; a star fainter than G = 17.65 has none, and its spectrum must come from the
photometry. This stage takes ``results/pretrain/model.pt`` (its weights with ``init: pretrained``, only
its architecture, layout and scaler with ``init: random``) and trains the whole autoencoder
on the relative error of the sampled flux (``msa.nn.flux_loss``), the quantity
``msa evaluate-reconstruction`` scores, with every star's XP hidden from the encoder in a fraction
``hide_xp_fraction`` of the rows (drawn anew each batch; the other rows learn to reproduce the XP
they see, which pretraining, scoring hidden entries only, never asked of the decoder).

Stars: those with a full XP spectrum and a G magnitude that pretraining trained on (never its
held-out stars, on which the reconstruction is validated), at most ``max_stars`` of them (a
``source_id``-hash sample of each shard, read one shard at a time). A hashed ``stop_fraction`` of
them is set aside to choose the epoch whose median relative flux error, XP hidden, is lowest; the
checkpoint (``kind: reconstruct``) keeps that epoch's weights and loads wherever a pretrained
model does (``msa.nn.autoencoders``). Member ``k`` draws its batches and masks from ``seed + k``;
several members give ``msa reconstruct`` its spread.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from msa.config import config_hash, load_config
from msa.data.features import G_MAG
from msa.data.layout import Layout
from msa.data.star_hash import hash_uniform
from msa.data.store import SOURCE_ID, Shard, check_out_path, shard_rows
from msa.errors import InputError
from msa.nn.autoencoders import Autoencoders, held_out_definition
from msa.nn.checkpoint import save_checkpoint
from msa.nn.flux_loss import FluxMap, relative_flux_error
from msa.nn.model import MaskedAutoencoder
from msa.nn.training import add_device_argument, check_finite, make_optimizer, resolve_device
from msa.pretrain import held_out_of_pretraining
from msa.progress import progress
from msa.spectra.reconstruct import read_columns, xp_decoder_positions

log = logging.getLogger(__name__)

SAMPLE_SALT = 0x5EC0  # the star sample's hash differs from pretraining's validation hash
STOP_SALT = 0x5EC1  # and so does the choice of the stars that pick the epoch


class ReconstructTrainingError(InputError, ValueError):
    """Too few stars to train or to choose an epoch on."""


@dataclass
class FluxData:
    """Scaled encoder inputs ``x`` (NaN = missing) and the observed flux ``target`` (FluxMap units)."""

    x: torch.Tensor
    target: torch.Tensor
    source_id: np.ndarray

    def __len__(self) -> int:
        return len(self.source_id)

    def rows(self, keep: np.ndarray) -> "FluxData":
        index = torch.from_numpy(np.flatnonzero(keep))
        return FluxData(self.x[index], self.target[index], self.source_id[keep])


def training_stars(shard_paths, aes: Autoencoders, flux_map: FluxMap, pretrain_section: dict, seed: int,
                   max_stars: int) -> FluxData:
    """The stars pretraining trained on that have a full XP spectrum and G: at most ``max_stars``,
    a hash sample with one fraction for every shard (``max_stars`` / the store's rows, so fewer
    where most of the store's stars lack XP)."""
    fraction = min(1.0, max_stars / max(1, sum(shard_rows(p) for p in shard_paths)))
    xp = aes.layout.xp_indices
    xs, ids = [], []
    for path in progress(shard_paths, desc="reading shards", unit="shard"):
        with Shard(path) as shard:  # ids first: only the sampled rows' inputs are read
            source_id = shard.read([SOURCE_ID])[SOURCE_ID]
            rows = np.flatnonzero(~held_out_of_pretraining(source_id, path, pretrain_section, seed)
                                  & (hash_uniform(source_id, seed, SAMPLE_SALT) < fraction))
            raw = shard.read_rows([SOURCE_ID, *read_columns(aes)], rows)
        x = aes.scaled_inputs(raw)
        keep = np.isfinite(x[:, xp]).all(axis=1) & np.isfinite(raw[G_MAG])
        xs.append(x[keep].astype(np.float32))
        ids.append(np.asarray(raw[SOURCE_ID], dtype=np.int64)[keep])
    x = torch.from_numpy(np.concatenate(xs))
    with torch.no_grad():
        target = flux_map(x[:, xp])
    return FluxData(x, target, np.concatenate(ids))


class FluxObjective(torch.nn.Module):
    """An autoencoder and the map of its XP output to flux; ``forward`` gives each star's relative
    flux error with the rows of ``hide_xp`` (bool ``(n,)``) XP hidden, the model's forced mask always."""

    def __init__(self, aes: Autoencoders, flux_map: FluxMap):
        super().__init__()
        self.model, self.flux_map = aes.models[0], flux_map
        self.register_buffer("forced", aes.force_masks[0].clone())
        self.register_buffer("xp", torch.from_numpy(aes.xp_mask()).to(self.forced.device))
        self.register_buffer("positions", torch.as_tensor(xp_decoder_positions(aes)))

    def forward(self, x: torch.Tensor, target: torch.Tensor, hide_xp: torch.Tensor) -> torch.Tensor:
        hidden = self.forced | (hide_xp[:, None] & self.xp)
        reconstruction, _ = self.model(x, hidden)
        return relative_flux_error(self.flux_map(reconstruction[:, self.positions]), target)


def train_one_epoch(objective: FluxObjective, data: FluxData, optimizer, scheduler, cfg: dict,
                    generator: torch.Generator, device: torch.device) -> float:
    """One pass over ``data`` in shuffled batches; the mean loss (relative flux error, or its square)."""
    objective.train()
    order = torch.randperm(len(data), generator=generator)
    total, n = 0.0, 0
    for step, index in enumerate(order.split(cfg["batch_size"])):
        x, target = data.x[index].to(device), data.target[index].to(device)
        hide = (torch.rand(len(index), generator=generator) < cfg["hide_xp_fraction"]).to(device)
        error = objective(x, target, hide)
        loss = (error.square() if cfg["loss"] == "squared" else error).mean()
        value = check_finite(loss, step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg["grad_clip"]:
            torch.nn.utils.clip_grad_norm_(objective.parameters(), cfg["grad_clip"])
        optimizer.step()
        scheduler.step()
        total, n = total + value * len(index), n + len(index)
    return total / max(n, 1)


def median_error(objective: FluxObjective, data: FluxData, batch_size: int, device: torch.device) -> float:
    """Median relative flux error over ``data`` with XP hidden (the photometry-only reconstruction)."""
    objective.eval()
    errors = []
    with torch.inference_mode():
        for start in range(0, len(data), batch_size):
            x = data.x[start:start + batch_size].to(device)
            hide = torch.ones(len(x), dtype=torch.bool, device=device)
            errors.append(objective(x, data.target[start:start + batch_size].to(device), hide).cpu())
    return float(torch.cat(errors).median())


def snapshot(model: torch.nn.Module) -> dict:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def train_reconstruction(config: dict, pretrained: str | Path, shard_paths, out: str | Path, member: int = 0,
                         device: torch.device | str = "cpu") -> dict:
    """Train member ``member`` (see the module docstring) and write its checkpoint to ``out``."""
    cfg, seed = config["reconstruct"]["training"], int(config["seed"])
    inference_batch = config["reconstruct"]["batch_size"]
    device = torch.device(device)
    aes = Autoencoders.load([pretrained], device=device)
    Layout.from_config(config["features"]).require_same(aes.layout, str(pretrained))
    flux_map = FluxMap(aes.layout, aes.scaler)
    data = training_stars(shard_paths, aes, flux_map, config["pretrain"], seed, cfg["max_stars"])
    stopping = hash_uniform(data.source_id, seed, STOP_SALT) < cfg["stop_fraction"]
    train, stop_set = data.rows(~stopping), data.rows(stopping)
    if len(train) < cfg["batch_size"] or len(stop_set) < 10:
        raise ReconstructTrainingError(
            f"{len(train)} training and {len(stop_set)} epoch-choosing stars with full XP (of {len(data)} that "
            "pretraining trained on): too few; add shards, raise reconstruct.training.max_stars or lower "
            "reconstruct.training.batch_size")
    torch.manual_seed(seed + member)
    generator = torch.Generator().manual_seed(seed + member)
    if cfg["init"] == "random":  # the pretrained model's architecture, layout and scaler, fresh weights
        aes.models[0] = MaskedAutoencoder(**aes.models[0].hparams).to(device)
    objective = FluxObjective(aes, flux_map).to(device)
    optimizer = make_optimizer(objective.model, cfg["lr"], cfg["weight_decay"])
    steps = cfg["epochs"] * -(-len(train) // cfg["batch_size"])
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg["lr"], total_steps=steps)
    history = [{"epoch": 0, "stop_median_relative_flux_error": median_error(objective, stop_set, inference_batch, device)}]
    best = dict(history[0], state=snapshot(objective.model))  # the start may stay the best
    log.info("%d training stars, %d choosing the epoch; before training, median relative flux error %.4f "
             "(XP hidden)", len(train), len(stop_set), best["stop_median_relative_flux_error"])
    started = time.monotonic()
    for epoch in progress(range(1, cfg["epochs"] + 1), desc=f"reconstruction member {member}", unit="epoch"):
        loss = train_one_epoch(objective, train, optimizer, scheduler, cfg, generator, device)
        error = median_error(objective, stop_set, inference_batch, device)
        history.append({"epoch": epoch, "train_loss": loss, "stop_median_relative_flux_error": error})
        if error < best["stop_median_relative_flux_error"]:
            best = dict(history[-1], state=snapshot(objective.model))
    objective.model.load_state_dict(best["state"])
    summary = {"member": member, "best_epoch": best["epoch"], "train_stars": len(train),
               "stop_stars": len(stop_set), "seconds": time.monotonic() - started,
               "stop_median_relative_flux_error": best["stop_median_relative_flux_error"],
               "before_training": history[0]["stop_median_relative_flux_error"]}
    forced = np.flatnonzero(aes.force_masks[0].cpu().numpy())
    if cfg["hide_xp_fraction"] >= 1.0:  # never trained with XP seen: inference hides it too
        forced = np.union1d(forced, aes.layout.xp_indices)
    save_checkpoint(out, {
        "kind": "reconstruct", "model": objective.model.state_dict(), "model_hparams": objective.model.hparams,
        "layout": aes.layout.to_dict(), "scaler": aes.scaler.to_dict(), "normalise_xp": aes.normalise_xp,
        "force_mask_indices": [int(i) for i in forced], "member": member, "seed": seed + member,
        "config": {"reconstruct": config["reconstruct"], "pretrain": config["pretrain"]},
        "held_out": held_out_definition({"config": config}),  # evaluate-reconstruction must validate on these
        "config_hash": config_hash(config), "pretrained": str(pretrained), "pretrained_sha256": aes.sha256[0],
        "init": cfg["init"],
        "history": history, "summary": summary,
    })
    log.info("member %d: best epoch %d of %d, median relative flux error %.4f (was %.4f), %.0f s; wrote %s",
             member, summary["best_epoch"], cfg["epochs"], summary["stop_median_relative_flux_error"],
             summary["before_training"], summary["seconds"], out)
    return summary


def add_arguments(parser) -> None:
    parser.add_argument("--config", required=True, help="pipeline config (YAML); settings: reconstruct.training")
    parser.add_argument("--pretrained", required=True, help="the pretrained model (results/pretrain/model.pt)")
    parser.add_argument("--shards", nargs="+", required=True, help="the store's shards (HDF5)")
    parser.add_argument("--member", type=int, default=0, help="member index: its seed is config seed + member")
    parser.add_argument("--out", required=True, help="checkpoint to write (results/reconstruct/member-<k>.pt)")
    add_device_argument(parser)


def run(args) -> int:
    check_out_path(args.out, [args.config, args.pretrained, *args.shards], (".pt",))
    train_reconstruction(load_config(args.config), args.pretrained, args.shards, args.out, args.member,
                         resolve_device(args.device))
    return 0
