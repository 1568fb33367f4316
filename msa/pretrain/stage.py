"""Masked-autoencoder pretraining over the shard store, one segment of epochs per job.

``msa pretrain --config CFG --shards ... --scaler S --out-dir results/pretrain --segment K`` trains
epochs ``[K·epochs_per_job, min((K+1)·epochs_per_job, epochs))``. It starts from

1. ``out-dir/work/segment-K.pt`` if it exists (this segment was killed: resume mid-epoch, exactly),
2. else ``out-dir/segment-{K-1}.pt`` (K > 0: the previous segment's final state),
3. else ``pretrain.presaved`` (weights only) or a fresh model,

and writes ``out-dir/segment-K.pt``, ``segment-K.metrics.jsonl`` (every epoch so far) and
``segment-K.loss.png``. An in-progress checkpoint goes to ``out-dir/work/segment-K.pt`` every
``checkpoint_every`` steps, at every epoch end, and on SIGTERM (then the job exits with 143).

With ``pretrain.exclude_label_splits``, the calibration and test stars that carry a label taken
from the store (a label set whose label is a store column, e.g. Gaia's ``parallax``) are left out
of pretraining, training and validation alike: a value that calibration and evaluation score on
those stars was never a reconstruction target for them (training stars keep theirs: fine-tuning
fits them anyway).

With ``pretrain.label_targets``, the train split's stars that have those labels also fit them
from the latent (:mod:`msa.pretrain.label_targets`); the checkpoint records the labels and their
scaling under ``label_targets``.

Exact resume: the batch stream is a pure function of (seed, epoch, rank), so a resumed epoch skips
the batches already done; the masking/perturbation generator is reseeded from (seed, rank, step)
at every step, so its state is a function of the step and identical on resume for every rank.

The same command runs under ``torchrun``: each rank streams disjoint shards, gradients are
averaged by DistributedDataParallel, ranks agree on a common number of batches per epoch, and
only rank 0 logs and writes.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from msa.config import config_hash, load_config
from msa.data.batches import ShardStream, hash_fraction
from msa.data.features import FeatureTransform, xp_normalises
from msa.data.labels import store_label_columns
from msa.data.layout import Layout
from msa.data.scaling import Scaler
from msa.data.splits import assign_splits, split_seed
from msa.data.store import SOURCE_ID, atomic_path
from msa.figures import plot_loss_curves
from msa.nn.checkpoint import (CheckpointError, check_layout, load_checkpoint, restore_rng_state, rng_state,
                               save_checkpoint, set_aside_if_corrupt)
from msa.nn.masking import MaskSpec
from msa.nn.model import MaskedAutoencoder
from msa.nn.perturbation import perturbed_columns
from msa.nn.training import DistributedContext, GracefulStop, add_device_argument, make_optimizer, make_scheduler
from msa.pretrain.engine import EpochPosition, PretrainState, train_one_epoch, validate
from msa.pretrain.flux_target import FluxTarget
from msa.pretrain.label_targets import LabelTargets
from msa.progress import progress

log = logging.getLogger(__name__)


class PretrainError(RuntimeError):
    """The segment cannot start or continue (missing previous segment, mismatched checkpoint, ...)."""


# --- small pure pieces ----------------------------------------------------------------------------
# the settings an in-progress checkpoint must share with the current run to be resumed
SETTINGS_SECTIONS = ["seed", "features", "model", "pretrain"]
HELD_OUT_SPLITS = ("calibration", "test")  # what exclude_label_splits keeps out of pretraining


def settings_sections(config: dict) -> list[str]:
    """Config sections that decide a segment's result (with exclude_label_splits, also the splits
    and the labels: they decide which stars are left out)."""
    section = config["pretrain"]
    extra = ["splits", "labels", "label_sets"] if section["exclude_label_splits"] or section["label_targets"] else []
    return SETTINGS_SECTIONS + extra


def held_out_labelled_stars(config: dict):
    """``(row_join, columns)`` of :class:`~msa.data.batches.ShardStream` that drops the calibration
    and test stars with a label from the store (``exclude_label_splits``); ``(None, [])`` when off
    or when no label comes from the store."""
    columns = store_label_columns(config) if config["pretrain"]["exclude_label_splits"] else []
    if not columns:
        return None, []
    splits_cfg, seed = config["splits"], split_seed(config)

    def join(raw: dict) -> tuple[np.ndarray, dict]:
        labelled = np.zeros(len(raw[SOURCE_ID]), dtype=bool)
        for c in columns:
            labelled |= np.isfinite(raw[c])
        keep = np.ones_like(labelled)
        keep[labelled] = ~np.isin(assign_splits(raw[SOURCE_ID][labelled], splits_cfg, seed), HELD_OUT_SPLITS)
        return keep, {}

    return join, columns


def segment_epochs(section: dict, segment: int) -> tuple[int, int]:
    """Epoch range ``[start, stop)`` of segment ``segment``."""
    per_job, total = section["epochs_per_job"], section["epochs"]
    start, stop = segment * per_job, min((segment + 1) * per_job, total)
    if segment < 0 or start >= total:
        last = -(-total // per_job) - 1
        raise PretrainError(f"--segment {segment}: pretrain.epochs = {total} with epochs_per_job = {per_job} "
                            f"gives segments 0..{last}")
    return start, stop


def load_pretrained(path: str | Path, layout: Layout, map_location="cpu") -> tuple[MaskedAutoencoder, dict]:
    """The pretrained autoencoder of a checkpoint (built from its ``model_hparams``) and the
    checkpoint; refuses a checkpoint made for another feature layout, naming the difference."""
    checkpoint = load_checkpoint(path, map_location=map_location)
    if "model" not in checkpoint or "model_hparams" not in checkpoint:
        raise CheckpointError(f"checkpoint {path} has no model weights/hparams; is it a pretraining checkpoint?")
    check_layout(checkpoint, layout, path)
    model = MaskedAutoencoder(**checkpoint["model_hparams"])
    model.load_state_dict(checkpoint["model"])
    return model, checkpoint


# --- the loop -------------------------------------------------------------------------------------
@dataclass
class SegmentResult:
    model: MaskedAutoencoder
    step: int
    epoch: int
    metrics: list[dict] = field(default_factory=list)
    exit_code: int = 0
    checkpoint: Path | None = None


def _split_shards(shard_paths: Sequence[str | Path], section: dict, seed: int):
    """(train shards, validation shards, train row filter, validation row filter)."""
    paths = sorted(Path(p) for p in shard_paths)  # every rank must see the same order
    if not paths:
        raise PretrainError("pretrain: no shards given (--shards)")
    if section["validation_shards"]:
        names = set(section["validation_shards"])
        val = [p for p in paths if p.name in names or p.stem in names]
        found = {p.name for p in val} | {p.stem for p in val}
        missing = sorted(names - found)
        if missing:
            raise PretrainError(f"pretrain.validation_shards: {missing} are not among --shards")
        train = [p for p in paths if p not in val]
        if not train:
            raise PretrainError("pretrain.validation_shards names every shard; leave some for training")
        return train, val, None, None
    if section["validation_fraction"] <= 0:
        return paths, [], None, None
    return (paths, paths, lambda sid: ~held_out_of_pretraining(sid, None, section, seed),
            lambda sid: held_out_of_pretraining(sid, None, section, seed))


def held_out_of_pretraining(source_id: np.ndarray, shard: str | Path | None, section: dict, seed: int) -> np.ndarray:
    """Bool per star: never trained on in pretraining (its validation stars: the whole shard when
    ``validation_shards`` names ``shard``, else a ``source_id`` hash below ``validation_fraction``)."""
    if section["validation_shards"]:
        names = set(section["validation_shards"])
        held = shard is not None and (Path(shard).name in names or Path(shard).stem in names)
        return np.full(len(source_id), held, dtype=bool)
    return hash_fraction(source_id, seed) < section["validation_fraction"]


def _check_resume(checkpoint: dict, path: Path, layout: Layout, scaler: Scaler, hparams: dict) -> None:
    check_layout(checkpoint, layout, path)
    if checkpoint.get("model_hparams") != hparams:
        raise PretrainError(f"checkpoint {path} was built with model {checkpoint.get('model_hparams')}, the config "
                            f"asks for {hparams}; use the config it was trained with")
    saved = Scaler.from_dict(checkpoint["scaler"])
    if saved.names != scaler.names or not (np.allclose(saved.centre, scaler.centre)
                                           and np.allclose(saved.scale, scaler.scale)):
        raise PretrainError(f"checkpoint {path} was trained with another feature scaler; pass the scaler "
                            "file it was trained with (--scaler)")


def _write_metrics(path: Path, metrics: list[dict]) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps(m) + "\n" for m in metrics))


def _build_state(config: dict, layout: Layout, scaler: Scaler, ctx: DistributedContext,
                 targets: LabelTargets | None = None) -> PretrainState:
    """A fresh model (the same initial weights on every rank), its optimiser and schedule, the masks."""
    section, seed = config["pretrain"], int(config["seed"])
    torch.manual_seed(seed)
    recon_idx = torch.as_tensor(layout.reconstruct_indices)
    model = MaskedAutoencoder(layout.n_features, len(recon_idx), **config["model"],
                              n_label_targets=len(targets.names) if targets else 0)
    optimizer = make_optimizer(model, section["lr"], section["weight_decay"])
    scheduler = make_scheduler(optimizer, section["restart_epochs"], section["restart_mult"], section["min_lr"])
    pert_cols = torch.as_tensor(perturbed_columns(layout, section["pert_features"], "pretrain.pert_features"))
    flux_target = (FluxTarget(layout, scaler, section["flux_target_weight"]).to(ctx.device)
                   if section["flux_target_weight"] else None)
    return PretrainState(model=model, forward=model, optimizer=optimizer, scheduler=scheduler,
                         spec=MaskSpec.from_config(layout, section), recon_idx=recon_idx,
                         groups=layout.reconstruct_groups_positions(), pert_cols=pert_cols, section=section,
                         seed=seed, ctx=ctx, generator=torch.Generator(device=ctx.device), amp=bool(section["amp"]),
                         label_weight=targets.weight if targets else 0.0, flux_target=flux_target)


def _resume_from(out_dir: Path, work_path: Path, segment: int, settings_hash: str, ctx) -> Path | None:
    """The checkpoint this segment continues: its own in-progress one (same settings), else the
    previous segment's final state; None for a first segment started afresh."""
    resume_from = out_dir / f"segment-{segment - 1}.pt" if segment > 0 else None
    set_aside_if_corrupt(work_path)  # a corrupt in-progress checkpoint must not block every retry
    if work_path.exists():
        if load_checkpoint(work_path).get("config_hash") == settings_hash:
            return work_path
        if ctx.is_main:  # a killed run with other settings: its state must not leak into this one
            log.warning("ignoring %s: it was made with other pretraining settings; segment %d starts afresh",
                        work_path, segment)
    if resume_from is not None and not resume_from.exists():
        raise PretrainError(f"segment {segment} starts from {resume_from}, which does not exist; "
                            f"run --segment {segment - 1} first")
    return resume_from


