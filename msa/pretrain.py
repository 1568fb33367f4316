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

from msa.batches import ShardStream, hash_fraction
from msa.checkpoint import (CheckpointError, check_layout, load_checkpoint, restore_rng_state, rng_state,
                            save_checkpoint, set_aside_if_corrupt)
from msa.config import config_hash, load_config
from msa.features import FeatureTransform, xp_normalises
from msa.labels import store_label_columns
from msa.layout import GROUP_ORDER, Layout
from msa.losses import per_group_sums, reconstruction_objective, reconstruction_sums
from msa.masking import MaskSpec, draw_mask, fixed_validation_mask
from msa.model import MaskedAutoencoder
from msa.plots import plot_loss_curves
from msa.progress import progress
from msa.scaling import Scaler
from msa.splits import assign_splits, split_seed
from msa.store import SOURCE_ID, atomic_path
from msa.training import (DistributedContext, GracefulStop, NonFiniteLossError, add_device_argument,
                          autocast_context, make_optimizer, make_scheduler)

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
    extra = ["splits", "labels", "label_sets"] if config["pretrain"]["exclude_label_splits"] else []
    return SETTINGS_SECTIONS + extra


def held_out_labelled_stars(config: dict):
    """``(row_join, columns)`` of :class:`~msa.batches.ShardStream` that drops the calibration
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


def step_seed(seed: int, rank: int, step: int) -> int:
    """The masking generator's seed at a step: a function of (seed, rank, step) only."""
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def perturbed_columns(layout: Layout, names: Sequence[str]) -> np.ndarray:
    """Layout positions of ``pert_features`` entries (group names or feature names)."""
    cols: list[int] = []
    for name in names:
        if name in GROUP_ORDER:
            cols += layout.group_indices(name).tolist()
        elif name in layout.names:
            cols.append(layout.index(name))
        else:
            raise PretrainError(f"pretrain.pert_features: {name!r} is neither a group {list(GROUP_ORDER)} "
                                "nor a feature of the layout")
    return np.unique(np.asarray(cols, dtype=np.int64))


def perturb(x: torch.Tensor, err: torch.Tensor, columns: torch.Tensor, scale: float,
            generator: torch.Generator) -> torch.Tensor:
    """x + scale·σ·N(0, 1), one independent draw per element, on the given columns only
    (an element without an error is left as it is)."""
    if not len(columns) or scale == 0:
        return x
    noise = torch.randn(x.shape, generator=generator, device=generator.device).to(x.device)
    sigma = torch.nan_to_num(err[:, columns], nan=0.0)
    out = x.clone()
    out[:, columns] = x[:, columns] + scale * sigma * noise[:, columns]
    return out


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


