"""Deterministic train / validation / calibration / test splits by a hash of ``source_id``.

A star's split is a pure function of its ``source_id`` and the seed: the same star lands in the
same split whatever file, shard or row order it comes from, and every ensemble member (which
differ only in their training seed) shares the same splits. The hash
(:func:`msa.data.star_hash.unit_hash`) is cut at the cumulative fractions of the ``splits`` config
section (train, validation, calibration, test).
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from msa.data.star_hash import unit_hash
from msa.errors import InputError

SPLIT_NAMES = ("train", "validation", "calibration", "test")


class SplitError(InputError, ValueError):
    """The ``splits`` config section is inconsistent."""


def split_fractions(splits_cfg: Mapping) -> dict[str, float]:
    """The four fractions from the ``splits`` section; they must sum to 1 (± 1e-6)."""
    fractions = {name: float(splits_cfg.get(name, 0.0)) for name in SPLIT_NAMES}
    total = sum(fractions.values())
    if abs(total - 1.0) > 1e-6:
        raise SplitError(
            f"splits: train + validation + calibration + test = {total:.6g}; they must sum to 1 "
            f"(got {fractions})"
        )
    return fractions


def assign_splits(source_id: np.ndarray, splits_cfg: Mapping, seed: int) -> np.ndarray:
    """Split name per star (array of str, one of ``SPLIT_NAMES``) for the given ``source_id``s."""
    fractions = split_fractions(splits_cfg)
    edges = np.cumsum([fractions[n] for n in SPLIT_NAMES])
    edges[-1] = 1.0 + 1e-12  # u < 1 always: the last split takes every remaining star
    code = np.searchsorted(edges, unit_hash(source_id, seed), side="right")
    return np.asarray(SPLIT_NAMES, dtype=object)[code].astype(str)


def split_seed(config: Mapping) -> int:
    """The seed of the split hash: ``splits.seed``, else the top-level seed. Never a member's
    seed, so every member and every stage sees the same split of every star."""
    seed = (config.get("splits") or {}).get("seed")
    return int(config["seed"] if seed is None else seed)


def split_mask(source_id: np.ndarray, splits_cfg: Mapping, seed: int, name: str) -> np.ndarray:
    """Boolean mask of the stars that fall in split ``name``."""
    if name not in SPLIT_NAMES:
        raise SplitError(f"unknown split {name!r}; use one of {list(SPLIT_NAMES)}")
    return assign_splits(source_id, splits_cfg, seed) == name
