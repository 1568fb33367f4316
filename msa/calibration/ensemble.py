"""Ensemble inference: K fine-tuned members → one set of ordered quantiles per star and label.

``Ensemble.load(paths)`` reads the member checkpoints written by ``msa finetune`` (format in
``msa/finetune/stage.py`` / the project notes), refuses members that disagree on the feature layout,
scaler, labels or XP normalisation, and rebuilds each member's encoder and quantile head.

``Ensemble.predict(x_scaled)`` takes scaled model inputs (float32 ``(N, F)``, NaN = missing, as
produced by ``ensemble.transform``) and returns ``(N, L, 3)`` quantiles (q16, q50, q84) in the
labels' physical units: the percentiles of the equal-weight mixture of the members' predictive
distributions (:func:`combine_members`). Each member hides its forced-mask features (plus any ``extra_hidden``
columns); a member with a parallax masked pass takes its parallax quantiles from a second pass
with the parallax feature hidden, so Gaia parallax is never both input and answer.
Inference runs under ``torch.inference_mode`` with bf16 autocast on CUDA.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from scipy.special import ndtr, ndtri

from msa.calibration.groups import group_levels
from msa.data.features import FeatureTransform
from msa.data.layout import PHOTOMETRY_GROUPS, Layout
from msa.data.scaling import Scaler
from msa.errors import InputError
from msa.nn.checkpoint import CheckpointError, file_sha256, load_checkpoint
from msa.nn.losses import QUANTILES
from msa.nn.model import MaskedAutoencoder, QuantileHead

log = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 8192
_Z_UPPER = float(ndtri(QUANTILES[2]))  # q84 lies this many sigmas above the median
_SQRT_2PI = float(np.sqrt(2 * np.pi))


class EnsembleError(InputError, ValueError):
    """Member checkpoints are not fine-tuned members, or do not belong to one ensemble."""


def member_distribution(q: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The predictive distribution a member's quantiles ``(..., 3)`` describe: a two-piece normal.

    Returns ``(median, sigma_below, sigma_above)``: half of the mass lies below the median, spread
    as a normal of ``sigma_below`` (so that ``q16`` is its 16th percentile), half above with
    ``sigma_above``. Asymmetric intervals stay asymmetric; zero widths are floored at a tiny
    fraction of the value so the distribution stays continuous.
    """
    q = np.asarray(q, dtype=np.float64)
    median = q[..., 1]
    floor = 1e-9 * (np.abs(median) + 1.0)
    below = np.maximum((median - q[..., 0]) / _Z_UPPER, floor)
    above = np.maximum((q[..., 2] - median) / _Z_UPPER, floor)
    return median, below, above


