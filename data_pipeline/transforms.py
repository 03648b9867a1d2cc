"""The one feature transform shared by training, evaluation and serving.

A model must see the same numbers online as offline, so every path that turns raw
Criteo values into model inputs goes through these functions.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from data_pipeline.schema import DENSE_COLUMNS, LABEL, MISSING_ID, SPARSE_COLUMNS


def transform_dense(raw: np.ndarray) -> np.ndarray:
    """Missing (NaN) → 0, negative → 0, then log1p. Accepts any numeric array; float32 out."""
    x = np.asarray(raw, dtype=np.float32)
    x = np.where(np.isnan(x), np.float32(0), x)
    return np.log1p(np.maximum(x, np.float32(0)))


def transform_sparse(raw: np.ndarray) -> np.ndarray:
    """Categorical values as int64, unchanged: each method maps raw ids itself, and the
    readers have already put MISSING_ID where a value is missing (null in a shard, empty in
    a request)."""
    return np.asarray(raw, dtype=np.int64)


def _column(table: pa.Table | pa.RecordBatch, name: str, fill: float | int, dtype) -> np.ndarray:
    col = table.column(name)
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    if col.null_count:
        col = col.cast(pa.from_numpy_dtype(np.dtype(dtype))).fill_null(fill)
    return col.to_numpy(zero_copy_only=False).astype(dtype, copy=False)


def transform_table(table: pa.Table | pa.RecordBatch) -> dict[str, np.ndarray]:
    """Arrow rows (shard schema) → {"dense": f32[n,13], "sparse": i64[n,26], "label": f32[n]}.

    "label" is present only when the table has a label column.
    """
    n = table.num_rows
    dense = np.empty((n, len(DENSE_COLUMNS)), dtype=np.float32)
    for j, name in enumerate(DENSE_COLUMNS):
        dense[:, j] = _column(table, name, np.nan, np.float32)
    sparse = np.empty((n, len(SPARSE_COLUMNS)), dtype=np.int64)
    for j, name in enumerate(SPARSE_COLUMNS):
        sparse[:, j] = _column(table, name, MISSING_ID, np.int64)
    out = {"dense": transform_dense(dense), "sparse": transform_sparse(sparse)}
    if LABEL in table.schema.names:
        out["label"] = _column(table, LABEL, 0, np.float32)
    return out
