"""The per-worker training function: plain PyTorch, with Ray only at the edges.

Each worker builds the dense model (wrapped in DDP), the embedding shards the plan gives
it, and its optimizers; reads its deterministic range of the train split through Ray
Data; evaluates exactly over all workers; checkpoints one file per rank; and at the end
the collapsed serving model is gathered on rank 0 and exported.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from pydantic import TypeAdapter
from torch import nn

from data_pipeline.partition import eval_pieces, iter_piece_batches, train_pieces
from data_pipeline.schema import MISSING_ID
from data_pipeline.stats import load_feature_stats
from embeddings.collection import AnyMethodConfig
from embeddings.hashing import hash64
from embeddings.methods.base import FeatureStats, MethodConfig
from embeddings.metrics import EvalAccumulator, FrequencyBand
from embeddings.optim import LazyAdam, RowWiseAdagrad, train_step
from embeddings.serving import ServingModel, SplitServingEmbedding, export_model
from embeddings.serving_io import embedding_from_state, embedding_state
from embeddings.sharding.planner import ShardingPlan, shard_of
from embeddings.sharding.router import ShardedEmbeddingCollection, module_key
from jobs.train_config import TrainConfig

_METHOD = TypeAdapter(AnyMethodConfig)
RANK_FILE = "rank-{rank}.pt"
# Fingerprints are summed over workers in int64: the modulus leaves room for 128 of them.
FINGERPRINT_MOD = 1 << 56


@dataclass
class RunSpec:
    """What the driver decides once and every worker builds from (plain data, so it ships)."""

    config: dict[str, Any]
    names: list[str]
    cardinalities: list[int]
    methods: dict[str, dict[str, Any]]
    plan: dict[str, Any]
    band_columns: list[int] = field(default_factory=list)
    ratio: float | None = None

    def method(self, name: str) -> MethodConfig:
        return _METHOD.validate_python(self.methods[name])


@dataclass
class Progress:
    """Where training stands; saved in every checkpoint."""

    epoch: int = 0
    step_in_epoch: int = 0
    step: int = 0
    samples: int = 0
    fingerprint: int = 0  # sum of row hashes (mod 2^63) of every trained row, when audited
    # Early stopping's state, so a resumed run keeps counting from where it stopped.
    best_value: float = math.nan
    best_step: int = -1  # -1: no evaluation kept yet
    evals_since_best: int = 0
    stopped: int = 0  # 1 once early stopping ended training: a rerun trains no more

    def as_dict(self) -> dict[str, float]:
        return dict(self.__dict__)


def row_fingerprint(sparse: torch.Tensor) -> int:
    """Sum over rows of a hash of the row's ids: equal sums ⇒ (almost surely) equal row sets."""
    h = torch.zeros(sparse.shape[0], dtype=torch.int64, device=sparse.device)
    for j in range(sparse.shape[1]):
        h = hash64(h ^ sparse[:, j], seed=j)
    return int(h.remainder(1 << 40).sum().item())


class _Context:
    """Rank, world size and device, from Ray Train when inside it, else a single process."""

    def __init__(self, use_gpu: bool = False) -> None:
        try:
            import ray.train

            ctx = ray.train.get_context()
            self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
            self.in_ray = True
        except Exception:  # outside a Ray Train worker (direct call in a test or benchmark)
            self.rank, self.world, self.in_ray = 0, 1, False
        self.distributed = dist.is_available() and dist.is_initialized() and self.world > 1
        if self.in_ray:
            import ray.train.torch

            self.device = ray.train.torch.get_device()
        elif use_gpu:
            # A single-process run (tests, benchmarks) honours scaling.use_gpu like a worker.
            if not torch.cuda.is_available():
                raise RuntimeError("scaling.use_gpu is true but this process sees no CUDA device")
            self.device = torch.device("cuda", torch.cuda.current_device())
        else:
            self.device = torch.device("cpu")


