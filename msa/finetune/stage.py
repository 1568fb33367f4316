"""Fine-tuning one ensemble member on one label set: ``msa finetune``.

In: the pretrained masked autoencoder, the shard store, the pipeline's feature scaler (never
refitted) and a label catalogue. Out (in ``--out-dir``): ``model.pt`` (the member checkpoint, format
below), ``metrics.jsonl`` (one line per epoch) and ``loss.png``; the in-progress state lives in
``out-dir/work/state.pt`` and a rerun resumes from it (after a kill, SIGTERM, or a job that
stopped after ``finetune.epochs_per_job`` epochs) when it was made with the same config sections
and the same inputs (sha256 of the pretrained model, the scaler and the label catalogue; the shard
list with sizes and times), else starts afresh and logs why. A resume is exact: the batches of an
epoch are a pure function of (member seed, epoch, rank), so a resumed epoch skips the batches
already done.

The training objective per batch (all labels standard-scaled with train-split statistics):

* pinball loss at 0.16 / 0.5 / 0.84 of a :class:`~msa.nn.model.QuantileHead` on the encoder latent,
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
  the photometric one, in label space: ``½[((μ − ϖ)/s)² / V + ln V]`` with
  ``V = (σ_Gaia² + σ_phot² + σ_floor²) / s²``, ``σ_phot = parallax_sigma_scale · (q84 − q16) / 2``
  (all in mas; ``s`` the label's train-split scale), so the term has the pinball loss's scale (the
  ``ln V`` term keeps the interval from inflating to shrink the χ² term);
* Gaussian perturbation of ``pert_features`` (groups or names) by their errors, one draw per
  entry, and, with ``pert_labels``, of the labels by theirs.

Data: the train split streams from the shard store through pretraining's bounded, prefetched
:class:`~msa.data.batches.ShardStream`, its labels joined by ``source_id`` per chunk
(:mod:`msa.finetune.data`); an epoch is the whole train split, or ``finetune.max_train_rows``
rows of it (each epoch a different part: the stream's shard order depends on the epoch), so a
billion-star label set trains in a bounded time. When the train split has at most
``finetune.cache_rows`` stars, the stream keeps its chunks in memory after the first epoch
(memory bounded by that setting; later epochs read no file). Validation uses a seeded sample of
at most ``finetune.max_validation_rows`` validation stars, held on the device. Under
``torchrun`` each rank streams its own shards, gradients are averaged, and only rank 0 writes.

Early stopping on the validation split's pinball loss (computed on the inference path, plus
``no_xp_weight`` × the same with XP hidden) with ``patience`` epochs; the best weights are kept.
Member ``k`` uses seed ``config.seed + k``; every member shares the splits (they hash
``source_id`` with the config seed).

Code: the model and every loss term in :mod:`msa.finetune.model`, the one-epoch engine in
:mod:`msa.finetune.engine`, the label join and validation sample in :mod:`msa.finetune.data`;
this module is the entry point (settings, resume, checkpoints, command line).

Member checkpoint (``kind: finetune``): ``model``, ``model_hparams``, ``head``, ``head_hparams``,
``labels``, ``label_centre``, ``label_scale`` (physical = scaled × scale + centre), ``layout``,
``scaler``, ``normalise_xp``, ``force_mask_indices``, ``parallax`` {``label_index``,
``feature_index``, ``masked_pass``}, ``member``, ``seed``, ``label_set``, ``config_hash``,
``config`` (the finetune section), ``metrics`` and ``epoch``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from msa.config import config_hash, load_config
from msa.data.batches import ChunkCache, ShardStream, assign_shards
from msa.data.features import FeatureTransform, xp_normalises
from msa.data.labels import LabelSource, label_set, load_split_samples
from msa.data.layout import Layout
from msa.data.scaling import Scaler
from msa.data.splits import split_seed
from msa.data.store import atomic_path
from msa.finetune.data import LabelJoin, TrainSplit, summarise_train_split, to_tensors
from msa.finetune.engine import train_one_epoch, validation_loss
from msa.finetune.model import FinetuneError, ParallaxSetup, build_objective, parallax_setup
from msa.finetune.schedule import apply_encoder_schedule
from msa.nn.checkpoint import (CheckpointError, file_sha256, load_checkpoint, restore_rng_state, rng_state,
                               set_aside_if_corrupt, save_checkpoint)
from msa.nn.training import (DistributedContext, GracefulStop, add_device_argument, autocast_context,
                             make_scheduler, select_device)
from msa.progress import progress

log = logging.getLogger(__name__)

WORK_STATE = "work/state.pt"
EXIT_MORE_EPOCHS = 75  # EX_TEMPFAIL: the job stopped after epochs_per_job; rerun to continue
CONFIG_SECTIONS = ("seed", "features", "labels", "label_sets", "splits", "finetune", "model")
PREFETCH_BATCHES = 6
RANK_SEED_STRIDE = 7919  # rank r draws masks from seed + r·stride (rank 0: the member seed itself)


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


def batches_per_epoch(train_rows: int, cfg: dict, ctx: DistributedContext) -> int:
    """Optimiser steps per epoch: this rank's train rows (at most ``max_train_rows`` over all
    ranks) in batches, the same number on every rank."""
    cap = cfg["max_train_rows"]
    rows = train_rows if cap is None else min(train_rows, -(-int(cap) // ctx.world_size))
    local = -(-rows // cfg["batch_size"])
    return int(ctx.all_reduce_min(float(local)).item())


@dataclass
class MemberData:
    """The labelled stars of one member: the train split summarised for streaming (row counts per
    shard, label scaler), the validation split in memory, and how they are joined to the store."""
    layout: Layout
    scaler: Scaler
    transform: FeatureTransform
    names: list[str]
    plx: ParallaxSetup
    shards: list[Path]
    train_join: LabelJoin
    train: TrainSplit
    val_stars: object
    n_batches: int


def load_member_data(job: MemberRun, ctx: DistributedContext) -> MemberData:
    config, cfg = job.config, job.config["finetune"]
    layout = Layout.from_config(config["features"])
    scaler = Scaler.load(job.scaler_path)
    transform = FeatureTransform(layout, scaler, xp_normalises(config["features"]))
    names = label_set(config, job.label_set)
    plx = parallax_setup(cfg, names, layout)
    source = LabelSource(config["labels"], names)
    shards = sorted(Path(p) for p in job.shards)  # every rank must see the same order
    mle_zero_point = cfg["parallax_mle_zero_point"] and cfg["parallax_mle_weight"] > 0
    train_join = LabelJoin(source, config["splits"], split_seed(config), "train",
                           (plx.gaia_column, plx.gaia_error_column), mle_zero_point)
    train = summarise_train_split(shards, train_join, names, cfg["chunk_rows"],
                                  [n for n in cfg["log_labels"] if n in names])
    val_stars = load_split_samples(shards, transform, source, config["splits"], split_seed(config),
                                   ["validation"], cfg["max_validation_rows"], train_join.extra_columns)["validation"]
    if train.n_rows == 0 or len(val_stars) == 0:
        raise FinetuneError(f"{train.n_rows} training and {len(val_stars)} validation stars with labels {names}; "
                            "both must be non-empty (check splits fractions and the catalogue join)")
    my_shards = assign_shards(shards, ctx.rank, ctx.world_size)
    n_batches = batches_per_epoch(sum(train.rows_per_shard[p] for p in my_shards), cfg, ctx)
    return MemberData(layout, scaler, transform, names, plx, shards, train_join, train, val_stars, n_batches)


def input_hashes(job: MemberRun) -> dict[str, str]:
    """What a member is trained from besides the config: the pretrained model, the scaler and the
    label catalogue by content (sha256), the shard list by path, size and modification time (the
    shards are too large to read at every start). An in-progress state of other inputs is not resumed."""
    catalogue = job.config["labels"].get("catalogue")
    shards = [[str(Path(p).resolve()), Path(p).stat().st_size, Path(p).stat().st_mtime_ns]
              for p in sorted(Path(p) for p in job.shards)]
    return {"pretrained": file_sha256(job.pretrained) if job.pretrained is not None else "from scratch",
            "scaler": file_sha256(job.scaler_path),
            "label_catalogue": file_sha256(catalogue) if catalogue and Path(catalogue).is_file() else "none",
            "shards": hashlib.sha256(json.dumps(shards).encode()).hexdigest()[:16]}


def initial_state(work_path: Path, chash: str, model, head, optimizer, scheduler, generator, n_batches: int,
                  ctx: DistributedContext, inputs: dict[str, str] | None = None) -> dict:
    """A fresh run's state, or that of this member's in-progress checkpoint made with the same
    settings and, given ``inputs`` (:func:`input_hashes`), the same inputs."""
    state = {"epoch": 0, "batch": 0, "step": 0, "rows": 0, "metrics": [], "best_val": float("inf"),
             "bad_epochs": 0, "best": None, "sums": {}}
    set_aside_if_corrupt(work_path)  # a corrupt in-progress checkpoint must not block every retry
    saved = load_checkpoint(work_path) if work_path.exists() else None
    changed = sorted(k for k in inputs or {} if (saved.get("inputs") or {}).get(k) != inputs[k]) if saved else []
    if saved is not None and saved.get("config_hash") != chash:
        # a killed run with other settings: its state must not leak into this one
        log.warning("ignoring %s: it was made with other fine-tuning settings; this member starts afresh",
                    work_path)
    elif changed:
        # a killed run of another pretrained model, scaler, label catalogue or store: not this run's state
        log.warning("ignoring %s: it was made from other inputs (%s); this member starts afresh", work_path,
                    ", ".join(changed))
    elif saved is not None:
        state = _resume(work_path, model, head, optimizer, scheduler, generator, n_batches, ctx.world_size)
        log.info("resuming %s at epoch %d, batch %d (step %d)", work_path, state["epoch"], state["batch"],
                 state["step"])
    return state


def epoch_row(epoch: int, state: dict, val: dict, names, optimizer, ctx: DistributedContext, started: float,
              train_seconds: float) -> dict:
    """The epoch's line of ``metrics.jsonl``: train loss terms, validation pinball (overall, with
    and without XP, per label), learning rate, rows and time."""
    return {"epoch": epoch, "step": state["step"],
            **{f"train_{k}": s[0] / max(s[1], 1) for k, s in state["sums"].items()},
            "val_pinball": val["pinball"],
            **({"val_pinball_with_xp": val["pinball_with_xp"], "val_pinball_no_xp": val["pinball_no_xp"]}
               if "pinball_no_xp" in val else {}),
            **{f"val_pinball_{n}": v for n, v in zip(names, val["per_label"])},
            "lr_head": optimizer.param_groups[0]["lr"], "rows": state["rows"] * ctx.world_size,
            "train_seconds": train_seconds, "seconds": time.time() - started}


def keep_if_best(state: dict, val_pinball: float, model, head, epoch: int) -> bool:
    """Early stopping's bookkeeping: keep a CPU copy of the weights when validation improved."""
    improved = val_pinball < state["best_val"]
    if improved:
        state["best_val"] = val_pinball
        state["bad_epochs"] = 0
        state["best"] = {"model": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
                         "head": {k: v.detach().cpu().clone() for k, v in head.state_dict().items()},
                         "epoch": epoch}
    else:
        state["bad_epochs"] += 1
    return improved


