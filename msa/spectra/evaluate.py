"""``msa evaluate-reconstruction``: how well the model infers an XP spectrum from photometry alone.

Stars: the held-out stars of pretraining (``pretrain.validation_fraction`` by source_id hash, or
``pretrain.validation_shards``) that have an observed XP spectrum and a G magnitude. No model
saw their spectra: pretraining held them out, and the fine-tuned members (if given) start from
that encoder. (A label test split would not do: pretraining trains on every other star, XP and
all.) Their XP is hidden from the encoder and reconstructed (``msa.spectra.reconstruct``); the yardstick
is a kNN on the stars' colours (``msa.spectra.knn_baseline``; each magnitude minus G, never apparent G,
which says nothing about a G-normalised spectrum), with a cubic ridge on the same colours beside it
(``msa.spectra.polynomial_baseline``), both fitted on every other star with XP.

Per star, against the observed Archive coefficients:

* ``reduced_chi2``: mean over the coefficients of ((reconstructed − observed) / observed error)²;
* ``relative_flux_error``: ‖f_rec − f_obs‖ / ‖f_obs‖ on GaiaXPy's sampled grid (336–1020 nm, 2 nm;
  ``msa.data.xp_flux``), the flux-weighted relative error of the whole sampled spectrum.

``metrics.json`` gives their medians for the model, the kNN and the polynomial, the ratios model / kNN
and model / polynomial, the same in
G bins (``evaluate.g_mag_bins``), each model alone, the medians with XP seen (``xp_seen``: how well
the models reproduce an observed spectrum), and, with two or more models, how often the
observed coefficient lies within ±1 spread of the reconstruction. Figures: observed vs
reconstructed sampled spectra of a few held-out stars, reconstructed spectra of photometry-only
stars (stars without XP in the store; else held-out stars with XP hidden), and the median
relative flux error by G bin. Memory: every shard's inputs are read whole, a demo-sized check.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from msa.config import load_config
from msa.data.features import G_MAG
from msa.data.layout import Layout
from msa.data.store import SOURCE_ID, Shard, atomic_path
from msa.data.xp_flux import relative_flux_error, sample_flux
from msa.errors import InputError
from msa.nn.autoencoders import Autoencoders, held_out_definition
from msa.nn.training import add_device_argument, resolve_device
from msa.pretrain import held_out_of_pretraining
from msa.spectra.colours import colour_features
from msa.spectra.knn_baseline import fit_knn_spectra
from msa.spectra.plots import plot_error_by_g, plot_spectra
from msa.spectra.polynomial_baseline import DEGREE as POLYNOMIAL_DEGREE
from msa.spectra.polynomial_baseline import fit_polynomial_spectra
from msa.spectra.reconstruct import read_columns, reconstruct_xp, scaled_xp_to_archive

log = logging.getLogger(__name__)


def read_shards(shard_paths, columns, pretrain_section: dict, seed: int) -> tuple[dict, np.ndarray]:
    """Every star's ``columns`` (plus source_id) from all shards, and whether pretraining held it out."""
    parts, held = [], []
    for path in shard_paths:
        with Shard(path) as shard:
            raw = shard.read([SOURCE_ID, *columns])
        parts.append(raw)
        held.append(held_out_of_pretraining(raw[SOURCE_ID], path, pretrain_section, seed))
    raw = {c: np.concatenate([p[c] for p in parts]) for c in parts[0]}
    return raw, np.concatenate(held)


def subset(raw: dict, rows: np.ndarray) -> dict:
    return {c: v[rows] for c, v in raw.items()}


def band_sizes(names: list[str]) -> tuple[int, int]:
    return sum(n.startswith("bp_") for n in names), sum(n.startswith("rp_") for n in names)


def star_metrics(predicted: np.ndarray, observed: np.ndarray, observed_error: np.ndarray,
                 observed_flux: np.ndarray, n_bp: int, n_rp: int) -> dict[str, np.ndarray]:
    """Per-star reduced χ² and relative flux error of Archive-unit coefficients ``(n, n_xp)``."""
    with np.errstate(divide="ignore", invalid="ignore"):
        z2 = ((predicted - observed) / observed_error) ** 2
    _, flux = sample_flux(predicted, n_bp, n_rp)
    return {"reduced_chi2": np.nanmean(np.where(np.isfinite(z2), z2, np.nan), axis=1),
            "relative_flux_error": relative_flux_error(flux, observed_flux)}


def summarise(model: dict, knn: dict, polynomial: dict | None = None) -> dict:
    """Medians of the per-star metrics: model, kNN, polynomial, and the model over each yardstick."""
    out = {}
    for name in ("relative_flux_error", "reduced_chi2"):
        m, k = float(np.nanmedian(model[name])), float(np.nanmedian(knn[name]))
        out[name] = {"model": m, "knn": k, "model_over_knn": m / k if k > 0 else None}
        if polynomial is not None:
            p = float(np.nanmedian(polynomial[name]))
            out[name].update(polynomial=p, model_over_polynomial=m / p if p > 0 else None)
    return out