def _stats_for(spec: RunSpec, data_root: Path) -> dict[str, FeatureStats]:
    needs = {n for n in spec.names if spec.method(n).method in ("full", "learned_hash")}
    if not needs:
        return {}
    stats = load_feature_stats(data_root)
    out = {}
    for name in needs:
        values, counts = stats.counts(name)
        out[name] = FeatureStats(values, counts)
    return out


def build_embeddings(spec: RunSpec, config: TrainConfig, ctx: _Context) -> nn.Module:
    plan = ShardingPlan.model_validate(spec.plan)
    if plan.num_workers != ctx.world:
        plan = plan.relocate(ctx.world)
    stats = _stats_for(spec, config.data.path)
    dim = config.model_spec.table_dim  # d, + 1 for the first-order scalar
    seed = config.seed

    def make_module(i: int, s: int, num_shards: int) -> nn.Module:
        name = spec.names[i]
        feature_stats = stats.get(name)
        if feature_stats is not None and num_shards > 1:
            keep = shard_of(feature_stats.values, num_shards) == s
            feature_stats = FeatureStats(feature_stats.values[keep], feature_stats.counts[keep])
        # Seeded by (feature, shard) so a shard is the same wherever the plan places it.
        torch.manual_seed(seed * 1_000_003 + i * 1009 + s * 17 + num_shards)
        n = math.ceil(spec.cardinalities[i] / num_shards)
        return spec.method(name).build(n, dim, feature_stats)

    return ShardedEmbeddingCollection(
        plan, make_module, dim, ctx.rank, ctx.world, device=ctx.device,
        table_optimizer=config.optimizer.table_optimizer(),
    )


def _optimizers(config: TrainConfig, embeddings: ShardedEmbeddingCollection, dense: nn.Module):
    # Owned tables live in the local collection's store, which updates them itself (fused
    # into backward under FBGEMM); the replicated ones take the row-wise optimizer here.
    tables = embeddings.replicated_tables()
    other = embeddings.dense_parameters()
    sparse_cls = RowWiseAdagrad if config.optimizer.sparse == "rowwise_adagrad" else LazyAdam
    sparse_opt = sparse_cls(tables, lr=config.optimizer.sparse_lr,
                            weight_decay=config.optimizer.sparse_weight_decay) if tables else None
    dense_opt = torch.optim.Adam([*dense.parameters(), *other], lr=config.optimizer.dense_lr)
    return sparse_opt, dense_opt


def _bands(stats: Any, names: list[str], columns: list[int], sparse: torch.Tensor) -> Any:
    import numpy as np

    ids = sparse.cpu().numpy()
    out = np.full((ids.shape[0], len(columns)), 1, dtype=np.int8)
    for k, j in enumerate(columns):
        # A missing value is no id: HOT, the neutral element of the row's minimum, so that it
        # cannot make a row "rare" (C22 is missing in 79% of rows).
        out[:, k] = np.where(ids[:, j] == MISSING_ID, np.int8(FrequencyBand.HOT),
                             stats.frequency_band(names[j], ids[:, j]))
    return out


@torch.no_grad()
def evaluate(
    split: str, spec: RunSpec, config: TrainConfig, ctx: _Context,
    embeddings: nn.Module, dense: nn.Module, stats: Any,
) -> dict[str, float]:
    """Exact metrics of one split over all workers (every row once)."""
    embeddings.eval()
    dense.eval()
    pieces = eval_pieces(config.data.path, split, ctx.rank, ctx.world,
                         block_rows=config.data.block_rows)
    acc = EvalAccumulator(with_bands=bool(spec.band_columns and stats is not None))
    batches = iter_piece_batches(pieces, config.data.eval_batch_size) if pieces \
        else iter(())
    empty_sparse = torch.zeros(0, len(spec.names), dtype=torch.int64, device=ctx.device)
    while True:
        batch = next(batches, None)
        if ctx.distributed:
            # Workers may hold different numbers of batches; every lookup is a collective,
            # so all go on until the last worker is done, the others with empty batches.
            more = torch.tensor([batch is not None], dtype=torch.int32, device=ctx.device)
            dist.all_reduce(more, op=dist.ReduceOp.MAX)
            if not more.item():
                break
        elif batch is None:
            break
        if batch is None:
            sparse, dense_x = empty_sparse, torch.zeros(0, 13, device=ctx.device)
            label = torch.zeros(0, device=ctx.device)
        else:
            sparse = batch["sparse"].to(ctx.device)
            dense_x = batch["dense"].to(ctx.device)
            label = batch["label"].to(ctx.device)
        logits = dense(dense_x, embeddings(sparse))
        bands = _bands(stats, spec.names, spec.band_columns, sparse) if acc.with_bands else None
        acc.update(logits, label, bands)
    embeddings.train()
    dense.train()
    return {f"{split}_{k}": v for k, v in acc.compute().items()}


