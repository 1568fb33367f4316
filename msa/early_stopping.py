"""Early stopping's bookkeeping for fine-tuning: which weights a member keeps, and when it stops.

By default a member keeps the weights of the epoch with the lowest validation pinball, the mean
over its labels. Labels converge at different speeds, though: on the demo, Teff and log g are best
after ~15 epochs and then overfit, while [Fe/H] and [α/M] still improve at epoch 60
(``benchmarks/bench_accuracy.py``), so one stopping point costs one pair or the other. With
``finetune.stop_per_label`` every label keeps the weights of its own best epoch, and the member
stops once no label has improved for ``patience`` epochs. Labels whose best epoch is the same
share one copy of the weights: a member is then one to ``n_labels`` "parts", each predicting the
labels it was best for (:class:`msa.ensemble.Member`).

The state lives in the member's resumable ``state`` dict (``best_val``, ``best``, and with
``per_label`` also ``label_best_val`` and ``label_best_epoch``), so a run stopped by a signal
resumes with the same choices.
"""

from __future__ import annotations

import math

from torch import nn


def snapshot(model: nn.Module, head: nn.Module, epoch: int) -> dict:
    """CPU copies of the weights, so that later optimiser steps do not change them."""
    return {"model": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
            "head": {k: v.detach().cpu().clone() for k, v in head.state_dict().items()}, "epoch": int(epoch)}


def fresh_state(n_labels: int) -> dict:
    """The bookkeeping keys of a run that has not validated yet."""
    return {"best_val": math.inf, "bad_epochs": 0, "best": None,
            "label_best_val": [math.inf] * n_labels, "label_best_epoch": [None] * n_labels}


def keep_if_best(state: dict, val: dict, model: nn.Module, head: nn.Module, epoch: int, per_label: bool) -> bool:
    """Record this epoch's validation (``val["pinball"]`` and ``val["per_label"]``); keep a copy of
    the weights where it is a best (overall, or for some label with ``per_label``). True if kept."""
    if per_label:
        improved = [j for j, v in enumerate(val["per_label"]) if v is not None and v < state["label_best_val"][j]]
        for j in improved:
            state["label_best_val"][j] = float(val["per_label"][j])
            state["label_best_epoch"][j] = int(epoch)
        if improved:
            kept = state["best"] or {}
            kept[int(epoch)] = snapshot(model, head, epoch)
            in_use = set(state["label_best_epoch"])
            state["best"] = {e: w for e, w in kept.items() if e in in_use}
    else:
        improved = val["pinball"] < state["best_val"]
        if improved:
            state["best"] = snapshot(model, head, epoch)
    if val["pinball"] < state["best_val"]:
        state["best_val"] = float(val["pinball"])
    state["bad_epochs"] = 0 if improved else state["bad_epochs"] + 1
    return bool(improved)


def kept_parts(state: dict, n_labels: int, per_label: bool) -> list[tuple[list[int], dict]]:
    """The weights to write, as ``(label indices, snapshot)`` parts; the part that predicts label
    0 first (its encoder gives the member's latent). One part without ``per_label``."""
    if state["best"] is None:
        raise RuntimeError("no validated epoch: nothing to keep")
    if not per_label:
        return [(list(range(n_labels)), state["best"])]
    epochs = state["label_best_epoch"]
    fallback = next(e for e in epochs if e is not None)  # a label never validated: the first part's
    by_epoch: dict[int, list[int]] = {}
    for j, epoch in enumerate(epochs):
        by_epoch.setdefault(fallback if epoch is None else epoch, []).append(j)
    return [(labels, state["best"][epoch]) for epoch, labels in sorted(by_epoch.items(), key=lambda kv: kv[1][0])]
