"""The statistics behind the ablation benchmark's ratios (benchmarks/bench_accuracy.py): the
closing notes of issue 14 quote its model / yardstick ratios and their bootstrap intervals."""

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_accuracy  # noqa: E402


def residual_seeds(scale_model: float, n: int = 800, n_seeds: int = 3, shared: bool = True) -> list[dict]:
    """Per seed, residuals of a 'model' and an 'mlp' on one label; with ``shared`` the model's
    are the MLP's scaled (the same stars hard for both), else independent draws."""
    rng = np.random.default_rng(1)
    seeds = []
    for _ in range(n_seeds):
        mlp = rng.normal(size=(n, 1))
        model = scale_model * (mlp if shared else rng.normal(size=(n, 1)))
        seeds.append({"model": model, "mlp": mlp})
    return seeds


def test_ratio_of_a_model_that_halves_every_residual_is_half_with_a_tight_paired_interval():
    seeds = residual_seeds(0.5)
    summary = bench_accuracy.summarise(
        [{v: bench_accuracy.nmad_table(r, ["x"]) for v, r in s.items()} for s in seeds], ["x"])
    (row,) = bench_accuracy.ratios_to_best(summary, seeds, ["x"], n_boot=200)
    assert row["yardstick"] == "mlp" and row["ratio"] == pytest.approx(0.5)
    # paired resamples: both variants see the same stars in every draw, so the ratio cannot move
    assert row["lo90"] == pytest.approx(0.5) and row["hi90"] == pytest.approx(0.5)


def test_interval_of_two_equally_good_independent_models_covers_one_and_is_a_few_per_cent_wide():
    seeds = residual_seeds(1.0, shared=False)
    draws = np.random.default_rng(0).integers(0, 800, size=(400, 800))
    lo, hi = bench_accuracy.ratio_interval(seeds, "model", "mlp", 0, draws)
    assert lo < 1 < hi
    assert 0.02 < hi - lo < 0.3  # ~ ±5 % on 800 stars (median of 3 seeds): neither zero nor vacuous


def test_nmad_table_reports_a_label_no_star_has_as_missing():
    residuals = np.column_stack([np.arange(5.0), np.full(5, np.nan)])
    assert bench_accuracy.nmad_table(residuals, ["a", "b"]) == {"a": pytest.approx(1.4826), "b": None}


def test_single_mlp_ratio_is_taken_against_the_single_mlp_even_where_the_ensemble_is_better():
    seeds = residual_seeds(0.5)
    for s in seeds:
        s["mlp_single"] = 2 * s["mlp"]  # one network: twice the ensemble's residuals
    summary = bench_accuracy.summarise(
        [{v: bench_accuracy.nmad_table(r, ["x"]) for v, r in s.items()} for s in seeds], ["x"])
    (best,) = bench_accuracy.ratios_to_best(summary, seeds, ["x"], n_boot=50)
    (single,) = bench_accuracy.ratios_to_best(summary, seeds, ["x"], n_boot=50, yardsticks=("mlp_single",))
    assert best["yardstick"] == "mlp" and best["ratio"] == pytest.approx(0.5)
    assert single["yardstick"] == "mlp_single" and single["ratio"] == pytest.approx(0.25)
