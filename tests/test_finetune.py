"""Fine-tuning: pinball loss, the parallax masked pass on a synthetic sky, kill-and-resume, freezing."""

import shutil
import signal

import numpy as np
import pandas as pd
import pytest
import torch

from msa.calibration.ensemble import Ensemble
from msa.config import validate
from msa.data.features import xp_normalises
from msa.data.fit_scaler import fit_scaler
from msa.data.ingest import ingest_shard
from msa.data.labels import LabelSource, load_labelled
from msa.data.layout import Layout
from msa.data.splits import split_seed
from msa.data.splits import assign_splits
from msa.data.synthetic import synthetic_config, write_sky
from msa.finetune.data import inverse_variance_weights
from msa.finetune.stage import EXIT_MORE_EPOCHS, FinetuneError, MemberRun, finetune_member, photometry_member_config
from msa.nn.losses import pinball_loss
from msa.nn.model import MaskedAutoencoder
from msa.pretrain.stage import load_pretrained, pretrain_segment

torch.set_num_threads(1)


def test_pinball_loss_hand_computed_and_nan_ignored():
    q = torch.tensor([[[0.0, 1.0, 2.0], [5.0, 5.0, 5.0]]])  # (B=1, L=2, 3)
    y = torch.tensor([[3.0, float("nan")]])
    # y − q = 3, 2, 1 → τ·r = 0.48, 1.0, 0.84 → mean over the 3 quantiles = 2.32 / 3
    assert torch.isclose(pinball_loss(q, y), torch.tensor(2.32 / 3))
    y_below = torch.tensor([[-1.0, float("nan")]])
    # r = −1, −2, −3 → (τ − 1)·r = 0.84, 1.0, 0.48
    assert torch.isclose(pinball_loss(q, y_below), torch.tensor(2.32 / 3))
    # the NaN label contributes neither loss nor gradient, whatever its prediction
    q2 = q.clone().requires_grad_(True)
    pinball_loss(q2, y).backward()
    assert torch.all(q2.grad[0, 1] == 0) and torch.all(torch.isfinite(q2.grad))


def test_inverse_variance_weights():
    err = np.array([[0.1, np.nan], [0.2, 0.0], [0.001, 1.0]])
    w = inverse_variance_weights(err, np.array([0.2, 1.0]))
    np.testing.assert_allclose(w, [[4.0, 1.0], [1.0, 1.0], [10.0, 1.0]])


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """A synthetic sky through the real ingest → fit-scaler → pretrain (1 epoch); parallax is an input."""
    root = tmp_path_factory.mktemp("finetune")
    sky = write_sky(root / "sky", n_stars=1500, n_shards=1, seed=5)
    cfg = synthetic_config(sky.out_dir, root / "results", seed=7)
    cfg["features"]["xp"] = {"bp": 8, "rp": 8, "normalise": "g_flux"}
    # the Gaia parallax as a label too: the case where a model could copy its input
    cfg["labels"]["columns"]["gaia_parallax"] = {"store": "parallax", "error": "parallax_error"}
    cfg["label_sets"] = {"plx": ["gaia_parallax"], "mixed": ["teff", "gaia_parallax"]}
    cfg["pretrain"].update(epochs=1, epochs_per_job=1)
    cfg["finetune"].update(parallax_label="gaia_parallax", epochs=10, batch_size=64, patience=5,
                           lr_head=0.003, lr_encoder=0.001)
    config = validate(cfg)
    shard = root / "store" / "shard-s000.h5"
    surveys = {k: {**v, "path": v["path"].replace("{shard}", "s000")} for k, v in config["ingest"]["surveys"].items()}
    ingest_shard(sky.xp_paths[0], sky.source_paths[0], surveys, shard, config["ingest"]["source_columns"],
                 show_progress=False)
    layout = Layout.from_config(config["features"])
    scaler, meta = fit_scaler([shard], layout, xp_normalises(config["features"]))
    scaler.save(root / "scaler.json", meta)
    pretrain_segment(config, [shard], root / "scaler.json", root / "pretrain", 0)
    truth = pd.read_csv(sky.labels_path).set_index("source_id")["parallax_true"]
    return {"root": root, "config": config, "shard": shard, "truth": truth}


