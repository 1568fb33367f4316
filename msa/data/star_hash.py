"""The per-star hash: a deterministic number in [0, 1) from a Gaia ``source_id`` and a seed.

Every choice that must not depend on file, shard or row order (the train/validation/calibration/
test split, label and catalogue samples, the fixed validation masks of pretraining, random masks
per star) draws from here. The mixer is the SplitMix64 finaliser on uint64 with wrapping
arithmetic.

Two draws, kept distinct because published splits depend on their exact values:

* :func:`unit_hash` — one number per star and seed (the split hash);
* :func:`hash_uniform` — one number per star, seed and ``salt``: the star's key mixed once more
  with each salt, so that draws for different purposes (or mask columns) are independent.
"""

from __future__ import annotations

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def splitmix64(x: np.ndarray) -> np.ndarray:
    """The SplitMix64 finaliser on a uint64 array: a cheap, well-mixed integer hash."""
    with np.errstate(over="ignore"):
        z = x + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _MIX1
        z = (z ^ (z >> np.uint64(27))) * _MIX2
        return z ^ (z >> np.uint64(31))


def _star_keys(source_id: np.ndarray, seed: int) -> np.ndarray:
    """Each star's 64-bit key under ``seed`` (the id's bits, negative ids included)."""
    ids = np.asarray(source_id, dtype=np.int64).view(np.uint64)
    seed_key = splitmix64(np.array([seed], dtype=np.int64).view(np.uint64))[0]
    return splitmix64(ids ^ seed_key)


def _to_unit(h: np.ndarray) -> np.ndarray:
    # the top 53 bits make an exactly representable float64 in [0, 1)
    return (h >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def unit_hash(source_id: np.ndarray, seed: int) -> np.ndarray:
    """A uniform number in [0, 1) per ``source_id`` (float64), fixed by the id and ``seed``."""
    return _to_unit(_star_keys(source_id, seed))


def hash_uniform(source_id: np.ndarray, seed: int, salt: np.ndarray | int = 0) -> np.ndarray:
    """Uniform numbers in [0, 1) per (star, seed, salt); broadcasts ``salt``.

    ``source_id`` (int64, shape (n,)) with ``salt`` of shape (k,) gives shape (n, k).
    """
    keys = _star_keys(source_id, seed)
    salt = np.asarray(salt, dtype=np.int64).astype(np.uint64)
    with np.errstate(over="ignore"):
        if salt.ndim:
            return _to_unit(splitmix64(keys[:, None] + salt[None, :] * _GOLDEN))
        return _to_unit(splitmix64(keys + salt * _GOLDEN))
