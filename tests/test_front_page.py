"""The report's front page: the results table from metrics.json, and workflow.rst rendering it with
the Kiel diagram and sky map, as `snakemake --report` renders it (Jinja, then docutils)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import matplotlib
import pytest

from msa.cli import main
from msa.evaluation.front_page import front_page, yardsticks

matplotlib.use("Agg")
WORKFLOW_RST = Path(__file__).resolve().parents[1] / "workflow" / "report" / "workflow.rst"


def overall(nmad, **extra):
    return {"overall": {"n": 500, "nmad": nmad, "bias": -0.5 * nmad, **extra}}


METRICS = {
    "labels": ["teff", "fe_h"], "coverage_target": 0.68,
    "model": {"teff": overall(111.0, coverage=0.671), "fe_h": overall(0.061, coverage=0.702)},
    "model_no_xp": {"teff": overall(193.0, coverage=0.66), "fe_h": overall(0.35, coverage=0.69)},
    "baseline": {"teff": overall(140.0), "fe_h": overall(0.083)},
    "baseline_no_xp": {"teff": overall(260.0), "fe_h": overall(0.4)},
    # sections the code does not know by name: one of the usual shape, one keyed by split
    "baseline_mlp_single": {"teff": overall(150.0), "fe_h": overall(0.09)},
    "probe": {"test": {"teff": {"nmad": 170.0}, "fe_h": {"nmad": 0.12}}, "validation": {}, "n_stars": 3},
    "comparison": {"teff": {"nmad": 1.0}}, "by_g_mag": {"bins": [12.0]},
}
SUMMARY = {"n_rows": 3896, "n_partitions": 9, "fraction_without_xp": 0.0, "fraction_flagged": 0.001,
           "units": {"teff": "K", "fe_h": "dex"}}


def test_every_yardstick_in_metrics_is_a_column_with_its_numbers():
    assert yardsticks(METRICS, METRICS["labels"]) == ["baseline", "baseline_mlp_single", "probe"]
    text = front_page(METRICS, SUMMARY, "spectro")
    rows = [line for line in text.splitlines() if line.startswith(("| teff", "| fe_h"))]
    cells = [[c.strip() for c in row.strip("|").split("|")] for row in rows]
    assert cells[0] == ["teff", "XP", "500", "111 K", "-55.5 K", "0.671", "140 K", "150 K", "170 K"]
    assert cells[1] == ["teff", "XP hidden", "500", "193 K", "-96.5 K", "0.660", "260 K", "–", "–"]
    assert cells[2][:7] == ["fe_h", "XP", "500", "0.061", "-0.0305", "0.702", "0.083"]
    assert "3,896 stars in 9 HATS partitions" in text and "coverage (target 0.68)" in text


def test_the_report_front_page_leads_with_the_table_and_the_kiel_diagram(tmp_path, monkeypatch):
    jinja2 = pytest.importorskip("jinja2")
    from docutils.core import publish_parts
    from matplotlib import pyplot as plt

    monkeypatch.chdir(tmp_path)
    (tmp_path / "results" / "evaluate" / "spectro").mkdir(parents=True)
    (tmp_path / "results" / "evaluate" / "spectro" / "metrics.json").write_text(json.dumps(METRICS))
    (tmp_path / "results" / "catalog").mkdir(parents=True)
    (tmp_path / "results" / "catalog" / "spectro.summary.json").write_text(json.dumps(SUMMARY))
    for name in ("kiel", "skymap"):
        fig = plt.figure(figsize=(1, 1))
        fig.savefig(tmp_path / "results" / "catalog" / f"spectro.{name}.png")
        plt.close(fig)
    (tmp_path / "config.yaml").write_text("predict: {label_units: {teff: K, fe_h: dex}}\n")
    assert main(["front-page", "--config", "config.yaml", "--label-set", "spectro", "--metrics", "results/evaluate/spectro/metrics.json",
                 "--summary", "results/catalog/spectro.summary.json",
                 "--figures", "results/catalog/spectro.kiel.png", "results/catalog/spectro.skymap.png",
                 "--out", "results/report/spectro.results.rst"]) == 0

    class Snakemake:
        config = {"results": "results", "label_sets": {"spectro": ["teff", "fe_h"]}, "seed": 42}

    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    rst = env.from_string(WORKFLOW_RST.read_text()).render(snakemake=Snakemake, categories={}, files=[])
    html = publish_parts(rst, writer_name="html", settings_overrides={"report_level": 2, "halt_level": 2})["html_body"]
    table, image, made = html.index("<table"), html.index('src="data:image/png;base64,'), html.index("How it was made")
    assert table < image < made  # the results first, the description after
    assert "111 K" in html and "baseline_mlp_single NMAD" in html and html.count("data:image/png;base64,") == 2
    assert os.path.exists("results/report/spectro.results.rst")
