"""ShardStream and load_rows on small shards written with msa.data.store.write_shard.

``make_store`` / ``small_features`` are also used by the fit-scaler, pretraining and DDP tests.
"""

from pathlib import Path

import numpy as np
import pytest
import torch

from msa.data.batches import ShardStream, assign_shards, hash_fraction, load_rows
from msa.data.features import FeatureTransform
from msa.data.layout import Layout
from msa.data.scaling import Scaler
from msa.data.store import StoreError, write_shard

torch.set_num_threads(1)


def small_features(n_xp: int = 4) -> dict:
    return {"xp": {"bp": n_xp, "rp": n_xp, "normalise": "g_flux"},
            "gaia_photometry": {"phot_g_mean_mag": None, "phot_bp_mean_mag": None, "phot_rp_mean_mag": None},
            "survey_photometry": {}, "astrometry": {}, "context": {}, "force_mask": [],
            "reconstruct": ["xp", "gaia_photometry"]}


def make_store(directory: Path, n_shards: int = 3, rows: int = 500, n_xp: int = 4, seed: int = 0,
               missing: float = 0.05, compression="gzip") -> list[Path]:
    """Shards of stars whose features are smooth functions of two hidden parameters (so a masked
    autoencoder can learn to fill them in), with a fraction ``missing`` of NaN entries."""
    rng = np.random.default_rng(seed)
    mixing = np.random.default_rng(1234).normal(size=(2, 2 * n_xp + 2))
    paths = []
    next_id = 4295098369
    for k in range(n_shards):
        t = rng.normal(size=(rows, 2))
        g = 12.0 + 3.0 * rng.random(rows)
        shape = np.tanh(t @ mixing)  # (rows, 2 n_xp + 2)
        flux = 10 ** (-0.4 * (g - 15.0))
        cols = {"source_id": next_id + 2 * np.arange(rows, dtype=np.int64) * 977 + k}
        next_id += 2 * rows * 977 + 1
        cols["phot_g_mean_mag"] = g
        cols["phot_bp_mean_mag"] = g + 0.5 + 0.3 * shape[:, -2]
        cols["phot_rp_mean_mag"] = g - 0.5 + 0.3 * shape[:, -1]
        for b, band in enumerate(("bp", "rp")):
            for i in range(n_xp):
                v = (1.0 + shape[:, b * n_xp + i]) * flux + rng.normal(0, 0.01, rows) * flux
                cols[f"{band}_{i + 1}"] = v
                cols[f"{band}e_{i + 1}"] = 0.01 * flux * (1 + rng.random(rows))
        for name in list(cols):
            if name != "source_id" and missing:
                cols[name] = np.where(rng.random(rows) < missing, np.nan, cols[name])
        path = directory / f"shard-{k:03d}.h5"
        write_shard(path, cols, compression=compression, chunk_rows=128)
        paths.append(path)
    return paths


def identity_transform(n_xp: int = 4) -> FeatureTransform:
    layout = Layout.from_config(small_features(n_xp))
    scaler = Scaler.from_stats(layout.names, np.zeros(layout.n_features), np.ones(layout.n_features))
    return FeatureTransform(layout, scaler, normalise_xp=True)


def collect(stream):
    batches = list(stream)
    return batches, np.concatenate([b.source_id for b in batches])


def test_every_row_once_shuffled_and_transformed(tmp_path):
    paths = make_store(tmp_path, n_shards=3, rows=500)
    transform = identity_transform()
    stream = ShardStream(paths, transform, chunk_rows=100, buffer_rows=300, batch_size=64, seed=1, epoch=0)
    batches, sid = collect(stream)
    assert len(sid) == 1500 and len(np.unique(sid)) == 1500
    assert [len(b) for b in batches[:-1]] == [64] * (len(batches) - 1)
    assert len(batches) == stream.n_batches(stream.count_rows()) == 24
    assert not np.all(np.diff(sid) > 0)  # shuffled
    # values are the transform of the stored rows of exactly those stars
    wanted = batches[3].source_id
    x, err, got = load_rows(paths, transform, wanted)
    order = np.argsort(wanted)
    np.testing.assert_array_equal(got, np.sort(wanted))
    np.testing.assert_array_equal(batches[3].x.numpy()[order], x)
    np.testing.assert_array_equal(batches[3].err.numpy()[order], err)
    assert batches[0].x.dtype == torch.float32 and batches[0].x.shape[1] == transform.layout.n_features


