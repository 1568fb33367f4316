"""msa.early_stopping: one best epoch, or one per label, and when to stop."""

import torch
from torch import nn

from msa.early_stopping import fresh_state, keep_if_best, kept_parts


def run(curves, per_label, patience=3):
    """Feed per-label validation curves epoch by epoch; the weights are the epoch number."""
    model, head = nn.Linear(1, 1), nn.Linear(1, 1)
    state = fresh_state(len(curves[0]))
    stopped_at = None
    for epoch, values in enumerate(curves):
        with torch.no_grad():
            model.bias.fill_(epoch)
        keep_if_best(state, {"pinball": sum(v for v in values if v is not None) / len(values),
                             "per_label": values}, model, head, epoch, per_label)
        if state["bad_epochs"] >= patience:
            stopped_at = epoch
            break
    parts = kept_parts(state, len(curves[0]), per_label)
    return {tuple(labels): int(w["model"]["bias"].item()) for labels, w in parts}, stopped_at, state


# label 0 is best at epoch 1, label 1 keeps improving to epoch 4, label 2 is best at epoch 1 too
CURVES = [[0.5, 0.9, 0.6], [0.2, 0.8, 0.3], [0.4, 0.7, 0.5], [0.6, 0.6, 0.7], [0.7, 0.5, 0.8], [0.8, 0.55, 0.9]]


def test_one_best_epoch_by_the_mean():
    parts, _, _ = run(CURVES, per_label=False, patience=10)
    assert parts == {(0, 1, 2): 1}  # mean 0.433 at epoch 1 is the lowest


def test_each_label_keeps_its_own_epoch_and_labels_sharing_one_share_the_weights():
    parts, stopped_at, state = run(CURVES, per_label=True, patience=10)
    assert parts == {(0, 2): 1, (1,): 4}
    assert sorted(state["best"]) == [1, 4]  # copies no label uses any more were dropped


def test_per_label_patience_counts_epochs_where_no_label_improved():
    _, stopped_at, _ = run(CURVES + [[0.9, 0.6, 0.9]] * 3, per_label=True, patience=3)
    assert stopped_at == 7  # epoch 4 was the last improvement (label 1)
    _, stopped_at, _ = run(CURVES, per_label=False, patience=3)
    assert stopped_at == 4  # the mean was best at epoch 1


def test_a_label_without_validation_stars_goes_with_the_first_part():
    curves = [[0.5, None], [0.3, None], [0.4, None]]
    parts, _, _ = run(curves, per_label=True)
    assert parts == {(0, 1): 1}