def _restore(state: PretrainState, path: Path, layout: Layout, scaler: Scaler, segment: int,
             epochs: tuple[int, int]) -> tuple[EpochPosition, list[dict], dict]:
    """Load model, optimiser, schedule and RNG state from ``path``; (position, metrics, checkpoint)."""
    ckpt = load_checkpoint(path)
    _check_resume(ckpt, path, layout, scaler, state.model.hparams)
    state.model.load_state_dict(ckpt["model"])
    state.optimizer.load_state_dict(ckpt["optimizer"])
    state.scheduler.load_state_dict(ckpt["scheduler"])
    restore_rng_state(ckpt["rng"])
    pos = EpochPosition(step=ckpt["step"], epoch=ckpt["epoch"], batch_in_epoch=ckpt["batch_in_epoch"],
                        **ckpt["epoch_partial"])
    world_size = state.ctx.world_size
    if pos.batch_in_epoch and ckpt.get("world_size", 1) != world_size:
        raise PretrainError(f"{path} stopped mid-epoch with {ckpt.get('world_size')} process(es); "
                            f"resume it with the same number, not {world_size}")
    if not epochs[0] <= pos.epoch <= epochs[1]:
        raise PretrainError(f"{path} is at epoch {pos.epoch}, outside segment {segment} "
                            f"(epochs {epochs[0]}..{epochs[1] - 1})")
    if state.ctx.is_main:
        log.info("resuming from %s at epoch %d, batch %d, step %d", path, pos.epoch, pos.batch_in_epoch, pos.step)
    return pos, list(ckpt["metrics"]), ckpt


