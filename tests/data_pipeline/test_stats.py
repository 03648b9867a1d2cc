"""Feature statistics: exact counts, the sketch's guarantees, bands, and the files on disk."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from data_pipeline import stats
from data_pipeline.datasets import split_row_ranges
from data_pipeline.schema import SPARSE_COLUMNS, arrow_schema
from data_pipeline.shards import shard_path, write_json_atomic, write_table_atomic
from data_pipeline.stats import DatasetStats, load_feature_stats, write_feature_stats
from data_pipeline.synthetic import SynthConfig, generate


def _table(c1: list[int | None], c2: list[int | None]) -> pa.Table:
    n = len(c1)
    cols = {f.name: pa.nulls(n, f.type) for f in arrow_schema()}
    cols["label"] = pa.array([0] * n, pa.int8())
    cols["C1"] = pa.array(c1, pa.int64())
    cols["C2"] = pa.array(c2, pa.int64())
    return pa.table(cols, schema=arrow_schema())


@pytest.fixture()
def small(tmp_path) -> tuple[Path, list[int | None]]:
    """Two days; day 0 (train) split over two files, day 1 is validation + test."""
    rng = np.random.default_rng(0)
    c1 = [int(v) for v in rng.zipf(1.5, 700) % 50]
    c1 = [None if i % 7 == 0 else v for i, v in enumerate(c1)]
    days = {0: [c1[:400], c1[400:]], 1: [[1, 2, 3] * 30]}
    for day, parts in days.items():
        for part, vals in enumerate(parts):
            write_table_atomic(_table(vals, [5] * len(vals)), shard_path(tmp_path, day, part))
    write_json_atomic({"days": {str(d): {} for d in days}}, tmp_path / "manifest.json")
    return tmp_path, c1


def test_exact_counts_on_a_small_table(small):
    root, c1 = small
    out = write_feature_stats(root, use_ray=False)
    assert out == root / "stats" and (out / "stats.json").is_file()
    st = load_feature_stats(root)
    assert st.mode == "exact" and st.rows == 700
    expected = Counter(v for v in c1 if v is not None)
    ids, counts = st.counts("C1")
    assert ids.dtype == np.int64 and counts.dtype == np.int64
    assert dict(zip(ids.tolist(), counts.tolist(), strict=True)) == expected
    assert (np.diff(counts) <= 0).all()  # by count, descending
    assert st.total("C1") == sum(expected.values()) and st.missing("C1") == 100
    assert st.num_distinct("C1") == len(expected)
    np.testing.assert_array_equal(st.estimate(0, [ids[0], 10**9]), [counts[0], 0])
    assert st.counts("C2")[0].tolist() == [5] and st.counts("C2")[1].tolist() == [700]
    assert len(st.counts("C3")[0]) == 0 and st.total("C3") == 0  # all missing


def test_counts_come_from_the_chosen_split(small):
    root, _ = small
    write_feature_stats(root, split="validation", use_ray=False)
    st = load_feature_stats(root / "stats")  # the folder itself loads too
    assert st.rows == 45 and st.meta["split"] == "validation"
    assert st.counts("C1")[1].tolist() == [15, 15, 15]
    write_feature_stats(root, split="all", use_ray=False)
    assert load_feature_stats(root).rows == 790


def test_frequency_bands(small):
    root, _ = small
    write_feature_stats(root, use_ray=False)
    st = load_feature_stats(root)
    ids, counts = st.counts("C1")
    bands = st.frequency_band("C1", np.concatenate([ids, [10**9]]))
    assert bands.dtype == np.int8
    hot = st.hot_threshold("C1")
    assert hot == max(stats.RARE_BELOW, int(np.ceil(stats.HOT_SHARE * st.total("C1"))))
    want = np.where(counts < stats.RARE_BELOW, 0, np.where(counts >= hot, 2, 1))
    np.testing.assert_array_equal(bands[:-1], want)
    assert bands[-1] == 0  # never seen: rare
    assert set(bands.tolist()) == {0, 2}  # 10 ≤ hot threshold here, so nothing is medium


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    generate(SynthConfig(rows=140_000, days=2, seed=2), root, use_ray=False)
    return root


def test_features_come_in_column_order(synthetic_root):
    # stats.json is written with sorted keys (C1, C10, C11, ...): a caller that zips the
    # features with a batch's columns must still get C1, C2, ..., C26.
    write_feature_stats(synthetic_root, use_ray=False)
    st = load_feature_stats(synthetic_root)
    assert st.features == SPARSE_COLUMNS
    assert st.num_distinct("C2") <= 64 < 1000 < st.num_distinct("C10")


def test_sketch_never_undercounts_and_finds_the_heavy_hitters(synthetic_root):
    write_feature_stats(synthetic_root, mode="exact", use_ray=False)
    exact = load_feature_stats(synthetic_root)
    write_feature_stats(synthetic_root, mode="sketch", sketch_width=1 << 12, top_k=500,
                        use_ray=False)
    sketch = load_feature_stats(synthetic_root)
    assert sketch.mode == "sketch"
    for feature in ("C1", "C10", "C20", "C9"):
        ids, counts = exact.counts(feature)
        est = sketch.estimate(feature, ids)
        assert (est >= counts).all(), feature
        # Over-count stays within the count-min bound: e/width of the total, w.h.p.
        assert (est - counts).max() <= np.e / (1 << 12) * exact.total(feature) * 2
        top_ids, top_counts = sketch.counts(feature)
        k = min(100, len(ids))
        assert len(set(top_ids[:k].tolist()) & set(ids[:k].tolist())) >= 0.95 * k
        assert (np.diff(top_counts) <= 0).all()
        assert sketch.total(feature) == exact.total(feature)
        distinct = exact.num_distinct(feature)
        assert abs(sketch.num_distinct(feature) - distinct) <= 0.05 * distinct + 1


def test_auto_mode_switches_at_the_row_limit(synthetic_root):
    write_feature_stats(synthetic_root, exact_row_limit=1000, sketch_width=1 << 10,
                        top_k=50, use_ray=False)
    assert load_feature_stats(synthetic_root).mode == "sketch"
    write_feature_stats(synthetic_root, use_ray=False)
    assert load_feature_stats(synthetic_root).mode == "exact"


def test_ray_tasks_give_the_same_counts(ray_cluster, synthetic_root, monkeypatch):
    write_feature_stats(synthetic_root, use_ray=False)
    local = load_feature_stats(synthetic_root)
    monkeypatch.setattr(stats, "ROWS_PER_TASK", 30_000)  # several tasks, merged as they come
    write_feature_stats(synthetic_root, use_ray=True)
    remote = load_feature_stats(synthetic_root)
    rows = split_row_ranges({0: 70_000, 1: 70_000})["train"][0][2]
    assert remote.rows == local.rows == rows
    for feature in SPARSE_COLUMNS:
        for a, b in zip(local.counts(feature), remote.counts(feature), strict=True):
            np.testing.assert_array_equal(a, b)


def test_unknown_feature_and_missing_stats(tmp_path):
    with pytest.raises(FileNotFoundError, match="write_feature_stats"):
        load_feature_stats(tmp_path)
    st = DatasetStats(tmp_path, {"mode": "exact", "rows": 0, "rare_below": 10,
                                 "hot_share": 1e-4, "features": {}}, {})
    with pytest.raises(KeyError, match=r"C1\.\.C26"):
        st.counts("I1")


def test_hyperloglog_on_known_sets():
    for n in (10, 1000, 200_000):
        regs = stats.hll_registers(np.arange(n, dtype=np.int64) * 7919)
        assert abs(stats.hll_estimate(regs) - n) <= 0.03 * n + 1
