"""msa predict: shard or user table → Parquet, exact source_ids, ordered quantiles, model identity."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from astropy.table import Table

from msa.calibration.calibrate import apply_calibration
from msa.calibration.support import SupportIndex, index_latents
from msa.calibration.ensemble import Ensemble, combine_members
from msa.catalogue.predict import PredictionError, predict_shard, predict_table
from msa.cli import main
from msa.data.layout import GROUP_ORDER
from msa.data.parquet_stream import OutputCheckError, verify_source_ids
from msa.data.star_sources import SourceError, strictly_increasing_ids
from msa.data.store import write_shard
from msa.data.tables import TableError
from msa.nn.checkpoint import file_sha256
from test_ensemble import FEATURES_CFG, LABELS, small_layout, unit_scaler, write_member

torch.set_num_threads(1)

N_STARS, N_NO_XP, N_ONLY_G = 300, 40, 7
CALIBRATION = {"coverage_target": 0.68, "mode": "per_side", "labels": LABELS,
               "per_label": {"teff": {"offset_lower": 50.0, "offset_upper": 80.0, "n_calibration": 100},
                             "logg": {"offset_lower": 0.1, "offset_upper": 0.1, "n_calibration": 100},
                             "parallax": {"offset_lower": 0.0, "offset_upper": 0.05, "n_calibration": 100}},
               # photometry-only stars have offsets of their own
               "per_label_without_xp": {
                   "teff": {"offset_lower": 150.0, "offset_upper": 200.0, "n_calibration": 100},
                   "logg": {"offset_lower": 0.3, "offset_upper": 0.3, "n_calibration": 100},
                   "parallax": {"offset_lower": 0.1, "offset_upper": 0.1, "n_calibration": 100}}}


def star_columns(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Store columns of ``n`` stars: ids above 2**53 (adjacent odd values a float64 would merge),
    some stars without XP, a few with only a G magnitude."""
    rng = np.random.default_rng(seed)
    cols = {"source_id": (2**60 + 1 + 2 * np.arange(n)).astype(np.int64)}
    for band in ("bp", "rp"):
        for i in range(1, 4):
            cols[f"{band}_{i}"] = rng.normal(size=n).astype(np.float32)
            cols[f"{band}e_{i}"] = rng.uniform(0.01, 0.1, n).astype(np.float32)
    cols["phot_g_mean_mag"] = rng.uniform(10, 17, n).astype(np.float32)
    cols["phot_bp_mean_mag"] = (cols["phot_g_mean_mag"] + rng.uniform(0, 1, n)).astype(np.float32)
    cols["phot_rp_mean_mag"] = (cols["phot_g_mean_mag"] - rng.uniform(0, 1, n)).astype(np.float32)
    cols["parallax"] = rng.uniform(0.1, 3, n).astype(np.float32)
    cols["parallax_error"] = rng.uniform(0.01, 0.1, n).astype(np.float32)
    no_xp = np.arange(N_NO_XP) * 3 + 1  # spread through the shard, across chunk boundaries
    for name in list(cols):
        if name[:3] in ("bp_", "rp_", "bpe", "rpe"):
            cols[name][no_xp] = np.nan
    only_g = np.arange(N_ONLY_G) * 11 + 2
    only_g = only_g[~np.isin(only_g, no_xp)]
    for name in cols:
        if name not in ("source_id", "phot_g_mean_mag"):
            cols[name][only_g] = np.nan
    return cols


@pytest.fixture()
def setup(tmp_path):
    layout = small_layout()
    scaler = unit_scaler(layout)
    members = [write_member(tmp_path / f"member-{k}.pt", layout, scaler, seed=k,
                            label_centre=[4800.0, 2.5, 1.0], label_scale=[700.0, 1.0, 0.4]) for k in range(2)]
    cols = star_columns(N_STARS)
    shard = tmp_path / "shard-0000.h5"
    write_shard(shard, cols)
    return {"members": members, "ensemble": Ensemble.load(members), "cols": cols, "shard": shard}