def _start_from_presaved(state: PretrainState, path: str, layout: Layout) -> None:
    ckpt = load_checkpoint(path)
    check_layout(ckpt, layout, path)
    state.model.load_state_dict(ckpt["model"])
    if state.ctx.is_main:
        log.info("starting from the weights of %s", path)


def _to_device(state: PretrainState) -> None:
    """Model and optimiser state onto the run's device; DDP and torch.compile wrapped as configured."""
    device, model = state.ctx.device, state.model
    model.to(device)
    for opt_state in state.optimizer.state.values():
        for k, v in opt_state.items():
            if isinstance(v, torch.Tensor) and k != "step":
                opt_state[k] = v.to(device)
    net = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None) \
        if state.ctx.distributed else model
    state.forward = torch.compile(net) if state.section["compile"] else net


def _common_batches(probe: ShardStream, ctx: DistributedContext) -> int:
    """Batches per epoch, the same on every rank (DDP ranks must take the same number of steps; a
    rank's surplus batches wait for the next epoch)."""
    local_batches = probe.n_batches(probe.count_rows())
    n_batches = int(ctx.all_reduce_min(float(local_batches)).item())
    if n_batches < 1:
        raise PretrainError(f"pretraining has no training rows on some rank ({local_batches} batches here); "
                            "add shards or lower validation_fraction")
    return n_batches


