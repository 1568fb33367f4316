"""HEALPix indices from Gaia source_ids and nested pixel centres, checked against real Gaia positions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from msa.data.healpix import n_pixels, pixel_centres, source_id_to_pixel

DEMO_SOURCE = Path(__file__).resolve().parents[1] / "resources" / "demo" / "GaiaSource_demo.csv.gz"


def angular_distance_deg(ra1, dec1, ra2, dec2):
    ra1, dec1, ra2, dec2 = map(np.radians, (ra1, dec1, ra2, dec2))
    c = np.sin(dec1) * np.sin(dec2) + np.cos(dec1) * np.cos(dec2) * np.cos(ra1 - ra2)
    return np.degrees(np.arccos(np.clip(c, -1, 1)))


def test_pixel_from_source_id_is_exact_above_2_53():
    ids = np.array([6917528997577384320, 2**53 + 1, 4295806720, 0], dtype=np.int64)
    for level in (0, 5, 12):
        expected = [int(s) // (2**35 * 4 ** (12 - level)) for s in ids.tolist()]
        assert source_id_to_pixel(ids, level).tolist() == expected
    assert source_id_to_pixel(ids, 12).dtype == np.int64
    # a parent pixel is its child's index // 4
    np.testing.assert_array_equal(source_id_to_pixel(ids, 4), source_id_to_pixel(ids, 5) // 4)
    with pytest.raises(TypeError, match="integer"):
        source_id_to_pixel(ids.astype(np.float64), 3)
    with pytest.raises(ValueError, match="level 13"):
        source_id_to_pixel(ids, 13)


def test_base_pixel_centres():
    ra, dec = pixel_centres(np.arange(12), 0)
    z = np.degrees(np.arcsin(2 / 3))
    np.testing.assert_allclose(dec, [z] * 4 + [0] * 4 + [-z] * 4, atol=1e-9)
    np.testing.assert_allclose(ra, [45, 135, 225, 315, 0, 90, 180, 270, 45, 135, 225, 315], atol=1e-9)


def test_all_pixel_centres_are_distinct_and_cover_the_sky_evenly():
    level = 3
    ra, dec = pixel_centres(np.arange(n_pixels(level)), level)
    assert len(set(zip(np.round(ra, 6), np.round(dec, 6)))) == n_pixels(level)
    # equal-area pixels: the centres' unit vectors average to ~0, and half lie in each hemisphere
    v = np.stack([np.cos(np.radians(dec)) * np.cos(np.radians(ra)),
                  np.cos(np.radians(dec)) * np.sin(np.radians(ra)), np.sin(np.radians(dec))])
    assert np.all(np.abs(v.mean(axis=1)) < 1e-9)
    assert np.sum(dec > 0) == np.sum(dec < 0)


def test_real_gaia_stars_lie_in_the_pixel_their_source_id_names():
    stars = pd.read_csv(DEMO_SOURCE, usecols=["source_id", "ra", "dec"])
    sid = stars["source_id"].to_numpy(np.int64)
    level = 12
    ra, dec = pixel_centres(source_id_to_pixel(sid, level), level)
    pixel_size = np.degrees(np.sqrt(4 * np.pi / n_pixels(level)))
    dist = angular_distance_deg(ra, dec, stars["ra"].to_numpy(), stars["dec"].to_numpy())
    # inside its pixel: never as far as a pixel's width, typically half of it (a neighbour's centre is ~1 away)
    assert np.all(dist < 1.1 * pixel_size), dist.max() / pixel_size
    assert np.median(dist) < 0.6 * pixel_size
    # the coarse level used by the catalogue: a star is much closer to its own pixel than to pixel + 1
    ra5, dec5 = pixel_centres(source_id_to_pixel(sid, 5), 5)
    assert np.all(angular_distance_deg(ra5, dec5, stars["ra"], stars["dec"])
                  < np.degrees(np.sqrt(4 * np.pi / n_pixels(5))))
