"""How fast fine-tuning may move the pretrained encoder: head-only epochs, a warm-up, layer-wise decay.

A random head on a pretrained encoder sends large, noisy gradients into it at the first steps,
and a full-rate encoder then forgets what pretraining put there (feature distortion, Kumar et al.
2022: linear probe first, then fine-tune). Three settings of ``finetune`` guard against it:

* ``head_only_epochs``: the first epochs train the head alone (the encoder's learning rate 0);
* ``encoder_warmup_epochs``: after them the encoder's rate rises linearly from 0 to its scheduled value;
* ``layer_lr_decay``: the encoder's rate falls by this factor per residual block away from the
  head (the embeddings lowest), so the general input layers move least.

The epoch scheduler (cosine) sets every group's rate from its base rate at each step; the
factor of :func:`encoder_lr_factor` is applied on top, to the groups tagged ``encoder``.
"""

from __future__ import annotations

from typing import Mapping

from torch import nn

from msa.nn.training import parameter_groups


def encoder_depth(name: str, n_blocks: int) -> int:
    """A parameter's distance from the head in residual blocks: 0 for the last encoder block (and
    the decoder and label head, which read the latent), ``n_blocks`` for the input embeddings."""
    if name.startswith(("embed.", "missing_embedding")):
        return n_blocks
    if name.startswith("encoder."):
        return n_blocks - 1 - int(name.split(".")[1])
    return 0


def encoder_parameter_groups(model: nn.Module, weight_decay: float, lr: float, layer_decay: float) -> list[dict]:
    """AdamW groups of the encoder (weight decay as :func:`~msa.nn.training.parameter_groups`),
    each tagged ``encoder``; with ``layer_decay`` < 1 one pair of groups per depth at
    ``lr × layer_decay ** depth``."""
    if layer_decay == 1.0:
        return [{**g, "encoder": True} for g in parameter_groups(model, weight_decay, lr=lr)]
    decayed = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    n_blocks = len(model.encoder)
    groups: dict[tuple[int, bool], list] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups.setdefault((encoder_depth(name, n_blocks), id(p) in decayed), []).append(p)
    return [{"params": params, "weight_decay": weight_decay if decay else 0.0, "lr": lr * layer_decay ** depth,
             "encoder": True} for (depth, decay), params in sorted(groups.items())]


def encoder_lr_factor(epoch: float, cfg: Mapping) -> float:
    """The factor on the encoder's scheduled rate at (fractional) ``epoch``."""
    head_only, warmup = int(cfg["head_only_epochs"]), float(cfg["encoder_warmup_epochs"])
    if epoch < head_only:
        return 0.0
    if warmup > 0 and epoch < head_only + warmup:
        return (epoch - head_only) / warmup
    return 1.0


def apply_encoder_schedule(optimizer, epoch: float, cfg: Mapping) -> None:
    """Scale the encoder groups' current rate (as the epoch scheduler just set it) by the factor."""
    factor = encoder_lr_factor(epoch, cfg)
    if factor == 1.0:
        return
    for group in optimizer.param_groups:
        if group.get("encoder"):
            group["lr"] *= factor