def _save_epoch_outputs(out_dir: Path, segment: int, metrics: list[dict]) -> None:
    _write_metrics(out_dir / f"segment-{segment}.metrics.jsonl", metrics)
    plot_loss_curves(metrics, out_dir / f"segment-{segment}.loss.png")


def pretrain_segment(config: dict, shard_paths: Sequence[str | Path], scaler: Scaler | str | Path,
                     out_dir: str | Path, segment: int, ctx: DistributedContext | None = None) -> SegmentResult:
    """Run one segment of pretraining (see the module docstring); returns the trained model."""
    ctx = ctx or DistributedContext.from_env()
    section, seed = config["pretrain"], int(config["seed"])
    out_dir = Path(out_dir)
    work_path = out_dir / "work" / f"segment-{segment}.pt"
    final_path = out_dir / f"segment-{segment}.pt"
    start_epoch, stop_epoch = segment_epochs(section, segment)

    layout = Layout.from_config(config["features"])
    scaler = scaler if isinstance(scaler, Scaler) else Scaler.load(scaler)
    transform = FeatureTransform(layout, scaler, xp_normalises(config["features"]))
    targets = LabelTargets.from_config(config)
    state = _build_state(config, layout, scaler, ctx, targets)
    pos, metrics, ckpt = EpochPosition(epoch=start_epoch), [], None
    settings_hash = config_hash(config, settings_sections(config))
    resume_from = _resume_from(out_dir, work_path, segment, settings_hash, ctx)
    if resume_from is not None:
        pos, metrics, ckpt = _restore(state, resume_from, layout, scaler, segment, (start_epoch, stop_epoch))
    elif section["presaved"]:
        _start_from_presaved(state, section["presaved"], layout)

    train_paths, val_paths, train_filter, val_filter = _split_shards(shard_paths, section, seed)
    held_out = held_out_labelled_stars(config)
    train_join = targets.row_join(held_out[0]) if targets else held_out[0]
    if targets and ctx.is_main:
        log.info("label targets %s: the train split's labels, weight %g", ", ".join(targets.names), targets.weight)
    stream_kw = dict(chunk_rows=section["chunk_rows"], buffer_rows=section["buffer_rows"],
                     batch_size=section["batch_size"], seed=seed, rank=ctx.rank, world_size=ctx.world_size,
                     prefetch_batches=6 if section["num_workers"] > 0 else 0, row_join=train_join,
                     join_columns=held_out[1])
    n_batches = _common_batches(ShardStream(train_paths, transform, row_filter=train_filter, **stream_kw), ctx)
    if ckpt is not None and pos.batch_in_epoch and ckpt.get("n_batches_per_epoch") != n_batches:
        raise PretrainError(f"{resume_from} was made with {ckpt.get('n_batches_per_epoch')} batches per epoch, "
                            f"the shards now give {n_batches}; the store changed under a running segment")
    _to_device(state)

    def payload(at_segment_end: bool = False) -> dict:
        return {"kind": "pretrain", "model": state.model.state_dict(), "model_hparams": state.model.hparams,
                "optimizer": state.optimizer.state_dict(), "scheduler": state.scheduler.state_dict(),
                "step": pos.step, "epoch": pos.epoch, "batch_in_epoch": pos.batch_in_epoch,
                "epoch_partial": pos.partial(), "segment": segment, "segment_complete": at_segment_end,
                "n_batches_per_epoch": n_batches, "world_size": ctx.world_size, "rng": rng_state(),
                "config": config, "config_hash": settings_hash, "layout": layout.to_dict(),
                "scaler": scaler.to_dict(), "metrics": metrics,
                "label_targets": targets.to_dict() if targets else None}

    def save_work() -> None:
        if ctx.is_main:
            save_checkpoint(work_path, payload())

    exit_code = 0
    with GracefulStop() as stop:
        while pos.epoch < stop_epoch:
            epoch = pos.epoch
            stream = ShardStream(train_paths, transform, row_filter=train_filter, epoch=epoch,
                                 skip_batches=pos.batch_in_epoch, max_batches=n_batches, **stream_kw)
            bar = progress(total=n_batches * section["batch_size"], initial=pos.batch_in_epoch * section["batch_size"],
                           desc=f"pretrain epoch {epoch + 1}/{section['epochs']}", unit="row", unit_scale=True,
                           enabled=ctx.is_main, mininterval=2.0)
            stopped = train_one_epoch(state, stream, pos, n_batches, stop, save_work, bar)
            bar.close()
            if stopped:
                exit_code = GracefulStop.EXIT_CODE
                if ctx.is_main:
                    log.warning("stopped by signal at step %d; resume by rerunning the same command", pos.step)
                break
            metrics.append(_epoch_record(state, pos, transform, val_paths, val_filter, held_out))
            pos = EpochPosition(step=pos.step, epoch=epoch + 1)
            if ctx.is_main:
                _save_epoch_outputs(out_dir, segment, metrics)
            if pos.epoch < stop_epoch:
                save_work()

    result = SegmentResult(state.model, pos.step, pos.epoch, metrics, exit_code)
    if exit_code == 0 and ctx.is_main:
        save_checkpoint(final_path, payload(at_segment_end=True))
        _save_epoch_outputs(out_dir, segment, metrics)
        work_path.unlink(missing_ok=True)
        result.checkpoint = final_path
        log.info("segment %d done: epochs %d..%d, %d steps → %s", segment, start_epoch + 1, stop_epoch,
                 pos.step, final_path)
    ctx.barrier()
    return result


