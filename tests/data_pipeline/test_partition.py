"""Per-worker row ranges and the windowed Ray Data batches a training worker reads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from data_pipeline.datasets import read_piece, split_pieces
from data_pipeline.partition import iter_piece_batches, train_pieces
from data_pipeline.shards import shard_path, write_json_atomic
from data_pipeline.synthetic import SynthConfig, generate_rows
from data_pipeline.transforms import transform_table

CONFIG = SynthConfig(rows=6_000, days=2, seed=21)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """Two days, row groups of 250 rows, so a split is many small pieces."""
    root = tmp_path_factory.mktemp("partition")
    days = {}
    for day in range(2):
        table = generate_rows(CONFIG, day, 0, 3_000)
        path = shard_path(root, day, 0)
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, path, row_group_size=250)
        days[str(day)] = {"rows": 3_000}
    write_json_atomic({"days": days}, root / "manifest.json")
    return root


def _rows_of(pieces) -> dict[str, np.ndarray]:
    blocks = [transform_table(read_piece(p)) for p in pieces]
    return {k: np.concatenate([b[k] for b in blocks]) for k in blocks[0]}


@pytest.mark.parametrize("window", [1, 3])
def test_windowed_batches_are_the_pieces_rows_in_order(ray_cluster, shards, window):
    pieces = split_pieces(shards, "train", block_rows=250)
    assert len(pieces) > 2 * window  # several windows, and batches straddle them
    expected = _rows_of(pieces)
    batches = list(iter_piece_batches(pieces, 700, window_pieces=window))
    assert [len(b["label"]) for b in batches[:-1]] == [700] * (len(batches) - 1)
    for key, want in expected.items():
        got = torch.cat([b[key] for b in batches]).numpy()
        np.testing.assert_array_equal(got, want)


def test_windowed_batches_drop_the_last_partial_batch(ray_cluster, shards):
    pieces = split_pieces(shards, "train", block_rows=250)
    total = sum(p.rows for p in pieces)
    sizes = [len(b["label"]) for b in iter_piece_batches(pieces, 700, drop_last=True,
                                                          window_pieces=2)]
    assert sizes == [700] * (total // 700)
    assert list(iter_piece_batches([], 700)) == []


def test_epochs_of_two_workers_cover_the_split_once_each(shards):
    batch = 512
    seen = []
    for rank in range(2):
        pieces, steps = train_pieces(shards, rank, 2, batch, seed=4, block_rows=250)
        rows = _rows_of(pieces)["sparse"]
        assert len(rows) == steps * batch // 2
        seen.append(rows)
    both = np.concatenate(seen)
    assert len({r.tobytes() for r in both}) == len(both)  # no row twice
