"""The router looks up the same vectors and trains the same model on one worker and on two."""

from __future__ import annotations

import os
import warnings
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from embeddings.models import DLRMConfig
from embeddings.sharding import (
    FeatureSize,
    Placement,
    ShardedEmbeddingCollection,
    ShardingPlan,
    plan_sharding,
    shard_of,
)
from idhash.splitmix import hash_bucket

DIM = 8
ROWS = [4000, 1000, 800, 20, 10, 30]  # feature 0 is split, 3 and 4 replicated
STATELESS = [True, True, True, True, True, False]
SPARSE_GRAD = [True, False, True, True, False, False]
# Embedding gradients of one row are small (1/batch of a few samples), so the tables get a
# larger step: their updates must be visible in the loss curve for the test to mean much.
BATCH, STEPS, DENSE_LR, EMBEDDING_LR = 32, 4, 0.5, 20.0


pytestmark = pytest.mark.usefixtures("one_thread")


class HashedTable(nn.Module):
    """A deterministic stand-in for a compression method: the hashing trick over raw ids."""

    def __init__(self, rows: int, seed: int, sparse: bool) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.weight = nn.Parameter(torch.randn(rows, DIM, generator=g) * 0.1)
        self.seed = seed
        self.sparse = sparse

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = hash_bucket(ids, self.weight.shape[0], seed=self.seed)
        return nn.functional.embedding(rows, self.weight, sparse=self.sparse)


def make_table(feature: int, shard: int, num_shards: int) -> nn.Module:
    # Seeded by (feature, shard) only, so a shard is the same wherever it is placed.
    return HashedTable(
        ROWS[feature] // num_shards, 1000 * feature + shard + 1, SPARSE_GRAD[feature]
    )


def two_worker_plan() -> ShardingPlan:
    sizes = [
        FeatureSize(name=f"C{i + 1}", bytes=r * DIM * 4, stateless=s)
        for i, (r, s) in enumerate(zip(ROWS, STATELESS, strict=True))
    ]
    return plan_sharding(sizes, 2, worker_budget_bytes=100_000, replicate_below_bytes=1000)


def batches() -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(7)
    out = []
    for _ in range(STEPS):
        dense = torch.randn(BATCH, 13, generator=g)
        # Few distinct ids, so rows repeat within and across workers (gradients accumulate);
        # large offsets check that raw 64-bit values pass through intact.
        sparse = torch.randint(0, 40, (BATCH, len(ROWS)), generator=g) + (1 << 40)
        labels = torch.randint(0, 2, (BATCH,), generator=g).float()
        out.append((dense, sparse, labels))
    return out


def dense_model() -> nn.Module:
    torch.manual_seed(0)
    return DLRMConfig(
        num_sparse=len(ROWS), embedding_dim=DIM, bottom_mlp=[16, DIM], top_mlp=[16, 1]
    ).build()


def train(
    embeddings: ShardedEmbeddingCollection,
    dense: nn.Module,
    rows: slice,
    world: int,
) -> list[float]:
    """Plain SGD on both parts; returns the loss over the global batch at every step."""
    optimizer = torch.optim.SGD(
        [
            {"params": list(embeddings.parameters()), "lr": EMBEDDING_LR},
            {"params": list(dense.parameters()), "lr": DENSE_LR},
        ]
    )
    losses = []
    for dense_x, sparse, labels in batches():
        optimizer.zero_grad()
        logits = dense(dense_x[rows], embeddings(sparse[rows]))
        loss = nn.functional.binary_cross_entropy_with_logits(logits, labels[rows])
        loss.backward()
        optimizer.step()
        global_loss = loss.detach().clone()
        if world > 1:
            dist.all_reduce(global_loss)
        losses.append(global_loss.item() / world)
    return losses


