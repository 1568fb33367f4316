"""The tree yardstick: its number of trees is chosen on the validation split it is given."""

import numpy as np
import pytest

from msa.evaluation.baselines import BaselineError, GradientBoostingBaseline


def data(n, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4)).astype(np.float32)
    y = np.column_stack([3 * x[:, 0] - 2 * x[:, 1] + rng.normal(0, 0.1, n)])
    return x, 5000 + 100 * y


def test_the_tree_count_is_chosen_on_the_validation_split():
    x, y = data(800, 0)
    xv, yv = data(300, 1)
    xt, yt = data(300, 2)
    same = GradientBoostingBaseline(["teff"], max_iter=100).fit(x, y, xv, yv)
    # validation stars whose labels do not depend on the inputs: every tree past the first is worse
    flat = GradientBoostingBaseline(["teff"], max_iter=100).fit(x, y, xv, np.full_like(yv, y.mean()))
    assert same.models[0].n_iter_ == flat.models[0].n_iter_ == 100  # no internal early stop
    assert same.n_trees[0] > 50 and flat.n_trees == [1]
    pred_same, pred_flat = same.predict(xt), flat.predict(xt)
    assert np.sqrt(np.mean((pred_same - yt) ** 2)) < 0.2 * np.std(yt)
    # one tree of learning rate 0.1 moves the mean prediction only a tenth of the way
    assert np.std(pred_flat) < 0.15 * np.std(yt)
    np.testing.assert_allclose(pred_flat[:, 0], list(flat.models[0].staged_predict(xt))[0])


def test_too_few_validation_labels_are_refused():
    x, y = data(100, 0)
    xv, yv = data(5, 1)
    yv[1:] = np.nan
    with pytest.raises(BaselineError, match="1 validation stars"):
        GradientBoostingBaseline(["teff"]).fit(x, y, xv, yv)
    with pytest.raises(BaselineError, match="fit"):
        GradientBoostingBaseline(["teff"]).predict(x)