def member_job(pipeline, label_set, out, config=None, member=0):
    p = pipeline
    return MemberRun(config or p["config"], label_set, member, p["root"] / "pretrain" / "segment-0.pt",
                     [p["shard"]], p["root"] / "scaler.json", out)


def held_out_parallax(pipeline, model_path):
    """Ensemble quantiles of the Gaia-parallax label on the non-training stars, with truth."""
    config = pipeline["config"]
    ens = Ensemble.load([model_path])
    stars = load_labelled([pipeline["shard"]], ens.transform, LabelSource(config["labels"], ens.labels),
                          ["parallax_error"])
    held_out = stars.subset(assign_splits(stars.source_id, config["splits"], split_seed(config)) != "train")
    q = ens.predict(held_out.x)[:, ens.labels.index("gaia_parallax")].astype(np.float64)
    truth = pipeline["truth"].loc[held_out.source_id].to_numpy()
    return q, held_out.y[:, ens.labels.index("gaia_parallax")], held_out.extra["parallax_error"], truth


def test_parallax_from_masked_pass_cannot_copy_its_input(pipeline, tmp_path):
    assert finetune_member(member_job(pipeline, "plx", tmp_path / "masked")) == 0
    ckpt = torch.load(tmp_path / "masked" / "model.pt", weights_only=True)
    layout = Layout.from_dict(ckpt["layout"])
    assert ckpt["parallax"] == {"label_index": 0, "feature_index": layout.index("parallax"), "masked_pass": True}
    q, gaia, sigma, truth = held_out_parallax(pipeline, tmp_path / "masked" / "model.pt")
    pred, half_width = q[:, 1], (q[:, 2] - q[:, 0]) / 2
    # blind to the Gaia noise, the residual against Gaia = (residual against truth) ⊕ Gaia noise
    expected = np.sqrt(np.var(pred - truth) + np.mean(sigma ** 2))
    assert 0.85 < np.std(pred - gaia) / expected < 1.15
    # a copied input would make pred − Gaia ≈ 0 and collapse the intervals; here they are honest
    assert np.std(pred - gaia) > 0.8 * np.sqrt(np.mean(sigma ** 2))
    inside = np.mean((gaia >= q[:, 0]) & (gaia <= q[:, 2]))
    assert inside > 0.5
    # and the photometric parallax carries information on the truth
    assert np.std(pred - truth) < 0.75 * np.std(truth)

    # contrast: the same training with the parallax input visible learns (part of) the noise
    visible = validate({**pipeline["config"], "finetune": {**pipeline["config"]["finetune"],
                                                           "parallax_use_masked_pred": False}})
    assert finetune_member(member_job(pipeline, "plx", tmp_path / "visible", visible)) == 0
    q_vis, *_ = held_out_parallax(pipeline, tmp_path / "visible" / "model.pt")
    assert np.median((q_vis[:, 2] - q_vis[:, 0]) / 2) < 0.8 * np.median(half_width)


