"""One robust feature scaler (median / IQR), stored as plain JSON and used by every stage.

Values are centred and scaled as ``(x − centre) / scale``; errors are divided by the same scale
so that an error stays an error on the scaled value. NaN (missing) stays NaN.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from msa.data.layout import Layout
from msa.errors import InputError


class ScalerError(InputError, ValueError):
    """The scaler file does not match the layout, or is malformed."""


@dataclass(frozen=True)
class Scaler:
    names: tuple[str, ...]
    centre: np.ndarray  # float32, per feature
    scale: np.ndarray  # float32, per feature, > 0

    @classmethod
    def from_stats(cls, names, centre, scale) -> "Scaler":
        scale = np.asarray(scale, dtype=np.float64)
        # a constant or all-missing feature gets scale 1, as scikit-learn's RobustScaler does
        scale = np.where(np.isfinite(scale) & (scale > 0), scale, 1.0)
        centre = np.nan_to_num(np.asarray(centre, dtype=np.float64), nan=0.0)
        return cls(tuple(names), centre.astype(np.float32), scale.astype(np.float32))

    def to_dict(self) -> dict:
        return {n: {"centre": float(c), "scale": float(s)} for n, c, s in zip(self.names, self.centre, self.scale)}

    @classmethod
    def from_dict(cls, d: dict) -> "Scaler":
        try:
            names = list(d)
            return cls.from_stats(names, [d[n]["centre"] for n in names], [d[n]["scale"] for n in names])
        except (KeyError, TypeError) as err:
            raise ScalerError(f"scaler: every entry needs 'centre' and 'scale' ({err})") from err

    def save(self, path: str | Path, meta: dict | None = None) -> None:
        from msa.data.store import atomic_path  # local: store is a sibling leaf

        payload = {"columns": self.to_dict(), "meta": meta or {}}
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(payload, indent=1))

    @classmethod
    def load(cls, path: str | Path) -> "Scaler":
        try:
            payload = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ScalerError(f"cannot read scaler {path}: {err}") from err
        return cls.from_dict(payload["columns"])

    def check_layout(self, layout: Layout, source: str = "scaler") -> None:
        if list(self.names) != layout.names:
            missing = [n for n in layout.names if n not in self.names]
            extra = [n for n in self.names if n not in layout.names]
            if not missing and not extra:
                i = next(i for i, (a, b) in enumerate(zip(self.names, layout.names)) if a != b)
                raise ScalerError(f"{source} has the layout's features in another order (position {i}: "
                                  f"{self.names[i]!r} vs {layout.names[i]!r}); refit it with `msa fit-scaler` "
                                  "on the current config")
            raise ScalerError(
                f"{source} does not match the feature layout (missing {missing[:5]}, extra {extra[:5]}); "
                "refit it with `msa fit-scaler` on the current config"
            )

    def transform(self, values: np.ndarray, errors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return (values - self.centre) / self.scale, errors / self.scale

    def inverse_values(self, scaled: np.ndarray, columns: np.ndarray) -> np.ndarray:
        """Scaled values of the layout positions ``columns`` back to derived units (float64):
        the exact inverse of :meth:`transform` on those columns."""
        return np.asarray(scaled, dtype=np.float64) * self.scale[columns] + self.centre[columns]

    def inverse_errors(self, scaled_errors: np.ndarray, columns: np.ndarray) -> np.ndarray:
        """Scaled errors (or spreads) of ``columns`` back to derived units (float64)."""
        return np.asarray(scaled_errors, dtype=np.float64) * self.scale[columns]
