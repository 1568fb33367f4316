"""DDP on CPU: two gloo processes run the real pretraining loop on disjoint shards and end with
identical parameters; only rank 0 writes."""

import os
import socket

import torch
import torch.multiprocessing as mp
from test_batches import make_store, small_features

from msa.config import validate
from msa.fit_scaler import fit_scaler
from msa.layout import Layout
from msa.model import MaskedAutoencoder

torch.set_num_threads(1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(rank: int, world: int, port: int, paths, scaler_path, out_dir, config) -> None:
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from msa.pretrain import pretrain_segment
    from msa.training import DistributedContext

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