def test_killed_run_resumes_to_the_same_model(pipeline, tmp_path):
    config = validate({**pipeline["config"], "finetune": {**pipeline["config"]["finetune"], "epochs": 2,
                                                          "checkpoint_every": 3}})
    assert finetune_member(member_job(pipeline, "mixed", tmp_path / "straight", config)) == 0

    def kill_at_step_20(step):
        if step == 20:  # mid second epoch (17 batches per epoch)
            signal.raise_signal(signal.SIGTERM)

    out = tmp_path / "killed"
    assert finetune_member(member_job(pipeline, "mixed", out, config), kill_at_step_20) == 143
    assert (out / "work" / "state.pt").exists() and not (out / "model.pt").exists()
    steps = []
    assert finetune_member(member_job(pipeline, "mixed", out, config), steps.append) == 0
    assert steps[0] == 21  # resumed after the last completed step, not from the start
    assert not (out / "work").exists()
    a = torch.load(tmp_path / "straight" / "model.pt", weights_only=True)
    b = torch.load(out / "model.pt", weights_only=True)
    for part in ("model", "head"):
        for key in a[part]:
            torch.testing.assert_close(a[part][key], b[part][key], msg=f"{part}.{key} differs after resume")
    assert [m["val_pinball"] for m in a["metrics"]] == pytest.approx([m["val_pinball"] for m in b["metrics"]])
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2 and (out / "loss.png").stat().st_size > 0

    # killed again, then rerun with another learning rate: the old state is not carried over
    stale = tmp_path / "stale"
    assert finetune_member(member_job(pipeline, "mixed", stale, config), kill_at_step_20) == 143
    changed = validate({**config, "finetune": {**config["finetune"], "lr_head": 0.001}})
    steps = []
    assert finetune_member(member_job(pipeline, "mixed", stale, changed), steps.append) == 0
    assert steps[0] == 1


def test_freeze_encoder_and_epochs_per_job(pipeline, tmp_path):
    base = pipeline["config"]
    config = validate({**base, "finetune": {**base["finetune"], "freeze_encoder": True, "epochs": 2,
                                            "epochs_per_job": 1, "label_weights": {"teff": 2.0}}})
    out = tmp_path / "probe"
    assert finetune_member(member_job(pipeline, "mixed", out, config)) == EXIT_MORE_EPOCHS
    assert not (out / "model.pt").exists()
    assert finetune_member(member_job(pipeline, "mixed", out, config)) == 0
    ckpt = torch.load(out / "model.pt", weights_only=True)
    pretrained, _ = load_pretrained(pipeline["root"] / "pretrain" / "segment-0.pt", Layout.from_dict(ckpt["layout"]))
    for key, value in pretrained.state_dict().items():
        torch.testing.assert_close(ckpt["model"][key], value)  # linear probe: encoder untouched
    assert len(ckpt["metrics"]) == 2 and ckpt["labels"] == ["teff", "gaia_parallax"]
    assert ckpt["label_scale"][0] > 100  # teff scaled by its train-split standard deviation (K)
    # the label scaler is fitted on the train split only, not on every labelled star
    ens = Ensemble.load([out / "model.pt"])
    stars = load_labelled([pipeline["shard"]], ens.transform, LabelSource(config["labels"], ens.labels), [])
    train = assign_splits(stars.source_id, config["splits"], split_seed(config)) == "train"
    np.testing.assert_allclose(ckpt["label_centre"], np.nanmean(stars.y[train], axis=0), rtol=1e-5)
    assert not np.allclose(ckpt["label_centre"], np.nanmean(stars.y, axis=0), rtol=1e-5)

    bad = validate({**base, "finetune": {**base["finetune"], "label_weights": {"logg": 1.0}}})
    shutil.rmtree(tmp_path / "bad", ignore_errors=True)
    with pytest.raises(FinetuneError, match="label_weights"):
        finetune_member(member_job(pipeline, "mixed", tmp_path / "bad", bad))


