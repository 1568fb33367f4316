"""Calibration surveys (``calibrate.surveys``): label catalogues that only fit conformal offsets.

The label set's own catalogue is bright (APOGEE, GALAH); other surveys label the faint sky
(LAMOST to G ≈ 17.5, SEGUE, DESI's Milky Way Survey, H3). Each survey is a catalogue keyed by
``source_id`` with ``{label: {value, error}}`` columns, like ``labels``. Its stars are joined to
the store, every one of them a calibration star (no split: fine-tuning never reads them), at most
``calibrate.max_rows`` per survey (the smallest :func:`msa.data.labels.sample_hash`). A star that
the label set's own labels cover is left out (it belongs to its split), and a star in two surveys
counts once, for the first.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from msa.data.labels import LabelledStars, LabelSource, load_split_samples, sample_hash
from msa.data.source_ids import SOURCE_ID

log = logging.getLogger(__name__)

# every survey star is a calibration star: the split fractions that say so
EVERY_STAR_CALIBRATES = {"train": 0.0, "validation": 0.0, "calibration": 1.0, "test": 0.0}


@dataclass
class SurveyStars:
    """The calibration stars of the surveys, and per survey how many and the sample's hash limit."""

    stars: LabelledStars
    counts: dict
    hash_limits: dict


def survey_sources(surveys_cfg: Mapping, names: Sequence[str]) -> dict[str, LabelSource]:
    """A label source per survey that gives every label of ``names``; the others are skipped (logged):
    a group's offsets need every label of the set."""
    sources = {}
    for name, entry in (surveys_cfg or {}).items():
        missing = [n for n in names if n not in (entry.get("columns") or {})]
        if missing:
            log.warning("calibrate.surveys.%s has no column for label(s) %s: not used for this label set",
                        name, missing)
            continue
        cfg = {"catalogue": entry["catalogue"], "source_id_column": entry.get("source_id_column", SOURCE_ID),
               "columns": entry["columns"]}
        sources[name] = LabelSource(cfg, names)
    return sources


def load_survey_stars(shard_paths: Sequence[str | Path], transform, sources: Mapping[str, LabelSource],
                      labelled: LabelSource, seed: int, max_rows: int | None,
                      extra_columns: Sequence[str] = ()) -> SurveyStars | None:
    """The surveys' calibration stars in the shards (None when no survey gives any)."""
    extra = list(dict.fromkeys([*extra_columns, *labelled.store_columns]))
    parts, counts, limits = [], {}, {}
    taken = np.empty(0, dtype=np.int64)
    for name, source in sources.items():
        sample = load_split_samples(shard_paths, transform, source, EVERY_STAR_CALIBRATES, seed, ["calibration"],
                                    max_rows, extra)["calibration"]
        limits[name] = (float(sample_hash(sample.source_id, seed).max())
                        if max_rows is not None and len(sample) >= max_rows else 1.0)
        own, _ = labelled.lookup(sample.source_id, {c: sample.extra[c] for c in labelled.store_columns})
        keep = ~np.any(np.isfinite(own), axis=1) & ~np.isin(sample.source_id, taken)
        sample = sample.subset(keep)
        counts[name] = len(sample)
        log.info("calibration survey %s: %d stars in the store calibrate (%d left out: the label set's own "
                 "stars, or an earlier survey's)", name, len(sample), int((~keep).sum()))
        taken = np.concatenate([taken, sample.source_id])
        parts.append(sample)
    parts = [p for p in parts if len(p)]
    if not parts:
        return None
    stars = LabelledStars(*(np.concatenate([getattr(p, f) for p in parts])
                            for f in ("source_id", "x", "err", "y", "y_err")),
                          {c: np.concatenate([p.extra[c] for p in parts]) for c in extra})
    return SurveyStars(stars, counts, limits)
