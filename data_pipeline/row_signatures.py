"""Minhash signatures of each categorical value's set of training rows: SCMA's addresses.

SCMA (arXiv 2103.06124) represents a value by the rows it occurs in; K minhashes of that set
(min over its rows r of hash_k(r), 32 bits) are what `embeddings.methods.scma` stores for the
frequent values. A signature is the minimum of a hash, so signatures of disjoint parts of the
data merge by element-wise minimum: each shard is signed on its own (vectorised numpy, the
one hash of `idhash.splitmix`) and the parts merge, whatever their order.

A value's rows never hold another value of its own feature, so within one feature row sets
are disjoint and their minhashes agree only by chance: the row sets alone give no semantic
sharing inside a feature (only across features). The same pass therefore also signs each
value's *context*, the set of values of the other features in its rows: values seen with
the same partners share memory in proportion to that overlap, and identical row sets still
give identical signatures. `ScmaConfig.sets` chooses.

Layout: `<root>/stats/signatures.npz`, per feature `<name>.values` (int64, the statistics'
order: by count, descending), `<name>.rows` and `<name>.contexts` (int32 bit patterns
[m, K]), for the values seen at least `min_count` times.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from idhash.splitmix import hash64_bits

SIGNATURES_FILE = "signatures.npz"
# Seeds of the K row hashes; far from the seeds mappers use.
ROW_SEED = 0x524F57  # "ROW"
_EMPTY = np.uint32(0xFFFFFFFF)
CONTEXT_SEED = 0x435458  # "CTX": seeds of the (feature, value) hashes of contexts
SETS = ("rows", "contexts")
DEFAULT_K = 4  # signatures computed per value (a method keeps up to this many)
DEFAULT_MIN_COUNT = 2  # a value seen once has a one-row set: nothing to share
DEFAULT_MAX_VALUES = 1 << 20  # per feature: 24 MiB of signatures at most


def row_hashes(rows: np.ndarray, k: int) -> np.ndarray:
    """uint32 [len(rows), k]: the K independent 32-bit hashes of global row numbers."""
    rows = np.asarray(rows, dtype=np.int64)
    return np.stack([(hash64_bits(rows, ROW_SEED + j) >> np.uint64(32)).astype(np.uint32)
                     for j in range(k)], axis=1)


def minhash_signatures(ids: np.ndarray, rows: np.ndarray, k: int
                       ) -> tuple[np.ndarray, np.ndarray]:
    """(distinct values sorted ascending, uint32 [m, k] signatures) of one feature's column.

    Args:
        ids: int64 [N] the column's values (missing entries already dropped).
        rows: int64 [N] the global row number of each entry (its training row).
        k: signatures per value.
    """
    ids = np.asarray(ids, dtype=np.int64)
    values, inverse = np.unique(ids, return_inverse=True)
    hashes = row_hashes(rows, k)
    out = np.full((values.shape[0], k), _EMPTY, dtype=np.uint32)
    for j in range(k):
        np.minimum.at(out[:, j], inverse, hashes[:, j])
    return values, out


def merge_signatures(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]
                     ) -> tuple[np.ndarray, np.ndarray]:
    """The signatures of two parts of the data together (element-wise minimum per value)."""
    values = np.concatenate([a[0], b[0]])
    sigs = np.concatenate([a[1], b[1]])
    merged, inverse = np.unique(values, return_inverse=True)
    out = np.full((merged.shape[0], sigs.shape[1]), _EMPTY, dtype=np.uint32)
    for j in range(sigs.shape[1]):
        np.minimum.at(out[:, j], inverse, sigs[:, j])
    return merged, out


def align(values: np.ndarray, signed: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """int32 bit patterns [len(values), K] of `values` (statistics' order); a value without
    a signature raises (every counted value was signed in the same pass)."""
    known, sigs = signed
    pos = np.searchsorted(known, values).clip(max=max(0, len(known) - 1))
    if len(values) and (len(known) == 0 or not np.array_equal(known[pos], values)):
        raise ValueError("a value of the statistics has no signature")
    return sigs[pos].view(np.int32)


def context_hashes(columns: list[np.ndarray], present: list[np.ndarray], k: int
                   ) -> np.ndarray:
    """uint32 [F, rows, k]: for feature f, the K minhashes of each row's other features'
    values ((feature, value) pairs hashed; missing ones left out), so that a value's
    signature over its rows is the minhash of the set of values it co-occurs with."""
    f_count, n = len(columns), len(columns[0]) if columns else 0
    h = np.full((f_count, n, k), _EMPTY, dtype=np.uint32)
    for g, (ids, ok) in enumerate(zip(columns, present, strict=True)):
        for j in range(k):
            bits = hash64_bits(ids, CONTEXT_SEED + j * 64 + g) >> np.uint64(32)
            h[g, :, j] = np.where(ok, bits.astype(np.uint32), _EMPTY)
    # Minimum over every feature but f: prefix minimum before f, suffix minimum after.
    before = np.minimum.accumulate(h, axis=0)
    after = np.minimum.accumulate(h[::-1], axis=0)[::-1]
    out = np.full_like(h, _EMPTY)
    out[1:] = before[:-1]
    np.minimum(out[:-1], after[1:], out=out[:-1])
    return out


def sign_dataset(root: str | Path, k: int = DEFAULT_K, min_count: int = DEFAULT_MIN_COUNT,
                 max_values: int = DEFAULT_MAX_VALUES, split: str = "train") -> Path:
    """Sign every categorical feature of `split` under `root` and write `signatures.npz`
    beside its statistics (`data_pipeline.stats`, which must exist); returns its path.

    Two sets per value, both minhashed in the one pass: its rows (each row's number is its
    position in the split, pieces in order, the same on every run), and its contexts (the
    values of the other features in those rows, `context_hashes`). Bounded: only values
    counted at least `min_count` times, at most `max_values` per feature (the most
    frequent; in sketch mode the statistics' heavy hitters), each with `k` signatures of
    each kind, so memory is 8·k + 8 bytes per signed value whatever the data.
    """
    from data_pipeline import datasets
    from data_pipeline.stats import load_feature_stats

    stats = load_feature_stats(root)
    names = list(stats.features)
    signed: dict[str, np.ndarray] = {}
    contexts: dict[str, np.ndarray] = {}
    order: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name in names:
        values, counts = stats.counts(name)
        m = min(max_values, int(np.searchsorted(-counts, -min_count, side="right")))
        keep = values[:m]
        sort = np.argsort(keep, kind="stable")
        order[name] = (keep[sort], sort)
        signed[name] = np.full((m, k), _EMPTY, dtype=np.uint32)
        contexts[name] = np.full((m, k), _EMPTY, dtype=np.uint32)
    first_row = 0
    for piece in datasets.split_pieces(root, split):
        table = datasets.read_piece(piece, columns=names)
        hashes = row_hashes(np.arange(first_row, first_row + table.num_rows), k)
        first_row += table.num_rows
        present = [table.column(n).is_valid().to_numpy(zero_copy_only=False) for n in names]
        columns = [table.column(n).fill_null(0).to_numpy(zero_copy_only=False)
                   .astype(np.int64) for n in names]
        context = context_hashes(columns, present, k)
        for f, name in enumerate(names):
            sorted_values, sort = order[name]
            if not len(sorted_values):
                continue
            ids = columns[f]
            pos = np.searchsorted(sorted_values, ids).clip(max=len(sorted_values) - 1)
            hit = present[f] & (sorted_values[pos] == ids)
            where, rows, ctx = sort[pos[hit]], hashes[hit], context[f][hit]
            for j in range(k):
                np.minimum.at(signed[name][:, j], where, rows[:, j])
                np.minimum.at(contexts[name][:, j], where, ctx[:, j])
    return write_signatures(stats.directory, {
        name: (stats.counts(name)[0][: len(signed[name])], signed[name], contexts[name])
        for name in names})


def sign_dataset_once(root: str | Path) -> Path | None:
    """`sign_dataset` unless the statistics already have signatures (of both kinds)."""
    from data_pipeline.stats import load_feature_stats

    stats = load_feature_stats(root)
    if not stats.features:
        return None
    first = stats.features[0]
    if all(read_signatures(stats.directory, first, sets) is not None for sets in SETS):
        return Path(stats.directory) / SIGNATURES_FILE
    print("[scma] signing the training rows' values (minhash signatures of rows and "
          "contexts)", flush=True)
    return sign_dataset(root)


def write_signatures(directory: str | Path,
                     per_feature: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]) -> Path:
    """Write `signatures.npz` into a statistics folder: per feature (values, row-set
    signatures, context signatures), signatures as int32 bit patterns [m, K]."""
    path = Path(directory) / SIGNATURES_FILE
    arrays = {}
    for name, (values, sigs, ctx) in per_feature.items():
        arrays[f"{name}.values"] = np.asarray(values, np.int64)
        arrays[f"{name}.rows"] = np.asarray(sigs).view(np.int32)
        arrays[f"{name}.contexts"] = np.asarray(ctx).view(np.int32)
    # Per process: trials that start together may each sign; the last replace wins, and
    # every writer writes the same arrays.
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)
    return path


def read_signatures(directory: str | Path, feature: str, sets: str = "rows"
                    ) -> tuple[np.ndarray, np.ndarray] | None:
    """(values, int32 [m, K] signatures of their `sets`: "rows" or "contexts") of one
    feature, or None where none were written."""
    if sets not in SETS:
        raise ValueError(f"sets must be one of {SETS}, got {sets!r}")
    path = Path(directory) / SIGNATURES_FILE
    if not path.is_file():
        return None
    with np.load(path) as data:
        if f"{feature}.values" not in data or f"{feature}.{sets}" not in data:
            return None
        return data[f"{feature}.values"], data[f"{feature}.{sets}"]
