"""A synthetic Gaia sky with known truth, written in the Gaia Archive's own file formats.

``write_sky(out_dir, n_stars, n_shards, seed)`` writes, per shard ``sNNN``:

* ``XpContinuousMeanSpectrum_sNNN.csv.gz`` — the Archive XP_CONTINUOUS CSV schema (lists as
  ``"(v1, v2, ...)"``), optionally with the 1485-value ``*_coefficient_correlations`` columns;
  only stars brighter than ``xp_limit_mag`` in G have a row, as in DR3;
* ``GaiaSource_sNNN.csv.gz`` — astrometry and G/BP/RP photometry (with ``*_flux_over_error``);
* ``tmass_sNNN.csv`` — 2MASS J/H/Ks with ``*_msigcom`` errors, only for stars with J < 16.5;

and one ``labels.csv`` with the true stellar parameters (teff K, logg dex, fe_h dex, alpha_m dex,
age Gyr, each with a nominal error column) and ``parallax_true`` (mas). Label values are the
truth itself; the ``*_err`` columns are the errors a survey would quote.

The physics is invented but learnable: each XP coefficient is the G flux 10^(-0.4 (G - 15))
times a smooth function of (teff, logg, fe_h, alpha_m), monotone in each parameter, plus noise
whose size (reported as the coefficient error) grows with magnitude; colours and absolute
magnitude are smooth functions of the same parameters; G = M_G + distance modulus; Gaia's
parallax is the truth plus Gaussian noise of the quoted parallax_error, which grows with G.
The "instrument" (the coefficient response matrices) is fixed by a constant seed, so skies drawn
with different seeds share the same physics; ``seed`` only changes the stars.

source_ids are realistic: HEALPix level-12 pixel × 2^35 + an even running number, all > 2^53,
ascending from shard to shard like the Archive's bulk files; ra/dec lie inside the level-12
pixel that the source_id encodes, as they do in Gaia.
"""

from __future__ import annotations

import argparse
import gzip
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from msa.data.healpix import pixel_centres, source_id_to_pixel
from msa.data.store import atomic_path
from msa.progress import progress

log = logging.getLogger(__name__)

N_COEFF = 55
N_CORRELATIONS = N_COEFF * (N_COEFF - 1) // 2  # 1485: the strict upper triangle, as in DR3
SOLUTION_ID = 4545469030156206080  # the value of the DR3 reference rows
HEALPIX12_PIXELS = 12 * 4**12
SOURCE_ID_PIXEL_SHIFT = 2**35
PIXEL12_HALF_WIDTH_DEG = 0.0072  # half the ~0.86 arcmin side of a level-12 pixel
# the "instrument" is the same for every sky: physics fixed, stars drawn from `seed`
PHYSICS_SEED = 20220613
XP_LIMIT_MAG = 17.65
SOURCE_FAINT_LIMIT = 20.9
SOURCE_BRIGHT_LIMIT = 5.0
TMASS_J_LIMIT = 16.5
SHARD_FORMAT = "s{:03d}"
# reference G flux of each band's first coefficient at G = 15 (e-/s, like the demo)
BAND_ZERO_POINT = {"bp": 1600.0, "rp": 2100.0}

XP_COLUMNS_PER_BAND = (
    "basis_function_id", "degrees_of_freedom", "n_parameters", "n_measurements",
    "n_rejected_measurements", "standard_deviation", "chi_squared", "coefficients",
    "coefficient_errors", "coefficient_correlations", "n_relevant_bases", "relative_shrinking",
)
SOURCE_COLUMNS = (
    "source_id", "ra", "dec", "parallax", "parallax_error", "pmra", "pmra_error", "pmdec",
    "pmdec_error", "phot_g_mean_mag", "phot_bp_mean_mag", "phot_rp_mean_mag",
    "phot_g_mean_flux_over_error", "phot_bp_mean_flux_over_error", "phot_rp_mean_flux_over_error",
)
LABEL_COLUMNS = (
    "source_id", "teff", "teff_err", "logg", "logg_err", "fe_h", "fe_h_err", "alpha_m",
    "alpha_m_err", "age", "age_err", "parallax_true",
)
_MAG_PER_LN = 2.5 / np.log(10.0)


