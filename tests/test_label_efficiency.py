"""benchmarks/label_efficiency.py: the fraction's label count, its run in results.jsonl, the table and figure."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_accuracy  # noqa: E402
import label_efficiency  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def row(tag, fraction, teff):
    variants = ("model", "model_no_xp", "from_scratch", "from_scratch_no_xp", "mlp", "mlp_no_xp", "gbt", "gbt_no_xp")
    return {"tag": tag, "label_fraction": fraction, "split": "validation", "seeds": [0],
            "summary": {v: {"teff": teff + k, "logg": 0.2} for k, v in enumerate(variants)}}


def test_the_newest_run_of_each_fraction_makes_the_table_and_figure(tmp_path):
    lines = [row("e-f0.1", 0.1, 300.0), row("e-f1", 1.0, 150.0), row("e-f0.1", 0.1, 250.0), row("other-f1", 1.0, 9.0)]
    results = tmp_path / "results.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in lines))
    runs = label_efficiency.latest_runs(results, "e", [0.1, 1.0])
    assert runs[0.1]["summary"]["model"]["teff"] == 250.0 and runs[1.0]["summary"]["model"]["teff"] == 150.0
    table = label_efficiency.table_lines(runs, {0.1: 12, 1.0: 120}, ["teff", "logg"])
    assert table[3].startswith("| 12 (0.1) | XP | 250 / 0.2 | 252 / 0.2 | 254 / 0.2 | 256 / 0.2 |")
    label_efficiency.plot(runs, {0.1: 12, 1.0: 120}, ["teff", "logg"], tmp_path / "le.png")
    assert (tmp_path / "le.png").stat().st_size > 10_000
    with pytest.raises(SystemExit, match=r"fractions \[0.25\]"):
        label_efficiency.latest_runs(results, "e", [0.1, 0.25])


def test_the_label_counts_are_the_kept_train_labels_of_the_demo():
    counts = label_efficiency.train_label_counts(str(REPO / "config" / "config.yaml"), [], [0.1, 1.0])
    _, split, _ = bench_accuracy.kept_train_labels(bench_accuracy.with_overrides(
        bench_accuracy.load_config(str(REPO / "config" / "config.yaml")), []), 1.0)
    assert counts[1.0] == int((split == "train").sum()) > 1000
    assert 0.07 * counts[1.0] < counts[0.1] < 0.13 * counts[1.0]