def run_shard(setup, out, **kwargs):
    opts = dict(chunk_rows=37, batch_size=16, min_inputs=3, calibration=CALIBRATION)
    opts.update(kwargs)
    calibration = opts.pop("calibration")
    return predict_shard(setup["shard"], setup["ensemble"], calibration, out, **opts)


def expected_quantiles(ensemble, cols, has_xp, calibration=CALIBRATION):
    x, _ = ensemble.transform(cols)
    q = combine_members(ensemble.predict_members(x))
    return apply_calibration(q, calibration, ensemble.labels, has_xp)


def quantile_array(frame: pd.DataFrame, labels=LABELS) -> np.ndarray:
    return np.stack([frame[[f"{l}_q16", f"{l}_q50", f"{l}_q84"]].to_numpy() for l in labels], axis=1)


def test_source_ids_round_trip_exactly_and_in_order(setup, tmp_path):
    out = tmp_path / "pred.parquet"
    summary = run_shard(setup, out)
    table = pq.read_table(out)
    assert table.schema.field("source_id").type == "int64"
    ids = table.column("source_id").to_numpy()
    np.testing.assert_array_equal(ids, setup["cols"]["source_id"])  # values > 2**53, none merged
    assert len(np.unique(ids)) == N_STARS and summary.n_rows == N_STARS
    # one row group per chunk
    assert pq.ParquetFile(out).num_row_groups == int(np.ceil(N_STARS / 37))
    assert not list(tmp_path.glob(".pred.parquet.*"))  # no temporary left behind


def test_positions_are_copied_from_the_store_in_float64(tmp_path, setup):
    cols = dict(setup["cols"])
    rng = np.random.default_rng(5)
    # values whose float32 rounding (~1e-5 deg at ra ~ 300) would show
    cols["ra"] = rng.uniform(0, 360, N_STARS) + 1e-9
    cols["dec"] = rng.uniform(-90, 90, N_STARS)
    shard = tmp_path / "with-positions.h5"
    write_shard(shard, cols)
    out = tmp_path / "pred.parquet"
    predict_shard(shard, setup["ensemble"], CALIBRATION, out, chunk_rows=37, batch_size=16, min_inputs=3)
    table = pq.read_table(out)
    assert table.schema.field("ra").type == "double" and table.schema.field("dec").metadata[b"unit"] == b"deg"
    np.testing.assert_array_equal(table.column("ra").to_numpy(), cols["ra"])
    np.testing.assert_array_equal(table.column("dec").to_numpy(), cols["dec"])
    # a shard without positions gives a file without them (the catalogue then asks for them)
    run_shard(setup, tmp_path / "no-positions.parquet")
    assert "ra" not in pq.read_schema(tmp_path / "no-positions.parquet").names


def test_predictions_are_the_calibrated_ensemble_and_ordered(setup, tmp_path):
    out = tmp_path / "pred.parquet"
    run_shard(setup, out)
    frame = pd.read_parquet(out)
    q = quantile_array(frame)
    flagged = frame["flag_too_few_inputs"].to_numpy()
    has_xp = frame["has_xp"].to_numpy()
    expected = expected_quantiles(setup["ensemble"], setup["cols"], has_xp)
    np.testing.assert_allclose(q[~flagged], expected[~flagged], rtol=1e-5, atol=1e-4)
    assert np.all(q[~flagged, :, 0] <= q[~flagged, :, 1]) and np.all(q[~flagged, :, 1] <= q[~flagged, :, 2])
    # the calibration widened the teff interval by its group's offset (relative to the raw ensemble)
    raw = combine_members(setup["ensemble"].predict_members(setup["ensemble"].transform(setup["cols"])[0]))
    with_xp, without_xp = ~flagged & has_xp, ~flagged & ~has_xp
    assert with_xp.any() and without_xp.any()
    np.testing.assert_allclose((q[with_xp, 0, 2] - raw[with_xp, 0, 2]), 80.0, atol=1e-2)
    np.testing.assert_allclose((q[without_xp, 0, 2] - raw[without_xp, 0, 2]), 200.0, atol=1e-2)


