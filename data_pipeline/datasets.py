"""Train, validation and test data from Parquet shards: Ray Data for training, pyarrow for loops.

Both paths read the same row ranges (the MLPerf split rule, `split_row_ranges`) and apply the
one transform (`transforms.transform_table`), so a model sees the same numbers whichever path
feeds it. Per-block overhead dominates Ray Data on small blocks (RAY_NOTES), so a block here
is a whole Parquet row group (131,072 rows by default), transformed and packed into three
columns in the read task itself (the map is fused with the read), and a worker receives whole
blocks and cuts its batches from them as zero-copy views.

Split rule, exactly:
* several days: every day but the last is train; the last day's rows (in file order: parts by
  number, rows in file order) are halved, the first ``n // 2`` rows validation, the rest test.
  Terabyte: days 0–22 train, day 23 → validation + test.
* one day (Kaggle's single ``train.txt``): its ``n`` rows are first cut into 7 equal "days" at
  ``floor(k * n / 7)``; rows ``[0, floor(6n/7))`` are train and the last seventh is halved as
  above.
The days and files are those the manifest lists (``manifest["days"]``, with each day's
``files`` when given; otherwise every ``part-XXXXX.parquet`` of the day, or every ``day=N``
folder); a folder without a manifest is incomplete and is refused.
"""

from __future__ import annotations

import functools
import re
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data_pipeline.schema import NUM_DENSE, NUM_SPARSE
from data_pipeline.shards import ROW_GROUP_ROWS, read_manifest
from data_pipeline.transforms import transform_table

if TYPE_CHECKING:
    import ray.data
    import torch

SPLITS: tuple[str, ...] = ("train", "validation", "test")
# Rows per block: one default row group. Fewer, larger blocks is what makes Ray Data fast here.
DEFAULT_BLOCK_ROWS = ROW_GROUP_ROWS
# Ray CPUs per read task. A train worker at 0.5 CPU on a 2-CPU node leaves 1.5: whole-CPU
# tasks would run one at a time and idle the rest; half-CPU tasks fill it.
DEFAULT_TASK_CPUS = 0.5
# Bytes per row after packing (13 float32 + 26 int64 + 1 float32), for Ray's memory planning.
PACKED_ROW_BYTES = 4 * NUM_DENSE + 8 * NUM_SPARSE + 4
_DAY_DIR = re.compile(r"^day=(\d+)$")
_PART_FILE = re.compile(r"^part-(\d+)\.parquet$")

Range = tuple[int, int, int]  # (day, first row, end row) in row positions within the day


@dataclass(frozen=True)
class ShardFile:
    """One Parquet shard and where its row groups start."""

    day: int
    part: int
    path: str
    rows: int
    row_group_starts: tuple[int, ...]  # first row of each row group, then `rows`


@dataclass(frozen=True)
class Piece:
    """Rows [start, stop) of one shard file: the unit of reading (one Ray Data block)."""

    path: str
    start: int
    stop: int
    row_groups: tuple[int, ...]
    first_row_group_start: int

    @property
    def rows(self) -> int:
        return self.stop - self.start


# ---------------------------------------------------------------------------------------------
# The split rule.


def split_row_ranges(day_rows: Mapping[int, int]) -> dict[str, list[Range]]:
    """The MLPerf split of days with the given row counts (see the module docstring).

    Returns {"train", "validation", "test"} → [(day, start, stop), ...] with empty ranges left
    out; all splits together cover every row exactly once.
    """
    days = sorted(int(d) for d in day_rows)
    if not days:
        return {s: [] for s in SPLITS}
    if len(days) == 1:
        d = days[0]
        n = int(day_rows[d])
        cut = (6 * n) // 7  # start of the 7th of seven equal parts
        train = [(d, 0, cut)]
        last = (d, cut, n)
    else:
        train = [(d, 0, int(day_rows[d])) for d in days[:-1]]
        last = (days[-1], 0, int(day_rows[days[-1]]))
    d, start, stop = last
    mid = start + (stop - start) // 2
    out = {"train": train, "validation": [(d, start, mid)], "test": [(d, mid, stop)]}
    return {s: [r for r in ranges if r[2] > r[1]] for s, ranges in out.items()}


