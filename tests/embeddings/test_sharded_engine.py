"""The sharded engine: each worker's owned features are one table-batched collection, and a
training step makes a fixed number of all-to-alls, whatever the number of features."""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from embeddings.methods.cafe import CafeConfig
from embeddings.methods.hashing_trick import HashConfig
from embeddings.sharding import FeatureSize, ShardedEmbeddingCollection, plan_sharding

DIM = 8
BATCH = 64
# (features, CAFE with a shared hot table)
CASES = ((3, False), (8, False), (8, True))


def _cards(features: int) -> list[int]:
    # Feature 0 is large enough to be split over both workers.
    return [40_000] + [3_000 + 500 * i for i in range(features - 1)]


def _plan(features: int, world: int):
    cards = _cards(features)
    sizes = [FeatureSize(name=f"C{i + 1}", bytes=n * DIM * 4 // 10, stateless=i % 2 == 0)
             for i, n in enumerate(cards)]
    return plan_sharding(sizes, world, worker_budget_bytes=700_000, replicate_below_bytes=0)


def _make(features: int, shared: bool = False):
    cards = _cards(features)
    cafe = CafeConfig(ratio=10, hot_table="shared" if shared else "per_feature")

    def make(i: int, s: int, shards: int) -> torch.nn.Module:
        torch.manual_seed(1000 * i + 10 * s + shards)
        n = -(-cards[i] // shards)
        config = cafe if i % 2 else HashConfig(ratio=10)
        return config.build(n, DIM)

    return make


def _batches(features: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return [torch.randint(0, 5_000, (BATCH, features), generator=g) for _ in range(3)]


def _train(router: ShardedEmbeddingCollection, batches, rows: slice, world: int):
    head = torch.linspace(-1, 1, DIM)
    losses, counts = [], []
    for sparse in batches:
        calls = {"n": 0}
        real = dist.all_to_all_single

        def counting(*args, _real=real, _calls=calls, **kwargs):
            _calls["n"] += 1
            return _real(*args, **kwargs)

        dist.all_to_all_single = counting
        try:
            out = router(sparse[rows])
            forward = calls["n"]
            loss = (out @ head).sigmoid().mean()
            loss.backward()
            counts.append((forward, calls["n"] - forward))
        finally:
            dist.all_to_all_single = real
        router.step(None)
        total = loss.detach().clone()
        if world > 1:
            dist.all_reduce(total)
            total /= world
        losses.append(float(total))
    return losses, counts


def _worker(rank: int, world: int, store: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=60))
    try:
        result = {}
        for features, shared in CASES:
            router = ShardedEmbeddingCollection(_plan(features, world), _make(features, shared),
                                                DIM)
            assert router.local is not None  # owned features share one table store
            assert bool(router.local.cafe_groups) == shared
            half = BATCH // world
            result[(features, shared)] = _train(router, _batches(features),
                                                slice(rank * half, (rank + 1) * half), world)
            # Every sketch saw the steps' importance (the router's step reaches them all).
            sketches = [g.sketch for g in router.local.cafe_groups] + [
                m.sketch for m in router.local.embeddings.values()
                if hasattr(m, "sketch") and not getattr(m, "joined", False)]
            assert all(s.scores.sum() > 0 for s in sketches)
            result[("sketches", features, shared)] = len(sketches)
        torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_workers_make_two_all_to_alls_forward_and_one_backward(tmp_path: Path):
    mp.spawn(_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for features, shared in CASES:
        assert sum(results[r][("sketches", features, shared)] for r in range(2)) > 0
        plan = _plan(features, 2)
        assert any(f.num_shards > 1 for f in plan.features)  # a split feature is in play
        one = ShardedEmbeddingCollection(plan.relocate(1), _make(features, shared), DIM)
        # Shared CAFE hot tables follow the planned workers: two groups on the one worker.
        assert len(one.local.cafe_groups) == (2 if shared else 0)
        losses, _ = _train(one, _batches(features), slice(None), 1)
        for r in range(2):
            got_losses, counts = results[r][(features, shared)]
            # ids out, vectors back; the vectors' gradient back: independent of features.
            assert counts == [(2, 1)] * len(counts)
            # 2 workers on halves train what one worker trains on the whole batch.
            assert got_losses == pytest.approx(losses, rel=1e-5, abs=1e-6)
