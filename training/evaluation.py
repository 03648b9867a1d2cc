"""Exact metrics of a split over all workers (every row once): AUC and log loss, overall
and per id-frequency band."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
import torch.distributed as dist

from data_pipeline.partition import eval_pieces, iter_piece_batches
from data_pipeline.schema import MISSING_ID
from data_pipeline.stats import DatasetStats
from embeddings.metrics import EvalAccumulator, FrequencyBand
from training.context import WorkerContext
from training.model import TrainableModel
from training.plan import RunSpec
from training.stall import pulse

Batch = dict[str, torch.Tensor]


def frequency_bands(stats: DatasetStats, names: list[str], columns: list[int],
                    sparse: torch.Tensor) -> np.ndarray:
    """int8 [rows, len(columns)]: the frequency band of each row's id in each column."""
    ids = sparse.cpu().numpy()
    out = np.full((ids.shape[0], len(columns)), 1, dtype=np.int8)
    for k, j in enumerate(columns):
        # A missing value is no id: HOT, the neutral element of the row's minimum, so that it
        # cannot make a row "rare" (C22 is missing in 79% of rows).
        out[:, k] = np.where(ids[:, j] == MISSING_ID, np.int8(FrequencyBand.HOT),
                             stats.frequency_band(names[j], ids[:, j]))
    return out


@torch.no_grad()
def evaluate(split: str, spec: RunSpec, ctx: WorkerContext, model: TrainableModel,
             stats: DatasetStats) -> dict[str, float]:
    """Exact metrics of one split over all workers: "<split>_auc", "<split>_log_loss", ..."""
    config = spec.config
    model.train(False)
    pieces = eval_pieces(config.data.path, split, ctx.rank, ctx.world,
                         block_rows=config.data.block_rows)
    acc = EvalAccumulator(with_bands=bool(spec.band_columns))
    batches = iter_piece_batches(pieces, config.data.eval_batch_size) if pieces else iter(())
    beat = pulse()
    beat.waiting(f"the {split} evaluation's batches")
    for batch in _in_step(batches, ctx, len(spec.names)):
        beat.progress()
        sparse = batch["sparse"].to(ctx.device)
        logits = model(batch["dense"].to(ctx.device), sparse)
        bands = frequency_bands(stats, spec.names, spec.band_columns, sparse) \
            if acc.with_bands else None
        acc.update(logits, batch["label"].to(ctx.device), bands)
    model.train(True)
    return {f"{split}_{k}": v for k, v in acc.compute().items()}


def _in_step(batches: Iterator[Batch], ctx: WorkerContext, features: int) -> Iterator[Batch]:
    """The batches, and empty ones once they run out while another worker still has some:
    every lookup is a collective, so all workers go on until the last one is done."""
    empty = {"sparse": torch.zeros(0, features, dtype=torch.int64, device=ctx.device),
             "dense": torch.zeros(0, 13, device=ctx.device),
             "label": torch.zeros(0, device=ctx.device)}
    while True:
        batch = next(batches, None)
        if ctx.distributed:
            more = torch.tensor([batch is not None], dtype=torch.int32, device=ctx.device)
            dist.all_reduce(more, op=dist.ReduceOp.MAX)
            if not more.item():
                return
        elif batch is None:
            return
        yield empty if batch is None else batch