def test_support_compares_the_first_members_latent_in_each_stars_view(setup, tmp_path):
    ensemble = setup["ensemble"]
    x, _ = ensemble.transform(setup["cols"])
    thresholds = {"xp": 0.3, "no_xp": 0.05}
    index = SupportIndex.build(index_latents(ensemble, x[:100], 1000, 0, 64), k=5, max_rows=1000, low_threshold=thresholds,
                               member_sha256=ensemble.checksums, seed=0)
    out = tmp_path / "pred.parquet"
    run_shard(setup, out, support=index)
    frame = pd.read_parquet(out)
    flagged, has_xp = frame["flag_too_few_inputs"].to_numpy(), frame["has_xp"].to_numpy()
    assert has_xp.any() and (~has_xp & ~flagged).any()
    _, latent = ensemble.predict_members(x, return_latent=True)
    expected = index.support(latent, has_xp)
    np.testing.assert_allclose(frame["support"].to_numpy()[~flagged], expected[~flagged], rtol=1e-5)
    # no prediction, nothing to support; the flag is the threshold of the support
    assert frame["support"][flagged].isna().all()
    threshold = np.where(has_xp, thresholds["xp"], thresholds["no_xp"])
    np.testing.assert_array_equal(frame["low_support"].to_numpy(), ~flagged & (expected < threshold))
    # without an index: NaN and never flagged
    run_shard(setup, tmp_path / "none.parquet")
    plain = pd.read_parquet(tmp_path / "none.parquet")
    assert plain["support"].isna().all() and not plain["low_support"].any()


def test_stars_without_xp_and_with_too_few_inputs(setup, tmp_path):
    out = tmp_path / "pred.parquet"
    summary = run_shard(setup, out)
    frame = pd.read_parquet(out)
    cols = setup["cols"]
    xp_present = np.isfinite(cols["bp_1"])
    np.testing.assert_array_equal(frame["has_xp"].to_numpy(), xp_present)
    # n_inputs: 12 XP coefficients (6 values; errors are not inputs) -> 6, + 3 Gaia mags + parallax
    expected_n = 6 * xp_present + sum(np.isfinite(cols[c]) for c in
                                      ("phot_g_mean_mag", "phot_bp_mean_mag", "phot_rp_mean_mag", "parallax"))
    np.testing.assert_array_equal(frame["n_inputs"].to_numpy(), expected_n)
    flagged = frame["flag_too_few_inputs"].to_numpy()
    np.testing.assert_array_equal(flagged, expected_n < 3)
    assert summary.n_flagged == int(np.sum(expected_n < 3)) > 0
    assert summary.n_without_xp == int(np.sum(~xp_present))
    q = quantile_array(frame)
    assert np.all(np.isnan(q[flagged]))
    # stars without XP but with photometry are predicted, with finite ordered quantiles
    no_xp_ok = ~xp_present & ~flagged
    assert no_xp_ok.sum() > 20 and np.all(np.isfinite(q[no_xp_ok]))


def test_user_table_gives_the_same_numbers_as_the_store(setup, tmp_path):
    store_out = tmp_path / "store.parquet"
    run_shard(setup, store_out)
    from_store = pd.read_parquet(store_out).set_index("source_id")
    order = np.random.default_rng(3).permutation(N_STARS)  # a user's table is in any order
    frame = pd.DataFrame({k: v[order] for k, v in setup["cols"].items()})
    frame["unused_column"] = "x"
    paths = {"csv": tmp_path / "mine.csv", "parquet": tmp_path / "mine.parquet", "fits": tmp_path / "mine.fits",
             "values_only": tmp_path / "values_only.csv"}
    frame.to_csv(paths["csv"], index=False)
    # prediction reads values only: a table without any error column is complete
    frame.drop(columns=[c for c in frame if c[:4] in ("bpe_", "rpe_") or c.endswith("_error")]).to_csv(
        paths["values_only"], index=False)
    frame.to_parquet(paths["parquet"], index=False)
    Table.from_pandas(frame.drop(columns="unused_column")).write(paths["fits"])
    for kind, path in paths.items():
        out = tmp_path / f"from_{kind}.parquet"
        predict_table(path, setup["ensemble"], CALIBRATION, out, chunk_rows=50, batch_size=32, min_inputs=3)
        got = pd.read_parquet(out)
        np.testing.assert_array_equal(got["source_id"].to_numpy(), frame["source_id"].to_numpy())  # table order
        ref = from_store.loc[got["source_id"]]
        np.testing.assert_allclose(quantile_array(got), quantile_array(ref), rtol=1e-6, atol=1e-5, err_msg=kind)
        for c in ("has_xp", "n_inputs", "flag_too_few_inputs"):
            np.testing.assert_array_equal(got[c].to_numpy(), ref[c].to_numpy(), err_msg=f"{kind} {c}")