def reference_lookups(plan: ShardingPlan, sparse: torch.Tensor) -> torch.Tensor:
    """What the router must return: each id through its own shard's module, no router."""
    out = torch.zeros(sparse.shape[0], len(plan.features), DIM)
    for i, f in enumerate(plan.features):
        shards = shard_of(sparse[:, i], f.num_shards)
        for s in range(f.num_shards):
            chosen = shards == s
            out[chosen, i] = make_table(i, s, f.num_shards)(sparse[chosen, i]).detach()
    return out


def test_plan_used_here_has_every_placement():
    plan = two_worker_plan()
    kinds = [f.placement for f in plan.features]
    assert kinds == [
        Placement.SPLIT,
        Placement.OWNED,
        Placement.OWNED,
        Placement.REPLICATED,
        Placement.REPLICATED,
        Placement.OWNED,
    ]
    assert set(plan.features[0].owners) == {0, 1}


def test_single_worker_lookup_needs_no_process_group():
    assert not dist.is_initialized()
    plan = two_worker_plan().relocate(1)
    router = ShardedEmbeddingCollection(plan, make_table, DIM)
    sparse = batches()[0][1]
    got = router(sparse)
    assert got.shape == (BATCH, len(ROWS), DIM)
    torch.testing.assert_close(got, reference_lookups(plan, sparse), rtol=0, atol=0)
    assert sorted(router.state_dict()) == sorted(
        [f"owned.C1_shard{s}of2.weight" for s in range(2)]
        + [f"owned.C{i}.weight" for i in (2, 3, 6)]
        + [f"replicated.C{i}.weight" for i in (4, 5)]
    )


def test_single_worker_gradients_reach_the_rows_used():
    plan = two_worker_plan().relocate(1)
    router = ShardedEmbeddingCollection(plan, make_table, DIM)
    sparse = batches()[0][1]
    weights = torch.randn(BATCH, len(ROWS), DIM)
    (router(sparse) * weights).sum().backward()
    # Feature 1 (dense grads, owned): the gradient of a row is the sum over the ids hashing
    # to it of their weights.
    table = router.owned["C2"]
    expected = torch.zeros_like(table.weight)
    expected.index_add_(0, hash_bucket(sparse[:, 1], ROWS[1], seed=table.seed), weights[:, 1])
    torch.testing.assert_close(table.weight.grad, expected)
    split = router.owned["C1_shard0of2"].weight.grad
    assert split.is_sparse and split.coalesce().values().abs().sum() > 0


def test_empty_batches_and_device_placement():
    router = ShardedEmbeddingCollection(
        two_worker_plan().relocate(1), make_table, DIM, device="cpu"
    )
    assert router(torch.zeros(0, len(ROWS), dtype=torch.int64)).shape == (0, len(ROWS), DIM)
    # int32 ids are widened, not rejected.
    ids = batches()[0][1][:3] - (1 << 40)
    torch.testing.assert_close(router(ids.to(torch.int32)), router(ids))


def test_router_refuses_a_plan_for_another_world_size():
    with pytest.raises(ValueError, match="relocate"):
        ShardedEmbeddingCollection(two_worker_plan(), make_table, DIM)
    router = ShardedEmbeddingCollection(two_worker_plan().relocate(1), make_table, DIM)
    with pytest.raises(ValueError, match=r"\[n, 6\]"):
        router(torch.zeros(4, 5, dtype=torch.int64))


def test_world_one_training_runs_and_has_no_collectives():
    plan = two_worker_plan().relocate(1)
    losses = train(ShardedEmbeddingCollection(plan, make_table, DIM), dense_model(), slice(None), 1)
    assert len(losses) == STEPS and all(torch.isfinite(torch.tensor(losses)))


