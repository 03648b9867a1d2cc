"""The row generator: rows [start, stop) of a day from the teacher, as arrays and as an Arrow
table in the shard schema, and the calibration that fits the teacher's logit on such rows.

Everything is a pure function of (config, day, row), so the bytes do not depend on how rows
are cut into parts or which process makes them.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np
import pyarrow as pa

from data_pipeline.schema import NUM_DENSE, NUM_SPARSE, arrow_schema
from data_pipeline.synthetic.config import SynthConfig, scaled_cardinalities
from data_pipeline.synthetic.kernels import HIST_BINS, Rows, Teacher, fill_rows
from data_pipeline.synthetic.teacher import (
    CALIBRATION_KEY,
    DAY_KEY,
    Calibration,
    TeacherModel,
    base_model,
    key,
)

CALIBRATION_ROWS = 200_000


def _new_rows(n: int) -> Rows:
    return Rows(
        label=np.empty(n, np.int8), dense=np.empty((NUM_DENSE, n), np.int32),
        dense_ok=np.empty((NUM_DENSE, n), np.bool_), cat=np.empty((NUM_SPARSE, n), np.int64),
        cat_ok=np.empty((NUM_SPARSE, n), np.bool_), lin=np.empty(n, np.float32),
        pair=np.empty(n, np.float32), hist=np.zeros((3, 2, HIST_BINS), np.int64),
    )


_SCRATCH: list[Rows] = []  # one set of buffers, as large as the largest part yet


def _prefix(a: np.ndarray, n: int) -> np.ndarray:
    # The first n rows of a per-row buffer, C-contiguous: a 2-D [columns, capacity] buffer
    # becomes [columns, n] over the start of the same memory.
    return a.reshape(-1)[: a.shape[0] * n].reshape(a.shape[0], n) if a.ndim == 2 else a[:n]


def _scratch_rows(n: int) -> Rows:
    # Fresh pages cost a fault each on first touch (~300 bytes a row here, a large share of
    # the work); a writer that drops each table before the next part reuses one set, and a
    # shorter part (a day's last) takes a prefix of it rather than fresh pages.
    if not _SCRATCH or _SCRATCH[0].label.shape[0] < n:
        _SCRATCH[:] = [_new_rows(n)]
    buf = _SCRATCH[0]
    buf.hist[:] = 0
    return buf._replace(**{name: _prefix(getattr(buf, name), n) for name in Rows._fields
                           if name != "hist"})


def fill(model: TeacherModel, cal: Calibration, day_key: np.uint64, shift: np.ndarray,
         row0: int, n: int, val_start: int, test_start: int, reuse: bool = False) -> Rows:
    """Rows [row0, row0 + n) of the day keyed `day_key` whose ranking is moved by `shift`.

    reuse=True: the arrays are valid only until the next reusing call in this process."""
    rows = _scratch_rows(n) if reuse else _new_rows(n)
    teacher = Teacher(float(cal.a_lin), float(cal.a_pair), float(cal.bias), np.int64(val_start),
                      np.int64(test_start))
    fill_rows(day_key, np.int64(row0), model.popularity._replace(shift=shift),
              model.day_latents(shift), model.dense_law(cal), teacher, rows)
    return rows


def _sigmoid_mean(z: np.ndarray, b: float) -> float:
    return float(np.mean(1.0 / (1.0 + np.exp(-(z + b)))))


@functools.lru_cache(maxsize=4)
def calibrate(teacher: tuple) -> Calibration:
    """Fit the teacher of `SynthConfig.teacher_fields()`: `logit_std` and `pair_share` set the
    scales of the two logit terms, then a bisection the bias that gives `positive_rate`."""
    model = base_model(teacher)
    _, seed, rate, _, logit_std, pair_share = teacher
    k = key(seed, CALIBRATION_KEY)
    no_shift = np.zeros(NUM_SPARSE, np.int64)
    n = CALIBRATION_ROWS
    # Pass 1 centres the dense features, so that their product with the latents is a true
    # interaction rather than a disguised first-order term a linear model could learn.
    r = fill(model, Calibration(0, 0, 0, (0.0,) * NUM_DENSE), k, no_shift, 0, n, n, n)
    t = np.where(r.dense_ok & (r.dense > 0), np.log1p(np.maximum(r.dense, 0)), 0.0)
    center = tuple(float(c) for c in t.mean(axis=1))
    r = fill(model, Calibration(0, 0, 0, center), k, no_shift, 0, n, n, n)
    lin_share = math.sqrt(max(0.0, 1.0 - pair_share**2))
    a_lin = lin_share * logit_std / max(float(r.lin.std(dtype=np.float64)), 1e-12)
    a_pair = pair_share * logit_std / max(float(r.pair.std(dtype=np.float64)), 1e-12)
    z = a_lin * r.lin.astype(np.float64) + a_pair * r.pair.astype(np.float64)
    lo, hi = -30.0, 30.0
    for _ in range(100):  # bisection: mean sigmoid is increasing in the bias
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if _sigmoid_mean(z, mid) < rate else (lo, mid)
    return Calibration(a_lin=a_lin, a_pair=a_pair, bias=0.5 * (lo + hi), dense_center=center)


def _day_shift(config: SynthConfig, day: int) -> np.ndarray:
    card = np.array(scaled_cardinalities(config.scale), dtype=np.int64)
    return np.round(config.drift * day * card).astype(np.int64) % card


def split_boundaries(day_rows: Sequence[int], day: int) -> tuple[int, int]:
    """(validation start, test start) as row positions within `day`; both = rows for a
    training day. Follows datasets.split_row_ranges, the one place the split rule lives."""
    from data_pipeline.datasets import split_row_ranges

    ranges = split_row_ranges(dict(enumerate(day_rows)))
    val = [(s, e) for d, s, e in ranges["validation"] if d == day]
    test = [(s, e) for d, s, e in ranges["test"] if d == day]
    n = day_rows[day]
    return (val[0][0] if val else n, test[0][0] if test else n)


def generate_rows(config: SynthConfig, day: int, start: int, stop: int) -> pa.Table:
    """Rows [start, stop) of `day` as an Arrow table with the shard schema (no I/O)."""
    table, _ = generate_part(config, day, start, stop)
    return table


def teacher_logits(config: SynthConfig, day: int, start: int,
                   stop: int) -> tuple[np.ndarray, pa.Table]:
    """The teacher's logits (float64) of rows [start, stop) of `day`, with the rows: the
    ceiling model's scores, e.g. for its AUC on a subset of rows (rare ids, one split)."""
    table, r = generate_part(config, day, start, stop)
    cal = calibrate(config.teacher_fields())
    logits = cal.bias + cal.a_lin * r.lin.astype(np.float64) + cal.a_pair * r.pair.astype(
        np.float64)
    return logits, table


