"""Evaluation: metric definitions, and the CLI chain finetune → calibrate → evaluate on a tiny sky."""

import json

import numpy as np
import pytest
import torch
import yaml

from msa.cli import main
from msa.config import validate
from msa.data.features import xp_normalises
from msa.data.fit_scaler import fit_scaler
from msa.data.ingest import ingest_shard
from msa.data.layout import Layout
from msa.data.synthetic import synthetic_config, write_sky
from msa.evaluation.evaluate import bin_masks, point_metrics
from msa.nn.robust_stats import nmad
from msa.pretrain.stage import pretrain_segment

torch.set_num_threads(1)


def test_point_metrics_hand_computed():
    true = np.array([0.0, 0.0, 0.0, 0.0, 0.0, np.nan])
    pred = np.array([1.0, -1.0, 2.0, 0.0, 3.0, 5.0])
    m = point_metrics(pred, true)
    assert m["n"] == 5
    assert m["bias"] == 1.0  # median of (1, −1, 2, 0, 3)
    assert m["nmad"] == pytest.approx(1.4826 * 1.0)  # |Δ − 1| = 0, 2, 1, 1, 2 → median 1
    assert m["rmse"] == pytest.approx(np.sqrt(15 / 5))
    assert m["mae"] == pytest.approx(7 / 5)
    assert point_metrics(np.array([np.nan]), np.array([1.0]))["nmad"] is None


def test_bin_masks_cover_everything_once():
    values = np.array([-3.0, -2.0, -1.5, -1.0, 0.2])
    masks = bin_masks(values, [-2.0, -1.0], "fe_h")
    assert list(masks) == ["fe_h<-2", "-2<=fe_h<-1", "fe_h>=-1"]
    np.testing.assert_array_equal(np.sum(list(masks.values()), axis=0), 1)
    np.testing.assert_array_equal(masks["-2<=fe_h<-1"], [False, True, True, False, False])


