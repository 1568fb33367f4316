"""msa reconstruct / embed: XP in Archive units (exact inverse of the features), streamed Parquet,
the spread of several models, XP hidden on request, refusals naming the files."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from astropy.table import Table

from msa.cli import main
from msa.data.features import FeatureTransform
from msa.data.layout import GROUP_ORDER
from msa.data.scaling import Scaler
from msa.data.store import write_shard
from msa.nn.autoencoders import AutoencoderError, Autoencoders
from msa.spectra.embed import embed_file
from msa.spectra.reconstruct import reconstruct_file, reconstruct_xp, scaled_xp_to_archive
from test_ensemble import FEATURES_CFG, small_layout, write_member
from test_predict import N_NO_XP, star_columns

torch.set_num_threads(1)
N_STARS = 200


def spread_scaler(layout) -> Scaler:
    """A scaler with centres and scales far from 0 and 1, so an inverse that forgets either fails."""
    rng = np.random.default_rng(5)
    return Scaler.from_stats(layout.names, rng.normal(3.0, 2.0, layout.n_features),
                             rng.uniform(0.2, 5.0, layout.n_features))


@pytest.fixture()
def setup(tmp_path):
    layout = small_layout()
    scaler = spread_scaler(layout)
    members = [write_member(tmp_path / f"member-{k}.pt", layout, scaler, seed=k) for k in range(2)]
    cols = star_columns(N_STARS)
    shard = tmp_path / "shard.h5"
    write_shard(shard, cols)
    return {"layout": layout, "scaler": scaler, "members": members, "cols": cols, "shard": shard}


def xp_names(layout):
    return [layout.names[i] for i in layout.xp_indices]


@pytest.mark.parametrize("normalise", [True, False])
def test_observed_coefficients_round_trip_to_archive_units(setup, tmp_path, normalise):
    member = write_member(tmp_path / "m.pt", setup["layout"], setup["scaler"], normalise_xp=normalise)
    aes = Autoencoders.load([member])
    cols = setup["cols"]
    x, _ = FeatureTransform(setup["layout"], setup["scaler"], normalise)(cols)
    back = scaled_xp_to_archive(x[:, setup["layout"].xp_indices], cols["phot_g_mean_mag"], aes)
    observed = np.column_stack([cols[c] for c in xp_names(setup["layout"])])
    has_xp = np.isfinite(observed).all(axis=1)
    assert N_STARS - N_NO_XP - 10 < has_xp.sum() < N_STARS - N_NO_XP  # the only-G stars lack XP too
    # float32 rounding of the forward transform (values minus centres of order 3) bounds the agreement
    np.testing.assert_allclose(back[has_xp], observed[has_xp], rtol=1e-5, atol=1e-4)
    assert np.isnan(back[~has_xp]).all()


def test_shard_reconstruction_is_the_models_mean_and_spread(setup, tmp_path):
    aes = Autoencoders.load(setup["members"])
    out = tmp_path / "rec.parquet"
    summary = reconstruct_file(setup["shard"], True, aes, out, hide_xp=False, chunk_rows=37, batch_size=16,
                               metadata={"xp_hidden": "false"})
    assert summary.n_rows == N_STARS
    frame = pq.read_table(out).to_pandas()
    cols = setup["cols"]
    np.testing.assert_array_equal(frame["source_id"].to_numpy(), cols["source_id"])
    expected = reconstruct_xp(cols, aes, hide_xp=False)  # all stars at once: chunking must not matter
    names = xp_names(setup["layout"])
    got = frame[[f"{c}_reconstructed" for c in names]].to_numpy()
    np.testing.assert_allclose(got, expected.mean.astype(np.float32), rtol=1e-5, atol=1e-6)
    spread = frame[[f"{c}_spread" for c in names]].to_numpy()
    np.testing.assert_allclose(spread, expected.per_model.std(axis=0, ddof=1), rtol=1e-4, atol=1e-6)
    assert np.all(spread[np.isfinite(spread)] > 0)  # two different models disagree
    np.testing.assert_array_equal(frame[[f"{c}_observed" for c in names]].to_numpy(),
                                  np.column_stack([cols[c] for c in names]))
    np.testing.assert_array_equal(frame["bp_1_observed_error"], cols["bpe_1"])
    np.testing.assert_array_equal(frame["has_xp"].to_numpy(), np.isfinite(cols["bp_1"]))


def test_hidden_xp_does_not_reach_the_reconstruction(setup, tmp_path):
    aes = Autoencoders.load(setup["members"][:1])
    changed = {c: v.copy() for c, v in setup["cols"].items()}
    for name in xp_names(setup["layout"]):
        changed[name] = changed[name] * 3.0 + 1.0
    hidden_a = reconstruct_xp(setup["cols"], aes, hide_xp=True).mean
    hidden_b = reconstruct_xp(changed, aes, hide_xp=True).mean
    np.testing.assert_array_equal(hidden_a, hidden_b)
    seen_a = reconstruct_xp(setup["cols"], aes, hide_xp=False).mean
    seen_b = reconstruct_xp(changed, aes, hide_xp=False).mean
    has_xp = np.isfinite(setup["cols"]["bp_1"])
    assert not np.allclose(seen_a[has_xp], seen_b[has_xp])


def test_one_model_writes_no_spread_and_a_table_matches_the_shard(setup, tmp_path):
    aes = Autoencoders.load(setup["members"][:1])
    from_shard, from_table = tmp_path / "a.parquet", tmp_path / "b.parquet"
    reconstruct_file(setup["shard"], True, aes, from_shard, hide_xp=True, chunk_rows=50, batch_size=32,
                     metadata={})
    table_path = tmp_path / "stars.fits"
    Table(setup["cols"]).write(table_path)
    reconstruct_file(table_path, False, aes, from_table, hide_xp=True, chunk_rows=64, batch_size=32, metadata={})
    a, b = pq.read_table(from_shard), pq.read_table(from_table)
    assert not any(name.endswith("_spread") for name in a.schema.names)
    assert a.schema.equals(b.schema) and a.to_pandas().equals(b.to_pandas())  # NaN == NaN here


def test_cli_reconstructs_and_refuses_other_checkpoints(setup, tmp_path, capsys):
    config = tmp_path / "config.yaml"
    config.write_text(json.dumps({"features": {**FEATURES_CFG, "reconstruct": list(GROUP_ORDER)}}))
    out = tmp_path / "rec.parquet"
    args = ["reconstruct", "--config", str(config), "--shard", str(setup["shard"]), "--out", str(out),
            "--device", "cpu", "--hide-xp", "--models", *map(str, setup["members"])]
    assert main(args) == 0
    meta = pq.read_schema(out).metadata
    assert json.loads(meta[b"xp_hidden"]) is True and len(json.loads(meta[b"model_sha256"])) == 2
    torch.save({"kind": "calibration"}, tmp_path / "other.pt")
    assert main(args[:-2] + [str(tmp_path / "other.pt"), "--out", str(tmp_path / "x.parquet")]) == 2
    assert "other.pt is a 'calibration' checkpoint" in capsys.readouterr().err


def test_models_of_different_runs_are_refused(setup, tmp_path):
    other = write_member(tmp_path / "other.pt", setup["layout"], Scaler.from_stats(
        setup["layout"].names, np.zeros(setup["layout"].n_features), np.ones(setup["layout"].n_features)))
    with pytest.raises(AutoencoderError, match="differ in their scaler"):
        Autoencoders.load([setup["members"][0], other])


def test_embeddings_are_every_models_latent(setup, tmp_path):
    aes = Autoencoders.load(setup["members"])
    out = tmp_path / "emb.parquet"
    embed_file(setup["shard"], True, aes, out, hide_xp=False, chunk_rows=37, batch_size=16, metadata={})
    frame = pq.read_table(out).to_pandas()
    x, _ = aes.input_transform()(setup["cols"])
    _, latent = aes.run(x)
    assert latent.shape == (2, N_STARS, 12)
    for k in range(2):
        got = frame[[f"emb{k}_{i:03d}" for i in range(12)]].to_numpy()
        np.testing.assert_allclose(got, latent[k], rtol=1e-5, atol=1e-6)
    assert not np.allclose(latent[0], latent[1])
    assert list(frame.columns[:2]) == ["source_id", "has_xp"] and frame.shape[1] == 2 + 2 * 12


@pytest.mark.parametrize("command", ["reconstruct", "embed"])
def test_several_shards_in_one_call_give_the_files_of_single_calls(setup, tmp_path, command):
    import pandas as pd

    config = tmp_path / "config.yaml"
    config.write_text(json.dumps({"features": {**FEATURES_CFG, "reconstruct": list(GROUP_ORDER)}}))
    base = [command, "--config", str(config), "--device", "cpu", "--models", *map(str, setup["members"])]
    shards = [setup["shard"], tmp_path / "other.h5"]
    write_shard(shards[1], star_columns(120, seed=3))
    for shard in shards:
        assert main([*base, "--shard", str(shard), "--out", str(tmp_path / "single" / f"{shard.stem}.parquet")]) == 0
    batch = tmp_path / command / "batch-0000"
    assert main([*base, "--shards", *map(str, shards), "--out-dir", str(batch)]) == 0
    assert sorted(p.name for p in batch.iterdir()) == ["other.parquet", "shard.parquet"]
    for shard in shards:
        single, batched = (pq.read_table(folder / f"{shard.stem}.parquet") for folder in (tmp_path / "single", batch))
        pd.testing.assert_frame_equal(batched.to_pandas(), single.to_pandas())
    # a missing shard is found before anything is written
    assert main([*base, "--shards", str(shards[0]), str(tmp_path / "absent.h5"),
                 "--out-dir", str(tmp_path / command / "batch-0001")]) == 2
    assert not (tmp_path / command / "batch-0001").exists()
