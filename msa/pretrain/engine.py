"""The one-epoch engine of pretraining: masked-reconstruction steps over a batch stream, and the
validation loss with each star's fixed mask.

:func:`train_one_epoch` advances an :class:`EpochPosition` (step, batch within the epoch, running
sums), which is what an in-progress checkpoint stores, so that a run stopped by a signal resumes
after its last step. The masking and perturbation generator is reseeded from (seed, rank, step)
before every step: its draws depend on the step alone, on every rank and after a resume.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np
import torch

from msa.data.batches import Batch, ShardStream
from msa.nn.losses import per_group_sums, reconstruction_objective, reconstruction_sums
from msa.nn.masking import MaskSpec, draw_mask, fixed_validation_mask
from msa.nn.model import MaskedAutoencoder
from msa.nn.perturbation import perturb
from msa.nn.training import DistributedContext, GracefulStop, NonFiniteLossError, autocast_context
from msa.pretrain.label_targets import label_target_loss


def step_seed(seed: int, rank: int, step: int) -> int:
    """The masking generator's seed at a step: a function of (seed, rank, step) only."""
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


@dataclass
class EpochPosition:
    """Where training stands: global step, epoch, batches done in it and the epoch's running sums."""
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


@dataclass
class PretrainState:
    """What one optimisation step needs: the model (and its DDP/compiled ``forward``), the optimiser
    and schedule, the masking spec, the reconstructed columns and their groups, the perturbation."""
    model: MaskedAutoencoder
    forward: Callable
    optimizer: torch.optim.Optimizer
    scheduler: object
    spec: MaskSpec
    recon_idx: torch.Tensor
    groups: dict[str, list[int]]
    pert_cols: torch.Tensor
    section: dict
    seed: int
    ctx: DistributedContext
    generator: torch.Generator
    amp: bool
    label_weight: float = 0.0  # weight of the label-target term (pretrain.label_targets); 0 = none
    flux_target: Callable | None = None  # the sampled-flux term (pretrain.flux_target_weight); None = none

    def loss(self, batch: Batch) -> torch.Tensor:
        """The masked, error-weighted reconstruction loss of one batch (inputs perturbed, targets clean)."""
        s = self.section
        hidden = draw_mask(self.spec, len(batch), self.generator, self.ctx.device)
        x_in = perturb(batch.x, batch.err, self.pert_cols, s["pert_scale"], self.generator)
        with autocast_context(self.ctx.device, self.amp):
            recon, latent = self.forward(x_in, hidden)
        loss = reconstruction_objective(recon.float(), batch.x[:, self.recon_idx], batch.err[:, self.recon_idx],
                                        hidden[:, self.recon_idx], s["loss"], self.groups, s["loss_balance"],
                                        s["min_error"])
        if s["latent_l1"]:
            loss = loss + s["latent_l1"] * latent.float().abs().mean()
        if self.flux_target is not None:
            loss = loss + self.flux_target(recon.float(), batch.x[:, self.recon_idx])
        if self.label_weight:
            predicted = self.model.label_head(latent)
            loss = loss + self.label_weight * label_target_loss(predicted, batch.extra["label_targets"])
        return loss


def optimisation_step(state: PretrainState, batch: Batch, pos: EpochPosition, n_batches: int) -> float:
    """One step on ``batch``: loss, backward, clipped gradients, optimiser and schedule; the loss."""
    state.generator.manual_seed(step_seed(state.seed, state.ctx.rank, pos.step))
    loss = state.loss(batch)
    state.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    # after DDP's all-reduce the gradient norm is the same on every rank, so all stop together
    grad_norm = torch.nn.utils.clip_grad_norm_(state.model.parameters(), state.section["grad_clip"] or float("inf"))
    value = float(loss.item())
    if not (np.isfinite(value) and torch.isfinite(grad_norm)):
        raise NonFiniteLossError(
            f"loss {value} (gradient norm {float(grad_norm)}) at step {pos.step} of epoch {pos.epoch + 1}; "
            "stopping. Check the inputs and scaler, lower pretrain.lr or set pretrain.grad_clip")
    state.optimizer.step()
    state.scheduler.step(pos.epoch + (pos.batch_in_epoch + 1) / n_batches)
    return value


def train_one_epoch(state: PretrainState, batches: Iterable[Batch], pos: EpochPosition, n_batches: int,
                    stop: GracefulStop, save_work: Callable[[], None], progress) -> bool:
    """Train on ``batches`` (the epoch from ``pos.batch_in_epoch`` on), advancing ``pos``; True if a
    signal stopped it (the state is then saved), False at the epoch's end."""
    ctx, every = state.ctx, state.section["checkpoint_every"]
    state.model.train()
    tick = time.perf_counter()
    for batch in batches:
        batch = batch.to(ctx.device)
        value = optimisation_step(state, batch, pos, n_batches)
        pos.step += 1
        pos.batch_in_epoch += 1
        pos.loss_sum += value
        pos.batches += 1
        pos.rows += len(batch)
        progress.update(len(batch))
        stop_now = stop.requested
        if ctx.distributed:
            stop_now = bool(ctx.all_reduce_sum(float(stop.requested)).item() > 0)
        if stop_now or (pos.step % every == 0 and pos.batch_in_epoch < n_batches):
            pos.train_wall += time.perf_counter() - tick
            tick = time.perf_counter()
            save_work()
            if stop_now:
                return True
    pos.train_wall += time.perf_counter() - tick
    return False


@torch.no_grad()
def validate(state: PretrainState, transform, val_paths, val_filter, held_out=(None, [])
             ) -> tuple[float | None, dict[str, float]]:
    """Validation loss (and per group) with the FIXED per-star mask, summed over every rank's
    share of the validation shards; ``(None, {})`` without validation data."""
    if not val_paths:
        return None, {}
    model, section, seed, ctx = state.model, state.section, state.seed, state.ctx
    model.eval()
    names = list(state.groups)
    sums = np.zeros(2 + 2 * len(names))
    mine = [p for i, p in enumerate(val_paths) if i % ctx.world_size == ctx.rank]
    if mine:
        stream = ShardStream(mine, transform, chunk_rows=section["chunk_rows"], buffer_rows=section["chunk_rows"],
                             batch_size=section["batch_size"], seed=seed, shuffle=False, row_filter=val_filter,
                             prefetch_batches=6 if section["num_workers"] > 0 else 0, row_join=held_out[0],
                             join_columns=held_out[1])
        for batch in stream:
            batch = batch.to(ctx.device)
            hidden = fixed_validation_mask(state.spec, batch.source_id, seed, ctx.device)
            with autocast_context(ctx.device, state.amp):
                # the plain module: no DDP gradient sync needed, and ranks may have unequal batches
                recon, _ = model(batch.x, hidden)
            args = (recon.float(), batch.x[:, state.recon_idx], batch.err[:, state.recon_idx],
                    hidden[:, state.recon_idx], section["loss"])
            total, weight = reconstruction_sums(*args, min_error=section["min_error"])
            per = per_group_sums(*args, state.groups, min_error=section["min_error"])
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
