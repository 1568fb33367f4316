"""The one-epoch engine of fine-tuning: optimiser steps over a batch stream, and the validation loss.

:func:`train_one_epoch` takes the epoch's batches (a :class:`~msa.data.batches.ShardStream` whose row
join attached the labels) and the run's mutable ``state`` (``step``, ``batch`` within the epoch,
running loss ``sums``), so that a run stopped by a signal resumes after its last step. Under DDP
the gradients are averaged over the ranks before each step, and all ranks stop together.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.distributed as dist
from torch import nn

from msa.data.batches import Batch
from msa.finetune.data import Tensors
from msa.finetune.model import Objective
from msa.finetune.schedule import apply_encoder_schedule
from msa.nn.losses import pinball_loss
from msa.nn.training import DistributedContext, GracefulStop, check_finite


def average_gradients(parameters: list[torch.Tensor], ctx: DistributedContext) -> None:
    """Mean gradient over the ranks (what DistributedDataParallel would do), in place."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= ctx.world_size
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def train_one_epoch(objective: Objective, optimizer: torch.optim.Optimizer, scheduler, batches: Iterable[Batch],
                    epoch: int, n_batches: int, state: dict, cfg: dict, amp, generator: torch.Generator,
                    ctx: DistributedContext, stop: GracefulStop, save_work: Callable[[], None],
                    step_callback: Callable[[int], None] | None = None) -> bool:
    """Train on ``batches`` (the epoch from ``state["batch"]`` on); True if a signal stopped it
    (the state is then saved), False at the epoch's end. ``state["sums"]`` collects the mean of
    each loss term over the epoch."""
    objective.train()
    parameters = [p for g in optimizer.param_groups for p in g["params"]]
    for batch in batches:
        data = Tensors.from_batch(batch.to(objective.device))
        with amp:
            losses = objective.batch_losses(data.x, data.err, data.y, data.y_err, data.weights, data.plx_obs,
                                            data.plx_err, generator)
        loss_value = check_finite(losses["total"], state["step"])
        optimizer.zero_grad(set_to_none=True)
        losses["total"].backward()
        if ctx.distributed:
            average_gradients(parameters, ctx)
        if cfg["grad_clip"]:
            nn.utils.clip_grad_norm_(parameters, cfg["grad_clip"])
        optimizer.step()
        scheduler.step(epoch + (state["batch"] + 1) / n_batches)
        apply_encoder_schedule(optimizer, epoch + (state["batch"] + 1) / n_batches, cfg)
        state["step"] += 1
        state["batch"] += 1
        state["rows"] = state.get("rows", 0) + len(batch)
        for k, v in losses.items():
            s = state["sums"].setdefault(k, [0.0, 0])
            s[0] += loss_value if k == "total" else float(v.detach())
            s[1] += 1
        if step_callback is not None:
            step_callback(state["step"])
        stop_now = stop.requested
        if ctx.distributed:
            stop_now = bool(ctx.all_reduce_sum(float(stop.requested)).item() > 0)
        if stop_now:
            save_work()
            return True
        if state["step"] % cfg["checkpoint_every"] == 0:
            save_work()
    return False


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