def _epoch_record(state: PretrainState, pos: EpochPosition, transform, val_paths, val_filter, held_out) -> dict:
    """The epoch's line of ``segment-K.metrics.jsonl``: losses averaged over ranks, rows and speed."""
    ctx = state.ctx
    val_tick = time.perf_counter()
    val_loss, val_groups = validate(state, transform, val_paths, val_filter, held_out)
    train_loss = float(ctx.all_reduce_mean(pos.loss_sum / max(pos.batches, 1)).item())
    rows = int(ctx.all_reduce_sum(float(pos.rows)).item())
    record = {"epoch": pos.epoch, "step": pos.step, "train_loss": train_loss, "val_loss": val_loss,
              "val_loss_groups": val_groups, "lr": state.scheduler.get_last_lr()[0],
              "rows": rows, "rows_per_s": rows / max(pos.train_wall, 1e-9),
              "wall_s": pos.train_wall + time.perf_counter() - val_tick}
    if ctx.is_main:
        log.info("epoch %d: train %.5g, validation %s, %.0f rows/s", pos.epoch + 1, train_loss,
                 "—" if val_loss is None else f"{val_loss:.5g}", record["rows_per_s"])
    return record


# --- command line ---------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="pipeline config (features, model, pretrain sections)")
    parser.add_argument("--shards", nargs="+", required=True, help="the store's shard files")
    parser.add_argument("--scaler", required=True, help="scaler JSON from `msa fit-scaler`")
    parser.add_argument("--out-dir", required=True, help="e.g. results/pretrain")
    parser.add_argument("--segment", type=int, default=0, help="which block of epochs_per_job epochs to train")
    add_device_argument(parser)


def run(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    ctx = DistributedContext.from_env(args.device)
    if not ctx.is_main:
        logging.getLogger().setLevel(logging.WARNING)
    try:
        result = pretrain_segment(config, args.shards, args.scaler, args.out_dir, args.segment, ctx)
    finally:
        ctx.shutdown()
    return result.exit_code