def test_from_scratch_and_the_photometry_only_pass(pipeline, tmp_path):
    """No pretrained model: a fresh encoder of the config's architecture, differing from the
    pretrained weights; no_xp_weight adds the XP-hidden pass to training and early stopping."""
    base = pipeline["config"]
    config = validate({**base, "finetune": {**base["finetune"], "epochs": 2, "no_xp_weight": 0.5}})
    out = tmp_path / "scratch"
    job = member_job(pipeline, "mixed", out, config)
    job.pretrained = None
    assert finetune_member(job) == 0
    ckpt = torch.load(out / "model.pt", weights_only=True)
    rows = ckpt["metrics"]
    for row in rows:
        assert row["train_pinball_no_xp"] > 0
        # early stopping scores both paths: the sum, weighted as in training
        assert row["val_pinball"] == pytest.approx(row["val_pinball_with_xp"] + 0.5 * row["val_pinball_no_xp"])
    pretrained, _ = load_pretrained(pipeline["root"] / "pretrain" / "segment-0.pt", Layout.from_dict(ckpt["layout"]))
    assert ckpt["model_hparams"] == pretrained.hparams
    Ensemble.load([out / "model.pt"])  # a from-scratch member is an ordinary member

    # with the encoder frozen, a from-scratch member keeps exactly the random initialisation of
    # its seed: not one pretrained weight reached it
    frozen = validate({**config, "finetune": {**config["finetune"], "freeze_encoder": True, "epochs": 1}})
    job = member_job(pipeline, "mixed", tmp_path / "frozen", frozen)
    job.pretrained = None
    assert finetune_member(job) == 0
    weights = torch.load(tmp_path / "frozen" / "model.pt", weights_only=True)["model"]
    torch.manual_seed(frozen["seed"])
    fresh = MaskedAutoencoder(**pretrained.hparams).state_dict()
    for key, value in fresh.items():
        torch.testing.assert_close(weights[key], value)
    assert not torch.allclose(weights["missing_embedding"], pretrained.state_dict()["missing_embedding"])


def test_photometry_only_member_never_sees_xp_and_takes_its_overrides(pipeline, tmp_path):
    base = pipeline["config"]
    config = validate({**base, "finetune": {**base["finetune"], "epochs": 2, "head_reads_inputs": True,
                                            "photometry_overrides": {"epochs": 1, "lr_head": 0.01}}})
    member_config = photometry_member_config(config)
    assert member_config["finetune"]["epochs"] == 1 and member_config["finetune"]["lr_head"] == 0.01
    assert member_config["finetune"]["photometry_only"] and config["finetune"]["epochs"] == 2
    out = tmp_path / "photometry"
    assert finetune_member(member_job(pipeline, "mixed", out, member_config)) == 0
    ckpt = torch.load(out / "model.pt", weights_only=True)
    layout = Layout.from_dict(ckpt["layout"])
    assert set(layout.xp_indices) <= set(ckpt["force_mask_indices"])
    assert len(ckpt["metrics"]) == 1
    member = Ensemble.load([out / "model.pt"])
    assert member.photometry_members and not member.spectrum_members
    # no XP value reaches its prediction, through the encoder or the head's own input path
    stars = load_labelled([pipeline["shard"]], member.transform, LabelSource(config["labels"], member.labels))
    x = stars.x[:50].copy()
    x_other = x.copy()
    x_other[:, layout.xp_indices] *= -3.0
    np.testing.assert_array_equal(member.predict(x), member.predict(x_other))

    bad = validate({**config, "finetune": {**config["finetune"], "photometry_overrides": {"epoch": 3}}})
    with pytest.raises(FinetuneError, match="photometry_overrides.*epoch"):
        photometry_member_config(bad)


def test_an_epoch_of_max_train_rows_and_the_cache_change_nothing_else(pipeline, tmp_path):
    """max_train_rows caps an epoch at whole batches; a run that keeps its small train split in
    memory trains exactly the model of one that reads the shard every epoch."""
    base = pipeline["config"]
    capped = validate({**base, "finetune": {**base["finetune"], "epochs": 2, "max_train_rows": 300}})
    steps = []
    assert finetune_member(member_job(pipeline, "mixed", tmp_path / "cached", capped), steps.append) == 0
    assert steps == list(range(1, 11))  # ⌈300 / 64⌉ = 5 batches an epoch, not the split's 17
    cached = torch.load(tmp_path / "cached" / "model.pt", weights_only=True)
    assert [m["rows"] for m in cached["metrics"]] == [320, 320]
    uncached = validate({**capped, "finetune": {**capped["finetune"], "cache_rows": 0}})
    assert finetune_member(member_job(pipeline, "mixed", tmp_path / "read", uncached)) == 0
    read = torch.load(tmp_path / "read" / "model.pt", weights_only=True)
    for part in ("model", "head"):
        for key in cached[part]:
            torch.testing.assert_close(cached[part][key], read[part][key], msg=f"{part}.{key}")