def test_epochs_differ_and_replay_exactly(tmp_path):
    paths = make_store(tmp_path, n_shards=2, rows=400)
    transform = identity_transform()
    kw = dict(chunk_rows=100, buffer_rows=250, batch_size=50, seed=3)
    _, e0 = collect(ShardStream(paths, transform, epoch=0, **kw))
    _, e0_again = collect(ShardStream(paths, transform, epoch=0, **kw))
    _, e1 = collect(ShardStream(paths, transform, epoch=1, **kw))
    np.testing.assert_array_equal(e0, e0_again)
    assert not np.array_equal(e0, e1)
    # resuming after 5 batches replays the rest of the same epoch
    _, rest = collect(ShardStream(paths, transform, epoch=0, skip_batches=5, **kw))
    np.testing.assert_array_equal(rest, e0[5 * 50:])
    batches, _ = collect(ShardStream(paths, transform, epoch=0, max_batches=3, **kw))
    assert len(batches) == 3


def test_ranks_get_disjoint_shards_and_filter_applies(tmp_path):
    paths = make_store(tmp_path, n_shards=3, rows=300)
    transform = identity_transform()
    assert assign_shards(paths, 0, 2) == [paths[0], paths[2]] and assign_shards(paths, 1, 2) == [paths[1]]
    keep = lambda s: hash_fraction(s, 7) >= 0.2  # noqa: E731
    seen = []
    for rank in (0, 1):
        stream = ShardStream(paths, transform, chunk_rows=64, buffer_rows=128, batch_size=32, seed=0,
                             rank=rank, world_size=2, row_filter=keep)
        _, sid = collect(stream)
        assert len(sid) == stream.count_rows()
        seen.append(sid)
    assert not set(seen[0]) & set(seen[1])
    everything = np.concatenate(seen)
    assert np.all(keep(everything))
    assert 0.7 < len(everything) / 900 < 0.9
    with pytest.raises(ValueError, match="no shard"):
        assign_shards(paths, 3, 4)


def test_extra_columns_and_drop_last(tmp_path):
    paths = make_store(tmp_path, n_shards=1, rows=130)
    stream = ShardStream(paths, identity_transform(), chunk_rows=50, buffer_rows=60, batch_size=40, seed=0,
                         extra_columns=["phot_g_mean_mag"], drop_last=True, prefetch_batches=0)
    batches, sid = collect(stream)
    assert [len(b) for b in batches] == [40, 40, 40]
    assert set(batches[0].extra) == {"phot_g_mean_mag"}
    assert np.nanmin(batches[0].extra["phot_g_mean_mag"].numpy()) >= 12.0


def test_unreadable_shard_stops_naming_it(tmp_path):
    paths = make_store(tmp_path, n_shards=2, rows=200)
    broken = tmp_path / "shard-broken.h5"
    broken.write_bytes(b"this is not an HDF5 file")
    stream = ShardStream([paths[0], broken, paths[1]], identity_transform(), chunk_rows=64, buffer_rows=64,
                         batch_size=32, seed=0)
    with pytest.raises(StoreError, match="shard-broken.h5"):
        collect(stream)


def test_shard_missing_a_column_stops_naming_it(tmp_path):
    paths = make_store(tmp_path, n_shards=1, rows=100)
    stream = ShardStream(paths, identity_transform(n_xp=5), batch_size=10, seed=0)
    with pytest.raises(StoreError, match="shard-000.h5.*rp_5|shard-000.h5.*bp_5"):
        collect(stream)


