"""The plain-MLP yardstick: learns, is chosen on validation only, drops hidden columns, is seeded;
its ensemble: one grid search, members of their own seeds, the mean of their predictions."""

import numpy as np
import pytest
import torch

from msa.evaluation.baseline_mlp import MLPBaselineError, PlainMLPBaseline, PlainMLPEnsemble

torch.set_num_threads(1)
GRID = {"width": [32], "dropout": [0.0], "weight_decay": [1e-4], "loss": ["mse", "l1"]}


def data(n, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 6)).astype(np.float32)
    y = np.column_stack([3 * x[:, 0] - 2 * x[:, 1], np.sin(2 * x[:, 2])]) + rng.normal(0, 0.05, (n, 2))
    x[rng.random((n, 6)) < 0.05] = np.nan  # missing inputs are filled and flagged
    y[rng.random(n) < 0.1, 1] = np.nan  # a missing label is ignored
    return x, y * [100.0, 1.0] + [5000.0, 0.0]  # physical units: the scaling is the model's job


def test_learns_much_better_than_the_mean_and_is_reproducible():
    x, y = data(1500, 0)
    xv, yv = data(300, 1)
    xt, yt = data(300, 2)
    fit = dict(x_train=x, y_train=y, x_val=xv, y_val=yv)
    mlp = PlainMLPBaseline(["a", "b"], seed=3, grid=GRID).fit(**fit)
    pred = mlp.predict(xt)
    for j in range(2):
        ok = np.isfinite(yt[:, j])
        rmse = np.sqrt(np.mean((pred[ok, j] - yt[ok, j]) ** 2))
        assert rmse < 0.35 * np.nanstd(yt[:, j])
    assert len(mlp.validation_scores) == 2 and mlp.chosen.loss in ("mse", "l1")
    np.testing.assert_array_equal(PlainMLPBaseline(["a", "b"], seed=3, grid=GRID).fit(**fit).predict(xt), pred)


def test_hidden_columns_are_not_inputs():
    x, y = data(600, 0)
    xv, yv = data(200, 1)
    mlp = PlainMLPBaseline(["a", "b"], seed=0, hidden_columns=[0, 1], grid=GRID).fit(x, y, xv, yv)
    shuffled = x.copy()
    shuffled[:, [0, 1]] = np.random.default_rng(5).normal(size=(len(x), 2))
    np.testing.assert_array_equal(mlp.predict(shuffled), mlp.predict(x))
    # without columns 0 and 1 the first label cannot be learned
    pred = mlp.predict(xv)
    assert np.sqrt(np.mean((pred[:, 0] - yv[:, 0]) ** 2)) > 0.8 * np.std(yv[:, 0])


def test_too_few_stars_and_predict_before_fit_are_refused():
    x, y = data(5, 0)
    with pytest.raises(MLPBaselineError, match="need at least"):
        PlainMLPBaseline(["a", "b"]).fit(x, y, x, y)
    with pytest.raises(MLPBaselineError, match="fit"):
        PlainMLPBaseline(["a", "b"]).predict(x)


def test_fits_on_one_thread_and_gives_the_caller_its_threads_back(monkeypatch):
    seen = []
    train_one = PlainMLPBaseline._train_one
    monkeypatch.setattr(PlainMLPBaseline, "_train_one",
                        lambda self, *a: (seen.append(torch.get_num_threads()), train_one(self, *a))[1])
    x, y = data(300, 0)
    xv, yv = data(100, 1)
    torch.set_num_threads(2)
    try:
        PlainMLPBaseline(["a", "b"], seed=0, grid=GRID).fit(x, y, xv, yv)
        assert seen == [1, 1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)


def test_ensemble_has_n_seeded_members_sharing_the_first_ones_grid_choice():
    x, y = data(600, 0)
    xv, yv = data(200, 1)
    xt, _ = data(100, 2)
    ens = PlainMLPEnsemble(["a", "b"], n_members=3, seed=7, grid=GRID).fit(x, y, xv, yv)
    assert [m.seed for m in ens.members] == [7, 8, 9]
    # the grid is searched once; the other members train only at its choice
    assert [len(m.validation_scores) for m in ens.members] == [2, 1, 1]
    assert all(m.chosen == ens.chosen for m in ens.members)
    each = ens.predict_members(xt)
    assert each.shape == (3, 100, 2)
    assert not np.allclose(each[0], each[1])  # other seeds, other networks
    np.testing.assert_allclose(ens.predict(xt), each.mean(axis=0))
    # the first member is the single network of the same seed and grid
    np.testing.assert_array_equal(each[0], PlainMLPBaseline(["a", "b"], seed=7, grid=GRID).fit(x, y, xv, yv)
                                  .predict(xt))
    with pytest.raises(MLPBaselineError, match="n_members"):
        PlainMLPEnsemble(["a", "b"], n_members=0)