def g_bins(g_mag: np.ndarray, edges) -> list[tuple[float, float, np.ndarray]]:
    edges = [-np.inf, *sorted(edges), np.inf]
    bins = [(lo, hi, (g_mag >= lo) & (g_mag < hi)) for lo, hi in zip(edges[:-1], edges[1:])]
    return [(lo, hi, rows) for lo, hi, rows in bins if rows.any()]


class HeldOutMismatchError(InputError, ValueError):
    """A model trained around other held-out stars than the config's."""


def require_same_held_out(config: dict, aes: Autoencoders) -> None:
    """Refuse models whose run held out other stars than ``config`` does: validated on this
    config's held-out stars, they could be scored on stars they trained on."""
    expected = held_out_definition({"config": config})
    for path, stored in zip(aes.paths, aes.held_out):
        if stored is not None and stored != expected:
            raise HeldOutMismatchError(f"{path} was trained around the held-out stars of {stored} (seed, pretrain keys); "
                             f"this config holds out {expected}, so the model may have trained on stars it "
                             "would be validated on. Pass the config of the run that made it, or retrain it")


def evaluate_reconstruction(config: dict, aes: Autoencoders, shard_paths, out_dir: str | Path) -> dict:
    """Run the validation (see the module docstring); writes ``metrics.json`` and figures into ``out_dir``."""
    section, seed = config["reconstruct"], int(config["seed"])
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    require_same_held_out(config, aes)
    raw, held = read_shards(shard_paths, read_columns(aes), config["pretrain"], seed)
    x = aes.scaled_inputs(raw)
    xp_idx = aes.layout.xp_indices
    has_xp = np.isfinite(x[:, xp_idx]).all(axis=1) & np.isfinite(raw[G_MAG])
    test, train = np.flatnonzero(held & has_xp), np.flatnonzero(~held & has_xp)
    if len(test) == 0 or len(train) < 2:
        raise ValueError(f"{len(test)} held-out and {len(train)} training stars with full XP and G: too few to "
                         "validate; raise pretrain.validation_fraction or add shards")
    names = [aes.layout.names[i] for i in xp_idx]
    n_bp, n_rp = band_sizes(names)
    observed = np.column_stack([raw[c] for c in names]).astype(np.float64)
    wavelengths, observed_flux = sample_flux(observed, n_bp, n_rp)
    g_mag = np.asarray(raw[G_MAG], dtype=np.float64)

    def knn_tuning_error(predicted_scaled, rows):
        rows = train[rows]
        archive = scaled_xp_to_archive(predicted_scaled, g_mag[rows], aes)
        return relative_flux_error(sample_flux(archive, n_bp, n_rp)[1], observed_flux[rows])

    colour_names, colours = colour_features(raw, aes.layout)  # never apparent G: the spectra are G-normalised
    knn = fit_knn_spectra(colours[train], x[train][:, xp_idx], raw[SOURCE_ID][train],
                          section["knn_neighbours"], knn_tuning_error, seed)
    knn_xp = scaled_xp_to_archive(knn.predict(colours[test]), g_mag[test], aes)
    poly = fit_polynomial_spectra(colours[train], x[train][:, xp_idx], raw[SOURCE_ID][train], knn_tuning_error,
                                  seed)
    poly_xp = scaled_xp_to_archive(poly.predict(colours[test]), g_mag[test], aes)
    rec = reconstruct_xp(subset(raw, test), aes, hide_xp=True, batch_size=section["batch_size"])
    args = (rec.observed, rec.observed_error, observed_flux[test], n_bp, n_rp)
    model_m, knn_m, poly_m = star_metrics(rec.mean, *args), star_metrics(knn_xp, *args), star_metrics(poly_xp, *args)

    metrics = {
        "stars": {"held_out_with_xp": int(len(test)), "knn_training": int(len(train))},
        "models": [str(p) for p in aes.paths],
        "knn": {"n_neighbours": knn.n_neighbours, "tuning_median_relative_flux_error": knn.tuning_errors,
                "features": colour_names, "feature_weights": dict(zip(colour_names, map(float, knn.weights)))},
        "polynomial": {"degree": POLYNOMIAL_DEGREE, "features": colour_names, "ridge_alpha": poly.alpha,
                       "tuning_median_relative_flux_error": {str(a): e for a, e in poly.tuning_errors.items()}},
        "wavelengths_nm": [float(wavelengths[0]), float(wavelengths[-1]), len(wavelengths)],
        "overall": summarise(model_m, knn_m, poly_m),
        "by_g": [{"g_min": lo, "g_max": hi, "n": int(rows.sum()),
                  **summarise({k: v[rows] for k, v in model_m.items()}, {k: v[rows] for k, v in knn_m.items()},
                              {k: v[rows] for k, v in poly_m.items()})}
                 for lo, hi, rows in g_bins(g_mag[test], config["evaluate"]["g_mag_bins"])],
        "each_model": [{"path": str(p), **{k: float(np.nanmedian(v)) for k, v in star_metrics(r, *args).items()}}
                       for p, r in zip(aes.paths, rec.per_model)],
        # the same stars with their XP seen: how well the models reproduce an observed spectrum
        "xp_seen": {k: float(np.nanmedian(v)) for k, v in star_metrics(
            reconstruct_xp(subset(raw, test), aes, hide_xp=False, batch_size=section["batch_size"]).mean,
            *args).items()},
    }
    if rec.spread is not None:
        inside = np.abs(rec.mean - rec.observed) <= rec.spread
        metrics["within_one_spread"] = float(np.mean(inside))
    for entry in metrics["by_g"]:  # JSON has no infinities
        entry["g_min"] = None if not np.isfinite(entry["g_min"]) else float(entry["g_min"])
        entry["g_max"] = None if not np.isfinite(entry["g_max"]) else float(entry["g_max"])
    with atomic_path(out_dir / "metrics.json") as tmp:
        tmp.write_text(json.dumps(metrics, indent=1))
    write_figures(out_dir, config, aes, raw, x, test, rec, knn_xp, observed_flux, model_m, knn_m, metrics,
                  n_bp, n_rp)
    return metrics


