"""Deterministic per-worker row ranges of a split, so a resumed run sees every row once.

Ray Data's streaming split hands blocks to whichever worker asks first, so after a restart
nobody knows which rows were already trained on. Here each epoch's order is a seeded
shuffle of the split's pieces (whole blocks), the shuffled stream is cut into equal
contiguous ranges, one per worker, and a worker that resumes skips the rows it has already
consumed. Each worker still reads its range through Ray Data (read tasks on the cluster).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from data_pipeline.datasets import (
    DEFAULT_BLOCK_ROWS,
    Piece,
    read_pieces,
    split_pieces,
    torch_batches,
    transformed,
)

if TYPE_CHECKING:
    import ray.data
    import torch


def slice_pieces(pieces: Sequence[Piece], start: int, stop: int) -> list[Piece]:
    """Rows [start, stop) of the stream the pieces make, end to end, as pieces."""
    out: list[Piece] = []
    pos = 0
    for p in pieces:
        a, b = max(start, pos), min(stop, pos + p.rows)
        if a < b:
            out.append(replace(p, start=p.start + a - pos, stop=p.start + b - pos))
        pos += p.rows
        if pos >= stop:
            break
    return out


def shuffled(pieces: Sequence[Piece], seed: int | None) -> list[Piece]:
    """Pieces in a seeded order (block-level shuffle); None keeps file order."""
    if seed is None:
        return list(pieces)
    order = np.random.default_rng(seed).permutation(len(pieces))
    return [pieces[i] for i in order]


def worker_range(total_rows: int, rank: int, world: int, rows_per_worker: int) -> tuple[int, int]:
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} outside 0..{world - 1}")
    if rows_per_worker * world > total_rows:
        raise ValueError(f"{world} × {rows_per_worker} rows exceed the split's {total_rows}")
    return rank * rows_per_worker, (rank + 1) * rows_per_worker


def train_pieces(
    root: str | Path,
    rank: int,
    world: int,
    global_batch: int,
    *,
    seed: int | None,
    skip_rows: int = 0,
    block_rows: int = DEFAULT_BLOCK_ROWS,
) -> tuple[list[Piece], int]:
    """This worker's pieces of the train split for one epoch, and the steps in the epoch.

    Every step takes `global_batch // world` rows on each worker; the remainder of the split
    that does not fill a global batch is left out of the epoch (a different remainder each
    epoch, since the order is reshuffled). `skip_rows` drops rows already trained on.
    """
    if global_batch % world:
        raise ValueError(f"global batch {global_batch} is not divisible by {world} workers")
    pieces = shuffled(split_pieces(root, "train", block_rows=block_rows), seed)
    total = sum(p.rows for p in pieces)
    steps = total // global_batch
    if steps == 0:
        raise ValueError(f"the train split has {total} rows, fewer than one batch ({global_batch})")
    local = global_batch // world
    start, stop = worker_range(total, rank, world, steps * local)
    return slice_pieces(pieces, start + skip_rows, stop), steps


def eval_pieces(
    root: str | Path, split: str, rank: int, world: int, *, block_rows: int = DEFAULT_BLOCK_ROWS
) -> list[Piece]:
    """This worker's share of an evaluation split: every row once over all workers."""
    pieces = split_pieces(root, split, block_rows=block_rows)
    total = sum(p.rows for p in pieces)
    bounds = [total * r // world for r in range(world + 1)]
    return slice_pieces(pieces, bounds[rank], bounds[rank + 1])


def dataset_of(pieces: Sequence[Piece]) -> ray.data.Dataset:
    """The pieces as a transformed Ray Dataset (dense, sparse, label), read in order."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    # A training loop reads many small datasets; their progress bars would drown its own.
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    _quiet_ray_data_notices()
    return transformed(read_pieces(pieces))


class _DropNotices(logging.Filter):
    """Drops Ray Data's notices that say nothing to someone training:
    - "Progress bars disabled": disabling them is this module's choice (above);
    - "does not have any available CPUs": read at the instant a dataset starts, while the
      other streams' read tasks hold the CPUs left over by the workers, so it fires on
      healthy runs; a cluster that can never run the reads is refused before training
      starts (`training.preflight`), and a run that stalls anyway ends with what it waited
      for (`training.stall`).
    Kept where a user asked for Ray's INFO lines (EMBPRESS_LOG_LEVEL=INFO, `--verbose`)."""

    NOTICES = ("Progress bars disabled", "does not have any available CPUs")

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(n in record.getMessage() for n in self.NOTICES)


def _quiet_ray_data_notices() -> None:
    # The driver's level, or the one `training.run` hands its workers.
    asked = os.environ.get("EMBPRESS_LOG_LEVEL") or os.environ.get("EMBPRESS_WORKER_LOG_LEVEL")
    if (asked or "").upper() in ("INFO", "DEBUG"):
        return
    # Each notice is logged straight to its module's logger, where a filter applies
    # (a parent logger's filters skip records its children propagate).
    for name in ("ray.data.dataset", "ray.data._internal.progress"):
        log = logging.getLogger(name)
        if not any(isinstance(f, _DropNotices) for f in log.filters):
            log.addFilter(_DropNotices())


# Pieces (blocks) per window of `iter_piece_batches`: two windows (~8 blocks of 131k rows,
# ~270 MB packed) are in memory at a time.
DEFAULT_WINDOW_PIECES = 4


def iter_piece_batches(
    pieces: Sequence[Piece], batch_size: int, *, drop_last: bool = False,
    window_pieces: int = DEFAULT_WINDOW_PIECES, device: Any = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """Torch batches of the pieces' rows, in order, read through Ray Data a window at a time.

    Each window of pieces is materialised (read tasks on the cluster) in a background thread
    while the previous window trains. Why not one streaming Dataset of all pieces: Ray Data's
    streaming executor runs its scheduling loop in the consuming process, and while
    backpressure holds a long dataset with no task in flight the loop spins without waiting
    (Ray 2.60), taking the GIL and a core from training: ~45% of a train worker's samples on
    2 cores. A materialised window ends its execution, and one read ahead keeps the trainer
    fed. Batches are cut across window boundaries exactly as across blocks.
    """
    # The first window is one piece, so that training starts after one block is read.
    windows = [pieces[:1]] + [pieces[i:i + window_pieces]
                              for i in range(1, len(pieces), window_pieces)] if pieces else []

    def blocks() -> Iterator[dict[str, np.ndarray]]:
        if not windows:
            return
        with ThreadPoolExecutor(1, thread_name_prefix="embpress-read") as pool:
            ahead = pool.submit(_materialize, windows[0])
            for k in range(len(windows)):
                ds = ahead.result()
                if k + 1 < len(windows):
                    ahead = pool.submit(_materialize, windows[k + 1])
                yield from ds.iter_batches(batch_size=None, batch_format="numpy",
                                           prefetch_batches=0)

    yield from torch_batches(blocks(), batch_size, drop_last=drop_last, device=device)


def _materialize(pieces: Sequence[Piece]) -> ray.data.MaterializedDataset:
    return dataset_of(pieces).materialize()
