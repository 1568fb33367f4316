"""The support flag (msa.calibration.support): a star inside the labelled cloud is supported, a far
one is not, a star without XP is compared in the no-XP view, the index is capped."""

import numpy as np
import pytest

from msa.calibration.support import (SupportError, SupportIndex, neighbour_distances, support_from_distances,
                                     support_index_path)


def clouds(n=400, dim=4, seed=0):
    """Two labelled clouds: the XP view's around 0, the no-XP view's around 10 (every axis)."""
    rng = np.random.default_rng(seed)
    return {"xp": rng.normal(size=(n, dim)).astype(np.float32),
            "no_xp": (10 + rng.normal(size=(n, dim))).astype(np.float32)}


def index(max_rows=1000, threshold=0.01):
    return SupportIndex.build(clouds(), k=10, max_rows=max_rows, low_threshold=threshold, member_sha256=["a", "b"],
                              seed=1)


def test_star_inside_the_labelled_cloud_is_supported_and_a_far_star_is_not():
    idx = index()
    stars = np.array([[0.1, -0.2, 0.0, 0.1], [8.0, 8.0, 8.0, 8.0]], dtype=np.float32)
    support = idx.support(stars, np.array([True, True]))
    assert support.dtype == np.float32
    assert support[0] > 0.5
    assert support[1] == 0.0
    np.testing.assert_array_equal(idx.low_support(support, np.array([True, True])), [False, True])


def test_low_support_takes_the_threshold_of_the_stars_view():
    idx = index(threshold={"xp": 0.5, "no_xp": 0.05})
    support = np.array([0.2, 0.2, 0.01, 0.01], dtype=np.float32)
    # 0.2 is low against the XP view's 0.5, not against the no-XP view's 0.05
    np.testing.assert_array_equal(idx.low_support(support, np.array([True, False, True, False])),
                                  [True, False, True, True])
    with pytest.raises(SupportError, match="no_xp"):
        index(threshold={"xp": 0.5})


def test_star_without_xp_is_compared_in_the_no_xp_view():
    idx = index()
    star = np.full((2, 4), 10.0, dtype=np.float32)  # the middle of the no-XP cloud, far from the XP one
    support = idx.support(star, np.array([False, True]))
    assert support[0] > 0.5  # without XP: against the no-XP stars, where it belongs
    assert support[1] == 0.0  # the same latent with XP: nothing like it among the XP stars


def test_index_is_capped_per_view():
    idx = index(max_rows=50)
    assert len(idx.latent["xp"]) == len(idx.latent["no_xp"]) == 50
    assert len(idx.reference["xp"]) == 50
    assert np.all(np.diff(idx.reference["xp"]) >= 0)  # sorted, for the percentile look-up


def test_neighbour_distances_are_scikit_learns_over_several_chunks():
    """The fused |b|² − 2ab search finds the same k nearest as an exact tree search, for queries
    spanning more than one chunk of QUERY_ROWS (an oracle that shares none of our arithmetic)."""
    from sklearn.neighbors import NearestNeighbors

    from msa.calibration.support import QUERY_ROWS

    rng = np.random.default_rng(3)
    reference = (5 + rng.normal(size=(700, 8))).astype(np.float32)  # far from 0: |a|² dwarfs the distances
    query = (5 + rng.normal(size=(QUERY_ROWS + 300, 8))).astype(np.float32)
    expected = NearestNeighbors(n_neighbors=6).fit(reference).kneighbors(query)[0].mean(axis=1)
    np.testing.assert_allclose(neighbour_distances(reference, query, 6), expected, rtol=1e-4)


def test_reference_is_leave_one_out():
    z = np.array([[0.0], [1.0], [3.0]], dtype=np.float32)
    # each point's nearest other point: 1, 1, 2 (never itself at 0)
    np.testing.assert_allclose(neighbour_distances(z, z, 1, leave_one_out=True), [1.0, 1.0, 2.0])


def test_support_is_the_fraction_of_reference_distances_at_least_the_stars():
    reference = np.array([1.0, 2.0, 3.0, 4.0])
    np.testing.assert_allclose(support_from_distances(reference, np.array([0.5, 2.0, 3.5, 9.0, np.nan])),
                               [1.0, 0.75, 0.25, 0.0, np.nan])


def test_non_finite_latent_gives_nan_support_and_no_flag():
    idx = index()
    support = idx.support(np.full((1, 4), np.nan, dtype=np.float32), np.array([True]))
    assert np.isnan(support[0]) and not idx.low_support(support, np.array([True]))[0]


def test_saved_index_reads_back_and_refuses_other_members(tmp_path):
    idx = index(threshold={"xp": 0.1, "no_xp": 0.01})
    path = support_index_path(tmp_path / "spectro.json")
    assert path.name == "spectro.support.npz"
    idx.save(path)
    back = SupportIndex.load(path, ["b", "a"])
    np.testing.assert_array_equal(back.latent["no_xp"], idx.latent["no_xp"])
    assert back.k == 10 and back.low_threshold == pytest.approx({"xp": 0.1, "no_xp": 0.01})
    with pytest.raises(SupportError, match="re-run `msa calibrate`"):
        SupportIndex.load(path, ["c"])