def test_table_problems_are_refused_without_output(setup, tmp_path):
    frame = pd.DataFrame({k: v[:20] for k, v in setup["cols"].items()})
    dup = pd.concat([frame, frame.iloc[:1]])
    dup.to_csv(tmp_path / "dup.csv", index=False)
    out = tmp_path / "out.parquet"
    with pytest.raises(TableError, match="more than once"):
        predict_table(tmp_path / "dup.csv", setup["ensemble"], None, out, chunk_rows=8, batch_size=8, min_inputs=3)
    frame.drop(columns=["parallax", "rp_2"]).to_csv(tmp_path / "short.csv", index=False)
    with pytest.raises(TableError, match=r"lacks column\(s\) \['rp_2', 'parallax'\]"):
        predict_table(tmp_path / "short.csv", setup["ensemble"], None, out, chunk_rows=8, batch_size=8, min_inputs=3)
    assert not out.exists()
    # allowed: absent columns become missing values for every star
    predict_table(tmp_path / "short.csv", setup["ensemble"], None, out, chunk_rows=8, batch_size=8, min_inputs=3,
                  allow_missing=True)
    assert pd.read_parquet(out)["n_inputs"].max() == 5 + 3


def test_source_id_checks_refuse_mismatches(tmp_path):
    import pyarrow as pa

    path = tmp_path / "ids.parquet"
    pq.write_table(pa.table({"source_id": np.array([5, 7, 9], dtype=np.int64)}), path)
    verify_source_ids(path, [np.array([5]), np.array([7, 9])], "x")
    with pytest.raises(OutputCheckError, match="row 1 has source_id 7"):
        verify_source_ids(path, [np.array([5, 8, 9])], "x")
    with pytest.raises(OutputCheckError, match="fewer rows"):
        verify_source_ids(path, [np.array([5, 7, 9, 11])], "x")
    with pytest.raises(OutputCheckError, match="more rows"):
        verify_source_ids(path, [np.array([5, 7])], "x")
    with pytest.raises(SourceError, match="strictly increasing"):
        list(strictly_increasing_ids([np.array([1, 2]), np.array([2, 3])], "shard.h5"))


def write_config(tmp_path, **predict) -> str:
    config = {"features": {**FEATURES_CFG, "reconstruct": list(GROUP_ORDER)},
              "label_sets": {"spectro": LABELS}, "predict": {"chunk_rows": 64, "batch_size": 32, **predict}}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return str(path)