def _save(ckpt_dir: Path, ctx: _Context, progress: Progress, embeddings: nn.Module,
          dense: nn.Module, sparse_opt: Any, dense_opt: Any) -> None:
    state = {
        "progress": progress.as_dict(),
        "embeddings": embeddings.state_dict(),
        "dense": (dense.module if hasattr(dense, "module") else dense).state_dict(),
        "sparse_opt": sparse_opt.state_dict() if sparse_opt is not None else {},
        "dense_opt": dense_opt.state_dict(),
    }
    torch.save(state, ckpt_dir / RANK_FILE.format(rank=ctx.rank))


BEST_DIR = "best"


def _save_best(config: TrainConfig, ctx: _Context, save: Any) -> None:
    """Each rank writes its part of the best model so far under <run folder>/best/."""
    best = config.run_dir / BEST_DIR
    best.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=best) as d:
        save(Path(d))
        name = RANK_FILE.format(rank=ctx.rank)
        # A crash mid-write must not leave a torn file where the best model was.
        os.replace(Path(d) / name, best / name)


def _load_best(config: TrainConfig, ctx: _Context, embeddings: nn.Module,
               dense: nn.Module) -> None:
    """Load this rank's part of the best model back (weights and adaptive state only)."""
    path = config.run_dir / BEST_DIR / RANK_FILE.format(rank=ctx.rank)
    state = torch.load(path, map_location=ctx.device, weights_only=True)
    embeddings.load_state_dict(state["embeddings"])
    (dense.module if hasattr(dense, "module") else dense).load_state_dict(state["dense"])


def _restore(ctx: _Context, embeddings: nn.Module, dense: nn.Module,
             sparse_opt: Any, dense_opt: Any) -> Progress:
    if not ctx.in_ray:
        return Progress()
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return Progress()
    with checkpoint.as_directory() as d:
        path = Path(d) / RANK_FILE.format(rank=ctx.rank)
        if not path.is_file():
            raise FileNotFoundError(
                f"checkpoint {d} has no {path.name}: it was written by a different number of "
                "workers; resume with the same scaling.num_workers"
            )
        state = torch.load(path, map_location=ctx.device, weights_only=True)
    embeddings.load_state_dict(state["embeddings"])
    (dense.module if hasattr(dense, "module") else dense).load_state_dict(state["dense"])
    if sparse_opt is not None:
        sparse_opt.load_state_dict(state["sparse_opt"])
    dense_opt.load_state_dict(state["dense_opt"])
    return Progress(**state["progress"])


def _report(ctx: _Context, metrics: dict[str, Any], save: Any = None) -> None:
    """ray.train.report (a barrier: all workers call it equally often), with a checkpoint."""
    if not ctx.in_ray:
        return
    import ray.train

    if save is None:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as d:
        save(Path(d))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


