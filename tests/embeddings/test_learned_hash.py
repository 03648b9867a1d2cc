import numpy as np
import pytest
import torch

from embeddings.collection import CollectionConfig, EmbeddingCollection
from embeddings.methods.base import FeatureStats, Mapper, tensor_bytes
from embeddings.methods.learned_hash import (
    LearnedHashConfig,
    LearnedHashMapper,
    fit_learned_hash,
    weighted_kmeans,
)
from embeddings.optim import RowWiseAdagrad
from idhash.splitmix import hash_bucket

pytestmark = pytest.mark.usefixtures("one_thread")


def zipf_feature(values: int, seed: int, small_dim: int = 4, blobs: int = 20):
    """Raw ids, Zipf counts (most frequent first) and small embeddings from `blobs` blobs."""
    rng = np.random.default_rng(seed)
    ids = rng.choice(np.arange(-(2**40), 2**40, 7919), size=values, replace=False)
    counts = np.maximum(1, (1e5 * np.arange(1, values + 1) ** -1.1).astype(np.int64))
    blob = rng.integers(0, blobs, size=values)
    centres = rng.normal(size=(blobs, small_dim)) * 10
    small = centres[blob] + rng.normal(size=(values, small_dim)) * 0.1
    return ids, counts, small.astype(np.float32), blob


def rows_of(mapper: LearnedHashMapper, ids: np.ndarray) -> np.ndarray:
    return mapper(torch.from_numpy(ids)).rows[:, 0].numpy()


def test_most_frequent_ids_own_their_rows():
    ids, counts, small, _ = zipf_feature(5000, seed=0)
    mapper = fit_learned_hash(ids, counts, small, rows=500, hot_fraction=0.2)
    assert mapper.own_rows == 100
    rows = rows_of(mapper, ids)
    np.testing.assert_array_equal(rows[:100], np.arange(100))  # ids come most frequent first
    assert (rows[100:] >= 100).all() and (rows < 500).all()
    unseen = rows_of(mapper, np.arange(10_000, dtype=np.int64) * 3 + 1)
    assert (unseen >= 100).all()