def xp_column_names(correlations: bool) -> list[str]:
    """The Archive XP_CONTINUOUS header, with or without the two correlation columns."""
    cols = ["source_id", "solution_id"]
    for band in ("bp", "rp"):
        cols += [f"{band}_{c}" for c in XP_COLUMNS_PER_BAND
                 if correlations or c != "coefficient_correlations"]
    return cols


@dataclass
class SyntheticSky:
    """What :func:`write_sky` wrote: file paths per shard and the counts."""

    out_dir: Path
    shards: list[str]
    xp_paths: list[Path]
    source_paths: list[Path]
    tmass_paths: list[Path]
    labels_path: Path
    n_stars: int
    n_with_xp: int
    shard_rows: list[int] = field(default_factory=list)

    @property
    def xp_pattern(self) -> str:
        return str(self.out_dir / "XpContinuousMeanSpectrum_{shard}.csv.gz")

    @property
    def source_pattern(self) -> str:
        return str(self.out_dir / "GaiaSource_{shard}.csv.gz")

    @property
    def tmass_pattern(self) -> str:
        return str(self.out_dir / "tmass_{shard}.csv")


# --- the stars ------------------------------------------------------------------------------------

def draw_source_ids(n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` unique, even, ascending int64 ids > 2^53 shaped like Gaia DR3 source_ids."""
    lowest_pixel = 2**19  # pixel × 2^35 > 2^53 from here on
    pixels = np.sort(rng.choice(HEALPIX12_PIXELS - lowest_pixel, size=n, replace=False) + lowest_pixel)
    running = 2 * rng.integers(1, 2**24, size=n)
    return (pixels.astype(np.int64) * SOURCE_ID_PIXEL_SHIFT + running).astype(np.int64)


def draw_parameters(n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """True teff (K), logg, fe_h, alpha_m (dex) and age (Gyr): a dwarf + giant mixture."""
    giant = rng.random(n) < 0.4
    teff = np.where(giant, rng.normal(4700, 300, n), rng.normal(5600, 700, n))
    teff = np.clip(teff, 3800, 7200)
    logg_giant = 2.5 + 0.7 * (teff - 4700) / 400 + rng.normal(0, 0.3, n)
    logg_dwarf = 4.6 - 0.3 * (teff - 4500) / 2500 + rng.normal(0, 0.1, n)
    logg = np.where(giant, np.clip(logg_giant, 0.8, 3.6), np.clip(logg_dwarf, 3.8, 4.9))
    fe_h = np.clip(rng.normal(-0.25, 0.35, n), -2.5, 0.5)
    alpha_m = np.clip(0.12 - 0.15 * np.tanh(2.0 * (fe_h + 0.4)) + rng.normal(0, 0.04, n), -0.1, 0.45)
    # older when cooler, more metal-poor and more evolved (lower logg)
    log_age = (0.7 - 0.25 * (teff - 5500) / 1000 - 0.3 * fe_h - 0.1 * (logg - 3.5)
               + rng.normal(0, 0.08, n))
    age = 10 ** np.clip(log_age, -0.3, 1.13)
    return {"teff": teff, "logg": logg, "fe_h": fe_h, "alpha_m": alpha_m, "age": age}


def absolute_g(p: dict[str, np.ndarray]) -> np.ndarray:
    """M_G: brighter when hotter and when lower logg; slightly fainter when metal rich."""
    return 4.7 + 6.0 * (5800.0 / p["teff"] - 1.0) + 2.2 * (p["logg"] - 4.4) + 0.3 * p["fe_h"]


def colour_bp_rp(p: dict[str, np.ndarray]) -> np.ndarray:
    return 0.82 + 1.6 * (5800.0 / p["teff"] - 1.0) + 0.08 * p["fe_h"] + 0.03 * (p["logg"] - 4.4)


def draw_distances(m_g: np.ndarray, rng: np.random.Generator, scale_kpc: float = 1.1) -> np.ndarray:
    """Distance (kpc) from r² exp(-r/L), redrawn until SOURCE_BRIGHT_LIMIT ≤ G ≤ SOURCE_FAINT_LIMIT."""
    d = rng.gamma(3.0, scale_kpc, len(m_g))
    for _ in range(100):
        g = m_g + 5 * np.log10(d * 100.0)
        bad = (g > SOURCE_FAINT_LIMIT) | (g < SOURCE_BRIGHT_LIMIT)
        if not bad.any():
            break
        d[bad] = rng.gamma(3.0, scale_kpc, int(bad.sum()))
    # the few left after 100 redraws: pull to the nearest allowed distance
    lo = 10 ** ((SOURCE_BRIGHT_LIMIT - m_g) / 5 - 2)
    hi = 10 ** ((SOURCE_FAINT_LIMIT - m_g) / 5 - 2)
    return np.clip(d, lo, hi)


def _standardised(p: dict[str, np.ndarray]) -> np.ndarray:
    """(n, 4) parameters on unit-ish scales: teff, logg, fe_h, alpha_m."""
    return np.stack([(p["teff"] - 5000) / 1000, (p["logg"] - 3.0) / 1.5,
                     p["fe_h"] / 0.5, p["alpha_m"] / 0.2], axis=1)


def _instrument() -> dict[str, dict[str, np.ndarray]]:
    """Fixed per-band coefficient amplitudes, signs, parameter responses and noise levels."""
    rng = np.random.default_rng(PHYSICS_SEED)
    k = np.arange(N_COEFF)
    out = {}
    for band, teff_sign in (("bp", 1.0), ("rp", -1.0)):
        amp = np.where(k == 0, BAND_ZERO_POINT[band], 60.0 * np.exp(-k / 15.0) + 2.0)
        sign = np.where(k == 0, 1.0, rng.choice([-1.0, 1.0], N_COEFF))
        response = rng.normal(0, 0.25, (N_COEFF, 4)) * np.exp(-k / 40.0)[:, None]
        response[0, 0] = 0.35 * teff_sign  # hot stars are blue: BP up, RP down
        # normalised-flux noise at G = 15 (grows as 10^(0.2 (G-15)), i.e. Poisson in counts)
        noise15 = np.where(k == 0, 0.004 * amp, 0.3 + 0.01 * amp)
        out[band] = {"amp": amp, "sign": sign, "response": response, "noise15": noise15}
    return out


def xp_coefficients(p: dict[str, np.ndarray], g: np.ndarray, rng: np.random.Generator
                    ) -> dict[str, np.ndarray]:
    """Noisy coefficients (e-/s, float64) and their reported errors (float32) per band."""
    x = _standardised(p)
    flux = 10 ** (-0.4 * (g - 15.0))
    noise_growth = 10 ** (0.2 * (g - 15.0))
    out = {}
    for band, inst in _instrument().items():
        shape = inst["sign"] * inst["amp"] * np.exp(x @ inst["response"].T)  # (n, 55), at G = 15
        sigma_norm = inst["noise15"][None, :] * noise_growth[:, None]
        coeff = (shape + rng.normal(size=shape.shape) * sigma_norm) * flux[:, None]
        reported = sigma_norm * flux[:, None] * rng.normal(1.0, 0.03, shape.shape)
        out[f"{band}_coefficients"] = coeff
        out[f"{band}_coefficient_errors"] = np.abs(reported).astype(np.float32)
    return out


@dataclass
class SimulatedStars:
    """Per-star table (sorted by source_id) plus the XP arrays, row-aligned with it."""

    table: pd.DataFrame
    xp: dict[str, np.ndarray]
    n_measurements: np.ndarray  # (2, n): BP and RP transits × samples


def simulate_stars(n_stars: int, seed: int) -> SimulatedStars:
    """Truth, Gaia and 2MASS observables and noisy XP coefficients for ``n_stars`` stars."""
    rng = np.random.default_rng(seed)
    sid = draw_source_ids(n_stars, rng)
    p = draw_parameters(n_stars, rng)
    m_g = absolute_g(p)
    dist = draw_distances(m_g, rng)
    g_true = m_g + 5 * np.log10(dist * 100.0)
    plx_true = 1.0 / dist
    plx_err = 0.015 + 0.07 * 10 ** (0.3 * (g_true - 17.0))
    bp_rp = colour_bp_rp(p)
    rp_true = g_true - 0.5 * bp_rp - 0.02
    bp_true = rp_true + bp_rp
    sig_g = 0.0003 + 0.0002 * 10 ** (0.4 * (g_true - 15.0))
    sig_bprp = 0.001 + 0.002 * 10 ** (0.4 * (g_true - 15.0))
    j_true = g_true - 0.25 - 1.05 * bp_rp
    h_true = j_true - 0.3 * bp_rp + 0.04 * (p["logg"] - 3.0)
    k_true = h_true - 0.08 * bp_rp - 0.02 * p["fe_h"]
    sig_j = 0.02 + 0.05 * 10 ** (0.4 * (j_true - 15.5))
    # positions inside the level-12 HEALPix pixel that the source_id encodes, as in Gaia
    ra, dec = pixel_centres(source_id_to_pixel(sid, 12), 12)
    dec = np.clip(dec + rng.uniform(-1, 1, n_stars) * PIXEL12_HALF_WIDTH_DEG, -90.0, 90.0)
    ra = np.mod(ra + rng.uniform(-1, 1, n_stars) * PIXEL12_HALF_WIDTH_DEG
                / np.maximum(np.cos(np.radians(dec)), 1e-3), 360.0)
    tangential = rng.normal(0, 30.0, (2, n_stars)) * plx_true / 4.74  # 30 km/s → mas/yr
    df = pd.DataFrame({
        "source_id": sid, "ra": ra, "dec": dec,
        "parallax": plx_true + rng.normal(0, 1, n_stars) * plx_err, "parallax_error": plx_err,
        "pmra": tangential[0] + rng.normal(0, 1, n_stars) * 1.1 * plx_err, "pmra_error": 1.1 * plx_err,
        "pmdec": tangential[1] + rng.normal(0, 1, n_stars) * 1.1 * plx_err, "pmdec_error": 1.1 * plx_err,
        "phot_g_mean_mag": g_true + rng.normal(0, 1, n_stars) * sig_g,
        "phot_bp_mean_mag": bp_true + rng.normal(0, 1, n_stars) * sig_bprp,
        "phot_rp_mean_mag": rp_true + rng.normal(0, 1, n_stars) * sig_bprp / 1.3,
        "phot_g_mean_flux_over_error": _MAG_PER_LN / sig_g,
        "phot_bp_mean_flux_over_error": _MAG_PER_LN / sig_bprp,
        "phot_rp_mean_flux_over_error": 1.3 * _MAG_PER_LN / sig_bprp,  # RP is the sharper band
        "j_m": j_true + rng.normal(0, 1, n_stars) * sig_j, "j_msigcom": sig_j,
        "h_m": h_true + rng.normal(0, 1, n_stars) * 1.1 * sig_j, "h_msigcom": 1.1 * sig_j,
        "ks_m": k_true + rng.normal(0, 1, n_stars) * 1.3 * sig_j, "ks_msigcom": 1.3 * sig_j,
        "teff": p["teff"], "teff_err": np.full(n_stars, 50.0),
        "logg": p["logg"], "logg_err": np.full(n_stars, 0.05),
        "fe_h": p["fe_h"], "fe_h_err": np.full(n_stars, 0.03),
        "alpha_m": p["alpha_m"], "alpha_m_err": np.full(n_stars, 0.02),
        "age": p["age"], "age_err": 0.15 * p["age"],
        "parallax_true": plx_true,
        "has_xp": g_true <= XP_LIMIT_MAG,
    })
    # 2MASS misses a few Ks detections even for stars it lists
    df.loc[rng.random(n_stars) < 0.02, ["ks_m", "ks_msigcom"]] = np.nan
    xp = xp_coefficients(p, g_true, rng)
    return SimulatedStars(df, xp, rng.integers(800, 5000, (2, n_stars)))


# --- the files ------------------------------------------------------------------------------------

def _list_strings(values: np.ndarray, fmt: str | None) -> list[str]:
    """``"(v1, v2, ...)"`` per row, with the quotes. ``fmt=None``: shortest round-trip repr."""
    n, m = values.shape
    flat = values.ravel().tolist()
    text = list(map(repr, flat)) if fmt is None else list(map(fmt.__mod__, flat))
    return ['"(' + ", ".join(text[i * m:(i + 1) * m]) + ')"' for i in range(n)]


def _correlation_pool(rng: np.random.Generator, size: int = 16) -> list[str]:
    """A few formatted 1485-value correlation vectors; rows pick one (the readers skip them)."""
    pool = np.clip(rng.normal(0, 0.15, (size, N_CORRELATIONS)), -0.99, 0.99).astype(np.float32)
    return _list_strings(pool.astype(np.float64), "%.8g")


def write_csv(frame: pd.DataFrame, path: Path, float_format: str, compression=None) -> None:
    """``frame`` as CSV at ``path``, atomically: a killed run leaves no complete-looking file.
    The compression is explicit: pandas would infer none from the temporary's .tmp suffix."""
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False, float_format=float_format, compression=compression)


def write_xp_csv(path: Path, stars: SimulatedStars, rows: np.ndarray, correlations: bool,
                 rng: np.random.Generator, compresslevel: int = 6, block_rows: int = 2000) -> None:
    """Write the XP rows ``rows`` (indices into ``stars``) as an Archive XP_CONTINUOUS CSV.gz."""
    xp = stars.xp
    n_meas_all = stars.n_measurements
    pools = {b: _correlation_pool(rng) for b in ("bp", "rp")} if correlations else {}
    sid = stars.table["source_id"].to_numpy()
    with atomic_path(path) as tmp, gzip.open(tmp, "wt", compresslevel=compresslevel, newline="\n") as out:
        out.write(",".join(xp_column_names(correlations)) + "\n")
        for start in range(0, len(rows), block_rows):
            idx = rows[start:start + block_rows]
            parts = [[str(s) for s in sid[idx].tolist()], [str(SOLUTION_ID)] * len(idx)]
            for b, band in enumerate(("bp", "rp")):
                n_meas = n_meas_all[b, idx]
                n_rej = (n_meas // 200).astype(np.int64)
                dof = n_meas - N_COEFF
                std = 1.0 + rng.gamma(2.0, 0.02, len(idx))
                chi2 = dof * std**2
                parts += [
                    [str(56 + b)] * len(idx), [str(v) for v in dof.tolist()], [str(N_COEFF)] * len(idx),
                    [str(v) for v in n_meas.tolist()], [str(v) for v in n_rej.tolist()],
                    ["%.8g" % v for v in std.tolist()], ["%.8g" % v for v in chi2.tolist()],
                    _list_strings(xp[f"{band}_coefficients"][idx], None),
                    _list_strings(xp[f"{band}_coefficient_errors"][idx].astype(np.float64), "%.7g"),
                ]
                if correlations:
                    pick = rng.integers(0, len(pools[band]), len(idx))
                    parts.append([pools[band][i] for i in pick.tolist()])
                parts += [[str(N_COEFF)] * len(idx), ["%.7g" % v for v in rng.uniform(0, 0.05, len(idx))]]
            out.write("".join(",".join(cells) + "\n" for cells in zip(*parts)))


def write_sky(out_dir: str | Path, n_stars: int, n_shards: int = 1, seed: int = 0,
              xp_limit_mag: float = XP_LIMIT_MAG, correlations: bool = False,
              compresslevel: int = 6) -> SyntheticSky:
    """Simulate ``n_stars`` and write them as ``n_shards`` Archive-format file triples + labels.csv.

    Stars are split into shards by contiguous source_id ranges (like HEALPix-ordered bulk files).
    Stars with G > ``xp_limit_mag`` appear only in GaiaSource. Returns the written paths.
    """
    if n_stars < 1 or n_shards < 1 or n_shards > n_stars:
        raise ValueError(f"write_sky: need 1 ≤ n_shards ({n_shards}) ≤ n_stars ({n_stars})")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stars = simulate_stars(n_stars, seed)
    table = stars.table
    has_xp = table["phot_g_mean_mag"].to_numpy() <= xp_limit_mag
    file_rng = np.random.default_rng([seed, 1])
    sky = SyntheticSky(out_dir, [], [], [], [], out_dir / "labels.csv", n_stars, int(has_xp.sum()))
    blocks = np.array_split(np.arange(n_stars), n_shards)
    for k, block in enumerate(progress(blocks, desc="synthetic shards", unit="shard", enabled=n_shards >= 2)):
        shard = SHARD_FORMAT.format(k)
        xp_path = out_dir / f"XpContinuousMeanSpectrum_{shard}.csv.gz"
        source_path = out_dir / f"GaiaSource_{shard}.csv.gz"
        tmass_path = out_dir / f"tmass_{shard}.csv"
        write_xp_csv(xp_path, stars, block[has_xp[block]], correlations, file_rng, compresslevel)
        part = table.iloc[block]
        write_csv(part.loc[:, list(SOURCE_COLUMNS)], source_path, float_format="%.10g",
                  compression={"method": "gzip", "compresslevel": compresslevel})
        in_2mass = part["j_m"].to_numpy() < TMASS_J_LIMIT
        write_csv(part.loc[in_2mass, ["source_id", "j_m", "h_m", "ks_m", "j_msigcom", "h_msigcom", "ks_msigcom"]],
                  tmass_path, float_format="%.3f")
        sky.shards.append(shard)
        sky.xp_paths.append(xp_path)
        sky.source_paths.append(source_path)
        sky.tmass_paths.append(tmass_path)
        sky.shard_rows.append(len(block))
    write_csv(table.loc[:, list(LABEL_COLUMNS)], sky.labels_path, float_format="%.8g")
    log.info("synthetic sky: %d stars (%d with XP) in %d shard(s) under %s",
             n_stars, sky.n_with_xp, n_shards, out_dir)
    return sky


FAINT_SURVEY_NAME = "faint_survey_labels.csv"
FAINT_SURVEY_SALT = 0xFA17  # the survey's star choice differs from every split and sample hash


def write_faint_survey(sky_dir: str | Path, fraction: float, g_min: float, g_max: float, seed: int = 0) -> Path:
    """A faint survey beside ``labels.csv``: its rows (same columns) for ``fraction`` of the stars
    with ``g_min <= G < g_max`` (Gaia's observed G), chosen by a seeded hash of ``source_id``, as
    LAMOST or DESI label a part of the faint sky. Written to ``faint_survey_labels.csv``; returns it."""
    from msa.data.star_hash import hash_uniform

    if not 0 < fraction <= 1 or not g_min < g_max:
        raise ValueError(f"faint survey: need 0 < fraction ({fraction}) <= 1 and g_min ({g_min}) < g_max ({g_max})")
    sky_dir = Path(sky_dir)
    g = pd.concat([pd.read_csv(path, usecols=["source_id", "phot_g_mean_mag"])
                   for path in sorted(sky_dir.glob("GaiaSource_*.csv.gz"))])
    labels = pd.read_csv(sky_dir / "labels.csv").merge(g, on="source_id", how="inner")
    ids = labels["source_id"].to_numpy(np.int64)
    mag = labels["phot_g_mean_mag"].to_numpy()
    chosen = (mag >= g_min) & (mag < g_max) & (hash_uniform(ids, seed, FAINT_SURVEY_SALT) < fraction)
    out = sky_dir / FAINT_SURVEY_NAME
    write_csv(labels.loc[chosen, list(LABEL_COLUMNS)], out, float_format="%.8g")
    log.info("faint survey: %d of the %d stars with %g <= G < %g in %s", int(chosen.sum()),
             int(((mag >= g_min) & (mag < g_max)).sum()), g_min, g_max, out)
    return out


def survey_config(survey_path: str | Path) -> dict:
    """The ``calibrate.surveys`` entry of a faint survey from :func:`write_faint_survey`."""
    return {"faint": {"catalogue": str(survey_path),
                      "columns": {name: {"value": name, "error": f"{name}_err"}
                                  for name in ("teff", "logg", "fe_h", "alpha_m", "age")}}}


def synthetic_config(sky_dir: str | Path, results_dir: str | Path, seed: int = 42) -> dict:
    """A complete pipeline config for a sky written by :func:`write_sky` (passes
    ``msa.config.validate``, which fills the remaining defaults; not called here because config
    sits in this module's own layer).

    Tiny model and few epochs, so that the whole pipeline runs in seconds on a CPU.
    """
    sky = Path(sky_dir)
    cfg = {
        "seed": seed,
        "results": str(results_dir),
        "ingest": {
            "xp": str(sky / "XpContinuousMeanSpectrum_{shard}.csv.gz"),
            "source": str(sky / "GaiaSource_{shard}.csv.gz"),
            "source_columns": [c for c in SOURCE_COLUMNS[1:] if "flux_over_error" not in c],
            "keep_sources_without_xp": True,
            "surveys": {"tmass": {
                "path": str(sky / "tmass_{shard}.csv"),
                "columns": {"j_m": "J", "h_m": "H", "ks_m": "K"},
                "errors": {"j_msigcom": "J_err", "h_msigcom": "H_err", "ks_msigcom": "K_err"},
            }},
        },
        "features": {
            "xp": {"bp": 55, "rp": 55, "normalise": "g_flux"},
            "gaia_photometry": {m: f"{m}_error" for m in
                                ("phot_g_mean_mag", "phot_bp_mean_mag", "phot_rp_mean_mag")},
            "survey_photometry": {"J": "J_err", "H": "H_err", "K": "K_err"},
            "astrometry": {"parallax": "parallax_error"},
            "context": {},
            "force_mask": [],
        },
        "scaler": {"shards": 4, "max_rows": 100000},
        "model": {"d_embedding": 4, "n_frequencies": 4, "encoder_widths": [32, 16]},
        "pretrain": {"epochs": 2, "epochs_per_job": 1, "batch_size": 128, "chunk_rows": 1024,
                     "buffer_rows": 4096, "checkpoint_every": 50, "amp": False, "num_workers": 0},
        "labels": {
            "catalogue": str(sky / "labels.csv"),
            "columns": {
                **{name: {"value": name, "error": f"{name}_err"}
                   for name in ("teff", "logg", "fe_h", "alpha_m", "age")},
                "parallax": {"value": "parallax_true", "error": None},
            },
        },
        "label_sets": {"spectro": ["teff", "logg", "fe_h", "alpha_m"], "age": ["age"],
                       "parallax": ["parallax"]},
        "finetune": {"members": 2, "epochs": 2, "batch_size": 64, "head_widths": [16],
                     "checkpoint_every": 50, "patience": 2},
        "predict": {"chunk_rows": 4096, "batch_size": 1024, "amp": False},
        "catalog": {"sky_map_level": 2, "max_rows_per_partition": 2000, "sky_map_label": "fe_h"},
    }
    return cfg


# --- command line ---------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output folder for the sky's files")
    parser.add_argument("--n-stars", type=int, required=True, help="number of stars (all shards)")
    parser.add_argument("--n-shards", type=int, default=1, help="number of file triples")
    parser.add_argument("--seed", type=int, default=0, help="seed of the stars (physics is fixed)")
    parser.add_argument("--xp-limit-mag", type=float, default=XP_LIMIT_MAG,
                        help="stars fainter than this G have no XP row (default: DR3's 17.65)")
    parser.add_argument("--correlations", action="store_true",
                        help="write the 1485-value bp/rp_coefficient_correlations columns")
    parser.add_argument("--compresslevel", type=int, default=6, help="gzip level of the .csv.gz files")
    parser.add_argument("--write-config", metavar="PATH",
                        help="also write a pipeline config (YAML) for this sky")
    parser.add_argument("--results", default="results", help="results folder named in that config")
    parser.add_argument("--faint-survey", type=float, metavar="FRACTION",
                        help=f"also write {FAINT_SURVEY_NAME}: the labels of this fraction of the stars in the "
                             "--faint-survey-g range (a calibration survey; the config names it in calibrate.surveys)")
    parser.add_argument("--faint-survey-g", type=float, nargs=2, default=[15.0, 18.0], metavar=("G_MIN", "G_MAX"),
                        help="G range of the faint survey (default 15 18)")


def run(args: argparse.Namespace) -> int:
    sky = write_sky(args.out, args.n_stars, args.n_shards, args.seed, args.xp_limit_mag,
                    args.correlations, args.compresslevel)
    print(f"wrote {sky.n_stars} stars ({sky.n_with_xp} with XP) in {len(sky.shards)} shard(s) to {sky.out_dir}")
    survey = None
    if args.faint_survey is not None:
        survey = write_faint_survey(sky.out_dir, args.faint_survey, *args.faint_survey_g, seed=args.seed)
        print(f"wrote faint survey {survey}")
    if args.write_config:
        cfg = synthetic_config(sky.out_dir.resolve(), args.results, seed=args.seed)
        if survey is not None:
            cfg["calibrate"] = {"surveys": survey_config(survey.resolve())}
        path = Path(args.write_config)
        with atomic_path(path) as tmp:
            tmp.write_text(yaml.safe_dump(cfg, sort_keys=False))
        print(f"wrote config {path}")
    return 0
