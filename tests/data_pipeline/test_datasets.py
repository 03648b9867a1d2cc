"""Splits, pieces, the transform in Ray Data, and the batches a worker or a plain loop gets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_pipeline import datasets
from data_pipeline.datasets import (
    iter_local_batches,
    iter_worker_batches,
    make_dataset,
    read_piece,
    split_pieces,
    split_row_ranges,
    split_sizes,
)
from data_pipeline.shards import shard_path, write_json_atomic
from data_pipeline.synthetic import SynthConfig, generate_rows
from data_pipeline.transforms import transform_table

CONFIG = SynthConfig(rows=10_000, days=2, seed=13)
# day → rows of each part file; small, uneven row groups make pieces cross their boundaries.
LAYOUT = {0: (1000, 700), 1: (500, 501)}
ROW_GROUP = {0: 300, 1: 128}


def _day_table(day: int) -> pa.Table:
    return generate_rows(CONFIG, day, 0, sum(LAYOUT[day]))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shards")
    days = {}
    for day, sizes in LAYOUT.items():
        table = _day_table(day)
        start = 0
        for part, n in enumerate(sizes):
            path = shard_path(root, day, part)
            path.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(table.slice(start, n), path, row_group_size=ROW_GROUP[day])
            start += n
        days[str(day)] = {"rows": sum(sizes)}
    # A stray, unlisted day (an interrupted conversion) must be ignored.
    stray = shard_path(root, 9, 0)
    stray.parent.mkdir(parents=True)
    pq.write_table(_day_table(0).slice(0, 10), stray)
    write_json_atomic({"days": days}, root / "manifest.json")
    return root


def _expected(split: str) -> pa.Table:
    ranges = split_row_ranges({d: sum(s) for d, s in LAYOUT.items()})[split]
    return pa.concat_tables([_day_table(d).slice(a, b - a) for d, a, b in ranges])


def test_split_rule_several_days():
    assert split_row_ranges({0: 100, 1: 100, 2: 101}) == {
        "train": [(0, 0, 100), (1, 0, 100)],
        "validation": [(2, 0, 50)],
        "test": [(2, 50, 101)],
    }
    terabyte = split_row_ranges({d: 1000 for d in range(24)})
    assert [d for d, _, _ in terabyte["train"]] == list(range(23))
    assert terabyte["validation"] == [(23, 0, 500)] and terabyte["test"] == [(23, 500, 1000)]
    assert split_row_ranges({7: 10, 3: 4})["train"] == [(3, 0, 4)]  # by day number, not order


def test_split_rule_single_day_is_cut_in_seven_first():
    assert split_row_ranges({0: 700}) == {
        "train": [(0, 0, 600)], "validation": [(0, 600, 650)], "test": [(0, 650, 700)]}
    assert split_row_ranges({0: 10}) == {
        "train": [(0, 0, 8)], "validation": [(0, 8, 9)], "test": [(0, 9, 10)]}
    assert split_row_ranges({0: 1})["test"] == [(0, 0, 1)]


@pytest.mark.parametrize("rows", [{0: 1}, {0: 13}, {0: 5, 1: 0, 2: 9}, {4: 99, 5: 1, 6: 3}])
def test_splits_cover_every_row_once(rows):
    seen = {d: np.zeros(n, int) for d, n in rows.items()}
    for ranges in split_row_ranges(rows).values():
        for d, a, b in ranges:
            assert a < b
            seen[d][a:b] += 1
    assert all((s == 1).all() for s in seen.values())


def test_pieces_follow_the_rule_and_respect_blocks(dataset):
    assert split_sizes(dataset) == {"train": 1700, "validation": 500, "test": 501}
    for split in datasets.SPLITS:
        pieces = split_pieces(dataset, split, block_rows=256)
        assert all(p.rows <= 300 for p in pieces)  # a row group is never split further
        got = pa.concat_tables([read_piece(p) for p in pieces])
        assert got.equals(_expected(split)), split
    big = split_pieces(dataset, "train", block_rows=1 << 20)
    assert len(big) == 2  # small row groups are gathered: one piece per file here


def test_a_dataset_without_manifest_is_refused(tmp_path):
    path = shard_path(tmp_path, 0, 0)
    path.parent.mkdir(parents=True)
    pq.write_table(_day_table(0).slice(0, 5), path)
    with pytest.raises(FileNotFoundError, match="manifest"):
        split_pieces(tmp_path, "train")


def test_the_files_a_manifest_lists_are_the_data(tmp_path):
    table = _day_table(0)
    for part in range(3):  # part 2 is left over from an earlier run: not listed
        path = shard_path(tmp_path, 0, part)
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table.slice(100 * part, 100), path)
    files = [{"path": f"day=0/part-0000{p}.parquet"} for p in (0, 1)]
    write_json_atomic({"days": {"0": {"files": files}}}, tmp_path / "manifest.json")
    assert [(f.day, f.part, f.rows) for f in datasets.discover_shards(tmp_path)] == [
        (0, 0, 100), (0, 1, 100)]
    assert split_sizes(tmp_path) == {"train": 171, "validation": 14, "test": 15}
    shard_path(tmp_path, 0, 1).unlink()
    with pytest.raises(FileNotFoundError, match="missing"):
        datasets.discover_shards(tmp_path)


def test_local_batches_are_the_transformed_rows(dataset):
    ref = transform_table(_expected("validation"))
    batches = list(iter_local_batches(dataset, "validation", 96, block_rows=128))
    assert [len(b["label"]) for b in batches] == [96] * 5 + [20]
    import torch

    first = batches[0]
    assert first["dense"].dtype == torch.float32 and first["dense"].shape == (96, 13)
    assert first["sparse"].dtype == torch.int64 and first["sparse"].shape == (96, 26)
    assert first["label"].dtype == torch.float32 and first["label"].shape == (96,)
    for key in ("dense", "sparse", "label"):
        got = torch.cat([b[key] for b in batches]).numpy()
        np.testing.assert_array_equal(got, ref[key])
    as_numpy = list(iter_local_batches(dataset, "validation", 96, as_torch=False,
                                       drop_last=True))
    assert len(as_numpy) == 5 and isinstance(as_numpy[0]["dense"], np.ndarray)
    np.testing.assert_array_equal(np.concatenate([b["sparse"] for b in as_numpy]),
                                  ref["sparse"][:480])


def _sorted_rows(block: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    order = np.lexsort(np.concatenate([block["sparse"], block["dense"]], axis=1).T)
    return {k: v[order] for k, v in block.items()}


def test_ray_dataset_applies_the_transform(ray_cluster, dataset):
    for split, n in split_sizes(dataset).items():
        assert make_dataset(dataset, split).count() == n
    ds = make_dataset(dataset, "train", block_rows=256, shuffle_seed=1)
    schema = ds.schema()
    assert set(schema.names) == {"dense", "sparse", "label"}
    (shard,) = ds.streaming_split(1)  # what Ray Train hands a worker
    batches = list(iter_worker_batches(shard, 128))
    sizes = [len(b["label"]) for b in batches]
    assert sizes[:-1] == [128] * (len(sizes) - 1) and sum(sizes) == 1700
    import torch

    b = batches[0]
    assert (b["dense"].dtype, b["sparse"].dtype, b["label"].dtype) == (
        torch.float32, torch.int64, torch.float32)
    assert b["dense"].shape == (128, 13) and b["sparse"].shape == (128, 26)
    got = {k: torch.cat([x[k] for x in batches]).numpy() for k in ("dense", "sparse", "label")}
    want = transform_table(_expected("train"))
    got, want = _sorted_rows(got), _sorted_rows(want)
    for key in ("dense", "sparse", "label"):
        np.testing.assert_array_equal(got[key], want[key])
    assert (got["sparse"] == -1).any() and (got["dense"] >= 0).all()  # missing → -1, neg → 0


def test_worker_batches_drop_last(ray_cluster, dataset):
    ds = make_dataset(dataset, "test")
    sizes = [len(b["label"]) for b in iter_worker_batches(ds, 100, drop_last=True)]
    assert sizes == [100] * 5


@pytest.mark.slow
def test_torch_trainer_worker_reads_its_shard(ray_cluster, dataset, tmp_path):
    import ray.train
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    def loop(config):
        import tempfile

        rows = positives = 0
        for batch in iter_worker_batches(ray.train.get_dataset_shard("train"), 256):
            rows += len(batch["label"])
            positives += int(batch["label"].sum())
        # Train V2 keeps metrics only with a checkpoint.
        with tempfile.TemporaryDirectory() as d:
            Path(d, "done").write_text("1")
            ray.train.report({"rows": rows, "positives": positives},
                             checkpoint=ray.train.Checkpoint.from_directory(d))

    result = TorchTrainer(
        loop,
        datasets={"train": make_dataset(dataset, "train")},
        scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 0.5}),
        run_config=RunConfig(storage_path=str(tmp_path), name="read"),
    ).fit()
    assert result.metrics["rows"] == 1700
    assert result.metrics["positives"] == int(_expected("train")["label"].to_numpy().sum())