def finetune_member(job: MemberRun, step_callback: Callable[[int], None] | None = None,
                    ctx: DistributedContext | None = None) -> int:
    """Train one member; returns 0 when ``model.pt`` is written, 143 after SIGTERM (state saved),
    :data:`EXIT_MORE_EPOCHS` when ``epochs_per_job`` epochs ran and more remain (state saved).

    ``step_callback(step)`` is called after every optimiser step (progress hooks, tests).
    """
    ctx = ctx or DistributedContext(device=job.device or select_device())
    config, cfg = job.config, job.config["finetune"]
    seed = int(config["seed"]) + int(job.member)
    device = ctx.device
    work_path = Path(job.out_dir) / WORK_STATE
    chash = config_hash(config, list(CONFIG_SECTIONS))
    data = load_member_data(job, ctx)
    train, n_batches = data.train, data.n_batches
    if ctx.is_main:
        log.info("label set %s %s: %d train stars (%d batches an epoch) / %d validation stars; member %d, seed %d, "
                 "device %s", job.label_set, data.names, train.n_rows, n_batches, len(data.val_stars), job.member,
                 seed, device)

    torch.manual_seed(seed)  # identical initial weights on every rank
    objective, mask_spec = build_objective(config, data.layout, data.names, data.plx, train.label_scaler,
                                           job.pretrained, data.scaler, job.scaler_path, device)
    model, head = objective.model, objective.head
    optimizer = torch.optim.AdamW(objective.parameter_groups())
    scheduler = make_scheduler(optimizer, restart_epochs=cfg["epochs"], min_lr=0.0)
    apply_encoder_schedule(optimizer, 0.0, cfg)  # the first step too (a resumed state brings its own rates)
    generator = torch.Generator(device=device)
    generator.manual_seed(seed + RANK_SEED_STRIDE * ctx.rank)
    val_t = to_tensors(data.val_stars, data.train_join, train.label_scaler, False, train.err_reference, device)
    data.val_stars = None  # only the tensors are kept
    row_join = data.train_join.scaled(train.label_scaler, train.err_reference, cfg["inverse_variance"])
    # a small train split stays in memory after its first epoch; a large one is read every epoch
    cache = ChunkCache(enabled=train.n_rows <= cfg["cache_rows"])
    inputs = input_hashes(job)  # after the loads above: a missing file is reported by the step that reads it
    state = initial_state(work_path, chash, model, head, optimizer, scheduler, generator, n_batches, ctx, inputs)

    def save_work() -> None:
        if ctx.is_main:
            save_checkpoint(work_path, {
                "kind": "finetune-work", "config_hash": chash, "inputs": inputs, "model": model.state_dict(),
                "head": head.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "generator": generator.get_state(), "rng": rng_state(), "n_batches_per_epoch": n_batches,
                "world_size": ctx.world_size, **state})

    amp = autocast_context(device, config["pretrain"]["amp"])
    epochs_this_job = 0
    with GracefulStop() as stop:
        while state["epoch"] < cfg["epochs"] and state["bad_epochs"] < cfg["patience"]:
            epoch = state["epoch"]
            if cfg["epochs_per_job"] and epochs_this_job >= cfg["epochs_per_job"]:
                save_work()
                log.info("stopped after %d epoch(s) (finetune.epochs_per_job); rerun to continue", epochs_this_job)
                return EXIT_MORE_EPOCHS
            stream = ShardStream(data.shards, data.transform, chunk_rows=cfg["chunk_rows"],
                                 buffer_rows=cfg["buffer_rows"], batch_size=cfg["batch_size"], seed=seed, epoch=epoch,
                                 rank=ctx.rank, world_size=ctx.world_size, prefetch_batches=PREFETCH_BATCHES,
                                 skip_batches=state["batch"], max_batches=n_batches, row_join=row_join,
                                 join_columns=data.train_join.columns, cache=cache)
            started = time.time()
            bar = progress(stream, total=n_batches, initial=state["batch"], unit="batch", leave=False,
                           desc=f"finetune {job.label_set}/{job.member} ep {epoch}", enabled=ctx.is_main)
            if train_one_epoch(objective, optimizer, scheduler, bar, epoch, n_batches, state, cfg, amp, generator,
                               ctx, stop, save_work, step_callback):
                log.warning("stopped by signal at epoch %d batch %d; state saved to %s", epoch, state["batch"],
                            work_path)
                return GracefulStop.EXIT_CODE
            train_seconds = time.time() - started
            val = validation_loss(objective, val_t, cfg["batch_size"] * 4, amp)
            row = epoch_row(epoch, state, val, data.names, optimizer, ctx, started, train_seconds)
            row["best"] = improved = keep_if_best(state, val["pinball"], model, head, epoch)
            state["metrics"].append(row)
            if ctx.is_main:
                log.info("epoch %d: train %.4f, val pinball %.4f%s, %.0f rows/s", epoch, row["train_total"],
                         val["pinball"], " (best)" if improved else "", row["rows"] / max(train_seconds, 1e-9))
            state.update(epoch=epoch + 1, batch=0, rows=0, sums={})
            epochs_this_job += 1
            save_work()
    if state["bad_epochs"] >= cfg["patience"] and ctx.is_main:
        log.info("early stop: no validation improvement for %d epochs", cfg["patience"])
    best = state["best"]
    model.load_state_dict(best["model"])
    head.load_state_dict(best["head"])
    if ctx.is_main:
        _write_outputs(job, model, head, data.names, train.label_scaler, data.layout, data.scaler, mask_spec,
                       data.plx, seed, chash, state["metrics"], best["epoch"])
        shutil.rmtree(Path(job.out_dir) / "work", ignore_errors=True)
    ctx.barrier()
    return 0


