"""Calibration surveys, one basis per group, interval_basis and an exact in_training_sample (issue 28)."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from msa.calibration.basis import interval_basis, merge_group_bases
from msa.cli import main
from msa.config import validate
from msa.data.features import xp_normalises
from msa.data.fit_scaler import fit_scaler
from msa.data.ingest import ingest_shard
from msa.data.labels import sample_hash
from msa.data.layout import Layout
from msa.data.splits import assign_splits
from msa.data.synthetic import survey_config, synthetic_config, write_faint_survey, write_sky
from msa.pretrain.stage import pretrain_segment

torch.set_num_threads(1)

OFFSETS = {"teff": {"offset_lower": 1.0, "offset_upper": 1.0}}


def entry(level):
    return {"level": level, "per_label": OFFSETS}


def test_a_lower_basis_never_overrides_a_higher_one_along_a_chain():
    # real stars populate 16 <= G < 17 too, too few for offsets of its own: they keep the real coarse ones
    labelled = ({"xp|14<=G<15": entry("g_mag")}, {"xp|14<=G<15", "xp|16<=G<17"})
    survey = ({"xp|15<=G<16": entry("g_mag"), "xp|14<=G<15": entry("g_mag"), "xp|16<=G<17": entry("g_mag")},
              {"xp|14<=G<15", "xp|15<=G<16", "xp|16<=G<17"})
    copies = ({"xp|14<=G<15|G+BP": entry("g_mag_bands"), "xp|15<=G<16|G+BP": entry("g_mag_bands"),
               "xp|16<=G<17": entry("g_mag"), "xp|18<=G<19": entry("g_mag"),
               "xp|18<=G<19|G+BP": entry("g_mag_bands")}, set())
    groups, basis = merge_group_bases([("labelled", *labelled), ("survey", *survey), ("emulated", *copies)])
    assert basis == {"xp|14<=G<15": "labelled", "xp|15<=G<16": "survey", "xp|18<=G<19": "emulated",
                     "xp|18<=G<19|G+BP": "emulated"}
    assert set(groups) == set(basis)


def test_interval_basis_names_each_stars_offsets_and_extrapolation():
    calibration = {"group_basis": {"xp|15<=G<16": "survey", "no_xp|18<=G<19": "emulated", "xp|12<=G<13": "labelled"},
                   "labelled_g_mag_range": {"xp": [9.0, 15.0], "no_xp": [9.0, 15.0]}}
    groups = np.array(["xp|15<=G<16", "no_xp|18<=G<19", "xp|12<=G<13", "xp", "xp", "no_xp", "no_xp"], dtype=object)
    g = np.array([15.5, 18.5, 12.5, 14.9, 16.2, 9.5, np.nan])
    np.testing.assert_array_equal(interval_basis(calibration, groups, g),
                                  ["survey", "emulated", "labelled", "labelled", "extrapolated", "labelled",
                                   "extrapolated"])
    assert list(interval_basis(None, groups[:2], g[:2])) == ["", ""]
    # a calibration written before bases: its emulated groups, and the coarse groups up to its faintest star
    old = {"emulated_groups": ["no_xp|18<=G<19"], "calibration_g_mag_max": 15.0}
    assert list(interval_basis(old, groups[1:5], g[1:5])) == ["emulated", "labelled", "labelled", "extrapolated"]


def test_faint_survey_holds_the_asked_fraction_of_its_g_range(tmp_path):
    sky = write_sky(tmp_path / "sky", n_stars=3000, n_shards=1, seed=5)
    path = write_faint_survey(sky.out_dir, 0.2, 15.0, 18.0, seed=5)
    survey = pd.read_csv(path)
    g = pd.read_csv(sky.source_paths[0], usecols=["source_id", "phot_g_mean_mag"]).set_index("source_id")
    g_survey = g.loc[survey["source_id"], "phot_g_mean_mag"].to_numpy()
    assert ((g_survey >= 15) & (g_survey < 18)).all()
    n_range = int(((g["phot_g_mean_mag"] >= 15) & (g["phot_g_mean_mag"] < 18)).sum())
    assert abs(len(survey) - 0.2 * n_range) < 4 * np.sqrt(0.2 * 0.8 * n_range)
    truth = pd.read_csv(sky.labels_path).set_index("source_id").loc[survey["source_id"]]
    np.testing.assert_allclose(survey["teff"].to_numpy(), truth["teff"].to_numpy())
    assert main(["synthesize", "--out", str(tmp_path / "cli"), "--n-stars", "500", "--faint-survey", "0.1",
                 "--write-config", str(tmp_path / "cli.yaml")]) == 0
    cfg = validate(yaml.safe_load((tmp_path / "cli.yaml").read_text()))
    assert cfg["calibrate"]["surveys"]["faint"]["catalogue"].endswith("faint_survey_labels.csv")


@pytest.fixture(scope="module")
def faint_run(tmp_path_factory):
    """A tiny sky: labels for G < 15 only, a faint survey of half the stars at 15 <= G < 18,
    fine-tuned members and a calibration with that survey (copies on)."""
    tmp = tmp_path_factory.mktemp("faint")
    sky = write_sky(tmp / "sky", n_stars=1500, n_shards=1, seed=2)
    g = pd.read_csv(sky.source_paths[0], usecols=["source_id", "phot_g_mean_mag"])
    labels = pd.read_csv(sky.labels_path)
    bright = labels[labels["source_id"].isin(g.loc[g["phot_g_mean_mag"] < 15, "source_id"])]
    bright.to_csv(tmp / "bright.csv", index=False)
    survey = write_faint_survey(sky.out_dir, 0.5, 15.0, 18.0, seed=2)
    cfg = synthetic_config(sky.out_dir, tmp / "results", seed=3)
    cfg["labels"]["catalogue"] = str(tmp / "bright.csv")
    cfg["features"]["xp"] = {"bp": 4, "rp": 4, "normalise": "g_flux"}
    cfg["label_sets"] = {"spectro": ["teff", "fe_h"]}
    cfg["pretrain"].update(epochs=1, epochs_per_job=1)
    cfg["finetune"].update(epochs=1, members=1, max_validation_rows=20)
    cfg["splits"] = {"train": 0.5, "validation": 0.1, "calibration": 0.3, "test": 0.1}
    cfg["calibrate"] = {"min_group_size": 20, "g_mag_bins": [13.0, 15.0, 16.0, 17.0, 18.0, 19.0], "max_rows": 100,
                        "surveys": survey_config(survey)}
    config = validate(cfg)
    (tmp / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    shard = tmp / "store" / "shard-s000.h5"
    surveys = {k: {**v, "path": v["path"].replace("{shard}", "s000")} for k, v in config["ingest"]["surveys"].items()}
    ingest_shard(sky.xp_paths[0], sky.source_paths[0], surveys, shard, config["ingest"]["source_columns"],
                 show_progress=False)
    scaler, meta = fit_scaler([shard], Layout.from_config(config["features"]), xp_normalises(config["features"]))
    scaler.save(tmp / "scaler.json", meta)
    pretrain_segment(config, [shard], tmp / "scaler.json", tmp / "pretrain", 0)
    common = ["--config", str(tmp / "config.yaml"), "--label-set", "spectro"]
    member = tmp / "member-0"
    assert main(["finetune", *common, "--member", "0", "--pretrained", str(tmp / "pretrain" / "segment-0.pt"),
                 "--shards", str(shard), "--scaler", str(tmp / "scaler.json"), "--out-dir", str(member)]) == 0
    cal_path = tmp / "calibration.json"
    assert main(["calibrate", *common, "--members", str(member / "model.pt"), "--shards", str(shard), "--out",
                 str(cal_path)]) == 0
    out = tmp / "predictions.parquet"
    assert main(["predict", *common, "--members", str(member / "model.pt"), "--calibration", str(cal_path),
                 "--shard", str(shard), "--out", str(out), "--device", "cpu"]) == 0
    return {"config": config, "calibration": json.loads(cal_path.read_text()), "frame": pd.read_parquet(out),
            "g": g.set_index("source_id")["phot_g_mean_mag"], "bright": bright, "survey": pd.read_csv(survey),
            "out": out}


def test_survey_stars_calibrate_the_faint_groups_and_copies_only_the_rest(faint_run):
    cal = faint_run["calibration"]
    basis = cal["group_basis"]
    assert set(basis) == set(cal["groups"]) and set(basis.values()) == {"labelled", "survey", "emulated"}
    assert cal["surveys"]["faint"] == 100  # its calibrate.max_rows sample (no survey star is a labelled one)
    for group, kind in basis.items():
        g_bin = group.split("|")[1]
        if kind == "survey":
            assert g_bin in {"15<=G<16", "16<=G<17", "17<=G<18"}
        if kind == "labelled":
            assert g_bin in {"G<13", "13<=G<15"}
        if kind == "emulated":  # copies only where neither real nor survey stars gave the G bin offsets
            g_bin_group = group if group.count("|") == 1 else group.rsplit("|", 1)[0]
            assert basis.get(g_bin_group) == "emulated"
    assert any(basis[g] == "emulated" and "G>=19" in g for g in basis)
    assert cal["survey_groups"] == sorted(g for g, b in basis.items() if b == "survey")


def test_every_prediction_names_its_basis(faint_run):
    frame, g = faint_run["frame"], faint_run["g"]
    g_star = g.loc[frame["source_id"]].to_numpy()
    basis = frame["interval_basis"].to_numpy()
    assert set(basis) <= {"labelled", "survey", "emulated", "extrapolated"}
    assert not np.isin(basis[g_star >= 18], ["labelled", "survey"]).any()
    assert (basis[(g_star >= 15.2) & (g_star < 17.8)] == "survey").mean() > 0.5
    assert (basis[g_star < 14.8] == "labelled").all()
    survey_group = np.isin(frame["calibration_group"], faint_run["calibration"]["survey_groups"])
    np.testing.assert_array_equal(survey_group, basis == "survey")
    import pyarrow.parquet as pq
    meta = {k.decode(): v.decode() for k, v in pq.read_schema(faint_run["out"]).metadata.items()}
    assert "'survey'" in meta["calibration_guarantee"] and "'extrapolated'" in meta["calibration_guarantee"]


def test_in_training_sample_is_the_stars_a_fit_read(faint_run):
    config, frame = faint_run["config"], faint_run["frame"]
    ids = frame["source_id"].to_numpy()
    split = assign_splits(ids, config["splits"], 3)
    h = sample_hash(ids, 3)
    labelled = np.isin(ids, faint_run["bright"]["source_id"])
    expected = labelled & (split == "train")
    for name, cap in (("validation", 20), ("calibration", 100)):  # the smallest sample hashes of each split
        mine = labelled & (split == name)
        assert mine.sum() > cap  # the samples are bounded here, so the flag must not be the whole split
        expected |= mine & (h <= np.sort(h[mine])[cap - 1])
    in_survey = np.isin(ids, faint_run["survey"]["source_id"]) & ~labelled  # survey: every star, below max_rows
    survey_cap = config["calibrate"]["max_rows"]
    expected |= in_survey & (h <= np.sort(h[in_survey])[survey_cap - 1])
    np.testing.assert_array_equal(frame["in_training_sample"].to_numpy(), expected)
    assert frame["in_training_sample"].sum() < (labelled & (split != "test")).sum() + in_survey.sum()
