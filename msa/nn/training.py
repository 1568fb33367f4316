"""Pieces every training loop shares: device, autocast, DDP context, optimiser, scheduler, guards.

The same loop runs on one CPU, one GPU or under ``torchrun``: :meth:`DistributedContext.from_env`
reads the ``torchrun`` environment (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``) and starts a process
group only when ``WORLD_SIZE > 1`` (gloo on CPU, nccl on CUDA).
"""

from __future__ import annotations

import contextlib
import logging
import argparse
import math
import os
import re
import signal
import threading
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the run stops at once."""


def select_device(local_rank: int = 0) -> torch.device:
    """``cuda:local_rank`` when a GPU is available, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


# --- the --device option of every command that runs a model -------------------------------------
DEVICE_CHOICE = re.compile(r"auto|cpu|cuda(:\d+)?|mps")
DEVICE_HELP = ("where the model runs: auto (a GPU if there is one, else the CPU; under torchrun "
               "the process's own GPU), cpu, cuda, cuda:N or mps")


def device_choice(text: str) -> str:
    """argparse type of --device: one of auto, cpu, cuda, cuda:N, mps."""
    if not DEVICE_CHOICE.fullmatch(text):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a device; use auto, cpu, cuda, cuda:N (N = GPU index) or mps")
    return text


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    """The one --device option: same choices and default on every command."""
    parser.add_argument("--device", default="auto", type=device_choice, help=DEVICE_HELP)


def resolve_device(choice: str = "auto", local_rank: int = 0) -> torch.device:
    """The torch device of a --device value (``auto``: :func:`select_device`)."""
    return select_device(local_rank) if choice == "auto" else torch.device(choice)


def autocast_context(device: torch.device, enabled: bool = True):
    """bf16 autocast on CUDA when enabled; a no-op context on the CPU."""
    if enabled and torch.device(device).type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@dataclass
class DistributedContext:
    """Where this process sits in a (possibly single-process) run."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    initialised: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_env(cls, device: str = "auto") -> "DistributedContext":
        """Read the torchrun environment; start the process group when ``WORLD_SIZE > 1``.
        `device` is a --device value: ``auto`` gives each process its local GPU."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
        device = resolve_device(device, local_rank)
        ctx = cls(rank, local_rank, world, device)
        if world > 1:
            if device.type == "cuda":
                torch.cuda.set_device(device)
            backend = "nccl" if device.type == "cuda" else "gloo"
            if not dist.is_initialized():
                dist.init_process_group(backend=backend, rank=rank, world_size=world)
                ctx.initialised = True
            log.info("rank %d/%d on %s (%s)", rank, world, device, backend)
        return ctx

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def _reduce(self, values, op) -> torch.Tensor:
        t = torch.as_tensor(values, dtype=torch.float64).clone()
        if self.distributed:
            # gloo reduces CPU tensors, nccl CUDA ones
            t = t.to(self.device)
            dist.all_reduce(t, op=op)
            t = t.cpu()
        return t

    def all_reduce_sum(self, values) -> torch.Tensor:
        """Sum of a number / list of numbers over ranks (float64 CPU tensor)."""
        return self._reduce(values, dist.ReduceOp.SUM)

    def all_reduce_mean(self, values) -> torch.Tensor:
        """Mean over ranks of a number / list of numbers (float64 CPU tensor)."""
        return self._reduce(values, dist.ReduceOp.SUM) / self.world_size

    def all_reduce_min(self, values) -> torch.Tensor:
        return self._reduce(values, dist.ReduceOp.MIN)

    def shutdown(self) -> None:
        if self.initialised and dist.is_initialized():
            dist.destroy_process_group()
            self.initialised = False


def parameter_groups(module: nn.Module, weight_decay: float, lr: float | None = None) -> list[dict]:
    """Two AdamW groups: weight decay on Linear weight matrices only; none on biases, norm
    weights and embeddings (decaying those shrinks scales and frequencies, not complexity)."""
    decay, no_decay = [], []
    decayed = {id(m.weight) for m in module.modules() if isinstance(m, nn.Linear)}
    for p in module.parameters():
        if not p.requires_grad:
            continue
        (decay if id(p) in decayed else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if lr is not None:
        for g in groups:
            g["lr"] = lr
    return [g for g in groups if g["params"]]


def make_optimizer(module_or_groups, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW over :func:`parameter_groups` of a module, or over ready-made parameter groups."""
    groups = (parameter_groups(module_or_groups, weight_decay) if isinstance(module_or_groups, nn.Module)
              else list(module_or_groups))
    return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)


def make_scheduler(optimizer: torch.optim.Optimizer, restart_epochs: int, restart_mult: int = 1,
                   min_lr: float = 0.0) -> torch.optim.lr_scheduler.CosineAnnealingWarmRestarts:
    """Cosine annealing with warm restarts every ``restart_epochs`` (× ``restart_mult``) epochs.
    Step it once per batch with the fractional epoch: ``scheduler.step(epoch + i / n_batches)``."""
    return torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(
        optimizer, T_0=restart_epochs, T_mult=restart_mult, eta_min=min_lr)


def check_finite(loss: torch.Tensor | float, step: int) -> float:
    """The loss as a float; raise :class:`NonFiniteLossError` naming the step if NaN/inf."""
    value = float(loss.detach().float().item() if isinstance(loss, torch.Tensor) else loss)
    if not math.isfinite(value):
        raise NonFiniteLossError(
            f"loss is {value} at step {step}; stopping. Check the inputs (scaler, NaN errors), "
            "lower the learning rate or enable grad_clip")
    return value


class GracefulStop:
    """Context manager: SIGTERM (and SIGINT) set :attr:`requested` instead of killing the
    process, so the loop can write its in-progress checkpoint and exit non-zero."""

    EXIT_CODE = 143  # 128 + SIGTERM, what a scheduler expects from a terminated job

    def __init__(self, signals=(signal.SIGTERM, signal.SIGINT)):
        self.signals = signals
        self.requested = False
        self.received: int | None = None
        self._previous = {}

    def _handler(self, signum, frame) -> None:
        self.requested = True
        self.received = signum
        log.warning("received signal %d: checkpointing and stopping after this step", signum)

    def __enter__(self) -> "GracefulStop":
        if threading.current_thread() is threading.main_thread():
            for s in self.signals:
                self._previous[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for s, previous in self._previous.items():
            signal.signal(s, previous)
        self._previous.clear()