def example_rows(colour: np.ndarray, n: int) -> np.ndarray:
    """``n`` stars spread evenly in ``colour`` (bluest to reddest), by rank."""
    order = np.argsort(colour)
    return order[np.linspace(0, len(order) - 1, min(n, len(order))).round().astype(int)]


def write_figures(out_dir, config, aes, raw, x, test, rec, knn_xp, observed_flux, model_m, knn_m, metrics,
                  n_bp, n_rp) -> None:
    n_show = config["reconstruct"]["spectra_stars"]
    bp_rp = raw["phot_bp_mean_mag"] - raw["phot_rp_mean_mag"] if "phot_bp_mean_mag" in raw and \
        "phot_rp_mean_mag" in raw else raw[G_MAG]
    shown = example_rows(bp_rp[test], n_show)
    wavelengths, rec_flux = sample_flux(rec.mean[shown], n_bp, n_rp)
    spread_flux = None
    if rec.spread is not None:
        spread_flux = np.std(np.stack([sample_flux(r[shown], n_bp, n_rp)[1] for r in rec.per_model]), axis=0,
                             ddof=1)
    plot_spectra(out_dir / "spectra_observed_vs_reconstructed.png", wavelengths, raw[SOURCE_ID][test][shown],
                 {"observed": observed_flux[test][shown], "model, XP hidden": rec_flux,
                  "kNN on colours": sample_flux(knn_xp[shown], n_bp, n_rp)[1]},
                 spread=spread_flux, errors={"model, XP hidden": model_m["relative_flux_error"][shown],
                                             "kNN on colours": knn_m["relative_flux_error"][shown]})
    no_xp = np.flatnonzero(~np.isfinite(x[:, aes.layout.xp_indices]).all(axis=1) & np.isfinite(raw[G_MAG]))
    if len(no_xp):
        rows, title = no_xp[example_rows(bp_rp[no_xp], n_show)], "stars without XP in the store"
    else:  # the demo has none: the held-out stars with XP hidden stand in for them
        rows, title = test[shown], "no star lacks XP here: held-out stars, XP hidden"
    photometry_only = reconstruct_xp(subset(raw, rows), aes, hide_xp=True,
                                     batch_size=config["reconstruct"]["batch_size"])
    plot_spectra(out_dir / "spectra_photometry_only.png", wavelengths, raw[SOURCE_ID][rows],
                 {"model (photometry only)": sample_flux(photometry_only.mean, n_bp, n_rp)[1]}, title=title)
    plot_error_by_g(out_dir / "relative_flux_error_by_g.png", metrics["by_g"])


def add_arguments(parser) -> None:
    parser.add_argument("--config", required=True, help="pipeline config (YAML)")
    parser.add_argument("--models", nargs="+", required=True,
                        help="results/pretrain/model.pt and/or fine-tuned member model.pt files (same run)")
    parser.add_argument("--shards", nargs="+", required=True, help="the store's shards (HDF5)")
    parser.add_argument("--out-dir", required=True, help="folder for metrics.json and the figures")
    add_device_argument(parser)


def run(args) -> int:
    config = load_config(args.config)
    aes = Autoencoders.load(args.models, device=resolve_device(args.device))
    Layout.from_config(config["features"]).require_same(aes.layout, "the models")
    metrics = evaluate_reconstruction(config, aes, args.shards, args.out_dir)
    overall = metrics["overall"]["relative_flux_error"]
    log.info("%d held-out stars, XP hidden: median relative flux error %.4f (model) vs %.4f (kNN on colours, "
             "k=%d) and %.4f (cubic ridge on colours): ratios %.3f and %.3f", metrics["stars"]["held_out_with_xp"],
             overall["model"], overall["knn"], metrics["knn"]["n_neighbours"], overall["polynomial"],
             overall["model_over_knn"], overall["model_over_polynomial"])
    return 0