def _mixture_cdf_pdf(t: np.ndarray, median: np.ndarray, below: np.ndarray, above: np.ndarray
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Mixture CDF and density at ``t`` ``(M,)`` of K equally weighted two-piece normals ``(K, M)``."""
    sigma = np.where(t >= median, above, below)
    z = (t - median) / sigma
    return ndtr(z).mean(axis=0), (np.exp(-0.5 * z * z) / (_SQRT_2PI * sigma)).mean(axis=0)


def mixture_quantiles(q: np.ndarray, levels=QUANTILES, rel_tol: float = 1e-4, max_iter: int = 60) -> np.ndarray:
    """Quantiles at ``levels`` of the equal-weight mixture of the members' distributions.

    ``q``: member quantiles ``(K, M, 3)`` float64; returns ``(M, len(levels))``. Each point solves
    ``mean_k F_k(t) = p`` by Newton steps safeguarded by bisection inside the bracket
    ``[min_k Q_k(p), max_k Q_k(p)]`` (the mixture's p-quantile always lies there), iterating only
    on the stars not yet converged: ``|step| <= rel_tol`` × the members' mean spread.
    """
    median, below, above = member_distribution(q)
    tol = rel_tol * np.mean(below + above, axis=0)
    out = np.empty((q.shape[1], len(levels)))
    for i, p in enumerate(levels):
        member_q = median + np.where(p >= 0.5, above, below) * ndtri(p)
        lo, hi = member_q.min(axis=0), member_q.max(axis=0)
        t = member_q.mean(axis=0)
        active = np.flatnonzero(hi - lo > tol)
        for _ in range(max_iter):
            if not len(active):
                break
            ta, loa, hia = t[active], lo[active], hi[active]
            cdf, pdf = _mixture_cdf_pdf(ta, median[:, active], below[:, active], above[:, active])
            excess = cdf - p
            loa = np.where(excess < 0, ta, loa)
            hia = np.where(excess > 0, ta, hia)
            with np.errstate(divide="ignore", invalid="ignore"):
                newton = ta - excess / pdf
            inside = (newton > loa) & (newton < hia)
            new = np.where(inside, newton, 0.5 * (loa + hia))
            t[active], lo[active], hi[active] = new, loa, hia
            done = (np.abs(new - ta) <= tol[active]) | (hia - loa <= tol[active]) | (excess == 0)
            active = active[~done]
        out[:, i] = t
    return out


def combine_members(q: np.ndarray) -> np.ndarray:
    """Combine member quantiles ``(K, N, L, 3)`` into ensemble quantiles ``(N, L, 3)``.

    The ensemble's predictive distribution is the equal-weight mixture of the members' own
    (:func:`member_distribution`), and its q16/q50/q84 are that mixture's 16th/50th/84th
    percentiles (:func:`mixture_quantiles`). Unlike moment matching (median of medians,
    ``sqrt(mean hw² + var q50)``), the interval holds 68 % of the mixture also when members
    disagree. With K = 1 the result equals the input; q16 ≤ q50 ≤ q84 always holds.
    """
    q = np.asarray(q)
    if q.ndim != 4 or q.shape[-1] != 3:
        raise ValueError(f"combine_members: expected (K, N, L, 3) quantiles, got shape {q.shape}")
    if q.shape[0] == 1:
        return q[0].astype(np.float32)
    k, n, n_labels, _ = q.shape
    flat = q.astype(np.float64).reshape(k, n * n_labels, 3)
    out = mixture_quantiles(flat)
    out = np.maximum.accumulate(out, axis=-1)  # ordered even where two points agree to the tolerance
    return out.reshape(n, n_labels, 3).astype(np.float32)


@dataclass
class Member:
    """One fine-tuned member, ready for inference."""

    path: Path
    sha256: str
    model: MaskedAutoencoder
    head: QuantileHead
    force_mask: torch.Tensor  # bool (F,): features always hidden at inference
    label_centre: torch.Tensor  # float32 (L,)
    label_scale: torch.Tensor  # float32 (L,), > 0
    parallax_label: int | None
    parallax_feature: int | None
    parallax_masked_pass: bool
    log_labels: torch.Tensor | None = None  # bool (L,): labels fitted as log10 (linear units out)

    def quantiles(self, x: torch.Tensor, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Physical quantiles ``(B, L, 3)`` float32 and the latent ``(B, D)`` for one batch."""
        hidden = hidden | self.force_mask
        latent = self.model.encode(x, hidden)
        q = self.head(latent, x, hidden).float()
        if self.parallax_masked_pass:
            # parallax from a second pass that cannot see the Gaia parallax it is scored against
            hidden_plx = hidden.clone()
            hidden_plx[:, self.parallax_feature] = True
            q_plx = self.head(self.model.encode(x, hidden_plx), x, hidden_plx).float()
            q[:, self.parallax_label] = q_plx[:, self.parallax_label]
        q = q * self.label_scale[:, None] + self.label_centre[:, None]
        if self.log_labels is not None:
            q[:, self.log_labels] = torch.pow(10.0, q[:, self.log_labels])
        return q, latent.float()


def _first_difference(name: str, values: list, paths: Sequence[Path]) -> None:
    """Raise if ``values`` (one per member) are not all equal to the first."""
    for value, path in zip(values[1:], paths[1:]):
        if value != values[0]:
            raise EnsembleError(
                f"ensemble members disagree on {name}: {paths[0]} and {path} differ. All members of "
                f"one ensemble must be fine-tuned from the same pretrained model, scaler and label set; "
                f"pass only the members of one `msa finetune` run"
            )


class Ensemble:
    """K fine-tuned members sharing one layout, scaler, label set and XP normalisation."""

    def __init__(self, members: list[Member], labels: list[str], layout: Layout, scaler: Scaler,
                 normalise_xp: bool, label_set: str | None, device: torch.device, amp: bool = True):
        self.members = members
        self.labels = labels
        self.layout = layout
        self.scaler = scaler
        self.normalise_xp = normalise_xp
        self.label_set = label_set
        self.device = device
        self.amp = amp
        self.transform = FeatureTransform(layout, scaler, normalise_xp)
        # features in every member's force mask: no member sees them, so they are not inputs
        self.hidden_from_every_member = np.logical_and.reduce([m.force_mask.cpu().numpy() for m in members])
        # photometry-only members (``finetune.photometry_only``: XP in their force mask) serve the
        # stars whose prediction has no XP; the others serve the stars with XP
        self.xp_index = torch.as_tensor(layout.xp_indices, dtype=torch.long, device=device)
        never_xp = [len(layout.xp_indices) > 0 and bool(m.force_mask[self.xp_index].all()) for m in members]
        self.photometry_members = [m for m, p in zip(members, never_xp) if p]
        self.spectrum_members = [m for m, p in zip(members, never_xp) if not p]
        if self.photometry_members and self.spectrum_members \
                and len(self.photometry_members) != len(self.spectrum_members):
            raise EnsembleError(f"{len(self.spectrum_members)} members with XP and {len(self.photometry_members)} "
                                "photometry-only members: an ensemble needs as many of each")

    def visible_inputs(self, x_scaled: np.ndarray) -> np.ndarray:
        """Bool ``(n, F)``: entries present (finite) and seen by at least one member."""
        return np.isfinite(x_scaled) & ~self.hidden_from_every_member

    def has_xp(self, x_scaled: np.ndarray, visible: np.ndarray | None = None) -> np.ndarray:
        """Bool ``(n,)``: the star's prediction used an XP spectrum (any XP coefficient visible).
        This is the group of a star for calibration and the ``has_xp`` column of the catalogue."""
        visible = self.visible_inputs(x_scaled) if visible is None else visible
        xp = self.layout.xp_indices
        return visible[:, xp].any(axis=1) if len(xp) else np.zeros(len(visible), dtype=bool)

    @property
    def log_labels(self) -> list[str]:
        """Labels the members fit as log10 (predicted in linear units, never below zero)."""
        mask = self.members[0].log_labels
        return [] if mask is None else [n for n, on in zip(self.labels, mask.tolist()) if on]

    @property
    def photometric_bands(self) -> list[str]:
        """Names of the photometric features (Gaia and survey magnitudes), in layout order."""
        return [self.layout.features[i].name for i in self._band_indices]

    @property
    def _band_indices(self) -> np.ndarray:
        return np.concatenate([self.layout.group_indices(g) for g in PHOTOMETRY_GROUPS]).astype(np.int64)

    def calibration_levels(self, x_scaled: np.ndarray, g_mag: np.ndarray, g_edges, xp_hidden: bool = False,
                           visible: np.ndarray | None = None) -> list[np.ndarray]:
        """Each star's calibration group at every level (:func:`msa.calibration.groups.group_levels`): XP used
        or not (``xp_hidden`` counts every star as predicted without XP), G bin, photometric bands seen."""
        visible = self.visible_inputs(x_scaled) if visible is None else visible
        has_xp = np.zeros(len(visible), dtype=bool) if xp_hidden else self.has_xp(x_scaled, visible)
        return group_levels(g_mag, has_xp, visible[:, self._band_indices], self.photometric_bands, g_edges)

    @classmethod
    def load(cls, member_paths: Sequence[str | Path], device: str | torch.device = "cpu",
             amp: bool = True) -> "Ensemble":
        """Load and cross-check member checkpoints (``kind: finetune``) onto ``device``."""
        paths = [Path(p) for p in member_paths]
        if not paths:
            raise EnsembleError("no ensemble members given; pass the member model.pt files")
        device = torch.device(device)
        ckpts = [load_checkpoint(p, map_location="cpu") for p in paths]
        for ckpt, path in zip(ckpts, paths):
            if ckpt.get("kind") != "finetune":
                raise EnsembleError(
                    f"{path} is a {ckpt.get('kind')!r} checkpoint, not a fine-tuned member; "
                    "pass results/finetune/<label_set>/member-<k>/model.pt files"
                )
            missing = [k for k in ("model", "model_hparams", "head", "head_hparams", "labels", "label_centre",
                                   "label_scale", "layout", "scaler", "normalise_xp") if k not in ckpt]
            if missing:
                raise EnsembleError(f"{path} lacks key(s) {missing}; re-run `msa finetune` for it")
        layouts = [Layout.from_dict(c["layout"]) for c in ckpts]
        for layout, path in zip(layouts[1:], paths[1:]):
            diff = layouts[0].diff(layout)
            if diff:
                raise EnsembleError(f"ensemble members {paths[0]} and {path} have different feature layouts: "
                                    f"{diff}. Pass only the members of one ensemble")
        _first_difference("the scaler", [c["scaler"] for c in ckpts], paths)
        _first_difference("the labels", [list(c["labels"]) for c in ckpts], paths)
        _first_difference("XP normalisation", [bool(c["normalise_xp"]) for c in ckpts], paths)
        _first_difference("the log-scaled labels", [list(c.get("log_labels") or []) for c in ckpts], paths)
        layout = layouts[0]
        members = [cls._build_member(c, p, layout, device) for c, p in zip(ckpts, paths)]
        log.info("loaded %d ensemble member(s) for labels %s on %s", len(members), list(ckpts[0]["labels"]), device)
        return cls(members, list(ckpts[0]["labels"]), layout, Scaler.from_dict(ckpts[0]["scaler"]),
                   bool(ckpts[0]["normalise_xp"]), ckpts[0].get("label_set"), device, amp)

    @staticmethod
    def _build_member(ckpt: dict, path: Path, layout: Layout, device: torch.device) -> Member:
        try:
            model = MaskedAutoencoder(**ckpt["model_hparams"])
            model.load_state_dict(ckpt["model"])
            head = QuantileHead(**ckpt["head_hparams"])
            head.load_state_dict(ckpt["head"])
        except (RuntimeError, TypeError) as err:
            raise CheckpointError(f"{path}: weights do not fit the stored hyper-parameters: {err}") from err
        if model.hparams["n_features"] != layout.n_features:
            raise EnsembleError(f"{path}: model has {model.hparams['n_features']} inputs, layout has "
                                f"{layout.n_features}")
        n_labels = len(ckpt["labels"])
        centre = torch.tensor(ckpt["label_centre"], dtype=torch.float32)
        scale = torch.tensor(ckpt["label_scale"], dtype=torch.float32)
        if centre.shape != (n_labels,) or scale.shape != (n_labels,) or head.n_labels != n_labels:
            raise EnsembleError(f"{path}: label_centre/label_scale/head size do not match {n_labels} labels")
        if not torch.all(scale > 0):
            # a negative scale would swap q16 and q84
            raise EnsembleError(f"{path}: label_scale must be positive, got {scale.tolist()}")
        log_mask = torch.tensor([n in (ckpt.get("log_labels") or []) for n in ckpt["labels"]], dtype=torch.bool)
        force = torch.zeros(layout.n_features, dtype=torch.bool)
        force[list(ckpt.get("force_mask_indices") or [])] = True
        plx = ckpt.get("parallax") or {}
        masked_pass = bool(plx.get("masked_pass")) and plx.get("label_index") is not None \
            and plx.get("feature_index") is not None
        return Member(
            path=path, sha256=file_sha256(path), model=model.to(device).eval(), head=head.to(device).eval(),
            force_mask=force.to(device), label_centre=centre.to(device), label_scale=scale.to(device),
            parallax_label=plx.get("label_index"), parallax_feature=plx.get("feature_index"),
            parallax_masked_pass=masked_pass,
            log_labels=log_mask.to(device) if log_mask.any() else None,
        )

    # --- inference ------------------------------------------------------------------------------
    @property
    def checksums(self) -> list[str]:
        """Short sha256 of every member file, in member order (model identity for metadata)."""
        return [m.sha256 for m in self.members]

    @property
    def latent_dim(self) -> int:
        return self.members[0].model.latent_dim

    def _hidden(self, extra_hidden, n: int) -> torch.Tensor:
        """Extra hidden mask as a bool tensor broadcastable to ``(n, F)``."""
        f = self.layout.n_features
        if extra_hidden is None:
            return torch.zeros((1, f), dtype=torch.bool, device=self.device)
        hidden = torch.as_tensor(np.asarray(extra_hidden, dtype=bool), device=self.device)
        if hidden.shape not in ((f,), (1, f), (n, f)):
            raise ValueError(f"extra_hidden: expected shape ({f},) or ({n}, {f}), got {tuple(hidden.shape)}")
        return hidden.reshape(-1, f)

    @property
    def n_members(self) -> int:
        """Members behind each star's prediction (each star is served by one kind of member)."""
        return max(len(self.spectrum_members), len(self.photometry_members))

    def forward_batch(self, x: torch.Tensor, hidden: torch.Tensor | None = None,
                      with_latent: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """All members on one batch already on the device: ``(K, B, L, 3)`` float32 physical quantiles
        and, if asked, the first member's latent ``(B, D)``. A star without a visible XP coefficient
        goes to the photometry-only members where there are any. Call inside :meth:`inference`."""
        if hidden is None:
            hidden = torch.zeros((1, x.shape[1]), dtype=torch.bool, device=x.device)
        hidden = hidden.expand(x.shape[0], -1)
        if not (self.photometry_members and self.spectrum_members):
            return self._run_members(self.spectrum_members or self.photometry_members, x, hidden, with_latent)
        seen_xp = ~(hidden[:, self.xp_index] | torch.isnan(x[:, self.xp_index]))
        rows_xp = seen_xp.any(dim=1)
        q = torch.empty((self.n_members, x.shape[0], len(self.labels), 3), dtype=torch.float32, device=x.device)
        latent = torch.empty((x.shape[0], self.latent_dim), dtype=torch.float32, device=x.device) \
            if with_latent else None
        for members, rows in ((self.spectrum_members, rows_xp), (self.photometry_members, ~rows_xp)):
            if bool(rows.any()):
                q_rows, z_rows = self._run_members(members, x[rows], hidden[rows], with_latent)
                q[:, rows] = q_rows
                if with_latent:
                    latent[rows] = z_rows
        return q, latent

    @staticmethod
    def _run_members(members: list[Member], x: torch.Tensor, hidden: torch.Tensor, with_latent: bool
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
        outs, latent = [], None
        for k, member in enumerate(members):
            q, z = member.quantiles(x, hidden)
            outs.append(q)
            if with_latent and k == 0:
                latent = z
        return torch.stack(outs), latent

    @contextmanager
    def inference(self) -> Iterator[None]:
        """Context for inference: no autograd, bf16 autocast on CUDA when ``amp``."""
        with torch.inference_mode(), torch.autocast(device_type=self.device.type, dtype=torch.bfloat16,
                                                    enabled=self.amp and self.device.type == "cuda"):
            yield

    def predict_members(self, x_scaled, extra_hidden=None, batch_size: int = DEFAULT_BATCH_SIZE,
                        return_latent: bool = False):
        """Per-member physical quantiles ``(K, N, L, 3)`` float32 for scaled inputs ``(N, F)``
        (a numpy array or a float32 CPU tensor).

        ``extra_hidden``: bool ``(F,)`` or ``(N, F)``, columns hidden in addition to each member's
        force mask (e.g. all XP for a photometry-only evaluation). With ``return_latent`` also the
        first member's latent ``(N, D)``.
        """
        # a tensor passes through untouched (keeps pinned memory for asynchronous copies to the GPU)
        x_all = x_scaled if isinstance(x_scaled, torch.Tensor) else \
            torch.from_numpy(np.ascontiguousarray(x_scaled, dtype=np.float32))
        n, f = x_all.shape if x_all.ndim == 2 else (None, None)
        if x_all.ndim != 2 or f != self.layout.n_features:
            raise ValueError(f"x_scaled: expected (N, {self.layout.n_features}) scaled inputs, got "
                             f"{tuple(x_all.shape)}; build them with ensemble.transform(raw)")
        hidden_all = self._hidden(extra_hidden, n)
        q_out = np.empty((self.n_members, n, len(self.labels), 3), dtype=np.float32)
        z_out = np.empty((n, self.latent_dim), dtype=np.float32) if return_latent else None
        with self.inference():
            for start in range(0, n, batch_size):
                stop = min(start + batch_size, n)
                x = x_all[start:stop].to(self.device, non_blocking=True)
                hidden = hidden_all if hidden_all.shape[0] == 1 else hidden_all[start:stop]
                q, z = self.forward_batch(x, hidden, with_latent=return_latent)
                q_out[:, start:stop] = q.cpu().numpy()
                if return_latent:
                    z_out[start:stop] = z.cpu().numpy()
        return (q_out, z_out) if return_latent else q_out

    def predict(self, x_scaled, extra_hidden=None, batch_size: int = DEFAULT_BATCH_SIZE) -> np.ndarray:
        """Ensemble quantiles ``(N, L, 3)`` (q16 ≤ q50 ≤ q84) in physical units; see :func:`combine_members`."""
        return combine_members(self.predict_members(x_scaled, extra_hidden, batch_size))
