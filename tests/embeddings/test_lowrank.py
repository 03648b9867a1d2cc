"""Low-rank (AFM, arXiv 2405.18146): the projection from a trained feature's covariance keeps
the variance its eigenvalues predict, over one table or several; the serving form keeps the
rank-k projection and bias, saves and loads, and counts its bytes exactly."""

from __future__ import annotations

import pytest
import torch

from embeddings.collection import CollectionConfig, EmbeddingCollection
from embeddings.mapping import Combiner
from embeddings.methods.base import FeatureStats, TrainedFeature
from embeddings.methods.cafe import CafeConfig
from embeddings.methods.full import FullConfig
from embeddings.methods.lowrank import LowRankConfig, collect_moments, principal_axes
from embeddings.methods.qr import QRConfig
from embeddings.methods.scma import ScmaConfig
from embeddings.serving_io import embedding_from_state, embedding_state

pytestmark = pytest.mark.usefixtures("one_thread")

N, DIM = 3000, 16


def _stats(seed: int = 0) -> FeatureStats:
    # Distinct odd values spread over 32 bits (an odd multiplier is a bijection mod 2^31).
    values = (torch.arange(N) * 2654435761 + 977 * seed + 12345) % 2**31 * 2 + 1
    ranks = torch.arange(1, N + 1, dtype=torch.float64)
    counts = (5000 * ranks.pow(-1.1)).ceil().to(torch.int64)  # Zipf-like, most frequent first
    return FeatureStats(values, counts)


def _trained(config, stats: FeatureStats, spread: float = 1.0) -> TrainedFeature:
    """A "trained" feature whose embeddings concentrate in a few directions plus noise, as
    trained embeddings do (the premise of the paper)."""
    torch.manual_seed(1)
    emb = config.build(N, DIM, stats)
    basis = torch.randn(4, DIM)
    with torch.no_grad():
        for t in emb.tables:
            w = t.shape[1]
            t.copy_(torch.randn(t.shape[0], 4) @ basis[:, :w] * spread
                    + 0.05 * torch.randn(t.shape[0], w) + 0.3)
    return TrainedFeature(emb.collapse(), stats)


def _explained(trained: TrainedFeature, method) -> tuple[float, float]:
    """(explained variance measured over the count-weighted outputs, predicted by eigenvalues)."""
    stats = trained.stats
    w = stats.counts.double()
    with torch.no_grad():
        e = trained.serving(stats.values).double()
        approx = method(stats.values).double()
    _, mean, second = collect_moments(trained.serving, stats)
    eig, _ = principal_axes(mean, second)
    k = method.mlet_dim
    residual = (w[:, None] * (e - approx) ** 2).sum()
    total = (w[:, None] * (e - mean) ** 2).sum()
    return float(1 - residual / total), float(eig[:k].sum() / eig.sum())


@pytest.mark.parametrize("k", [1, 3, 8])
def test_projection_keeps_the_variance_its_eigenvalues_predict(k: int) -> None:
    stats = _stats()
    trained = _trained(FullConfig(), stats)
    method = LowRankConfig(rank=k).from_trained(N, DIM, trained)
    assert method.tables[0].shape == (N, k) and method.projection.shape == (k, DIM)
    measured, predicted = _explained(trained, method)
    assert measured == pytest.approx(predicted, abs=1e-5)
    assert 0 < predicted < 1
    if k >= 4:  # four planted directions hold nearly everything
        assert predicted > 0.95
    # E'U_kᵀ + μ with E' = (E − μ)U_k: the one-table form is the paper's centred one.
    _, mean, _ = collect_moments(trained.serving, stats)
    assert torch.allclose(method.bias.double(), mean, atol=1e-6)


@pytest.mark.parametrize("config", [QRConfig(ratio=4, operation="sum"),
                                    QRConfig(ratio=4, operation="concat"),
                                    CafeConfig(ratio=4)], ids=["qr sum", "qr concat", "cafe"])