def generate_part(config: SynthConfig, day: int, start: int, stop: int, reuse: bool = False,
                  cal: Calibration | None = None) -> tuple[pa.Table, Rows]:
    """Rows [start, stop) of `day` as a table and as the arrays it is made of.

    reuse=True: the arrays (and the zero-copy table over them) are valid only until the
    next reusing call in this process. `cal`: the calibration, when the caller has it."""
    teacher = config.teacher_fields()
    model, cal = base_model(teacher), cal or calibrate(teacher)
    val_start, test_start = split_boundaries(config.day_rows(), day)
    r = fill(model, cal, key(config.seed, DAY_KEY, day), _day_shift(config, day), start,
             stop - start, val_start, test_start, reuse)
    return _to_arrow(r), r


def _column(values: np.ndarray, ok: np.ndarray, typ: pa.DataType) -> pa.Array:
    n = len(values)
    nulls = n - int(np.count_nonzero(ok))
    bitmap = pa.py_buffer(np.packbits(ok, bitorder="little")) if nulls else None
    return pa.Array.from_buffers(typ, n, [bitmap, pa.py_buffer(values)], null_count=nulls)


def _to_arrow(r: Rows) -> pa.Table:
    cols = [pa.array(r.label, pa.int8())]
    cols += [_column(r.dense[j], r.dense_ok[j], pa.int32()) for j in range(NUM_DENSE)]
    cols += [_column(r.cat[f], r.cat_ok[f], pa.int64()) for f in range(NUM_SPARSE)]
    return pa.Table.from_arrays(cols, schema=arrow_schema())
