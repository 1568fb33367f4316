"""DDP on CPU: two gloo processes run the real pretraining loop on disjoint shards and end with
identical parameters; only rank 0 writes."""

import os
import socket

import torch
import torch.multiprocessing as mp
from test_batches import make_store, small_features

from msa.config import validate
from msa.data.fit_scaler import fit_scaler
from msa.data.layout import Layout
from msa.nn.model import MaskedAutoencoder

torch.set_num_threads(1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(rank: int, world: int, port: int, paths, scaler_path, out_dir, config) -> None:
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from msa.nn.training import DistributedContext
    from msa.pretrain.stage import pretrain_segment

    ctx = DistributedContext.from_env()
    try:
        result = pretrain_segment(config, paths, scaler_path, out_dir, 0, ctx)
        torch.save({"state": result.model.state_dict(), "step": result.step, "rows": result.metrics[-1]["rows"]},
                   os.path.join(out_dir, f"rank-{rank}.pt"))
    finally:
        ctx.shutdown()


def test_two_gloo_ranks_end_with_identical_parameters(tmp_path):
    # four shards of unequal size: rank 0 gets shards 0 and 2, rank 1 gets 1 and 3
    paths = make_store(tmp_path, n_shards=2, rows=300, seed=1) + make_store(tmp_path / "more", n_shards=2,
                                                                          rows=200, seed=2)
    paths = [str(p) for p in paths]
    scaler, _ = fit_scaler(paths, Layout.from_config(small_features()), True, shards=4, max_rows=5000, seed=0)
    scaler_path = tmp_path / "scaler.json"
    scaler.save(scaler_path)
    config = validate({"seed": 3, "features": small_features(),
                       "model": {"d_embedding": 4, "n_frequencies": 4, "encoder_widths": [32, 16]},
                       "pretrain": {"epochs": 1, "epochs_per_job": 1, "batch_size": 50, "chunk_rows": 64,
                                    "buffer_rows": 200, "validation_fraction": 0.1, "loss": "mse"}})
    out = tmp_path / "out"
    out.mkdir()
    mp.spawn(worker, args=(2, free_port(), paths, str(scaler_path), str(out), config), nprocs=2, join=True)
    r0 = torch.load(out / "rank-0.pt", weights_only=True)
    r1 = torch.load(out / "rank-1.pt", weights_only=True)
    assert r0["step"] == r1["step"] > 1
    for name, value in r0["state"].items():
        assert torch.equal(value, r1["state"][name]), name
    # parameters moved away from their (shared) initial values
    torch.manual_seed(3)
    init = MaskedAutoencoder(len(scaler.names), len(scaler.names), **config["model"]).state_dict()
    assert not torch.equal(init["reconstruct.weight"], r0["state"]["reconstruct.weight"])
    # both ranks fed every step (rows are summed over ranks; that ranks read disjoint shards is
    # tested in test_batches.test_ranks_get_disjoint_shards_and_filter_applies)
    assert r0["rows"] > r0["step"] * 50
    assert (out / "segment-0.pt").exists() and (out / "segment-0.metrics.jsonl").exists()


def finetune_worker(rank: int, world: int, port: int, paths, scaler_path, out_dir, config) -> None:
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import msa.finetune.stage as finetune
    from msa.nn.training import DistributedContext

    built = []
    real_build = finetune.build_objective
    finetune.build_objective = lambda *a, **k: built.append(real_build(*a, **k)) or built[-1]
    ctx = DistributedContext.from_env()
    try:
        job = finetune.MemberRun(config, "bp", 0, None, paths, scaler_path, os.path.join(out_dir, "member"))
        steps = []
        assert finetune.finetune_member(job, steps.append, ctx=ctx) == 0
        objective = built[0][0]
        torch.save({"model": objective.model.state_dict(), "head": objective.head.state_dict(), "steps": steps},
                   os.path.join(out_dir, f"finetune-rank-{rank}.pt"))
    finally:
        ctx.shutdown()


def test_two_gloo_ranks_fine_tune_one_member(tmp_path):
    """Fine-tuning under torchrun: each rank streams its shards, gradients are averaged, both ranks
    end with the same member, and only rank 0 writes it."""
    paths = [str(p) for p in make_store(tmp_path, n_shards=2, rows=400, seed=4)]
    scaler, _ = fit_scaler(paths, Layout.from_config(small_features()), True, shards=2, max_rows=5000, seed=0)
    scaler_path = tmp_path / "scaler.json"
    scaler.save(scaler_path)
    config = validate({"seed": 3, "features": small_features(),
                       "model": {"d_embedding": 4, "n_frequencies": 4, "encoder_widths": [32, 16]},
                       "labels": {"columns": {"bp": {"store": "phot_bp_mean_mag"}}}, "label_sets": {"bp": ["bp"]},
                       "finetune": {"epochs": 2, "batch_size": 32, "patience": 5, "head_widths": [8]}})
    out = tmp_path / "out"
    out.mkdir()
    mp.spawn(finetune_worker, args=(2, free_port(), paths, str(scaler_path), str(out), config), nprocs=2, join=True)
    r0 = torch.load(out / "finetune-rank-0.pt", weights_only=True)
    r1 = torch.load(out / "finetune-rank-1.pt", weights_only=True)
    assert r0["steps"] == r1["steps"] and len(r0["steps"]) >= 2 * 8  # ~280 train stars a rank, batch 32
    for part in ("model", "head"):
        for name, value in r0[part].items():
            assert torch.equal(value, r1[part][name]), f"{part}.{name}"
    written = torch.load(out / "member" / "model.pt", weights_only=True)
    for name, value in r0["head"].items():
        assert torch.equal(written["head"][name], value)