@pytest.mark.parametrize("changed", ["pretrained", "labels"])
def test_a_rerun_with_other_inputs_starts_afresh(pipeline, tmp_path, caplog, changed):
    """Issue 27: the in-progress state was resumed whenever the config sections matched, so a rerun
    with another --pretrained (or an edited label catalogue) continued the old run. Now every
    input is hashed (pretrained model, scaler, label catalogue, shard list): a mismatch starts
    afresh, and the log says which input changed."""
    from msa.nn.checkpoint import load_checkpoint, save_checkpoint

    base = pipeline["config"]
    catalogue = tmp_path / "labels.csv"
    shutil.copy(base["labels"]["catalogue"], catalogue)
    config = validate({**base, "labels": {**base["labels"], "catalogue": str(catalogue)},
                       "finetune": {**base["finetune"], "epochs": 2, "epochs_per_job": 1}})
    out = tmp_path / "member"
    assert finetune_member(member_job(pipeline, "mixed", out, config)) == EXIT_MORE_EPOCHS
    assert (out / "work" / "state.pt").exists()
    job = member_job(pipeline, "mixed", out, config)
    if changed == "pretrained":  # another pretrained model, at another path
        ckpt = load_checkpoint(job.pretrained)
        key = next(k for k, v in ckpt["model"].items() if v.is_floating_point())
        ckpt["model"][key] = ckpt["model"][key] + 0.01
        job.pretrained = tmp_path / "other-pretrained.pt"
        save_checkpoint(job.pretrained, ckpt)
    else:  # the same catalogue file, edited in place
        frame = pd.read_csv(catalogue)
        frame["teff"] = frame["teff"] + 10.0
        frame.to_csv(catalogue, index=False)
    caplog.set_level("INFO")
    steps = []
    assert finetune_member(job, steps.append) == EXIT_MORE_EPOCHS
    assert steps[0] == 1  # a fresh start, not the old run's epoch 1
    changed_input = "pretrained" if changed == "pretrained" else "label_catalogue"
    assert f"made from other inputs ({changed_input}); this member starts afresh" in caplog.text
    # and with the inputs unchanged, the next rerun resumes where this one stopped
    steps = []
    assert finetune_member(job, steps.append) == 0
    assert steps[0] > 1


def test_head_only_epochs_leave_the_encoder_as_pretrained_then_it_moves(pipeline, tmp_path):
    base = pipeline["config"]
    pretrained, _ = load_pretrained(pipeline["root"] / "pretrain" / "segment-0.pt",
                                    Layout.from_config(base["features"]))
    weights = {}
    for epochs in (1, 2):
        config = validate({**base, "finetune": {**base["finetune"], "epochs": epochs, "head_only_epochs": 1,
                                                "encoder_warmup_epochs": 0.5, "layer_lr_decay": 0.7}})
        assert finetune_member(member_job(pipeline, "mixed", tmp_path / f"e{epochs}", config)) == 0
        weights[epochs] = torch.load(tmp_path / f"e{epochs}" / "model.pt", weights_only=True)["model"]
    block = "encoder.0.body.0.weight"
    torch.testing.assert_close(weights[1][block], pretrained.state_dict()[block])  # the head-only epoch
    assert not torch.allclose(weights[2][block], pretrained.state_dict()[block])  # then the encoder trains