@dataclass
class _Position:
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    loss_sum: float = 0.0
    batches: int = 0
    rows: int = 0
    train_wall: float = 0.0

    def partial(self) -> dict:
        return {"loss_sum": self.loss_sum, "batches": self.batches, "rows": self.rows,
                "train_wall": self.train_wall}


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
    spec = MaskSpec.from_config(layout, section)
    recon_idx = torch.as_tensor(layout.reconstruct_indices)
    groups = layout.reconstruct_groups_positions()
    pert_cols = torch.as_tensor(perturbed_columns(layout, section["pert_features"]))
    device = ctx.device

    torch.manual_seed(seed)  # identical initial weights on every rank
    model = MaskedAutoencoder(layout.n_features, len(recon_idx), **config["model"])
    optimizer = make_optimizer(model, section["lr"], section["weight_decay"])
    scheduler = make_scheduler(optimizer, section["restart_epochs"], section["restart_mult"], section["min_lr"])
    pos = _Position(epoch=start_epoch)
    metrics: list[dict] = []

    settings_hash = config_hash(config, settings_sections(config))
    resume_from = out_dir / f"segment-{segment - 1}.pt" if segment > 0 else None
    set_aside_if_corrupt(work_path)  # a corrupt in-progress checkpoint must not block every retry
    if work_path.exists():
        if load_checkpoint(work_path).get("config_hash") == settings_hash:
            resume_from = work_path
        elif ctx.is_main:  # a killed run with other settings: its state must not leak into this one
            log.warning("ignoring %s: it was made with other pretraining settings; segment %d starts afresh",
                        work_path, segment)
    if resume_from is not None:
        if not resume_from.exists():
            raise PretrainError(f"segment {segment} starts from {resume_from}, which does not exist; "
                                f"run --segment {segment - 1} first")
        ckpt = load_checkpoint(resume_from)
        _check_resume(ckpt, resume_from, layout, scaler, model.hparams)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        restore_rng_state(ckpt["rng"])
        pos = _Position(step=ckpt["step"], epoch=ckpt["epoch"], batch_in_epoch=ckpt["batch_in_epoch"],
                        **ckpt["epoch_partial"])
        metrics = list(ckpt["metrics"])
        if pos.batch_in_epoch and ckpt.get("world_size", 1) != ctx.world_size:
            raise PretrainError(f"{resume_from} stopped mid-epoch with {ckpt.get('world_size')} process(es); "
                                f"resume it with the same number, not {ctx.world_size}")
        if not start_epoch <= pos.epoch <= stop_epoch:
            raise PretrainError(f"{resume_from} is at epoch {pos.epoch}, outside segment {segment} "
                                f"(epochs {start_epoch}..{stop_epoch - 1})")
        if ctx.is_main:
            log.info("resuming from %s at epoch %d, batch %d, step %d", resume_from, pos.epoch,
                     pos.batch_in_epoch, pos.step)
    elif section["presaved"]:
        ckpt = load_checkpoint(section["presaved"])
        check_layout(ckpt, layout, section["presaved"])
        model.load_state_dict(ckpt["model"])
        if ctx.is_main:
            log.info("starting from the weights of %s", section["presaved"])

    train_paths, val_paths, train_filter, val_filter = _split_shards(shard_paths, section, seed)
    held_out, held_out_columns = held_out_labelled_stars(config)
    stream_kw = dict(chunk_rows=section["chunk_rows"], buffer_rows=section["buffer_rows"],
                     batch_size=section["batch_size"], seed=seed, rank=ctx.rank, world_size=ctx.world_size,
                     prefetch_batches=6 if section["num_workers"] > 0 else 0, row_join=held_out,
                     join_columns=held_out_columns)
    probe = ShardStream(train_paths, transform, row_filter=train_filter, **stream_kw)
    local_batches = probe.n_batches(probe.count_rows())
    # DDP ranks must take the same number of steps; a rank's surplus batches wait for the next epoch
    n_batches = int(ctx.all_reduce_min(float(local_batches)).item())
    if n_batches < 1:
        raise PretrainError(f"pretraining has no training rows on some rank ({local_batches} batches here); "
                            "add shards or lower validation_fraction")
    if resume_from is not None and pos.batch_in_epoch and ckpt.get("n_batches_per_epoch") != n_batches:
        raise PretrainError(f"{resume_from} was made with {ckpt.get('n_batches_per_epoch')} batches per epoch, "
                            f"the shards now give {n_batches}; the store changed under a running segment")

    model.to(device)
    for state in optimizer.state.values():  # optimizer state follows the model onto the device
        for k, v in state.items():
            if isinstance(v, torch.Tensor) and k != "step":
                state[k] = v.to(device)
    net = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None) \
        if ctx.distributed else model
    forward = torch.compile(net) if section["compile"] else net
    generator = torch.Generator(device=device)  # masks and noise drawn where the model runs
    amp = bool(section["amp"])

    def payload(at_segment_end: bool = False) -> dict:
        return {"kind": "pretrain", "model": model.state_dict(), "model_hparams": model.hparams,
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "step": pos.step,
                "epoch": pos.epoch, "batch_in_epoch": pos.batch_in_epoch, "epoch_partial": pos.partial(),
                "segment": segment, "segment_complete": at_segment_end, "n_batches_per_epoch": n_batches,
                "world_size": ctx.world_size, "rng": rng_state(), "config": config,
                "config_hash": settings_hash,
                "layout": layout.to_dict(), "scaler": scaler.to_dict(), "metrics": metrics}

    def save_work() -> None:
        if ctx.is_main:
            save_checkpoint(work_path, payload())

    exit_code = 0
    with GracefulStop() as stop:
        while pos.epoch < stop_epoch:
            epoch = pos.epoch
            model.train()
            stream = ShardStream(train_paths, transform, row_filter=train_filter, epoch=epoch,
                                 skip_batches=pos.batch_in_epoch, max_batches=n_batches, **stream_kw)
            bar = progress(total=n_batches * section["batch_size"], initial=pos.batch_in_epoch * section["batch_size"],
                           desc=f"pretrain epoch {epoch + 1}/{section['epochs']}", unit="row", unit_scale=True,
                           enabled=ctx.is_main, mininterval=2.0)
            tick = time.perf_counter()
            stopped = False
            for batch in stream:
                batch = batch.to(device)
                generator.manual_seed(step_seed(seed, ctx.rank, pos.step))
                hidden = draw_mask(spec, len(batch), generator, device)
                x_in = perturb(batch.x, batch.err, pert_cols, section["pert_scale"], generator)
                with autocast_context(device, amp):
                    recon, latent = forward(x_in, hidden)
                loss = reconstruction_objective(recon.float(), batch.x[:, recon_idx], batch.err[:, recon_idx],
                                                hidden[:, recon_idx], section["loss"], groups,
                                                section["loss_balance"], section["min_error"])
                if section["latent_l1"]:
                    loss = loss + section["latent_l1"] * latent.float().abs().mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                # after DDP's all-reduce the gradient norm is the same on every rank, so all stop together
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), section["grad_clip"] or float("inf"))
                value = float(loss.item())
                if not (np.isfinite(value) and torch.isfinite(grad_norm)):
                    raise NonFiniteLossError(
                        f"loss {value} (gradient norm {float(grad_norm)}) at step {pos.step} of epoch {epoch + 1}; "
                        "stopping. Check the inputs and scaler, lower pretrain.lr or set pretrain.grad_clip")
                optimizer.step()
                scheduler.step(epoch + (pos.batch_in_epoch + 1) / n_batches)
                pos.step += 1
                pos.batch_in_epoch += 1
                pos.loss_sum += value
                pos.batches += 1
                pos.rows += len(batch)
                bar.update(len(batch))
                stop_now = stop.requested
                if ctx.distributed:
                    stop_now = bool(ctx.all_reduce_sum(float(stop.requested)).item() > 0)
                if stop_now:
                    pos.train_wall += time.perf_counter() - tick
                    save_work()
                    stopped = True
                    break
                if pos.step % section["checkpoint_every"] == 0 and pos.batch_in_epoch < n_batches:
                    pos.train_wall += time.perf_counter() - tick
                    tick = time.perf_counter()
                    save_work()
            bar.close()
            if stopped:
                exit_code = GracefulStop.EXIT_CODE
                if ctx.is_main:
                    log.warning("stopped by signal at step %d; resume by rerunning the same command", pos.step)
                break
            pos.train_wall += time.perf_counter() - tick
            val_tick = time.perf_counter()
            val_loss, val_groups = validate(forward, model, transform, val_paths, val_filter, spec, recon_idx,
                                            groups, section, seed, ctx, amp, (held_out, held_out_columns))
            train_loss = float(ctx.all_reduce_mean(pos.loss_sum / max(pos.batches, 1)).item())
            rows = int(ctx.all_reduce_sum(float(pos.rows)).item())
            record = {"epoch": epoch, "step": pos.step, "train_loss": train_loss, "val_loss": val_loss,
                      "val_loss_groups": val_groups, "lr": scheduler.get_last_lr()[0],
                      "rows": rows, "rows_per_s": rows / max(pos.train_wall, 1e-9),
                      "wall_s": pos.train_wall + time.perf_counter() - val_tick}
            metrics.append(record)
            if ctx.is_main:
                log.info("epoch %d: train %.5g, validation %s, %.0f rows/s", epoch + 1, train_loss,
                         "—" if val_loss is None else f"{val_loss:.5g}", record["rows_per_s"])
            pos = _Position(step=pos.step, epoch=epoch + 1)
            if ctx.is_main:
                _write_metrics(out_dir / f"segment-{segment}.metrics.jsonl", metrics)
                plot_loss_curves(metrics, out_dir / f"segment-{segment}.loss.png")
            if pos.epoch < stop_epoch:
                save_work()

    result = SegmentResult(model, pos.step, pos.epoch, metrics, exit_code)
    if exit_code == 0 and ctx.is_main:
        save_checkpoint(final_path, payload(at_segment_end=True))
        _write_metrics(out_dir / f"segment-{segment}.metrics.jsonl", metrics)
        plot_loss_curves(metrics, out_dir / f"segment-{segment}.loss.png")
        work_path.unlink(missing_ok=True)
        result.checkpoint = final_path
        log.info("segment %d done: epochs %d..%d, %d steps → %s", segment, start_epoch + 1, stop_epoch,
                 pos.step, final_path)
    ctx.barrier()
    return result