def test_cli_writes_metadata_that_identifies_the_model(setup, tmp_path):
    calibration = tmp_path / "calibration.json"
    calibration.write_text(json.dumps(CALIBRATION))
    out = tmp_path / "predict" / "shard-0000.parquet"
    rc = main(["predict", "--config", write_config(tmp_path, save_latent=True), "--label-set", "spectro",
               "--members", *map(str, setup["members"]), "--calibration", str(calibration),
               "--shard", str(setup["shard"]), "--out", str(out), "--device", "cpu"])
    assert rc == 0
    meta = {k.decode(): v.decode() for k, v in pq.read_schema(out).metadata.items()}
    assert json.loads(meta["member_sha256"]) == [file_sha256(p) for p in setup["members"]]
    assert meta["calibration_sha256"] == file_sha256(calibration)
    assert meta["label_set"] == "spectro" and json.loads(meta["labels"]) == LABELS
    assert json.loads(meta["units"])["teff"] == "K"
    assert meta["input_file"] == str(setup["shard"]) and meta["msa_version"]
    assert len(meta["config_hash"]) == 16
    frame = pd.read_parquet(out)
    latent = frame[[c for c in frame.columns if c.startswith("latent_")]].to_numpy()
    assert latent.shape == (N_STARS, setup["ensemble"].latent_dim)
    assert np.all(np.isfinite(latent[~frame["flag_too_few_inputs"].to_numpy()]))
    np.testing.assert_allclose(quantile_array(frame)[~frame["flag_too_few_inputs"].to_numpy()],
                               expected_quantiles(setup["ensemble"], setup["cols"], frame["has_xp"].to_numpy())
                               [~frame["flag_too_few_inputs"].to_numpy()], rtol=1e-5, atol=1e-4)


def test_cli_refuses_members_of_another_label_set(setup, tmp_path, capsys):
    calibration = tmp_path / "calibration.json"
    calibration.write_text(json.dumps(CALIBRATION))
    config = yaml.safe_load(open(write_config(tmp_path)))
    config["label_sets"]["spectro"] = ["teff", "logg"]
    (tmp_path / "other.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    rc = main(["predict", "--config", str(tmp_path / "other.yaml"), "--label-set", "spectro",
               "--members", str(setup["members"][0]), "--calibration", str(calibration),
               "--shard", str(setup["shard"]), "--out", str(tmp_path / "x.parquet")])
    assert rc == 2 and "msa predict: error: label_sets.spectro is ['teff', 'logg']" in capsys.readouterr().err
    with pytest.raises(PredictionError, match="trained for"):  # --debug: the exception itself
        main(["--debug", "predict", "--config", str(tmp_path / "other.yaml"), "--label-set", "spectro",
              "--members", str(setup["members"][0]), "--calibration", str(calibration),
              "--shard", str(setup["shard"]), "--out", str(tmp_path / "x.parquet")])


def predict_cli(setup, tmp_path) -> list[str]:
    """`msa predict` up to the input and output options, with a calibration file written."""
    calibration = tmp_path / "calibration.json"
    calibration.write_text(json.dumps(CALIBRATION))
    return ["predict", "--config", write_config(tmp_path), "--label-set", "spectro", "--members",
            *map(str, setup["members"]), "--calibration", str(calibration), "--device", "cpu"]


def test_several_shards_in_one_call_give_the_files_of_single_calls(setup, tmp_path):
    command = predict_cli(setup, tmp_path)
    shards = [setup["shard"], tmp_path / "shard-0001.h5"]
    write_shard(shards[1], star_columns(120, seed=3))
    for shard in shards:
        assert main([*command, "--shard", str(shard), "--out", str(tmp_path / "single" / f"{shard.stem}.parquet")]) == 0
    listed = tmp_path / "batch.txt"  # as the workflow passes long lists
    listed.write_text("".join(f"{shard}\n" for shard in shards))
    batch = tmp_path / "predict" / "batch-0000"
    assert main([*command, "--shards", f"@{listed}", "--out-dir", str(batch)]) == 0
    assert sorted(p.name for p in batch.iterdir()) == ["shard-0000.parquet", "shard-0001.parquet"]
    for shard in shards:
        single, batched = (pq.read_table(folder / f"{shard.stem}.parquet") for folder in (tmp_path / "single", batch))
        pd.testing.assert_frame_equal(batched.to_pandas(), single.to_pandas())  # NaN rows included
        assert batched.schema.metadata[b"input_file"] == str(shard).encode()
    assert [p.name for p in batch.parent.iterdir()] == ["batch-0000"]  # no temporary left beside it