def test_several_tables_project_table_by_table_to_the_same_reconstruction(config) -> None:
    stats = _stats()
    trained = _trained(config, stats)
    method = LowRankConfig(rank=4).from_trained(N, DIM, trained)
    measured, predicted = _explained(trained, method)
    assert measured == pytest.approx(predicted, abs=1e-5)
    # μ + (e − μ)UUᵀ for every id, seen or not.
    ids = torch.cat([stats.values, torch.arange(200) * 2])
    _, mean, second = collect_moments(trained.serving, stats)
    _, axes = principal_axes(mean, second)
    u = axes[:, :4]
    with torch.no_grad():
        e = trained.serving(ids).double()
        expected = mean + (e - mean) @ u @ u.T
        assert torch.allclose(method(ids).double(), expected, atol=1e-5)


def test_serving_form_keeps_the_projection_saves_loads_and_counts_bytes() -> None:
    stats = _stats()
    trained = _trained(FullConfig(), stats)
    method = LowRankConfig(ratio=4).from_trained(N, DIM, trained)
    k = DIM // 4
    serving = method.collapse()
    assert [t.width for t in serving.tables] == [k], "folding would undo the compression"
    ids = torch.cat([stats.values, torch.tensor([0, 2**40, -1])])
    with torch.no_grad():
        assert (serving(ids) - method(ids)).abs().max().item() <= 1e-5
    config, tensors = embedding_state(serving, "x.")
    loaded = embedding_from_state(config, tensors, "x.")
    assert torch.equal(loaded(ids), serving(ids))
    mapper = sum(t.numel() * t.element_size() for t in trained.serving.mapper.export()[1].values())
    expected = mapper + 4 * (N * k + k * DIM + DIM)
    assert serving.serving_bytes() == method.serving_bytes() == expected
    assert sum(t.numel() * t.element_size() for t in tensors.values()) == expected
    int8 = serving.quantize("int8")
    assert int8.projection is not None and int8.serving_bytes() == method.serving_bytes("int8")


def test_collection_trains_low_rank_features_from_trained_ones() -> None:
    stats = {"C1": _stats(0), "C2": _stats(1)}
    trained = {name: _trained(FullConfig(), s) for name, s in stats.items()}
    config = CollectionConfig(dim=DIM, cardinalities=[N, N],
                              method={"method": "lowrank", "ratio": 4},
                              features={"C2": {"method": "lowrank", "rank": 2}})
    # A collection ratio sizes every two-stage feature against its trained tables.
    resized = config.model_copy(update={"ratio": 8.0}).resolve(stats)[0]
    assert [resized[n].rank_for(DIM) for n in ("C1", "C2")] == [2, 2]
    collection = EmbeddingCollection(config, stats, backend="torch", trained=trained)
    assert [collection.method(n).mlet_dim for n in ("C1", "C2")] == [4, 2]
    sparse = torch.stack([stats["C1"].values[:500], stats["C2"].values[:500]], dim=1)
    opt = torch.optim.Adam(collection.dense_parameters(), lr=1e-2)
    target = torch.randn(500, 2, DIM) * 0.1
    for _ in range(5):
        loss = (collection(sparse) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        collection.step()
    with torch.no_grad():
        for j, name in enumerate(("C1", "C2")):
            alone = collection.method(name)
            packed = collection(sparse)[:, j]
            assert (alone.collapse()(sparse[:, j]) - packed).abs().max().item() <= 1e-5
        served = collection.collapse()
        assert (served(sparse) - collection(sparse)).abs().max().item() <= 1e-5
    assert collection.method("C1").bias.grad is not None, "the bias fine-tunes"


def test_refusals_say_why() -> None:
    with pytest.raises(ValueError, match="largest is 16"):
        LowRankConfig(ratio=20).check(N, DIM)
    with pytest.raises(ValueError, match="below d"):
        LowRankConfig(rank=DIM).check(N, DIM)
    with pytest.raises(ValueError, match="from_model"):
        LowRankConfig(rank=2).build(N, DIM)
    with pytest.raises(ValueError, match="product"):
        LowRankConfig(rank=2).from_trained(N, DIM, _trained(QRConfig(ratio=4), _stats()))
    with pytest.raises(ValueError, match="MLET"):
        LowRankConfig(rank=2, mlet_dim=32)
    # SCMA's shared array: the reason is the slots, not a width that looks wrong.
    with pytest.raises(ValueError, match=r"one 4-wide table is read at 4 slots \(SCMA"):
        LowRankConfig(rank=2).from_trained(N, DIM, _trained(ScmaConfig(ratio=4, chunk=4),
                                                            _stats()))
    assert Combiner.SUM is LowRankConfig(rank=2).combiner()
