"""Validated request rows → model inputs, through the one transform training used.

Online must equal offline, so after the rows become raw arrays (integers as float64 with
NaN for missing, categoricals as int64 hash values with `MISSING_ID` for missing — what the
TSV reader and the Parquet shards hold) they go through `data_pipeline.transforms`, never
a copy of it. Hex decoding is done for the whole batch at once with numpy.
"""

from __future__ import annotations

from itertools import chain
from typing import Any

import numpy as np

from data_pipeline.schema import DENSE_COLUMNS, MISSING_ID, NUM_SPARSE, SPARSE_COLUMNS
from data_pipeline.transforms import transform_dense, transform_sparse

# ASCII byte → hex digit value; the schema has already refused anything else, and numpy's
# fixed-width bytes pad short values with NUL, which must read as "no digit" (0).
_NIBBLE = np.zeros(256, dtype=np.int64)
for _i, _c in enumerate(b"0123456789abcdef"):
    _NIBBLE[_c] = _i
for _i, _c in enumerate(b"ABCDEF"):
    _NIBBLE[_c] = 10 + _i
_SHIFTS = np.arange(28, -1, -4, dtype=np.int64)


def decode_hex(values: list[str | None]) -> np.ndarray:
    """int64 values of validated 0–8 digit hex strings; None or "" → MISSING_ID."""
    if not values:
        return np.empty(0, dtype=np.int64)
    raw = np.array([v or "" for v in values], dtype="S8").view(np.uint8).reshape(-1, 8)
    digits = (raw != 0).sum(axis=1)
    # Left-aligned digits: shift the 8-digit reading right by the digits that are absent.
    packed = (_NIBBLE[raw] << _SHIFTS).sum(axis=1) >> (4 * (8 - digits))
    return np.where(digits == 0, MISSING_ID, packed)


def raw_arrays(rows: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    """Rows of either shape → (dense float64 [n, 13] NaN-missing, sparse int64 [n, 26])."""
    if all("dense" in r for r in rows):
        dense_lists = [r["dense"] for r in rows]
        cat_lists = [r["categorical"] for r in rows]
    else:
        dense_lists, cat_lists = [], []
        for r in rows:
            if "dense" in r:
                dense_lists.append(r["dense"])
                cat_lists.append(r["categorical"])
            else:
                get = r.get
                dense_lists.append([get(c) for c in DENSE_COLUMNS])
                cat_lists.append([get(c) for c in SPARSE_COLUMNS])
    # float64 holds every int32 exactly and numpy turns None into NaN on the way in.
    dense = np.array(dense_lists, dtype=np.float64).reshape(len(rows), len(DENSE_COLUMNS))
    sparse = decode_hex(list(chain.from_iterable(cat_lists))).reshape(len(rows), NUM_SPARSE)
    return dense, sparse


def model_inputs(rows: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    """(dense float32 [n, 13] transformed, sparse int64 [n, 26]) exactly as training saw."""
    dense, sparse = raw_arrays(rows)
    return transform_dense(dense), transform_sparse(sparse)
