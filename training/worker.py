"""The train function every Ray Train worker runs: plain PyTorch, with Ray only at the edges
(the worker's context, the checkpoint it resumes from, the reports it makes).

Each worker builds the dense model and the embedding shards the plan gives it, reads its
deterministic range of the train split, evaluates exactly over all workers, checkpoints one
file per rank, and at the end the collapsed serving model is gathered on rank 0 and exported.
The same function runs in one process (tests, benchmarks) without Ray Train.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from torch import nn

from data_pipeline.stats import load_feature_stats
from training.audit import inject_fault
from training.checkpoint import report, restore
from training.context import WorkerContext
from training.export import export_trained
from training.loop import TrainLoop
from training.model import build_model
from training.plan import LazyFeatureStats, RunSpec
from training.progress import Monitor
from training.stall import start_pulse

WORKER_LOG_LEVEL_ENV = "EMBPRESS_WORKER_LOG_LEVEL"


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Entry point of every Ray Train worker (and of a single-process run).

    Args:
        loop_config: {"spec": the driver's `RunSpec`, "audit": fingerprint every trained
            row (optional)}.
    """
    spec: RunSpec = loop_config["spec"]
    config = spec.config
    # Set by `training.run` for its workers only: Ray Train logs a TrainingReport dump per
    # rank and report through the root logger, which would bury the progress lines.
    if level := os.environ.get(WORKER_LOG_LEVEL_ENV):
        logging.getLogger().setLevel(level)
    ctx = WorkerContext.current(config.scaling.use_gpu)
    beat = start_pulse(loop_config.get("heartbeat") if ctx.rank == 0 else None)
    torch.set_num_threads(max(1, int(os.environ.get("EMBPRESS_TORCH_THREADS", "1"))))
    stats = load_feature_stats(config.data.path)  # once: the methods and the bands read it
    model = build_model(spec, ctx, LazyFeatureStats(stats))
    beat.waiting("the latest checkpoint to be restored")
    progress = restore(ctx, model)
    beat.progress()
    monitor = Monitor(config, ctx.rank)
    loop = TrainLoop(spec, ctx, model, progress, stats, monitor,
                     audit=bool(loop_config.get("audit")))
    model.embeddings.schedule(loop.total_steps)  # MPE ends its search at a share of the run
    loop.judge_start()
    loss_fn = nn.BCEWithLogitsLoss()
    for batch in loop.batches():
        inject_fault(config.fault, progress.step + 1, ctx.rank)
        sparse = batch["sparse"].to(ctx.device)
        logits = model(batch["dense"].to(ctx.device), sparse)
        loss = loss_fn(logits, batch["label"].to(ctx.device))
        if (penalty := model.embeddings.regularization()) is not None:
            loss = loss + penalty  # a method's auxiliary term (MPE's bit-width penalty)
        lr = loop.dense_lr()
        model.step(loss, lr)
        if loop.after_step(sparse, loss, lr):
            break
    loop.finish()
    metrics = loop.final_metrics()
    beat.waiting("the serving model's export")
    export_trained(spec, ctx, model, metrics, progress.step)
    beat.progress()
    monitor.close()
    report(ctx, metrics, loop.save)
