"""Writing a synthetic dataset: Parquet parts (or Criteo TSV days) as Ray tasks, and the
manifest with the teacher's AUC and log-loss per split."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numba import njit

from data_pipeline import shards
from data_pipeline.schema import DENSE_COLUMNS, LABEL, SCHEMA_VERSION, SPARSE_COLUMNS
from data_pipeline.synthetic.config import (
    PARQUET_FORMAT,
    SYNTHETIC_JSON,
    TSV_FORMAT,
    SynthConfig,
    scaled_cardinalities,
)
from data_pipeline.synthetic.kernels import (
    HIST_BINS,
    HIST_HI,
    HIST_LO,
    RARITY_KNEE,
    RARITY_POWER,
    Rows,
)
from data_pipeline.synthetic.rows import calibrate, generate_part
from data_pipeline.synthetic.teacher import Calibration

_SPLITS = ("train", "validation", "test")


@dataclass
class PartResult:
    """What one generated part (or TSV day) reports back to the driver.

    Args:
        day, part: where it belongs (a TSV day is part 0).
        rows, positives: its row and label-1 counts.
        hist: [split, label, bin] counts of its teacher logits.
        path, sha256: the file written, relative to the output folder, and its checksum.
    """

    day: int
    part: int
    rows: int
    positives: int
    hist: np.ndarray
    path: str | None = None
    sha256: str | None = None


def parts(config: SynthConfig) -> list[tuple[int, int, int, int]]:
    """(day, part, start, stop) for every part file."""
    out = []
    for day, n in enumerate(config.day_rows()):
        for part, start in enumerate(range(0, n, config.part_rows)):
            out.append((day, part, start, min(n, start + config.part_rows)))
    return out


def write_part(config: SynthConfig, out: str, day: int, part: int, start: int,
               stop: int, cal: Calibration | None = None) -> PartResult:
    """Generate one part and write it as `day=N/part-XXXXX.parquet` (atomically)."""
    table, r = generate_part(config, day, start, stop, reuse=True, cal=cal)
    path = shards.shard_path(Path(out), day, part)
    shards.write_table_atomic(table, path)
    return PartResult(day, part, stop - start, int(r.label.sum()), r.hist.copy(),
                      str(path.relative_to(out)), shards.sha256_file(path))


def write_tsv_day(config: SynthConfig, out: str, day: int,
                  cal: Calibration | None = None) -> PartResult:
    """Generate one day as a Criteo text file `day_N` (the Terabyte naming), atomically."""
    path = Path(out) / f"day_{day}"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    result = PartResult(day, 0, 0, 0, np.zeros((3, 2, HIST_BINS), np.int64), path.name)
    with open(tmp, "wb") as f:
        for start, stop in ((s, e) for d, _, s, e in parts(config) if d == day):
            _, r = generate_part(config, day, start, stop, reuse=True, cal=cal)
            f.write(_to_tsv(r))
            result.hist += r.hist
            result.positives += int(r.label.sum())
            result.rows += stop - start
    os.replace(tmp, path)
    result.sha256 = shards.sha256_file(path)
    return result


def _to_tsv(r: Rows) -> bytes:
    return _format_tsv(r.label, r.dense, r.dense_ok, r.cat, r.cat_ok).tobytes()


@njit(inline="always")
def _put_decimal(out, pos, v, digits):
    if v < 0:
        out[pos] = 45  # "-"
        pos += 1
        v = -v
    m = 0
    while True:
        digits[m] = 48 + v % 10
        m += 1
        v //= 10
        if v == 0:
            break
    for q in range(m - 1, -1, -1):
        out[pos] = digits[q]
        pos += 1
    return pos


@njit(inline="always")
def _put_hex8(out, pos, v):
    for q in range(7, -1, -1):
        d = (v >> (4 * q)) & 15
        out[pos] = 48 + d if d < 10 else 87 + d  # lowercase, as Criteo writes them
        pos += 1
    return pos


@njit(cache=True, nogil=True)
def _format_tsv(label, dense, dense_ok, cat, cat_ok):
    n = label.shape[0]
    out = np.empty(n * (2 + dense.shape[0] * 12 + cat.shape[0] * 9), dtype=np.uint8)
    digits = np.empty(12, dtype=np.uint8)
    pos = 0
    for i in range(n):
        out[pos] = 48 + label[i]
        pos += 1
        for j in range(dense.shape[0]):
            out[pos] = 9  # tab; an empty field is missing
            pos += 1
            if dense_ok[j, i]:
                pos = _put_decimal(out, pos, np.int64(dense[j, i]), digits)
        for f in range(cat.shape[0]):
            out[pos] = 9
            pos += 1
            if cat_ok[f, i]:
                pos = _put_hex8(out, pos, cat[f, i])
        out[pos] = 10
        pos += 1
    return out[:pos]


def auc_from_histogram(pos: np.ndarray, neg: np.ndarray) -> float | None:
    """AUC of a score from per-bin positive and negative counts (bins in increasing score;
    ties within a bin count one half). None when a class is absent."""
    pos = np.asarray(pos, dtype=np.float64)
    neg = np.asarray(neg, dtype=np.float64)
    n_pos, n_neg = pos.sum(), neg.sum()
    if n_pos == 0 or n_neg == 0:
        return None
    neg_below = np.cumsum(neg) - neg
    return float((pos * (neg_below + 0.5 * neg)).sum() / (n_pos * n_neg))


def _split_summary(results: Sequence[PartResult]) -> dict[str, dict[str, Any]]:
    hist = sum(r.hist for r in results)
    # Log-loss from the binned logits: bins are 0.002 wide, far below what the figure needs.
    centre = HIST_LO + (np.arange(HIST_BINS) + 0.5) * (HIST_HI - HIST_LO) / HIST_BINS
    loss = (hist[:, 1] * np.logaddexp(0.0, -centre) + hist[:, 0] * np.logaddexp(0.0, centre))
    loss = loss.sum(axis=1)
    out = {}
    for s, name in enumerate(_SPLITS):
        rows = int(hist[s].sum())
        out[name] = {
            "rows": rows,
            "positives": int(hist[s, 1].sum()),
            "teacher_auc": auc_from_histogram(hist[s, 1], hist[s, 0]),
            "teacher_logloss": float(loss[s] / rows) if rows else None,
        }
    return out


def _run_tasks(
    fn: Callable[..., PartResult], calls: list[tuple], use_ray: bool, progress: bool,
) -> list[PartResult]:
    from tqdm import tqdm

    bar = tqdm(total=len(calls), desc="synthetic parts", unit="part", disable=not progress)
    results: list[PartResult] = []
    if use_ray:
        import ray

        remote = ray.remote(num_cpus=1)(fn)
        pending = [remote.remote(*c) for c in calls]
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            results.extend(ray.get(done))
            bar.update(len(done))
    else:
        for c in calls:
            results.append(fn(*c))
            bar.update(1)
    bar.close()
    return sorted(results, key=lambda r: (r.day, r.part))


def generate(
    config: SynthConfig,
    out: str | Path,
    fmt: str = PARQUET_FORMAT,
    *,
    use_ray: bool | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Write a synthetic dataset under `out` and return its manifest.

    Parquet: `day=N/part-XXXXX.parquet` shards and `manifest.json` (written last), the same
    layout as converted real data. TSV: Criteo text files `day_N` (label, I1..I13, C1..C26,
    hex as 8 lowercase digits, empty when missing) and `synthetic.json`, for the converter.
    Parts (Parquet) or days (TSV) run as Ray tasks when Ray is initialised (or `use_ray`).
    """
    if fmt not in (PARQUET_FORMAT, TSV_FORMAT):
        raise ValueError(f"format must be {PARQUET_FORMAT!r} or {TSV_FORMAT!r}, got {fmt!r}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / (shards.MANIFEST if fmt == PARQUET_FORMAT else SYNTHETIC_JSON)
    # A manifest left from an earlier run would vouch for a folder being rewritten.
    manifest_path.unlink(missing_ok=True)
    if use_ray is None:
        import ray

        use_ray = ray.is_initialized()
    t0 = time.perf_counter()
    cal = calibrate(config.teacher_fields())  # once here and sent along, not once per task
    if fmt == PARQUET_FORMAT:
        calls = [(config, str(out), *p, cal) for p in parts(config)]
        results = _run_tasks(write_part, calls, use_ray, progress)
    else:
        calls = [(config, str(out), d, cal) for d in range(config.days)]
        results = _run_tasks(write_tsv_day, calls, use_ray, progress)
    manifest = _manifest(config, fmt, results, cal, time.perf_counter() - t0)
    shards.write_json_atomic(manifest, manifest_path)
    return manifest


def _manifest(config: SynthConfig, fmt: str, results: Sequence[PartResult], cal: Calibration,
              seconds: float) -> dict[str, Any]:
    days: dict[str, Any] = {}
    for r in results:
        d = days.setdefault(str(r.day), {"rows": 0, "positives": 0, "files": []})
        d["rows"] += r.rows
        d["positives"] += r.positives
        d["files"].append({"path": r.path, "rows": r.rows, "sha256": r.sha256})
    splits = _split_summary(results)
    rows = sum(r.rows for r in results)
    positives = sum(r.positives for r in results)
    return {
        "schema_version": SCHEMA_VERSION,
        "source": "synthetic",
        "format": fmt,
        "labelled": True,
        "columns": [LABEL, *DENSE_COLUMNS, *SPARSE_COLUMNS],
        "rows": rows,
        "positives": positives,
        "rejects": 0,
        "days": days,
        "splits": splits,
        "synthetic": {
            "params": asdict(config),
            "cardinalities": dict(zip(SPARSE_COLUMNS, scaled_cardinalities(config.scale),
                                      strict=True)),
            "teacher_auc": {k: v["teacher_auc"] for k, v in splits.items()},
            "teacher_logloss": {k: v["teacher_logloss"] for k, v in splits.items()},
            "calibration": asdict(cal),
            "rarity": {"knee": RARITY_KNEE, "power": RARITY_POWER},
            "positive_rate": positives / rows,
            "seconds": round(seconds, 3),
        },
    }
