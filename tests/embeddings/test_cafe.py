import numpy as np
import pytest
import torch

from embeddings import budget
from embeddings.collection import CollectionConfig, EmbeddingCollection
from embeddings.hotsketch import DEMOTE, PROMOTE, SketchEvents
from embeddings.mapping import FrozenCafeMapper
from embeddings.methods.base import Mapper, tensor_bytes
from embeddings.methods.cafe import CafeConfig, CafeEmbedding, cafe_defaults
from embeddings.optim import LazyAdam, RowWiseAdagrad
from embeddings.tables import TableOptimizer

pytestmark = pytest.mark.usefixtures("one_thread")


class RecordingCafe(CafeEmbedding):
    """Keeps every migration event so a test can see that both directions happened."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.kinds: list[int] = []

    def migrate(self, events: SketchEvents, optimizer) -> None:
        self.kinds.extend(events.kind.tolist())
        super().migrate(events, optimizer)


def test_defaults_and_sizes_follow_the_artifact():
    assert cafe_defaults(2) == (10, 0.7)
    assert cafe_defaults(10) == (20, 0.5)
    assert cafe_defaults(100) == (100, 0.3)
    assert cafe_defaults(1000) == (500, 0.2)
    assert cafe_defaults(2000) == cafe_defaults(10_000) == (500, 0.1)
    hot, hashed, threshold = CafeConfig(ratio=10).sizes(1_000_000, 16)
    assert hot == int(100_000 * 0.5 * 64 / (64 + 48))
    assert hashed == 50_000 and threshold == 20


def test_the_artifact_keeps_features_of_at_most_2000_over_ratio_values_whole():
    # The artifact's rule is a collection-wide one: the `uniform` allocation applies it;
    # a CAFE config alone builds CAFE at any size (tiny tables are the allocator's call).
    config = CollectionConfig(dim=8, cardinalities=[100, 300, 50_000], ratio=10,
                              method={"method": "cafe"}, allocation="uniform")
    allocated = config.allocate()
    # The whole feature's bytes are paid by the others: they are cut a little harder.
    assert 10 < allocated.ratio < 2000 / 100 and allocated.whole == ["C1"]
    assert isinstance(CafeConfig(ratio=10).build(200, 8), CafeEmbedding)


def hash_rows(emb: CafeEmbedding, value: int) -> tuple[int, int]:
    """(hash1 row, hash2 row) of one id."""
    ids = torch.tensor([value])
    mapper = emb.mapper
    return int(mapper.hash1_rows(mapper.hash(ids))[0]), int(mapper.hash2_rows(ids)[0])


def force(emb: CafeEmbedding, ids: list[int], scores: list[float]) -> SketchEvents:
    """Put ids into the sketch with given scores and apply the resulting migrations."""
    events = emb.sketch.insert(torch.tensor(ids), torch.tensor(scores))
    emb.migrate(events, None)
    return events


def test_hot_medium_and_cold_ids_read_as_specified():
    emb = CafeEmbedding(4, 50, 8, threshold=10, adaptive=False)
    hot_id, medium_id, cold_id, unseen = 11, 22, 33, 44
    force(emb, [hot_id, medium_id, cold_id], [10.0, 2.0, 1.9])  # medium from 0.2 × 10
    ids = torch.tensor([hot_id, medium_id, cold_id, unseen])
    lookup = emb.mapper(ids)
    assert lookup.weights.tolist() == [[1, 0, 0], [0, 1, 1], [0, 1, 0], [0, 1, 0]]
    hot_t, h1, h2 = emb.tables
    rows = lookup.rows
    expected = torch.stack(
        [
            hot_t[rows[0, 0]],
            h1[rows[1, 1]] + h2[rows[1, 2]],
            h1[rows[2, 1]],
            h1[rows[3, 1]],
        ]
    )
    torch.testing.assert_close(emb(ids), expected, rtol=0, atol=0)


def test_promotion_starts_from_the_current_vector_and_takes_the_hash_rows_state():
    emb = CafeEmbedding(4, 50, 8, threshold=10, adaptive=False, sparse=True)
    opt = RowWiseAdagrad(list(emb.tables), lr=0.1)
    for t, table in enumerate(emb.tables):
        opt.state_for(table)["sum"].copy_(torch.arange(table.shape[0]) + 100.0 * t)
    force(emb, [5], [3.0])  # medium: reads hash1 + hash2
    before = emb(torch.tensor([5])).detach()
    events = force(emb, [5], [7.0])  # reaches 10: promoted
    assert events.kind.tolist() == [PROMOTE]
    emb.migrate(events, opt)  # once more, now with the optimizer, to check the state copy
    row = int(events.rows[0])
    torch.testing.assert_close(emb.tables[0][row], before[0])
    torch.testing.assert_close(emb(torch.tensor([5])).detach(), before)
    h1 = int(hash_rows(emb, 5)[0])
    assert opt.state[emb.tables[0]]["sum"][row] == 100.0 + h1


def test_promotion_during_training_keeps_the_vector_the_id_read():
    emb = CafeEmbedding(4, 50, 8, threshold=10, adaptive=False, sparse=True)
    force(emb, [5], [3.0])  # medium
    ids = torch.full((8,), 5)
    before = emb(ids).detach()
    emb(ids).sum().backward()  # no optimizer step: only the sketch moves
    emb.after_step(None)  # eight equal gradients, importance 1 each: 3 + 8 ≥ 10
    assert emb.sketch.hot_ids().tolist() == [5]
    torch.testing.assert_close(emb(ids).detach(), before, rtol=0, atol=1e-6)


def test_demotion_copies_the_hot_row_back_and_its_state_never_a_zero_row():
    emb = CafeEmbedding(1, 50, 8, threshold=5, adaptive=False, decay_period=10, sparse=True)
    opt = LazyAdam(list(emb.tables), lr=0.1)
    force(emb, [7], [5.0])
    with torch.no_grad():
        emb.tables[0][0] = 3.0  # what the hot row learned
    for table in emb.tables:
        state = opt.state_for(table)
        state["exp_avg"].fill_(0.5 if table is emb.tables[0] else -1.0)
        state["step"].fill_(9.0 if table is emb.tables[0] else 1.0)
    events = emb.sketch.insert(torch.tensor([8]), torch.tensor([45.0]))  # decay: 7 → 4.95
    assert events.kind.tolist()[0] == DEMOTE
    emb.migrate(events, opt)
    assert events.medium.tolist()[0]  # 4.95 ≥ 0.2 × 5: it now reads hash1 + hash2
    h1, h2 = hash_rows(emb, 7)
    torch.testing.assert_close(emb.tables[1][h1] + emb.tables[2][h2], torch.full((8,), 3.0))
    torch.testing.assert_close(emb(torch.tensor([7]))[0], torch.full((8,), 3.0))
    assert (opt.state[emb.tables[1]]["exp_avg"][h1] == 0.5).all()
    assert opt.state[emb.tables[1]]["step"][h1] == 9.0
    assert all(bool((t.abs().sum(1) > 0).all()) for t in emb.tables)


def train(emb: CafeEmbedding, steps: int, values: np.ndarray, seed: int = 0) -> None:
    """Regress each id onto a fixed random target: real gradients, real migrations."""
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    cdf = np.cumsum(np.arange(1, len(values) + 1, dtype=np.float64) ** -1.1)
    target = torch.randn(len(values), emb.dim)
    tables = RowWiseAdagrad(list(emb.tables), lr=0.05)
    dense = torch.optim.Adam([emb.projection], lr=1e-3) if emb.projection is not None else None
    for _ in range(steps):
        ranks = np.searchsorted(cdf / cdf[-1], rng.random(256))
        out = emb(torch.from_numpy(values[ranks]))
        loss = ((out - target[ranks]) ** 2).sum(1).mean()
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
    values = np.random.default_rng(1).integers(-(2**62), 2**62, size=3000)
    emb = RecordingCafe(60, 120, 8, threshold=4, mlet_dim=mlet_dim, sparse=True, decay_period=1.0)
    train(emb, 300, values)
    assert PROMOTE in emb.kinds and DEMOTE in emb.kinds
    hot, medium = emb.mapper.classify(torch.from_numpy(values))
    # a demotion in the last step can leave a hot row free until the next promotion
    held = len(emb.sketch.hot_ids())
    assert held == 60 - emb.sketch.free_rows and held >= 55
    assert (hot >= 0).sum() == held and medium.any() and ((hot < 0) & ~medium).any()
    emb.eval()
    serving = emb.collapse()
    assert serving.mapper.kind == "cafe" and serving.mapper.frozen
    unseen = torch.from_numpy(np.random.default_rng(2).integers(-(2**62), 2**62, size=1000))
    for ids in (torch.from_numpy(values), unseen):
        with torch.no_grad():
            torch.testing.assert_close(serving(ids), emb(ids), rtol=0, atol=1e-5)
    assert all(bool((t.abs().sum(1) > 0).all()) for t in emb.tables)


def test_byte_counts_are_exact():
    values = np.random.default_rng(3).integers(-(2**62), 2**62, size=2000)
    emb = CafeEmbedding(40, 100, 8, threshold=4, mlet_dim=16, sparse=True, decay_period=1.0)
    train(emb, 50, values)
    sketch = sum(a.nbytes for a in emb.sketch.arrays().values())
    params = tensor_bytes(emb.parameters())
    assert emb.training_bytes() == params + sketch
    assert sketch == 40 * 4 * (8 + 4 + 4) + 40 * 4 + 2 * 8 + 4 * 8 + 8
    serving = emb.collapse()
    frozen = serving.mapper.frozen_ids.numel() * 8 + serving.mapper.frozen_rows.numel() * 4
    tables = sum(t.numel() * 4 for t in emb.tables) // 16 * 8  # folded from k=16 to d=8
    assert serving.serving_bytes() == frozen + tables
    assert emb.serving_bytes() == serving.serving_bytes()
    assert frozen == emb.sketch.frozen_size() * 12 > 0


def test_export_round_trip_and_checkpoint_restore_the_same_mapping():
    values = np.random.default_rng(4).integers(-(2**62), 2**62, size=2000)
    emb = CafeEmbedding(30, 80, 8, threshold=4, sparse=True, decay_period=1.0, seed=3)
    train(emb, 60, values)
    config, tensors = emb.mapper.export()
    rebuilt = Mapper.build("cafe", config, tensors)
    assert type(rebuilt) is FrozenCafeMapper and rebuilt.frozen and not emb.mapper.frozen
    again = rebuilt.export()
    assert again[0] == config
    assert all(torch.equal(again[1][k], tensors[k]) for k in tensors)
    probe = torch.cat([torch.from_numpy(values), torch.arange(1000)])
    live, frozen = emb.mapper(probe), rebuilt(probe)
    assert torch.equal(live.rows * live.weights, frozen.rows * frozen.weights)
    restored = CafeEmbedding(30, 80, 8, threshold=4, sparse=True, decay_period=1.0, seed=3)
    restored.load_state_dict(emb.state_dict())
    for name, array in emb.sketch.arrays().items():
        np.testing.assert_array_equal(array, restored.sketch.arrays()[name], err_msg=name)
    emb.eval()
    restored.eval()
    with torch.no_grad():
        assert torch.equal(emb(probe), restored(probe))


def test_collection_builds_cafe_by_ratio_and_forwards_after_step():
    config = CollectionConfig(
        dim=8, cardinalities=[50_000, 100], ratio=10, method={"method": "cafe", "mlet_dim": 16}
    )
    collection = EmbeddingCollection(config, optimizer=TableOptimizer(lr=0.1))
    cafe, small = collection.embeddings.values()
    assert isinstance(cafe, CafeEmbedding) and small.mapper.kind == "full"
    sized = collection.method_configs["C1"]
    assert sized.ratio > 10  # the whole feature's bytes come out of the one budget
    hot, hashed = budget.cafe_rows(50_000, sized.ratio, 0.5, 8)
    assert [t.shape[0] for t in cafe.tables] == [hot, hashed, hashed]
    ids = torch.from_numpy(np.random.default_rng(5).zipf(1.3, size=512)).view(-1, 1)
    sparse = torch.cat([ids, ids % 100], dim=1)
    collection.train()
    collection(sparse).sum().backward()
    collection.step()
    assert cafe.sketch.scores.sum() > 0
    served = collection.collapse()
    collection.eval()
    with torch.no_grad():
        torch.testing.assert_close(served(sparse), collection(sparse), rtol=0, atol=1e-5)


def test_frozen_mapper_needs_no_sketch():
    mapper = FrozenCafeMapper(
        4, 10, buckets=4, frozen_ids=torch.tensor([3, 9]), frozen_rows=torch.tensor([2, -1])
    )
    lookup = mapper(torch.tensor([9, 3, 5]))
    assert lookup.weights.tolist() == [[0, 1, 1], [1, 0, 0], [0, 1, 0]]
    assert lookup.rows[1, 0] == 2
    assert mapper.state_bytes() == mapper.serving_bytes() == 2 * 8 + 2 * 4


@pytest.mark.parametrize("optimizer", [RowWiseAdagrad, LazyAdam])
def test_migration_kernels_move_rows_and_state_exactly_like_tensor_ops(optimizer):
    """The CPU kernels and the any-device tensor path apply one event log identically."""
    rng = np.random.default_rng(3)
    values = rng.integers(-(2**62), 2**62, size=400)
    twins = []
    for _ in range(2):
        torch.manual_seed(0)
        emb = CafeEmbedding(20, 30, 8, threshold=4, sparse=True, decay_period=0.5)
        opt = optimizer(list(emb.tables), lr=0.1)
        for t, table in enumerate(emb.tables[:2]):  # hash2 gets none: a missing side
            for state in opt.state_for(table).values():
                state.copy_(torch.rand(state.shape, generator=torch.Generator().manual_seed(t)))
        twins.append((emb, opt))
    kinds, tagged = [], 0
    for _ in range(30):
        ids = torch.from_numpy(values[rng.integers(0, 400, 64) // rng.integers(1, 9, 64)])
        scores = torch.from_numpy(rng.exponential(2.0, 64).astype(np.float32))
        (fast, fast_opt), (slow, slow_opt) = twins
        # Half the ids come with their hash2 row as a tag (as from forward), half without.
        tags = fast.mapper.hash2_rows(ids).numpy()
        tags[: len(tags) // 2] = -1
        arrays = (ids.numpy(), fast.mapper.hash(ids).numpy(), scores.numpy(), tags)
        events = fast.sketch.update_arrays(*arrays)
        assert slow.sketch.update_arrays(*arrays).log.tolist() == events.log.tolist()
        tagged += int((events.medium & (events.tags >= 0)).sum())
        kinds += events.kind.tolist()
        if not len(events):
            continue
        assert fast._migrate_on_cpu(events, fast_opt)
        slow._migrate_tensors(events, slow_opt)
        for a, b in zip(fast.tables, slow.tables, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        for a, b in zip(fast.tables[:2], slow.tables[:2], strict=True):
            for key, state in fast_opt.state[a].items():
                torch.testing.assert_close(state, slow_opt.state[b][key], rtol=0, atol=0)
    assert PROMOTE in kinds and DEMOTE in kinds
    # Medium ids (two hash rows) moved too, with and without tags from the insert.
    assert tagged > 0 and fast.sketch.frozen_size() > len(fast.sketch.hot_ids())
