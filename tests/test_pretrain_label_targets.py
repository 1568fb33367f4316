"""Target-aware pretraining (``pretrain.label_targets``): only the train split's labels are read,
the linear label head learns them from the latent, and a label that cannot be a target is refused."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from test_batches import make_store, small_features

from msa.cli import main as cli_main
from msa.config import validate
from msa.data.features import FeatureTransform
from msa.data.fit_scaler import fit_scaler
from msa.data.layout import Layout
from msa.data.scaling import Scaler
from msa.data.splits import assign_splits, split_seed
from msa.data.store import Shard
from msa.finetune.model import pretrained_encoder
from msa.nn.checkpoint import load_checkpoint
from msa.pretrain.label_targets import LabelTargetError, LabelTargets, label_target_loss
from msa.pretrain.stage import load_pretrained, pretrain_segment

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def labelled_store(tmp_path_factory):
    """A store and a catalogue whose label (the BP − RP colour, a smooth function of the inputs)
    every star has, in every split."""
    directory = tmp_path_factory.mktemp("labelled")
    paths = make_store(directory, n_shards=2, rows=400, missing=0.0)
    layout = Layout.from_config(small_features())
    scaler, meta = fit_scaler(paths, layout, True, shards=2, max_rows=10_000, seed=0)
    scaler.save(directory / "scaler.json", meta)
    frames = []
    for path in paths:
        with Shard(path) as shard:
            raw = shard.read(["source_id", "phot_bp_mean_mag", "phot_rp_mean_mag"])
        frames.append(pd.DataFrame({"source_id": raw["source_id"],
                                    "colour": 1000 * (raw["phot_bp_mean_mag"] - raw["phot_rp_mean_mag"])}))
    catalogue = directory / "labels.csv"
    pd.concat(frames).to_csv(catalogue, index=False)
    return paths, directory / "scaler.json", catalogue


def make_config(catalogue, **pretrain) -> dict:
    section = {"epochs": 3, "epochs_per_job": 3, "batch_size": 64, "chunk_rows": 128, "buffer_rows": 512,
               "lr": 3e-3, "validation_fraction": 0.1, "restart_epochs": 50, "loss": "mse", **pretrain}
    return validate({"seed": 7, "features": small_features(),
                     "model": {"d_embedding": 4, "n_frequencies": 4, "encoder_widths": [48, 24]},
                     "labels": {"catalogue": str(catalogue), "columns": {"colour": {"value": "colour"},
                                                                        "parallax": {"store": "parallax"}}},
                     "label_sets": {"phot": ["colour"]},
                     "pretrain": section})


def test_only_the_train_split_labels_are_targets(labelled_store):
    _, _, catalogue = labelled_store
    config = make_config(catalogue, label_targets=["colour"])
    targets = LabelTargets.from_config(config)
    ids = pd.read_csv(catalogue)["source_id"].to_numpy()
    y = targets.scaled_labels(ids)[:, 0]
    train = assign_splits(ids, config["splits"], split_seed(config)) == "train"
    assert 0 < train.sum() < len(ids)
    assert np.isfinite(y[train]).all() and np.isnan(y[~train]).all()
    # scaled by the train split's own mean and standard deviation
    assert np.mean(y[train]) == pytest.approx(0.0, abs=1e-6) and np.std(y[train]) == pytest.approx(1.0, rel=1e-6)
    # a row_join keeps every row, labelled or not
    keep, arrays = targets.row_join()({"source_id": ids})
    assert keep.all() and np.array_equal(np.isnan(arrays["label_targets"][:, 0]), ~train)


def test_the_label_head_learns_the_labels_from_the_latent(labelled_store, tmp_path):
    paths, scaler, catalogue = labelled_store
    config = make_config(catalogue, label_targets=["colour"], label_target_weight=1.0)
    result = pretrain_segment(config, paths, scaler, tmp_path / "targets", 0)
    ckpt = load_checkpoint(result.checkpoint)
    assert ckpt["label_targets"]["names"] == ["colour"] and ckpt["model_hparams"]["n_label_targets"] == 1
    model, _ = load_pretrained(result.checkpoint, Layout.from_config(small_features()))
    targets = LabelTargets.from_config(config)
    with Shard(paths[0]) as shard:
        raw = shard.read(shard.columns)
    transform = FeatureTransform(Layout.from_config(small_features()), Scaler.load(scaler), True)
    x, _ = transform(raw)
    y = torch.as_tensor(targets.scaler.transform(targets.source.lookup(raw["source_id"])[0]), dtype=torch.float32)
    with torch.no_grad():
        z = model.encode(torch.as_tensor(x), torch.zeros(x.shape, dtype=torch.bool))
        trained = label_target_loss(model.label_head(z), y).item()
    # every star, the non-train ones included: the head predicts the colour far better than a constant
    assert trained < 0.2 * label_target_loss(torch.zeros_like(y), y).item()
    # a fine-tuned member starts from the encoder alone: its own head reads the latent
    member, _ = pretrained_encoder(result.checkpoint, Layout.from_config(small_features()), config["model"])
    assert member.label_head is None and "n_label_targets" not in member.hparams
    assert not any(name.startswith("label_head") for name in member.state_dict())


def test_without_label_targets_there_is_no_head(labelled_store, tmp_path):
    paths, scaler, catalogue = labelled_store
    result = pretrain_segment(make_config(catalogue, epochs=1, epochs_per_job=1), paths, scaler, tmp_path / "p", 0)
    assert result.model.label_head is None and "n_label_targets" not in result.model.hparams
    assert load_checkpoint(result.checkpoint)["label_targets"] is None


def test_labels_that_cannot_be_targets_are_refused(labelled_store):
    _, _, catalogue = labelled_store
    with pytest.raises(LabelTargetError, match=r"\['teff'\] are not in labels.columns"):
        LabelTargets.from_config(make_config(catalogue, label_targets=["teff"]))
    with pytest.raises(LabelTargetError, match=r"\['parallax'\] come from store columns.*force_mask_cols"):
        LabelTargets.from_config(make_config(catalogue, label_targets=["parallax"]))


def test_the_label_loss_counts_present_entries_only():
    predicted = torch.tensor([[0.0, 1.0], [2.0, 0.0]], requires_grad=True)
    target = torch.tensor([[0.5, float("nan")], [float("nan"), float("nan")]])
    loss = label_target_loss(predicted, target)
    assert loss.item() == pytest.approx(0.5 * 0.25)  # Huber, quadratic below δ = 1
    loss.backward()
    assert predicted.grad[0, 1] == 0 and predicted.grad[1].abs().sum() == 0
    empty = label_target_loss(predicted, torch.full((2, 2), float("nan")))
    assert empty.item() == 0.0 and empty.requires_grad


def test_msa_probe_writes_the_table_of_every_split(labelled_store, tmp_path):
    paths, scaler, catalogue = labelled_store
    config = make_config(catalogue, label_targets=["colour"])
    result = pretrain_segment(config, paths, scaler, tmp_path / "pretrain", 0)
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    out = tmp_path / "probe-phot.json"
    assert cli_main(["probe", "--config", str(config_path), "--label-set", "phot", "--pretrained",
                     str(result.checkpoint), "--shards", *map(str, paths), "--scaler", str(scaler),
                     "--out", str(out)]) == 0
    table = json.loads(out.read_text())
    assert table["labels"] == ["colour"] and table["n_stars"]["validation"] > 0
    for split in ("validation", "test"):
        assert set(table[split]) == {"xp", "no_xp"}
        assert set(table[split]["xp"]) == {"pretrained", "random_encoder", "raw_inputs"}
        for view in table[split].values():
            assert all(np.isfinite(v["colour"]["nmad"]) and v["colour"]["nmad"] > 0 for v in view.values())
