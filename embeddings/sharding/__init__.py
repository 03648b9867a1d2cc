"""Sharding of embedding tables across training workers: a planner and a router.

The planner decides where each feature lives (owned, split by hash, replicated); the router
executes that plan in the forward and backward passes with all_to_all exchanges.
"""

from embeddings.sharding.planner import (
    SHARD_HASH_SEED,
    FeaturePlacement,
    FeatureSize,
    Placement,
    ShardingPlan,
    plan_sharding,
    shard_of,
)
from embeddings.sharding.router import ModuleFactory, ShardedEmbeddingCollection, module_key

__all__ = [
    "SHARD_HASH_SEED",
    "FeaturePlacement",
    "FeatureSize",
    "ModuleFactory",
    "Placement",
    "ShardedEmbeddingCollection",
    "ShardingPlan",
    "module_key",
    "plan_sharding",
    "shard_of",
]