STATE_KEYS = ("epoch", "batch", "step", "rows", "metrics", "best_val", "bad_epochs", "best", "sums")


def _resume(path: Path, model, head, optimizer, scheduler, generator, n_batches: int, world_size: int) -> dict:
    ckpt = load_checkpoint(path)
    if ckpt["batch"] and (ckpt.get("n_batches_per_epoch"), ckpt.get("world_size")) != (n_batches, world_size):
        raise FinetuneError(f"{path} stopped mid-epoch with {ckpt.get('n_batches_per_epoch')} batches an epoch on "
                            f"{ckpt.get('world_size')} process(es); now {n_batches} on {world_size}: the store or "
                            "the number of processes changed under a running member; delete it to start afresh")
    model.load_state_dict(ckpt["model"])
    head.load_state_dict(ckpt["head"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    generator.set_state(ckpt["generator"])
    restore_rng_state(ckpt["rng"])
    return {k: ckpt[k] for k in STATE_KEYS}


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
    with atomic_path(out_dir / "metrics.jsonl") as tmp:
        tmp.write_text("".join(json.dumps(row) + "\n" for row in metrics))
    from msa.figures import plot_finetune_loss

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
    add_device_argument(parser)
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
                    None)
    ctx = DistributedContext.from_env(args.device)
    if not ctx.is_main:
        logging.getLogger().setLevel(logging.WARNING)
    try:
        return finetune_member(job, ctx=ctx)
    except CheckpointError as err:
        raise FinetuneError(str(err)) from err
    finally:
        ctx.shutdown()
