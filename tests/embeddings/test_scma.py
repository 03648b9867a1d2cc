"""SCMA (arXiv 2103.06124): minhash signatures of each value's training rows address one
shared array, so identical row sets share every element; the sketch is bounded and counted."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from data_pipeline.row_signatures import (
    align,
    minhash_signatures,
    read_signatures,
    sign_dataset,
)
from data_pipeline.schema import arrow_schema
from data_pipeline.shards import shard_path, write_json_atomic, write_table_atomic
from data_pipeline.stats import write_feature_stats
from embeddings.collection import CollectionConfig, EmbeddingCollection
from embeddings.methods.base import FeatureStats, with_mlet
from embeddings.methods.hashing_trick import HashConfig
from embeddings.methods.scma import ScmaConfig
from embeddings.optim import RowWiseAdagrad
from embeddings.serving_io import embedding_from_state, embedding_state
from embeddings.tables import TableOptimizer

DIM = 16


def _stats(ids: np.ndarray, rows: np.ndarray, k: int = 4) -> FeatureStats:
    """Statistics of (value, row) memberships, every value signed."""
    stats = FeatureStats.from_ids(torch.from_numpy(ids))
    signed = minhash_signatures(ids, rows, k)
    return FeatureStats(stats.values, stats.counts, align(stats.values.numpy(), signed))


def test_values_with_identical_row_sets_get_identical_embeddings_and_disjoint_sets_differ():
    # Values 7 and 9 occur in exactly the same 40 rows; value 11 in 40 other rows; a
    # background of other values fills the rest.
    rng = np.random.default_rng(0)
    shared, other = np.arange(0, 80, 2), np.arange(1, 81, 2)
    background = rng.integers(100, 200, 2000)
    ids = np.concatenate([np.full(40, 7), np.full(40, 9), np.full(40, 11), background])
    rows = np.concatenate([shared, shared, other, np.arange(100, 2100)])
    stats = _stats(ids, rows)
    config = ScmaConfig(memory=64 * DIM, chunk=1, sketch_share=0.9)
    emb = config.build(200, DIM, stats)
    assert emb.mapper.values.numel() > 3  # the three values are signed
    probe = torch.tensor([7, 9, 11])
    opt = RowWiseAdagrad(emb.parameters(), lr=0.1)
    for _ in range(5):  # training keeps them equal: they read the same elements
        loss = emb(torch.from_numpy(rng.choice(ids, 256))).pow(2).sum() \
            + (emb(torch.tensor([7])) - 1).pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        out = emb(probe)
    assert torch.equal(out[0], out[1])
    assert not torch.equal(out[0], out[2])
    # Disjoint sets share a slot only by chance (1 / rows per element).
    rows7, rows11 = emb.mapper(probe).rows[[0, 2]]
    assert (rows7 == rows11).float().mean() < 0.5
    serving = emb.collapse()
    assert torch.equal(serving(probe), out)


def test_signatures_agree_as_often_as_the_row_sets_overlap():
    # Jaccard(A, B) = 100 / 300: the share of equal minhashes estimates it.
    a, b = np.arange(0, 200), np.arange(100, 300)
    ids = np.concatenate([np.zeros(200, np.int64), np.ones(200, np.int64)])
    _, sig = minhash_signatures(ids, np.concatenate([a, b]), 512)
    agree = float((sig[0] == sig[1]).mean())
    assert agree == pytest.approx(1 / 3, abs=0.07)


def test_the_compiled_training_lookup_reads_the_rows_of_the_serving_mapper():
    pytest.importorskip("numba")
    import numba  # noqa: F401 - loaded, as in every training process: the compiled path

    ids = np.random.default_rng(4).zipf(1.2, 5000) % 700
    emb = ScmaConfig(ratio=4, chunk=4).build(700, DIM, _stats(ids, np.arange(len(ids))))
    probe = torch.cat([torch.from_numpy(ids[:2000]), torch.tensor([2**40, -1, -(2**62)])])
    rows, mask = emb.packed_lookup(probe)
    assert mask is None
    assert torch.equal(rows, emb.collapse().mapper(probe).rows)


def test_unsigned_values_hash_their_id_and_signed_values_their_signatures():
    ids = np.repeat(np.arange(50), 4)
    stats = _stats(ids, np.arange(len(ids)))
    emb = ScmaConfig(memory=4096, chunk=4, min_count=4).build(50, DIM, stats)
    bare = ScmaConfig(memory=4096, chunk=4).build(50, DIM, None)
    signed, unseen = torch.arange(50), torch.arange(1000, 1050)
    assert emb.mapper.values.numel() == 50
    assert not torch.equal(emb.mapper(signed).rows, bare.mapper(signed).rows)
    assert torch.equal(emb.mapper(unseen).rows, bare.mapper(unseen).rows)


@pytest.mark.parametrize("ratio", [10, 100])
def test_bytes_land_on_the_budget_with_the_sketch_counted(ratio: float):
    rng = np.random.default_rng(1)
    n = 20_000
    ids = rng.zipf(1.3, 200_000) % n
    stats = _stats(ids, np.arange(len(ids)))
    config = ScmaConfig(ratio=ratio)
    emb = config.build(n, DIM, stats)
    budget = n * DIM * 4 / ratio
    signed = emb.mapper.values.numel()
    assert signed > 0
    sketch = signed * (8 + 4 * config.signatures)
    assert sketch <= config.sketch_share * budget + 1
    assert emb.serving_bytes() == emb.tables[0].numel() * 4 + sketch
    assert emb.serving_bytes() == pytest.approx(budget, rel=0.05)
    assert config.planned_bytes(n, DIM, stats).serving == emb.serving_bytes()
    # A value below the frequency floor is never signed.
    rare = stats.values[stats.counts < config.min_count]
    assert not torch.isin(rare, emb.mapper.values).any()


def test_serving_form_round_trips_through_its_export_with_and_without_mlet():
    ids = np.random.default_rng(2).integers(0, 500, 5000)
    stats = _stats(ids, np.arange(len(ids)))
    probe = torch.cat([torch.arange(600), torch.tensor([2**40, -1])])
    for config in (ScmaConfig(ratio=4), with_mlet(ScmaConfig(ratio=4), 2 * DIM)):
        emb = config.build(500, DIM, stats)
        serving = emb.collapse()
        cfg, tensors = embedding_state(serving, "x.")
        assert cfg["mapper"]["kind"] == "scma"
        loaded = embedding_from_state(cfg, tensors, "x.")
        with torch.no_grad():
            assert (loaded(probe) - emb(probe)).abs().max() <= 1e-5
        assert loaded.serving_bytes() == emb.serving_bytes()


def test_chunks_narrower_than_fbgemm_allows_train_on_the_torch_store():
    config = CollectionConfig(dim=DIM, cardinalities=[3000], ratio=8,
                              method={"method": "scma", "chunk": 1})
    col = EmbeddingCollection(config, backend="auto")
    assert not col.fused and col.store.table_of == [0] * DIM
    with pytest.raises(ValueError, match="multiples of 4"):
        EmbeddingCollection(config, backend="fbgemm")


@pytest.mark.parametrize("chunk", [4, 8])
def test_fbgemm_and_torch_stores_train_the_same_shared_array(chunk: int):
    pytest.importorskip("fbgemm_gpu", reason="fbgemm_gpu is not installed here")
    rng = np.random.default_rng(3)
    cards = [3000, 800, 3000]
    ids = rng.zipf(1.2, 30_000) % 3000
    stats = _stats(ids, np.arange(len(ids)))
    config = CollectionConfig(dim=DIM, cardinalities=cards, ratio=8,
                              method={"method": "scma", "chunk": chunk},
                              features={"C2": HashConfig(ratio=4)})
    batches = [torch.from_numpy(rng.zipf(1.2, (128, 3)) % 3000) for _ in range(5)]
    head = torch.randn(3 * DIM, generator=torch.Generator().manual_seed(0)) / 10
    out = {}
    for backend in ("fbgemm", "torch"):
        torch.manual_seed(0)
        col = EmbeddingCollection(config, {"C1": stats, "C3": stats}, TableOptimizer(lr=0.1),
                                  backend=backend)
        assert col.store.table_of != list(range(len(col.store.specs)))  # slots are virtual
        curve = []
        for batch in batches:
            loss = (col(batch).flatten(1) @ head).sigmoid().mean()
            loss.backward()
            col.step()
            curve.append(loss.item())
        serving = col.collapse()
        with torch.no_grad():
            assert (serving(batches[0]) - col(batches[0])).abs().max() <= 1e-5
        out[backend] = (curve, serving(batches[0]))
    assert out["fbgemm"][0][-1] != out["fbgemm"][0][0]
    assert out["fbgemm"][0] == pytest.approx(out["torch"][0], rel=1e-5, abs=1e-6)
    torch.testing.assert_close(out["fbgemm"][1], out["torch"][1], rtol=1e-4, atol=1e-5)


def _table(c1: list[int | None], c2: list[int]) -> pa.Table:
    n = len(c1)
    cols = {f.name: pa.nulls(n, f.type) for f in arrow_schema()}
    cols["label"] = pa.array([0] * n, pa.int8())
    cols["C1"] = pa.array(c1, pa.int64())
    cols["C2"] = pa.array(c2, pa.int64())
    return pa.table(cols, schema=arrow_schema())


def test_the_signing_pass_over_shards_equals_signing_the_rows_directly(tmp_path):
    rng = np.random.default_rng(0)
    c1 = [int(v) for v in rng.zipf(1.5, 700) % 50]
    c1 = [None if i % 7 == 0 else v for i, v in enumerate(c1)]
    days = {0: [c1[:400], c1[400:]], 1: [[1, 2, 3] * 30]}
    for day, parts in days.items():
        for part, vals in enumerate(parts):
            write_table_atomic(_table(vals, [5] * len(vals)), shard_path(tmp_path, day, part))
    write_json_atomic({"days": {str(d): {} for d in days}}, tmp_path / "manifest.json")
    stats_dir = write_feature_stats(tmp_path, use_ray=False)
    sign_dataset(tmp_path, k=3, min_count=2)
    values, sigs = read_signatures(stats_dir, "C1")
    present = np.array([v is not None for v in c1])
    ids = np.array([v or 0 for v in c1])[present]
    direct_values, direct = minhash_signatures(ids, np.arange(len(c1))[present], 3)
    counts = dict(zip(*np.unique(ids, return_counts=True), strict=True))
    assert all(counts[v] >= 2 for v in values)
    assert len(values) == sum(c >= 2 for c in counts.values())
    expected = align(values, (direct_values, direct))
    assert np.array_equal(sigs, expected)
    # C2 is 5 in every train row: one value whose set is all 700 rows.
    (five,), five_sig = read_signatures(stats_dir, "C2")
    assert five == 5
    assert np.array_equal(five_sig, align(np.array([5]), minhash_signatures(
        np.full(700, 5), np.arange(700), 3)))


@pytest.mark.parametrize("ratio", [10, 100, 1000])
def test_a_collection_of_scma_features_lands_on_its_budget(ratio: float):
    from data_pipeline.schema import TERABYTE_CARDINALITIES

    cards = [max(3, n // 1000) for n in TERABYTE_CARDINALITIES]
    stats = {}
    rng = np.random.default_rng(5)
    for i, n in enumerate(cards):
        ids = rng.zipf(1.2, 20_000) % n
        stats[f"C{i + 1}"] = _stats(ids, np.arange(len(ids)), 2)
    config = CollectionConfig(dim=DIM, cardinalities=cards, ratio=ratio,
                              method={"method": "scma"})
    allocated = config.allocate(stats)
    target = config.target_bytes()
    assert 0.95 * target <= allocated.planned_bytes <= target
    col = EmbeddingCollection(config, stats)
    assert col.serving_bytes() == allocated.planned_bytes
    assert any(e.mapper.values.numel() for e in col.embeddings.values()
               if hasattr(e.mapper, "signatures"))


def test_context_signatures_are_the_minhash_of_the_other_features_values(tmp_path):
    # C1 varies, C2 is 5 in every row: each C1 value's context is {C2 = 5}, so all C1
    # values share one context signature (and its embedding under sets="contexts").
    c1 = [int(v) for v in np.random.default_rng(1).zipf(1.5, 600) % 40]
    write_table_atomic(_table(c1, [5] * 600), shard_path(tmp_path, 0, 0))
    write_table_atomic(_table([1, 2] * 20, [5] * 40), shard_path(tmp_path, 1, 0))
    write_json_atomic({"days": {"0": {}, "1": {}}}, tmp_path / "manifest.json")
    stats_dir = write_feature_stats(tmp_path, use_ray=False)
    sign_dataset(tmp_path, k=4, min_count=2)
    values, ctx = read_signatures(stats_dir, "C1", "contexts")
    assert len(values) > 5 and (ctx == ctx[0]).all()
    _, rows = read_signatures(stats_dir, "C1", "rows")
    assert not (rows == rows[0]).all()
    # C2's one value: its context is every C1 value seen in train.
    from data_pipeline.row_signatures import CONTEXT_SEED
    from idhash.splitmix import hash64_bits

    seen = np.unique(np.array(c1, np.int64))
    expected = [int((hash64_bits(seen, CONTEXT_SEED + j * 64 + 0) >> np.uint64(32)).min())
                for j in range(4)]
    (_, five_ctx) = read_signatures(stats_dir, "C2", "contexts")
    assert five_ctx.view(np.uint32)[0].tolist() == expected
    # The training stats carry both kinds, and scma picks the one its config names.
    from data_pipeline.stats import load_feature_stats
    from training.plan import feature_stats_of

    stats = feature_stats_of(load_feature_stats(tmp_path), "C1")
    assert stats.contexts is not None and stats.signatures is not None
    by_context = ScmaConfig(memory=256, sets="contexts", sketch_share=0.9).build(40, DIM, stats)
    probe = torch.from_numpy(values[:5])
    with torch.no_grad():
        out = by_context(probe)
    assert all(torch.equal(out[0], out[i]) for i in range(1, 5))


def test_a_shard_of_the_statistics_keeps_each_value_with_its_signatures():
    ids = np.repeat(np.arange(30), np.arange(30, 0, -1))
    stats = _stats(ids, np.arange(len(ids)))
    stats = FeatureStats(stats.values, stats.counts, stats.signatures[:20],
                         stats.signatures[:20] + 1)
    keep = stats.values % 2 == 0
    part = stats.select(keep)
    assert torch.equal(part.values, stats.values[keep])
    first = keep[:20]
    assert torch.equal(part.signatures, stats.signatures[:20][first])
    assert torch.equal(part.contexts, stats.contexts[:20][first])
    assert part.signatures.shape[0] == int(first.sum())


def test_a_checkpoint_restores_the_shared_array_and_the_sketch():
    ids = np.random.default_rng(6).zipf(1.2, 20_000) % 3000
    stats = {"C1": _stats(ids, np.arange(len(ids)))}
    config = CollectionConfig(dim=DIM, cardinalities=[3000], ratio=8, method={"method": "scma"})
    col = EmbeddingCollection(config, stats)
    batch = torch.from_numpy(ids[:512, None])
    col(batch).pow(2).sum().backward()
    col.step()
    state = {k: v.clone() for k, v in col.state_dict().items()}
    assert any(k.endswith("mapper.signatures") for k in state)
    fresh = EmbeddingCollection(config, stats)
    fresh.load_state_dict(state)
    with torch.no_grad():
        assert torch.equal(fresh(batch), col(batch))
