"""CAFE with one hot table and sketch for every CAFE feature: hot rows go where they matter
most across features, the serving form scores exactly as trained, bytes stay on budget,
checkpoints carry the shared state."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from embeddings.collection import CollectionConfig, EmbeddingCollection
from embeddings.methods.cafe_shared import SharedCafeEmbedding, key_ids, key_members, member_keys
from embeddings.tables import TableOptimizer

CARDS = [50_000, 64, 3_000, 40]


def _config(**kw) -> CollectionConfig:
    return CollectionConfig(dim=8, cardinalities=CARDS, ratio=50, allocation="sqrt",
                            method={"method": "cafe", "hot_table": "shared", **kw})


def _batch(rng: np.random.Generator, n: int = 512) -> torch.Tensor:
    # Zipf ids: every value of the small features is frequent, the large ones have a head.
    cols = [rng.zipf(1.2, size=n) % c for c in CARDS]
    return torch.from_numpy(np.stack(cols, 1).astype(np.int64))


def _train(col: EmbeddingCollection, steps: int, seed: int = 0) -> list[float]:
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    target = torch.randn(len(CARDS), 8)
    col.train()
    losses = []
    for _ in range(steps):
        loss = ((col(_batch(rng)) - target) ** 2).mean()
        loss.backward()
        col.step()
        losses.append(float(loss.detach()))
    return losses


@pytest.fixture(scope="module")
def trained() -> EmbeddingCollection:
    torch.manual_seed(0)
    col = EmbeddingCollection(_config(), optimizer=TableOptimizer(lr=0.1))
    _train(col, 150)
    return col


def test_keys_pack_the_feature_and_give_the_id_back() -> None:
    ids = np.array([0, 1, -1, 2**32 - 1, 2**55 - 1, -(2**55)], dtype=np.int64)
    keys = member_keys(ids, 5)
    assert (keys > 0).all() and (key_members(keys) == 5).all()
    assert (key_ids(keys) == ids).all()
    assert len(set(member_keys(np.array([7]), 0)) | set(member_keys(np.array([7]), 1))) == 2


def test_hot_rows_go_to_the_features_whose_ids_matter_most(trained) -> None:
    (group,) = trained.cafe_groups
    members = [trained.embeddings[n] for n in group.members]
    assert all(isinstance(m, SharedCafeEmbedding) and m.joined for m in members)
    assert group.hot_rows == sum(m.hot_rows for m in members)
    held = np.bincount(key_members(group.sketch.hot_ids()), minlength=len(members))
    assert held.sum() == group.hot_rows  # every hot row in use
    # The 64-value feature brought a couple of rows but its values are all frequent.
    small = group.members.index("C2")
    assert held[small] > 5 * members[small].hot_rows


def test_the_serving_form_scores_exactly_as_trained(trained) -> None:
    trained.eval()
    served = trained.collapse()
    seen = _batch(np.random.default_rng(9), 4000)
    unseen = torch.randint(-(2**40), 2**40, (1000, len(CARDS)))
    missing = torch.full((8, len(CARDS)), -1)
    for ids in (seen, unseen, missing):
        with torch.no_grad():
            torch.testing.assert_close(served(ids), trained(ids), rtol=0, atol=1e-6)
    trained.train()


def test_serving_bytes_are_exact_and_on_budget(trained) -> None:
    config = _config()
    served = trained.collapse()
    assert served.serving_bytes() == trained.serving_bytes()
    assert trained.serving_bytes() <= config.allocate().planned_bytes <= config.target_bytes()


def test_a_checkpoint_restores_the_hot_table_and_the_sketch(trained) -> None:
    torch.manual_seed(1)
    again = EmbeddingCollection(_config(), optimizer=TableOptimizer(lr=0.1))
    again.load_state_dict(trained.state_dict())
    np.testing.assert_array_equal(again.cafe_groups[0].sketch.keys,
                                  trained.cafe_groups[0].sketch.keys)
    ids = _batch(np.random.default_rng(4), 256)
    trained.eval()
    again.eval()
    with torch.no_grad():
        torch.testing.assert_close(again(ids), trained(ids), rtol=0, atol=0)
    trained.train()


def test_the_fbgemm_store_and_the_torch_fallback_train_alike() -> None:
    runs = []
    for backend in ("fbgemm", "torch"):
        torch.manual_seed(0)
        col = EmbeddingCollection(_config(), optimizer=TableOptimizer(lr=0.1), backend=backend)
        runs.append(_train(col, 30))
    assert runs[0] == pytest.approx(runs[1], rel=1e-4, abs=1e-5)


def test_ids_beyond_56_bits_are_refused_with_the_reason() -> None:
    col = EmbeddingCollection(_config(), optimizer=TableOptimizer(lr=0.1))
    with pytest.raises(ValueError, match=r"ids must lie in \[-2\^55, 2\^55\)"):
        col(torch.full((2, len(CARDS)), 2**60))


def test_the_sharder_keeps_hot_tables_out_of_the_dense_optimizer() -> None:
    from embeddings.methods.cafe import CafeConfig
    from embeddings.sharding import FeatureSize, ShardedEmbeddingCollection, plan_sharding

    sizes = [FeatureSize(name=f"C{i + 1}", bytes=n) for i, n in enumerate(CARDS)]
    plan = plan_sharding(sizes, 1, replicate_below_bytes=0)
    config = CafeConfig(ratio=20, hot_table="shared")
    router = ShardedEmbeddingCollection(
        plan, lambda i, s, shards: config.build(-(-CARDS[i] // shards), 8), 8)
    (group,) = router.local.cafe_groups
    dense = {id(p) for p in router.dense_parameters()}
    assert not dense & {id(p) for p in group.store.parameters()}
    assert not dense & {id(p) for p in router.local.store.parameters()}


def test_a_feature_joins_one_group_only(trained) -> None:
    with pytest.raises(ValueError, match="already belongs to a collection's group"):
        EmbeddingCollection.from_methods(dict(trained.embeddings), 8)