def _gather_serving(spec: RunSpec, ctx: _Context, embeddings: ShardedEmbeddingCollection):
    """Collapse this worker's shards; rank 0 receives everyone's (None elsewhere)."""
    def host_state(module: nn.Module) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        # Collapsed on the worker's device, gathered and exported from host memory: a CUDA
        # tensor sent through all_gather_object would land on the sender's GPU index.
        config, tensors = embedding_state(module.collapse(), "")
        return config, {k: v.cpu() for k, v in tensors.items()}

    local = {key: host_state(module) for key, module in embeddings.owned.items()}
    if ctx.rank == 0:
        local.update({key: host_state(m) for key, m in embeddings.replicated.items()})
    if ctx.distributed:
        parts: list[Any] = [None] * ctx.world
        dist.all_gather_object(parts, local)
    else:
        parts = [local]
    if ctx.rank != 0:
        return None
    states = {k: v for p in parts for k, v in p.items()}
    plan = embeddings.plan
    out = []
    for f in plan.features:
        if f.num_shards == 1:
            cfg, ts = states[module_key(f.name, 0, 1)]
            out.append(embedding_from_state(cfg, ts, ""))
        else:
            shards = []
            for s in range(f.num_shards):
                cfg, ts = states[module_key(f.name, s, f.num_shards)]
                shards.append(embedding_from_state(cfg, ts, ""))
            out.append(SplitServingEmbedding(shards, embeddings.embedding_dim))
    return out


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Entry point of every Ray Train worker (and of a single-process run)."""
    spec = RunSpec(**loop_config["spec"])
    config = TrainConfig.model_validate(spec.config)
    ctx = _Context(config.scaling.use_gpu)
    torch.set_num_threads(max(1, int(os.environ.get("EMBPRESS_TORCH_THREADS", "1"))))
    torch.manual_seed(config.seed)
    dense: nn.Module = config.model_spec.build().to(ctx.device)
    embeddings = build_embeddings(spec, config, ctx)
    sparse_opt, dense_opt = _optimizers(config, embeddings, dense)
    if ctx.distributed:
        # Buffers are broadcast before every forward only when the model has some (DLRM and
        # DCN have none); gradients live in DDP's buckets, saving a copy per step.
        dense = nn.parallel.DistributedDataParallel(
            dense, device_ids=[ctx.device] if ctx.device.type == "cuda" else None,
            broadcast_buffers=any(True for _ in dense.buffers()), gradient_as_bucket_view=True,
        )
    progress = _restore(ctx, embeddings, dense, sparse_opt, dense_opt)
    stats = load_feature_stats(config.data.path) if spec.band_columns else None
    writer = _tensorboard(config) if ctx.rank == 0 else None
    loss_fn = nn.BCEWithLogitsLoss()
    sched = config.schedule
    audit = bool(loop_config.get("audit"))
    last_metrics: dict[str, Any] = {}
    t0, rows0 = time.perf_counter(), progress.samples

    def save(d: Path) -> None:
        _save(d, ctx, progress, embeddings, dense, sparse_opt, dense_opt)

    data_shards = config.scaling.data_shards
    if data_shards % ctx.world:
        raise ValueError(f"{data_shards} data shards cannot be shared by {ctx.world} workers")
    mine = range(ctx.rank * data_shards // ctx.world, (ctx.rank + 1) * data_shards // ctx.world)
    loss_curve: list[float] = []
    streams, steps = _train_streams(config, progress, mine, data_shards)
    total_steps = steps * sched.epochs
    if sched.max_steps is not None:
        total_steps = min(total_steps, sched.max_steps)
    stopping = sched.early_stopping
    last_eval_step = -1

    def judge(metrics: dict[str, Any]) -> None:
        """Keep the model if this evaluation is the best; count towards patience if not."""
        assert stopping is not None
        value = float(metrics[stopping.metric])
        if stopping.improved(value, progress.best_value):
            progress.best_value, progress.best_step = value, progress.step
            progress.evals_since_best = 0
            _save_best(config, ctx, save)
        else:
            progress.evals_since_best += 1
        if ctx.rank == 0:
            print(f"[train] step {progress.step}: {stopping.metric} {value:.4f} (best "
                  f"{progress.best_value:.4f} at step {progress.best_step}, "
                  f"{progress.evals_since_best}/{stopping.patience} without improvement)",
                  flush=True)

    t_first: float | None = None  # when the first batch was in hand: startup ends there
    for batch in _zip_batches(streams) if not progress.stopped else iter(()):
        if t_first is None:
            t_first = time.perf_counter()
        if config.fault and progress.step + 1 == config.fault.step \
                and ctx.rank == config.fault.rank and not config.fault.marker.exists():
            config.fault.marker.write_text(f"failed at step {progress.step + 1}\n")
            raise RuntimeError(f"injected failure at step {progress.step + 1}")
        sparse = batch["sparse"].to(ctx.device)
        logits = dense(batch["dense"].to(ctx.device), embeddings(sparse))
        loss = loss_fn(logits, batch["label"].to(ctx.device))
        # Set from the step every time (not a stateful scheduler): resuming needs nothing.
        lr = config.optimizer.dense_lr_at(progress.step, total_steps)
        for group in dense_opt.param_groups:
            group["lr"] = lr
        train_step(loss, sparse_opt, dense_opt, embeddings)
        progress.step += 1
        progress.step_in_epoch += 1
        progress.samples += config.data.batch_size
        if audit:
            progress.fingerprint += row_fingerprint(sparse)
            progress.fingerprint %= FINGERPRINT_MOD
        if progress.step % sched.log_every == 0:
            global_loss = _mean_over_workers(loss.detach(), ctx)
            loss_curve.append(global_loss)
            if ctx.rank == 0:
                rate = (progress.samples - rows0) / (time.perf_counter() - (t_first or t0))
                print(f"[train] epoch {progress.epoch} step {progress.step_in_epoch}/{steps} "
                      f"loss {global_loss:.4f} {rate:,.0f} samples/s", flush=True)
                if writer:
                    writer.add_scalar("train/loss", global_loss, progress.step)
                    writer.add_scalar("train/dense_lr", lr, progress.step)
                    writer.add_scalar("train/samples_per_s", rate, progress.step)
        epoch_end = progress.step_in_epoch == steps
        evaluate_now = bool(sched.eval_every and progress.step % sched.eval_every == 0) or (
            stopping is not None and not sched.eval_every and epoch_end)
        checkpoint_now = sched.checkpoint_every and progress.step % sched.checkpoint_every == 0
        if evaluate_now:
            last_metrics = evaluate("validation", spec, config, ctx, embeddings, dense, stats)
            last_eval_step = progress.step
            _log(writer, last_metrics, progress.step)
            if stopping is not None:
                judge(last_metrics)
                if progress.evals_since_best >= stopping.patience:
                    progress.stopped = 1
        if progress.stopped:
            # Count the stopping step's epoch as done, so a checkpoint reads consistently.
            checkpoint_now = True
        if evaluate_now or checkpoint_now:
            metrics = {**last_metrics, **progress.as_dict(), "loss": loss.item()}
            _report(ctx, metrics, save if checkpoint_now else None)
        if progress.stopped:
            if ctx.rank == 0:
                print(f"[train] early stopping at step {progress.step}: no improvement of "
                      f"{stopping.metric} in {stopping.patience} evaluations", flush=True)
            break
        if sched.max_steps is not None and progress.step >= sched.max_steps:
            break
        if epoch_end:
            progress.epoch += 1
            progress.step_in_epoch = 0

    if stopping is not None and not progress.stopped and last_eval_step != progress.step \
            and progress.step > 0:
        # The last steps since the last evaluation are a candidate too.
        judge(evaluate("validation", spec, config, ctx, embeddings, dense, stats))
    if stopping is not None and 0 <= progress.best_step != progress.step:
        if ctx.rank == 0:
            print(f"[train] restoring the best model: step {progress.best_step}, "
                  f"{stopping.metric} {progress.best_value:.4f}", flush=True)
        _load_best(config, ctx, embeddings, dense)

    # Throughput of training alone, from the first batch in hand (the data pipeline's
    # start-up is reported apart): the final evaluation below is not training either.
    t_end = time.perf_counter()
    startup = (t_first or t_end) - t0
    elapsed = t_end - (t_first or t_end)
    final = {**evaluate("validation", spec, config, ctx, embeddings, dense, stats),
             **evaluate("test", spec, config, ctx, embeddings, dense, stats)}
    _log(writer, final, progress.step)
    final.update(progress.as_dict())
    if math.isnan(final["best_value"]):
        del final["best_value"]  # no early stopping: nothing to report (and NaN is no JSON)
    if ctx.distributed:
        total = torch.tensor([progress.fingerprint], dtype=torch.int64, device=ctx.device)
        dist.all_reduce(total)
        final["fingerprint"] = int(total.item()) % FINGERPRINT_MOD
    final["samples_per_s"] = (progress.samples - rows0) / elapsed if elapsed > 0 else 0.0
    final["startup_s"] = startup
    final["device"] = str(ctx.device)
    final["training_bytes_rank0"] = embeddings.training_bytes()
    final["loss_curve"] = loss_curve
    serving = _gather_serving(spec, ctx, embeddings)
    if ctx.rank == 0:
        model = ServingModel(config.model_spec,
                             (dense.module if hasattr(dense, "module") else dense).cpu(),
                             spec.names, serving)
        model = model.quantize(config.export.quantize)
        final["serving_bytes"] = model.embedding_bytes()
        export_model(model, config.export_dir, {
            "metrics": {k: v for k, v in final.items() if isinstance(v, (int, float))},
            "training_config": config.model_dump(mode="json"),
            "quantize": config.export.quantize,
            "compression_ratio": spec.ratio,
            "version": f"{config.run.name}-step{progress.step}",
        })
        print(f"[train] exported the serving model to {config.export_dir}", flush=True)
    if writer:
        writer.close()
    _report(ctx, final, save)


def _train_streams(
    config: TrainConfig, progress: Progress, mine: range, data_shards: int
) -> tuple[list[Any], int]:
    """One batch stream per data shard this worker reads, over every epoch still to train;
    and the steps per epoch.

    One Ray Data execution runs across the epoch boundaries: starting a new one each epoch
    idled training for the pipeline's start-up (1.7–3 s an epoch, measured on 2 cores).
    Each epoch's range is exactly steps × local batch rows, so no batch straddles two
    epochs, and every epoch keeps its own seeded order.
    """
    sched = config.schedule
    shard_batch = config.data.batch_size // data_shards

    def pieces_of(shard: int, epoch: int, skip_rows: int) -> tuple[list[Any], int]:
        seed = config.seed * 7919 + epoch if config.data.shuffle else None
        return train_pieces(config.data.path, shard, data_shards, config.data.batch_size,
                            seed=seed, skip_rows=skip_rows, block_rows=config.data.block_rows)

    _, steps = pieces_of(mine[0], progress.epoch, 0)
    if progress.step_in_epoch >= steps:  # a checkpoint taken at an epoch's last step
        progress.epoch += 1
        progress.step_in_epoch = 0
    last = sched.epochs
    if sched.max_steps is not None:
        remaining = sched.max_steps - progress.step
        last = min(last, progress.epoch + math.ceil((progress.step_in_epoch + remaining) / steps))
    streams = []
    for shard in mine:
        pieces = []
        for epoch in range(progress.epoch, last):
            skip = progress.step_in_epoch * shard_batch if epoch == progress.epoch else 0
            pieces += pieces_of(shard, epoch, skip)[0]
        streams.append(
            iter_piece_batches(pieces, shard_batch, drop_last=True) if pieces
            else iter(())
        )
    return streams, steps


def _zip_batches(streams: list[Any]) -> Any:
    """One local batch per step: the next batch of every data shard this worker reads.

    A worker reading several data shards concatenates them in shard order, so a run with
    fewer workers sees exactly the global batches of a run with more.
    """
    if len(streams) == 1:
        yield from streams[0]
        return
    for parts in zip(*streams, strict=False):
        yield {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def _mean_over_workers(value: torch.Tensor, ctx: _Context) -> float:
    if ctx.distributed:
        value = value.clone()
        dist.all_reduce(value)
        value /= ctx.world
    return float(value.item())


def _tensorboard(config: TrainConfig) -> Any:
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(config.run_dir / "tensorboard"))


def _log(writer: Any, metrics: dict[str, float], step: int) -> None:
    if writer is None:
        return
    for k, v in metrics.items():
        if isinstance(v, float) and math.isfinite(v):
            writer.add_scalar(k.replace("_", "/", 1), v, step)
