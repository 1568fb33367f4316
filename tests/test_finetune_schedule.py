"""The encoder's fine-tuning schedule: head-only epochs (LP-FT), warm-up, layer-wise decay."""

import pytest
import torch

from msa.finetune.schedule import apply_encoder_schedule, encoder_lr_factor, encoder_parameter_groups
from msa.nn.model import MaskedAutoencoder


def cfg(head_only=0, warmup=0.0):
    return {"head_only_epochs": head_only, "encoder_warmup_epochs": warmup}


def test_the_factor_is_zero_then_rises_then_one():
    c = cfg(head_only=2, warmup=4)
    assert [encoder_lr_factor(e, c) for e in (0.0, 1.99, 2.0, 3.0, 5.0, 6.0, 30.0)] == \
        pytest.approx([0.0, 0.0, 0.0, 0.25, 0.75, 1.0, 1.0])
    assert encoder_lr_factor(0.0, cfg()) == 1.0


def test_layer_decay_gives_each_depth_its_rate_and_every_parameter_one_group():
    model = MaskedAutoencoder(6, 4, d_embedding=4, n_frequencies=4, encoder_widths=[16, 16, 8], n_label_targets=2)
    groups = encoder_parameter_groups(model, 0.01, lr=1e-3, layer_decay=0.5)
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters()) and len(ids) == len(set(ids))
    rate = {id(p): g["lr"] for g in groups for p in g["params"]}
    assert all(g["encoder"] for g in groups)
    assert all(rate[id(p)] == pytest.approx(1e-3 * 0.5 ** 3) for p in model.embed.parameters())
    assert rate[id(model.missing_embedding)] == pytest.approx(1e-3 * 0.5 ** 3)
    assert rate[id(model.encoder[0].body[0].weight)] == pytest.approx(1e-3 * 0.5 ** 2)
    assert rate[id(model.encoder[2].body[0].weight)] == pytest.approx(1e-3)
    assert rate[id(model.decoder[0].body[0].weight)] == pytest.approx(1e-3)
    assert rate[id(model.label_head.weight)] == pytest.approx(1e-3)
    # weight decay on Linear weight matrices only, as without layer decay
    decay = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    assert decay[id(model.encoder[0].body[0].weight)] == 0.01 and decay[id(model.encoder[0].body[0].bias)] == 0.0
    # no decay: the plain two groups, tagged
    plain = encoder_parameter_groups(model, 0.01, lr=1e-3, layer_decay=1.0)
    assert len(plain) == 2 and all(g["encoder"] and g["lr"] == 1e-3 for g in plain)


def test_the_schedule_scales_only_the_encoder_groups():
    head, encoder = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW([{"params": head.parameters(), "lr": 1e-2},
                                   {"params": encoder.parameters(), "lr": 1e-3, "encoder": True}])
    apply_encoder_schedule(optimizer, 1.0, cfg(head_only=0, warmup=4))
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([1e-2, 0.25e-3])
