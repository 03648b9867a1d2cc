"""The model one worker trains: the dense CTR model (under DDP when distributed), the
embedding shards the plan gives this worker, and their optimizers."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from embeddings.methods.base import FeatureStats, TrainedFeature, TwoStageConfig
from embeddings.optim import LazyAdam, RowWiseAdagrad, train_step
from embeddings.sharding.planner import shard_of
from embeddings.sharding.router import ShardedEmbeddingCollection
from training.context import WorkerContext
from training.plan import RunSpec


@dataclass
class TrainableModel:
    """What a worker trains and checkpoints.

    Args:
        dense: the MLPs (DDP-wrapped when distributed).
        embeddings: this worker's embedding shards (and the replicated tables).
        sparse_opt: row-wise optimizer of the replicated tables (None when there are none;
            owned tables update inside their store, fused into backward under FBGEMM).
        dense_opt: Adam on the MLPs and the dense parameters of the embeddings (MLET).
    """

    dense: nn.Module
    embeddings: ShardedEmbeddingCollection
    sparse_opt: torch.optim.Optimizer | None
    dense_opt: torch.optim.Optimizer

    def __call__(self, dense_x: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
        return self.dense(dense_x, self.embeddings(sparse))

    @property
    def dense_module(self) -> nn.Module:
        """The dense model itself, without DDP's wrapper."""
        return self.dense.module if hasattr(self.dense, "module") else self.dense

    def step(self, loss: torch.Tensor, dense_lr: float) -> None:
        """One update: backward, every optimizer, adaptive state after the step."""
        # Set from the step every time (not a stateful scheduler): resuming needs nothing.
        for group in self.dense_opt.param_groups:
            group["lr"] = dense_lr
        train_step(loss, self.sparse_opt, self.dense_opt, self.embeddings)

    def train(self, mode: bool = True) -> None:
        self.embeddings.train(mode)
        self.dense.train(mode)

    def weights(self) -> dict[str, Any]:
        return {"embeddings": self.embeddings.state_dict(),
                "dense": self.dense_module.state_dict()}

    def load_weights(self, state: Mapping[str, Any]) -> None:
        self.embeddings.load_state_dict(state["embeddings"])
        self.dense_module.load_state_dict(state["dense"])

    def optimizer_state(self) -> dict[str, Any]:
        return {"sparse_opt": self.sparse_opt.state_dict() if self.sparse_opt else {},
                "dense_opt": self.dense_opt.state_dict()}

    def load_optimizer_state(self, state: Mapping[str, Any]) -> None:
        if self.sparse_opt is not None:
            self.sparse_opt.load_state_dict(state["sparse_opt"])
        self.dense_opt.load_state_dict(state["dense_opt"])


def data_parallel(dense: nn.Module, device: torch.device) -> nn.Module:
    """The dense model under DDP (the process group must be up)."""
    # No buffer sync before each forward: the models' only buffers are constant index tables
    # built from the config (DLRM's interaction pairs), the same on every rank, and DDP still
    # syncs them once at construction. Gradients live in DDP's buckets, saving a copy per step.
    return nn.parallel.DistributedDataParallel(
        dense, device_ids=[device] if device.type == "cuda" else None,
        forward_sync_buffers=False, gradient_as_bucket_view=True,
    )


def build_model(spec: RunSpec, ctx: WorkerContext,
                stats: Mapping[str, FeatureStats]) -> TrainableModel:
    """This worker's part of the model, initialised from the run's seed."""
    config = spec.config
    torch.manual_seed(config.seed)
    dense: nn.Module = config.model_spec.build().to(ctx.device)
    trained = None
    if config.from_model is not None:
        from training.from_model import init_dense, load_trained

        trained_model, trained = load_trained(config.from_model, stats)
        init_dense(dense, trained_model.dense)  # the fine-tuning starts from the trained MLPs
    embeddings = build_embeddings(spec, ctx, stats, trained)
    sparse_opt, dense_opt = _optimizers(spec, embeddings, dense)
    if ctx.distributed:
        dense = data_parallel(dense, ctx.device)
    return TrainableModel(dense, embeddings, sparse_opt, dense_opt)


def build_embeddings(spec: RunSpec, ctx: WorkerContext,
                     stats: Mapping[str, FeatureStats],
                     trained: Mapping[str, TrainedFeature] | None = None,
                     ) -> ShardedEmbeddingCollection:
    """The embedding shards the plan places on this worker (re-placed for another world
    size); each shard is seeded by (feature, shard), so it is the same wherever it lands.
    Two-stage methods are built from `trained` (the run's from_model)."""
    plan = spec.plan
    if plan.num_workers != ctx.world:
        plan = plan.relocate(ctx.world)
    dim = spec.config.model_spec.table_dim  # d, + 1 for the first-order scalar
    seed = spec.config.seed

    def make_module(i: int, s: int, num_shards: int) -> nn.Module:
        name = spec.names[i]
        feature_stats = stats.get(name)
        if feature_stats is not None and num_shards > 1:
            keep = shard_of(feature_stats.values, num_shards) == s
            feature_stats = feature_stats.select(keep)
        torch.manual_seed(seed * 1_000_003 + i * 1009 + s * 17 + num_shards)
        n = math.ceil(spec.cardinalities[i] / num_shards)
        method = spec.methods[name]
        if isinstance(method, TwoStageConfig):
            from training.from_model import build_two_stage

            return build_two_stage(method, spec.cardinalities[i], dim,
                                   trained.get(name) if trained else None, num_shards)
        return method.build(n, dim, feature_stats)

    return ShardedEmbeddingCollection(
        plan, make_module, dim, ctx.rank, ctx.world, device=ctx.device,
        table_optimizer=spec.config.optimizer.table_optimizer(),
    )


def _optimizers(
    spec: RunSpec, embeddings: ShardedEmbeddingCollection, dense: nn.Module
) -> tuple[torch.optim.Optimizer | None, torch.optim.Optimizer]:
    # Owned tables live in the local collection's store, which updates them itself (fused
    # into backward under FBGEMM); the replicated ones take the row-wise optimizer here.
    opt = spec.config.optimizer
    tables = embeddings.replicated_tables()
    sparse_cls = RowWiseAdagrad if opt.sparse == "rowwise_adagrad" else LazyAdam
    sparse_opt = sparse_cls(tables, lr=opt.sparse_lr,
                            weight_decay=opt.sparse_weight_decay) if tables else None
    dense_opt = torch.optim.Adam([*dense.parameters(), *embeddings.dense_parameters()],
                                 lr=opt.dense_lr)
    return sparse_opt, dense_opt
