"""Pretraining: segments and resume are exact, a killed run finishes with the same steps, wrong
layouts / unreadable shards / non-finite losses stop the run with a message that says why."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import yaml
from test_batches import make_store, small_features

from msa.config import validate
from msa.data.fit_scaler import fit_scaler
from msa.data.layout import Layout
from msa.data.store import StoreError, write_shard
from msa.nn.checkpoint import CheckpointError, load_checkpoint
from msa.nn.model import MaskedAutoencoder
from msa.nn.perturbation import perturb
from msa.nn.training import NonFiniteLossError, parameter_groups
from msa.pretrain.stage import PretrainError, load_pretrained, pretrain_segment

torch.set_num_threads(1)


def make_config(**pretrain) -> dict:
    section = {"epochs": 2, "epochs_per_job": 2, "batch_size": 64, "chunk_rows": 128, "buffer_rows": 512,
               "lr": 3e-3, "checkpoint_every": 1000, "validation_fraction": 0.2, "restart_epochs": 50,
               "loss": "mse", **pretrain}
    return validate({"seed": 7, "features": small_features(),
                     "model": {"d_embedding": 4, "n_frequencies": 4, "encoder_widths": [48, 24]},
                     "pretrain": section})


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    directory = tmp_path_factory.mktemp("store")
    paths = make_store(directory, n_shards=3, rows=400)
    layout = Layout.from_config(small_features())
    scaler, meta = fit_scaler(paths, layout, True, shards=3, max_rows=10_000, seed=0)
    scaler_path = directory / "scaler.json"
    scaler.save(scaler_path, meta)
    return paths, scaler_path


def params(model):
    return torch.cat([p.detach().flatten() for p in model.state_dict().values() if p.is_floating_point()])


def test_segments_reproduce_an_uninterrupted_run(store, tmp_path):
    paths, scaler = store
    whole = pretrain_segment(make_config(), paths, scaler, tmp_path / "whole", 0)
    split_cfg = make_config(epochs_per_job=1)
    first = pretrain_segment(split_cfg, paths, scaler, tmp_path / "split", 0)
    second = pretrain_segment(split_cfg, paths, scaler, tmp_path / "split", 1)
    assert first.step * 2 == second.step == whole.step > 0
    torch.testing.assert_close(params(second.model), params(whole.model), rtol=0, atol=1e-6)
    assert second.metrics[-1]["train_loss"] == pytest.approx(whole.metrics[-1]["train_loss"], rel=1e-6)
    # segment outputs: checkpoint, metrics of all epochs so far, loss figure; no work file left
    out = tmp_path / "split"
    lines = [json.loads(s) for s in (out / "segment-1.metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [0, 1]
    assert {"train_loss", "val_loss", "val_loss_groups", "lr", "rows_per_s", "wall_s", "step"} <= set(lines[0])
    assert set(lines[0]["val_loss_groups"]) == {"xp", "gaia_photometry"}
    assert (out / "segment-1.loss.png").stat().st_size > 1000
    assert not (out / "work" / "segment-1.pt").exists()
    ckpt = load_checkpoint(out / "segment-1.pt")
    assert ckpt["step"] == second.step and ckpt["epoch"] == 2 and ckpt["layout"]["features"]
    with pytest.raises(PretrainError, match="segments 0..1"):
        pretrain_segment(split_cfg, paths, scaler, out, 2)
    with pytest.raises(PretrainError, match="segment-0.pt.*--segment 0"):
        pretrain_segment(split_cfg, paths, scaler, tmp_path / "empty", 1)


def test_validation_loss_falls_on_learnable_data(store, tmp_path):
    paths, scaler = store
    result = pretrain_segment(make_config(epochs=6, epochs_per_job=6, batch_size=32), paths, scaler, tmp_path, 0)
    val = [m["val_loss"] for m in result.metrics]
    assert val[-1] < 0.75 * val[0], val
    # the fixed validation mask makes the first epoch's validation loss a function of the weights only
    again = pretrain_segment(make_config(epochs=1, epochs_per_job=1, batch_size=32), paths, scaler,
                             tmp_path / "again", 0)
    assert again.metrics[0]["val_loss"] == pytest.approx(val[0], rel=1e-6)


def test_killed_run_resumes_to_the_same_steps_and_weights(store, tmp_path):
    paths, scaler = store
    config = make_config(epochs=2, epochs_per_job=2, batch_size=16, checkpoint_every=5, validation_fraction=0.1)
    reference = pretrain_segment(config, paths, scaler, tmp_path / "reference", 0)
    cfg_path = tmp_path / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(config, sort_keys=False))
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "msa.cli", "pretrain", "--config", str(cfg_path), "--shards", *map(str, paths),
           "--scaler", str(scaler), "--out-dir", str(out), "--segment", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    work = out / "work" / "segment-0.pt"
    deadline = time.time() + 120
    while not work.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, "the run finished before it could be killed: " + proc.stderr.read().decode()[-2000:]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = load_checkpoint(work)["step"]
    assert 0 < killed_at < reference.step
    finished = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert "resuming from" in finished.stderr
    final = load_checkpoint(out / "segment-0.pt")
    assert final["step"] == reference.step
    model = MaskedAutoencoder(**final["model_hparams"])
    model.load_state_dict(final["model"])
    torch.testing.assert_close(params(model), params(reference.model), rtol=0, atol=1e-5)


def test_sigterm_checkpoints_and_exits_143(store, tmp_path):
    paths, scaler = store
    config = make_config(epochs=50, epochs_per_job=50, batch_size=16, checkpoint_every=5)
    cfg_path = tmp_path / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(config, sort_keys=False))
    cmd = [sys.executable, "-m", "msa.cli", "pretrain", "--config", str(cfg_path), "--shards", *map(str, paths),
           "--scaler", str(scaler), "--out-dir", str(tmp_path / "out")]
    proc = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not (tmp_path / "out" / "work" / "segment-0.pt").exists() and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 143
    ckpt = load_checkpoint(tmp_path / "out" / "work" / "segment-0.pt")
    assert ckpt["step"] > 0 and not (tmp_path / "out" / "segment-0.pt").exists()


def test_in_progress_checkpoint_from_other_settings_is_not_resumed(store, tmp_path, caplog):
    paths, scaler = store
    config = make_config(epochs=1, epochs_per_job=1)
    reference = pretrain_segment(config, paths, scaler, tmp_path / "reference", 0)
    # a killed run with another learning rate left its state behind; the new settings must start afresh
    stale = pretrain_segment(make_config(epochs=1, epochs_per_job=1, lr=0.05), paths, scaler, tmp_path / "stale", 0)
    work = tmp_path / "out" / "work" / "segment-0.pt"
    work.parent.mkdir(parents=True)
    (tmp_path / "stale" / "segment-0.pt").rename(work)
    with caplog.at_level("WARNING"):
        result = pretrain_segment(config, paths, scaler, tmp_path / "out", 0)
    assert "made with other pretraining settings" in caplog.text
    assert result.step == reference.step == stale.step
    torch.testing.assert_close(params(result.model), params(reference.model), rtol=0, atol=1e-6)


def test_layout_mismatch_is_refused_naming_the_difference(store, tmp_path):
    paths, scaler = store
    pretrain_segment(make_config(epochs=1, epochs_per_job=1), paths, scaler, tmp_path, 0)
    other = Layout.from_config({**small_features(), "survey_photometry": {"J": None}})
    with pytest.raises(CheckpointError, match="'J'"):
        load_pretrained(tmp_path / "segment-0.pt", other)
    model, ckpt = load_pretrained(tmp_path / "segment-0.pt", Layout.from_config(small_features()))
    assert model.latent_dim == 24 and ckpt["kind"] == "pretrain"
    # a checkpoint resumed under a config with another layout stops too
    cfg = make_config(epochs=2, epochs_per_job=1)
    cfg["features"]["force_mask"] = ["phot_g_mean_mag"]
    with pytest.raises(CheckpointError, match="force_mask"):
        pretrain_segment(cfg, paths, scaler, tmp_path, 1)


def test_unreadable_shard_stops_the_run_naming_it(store, tmp_path):
    paths, scaler = store
    broken = tmp_path / "shard-zzz.h5"
    broken.write_bytes(b"\x89HDF truncated")
    with pytest.raises(StoreError, match="shard-zzz.h5"):
        pretrain_segment(make_config(), [*paths, broken], scaler, tmp_path / "out", 0)


def test_non_finite_loss_names_the_step(store, tmp_path):
    paths, scaler = store
    bad = tmp_path / "shard-bad.h5"
    from msa.data.store import Shard
    with Shard(paths[0]) as s:
        cols = s.read(s.columns)
    cols["phot_bp_mean_mag"] = np.full(len(cols["source_id"]), np.inf)
    write_shard(bad, cols)
    with pytest.raises(NonFiniteLossError, match="at step 0 "):
        pretrain_segment(make_config(validation_fraction=0.0), [bad], scaler, tmp_path / "out", 0)


def test_perturbation_is_per_element_and_leaves_errorless_entries():
    x = torch.zeros(4, 3)
    err = torch.tensor([[1.0, float("nan"), 2.0]]).repeat(4, 1)
    out = perturb(x, err, torch.tensor([0, 1, 2]), 1.0, torch.Generator().manual_seed(0))
    assert torch.all(out[:, 1] == 0)  # no error, no noise
    assert len(torch.unique(out[:, 0])) == 4 and len(torch.unique(out[:, 2])) == 4
    assert torch.all(x == 0)  # the clean target is untouched
    same = perturb(x, err, torch.tensor([1]), 1.0, torch.Generator().manual_seed(0))
    assert torch.all(same == 0)


def test_no_weight_decay_on_biases_norms_and_embeddings():
    model = MaskedAutoencoder(6, 6, d_embedding=4, n_frequencies=4, encoder_widths=[8, 4])
    decay, no_decay = parameter_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(names[id(p)].endswith("weight") and p.ndim == 2 for p in decay["params"])
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert "missing_embedding" in no_decay_names and any("bias" in n for n in no_decay_names)
    assert any(n.endswith("body.1.weight") for n in no_decay_names)  # LayerNorm weight
    assert no_decay["weight_decay"] == 0.0


def test_labelled_calibration_and_test_stars_are_left_out(store, tmp_path):
    """exclude_label_splits: a star of the calibration or test split whose label comes from the
    store is no pretraining row; the same split's unlabelled stars and every train star are."""
    from msa.data.features import FeatureTransform
    from msa.data.labels import LabelSource, load_labelled
    from msa.data.scaling import Scaler
    from msa.data.splits import assign_splits
    from msa.data.store import shard_rows

    paths, scaler_path = store
    labels = {"labels": {"columns": {"bp": {"store": "phot_bp_mean_mag"}}}, "label_sets": {"bp": ["bp"]},
              "splits": {"train": 0.5, "validation": 0.1, "calibration": 0.2, "test": 0.2}}
    transform = FeatureTransform(Layout.from_config(small_features()), Scaler.load(scaler_path), True)
    labelled = load_labelled(paths, transform, LabelSource(labels["labels"], ["bp"]))
    held_out = np.isin(assign_splits(labelled.source_id, labels["splits"], 7), ["calibration", "test"]).sum()
    n_rows = sum(shard_rows(p) for p in paths)
    rows = {}
    for exclude in (False, True):
        config = validate({**make_config(epochs=1, epochs_per_job=1, validation_fraction=0.0,
                                         exclude_label_splits=exclude), **labels})
        result = pretrain_segment(config, paths, scaler_path, tmp_path / str(exclude), 0)
        rows[exclude] = result.metrics[-1]["rows"]
    assert rows[False] == n_rows
    assert rows[True] == n_rows - held_out and 300 < held_out < len(labelled)


def test_perturbed_columns_resolve_groups_and_names_and_refuse_unknowns():
    from msa.config import ConfigError
    from msa.data.layout import Layout
    from msa.nn.perturbation import perturbed_columns

    layout = Layout.from_config({"xp": {"bp": 2, "rp": 2}, "gaia_photometry": {"phot_g_mean_mag": None},
                                 "survey_photometry": {"J": "J_err"}})
    xp = layout.group_indices("xp").tolist()
    assert perturbed_columns(layout, ["J", "xp", "J"], "pretrain.pert_features").tolist() == sorted(
        xp + [layout.index("J")])
    with pytest.raises(ConfigError, match=r"finetune.pert_features: 'K' is neither a group"):
        perturbed_columns(layout, ["K"], "finetune.pert_features")
