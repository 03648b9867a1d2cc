"""The sharding planner: owned, split and replicated placements, balance, determinism, output."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from data_pipeline.schema import TERABYTE_CARDINALITIES
from embeddings.sharding import (
    SHARD_HASH_SEED,
    FeaturePlacement,
    FeatureSize,
    Placement,
    ShardingPlan,
    plan_sharding,
    shard_of,
)
from idhash.splitmix import hash_bucket


def sizes(byte_counts: list[int], stateless: bool = False) -> list[FeatureSize]:
    return [
        FeatureSize(name=f"C{i + 1}", bytes=b, stateless=stateless)
        for i, b in enumerate(byte_counts)
    ]


def test_greedy_places_largest_first_on_the_least_loaded_worker():
    plan = plan_sharding(sizes([10, 9, 8, 7, 6, 5]), 3, replicate_below_bytes=0)
    assert all(f.placement is Placement.OWNED for f in plan.features)
    # 10→0, 9→1, 8→2, 7→2 (8), 6→1 (9), 5→0 (10): loads 15, 15, 15.
    assert [f.owners[0] for f in plan.features] == [0, 1, 2, 2, 1, 0]
    assert plan.worker_bytes() == [15, 15, 15]
    assert plan.shards_on(2) == [(2, 0), (3, 0)]


def test_feature_over_the_budget_is_split_over_distinct_owners():
    plan = plan_sharding(sizes([250, 40, 30]), 4, worker_budget_bytes=100)
    big = plan.features[0]
    assert big.placement is Placement.SPLIT and big.num_shards == 3
    assert big.shard_bytes == [84, 83, 83] and sum(big.shard_bytes) == 250
    assert len(set(big.owners)) == 3
    assert max(plan.worker_bytes()) <= 100


def test_without_a_budget_a_feature_larger_than_the_fair_share_is_split():
    features = sizes([700, 100, 100, 100])
    plan = plan_sharding(features, 4, balance_tolerance=float("inf"))
    # Fair share = 1000 / 4 = 250, so the 700-byte feature becomes 3 parts...
    assert plan.features[0].num_shards == 3
    assert sorted(plan.worker_bytes()) == [233, 233, 234, 300]
    # ...which leaves one worker 20% above the mean: by default it is split finer.
    balanced = plan_sharding(features, 4)
    assert balanced.features[0].shard_bytes == [175] * 4
    assert sorted(balanced.worker_bytes()) == [175, 275, 275, 275]
    assert plan_sharding(features, 1).features[0].num_shards == 1


def test_only_tiny_stateless_features_are_replicated():
    features = [
        FeatureSize(name="tiny_stateless", bytes=100, stateless=True),
        FeatureSize(name="tiny_stateful", bytes=100, stateless=False),
        FeatureSize(name="big_stateless", bytes=10_000, stateless=True),
    ]
    # A roomy budget and no balance target keep the big feature whole: only placement shows.
    roomy = {"worker_budget_bytes": 1 << 20, "balance_tolerance": float("inf")}
    plan = plan_sharding(features, 2, replicate_below_bytes=1000, **roomy)
    assert [f.placement for f in plan.features] == [
        Placement.REPLICATED,
        Placement.OWNED,
        Placement.OWNED,
    ]
    assert plan.features[0].owners == [] and plan.features[0].bytes_on(2) == [100, 100]
    # Replicated bytes count on every worker.
    assert sum(plan.worker_bytes()) == 2 * 100 + 100 + 10_000
    off = plan_sharding(features, 2, replicate_below_bytes=0, **roomy)
    assert all(f.placement is not Placement.REPLICATED for f in off.features)


def test_same_inputs_give_the_same_plan():
    byte_counts = [min(c, 40_000_000) * 16 * 4 for c in TERABYTE_CARDINALITIES]
    a = plan_sharding(sizes(byte_counts, stateless=True), 8)
    b = plan_sharding(sizes(list(byte_counts), stateless=True), 8)
    assert a == b and a.model_dump_json() == b.model_dump_json()
    assert ShardingPlan.model_validate_json(a.model_dump_json()) == a
    # Equal sizes tie-break by feature index, not by anything unstable.
    equal = plan_sharding(sizes([5, 5, 5, 5]), 2)
    assert [f.owners[0] for f in equal.features] == [0, 1, 0, 1]


def test_impossible_plans_are_refused_with_a_reason():
    with pytest.raises(ValueError, match="needs more than 2 shards"):
        plan_sharding(sizes([500]), 2, worker_budget_bytes=100)
    with pytest.raises(ValueError, match="no greedy placement fits"):
        plan_sharding(sizes([90, 90, 90]), 2, worker_budget_bytes=100)
    with pytest.raises(ValueError, match="replicated features alone"):
        plan_sharding(
            [FeatureSize(name="r", bytes=50, stateless=True), FeatureSize(name="o", bytes=10)],
            2,
            worker_budget_bytes=40,
            replicate_below_bytes=100,
        )
    with pytest.raises(ValueError, match="at least 1"):
        plan_sharding(sizes([1]), 0)


def test_plans_validate_their_own_consistency():
    with pytest.raises(ValidationError, match="one owner and one size per shard"):
        FeaturePlacement(
            name="a", placement=Placement.SPLIT, bytes=4, owners=[0], shard_bytes=[2, 2]
        )
    with pytest.raises(ValidationError, match="owned means one shard"):
        FeaturePlacement(
            name="a", placement=Placement.OWNED, bytes=4, owners=[0, 1], shard_bytes=[2, 2]
        )
    with pytest.raises(ValidationError, match="unique"):
        plan_sharding([FeatureSize(name="C1", bytes=1), FeatureSize(name="C1", bytes=2)], 1)
    owned = FeaturePlacement(
        name="a", placement=Placement.OWNED, bytes=4, owners=[3], shard_bytes=[4]
    )
    with pytest.raises(ValidationError, match="outside"):
        ShardingPlan(num_workers=2, features=[owned])


def test_terabyte_sizes_fit_eight_workers_under_a_budget():
    # Full d=128 fp32 tables: ~96 GiB, more than any one worker here could hold.
    byte_counts = [min(c, 40_000_000) * 128 * 4 for c in TERABYTE_CARDINALITIES]
    budget = 16 << 30
    plan = plan_sharding(sizes(byte_counts, stateless=True), 8, worker_budget_bytes=budget)
    loads = plan.worker_bytes()
    assert max(loads) <= budget
    assert sum(byte_counts) / 8 <= max(loads) < 1.25 * sum(byte_counts) / 8
    split = [f for f in plan.features if f.placement is Placement.SPLIT]
    assert {f.name for f in split} == {"C1", "C10", "C20", "C21", "C22"}
    assert all(len(set(f.owners)) == f.num_shards for f in split)
    replicated = {f.name for f in plan.features if f.placement is Placement.REPLICATED}
    assert replicated == {"C6", "C8", "C9", "C13", "C16", "C17", "C18", "C19", "C25", "C26"}


def test_relocate_keeps_the_model_and_moves_the_owners():
    plan = plan_sharding(sizes([250, 40, 30, 5]), 4, worker_budget_bytes=100)
    one = plan.relocate(1)
    assert [f.num_shards for f in one.features] == [f.num_shards for f in plan.features]
    assert [f.placement for f in one.features] == [f.placement for f in plan.features]
    assert all(o == 0 for f in one.features for o in f.owners)
    assert one.worker_bytes() == [sum(f.bytes for f in plan.features)]
    two = plan.relocate(2)
    assert two.num_workers == 2 and sorted(two.features[0].owners) == [0, 1, 1]


def test_describe_prints_placement_shards_and_bytes_per_worker():
    plan = plan_sharding(
        [
            FeatureSize(name="C1", bytes=3 << 30),
            FeatureSize(name="C2", bytes=512 << 20),
            FeatureSize(name="C3", bytes=4096, stateless=True),
        ],
        2,
        worker_budget_bytes=5 << 29,
    )
    text = plan.describe()
    lines = text.splitlines()
    assert lines[0] == "Sharding plan: 3 features over 2 workers, budget 2.50 GiB per worker"
    assert lines[1].split() == [
        "feature", "placement", "shards", "total", "worker", "0", "worker", "1",
    ]  # fmt: skip
    assert lines[3].split() == ["C1", "split", "2", "3.00", "GiB", "1.50", "GiB", "1.50", "GiB"]
    assert lines[4].split() == ["C2", "owned", "1", "512.00", "MiB", "512.00", "MiB", "-"]
    assert lines[5].split()[:3] == ["C3", "replicated", "1"] and lines[5].count("4.00 KiB") == 3
    assert lines[-1].split()[0] == "total" and "2.00 GiB" in lines[-1]
    wide = plan_sharding(sizes([100] * 20), 16).describe()
    assert "owners" in wide.splitlines()[1] and wide.splitlines()[-1].startswith("worker bytes")


def test_shard_of_is_the_fixed_seed_hash_and_independent_of_method_hashes():
    ids = torch.arange(200_000, dtype=torch.int64) * 7919 + (1 << 35)
    shards = shard_of(ids, 4)
    assert torch.equal(shards, hash_bucket(ids, 4, seed=SHARD_HASH_SEED))
    assert torch.equal(shard_of(ids, 1), torch.zeros_like(ids))
    counts = torch.bincount(shards, minlength=4).float()
    assert counts.std() / counts.mean() < 0.02
    # The ids of one shard still use every row of a table hashed with a method's seed.
    for seed in range(4):
        rows = torch.bincount(hash_bucket(ids[shards == 0], 16, seed=seed), minlength=16).float()
        assert rows.std() / rows.mean() < 0.05
