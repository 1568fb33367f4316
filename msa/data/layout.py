"""The feature layout: which model input column is what, found by name from the config.

A layout is the ordered list of model input features, each with its column group (``xp``,
``gaia_photometry``, ``survey_photometry``, ``astrometry``, ``context``) and the name of its
error feature (or ``None``: the feature has no error). Every stage builds its tensors in this
order; a checkpoint stores ``Layout.to_dict()`` and refuses to load against a different layout.

This module is a leaf: it imports nothing from the package.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from msa.errors import InputError

XP_GROUP = "xp"
XP_BANDS = ("bp", "rp")
GROUP_ORDER = ("xp", "gaia_photometry", "survey_photometry", "astrometry", "context")
PHOTOMETRY_GROUPS = ("gaia_photometry", "survey_photometry")


class LayoutError(InputError, ValueError):
    """The ``features`` section of a config (or a checkpoint's layout) is inconsistent."""


def xp_coefficient_names(band: str, n: int) -> list[str]:
    """``bp_1`` … ``bp_n``: store and feature names of one XP band's Hermite coefficients."""
    return [f"{band}_{i}" for i in range(1, n + 1)]


def xp_error_names(band: str, n: int) -> list[str]:
    """``bpe_1`` … ``bpe_n``: the matching coefficient-error names."""
    return [f"{band}e_{i}" for i in range(1, n + 1)]


@dataclass(frozen=True)
class Feature:
    name: str
    group: str
    error: str | None = None


@dataclass(frozen=True)
class Layout:
    """Ordered model inputs plus the columns that are always hidden and those reconstructed."""

    features: tuple[Feature, ...]
    force_mask: tuple[str, ...] = ()
    reconstruct_groups: tuple[str, ...] = field(default=GROUP_ORDER)
    # every other magnitude enters as a colour, m − m_ref (None: magnitudes as they are)
    colour_reference: str | None = None

    def __post_init__(self) -> None:
        names = [f.name for f in self.features]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise LayoutError(f"features: duplicate feature names {dup}; each column may appear once")
        for f in self.features:
            if f.error is not None and f.error == f.name:
                raise LayoutError(
                    f"features: the error column of {f.name!r} is {f.name!r} itself; "
                    "name the real error column or set it to null"
                )
            if f.error is not None and f.error in names:
                raise LayoutError(
                    f"features: {f.name!r} uses feature {f.error!r} as its error column; "
                    "an error column cannot also be a model input"
                )
        unknown = sorted(set(self.force_mask) - set(names))
        if unknown:
            raise LayoutError(f"features.force_mask: unknown feature(s) {unknown}; known: {names[:5]}…")
        if self.colour_reference is not None and self.colour_reference not in [
                f.name for f in self.features if f.group in PHOTOMETRY_GROUPS]:
            raise LayoutError(f"features.colours_relative_to: {self.colour_reference!r} is not a feature of "
                              f"{list(PHOTOMETRY_GROUPS)}; name one of the configured magnitudes or null")
        bad_groups = sorted(set(self.reconstruct_groups) - set(GROUP_ORDER))
        if bad_groups:
            raise LayoutError(f"features.reconstruct: unknown group(s) {bad_groups}; use {list(GROUP_ORDER)}")

    # --- construction -------------------------------------------------------------------------
    @classmethod
    def from_config(cls, features_cfg: dict) -> "Layout":
        """Build from the ``features`` section of the config (see config/README.md)."""
        feats: list[Feature] = []
        xp = features_cfg.get("xp") or {}
        for band in XP_BANDS:
            n = int(xp.get(band, 0))
            if n < 0 or n > 55:
                raise LayoutError(f"features.xp.{band}: {n} coefficients; Gaia DR3 has 0–55 per band")
            for name, err in zip(xp_coefficient_names(band, n), xp_error_names(band, n)):
                feats.append(Feature(name, XP_GROUP, err))
        for group in GROUP_ORDER[1:]:
            entries = features_cfg.get(group) or {}
            if not isinstance(entries, dict):
                raise LayoutError(
                    f"features.{group}: expected a mapping feature → error column (or null), "
                    f"got {type(entries).__name__}"
                )
            for name, err in entries.items():
                feats.append(Feature(str(name), group, None if err is None else str(err)))
        if not feats:
            raise LayoutError("features: no input features configured")
        recon = features_cfg.get("reconstruct", list(GROUP_ORDER))
        return cls(tuple(feats), tuple(features_cfg.get("force_mask") or ()), tuple(recon),
                   features_cfg.get("colours_relative_to"))

    def to_dict(self) -> dict:
        """Plain data (for checkpoints and JSON)."""
        return {
            "features": [[f.name, f.group, f.error] for f in self.features],
            "force_mask": list(self.force_mask),
            "reconstruct_groups": list(self.reconstruct_groups),
            "colour_reference": self.colour_reference,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Layout":
        return cls(
            tuple(Feature(n, g, e) for n, g, e in d["features"]),
            tuple(d["force_mask"]),
            tuple(d["reconstruct_groups"]),
            d.get("colour_reference"),
        )

    # --- queries ------------------------------------------------------------------------------
    @property
    def colour_indices(self) -> np.ndarray:
        """Positions of the magnitudes that enter as colours (every photometric feature but the
        reference); empty without a colour reference."""
        if self.colour_reference is None:
            return np.empty(0, dtype=np.int64)
        return np.array([i for i, f in enumerate(self.features)
                         if f.group in PHOTOMETRY_GROUPS and f.name != self.colour_reference], dtype=np.int64)

    @property
    def names(self) -> list[str]:
        return [f.name for f in self.features]

    @property
    def n_features(self) -> int:
        return len(self.features)

    def index(self, name: str) -> int:
        try:
            return self.names.index(name)
        except ValueError:
            raise LayoutError(f"feature {name!r} is not in the layout; known groups: {self.groups}") from None

    @property
    def groups(self) -> list[str]:
        return [g for g in GROUP_ORDER if any(f.group == g for f in self.features)]

    def group_indices(self, group: str) -> np.ndarray:
        """Positions of one group's features, in layout order (empty if the group is absent)."""
        return np.array([i for i, f in enumerate(self.features) if f.group == group], dtype=np.int64)

    @property
    def xp_indices(self) -> np.ndarray:
        return self.group_indices(XP_GROUP)

    @property
    def force_mask_indices(self) -> np.ndarray:
        return np.array([self.index(n) for n in self.force_mask], dtype=np.int64)

    @property
    def reconstruct_indices(self) -> np.ndarray:
        """Positions of the features the decoder reconstructs."""
        return np.array(
            [i for i, f in enumerate(self.features) if f.group in self.reconstruct_groups], dtype=np.int64
        )

    def reconstruct_groups_positions(self) -> dict[str, list[int]]:
        """Group name → positions within the decoder output (which covers ``reconstruct_indices``)."""
        groups: dict[str, list[int]] = {}
        for pos, idx in enumerate(self.reconstruct_indices):
            groups.setdefault(self.features[idx].group, []).append(pos)
        return groups

    def require_same(self, trained: "Layout", what: str) -> None:
        """Refuse to run ``what`` (e.g. "the members") on a config whose features (``self``) differ
        from the layout they were trained with."""
        difference = self.diff(trained)
        if difference:
            raise LayoutError(f"the config's features differ from the layout of {what}: {difference}. "
                              "Use the config they were trained with")

    def diff(self, other: "Layout") -> str:
        """Human-readable difference between two layouts ('' when equal)."""
        if self == other:
            return ""
        lines = []
        mine, theirs = self.names, other.names
        missing = [n for n in mine if n not in theirs]
        extra = [n for n in theirs if n not in mine]
        if missing:
            lines.append(f"features only in the first layout: {missing}")
        if extra:
            lines.append(f"features only in the second layout: {extra}")
        if not missing and not extra and mine != theirs:
            first = next(i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b)
            lines.append(f"same features in a different order (first difference at position {first}: "
                         f"{mine[first]!r} vs {theirs[first]!r})")
        for a in self.features:
            b = next((f for f in other.features if f.name == a.name), None)
            if b is not None and (a.group, a.error) != (b.group, b.error):
                lines.append(f"{a.name}: group/error {a.group}/{a.error} vs {b.group}/{b.error}")
        if self.force_mask != other.force_mask:
            lines.append(f"force_mask {list(self.force_mask)} vs {list(other.force_mask)}")
        if self.reconstruct_groups != other.reconstruct_groups:
            lines.append(f"reconstruct {list(self.reconstruct_groups)} vs {list(other.reconstruct_groups)}")
        if self.colour_reference != other.colour_reference:
            lines.append(f"colours relative to {self.colour_reference} vs {other.colour_reference}")
        return "; ".join(lines)
