"""Could any reweighting of faint copies calibrate the faint photometry-only sky? An oracle test.

Run after ``benchmarks/bench_faint_coverage.py --work DIR`` (it reuses that run's members,
calibration stars and second sky)::

    python benchmarks/probe_faint_label_shift.py --work DIR

For each photometry-only G group fainter than the labelled stars, the calibration stars' faint
copies (made as ``msa calibrate`` makes them) are weighted by the *true* label mix of the second
sky's stars in that group, which no method can know, and the offsets fitted on them are scored on
those sky stars. Printed per label: coverage of [q16, q84] with unweighted copies, with weights
from the true marginal mix of that label (8 quantile bins) and from the true joint Teff × log g
mix (5 × 5 bins); and how many of the group's sky stars lie in Teff × log g cells that hold
under 1 % of the copies. If even the oracle weights miss 0.68, the copies lack the faint sky's
stars: no weights estimated from the sky's inputs (covariate or label shift) can fix it.
"""

from __future__ import annotations

import argparse
import glob
from pathlib import Path

import numpy as np

from msa.calibration.calibrate import conformal_offsets, emulated_copies
from msa.calibration.emulation import fit_error_relation
from msa.calibration.ensemble import Ensemble
from msa.config import load_config
from msa.data.features import G_MAG
from msa.data.labels import LabelSource, label_set, load_split_samples
from msa.data.splits import split_seed

LABEL_SET = "spectro"
CLIP = 20.0


def quantile_bins(reference: np.ndarray, values: np.ndarray, n_bins: int) -> tuple[np.ndarray, np.ndarray]:
    edges = np.quantile(reference, np.linspace(0, 1, n_bins + 1)[1:-1])
    return np.searchsorted(edges, reference, side="right"), np.searchsorted(edges, values, side="right")


def mix_weights(cells_copies: np.ndarray, cells_sky: np.ndarray, n_cells: int) -> np.ndarray:
    """Each copy's weight: the sky's share of its cell over the copies' share (clipped)."""
    p_copies = np.bincount(cells_copies, minlength=n_cells) / len(cells_copies)
    p_sky = np.bincount(cells_sky, minlength=n_cells) / len(cells_sky)
    return np.clip(p_sky[cells_copies] / np.maximum(p_copies[cells_copies], 1e-12), 1 / CLIP, CLIP)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", type=Path, required=True, help="the work dir of bench_faint_coverage.py")
    p.add_argument("--g-min", type=float, default=15.0, help="groups from this G on (the labels' limit)")
    args = p.parse_args()
    work = args.work.resolve()
    cfg, sky_cfg = load_config(work / "train.yaml"), load_config(work / "predict.yaml")
    names = label_set(cfg, LABEL_SET)
    ensemble = Ensemble.load(sorted(glob.glob(str(work / "results-train/finetune/member-*/model.pt"))))
    shards = sorted(glob.glob(str(work / "results-train/store/*.h5")))
    sky_shards = sorted(glob.glob(str(work / "results-predict/store/*.h5")))
    cal_cfg = cfg["calibrate"]
    columns = list(dict.fromkeys([G_MAG, *ensemble.transform.store_columns]))
    stars = load_split_samples(shards, ensemble.transform, LabelSource(cfg["labels"], names), cfg["splits"],
                               split_seed(cfg), ("calibration",), None, columns)["calibration"]
    relation = fit_error_relation(shards, ensemble.layout, cal_cfg["faint_copies"]["max_rows_per_shard"])
    copies = emulated_copies(ensemble, stars, relation, cal_cfg, split_seed(cfg))
    sky = load_split_samples(sky_shards, ensemble.transform, LabelSource(sky_cfg["labels"], names),
                             sky_cfg["splits"], split_seed(sky_cfg), ("test",), None, [G_MAG])["test"]
    hidden = np.zeros(ensemble.layout.n_features, dtype=bool)
    hidden[ensemble.layout.xp_indices] = True
    q_copies = ensemble.predict(copies.x, extra_hidden=hidden, batch_size=4096)
    q_sky = ensemble.predict(sky.x, extra_hidden=hidden, batch_size=4096)
    edges = cal_cfg["g_mag_bins"]
    group_copies = ensemble.calibration_levels(copies.x, copies.extra[G_MAG], edges, xp_hidden=True)[1]
    group_sky = ensemble.calibration_levels(sky.x, sky.extra[G_MAG], edges, xp_hidden=True)[1]
    teff, logg = names.index("teff"), names.index("logg")
    print(f"{'group':>18} {'label':>8} | {'copies':>6} {'sky':>5} | {'unweighted':>10} {'true mix':>8} "
          f"{'true Teff×logg':>14} | sky stars where copies are scarce")
    for lo, hi in zip(edges[:-1], edges[1:]):
        if lo < args.g_min:
            continue
        name = f"no_xp|{lo:g}<=G<{hi:g}"
        c, s = group_copies == name, group_sky == name
        if c.sum() < 50 or s.sum() < 50:
            continue
        t_c, t_s = quantile_bins(copies.y[c, teff], sky.y[s, teff], 5)
        g_c, g_s = quantile_bins(copies.y[c, logg], sky.y[s, logg], 5)
        joint_c, joint_s = t_c * 5 + g_c, t_s * 5 + g_s
        share = np.bincount(joint_c, minlength=25) / c.sum()
        scarce = float(np.mean(share[joint_s] < 0.01))
        for j, label in enumerate(names):
            y_c, y_s = copies.y[c, j], sky.y[s, j]
            marginal_c, marginal_s = quantile_bins(y_c, y_s, 8)
            cells = []
            for w in (None, mix_weights(marginal_c, marginal_s, 8), mix_weights(joint_c, joint_s, 25)):
                offset = conformal_offsets(q_copies[c, j], y_c, cal_cfg["coverage"], "symmetric", w)[0]
                q = q_sky[s, j]
                cells.append(np.mean((y_s >= q[:, 0] - offset) & (y_s <= q[:, 2] + offset)))
            print(f"{name:>18} {label:>8} | {c.sum():>6} {s.sum():>5} | {cells[0]:>10.3f} {cells[1]:>8.3f} "
                  f"{cells[2]:>14.3f} | {scarce:.2f}")


if __name__ == "__main__":
    main()