def test_a_failing_shard_leaves_the_previous_folder_whole(setup, tmp_path, capsys):
    command = predict_cli(setup, tmp_path)
    batch = tmp_path / "predict" / "batch-0000"
    earlier = tmp_path / "earlier" / "shard-0000.h5"  # other stars: a rewrite of the file would show
    write_shard(earlier, star_columns(120, seed=4))
    assert main([*command, "--shards", str(earlier), "--out-dir", str(batch)]) == 0
    before = (batch / "shard-0000.parquet").read_bytes()
    broken = tmp_path / "shard-0001.h5"
    write_shard(broken, {k: v for k, v in star_columns(120).items() if k != "bp_1"})
    assert main([*command, "--shards", str(setup["shard"]), str(broken), "--out-dir", str(batch)]) == 2
    assert "shard-0001.h5 lacks column(s) ['bp_1']" in capsys.readouterr().err
    assert [p.name for p in batch.iterdir()] == ["shard-0000.parquet"]
    assert (batch / "shard-0000.parquet").read_bytes() == before
    assert [p.name for p in batch.parent.iterdir()] == ["batch-0000"]
    fresh = tmp_path / "predict" / "batch-0001"  # no previous folder: none after a failure
    assert main([*command, "--shards", str(setup["shard"]), str(broken), "--out-dir", str(fresh)]) == 2
    assert not fresh.exists()


@pytest.mark.parametrize("arguments, message", [
    (["--shards", "shard-0000.h5", "--out", "x.parquet"], "give --out-dir FOLDER"),
    (["--shards", "shard-0000.h5", "--out-dir", "."], "holds the input"),
    (["--shards", "shard-0000.h5", "other/shard-0000.h5", "--out-dir", "batch"], "given by more than one shard"),
    (["--shards", "shard-0000.h5", "absent.h5", "--out-dir", "batch"], "1 shard(s) not found, e.g. absent.h5"),
    (["--shard", "shard-0000.h5", "--out-dir", "batch"], "give --out FILE"),
], ids=["out-file", "folder-of-an-input", "same-name-twice", "absent-shard", "out-dir-for-one-shard"])
def test_several_shards_refuse_outputs_that_would_lose_data(setup, tmp_path, capsys, monkeypatch, arguments,
                                                            message):
    command = predict_cli(setup, tmp_path)
    (tmp_path / "other").mkdir()
    write_shard(tmp_path / "other" / "shard-0000.h5", star_columns(120))
    monkeypatch.chdir(tmp_path)
    assert main([*command, *arguments]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "batch").exists() and not list(tmp_path.glob("*.parquet"))

def test_force_masked_xp_counts_as_predicted_without_xp(setup, tmp_path):
    layout = small_layout()
    members = [write_member(tmp_path / f"photometry-{k}.pt", layout, unit_scaler(layout), seed=k,
                            force_mask_indices=layout.xp_indices) for k in range(2)]
    out = tmp_path / "photometry.parquet"
    predict_shard(setup["shard"], Ensemble.load(members), None, out, chunk_rows=64, batch_size=64, min_inputs=3)
    frame = pd.read_parquet(out)
    assert not frame["has_xp"].any()  # the model never looked at the spectra
    cols = setup["cols"]
    expected_n = sum(np.isfinite(cols[c]) for c in
                     ("phot_g_mean_mag", "phot_bp_mean_mag", "phot_rp_mean_mag", "parallax"))
    np.testing.assert_array_equal(frame["n_inputs"].to_numpy(), expected_n)


def test_prediction_inputs_are_the_training_inputs_for_every_layout(tmp_path):
    """Prediction reads values only, but must derive them as training did: colours included."""
    from msa.catalogue.predict import input_transform

    layout = small_layout({**FEATURES_CFG, "colours_relative_to": "phot_g_mean_mag"})
    assert layout.colour_reference == "phot_g_mean_mag"
    ensemble = Ensemble.load([write_member(tmp_path / "m.pt", layout, unit_scaler(layout))])
    cols = star_columns(N_STARS)
    np.testing.assert_array_equal(input_transform(ensemble)(cols)[0], ensemble.transform(cols)[0])