def _manifest_days(manifest: Mapping[str, Any]) -> dict[int, list[str] | None] | None:
    """day → the shard paths the manifest lists for it (None: not listed), or None when the
    manifest names no days."""
    days = manifest.get("days")
    if isinstance(days, Mapping):
        entries = [(int(d), v) for d, v in days.items()]
    elif isinstance(days, Sequence) and not isinstance(days, str):
        entries = [(int(d["day"]), d) if isinstance(d, Mapping) else (int(d), None)
                   for d in days]
    else:
        return None
    out: dict[int, list[str] | None] = {}
    for day, entry in entries:
        files = entry.get("files") if isinstance(entry, Mapping) else None
        out[day] = [f["path"] for f in files] if isinstance(files, list) else None
    return out


def _shard_file(day: int, path: Path) -> ShardFile:
    m = _PART_FILE.match(path.name)
    if not m:
        raise ValueError(f"{path}: not a part-XXXXX.parquet shard")
    meta = pq.read_metadata(path)
    sizes = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
    starts = tuple(int(s) for s in np.concatenate([[0], np.cumsum(sizes)]))
    return ShardFile(day, int(m[1]), str(path.resolve()), meta.num_rows, starts)


def discover_shards(root: str | Path) -> list[ShardFile]:
    """The shards of a complete dataset (one with a manifest), in (day, part) order.

    The files the manifest lists for each day when it lists them (files of an older run in the
    same folder are not data), else every `day=N/part-XXXXX.parquet` of the listed days (or of
    every day when the manifest lists none).
    """
    root = Path(root)
    listed = _manifest_days(read_manifest(root))
    found: dict[int, list[Path]] = {}
    for day_dir in sorted(root.iterdir()):
        m = _DAY_DIR.match(day_dir.name)
        if m and day_dir.is_dir():
            found[int(m[1])] = [f for f in day_dir.iterdir() if _PART_FILE.match(f.name)]
    days = sorted(found) if listed is None else sorted(listed)
    files = []
    for day in days:
        paths = listed.get(day) if listed is not None else None
        chosen = [root / p for p in paths] if paths is not None else found.get(day, [])
        if not chosen:
            raise FileNotFoundError(f"{root}: manifest lists day {day} but it has no shards")
        for path in chosen:
            if not path.is_file():
                raise FileNotFoundError(f"{root}: shard {path} listed in the manifest is missing")
            files.append(_shard_file(day, path))
    files.sort(key=lambda s: (s.day, s.part))
    return files


def day_rows(files: Iterable[ShardFile]) -> dict[int, int]:
    out: dict[int, int] = {}
    for f in files:
        out[f.day] = out.get(f.day, 0) + f.rows
    return out


def _pieces_of_file(f: ShardFile, start: int, stop: int, block_rows: int) -> list[Piece]:
    # Consecutive row groups are gathered up to `block_rows`, so tiny row groups (a small
    # converted file) still make reasonably large blocks; a large one is never split.
    out: list[Piece] = []
    rgs: list[int] = []
    lo = hi = start
    starts = f.row_group_starts
    for g in range(len(starts) - 1):
        a, b = max(starts[g], start), min(starts[g + 1], stop)
        if a >= b:
            continue
        if rgs and b - lo > block_rows:
            out.append(Piece(f.path, lo, hi, tuple(rgs), starts[rgs[0]]))
            rgs, lo = [], a
        rgs.append(g)
        hi = b
    if rgs:
        out.append(Piece(f.path, lo, hi, tuple(rgs), starts[rgs[0]]))
    return out


def split_pieces(
    root: str | Path, split: str, *, block_rows: int = DEFAULT_BLOCK_ROWS,
    files: Sequence[ShardFile] | None = None,
) -> list[Piece]:
    """The pieces (file row ranges of about `block_rows`) that make up one split, in order."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    files = list(discover_shards(root) if files is None else files)
    pieces: list[Piece] = []
    offset: dict[int, int] = {}
    bounds = []
    for f in files:  # day-global row position of each file
        first = offset.get(f.day, 0)
        offset[f.day] = first + f.rows
        bounds.append((f, first))
    for day, lo, hi in split_row_ranges(day_rows(files))[split]:
        for f, first in bounds:
            if f.day != day:
                continue
            a, b = max(lo, first), min(hi, first + f.rows)
            if a < b:
                pieces.extend(_pieces_of_file(f, a - first, b - first, block_rows))
    return pieces


def split_sizes(root: str | Path) -> dict[str, int]:
    """Rows per split."""
    ranges = split_row_ranges(day_rows(discover_shards(root)))
    return {s: sum(b - a for _, a, b in r) for s, r in ranges.items()}


def read_piece(piece: Piece, columns: Sequence[str] | None = None,
               use_threads: bool = False) -> pa.Table:
    """The piece's rows in the shard schema (or just `columns`)."""
    pf = pq.ParquetFile(piece.path)
    table = pf.read_row_groups(list(piece.row_groups), columns=columns, use_threads=use_threads)
    return table.slice(piece.start - piece.first_row_group_start, piece.rows)


