"""The shard store: atomic columnar writes and row access."""

import numpy as np
import pytest

from msa.data.store import Shard, StoreError, atomic_dir, atomic_path, write_shard


@pytest.fixture
def shard(tmp_path):
    n = 50_000
    ids = (2**60 + 2 * np.arange(n)).astype(np.int64)  # above 2^53: must stay exact
    path = tmp_path / "s.h5"
    write_shard(path, {"source_id": ids[::-1], "x": np.arange(n, dtype=np.float32)[::-1]}, chunk_rows=4096)
    return path, ids


@pytest.mark.parametrize("rows", [
    np.array([17, 3, 3, 49_999, 0]),                              # sparse over the span: point selection
    np.random.default_rng(0).integers(0, 50_000, 20_000),          # dense: one span read
    np.array([], dtype=np.int64),
])
def test_read_rows_any_order_and_repeats(shard, rows):
    path, ids = shard
    with Shard(path) as s:
        got = s.read_rows(["source_id", "x"], rows)
    np.testing.assert_array_equal(got["source_id"], ids[rows])  # written sorted by source_id
    np.testing.assert_array_equal(got["x"], rows.astype(np.float32))
    assert got["source_id"].dtype == np.int64


def test_duplicate_ids_leave_no_file(tmp_path):
    with pytest.raises(StoreError, match="duplicate source_id"):
        write_shard(tmp_path / "d.h5", {"source_id": np.array([4, 2, 4]), "x": np.zeros(3)})
    assert not list(tmp_path.iterdir())


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_atomic_path_writes_the_file_only_when_the_block_succeeds(tmp_path):
    target = tmp_path / "metrics.json"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed mid-write")
    assert target.read_text() == "old" and not leftovers(tmp_path)
    with atomic_path(target) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new" and not leftovers(tmp_path)


def test_atomic_dir_swaps_a_whole_folder_or_nothing(tmp_path):
    dest = tmp_path / "catalog" / "spectro"
    dest.mkdir(parents=True)
    (dest / "old.parquet").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_dir(dest) as tmp:
            (tmp / "part-0.parquet").write_text("half")
            raise RuntimeError("killed mid-build")
    assert [p.name for p in dest.iterdir()] == ["old.parquet"] and not leftovers(dest.parent)
    with atomic_dir(dest) as tmp:
        (tmp / "part-0.parquet").write_text("new")
    assert [p.name for p in dest.iterdir()] == ["part-0.parquet"] and not leftovers(dest.parent)
