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
_NIBBLE = np.zeros(256, dtype=np.uint8)
for _i, _c in enumerate(b"0123456789abcdef"):
    _NIBBLE[_c] = _i
for _i, _c in enumerate(b"ABCDEF"):
    _NIBBLE[_c] = 10 + _i
_MISSING8 = "--------"  # not hex, so it cannot be mistaken for a value


def _decode_any_width(values: list[str | None]) -> np.ndarray:
    raw = np.array([v or "" for v in values], dtype="S8").view(np.uint8).reshape(-1, 8)
    digits = np.count_nonzero(raw, axis=1)
    nibbles = _NIBBLE[raw]
    # Two nibbles per byte, four bytes per value, read big-endian: the value as if it had
    # 8 digits; shifting out the absent (NUL-padded) digits gives the real one.
    packed = ((nibbles[:, 0::2] << 4) | nibbles[:, 1::2]).copy().view(">u4").ravel()
    decoded = packed.astype(np.int64) >> (4 * (8 - digits))
    return np.where(digits == 0, MISSING_ID, decoded)


def decode_hex(values: list[str | None]) -> np.ndarray:
    """int64 values of validated 0–8 digit hex strings; None or "" → MISSING_ID."""
    if not values:
        return np.empty(0, dtype=np.int64)
    text = "".join([v or _MISSING8 for v in values])
    if len(text) != 8 * len(values):
        return _decode_any_width(values)  # some value has fewer than 8 digits
    # Criteo's values are 8 digits: one C-speed hex decode of the whole batch.
    missing = np.frombuffer(text.encode(), dtype=np.uint8)[::8] == ord("-")
    decoded = np.frombuffer(bytes.fromhex(text.replace(_MISSING8, "00000000")), dtype=">u4")
    return np.where(missing, MISSING_ID, decoded.astype(np.int64))


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
    # float64 holds every int32 exactly, and numpy turns None into NaN on the way in.
    dense = np.fromiter(chain.from_iterable(dense_lists), dtype=np.float64,
                        count=len(rows) * len(DENSE_COLUMNS)).reshape(len(rows), -1)
    sparse = decode_hex(list(chain.from_iterable(cat_lists))).reshape(len(rows), NUM_SPARSE)
    return dense, sparse


def model_inputs(rows: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    """(dense float32 [n, 13] transformed, sparse int64 [n, 26]) exactly as training saw."""
    dense, sparse = raw_arrays(rows)
    return transform_dense(dense), transform_sparse(sparse)