# ---------------------------------------------------------------------------------------------
# Ray Data.


def _pack(batch: pa.Table) -> pa.Table:
    from ray.data.extensions import ArrowTensorArray

    # Built here, zero-copy, as Ray's tensor columns: handing Ray the dict of arrays instead
    # costs a copying conversion of ~20 ms per 131k-row block, half the transform's time.
    out = transform_table(batch)
    return pa.table({k: ArrowTensorArray.from_numpy(v) if v.ndim > 1 else pa.array(v)
                     for k, v in out.items()})


@functools.lru_cache(maxsize=1)
def _datasource_class() -> type:
    # Defined lazily so that importing this module (e.g. for the split rule) never imports Ray.
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    class ShardPieceDatasource(Datasource):
        """Reads a list of `Piece`s, one read task and one block per piece."""

        def __init__(self, pieces: Sequence[Piece], columns: Sequence[str] | None = None):
            super().__init__()
            self._pieces = list(pieces)
            self._columns = None if columns is None else list(columns)

        def get_name(self) -> str:
            return "CriteoShards"

        def estimate_inmemory_data_size(self) -> int:
            return sum(p.rows for p in self._pieces) * PACKED_ROW_BYTES

        def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                           data_context: Any = None) -> list[Any]:
            return [
                ReadTask(
                    functools.partial(_read_blocks, p, self._columns),
                    BlockMetadata(num_rows=p.rows, size_bytes=p.rows * PACKED_ROW_BYTES,
                                  input_files=[p.path], exec_stats=None),
                    per_task_row_limit=per_task_row_limit,
                )
                for p in self._pieces
            ]

    return ShardPieceDatasource


def _read_blocks(piece: Piece, columns: list[str] | None) -> list[pa.Table]:
    return [read_piece(piece, columns)]


def read_split(root: str | Path, split: str, *, block_rows: int = DEFAULT_BLOCK_ROWS,
               columns: Sequence[str] | None = None,
               task_cpus: float = DEFAULT_TASK_CPUS) -> ray.data.Dataset:
    """One split as a Ray Dataset of raw shard rows (the Parquet schema), one block per piece."""

    return read_pieces(split_pieces(root, split, block_rows=block_rows), columns=columns,
                       task_cpus=task_cpus)


def read_pieces(pieces: Sequence[Piece], *, columns: Sequence[str] | None = None,
                task_cpus: float = DEFAULT_TASK_CPUS) -> ray.data.Dataset:
    """Given pieces, in order, as a Ray Dataset of raw shard rows, one block per piece."""
    import ray.data

    # One block per piece: without the override Ray splits blocks to reach its default
    # parallelism, making exactly the small blocks this module avoids.
    return ray.data.read_datasource(_datasource_class()(list(pieces), columns),
                                    override_num_blocks=max(1, len(pieces)),
                                    num_cpus=task_cpus)


def transformed(ds: ray.data.Dataset, task_cpus: float = DEFAULT_TASK_CPUS) -> ray.data.Dataset:
    """Raw shard rows → columns `dense` f32[13], `sparse` i64[26], `label` f32."""
    # batch_size=None: the whole block at once; the same CPUs as the read, so that the map
    # fuses with it into one task and adds no blocks of its own.
    return ds.map_batches(_pack, batch_format="pyarrow", batch_size=None,
                          udf_modifying_row_count=False, num_cpus=task_cpus)


