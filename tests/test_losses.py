"""Losses: only hidden and present entries count; values match hand computations."""

import math

import pytest
import torch

from msa.nn.losses import per_group_loss, pinball_loss, reconstruction_loss, reconstruction_sums

torch.set_num_threads(1)
nan = float("nan")


def example():
    recon = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.5, -1.0]])
    target = torch.tensor([[0.0, 2.5, nan], [1.0, 0.0, 1.0]])
    err = torch.tensor([[0.5, nan, 1.0], [2.0, 1e-6, 1.0]])
    hidden = torch.tensor([[True, True, True], [False, True, True]])
    return recon, target, err, hidden


def test_hand_computation_all_kinds():
    recon, target, err, hidden = example()
    # counted: (0,0) d=1, (0,1) d=-0.5, (1,1) d=0.5, (1,2) d=-2 ; (0,2) missing, (1,0) not hidden
    assert reconstruction_loss(recon, target, err, hidden, "mae").item() == pytest.approx((1 + .5 + .5 + 2) / 4)
    assert reconstruction_loss(recon, target, err, hidden, "mse").item() == pytest.approx((1 + .25 + .25 + 4) / 4)
    # weights: 1/0.25=4, NaN→1, σ floored at 0.01 → 1e4, 1
    w = [4.0, 1.0, 1e4, 1.0]
    d2 = [1.0, 0.25, 0.25, 4.0]
    expected = sum(a * b for a, b in zip(w, d2)) / sum(w)
    got = reconstruction_loss(recon, target, err, hidden, "error_weighted")
    assert got.item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("kind", ["mae", "mse", "error_weighted"])
def test_unhidden_and_missing_entries_do_not_matter(kind):
    recon, target, err, hidden = example()
    base = reconstruction_loss(recon, target, err, hidden, kind)
    recon2, target2 = recon.clone(), target.clone()
    recon2[1, 0] = 100.0  # not hidden
    target2[1, 0] = -50.0
    recon2[0, 2] = 77.0  # target missing
    assert reconstruction_loss(recon2, target2, err, hidden, kind).item() == pytest.approx(base.item())


def test_gradient_is_finite_and_zero_off_the_counted_entries():
    recon, target, err, hidden = example()
    recon.requires_grad_(True)
    reconstruction_loss(recon, target, err, hidden, "error_weighted").backward()
    assert torch.isfinite(recon.grad).all()
    assert recon.grad[0, 2] == 0 and recon.grad[1, 0] == 0 and recon.grad[0, 0] != 0


def test_nothing_counted_gives_zero_with_gradient():
    recon = torch.ones(2, 3, requires_grad=True)
    loss = reconstruction_loss(recon, torch.zeros(2, 3), None, torch.zeros(2, 3, dtype=torch.bool), "mse")
    assert loss.item() == 0.0
    loss.backward()


def test_per_group_matches_total():
    recon, target, err, hidden = example()
    groups = {"a": [0], "b": [1, 2]}
    per = per_group_loss(recon, target, err, hidden, "mse", groups)
    assert per["a"].item() == pytest.approx(1.0)  # only (0,0) counts in column 0
    assert per["b"].item() == pytest.approx((0.25 + 0.25 + 4) / 3)
    total, weight = reconstruction_sums(recon, target, err, hidden, "mse")
    assert weight.item() == 4
    empty = per_group_loss(recon, target, err, torch.zeros_like(hidden), "mse", groups)
    assert math.isnan(empty["a"].item())


def test_error_weighted_needs_errors():
    recon, target, _, hidden = example()
    with pytest.raises(ValueError, match="target errors"):
        reconstruction_loss(recon, target, None, hidden, "error_weighted")


def test_pinball_hand_computation_nan_labels_and_weights():
    q = torch.tensor([[[0.0, 1.0, 2.0], [5.0, 5.0, 5.0]]])  # (B=1, L=2, 3)
    y = torch.tensor([[3.0, nan]])
    # label 0: residuals 3, 2, 1 → τ·r: .48, 1.0, .84 ; label 1 missing
    expected = (0.16 * 3 + 0.5 * 2 + 0.84 * 1) / 3
    assert pinball_loss(q, y).item() == pytest.approx(expected)
    assert pinball_loss(q, y, weights=torch.tensor([[2.0, 100.0]])).item() == pytest.approx(2 * expected)
    y_below = torch.tensor([[-1.0, nan]])  # residuals -1, -2, -3 → (τ-1)·r
    expected_below = (0.84 * 1 + 0.5 * 2 + 0.16 * 3) / 3
    assert pinball_loss(q, y_below).item() == pytest.approx(expected_below)
    qg = q.clone().requires_grad_(True)
    pinball_loss(qg, y).backward()
    assert torch.isfinite(qg.grad).all() and (qg.grad[0, 1] == 0).all()


def test_group_balance_is_the_mean_of_group_means():
    from msa.nn.losses import reconstruction_objective

    torch.manual_seed(0)
    recon, target = torch.randn(50, 5), torch.randn(50, 5)
    err = torch.full((50, 5), 0.5)
    err[:, 0] = 0.02  # one very precise column would dominate an entry-weighted mean
    hidden = torch.rand(50, 5) < 0.5
    groups = {"xp": [0, 1, 2], "phot": [3, 4]}
    per = per_group_loss(recon, target, err, hidden, "error_weighted", groups)
    balanced = reconstruction_objective(recon, target, err, hidden, "error_weighted", groups, "groups")
    assert torch.isclose(balanced, (per["xp"] + per["phot"]) / 2)
    entries = reconstruction_objective(recon, target, err, hidden, "error_weighted", groups, "entries")
    assert torch.isclose(entries, reconstruction_loss(recon, target, err, hidden, "error_weighted"))
    assert not torch.isclose(balanced, entries)
    with pytest.raises(ValueError, match="loss_balance"):
        reconstruction_objective(recon, target, err, hidden, "mse", groups, "columns")