def test_load_rows_keeps_only_wanted_stars(tmp_path):
    paths = make_store(tmp_path, n_shards=2, rows=300)
    transform = identity_transform()
    _, all_sid = collect(ShardStream(paths, transform, batch_size=1000, shuffle=False, seed=0))
    wanted = np.concatenate([all_sid[::37], [123]])  # 123 is in no shard
    x, err, sid = load_rows(paths, transform, wanted, chunk_rows=64)
    np.testing.assert_array_equal(np.sort(sid), np.sort(all_sid[::37]))
    assert x.shape == (len(sid), transform.layout.n_features) and err.shape == x.shape
    x0, _, sid0 = load_rows(paths, transform, np.array([999], dtype=np.int64))
    assert x0.shape == (0, transform.layout.n_features) and len(sid0) == 0


def test_row_join_keeps_its_rows_and_attaches_their_values(tmp_path):
    """The join sees each chunk's raw columns (its own included), drops the rows it rejects, and
    its per-row values travel with their stars through the shuffle."""
    paths = make_store(tmp_path, n_shards=2, rows=300, missing=0.0)

    def a_third_with_g(raw):
        keep = raw["source_id"] % 3 == 0
        return keep, {"label": raw["source_id"][keep] % 1000, "g": raw["phot_g_mean_mag"][keep]}

    kw = dict(chunk_rows=64, buffer_rows=128, batch_size=50, seed=3, row_join=a_third_with_g,
              join_columns=["phot_g_mean_mag"])
    stream = ShardStream(paths, identity_transform(), **kw)
    batches, sid = collect(stream)
    assert len(sid) == stream.count_rows() and np.all(sid % 3 == 0) and 150 < len(sid) < 250
    for b in batches:
        np.testing.assert_array_equal(b.extra["label"].numpy(), (b.source_id % 1000).astype(np.float32))
        # the attached value belongs to the row's own star: G is also input column x[:, G]
        np.testing.assert_allclose(b.extra["g"].numpy(), b.x[:, identity_transform().layout.index(
            "phot_g_mean_mag")].numpy(), rtol=1e-6)


def test_cached_epochs_are_the_read_epochs_and_read_no_file(tmp_path, monkeypatch):
    import msa.data.batches as batches_module

    paths = make_store(tmp_path, n_shards=2, rows=300)
    kw = dict(chunk_rows=64, buffer_rows=128, batch_size=50, seed=4, row_join=lambda raw: (
        raw["source_id"] % 3 != 0, {}))
    cache = batches_module.ChunkCache(enabled=True)
    first, _ = collect(ShardStream(paths, identity_transform(), epoch=0, cache=cache, **kw))
    assert len(cache) == sum(len(b) for b in first)
    reads = []
    real_read = batches_module._read_block
    monkeypatch.setattr(batches_module, "_read_block", lambda *a: reads.append(a) or real_read(*a))
    for epoch in (0, 1):  # from the cache: the same batches as reading the files, not one read
        cached, sid_cached = collect(ShardStream(paths, identity_transform(), epoch=epoch, cache=cache, **kw))
        assert not reads
        monkeypatch.setattr(batches_module, "_read_block", real_read)
        read, sid_read = collect(ShardStream(paths, identity_transform(), epoch=epoch, **kw))
        monkeypatch.setattr(batches_module, "_read_block", lambda *a: reads.append(a) or real_read(*a))
        np.testing.assert_array_equal(sid_cached, sid_read)
        for a, b in zip(cached, read):
            torch.testing.assert_close(a.x, b.x, equal_nan=True)
    off = batches_module.ChunkCache(enabled=False)
    collect(ShardStream(paths, identity_transform(), epoch=0, cache=off, **kw))
    assert len(off) == 0 and reads  # a disabled cache keeps nothing and reads every chunk
