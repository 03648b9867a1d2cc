"""Per-feature id frequencies, written beside the shards: what learned hashing and the rare-id
evaluation read.

Two forms, chosen by the size of the data (`EXACT_ROW_LIMIT` rows in the counted split):
* exact: every distinct id with its count, sorted by count (descending, ties by id);
* sketch, for Terabyte scale: a count-min sketch (estimates never under-count; they over-count
  by at most e/width of the total with probability 1 - e^-depth), the top-K heavy hitters
  (merged partial top lists, re-estimated with the sketch) and a HyperLogLog for the number
  of distinct ids; memory is bounded whatever the data.

Counts come from the training split by default (the MLPerf rule of `datasets`): a model is
judged on how often it *saw* an id, and validation/test ids must not leak into hashing.

Frequency bands (`DatasetStats.frequency_band`), with the defaults recorded in stats.json:
* rare (0): seen fewer than ``RARE_BELOW`` = 10 times (unseen ids included), the usual
  minimum count of Criteo preprocessing below which an id gets no row of its own;
* hot (2): seen at least ``max(RARE_BELOW, HOT_SHARE * total)`` times, i.e. in ≥ 0.01 % of
  the feature's non-missing occurrences;
* medium (1): the rest.
In sketch mode a band can only err upwards (estimates over-count): an id called rare is rare.

Layout: ``<root>/stats/stats.json`` (written last: its presence means complete) plus
``counts.npz`` (exact) or ``sketch.npz``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from data_pipeline import datasets
from data_pipeline.schema import SPARSE_COLUMNS
from data_pipeline.shards import write_json_atomic
from idhash.splitmix import hash64_bits

STATS_DIR = "stats"
STATS_JSON = "stats.json"
STATS_VERSION = 1
EXACT_ROW_LIMIT = 50_000_000  # Kaggle (45M rows) still gets exact counts
RARE_BELOW = 10
HOT_SHARE = 1e-4
SKETCH_WIDTH = 1 << 16
SKETCH_DEPTH = 4
TOP_K = 1 << 16
HLL_P = 14  # 16,384 registers: ~0.8 % standard error on the distinct count
ROWS_PER_TASK = 1 << 21  # pieces gathered per Ray task
EXACT, SKETCH = "exact", "sketch"

def _feature(feature: str | int) -> str:
    if isinstance(feature, (int, np.integer)):
        return SPARSE_COLUMNS[int(feature)]
    if feature not in SPARSE_COLUMNS:
        raise KeyError(f"unknown categorical feature {feature!r}; expected C1..C26 or 0..25")
    return feature


# ---------------------------------------------------------------------------------------------
# Sketch parts.


def cms_buckets(ids: np.ndarray, depth: int, width: int) -> np.ndarray:
    """Bucket of each id in each row of the count-min sketch: int64 [depth, len(ids)]."""
    if width & (width - 1):
        raise ValueError(f"sketch width must be a power of two, got {width}")
    mask = np.uint64(width - 1)
    return np.stack([(hash64_bits(ids, 101 + d) & mask).astype(np.int64) for d in range(depth)])


def hll_registers(ids: np.ndarray, p: int = HLL_P) -> np.ndarray:
    """HyperLogLog registers (uint8 [2^p]) of a set of ids; merge by element-wise max."""
    regs = np.zeros(1 << p, np.uint8)
    if len(ids) == 0:
        return regs
    h = hash64_bits(ids, 7)
    idx = (h >> np.uint64(64 - p)).astype(np.int64)
    rest_bits = 64 - p
    rest = h & np.uint64((1 << rest_bits) - 1)
    # Rank = position of the first 1 bit among the remaining bits (all zero: bits + 1).
    _, exp = np.frexp(rest.astype(np.float64))
    rank = np.where(rest == 0, rest_bits + 1, rest_bits - (exp - 1)).astype(np.uint8)
    np.maximum.at(regs, idx, rank)
    return regs


def hll_estimate(regs: np.ndarray) -> int:
    m = len(regs)
    alpha = 0.7213 / (1 + 1.079 / m)
    est = alpha * m * m / float(np.sum(np.ldexp(1.0, -regs.astype(np.int64))))
    zeros = int(np.count_nonzero(regs == 0))
    if est <= 2.5 * m and zeros:
        est = m * math.log(m / zeros)  # linear counting for small sets
    return round(est)


# ---------------------------------------------------------------------------------------------
# Counting one group of pieces (a Ray task, or in-process).


@dataclass
class _Partial:
    rows: int = 0
    missing: dict[str, int] = field(default_factory=dict)
    total: dict[str, int] = field(default_factory=dict)
    exact: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    cms: dict[str, np.ndarray] = field(default_factory=dict)
    hll: dict[str, np.ndarray] = field(default_factory=dict)
    top: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)


def _value_counts(col: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    vc = pc.value_counts(col.drop_null())  # a hash table in C++: no sort of the rows
    values = vc.field("values").to_numpy(zero_copy_only=False).astype(np.int64)
    counts = vc.field("counts").to_numpy(zero_copy_only=False).astype(np.int64)
    return values, counts


def _group_sum(ids: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if len(ids) == 0:
        return ids.astype(np.int64), counts.astype(np.int64)
    t = pa.table({"id": ids, "n": counts}).group_by("id").aggregate([("n", "sum")])
    return (t.column("id").to_numpy().astype(np.int64),
            t.column("n_sum").to_numpy().astype(np.int64))


def _top(ids: np.ndarray, counts: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    if len(ids) > k:
        keep = np.argpartition(-counts, k - 1)[:k]
        ids, counts = ids[keep], counts[keep]
    return ids, counts


def _count_pieces(pieces: Sequence[datasets.Piece], mode: str, width: int, depth: int,
                  top_k: int) -> _Partial:
    out = _Partial()
    tables = [datasets.read_piece(p, columns=list(SPARSE_COLUMNS)) for p in pieces]
    if not tables:
        return out
    table = pa.concat_tables(tables)
    out.rows = table.num_rows
    for name in SPARSE_COLUMNS:
        col = table.column(name)
        ids, counts = _value_counts(col)
        out.missing[name] = col.null_count
        out.total[name] = int(counts.sum())
        if mode == EXACT:
            out.exact[name] = (ids, counts)
            continue
        # Per-task sketches stay int32 (a task counts < 2^31 rows) to halve what travels.
        cms = np.zeros((depth, width), np.int32)
        for d, b in enumerate(cms_buckets(ids, depth, width)):
            cms[d] = np.bincount(b, weights=counts, minlength=width).astype(np.int32)
        out.cms[name] = cms
        out.hll[name] = hll_registers(ids)
        out.top[name] = _top(ids, counts, top_k)
    return out


# ---------------------------------------------------------------------------------------------
# Merging and writing.


class _Merger:
    def __init__(self, mode: str, width: int, depth: int, top_k: int):
        self.mode, self.width, self.depth, self.top_k = mode, width, depth, top_k
        self.rows = 0
        self.missing = dict.fromkeys(SPARSE_COLUMNS, 0)
        self.total = dict.fromkeys(SPARSE_COLUMNS, 0)
        self.pending: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {
            c: [] for c in SPARSE_COLUMNS}
        self.pending_len = dict.fromkeys(SPARSE_COLUMNS, 0)
        self.merged_len = dict.fromkeys(SPARSE_COLUMNS, 0)
        self.cms = {c: np.zeros((depth, width), np.int64) for c in SPARSE_COLUMNS} \
            if mode == SKETCH else {}
        self.hll = {c: np.zeros(1 << HLL_P, np.uint8) for c in SPARSE_COLUMNS} \
            if mode == SKETCH else {}

    def add(self, part: _Partial) -> None:
        self.rows += part.rows
        for c in part.total:
            self.missing[c] += part.missing[c]
            self.total[c] += part.total[c]
        if self.mode == EXACT:
            for c, v in part.exact.items():
                self._pend(c, v, limit=None)
        else:
            for c in part.cms:
                self.cms[c] += part.cms[c]
                np.maximum(self.hll[c], part.hll[c], out=self.hll[c])
                # Partial top lists are summed and cut to a few times K: a globally heavy
                # id is heavy in most parts, so it survives the cut.
                self._pend(c, part.top[c], limit=4 * self.top_k)

    def _pend(self, c: str, v: tuple[np.ndarray, np.ndarray], limit: int | None) -> None:
        self.pending[c].append(v)
        self.pending_len[c] += len(v[0])
        # Merge when the pending lists outgrow the merged one: amortised linear, bounded memory.
        if self.pending_len[c] > 2 * self.merged_len[c] + (1 << 20):
            self._merge(c, limit)

    def _merge(self, c: str, limit: int | None) -> tuple[np.ndarray, np.ndarray]:
        parts = self.pending[c]
        ids = np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, np.int64)
        counts = np.concatenate([p[1] for p in parts]) if parts else np.zeros(0, np.int64)
        ids, counts = _group_sum(ids, counts)
        if limit is not None:
            ids, counts = _top(ids, counts, limit)
        self.pending[c] = [(ids, counts)]
        self.pending_len[c] = self.merged_len[c] = len(ids)
        return ids, counts

    def finish(self, out_dir: Path) -> dict[str, Any]:
        features: dict[str, Any] = {}
        arrays: dict[str, np.ndarray] = {}
        for c in SPARSE_COLUMNS:
            if self.mode == EXACT:
                ids, counts = self._merge(c, None)
                order = np.lexsort((ids, -counts))
                arrays[f"{c}.ids"], arrays[f"{c}.counts"] = ids[order], counts[order]
                distinct = len(ids)
            else:
                ids, _ = self._merge(c, None)
                est = _cms_min(self.cms[c], ids)
                ids, est = _top(ids, est, self.top_k)
                order = np.lexsort((ids, -est))
                arrays[f"{c}.top_ids"], arrays[f"{c}.top_counts"] = ids[order], est[order]
                arrays[f"{c}.cms"] = self.cms[c]
                arrays[f"{c}.hll"] = self.hll[c]
                distinct = hll_estimate(self.hll[c])
            features[c] = {"total": self.total[c], "missing": self.missing[c],
                           "num_distinct": distinct}
        name = "counts.npz" if self.mode == EXACT else "sketch.npz"
        tmp = out_dir / f".{name}.tmp-{os.getpid()}.npz"
        np.savez_compressed(tmp, **arrays)
        os.replace(tmp, out_dir / name)
        return features


def _cms_min(cms: np.ndarray, ids: np.ndarray) -> np.ndarray:
    if len(ids) == 0:
        return np.zeros(0, np.int64)
    b = cms_buckets(ids, cms.shape[0], cms.shape[1])
    return np.min(np.take_along_axis(cms, b, axis=1), axis=0).astype(np.int64)


def _task_groups(pieces: Sequence[datasets.Piece], rows: int) -> list[list[datasets.Piece]]:
    groups: list[list[datasets.Piece]] = [[]]
    acc = 0
    for p in pieces:
        if acc and acc + p.rows > rows:
            groups.append([])
            acc = 0
        groups[-1].append(p)
        acc += p.rows
    return [g for g in groups if g]


def write_feature_stats(
    root: str | Path,
    *,
    split: str = "train",
    mode: str = "auto",
    exact_row_limit: int = EXACT_ROW_LIMIT,
    sketch_width: int = SKETCH_WIDTH,
    sketch_depth: int = SKETCH_DEPTH,
    top_k: int = TOP_K,
    use_ray: bool | None = None,
) -> Path:
    """Count every categorical feature of `split` ("train", "validation", "test" or "all") of
    the shards under `root`, write `<root>/stats/`, and return that folder.

    mode: "exact", "sketch", or "auto" (exact when the split has ≤ `exact_row_limit` rows).
    Groups of pieces are counted in parallel Ray tasks when Ray is initialised (or `use_ray`).
    """
    root = Path(root)
    files = datasets.discover_shards(root)
    splits = datasets.SPLITS if split == "all" else (split,)
    pieces = [p for s in splits for p in datasets.split_pieces(root, s, files=files)]
    rows = sum(p.rows for p in pieces)
    if mode == "auto":
        mode = EXACT if rows <= exact_row_limit else SKETCH
    if mode not in (EXACT, SKETCH):
        raise ValueError(f"mode must be 'auto', {EXACT!r} or {SKETCH!r}, got {mode!r}")
    if use_ray is None:
        import ray

        use_ray = ray.is_initialized()
    merger = _Merger(mode, sketch_width, sketch_depth, top_k)
    groups = _task_groups(pieces, ROWS_PER_TASK)
    for part in _run(groups, mode, sketch_width, sketch_depth, top_k, use_ray):
        merger.add(part)
    out_dir = root / STATS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    features = merger.finish(out_dir)
    meta = {
        "version": STATS_VERSION,
        "mode": mode,
        "split": split,
        "rows": merger.rows,
        "days": sorted({f.day for f in files}),
        "rare_below": RARE_BELOW,
        "hot_share": HOT_SHARE,
        "sketch": {"width": sketch_width, "depth": sketch_depth, "top_k": top_k,
                   "hll_p": HLL_P} if mode == SKETCH else None,
        "features": features,
    }
    write_json_atomic(meta, out_dir / STATS_JSON)
    return out_dir


def _run(groups: list[list[datasets.Piece]], mode: str, width: int, depth: int, top_k: int,
         use_ray: bool) -> Iterable[_Partial]:
    if not use_ray:
        for g in groups:
            yield _count_pieces(g, mode, width, depth, top_k)
        return
    import ray

    remote = ray.remote(num_cpus=1)(_count_pieces)
    pending = [remote.remote(g, mode, width, depth, top_k) for g in groups]
    while pending:  # merge as results arrive, so at most a few partials are held at once
        done, pending = ray.wait(pending, num_returns=1)
        yield ray.get(done[0])


# ---------------------------------------------------------------------------------------------
# Reading.


class DatasetStats:
    """Frequencies of every categorical feature of a dataset, as written by
    `write_feature_stats` (one feature's ids and counts feed `embeddings`' `FeatureStats`).

    Features are named "C1".."C26" or given by index 0..25.
    """

    def __init__(self, directory: Path, meta: dict[str, Any], arrays: dict[str, np.ndarray]):
        self.directory = directory
        self.meta = meta
        self.mode: str = meta["mode"]
        self.rows: int = meta["rows"]
        self.rare_below: int = meta["rare_below"]
        self.hot_share: float = meta["hot_share"]
        self._arrays = arrays
        self._sorted: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    @property
    def features(self) -> tuple[str, ...]:
        """Feature names in column order (C1, C2, …, C26), the order of a batch's columns.

        stats.json is written with sorted keys (C1, C10, C11, …), so the order of
        `meta["features"]` must never be used positionally.
        """
        return tuple(c for c in SPARSE_COLUMNS if c in self.meta["features"])

    def counts(self, feature: str | int) -> tuple[np.ndarray, np.ndarray]:
        """(ids int64, counts int64) by count descending (ties by id). Exact mode: every id
        seen; sketch mode: the top-K heavy hitters with their (over-)estimated counts."""
        c = _feature(feature)
        if self.mode == EXACT:
            return self._arrays[f"{c}.ids"], self._arrays[f"{c}.counts"]
        return self._arrays[f"{c}.top_ids"], self._arrays[f"{c}.top_counts"]

    def estimate(self, feature: str | int, ids: np.ndarray | Sequence[int]) -> np.ndarray:
        """Count of each id (int64; 0 for unseen in exact mode, never below the truth in
        sketch mode)."""
        c = _feature(feature)
        ids = np.asarray(ids, dtype=np.int64)
        if self.mode == SKETCH:
            return _cms_min(self._arrays[f"{c}.cms"], ids.ravel()).reshape(ids.shape)
        if c not in self._sorted:
            all_ids, all_counts = self.counts(c)
            order = np.argsort(all_ids, kind="stable")
            self._sorted[c] = (all_ids[order], all_counts[order])
        sorted_ids, sorted_counts = self._sorted[c]
        if len(sorted_ids) == 0:
            return np.zeros(ids.shape, np.int64)
        pos = np.clip(np.searchsorted(sorted_ids, ids), 0, len(sorted_ids) - 1)
        return np.where(sorted_ids[pos] == ids, sorted_counts[pos], 0).astype(np.int64)

    def num_distinct(self, feature: str | int) -> int:
        """Distinct ids seen (exact, or HyperLogLog's estimate in sketch mode)."""
        return int(self.meta["features"][_feature(feature)]["num_distinct"])

    def total(self, feature: str | int) -> int:
        """Non-missing occurrences of the feature."""
        return int(self.meta["features"][_feature(feature)]["total"])

    def missing(self, feature: str | int) -> int:
        return int(self.meta["features"][_feature(feature)]["missing"])

    def hot_threshold(self, feature: str | int) -> int:
        """Smallest count that makes an id hot: max(rare_below, ceil(hot_share × total))."""
        return max(self.rare_below, math.ceil(self.hot_share * self.total(feature)))

    def frequency_band(self, feature: str | int,
                       ids: np.ndarray | Sequence[int]) -> np.ndarray:
        """int8 per id: 0 rare (< rare_below), 1 medium, 2 hot (≥ `hot_threshold`)."""
        est = self.estimate(feature, ids)
        band = np.ones(est.shape, np.int8)
        band[est < self.rare_below] = 0
        band[est >= self.hot_threshold(feature)] = 2
        return band


def stats_dir(root: str | Path) -> Path:
    return Path(root) / STATS_DIR


def load_feature_stats(root: str | Path) -> DatasetStats:
    """Load `<root>/stats/` (or a stats folder given directly)."""
    root = Path(root)
    directory = root if (root / STATS_JSON).is_file() else stats_dir(root)
    meta_path = directory / STATS_JSON
    if not meta_path.is_file():
        raise FileNotFoundError(f"no {STATS_JSON} under {root}: run write_feature_stats first")
    meta = json.loads(meta_path.read_text())
    name = "counts.npz" if meta["mode"] == EXACT else "sketch.npz"
    with np.load(directory / name, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    return DatasetStats(directory, meta, arrays)