@torch.no_grad()
def validate(forward, model, transform, val_paths, val_filter, spec, recon_idx, groups, section, seed,
             ctx: DistributedContext, amp: bool, held_out=(None, [])) -> tuple[float | None, dict[str, float]]:
    """Validation loss (and per group) with the FIXED per-star mask, summed over every rank's
    share of the validation shards; ``(None, {})`` without validation data."""
    if not val_paths:
        return None, {}
    model.eval()
    names = list(groups)
    sums = np.zeros(2 + 2 * len(names))
    mine = [p for i, p in enumerate(val_paths) if i % ctx.world_size == ctx.rank]
    if mine:
        stream = ShardStream(mine, transform, chunk_rows=section["chunk_rows"], buffer_rows=section["chunk_rows"],
                             batch_size=section["batch_size"], seed=seed, shuffle=False, row_filter=val_filter,
                             prefetch_batches=6 if section["num_workers"] > 0 else 0, row_join=held_out[0],
                             join_columns=held_out[1])
        for batch in stream:
            batch = batch.to(ctx.device)
            hidden = fixed_validation_mask(spec, batch.source_id, seed, ctx.device)
            with autocast_context(ctx.device, amp):
                # the plain module: no DDP gradient sync needed, and ranks may have unequal batches
                recon, _ = model(batch.x, hidden)
            args = (recon.float(), batch.x[:, recon_idx], batch.err[:, recon_idx], hidden[:, recon_idx],
                    section["loss"])
            total, weight = reconstruction_sums(*args, min_error=section["min_error"])
            per = per_group_sums(*args, groups, min_error=section["min_error"])
            sums += np.array([total.item(), weight.item()]
                             + [v.item() for n in names for v in per[n]])
    sums = ctx.all_reduce_sum(sums.tolist()).numpy()
    model.train()
    if sums[1] <= 0:
        return None, {}
    per_group = {n: float(sums[2 + 2 * i] / sums[3 + 2 * i]) for i, n in enumerate(names) if sums[3 + 2 * i] > 0}
    if section["loss_balance"] == "groups":  # the same definition as the training objective
        return float(np.mean(list(per_group.values()))), per_group
    return float(sums[0] / sums[1]), per_group


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
