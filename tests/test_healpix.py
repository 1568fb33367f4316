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


def test_pixel_centres_match_the_former_hand_written_formulae():
    # (ra, dec) that msa computed by hand (Górski et al. 2005) before it used healpy, frozen for
    # levels 0–29: all pixels of levels 0–3, polar, face-corner and random pixels of the others
    ref = np.load(Path(__file__).parent / "data" / "healpix_centres_before_healpy.npz")
    for level in np.unique(ref["level"]):
        rows = ref["level"] == level
        ra, dec = pixel_centres(ref["pixel"][rows], int(level))
        np.testing.assert_allclose(((ra - ref["ra"][rows] + 180) % 360) - 180, 0, atol=1e-12)
        # within 0.1° of a pole the former arccos(z) lost digits (by 1e-7° at level 29)
        polar = np.abs(ref["dec"][rows]) > 89.9
        np.testing.assert_allclose(dec[~polar], ref["dec"][rows][~polar], rtol=0, atol=1e-12)
        # there: the pixels touching the south pole (each of faces 8–11 starts with one) sit on the
        # ring z = −1 + 1/(3 nside²), i.e. exactly 2·arcsin(1 / (√6 nside)) from the pole
        nside = 2.0**level
        corners = ref["pixel"][rows][polar] % nside**2 == 0
        assert polar.sum() == 4 * (level >= 9) and corners.all()
        np.testing.assert_allclose(dec[polar] + 90, np.degrees(2 * np.arcsin(1 / (np.sqrt(6) * nside))),
                                   rtol=0, atol=1e-12)
    assert ref["pixel"][ref["level"] == 29].max() > 12 * 4**28  # the deepest level is in the file
    with pytest.raises(ValueError, match="outside"):
        pixel_centres([12], 0)
