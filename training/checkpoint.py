"""Checkpoints, one file per rank: Ray Train's (reported, restored after a failure or on a
rerun) and early stopping's best model under <run folder>/best/."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from training.context import WorkerContext
from training.model import TrainableModel
from training.progress import Progress

RANK_FILE = "rank-{rank}.pt"
BEST_DIR = "best"

Save = Callable[[Path], None]


def saver(ctx: WorkerContext, progress: Progress, model: TrainableModel) -> Save:
    """Writes this rank's file (progress, weights, optimizer state) into a folder."""
    def save(directory: Path) -> None:
        state = {"progress": progress.as_dict(), **model.weights(), **model.optimizer_state()}
        torch.save(state, directory / RANK_FILE.format(rank=ctx.rank))

    return save


def restore(ctx: WorkerContext, model: TrainableModel) -> Progress:
    """Load Ray Train's latest checkpoint into `model`, if there is one; where it stood."""
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
    model.load_weights(state)
    model.load_optimizer_state(state)
    return Progress(**state["progress"])


def report(ctx: WorkerContext, metrics: dict[str, Any], save: Save | None = None) -> None:
    """ray.train.report (a barrier: all workers call it equally often), with a checkpoint
    written by `save` when given."""
    if not ctx.in_ray:
        return
    import ray.train

    if save is None:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as d:
        save(Path(d))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


def save_best(run_dir: Path, rank: int, save: Save) -> None:
    """Each rank writes its part of the best model so far under <run folder>/best/."""
    best = run_dir / BEST_DIR
    best.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=best) as d:
        save(Path(d))
        name = RANK_FILE.format(rank=rank)
        # A crash mid-write must not leave a torn file where the best model was.
        os.replace(Path(d) / name, best / name)


def load_best(run_dir: Path, ctx: WorkerContext, model: TrainableModel) -> None:
    """Load this rank's part of the best model back (weights and adaptive state only)."""
    path = run_dir / BEST_DIR / RANK_FILE.format(rank=ctx.rank)
    model.load_weights(torch.load(path, map_location=ctx.device, weights_only=True))