def test_cli_finetune_calibrate_evaluate_writes_metrics(tmp_path):
    sky = write_sky(tmp_path / "sky", n_stars=900, n_shards=1, seed=2)
    cfg = synthetic_config(sky.out_dir, tmp_path / "results", seed=3)
    cfg["features"]["xp"] = {"bp": 4, "rp": 4, "normalise": "g_flux"}
    cfg["label_sets"] = {"spectro": ["teff", "fe_h", "parallax"]}  # parallax: the true one, from the catalogue
    cfg["pretrain"].update(epochs=1, epochs_per_job=1)
    cfg["finetune"].update(epochs=2, members=2)
    cfg["splits"] = {"train": 0.5, "validation": 0.1, "calibration": 0.2, "test": 0.2}
    cfg["evaluate"] = {"fe_h_bins": [-0.5, 0.0], "g_mag_bins": [14.0, 16.0]}
    cfg["calibrate"] = {"min_group_size": 30, "g_mag_bins": [13.0, 15.0, 17.0, 19.0]}
    config = validate(cfg)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    shard = tmp_path / "store" / "shard-s000.h5"
    surveys = {k: {**v, "path": v["path"].replace("{shard}", "s000")} for k, v in config["ingest"]["surveys"].items()}
    ingest_shard(sky.xp_paths[0], sky.source_paths[0], surveys, shard, config["ingest"]["source_columns"],
                 show_progress=False)
    scaler, meta = fit_scaler([shard], Layout.from_config(config["features"]), xp_normalises(config["features"]))
    scaler.save(tmp_path / "scaler.json", meta)
    pretrain_segment(config, [shard], tmp_path / "scaler.json", tmp_path / "pretrain", 0)

    common = ["--config", str(tmp_path / "config.yaml"), "--label-set", "spectro"]
    members = []
    for k in range(2):
        out = tmp_path / "finetune" / f"member-{k}"
        assert main(["finetune", *common, "--member", str(k), "--pretrained",
                     str(tmp_path / "pretrain" / "segment-0.pt"), "--shards", str(shard), "--scaler",
                     str(tmp_path / "scaler.json"), "--out-dir", str(out)]) == 0
        members.append(str(out / "model.pt"))
    seeds = [torch.load(m, weights_only=True)["seed"] for m in members]
    assert seeds == [3, 4]  # member k trains with seed + k
    cal_path = tmp_path / "calibration.json"
    assert main(["calibrate", *common, "--members", *members, "--shards", str(shard), "--out", str(cal_path)]) == 0
    cal = json.loads(cal_path.read_text())
    assert cal["labels"] == ["teff", "fe_h", "parallax"] and cal["coverage_target"] == 0.68
    for group in ("per_label", "per_label_without_xp"):  # stars with XP, and photometry only
        for name in cal["labels"]:
            entry = cal[group][name]
            assert entry["n_calibration"] > 100
            assert set(entry["coverage"]) == {"calibration", "test"}
            # on the calibration split itself, coverage is ≥ nominal by construction within each group
            # fitted on it; its few stars in groups that only faint copies filled may fall short
            assert entry["coverage"]["calibration"]["after"] >= 0.62
    for name in cal["labels"]:
        # the with-XP offsets come from stars with a spectrum only; photometry-only offsets from every star
        assert cal["per_label"][name]["n_calibration"] < cal["per_label_without_xp"][name]["n_calibration"]
    # every star of this sky is labelled, so real calibration stars populate every G bin: no copy may
    # override them, even where they are too few for offsets of their own (issue 28; copies are
    # exercised in test_calibration_surveys, where the faint bins hold no labelled star)
    assert cal["groups"] and all(g.startswith(("xp|", "no_xp|")) for g in cal["groups"])
    assert cal["emulated_groups"] == [] and set(cal["group_basis"].values()) == {"labelled"}
    assert all(cal["groups"][g]["per_label"][n]["n_calibration"] >= 30 for g in cal["groups"] for n in cal["labels"])
    assert cal["emulation"]["relation"]["xp_limit"] == pytest.approx(17.65, abs=0.1)

    scratch = tmp_path / "scratch" / "member-0"
    assert main(["finetune", *common, "--member", "0", "--from-scratch", "--shards", str(shard), "--scaler",
                 str(tmp_path / "scaler.json"), "--out-dir", str(scratch)]) == 0

    out_dir = tmp_path / "evaluate"
    assert main(["evaluate", *common, "--members", *members, "--calibration", str(cal_path),
                 "--shards", str(shard), "--out-dir", str(out_dir),
                 "--scratch-members", str(scratch / "model.pt")]) == 0
    metrics = json.loads((out_dir / "metrics.json").read_text())
    kinds = ("baseline", "baseline_mlp", "baseline_mlp_single", "from_scratch")
    yardsticks = [y + s for y in kinds for s in ("", "_no_xp")]
    for section in ("model", "model_no_xp", *yardsticks, "model_member_mean", "model_member_mean_no_xp",
                    "comparison"):
        assert set(metrics[section]) == {"teff", "fe_h", "parallax"}, section
    for tag in ("with_xp", "no_xp"):
        entry = metrics["comparison"]["teff"][tag]
        best = min(kinds, key=lambda y: entry[f"nmad_{y}"])
        assert entry["best_yardstick"] == best
        assert entry["ratio_to_best"] == pytest.approx(entry["nmad_model"] / entry[f"nmad_{best}"])
        assert entry["ratio_to_member_mean"] == pytest.approx(entry["nmad_model"] / entry["nmad_member_mean"])
        # the MLP yardstick is an ensemble of as many networks as the model has members, seeded as they are
        assert metrics["baseline_mlp_seeds"][tag] == seeds
    # the MLP was chosen on the validation split from the configured grid
    assert metrics["baseline_mlp_settings"]["with_xp"]["loss"] in ("l1", "mse")
    for suffix in ("", "_no_xp"):
        assert metrics["baseline_mlp" + suffix]["teff"]["overall"]["nmad"] != \
            metrics["baseline_mlp_single" + suffix]["teff"]["overall"]["nmad"]
        # each member of the model alone, beside the mixture, and their mean
        each = metrics["model_members" + suffix]
        assert len(each) == 2 and all(set(m) == {"teff", "fe_h", "parallax"} for m in each)
        nmads = [m["fe_h"]["overall"]["nmad"] for m in each]
        assert nmads[0] != nmads[1] != metrics["model" + suffix]["fe_h"]["overall"]["nmad"]
        assert metrics["model_member_mean" + suffix]["fe_h"]["overall"]["nmad"] == pytest.approx(np.mean(nmads))
        # the trees' count was chosen on validation among the 300 grown
        assert all(1 <= n <= 300 for n in metrics["baseline_trees"]["with_xp" if not suffix else "no_xp"].values())
    # the from-scratch members are other networks than the pretrained ones
    assert metrics["from_scratch"]["teff"]["overall"]["nmad"] != metrics["model"]["teff"]["overall"]["nmad"]
    overall = metrics["model"]["fe_h"]["overall"]
    assert {"n", "rmse", "mae", "nmad", "bias", "coverage_before", "coverage"} <= set(overall)
    assert overall["n"] == metrics["n_test"] > 100
    assert set(metrics["model"]["teff"]["fe_h_bins"]) == {"fe_h<-0.5", "-0.5<=fe_h<0", "fe_h>=0"}
    assert set(metrics["model"]["teff"]["g_mag_bins"]) == {"G<14", "14<=G<16", "G>=16"}
    assert sum(b["n"] for b in metrics["model"]["teff"]["g_mag_bins"].values()) == overall["n"]
    # photometry only is a different prediction from XP on
    assert metrics["model_no_xp"]["teff"]["overall"]["rmse"] != metrics["model"]["teff"]["overall"]["rmse"]
    by_g = metrics["by_g_mag"]
    for view in ("with_xp", "without_xp"):
        assert sum(b["n"] for b in by_g["test"][view]["teff"].values()) == overall["n"]
    # by interval basis: every test star once per view (with XP: those that have it)
    by_basis = by_g["by_basis"]
    assert set(by_basis["with_xp"]) == set(by_basis["without_xp"]) == {"labelled", "survey", "emulated", "extrapolated"}
    counts = {view: sum(b["n"] for kind in by_basis[view].values() for b in kind["teff"].values())
              for view in by_basis}
    assert counts["without_xp"] == overall["n"] and 0 < counts["with_xp"] < overall["n"]
    assert sum(b["n"] for b in by_basis["with_xp"]["labelled"]["teff"].values()) > 0
    assert by_g["emulated"]["n_copies"] > overall["n"]  # a copy per fainter G bin
    faint = by_g["emulated"]["without_xp"]["fe_h"]["19<=G<20"]
    assert faint["n"] > 0 and 0 <= faint["coverage"] <= 1 and faint["nmad"] > 0
    for png in ("predicted_vs_true.png", "residuals_vs_g.png", "coverage.png", "coverage_vs_g.png",
                "coverage_vs_g_by_basis.png"):
        assert (out_dir / png).stat().st_size > 1000


def test_nmad_ignores_nan_and_works_along_an_axis():
    d = np.array([[0.0, 1.0, 2.0, 3.0, 100.0], [np.nan, 1.0, 2.0, 3.0, np.nan]])
    # row 0: median 2, |d − 2| = 2, 1, 0, 1, 98 → median 1; row 1: median 2, |d − 2| = 1, 0, 1 → 1
    assert nmad(d, axis=1) == pytest.approx([1.4826, 1.4826])
    assert nmad(d[1]) == pytest.approx(1.4826)