def test_similar_ids_collide_more_than_random_ones():
    ids, counts, small, blob = zipf_feature(4000, seed=1)
    mapper = fit_learned_hash(ids, counts, small, rows=400, hot_fraction=0.1)
    rows = rows_of(mapper, ids)[400 // 10 :]
    blob = blob[400 // 10 :]
    same_row = rows[:, None] == rows[None, :]
    same_blob = blob[:, None] == blob[None, :]
    off = ~np.eye(len(rows), dtype=bool)
    p_similar = same_row[same_blob & off].mean()
    p_other = same_row[~same_blob].mean()
    # A random hash into the 360 cluster rows makes any two ids share one with p = 1/360.
    p_random = 1 / 360
    assert p_similar > 10 * p_random and p_other < p_random / 10


def test_kmeans_centres_follow_the_frequent_points():
    points = torch.tensor([[0.0], [1.0], [10.0], [11.0]])
    heavy_left = weighted_kmeans(points, torch.tensor([100.0, 1.0, 1.0, 100.0]), 2, seed=0)
    assert heavy_left[0] == heavy_left[1] and heavy_left[2] == heavy_left[3]
    assert heavy_left[0] != heavy_left[2]
    assert weighted_kmeans(points, torch.ones(4), 9).tolist() == [0, 1, 2, 3]


def test_unseen_ids_hash_deterministically_into_the_cluster_rows():
    ids, counts, small, _ = zipf_feature(2000, seed=2)
    mapper = fit_learned_hash(ids, counts, small, rows=300, hot_fraction=0.5, seed=7)
    unseen = torch.arange(10**12, 10**12 + 5000)
    expected = 150 + hash_bucket(unseen, 150, 7)
    assert torch.equal(mapper(unseen).rows[:, 0], expected)
    again = fit_learned_hash(ids, counts, small, rows=300, hot_fraction=0.5, seed=7)
    assert torch.equal(again(unseen).rows, mapper(unseen).rows)


def test_export_round_trip_gives_the_identical_mapping():
    ids, counts, small, _ = zipf_feature(3000, seed=3)
    mapper = fit_learned_hash(ids, counts, small, rows=200, hot_fraction=0.3, max_ids=1000)
    config, tensors = mapper.export()
    rebuilt = Mapper.build("learned_hash", config, tensors)
    assert rebuilt.export()[0] == config
    probe = torch.cat([torch.from_numpy(ids), torch.arange(-500, 500)])
    assert torch.equal(rebuilt(probe).rows, mapper(probe).rows)
    assert tensors["values"].numel() == 1000  # only the 1000 most frequent are mapped
    assert mapper.state_bytes() == 1000 * (8 + 4)


def train(emb, values: np.ndarray, steps: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    cdf = np.cumsum(np.arange(1, len(values) + 1, dtype=np.float64) ** -1.1)
    target = torch.randn(len(values), emb.dim)
    tables = RowWiseAdagrad(list(emb.tables), lr=0.05)
    dense = torch.optim.Adam([emb.projection], lr=1e-3) if emb.projection is not None else None
    for _ in range(steps):
        ranks = np.searchsorted(cdf / cdf[-1], rng.random(256))
        loss = ((emb(torch.from_numpy(values[ranks])) - target[ranks]) ** 2).sum(1).mean()
        tables.zero_grad()
        if dense is not None:
            dense.zero_grad()
        loss.backward()
        tables.step()
        if dense is not None:
            dense.step()
        emb.after_step(tables)


@pytest.mark.parametrize("mlet_dim", [None, 32])
def test_serving_form_equals_training_form_for_seen_and_unseen_ids(mlet_dim):
    ids, counts, small, _ = zipf_feature(3000, seed=4)
    config = LearnedHashConfig(rows=300, hot_fraction=0.3, mlet_dim=mlet_dim)
    emb = config.build(3000, 8, FeatureStats(ids, counts), small_embeddings=small)
    train(emb, ids, 300)
    emb.eval()
    serving = emb.collapse()
    unseen = torch.arange(10**12, 10**12 + 1000)
    for probe in (torch.from_numpy(ids), unseen):
        with torch.no_grad():
            torch.testing.assert_close(serving(probe), emb(probe), rtol=0, atol=1e-5)
    assert (
        emb.serving_bytes()
        == serving.serving_bytes()
        == (tensor_bytes(serving.mapper.buffers()) + 300 * 8 * 4)
    )
    assert emb.training_bytes() == tensor_bytes(emb.parameters()) + tensor_bytes(emb.buffers())


def test_config_needs_statistics_and_plans_bytes_without_fitting():
    with pytest.raises(ValueError, match="frequency statistics"):
        LearnedHashConfig(ratio=10).build(5000, 8)
    ids, counts, _, _ = zipf_feature(5000, seed=6)
    stats = {"C1": FeatureStats(ids, counts)}
    config = CollectionConfig(
        dim=8, cardinalities=[5000], ratio=10, method={"method": "learned_hash"}
    )
    collection = EmbeddingCollection(config, stats)
    sized = collection.method_configs["C1"]
    planned = sized.planned_bytes(5000, 8, stats["C1"])
    emb = collection.embeddings["C1"]
    rows = emb.tables[0].shape[0]
    # The id map is paid out of the budget: fewer rows than 5000 / 10.
    assert emb.mapper.kind == "learned_hash" and rows == sized.table_rows(5000) < 500
    assert planned.training == emb.training_bytes()
    assert planned.serving == emb.serving_bytes()
    assert 0.95 * 5000 * 8 * 4 / 10 <= emb.serving_bytes() <= 5000 * 8 * 4 / 10
    assert emb.mapper.values.numel() == 4 * rows  # mapped_per_row 4 × rows