def make_dataset(root: str | Path, split: str, *, block_rows: int = DEFAULT_BLOCK_ROWS,
                 shuffle_seed: int | None = None,
                 task_cpus: float = DEFAULT_TASK_CPUS) -> ray.data.Dataset:
    """One split, transformed: columns `dense` f32[13], `sparse` i64[26], `label` f32.

    `shuffle_seed` shuffles the order of blocks (cheap; rows stay in place within a block),
    which is all the shuffling row-iid data needs. `task_cpus`: Ray CPUs each read task asks
    for (see DEFAULT_TASK_CPUS).
    """
    ds = read_split(root, split, block_rows=block_rows, task_cpus=task_cpus)
    if shuffle_seed is not None:
        ds = ds.randomize_block_order(seed=shuffle_seed)
    return transformed(ds, task_cpus)


# ---------------------------------------------------------------------------------------------
# Batches.


def _rebatch(blocks: Iterable[dict[str, Any]], batch_size: int, drop_last: bool,
             concat: Callable[[list[Any]], Any]) -> Iterator[dict[str, Any]]:
    # Whole blocks in, `batch_size` rows out: slices are views; only a batch straddling two
    # blocks is copied.
    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
    carry: dict[str, list[Any]] = {}
    carried = 0
    for block in blocks:
        n = len(next(iter(block.values())))
        pos = 0
        if carried:
            take = min(batch_size - carried, n)
            for k, v in block.items():
                carry[k].append(v[:take])
            carried += take
            pos = take
            if carried < batch_size:
                continue
            yield {k: concat(v) for k, v in carry.items()}
            carry, carried = {}, 0
        while n - pos >= batch_size:
            yield {k: v[pos:pos + batch_size] for k, v in block.items()}
            pos += batch_size
        if pos < n:
            carry = {k: [v[pos:]] for k, v in block.items()}
            carried = n - pos
    if carried and not drop_last:
        yield {k: concat(v) if len(v) > 1 else v[0] for k, v in carry.items()}


def _as_torch(block: Mapping[str, np.ndarray], device: Any = None) -> dict[str, torch.Tensor]:
    import torch

    with warnings.catch_warnings():
        # Blocks live read-only in Ray's object store; the tensors share that memory, which is
        # the point (no copy). Nothing downstream writes into its input batch.
        warnings.filterwarnings("ignore", message=".*not writable.*")
        out = {k: torch.from_numpy(np.asarray(v)) for k, v in block.items()}
    if device is not None:
        out = {k: v.to(device, non_blocking=True) for k, v in out.items()}
    return out


def _torch_cat(parts: list[Any]) -> Any:
    import torch

    return torch.cat(parts)


def iter_worker_batches(
    shard: Any, batch_size: int, *, drop_last: bool = False, prefetch_blocks: int = 2,
    device: Any = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """Torch batches {"dense" f32[B,13], "sparse" i64[B,26], "label" f32[B]} from a worker's
    shard (`ray.train.get_dataset_shard("train")`, or any transformed Dataset/DataIterator).

    Ray hands over whole blocks (no re-batching inside Ray, which is where it spends most);
    batches are cut here as views. Tensors share read-only memory: do not modify them in place.
    """
    blocks = shard.iter_batches(batch_size=None, batch_format="numpy",
                                prefetch_batches=prefetch_blocks)
    yield from torch_batches(blocks, batch_size, drop_last=drop_last, device=device)


def torch_batches(
    blocks: Iterable[Mapping[str, np.ndarray]], batch_size: int, *, drop_last: bool = False,
    device: Any = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """Numpy blocks (whole Ray Data blocks, in order) → torch batches of `batch_size` rows."""
    torch_blocks = (_as_torch(b) for b in blocks)
    for batch in _rebatch(torch_blocks, batch_size, drop_last, _torch_cat):
        if device is not None:
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        yield batch


def iter_local_batches(
    root: str | Path, split: str, batch_size: int, *, drop_last: bool = False,
    as_torch: bool = True, block_rows: int = DEFAULT_BLOCK_ROWS,
) -> Iterator[dict[str, Any]]:
    """The same batches as `iter_worker_batches`, read in this process with pyarrow (no Ray),
    in file order: for single-process training loops and evaluation."""
    pieces = split_pieces(root, split, block_rows=block_rows)
    blocks: Iterable[dict[str, Any]] = (
        transform_table(read_piece(p, use_threads=True)) for p in pieces
    )
    if as_torch:
        blocks = (_as_torch(b) for b in blocks)
        yield from _rebatch(blocks, batch_size, drop_last, _torch_cat)
    else:
        yield from _rebatch(blocks, batch_size, drop_last, np.concatenate)