def _worker(rank: int, world: int, store: str, out: str) -> None:
    torch.set_num_threads(1)
    # No warning may come from the product's own code (torch's about an implicit sparse
    # invariant choice did, on every step of a sharded run).
    warnings.filterwarnings("error", module=r"embeddings\.")
    dist.init_process_group(
        "gloo",
        init_method=f"file://{store}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=60),
    )
    try:
        plan = two_worker_plan()
        result: dict[str, object] = {}

        # Uneven local batches (7 and 3 rows) must still come back exactly right.
        sparse = batches()[0][1][:10]
        mine = slice(0, 7) if rank == 0 else slice(7, 10)
        router = ShardedEmbeddingCollection(plan, make_table, DIM)
        result["uneven"] = router(sparse[mine]).detach()

        # A plan where rank 1 owns nothing: it only sends and receives.
        lopsided = ShardingPlan(
            num_workers=2,
            features=[
                f.model_copy(update={"owners": [0] * f.num_shards})
                if f.placement is not Placement.REPLICATED
                else f
                for f in plan.features
            ],
        )
        router = ShardedEmbeddingCollection(lopsided, make_table, DIM)
        assert rank == 0 or len(router.owned) == 0
        result["lopsided"] = router(sparse[mine]).detach()

        # Training: the global batch split in halves, DDP on the dense part.
        half = BATCH // world
        embeddings = ShardedEmbeddingCollection(plan, make_table, DIM)
        dense = DistributedDataParallel(dense_model())
        result["losses"] = train(embeddings, dense, slice(rank * half, (rank + 1) * half), world)
        result["embeddings"] = {k: v.clone() for k, v in embeddings.state_dict().items()}
        result["dense"] = {k: v.clone() for k, v in dense.module.state_dict().items()}
        # The automatic all-reduce already averaged the replicated gradients: doing it
        # again must change nothing (it is what makes gradient accumulation exact too).
        before = {k: p.grad.to_dense().clone() for k, p in embeddings.replicated.named_parameters()}
        embeddings.sync_replicated_grads()
        after = {k: p.grad.to_dense() for k, p in embeddings.replicated.named_parameters()}
        result["replicated_grads"] = (before, after)
        torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_workers_train_the_same_model_as_one(tmp_path: Path):
    world = 2
    mp.spawn(_worker, args=(world, str(tmp_path / "store"), str(tmp_path)), nprocs=world)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world)]
    plan = two_worker_plan()
    sparse = batches()[0][1][:10]

    expected = reference_lookups(plan, sparse)
    for key in ("uneven", "lopsided"):
        got = torch.cat([results[0][key], results[1][key]])
        torch.testing.assert_close(got, expected, rtol=0, atol=0)

    # One process, the full batch, the same shards (relocated onto one worker).
    embeddings = ShardedEmbeddingCollection(plan.relocate(1), make_table, DIM)
    dense = dense_model()
    losses = train(embeddings, dense, slice(None), 1)
    for r in range(world):
        assert results[r]["losses"] == pytest.approx(losses, rel=1e-6, abs=1e-7)
        torch.testing.assert_close(results[r]["dense"], dense.state_dict(), rtol=1e-5, atol=1e-6)
        before, after = results[r]["replicated_grads"]
        torch.testing.assert_close(before, after, rtol=0, atol=0)
    # Each rank holds its own shards plus the replicas; together they are the whole model.
    merged = {**results[0]["embeddings"], **results[1]["embeddings"]}
    reference = embeddings.state_dict()
    assert sorted(merged) == sorted(reference)
    # Compared as updates, which are what the gradient scale decides, not as raw values.
    initial = ShardedEmbeddingCollection(plan.relocate(1), make_table, DIM).state_dict()
    for key, value in reference.items():
        assert (value - initial[key]).abs().max() > 1e-3  # training moved every table
        torch.testing.assert_close(
            merged[key] - initial[key], value - initial[key], rtol=1e-4, atol=1e-6
        )
    for key in reference:
        if key.startswith("replicated."):
            torch.testing.assert_close(
                results[0]["embeddings"][key], results[1]["embeddings"][key], rtol=0, atol=0
            )
