"""The Criteo record layout shared by the reader, the generator, training and serving.

One place for column names, Arrow types and the reference cardinalities, so that every
room agrees on what a row is.
"""

from __future__ import annotations

import pyarrow as pa

SCHEMA_VERSION = 1
NUM_DENSE = 13
NUM_SPARSE = 26
LABEL = "label"
DENSE_COLUMNS: tuple[str, ...] = tuple(f"I{i}" for i in range(1, NUM_DENSE + 1))
SPARSE_COLUMNS: tuple[str, ...] = tuple(f"C{i}" for i in range(1, NUM_SPARSE + 1))
FEATURE_COLUMNS: tuple[str, ...] = DENSE_COLUMNS + SPARSE_COLUMNS

# Raw id that a missing categorical takes after the transform. Hex values are 0..2^32-1,
# so -1 never collides with a real value.
MISSING_ID = -1

# Criteo Terabyte per-feature cardinalities under the MLPerf 40M cap (DESIGN.md).
TERABYTE_CARDINALITIES: tuple[int, ...] = (
    39884406, 39043, 17289, 7420, 20263, 3, 7120, 1543, 63, 38532951, 2953546, 403346, 10,
    2208, 11938, 155, 4, 976, 14, 39979771, 25641295, 39664984, 585935, 12972, 108, 36,
)


def arrow_schema(labelled: bool = True) -> pa.Schema:
    """The Parquet shard schema: label int8, I1..I13 int32, C1..C26 int64 (nullable)."""
    fields = [pa.field(LABEL, pa.int8(), nullable=False)] if labelled else []
    fields += [pa.field(c, pa.int32()) for c in DENSE_COLUMNS]
    fields += [pa.field(c, pa.int64()) for c in SPARSE_COLUMNS]
    return pa.schema(fields, metadata={b"embpress_schema_version": str(SCHEMA_VERSION).encode()})