def group_calibration() -> dict:
    """CALIBRATION plus G-bin groups of their own offsets: XP stars with 12 <= G < 14, and the no-XP
    stars of that bin that have every Gaia band."""
    cal = json.loads(json.dumps(CALIBRATION))
    bands = "phot_g_mean_mag+phot_bp_mean_mag+phot_rp_mean_mag"
    big = {"teff": {"offset_lower": 900.0, "offset_upper": 900.0}, "logg": {"offset_lower": 2.0, "offset_upper": 2.0},
           "parallax": {"offset_lower": 1.0, "offset_upper": 1.0}}
    cal.update(g_mag_bins=[12.0, 14.0], groups={"xp|12<=G<14": {"level": "g_mag", "per_label": big},
                                                f"no_xp|12<=G<14|{bands}": {"level": "g_mag_bands", "per_label": big}})
    return cal, bands


def test_each_star_takes_its_own_groups_offsets_and_names_it(setup, tmp_path):
    calibration, bands = group_calibration()
    out = tmp_path / "p.parquet"
    run_shard(setup, out, calibration=calibration)
    frame = pd.read_parquet(out)
    g = setup["cols"]["phot_g_mean_mag"]
    has_xp = frame["has_xp"].to_numpy()
    in_bin = (g >= 12) & (g < 14)
    expected = np.where(has_xp, "xp", "no_xp").astype(object)
    expected[in_bin & has_xp] = "xp|12<=G<14"
    all_bands = np.isfinite(setup["cols"]["phot_bp_mean_mag"])
    expected[in_bin & ~has_xp & all_bands] = f"no_xp|12<=G<14|{bands}"
    np.testing.assert_array_equal(frame["calibration_group"].to_numpy(), expected)
    assert (expected == "xp|12<=G<14").sum() > 20 and (expected == f"no_xp|12<=G<14|{bands}").sum() > 0
    assert set(expected[~in_bin]) == {"xp", "no_xp"}  # no offsets for their bins: the coarse group's
    ok = ~frame["flag_too_few_inputs"].to_numpy()
    x, _ = setup["ensemble"].transform(setup["cols"])
    raw = combine_members(setup["ensemble"].predict_members(x))
    q = quantile_array(frame)
    wide = ok & np.isin(expected, list(calibration["groups"]))
    np.testing.assert_allclose(q[wide, 0, 0], raw[wide, 0, 0] - 900.0, rtol=1e-5)
    coarse = ok & (expected == "xp")
    np.testing.assert_allclose(q[coarse, 0, 2], raw[coarse, 0, 2] + 80.0, rtol=1e-5)


def test_in_training_sample_flags_labelled_stars_outside_the_test_split(setup, tmp_path):
    from msa.data.splits import assign_splits

    ids = setup["cols"]["source_id"]
    labelled = ids[::2]
    pd.DataFrame({"source_id": labelled, "teff": 5000.0, "logg": 4.0, "parallax": 1.0}).to_csv(
        tmp_path / "labels.csv", index=False)
    config = yaml.safe_load(open(write_config(tmp_path)))
    config["labels"] = {"catalogue": str(tmp_path / "labels.csv"),
                        "columns": {n: {"value": n, "error": None} for n in LABELS}}
    config["splits"] = {"train": 0.4, "validation": 0.1, "calibration": 0.2, "test": 0.3}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    calibration = tmp_path / "calibration.json"
    calibration.write_text(json.dumps(CALIBRATION))
    out = tmp_path / "p.parquet"
    assert main(["predict", "--config", str(tmp_path / "config.yaml"), "--label-set", "spectro", "--members",
                 *map(str, setup["members"]), "--calibration", str(calibration), "--shard", str(setup["shard"]),
                 "--out", str(out), "--device", "cpu"]) == 0
    frame = pd.read_parquet(out)
    split = assign_splits(ids, config["splits"], 42)  # the schema's default seed
    expected = np.isin(ids, labelled) & (split != "test")
    np.testing.assert_array_equal(frame["in_training_sample"].to_numpy(), expected)
    assert 0 < expected.sum() < len(labelled)
    meta = {k.decode(): v.decode() for k, v in pq.read_schema(out).metadata.items()}
    assert "calibration_group" in meta["calibration_guarantee"] and "fine-tuning" in meta["in_training_sample"]
