"""The one place where bytes, compression ratios and table sizes are converted.

Every method sizes its tables through these functions (the CAFE artifact scatters memory
formulas through constructors; here they are written once and tested once). A compression
ratio is the bytes of an uncompressed fp32 n×d table divided by the bytes of the method's
fp32 serving tables; mapper state (vocabularies, hot-id maps) is counted in the byte totals
that `CompressedEmbedding.training_bytes`/`serving_bytes` report, not in the ratio.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from enum import Enum

# Bytes of one stored element, and of the per-row extras each format carries.
_ELEMENT_BITS = {"fp32": 32, "fp16": 16, "int8": 8, "int4": 4}
_ROW_EXTRA_BYTES = {"fp32": 0, "fp16": 0, "int8": 8, "int4": 8}  # fp32 scale + fp32 bias
SERVING_FORMATS: tuple[str, ...] = tuple(_ELEMENT_BITS)


class ExportQuantize(str, Enum):
    """How an export stores its serving tables: the one list the configs, the export job and
    the search share. "none" keeps fp32 (the name the configs have always used)."""

    NONE = "none"
    FP16 = "fp16"
    INT8 = "int8"
    INT4 = "int4"

    @property
    def serving_format(self) -> str:
        """The serving-table format it writes ("none" → "fp32")."""
        return "fp32" if self is ExportQuantize.NONE else self.value


EXPORT_QUANTIZE: tuple[str, ...] = tuple(q.value for q in ExportQuantize)

class BudgetUnreachable(ValueError):
    """A ratio or budget beyond a method's reach (QR's floor of 2·sqrt(n) rows a feature,
    MEC's smallest codebooks): `smallest_bytes` is its smallest form's, `largest_ratio` the
    most it compresses."""

    def __init__(self, message: str, smallest_bytes: int, largest_ratio: float) -> None:
        super().__init__(message)
        self.smallest_bytes = smallest_bytes
        self.largest_ratio = largest_ratio


# Bytes of one promoted row's id in a mixed-precision table (int32, sorted for searchsorted).
MIXED_ID_BYTES = 4

# Features with at most this many values ÷ ratio stay uncompressed under a global ratio
# (the CAFE artifact's threshold: 1,000 values at 2×, 2 at 1000×).
UNCOMPRESSED_NUMERATOR = 2000.0

# The CAFE artifact charges its sketch as 48 bytes per hot row (12 int32 slots).
CAFE_SKETCH_BYTES_PER_HOT_ROW = 48


def row_bytes(width: int, fmt: str = "fp32") -> int:
    """Bytes of one stored row of `width` elements in `fmt` (int4 packs two per byte)."""
    if fmt not in _ELEMENT_BITS:
        raise ValueError(f"unknown serving format {fmt!r}; known: {list(SERVING_FORMATS)}")
    return math.ceil(width * _ELEMENT_BITS[fmt] / 8) + _ROW_EXTRA_BYTES[fmt]


def table_bytes(rows: int, width: int, fmt: str = "fp32") -> int:
    """Bytes of a rows×width table in `fmt`, scale and bias included."""
    return rows * row_bytes(width, fmt)


def uncompressed_bytes(num_embeddings: int, dim: int) -> int:
    """Bytes of the plain fp32 table the ratio is measured against."""
    return table_bytes(num_embeddings, dim, "fp32")


def stays_uncompressed(num_embeddings: int, ratio: float) -> bool:
    """Whether a global `ratio` leaves this feature uncompressed (n ≤ 2000 / ratio)."""
    return num_embeddings <= UNCOMPRESSED_NUMERATOR / ratio


def rows_at_ratio(num_embeddings: int, ratio: float, width_fraction: float = 1.0) -> float:
    """Total table rows a method may hold at `ratio` when its serving rows are
    `width_fraction` × d wide (0.5 for two concatenated halves)."""
    if ratio <= 0:
        raise ValueError(f"compression ratio must be positive, got {ratio}")
    return num_embeddings / (ratio * width_fraction)


def hash_rows(num_embeddings: int, ratio: float) -> int:
    """Hashing trick: ceil(n / ratio) rows, at least one."""
    return max(1, math.ceil(rows_at_ratio(num_embeddings, ratio) - 1e-9))


def full_rows(num_embeddings: int, cap: int, ratio: float | None = None) -> int:
    """Uncompressed: one row per value up to `cap` (and up to n / ratio when a ratio is set)."""
    rows = min(num_embeddings, cap)
    if ratio is not None:
        rows = min(rows, hash_rows(num_embeddings, ratio))
    return max(1, rows)


def qr_collisions(num_embeddings: int, row_budget: float) -> int:
    """QR's remainder size c so that ceil(n/c) + c ≤ row_budget, with the fewest collisions.

    c + n/c = R has the smaller root c = (R - sqrt(R² - 4n)) / 2 (the CAFE artifact's
    formula, applied per feature). R < 2·sqrt(n) cannot be reached: the most compressed QR,
    c = ceil(sqrt(n)), is returned and callers see its true size in the byte counts.
    """
    n = num_embeddings
    disc = row_budget * row_budget - 4 * n
    if disc < 0:
        return max(1, math.isqrt(n - 1) + 1 if n > 1 else 1)
    c = max(1, math.ceil((row_budget - math.sqrt(disc)) / 2 - 1e-9))
    # Rounding c up only lowers ceil(n/c) + c while c ≤ sqrt(n); one more step if the
    # ceiling of n/c still overshoots.
    while c < n and math.ceil(n / c) + c > row_budget and c * c < n:
        c += 1
    return max(1, min(c, n))


def qr_rows(num_embeddings: int, collisions: int) -> list[int]:
    """Rows of QR's quotient and remainder tables."""
    return [max(1, math.ceil(num_embeddings / collisions)), collisions]


def cafe_rows(
    num_embeddings: int, ratio: float, hash_share: float, dim: int
) -> tuple[int, int]:
    """CAFE's (hot rows, rows of each hash table), as in the artifact.

    hot = n / ratio × (1 − hash share) × 4d / (4d + 48): the sketch's 48 bytes per hot row
    are paid out of the hot table; each hash table has ceil(n / ratio × hash share) rows.
    """
    per = num_embeddings / ratio
    hot = int(per * (1 - hash_share) * (4 * dim) / (4 * dim + CAFE_SKETCH_BYTES_PER_HOT_ROW))
    return max(0, hot), max(1, math.ceil(per * hash_share - 1e-9))


def scma_sizes(
    num_embeddings: int, dim: int, ratio: float, chunk: int, entry_bytes: int,
    candidates: int, sketch_share: float,
) -> tuple[int, int]:
    """SCMA's (rows of its chunk-wide shared array, values that keep signatures) at `ratio`.

    The budget is n·d·4 / ratio bytes: the signature sketch (`entry_bytes` per signed value)
    takes at most `sketch_share` of it, for at most `candidates` values; the shared array
    gets the rest, rounded to whole `chunk`-wide rows (at least one).
    """
    total = uncompressed_bytes(num_embeddings, dim) / ratio
    signed = min(candidates, int(total * sketch_share / entry_bytes)) if entry_bytes else 0
    rows = round((total - signed * entry_bytes) / row_bytes(chunk))
    return max(1, rows), max(0, signed)


def ratio_for_budget(
    bytes_at: Callable[[float], int],
    budget_bytes: int,
    lo: float = 1.0,
    hi: float = 1e7,
    iterations: int = 60,
    tolerance: float = 0.0,
) -> float:
    """The smallest compression ratio whose byte count fits `budget_bytes`.

    `bytes_at(ratio)` must not increase with the ratio. Bisection on log(ratio); the answer
    always fits (the upper end of the last bracket). With `tolerance`, it stops at the first
    ratio whose bytes fit within that fraction below the budget (each probe builds every
    method on the meta device: the exact minimum is rarely worth 60 of them). Raises when
    even `hi` does not fit.
    """
    if bytes_at(lo) <= budget_bytes:
        return lo
    if bytes_at(hi) > budget_bytes:
        raise ValueError(
            f"budget of {budget_bytes} bytes cannot be met: even ratio {hi:g} needs "
            f"{bytes_at(hi)} bytes"
        )
    a, b = math.log(lo), math.log(hi)
    for _ in range(iterations):
        mid = (a + b) / 2
        got = bytes_at(math.exp(mid))
        if got <= budget_bytes:
            b = mid
            if got >= (1 - tolerance) * budget_bytes and tolerance > 0:
                break
        else:
            a = mid
    return math.exp(b)


def format_bytes(n: float, spec: str = ".2f") -> str:
    """Bytes in binary units for plans and logs: whole bytes below 1 KiB, else the value in
    the largest unit under 1024 formatted by `spec` (".2f": 1.50 GiB; ".3g": 1.5 GiB).

    Args:
        n: a byte count.
        spec: format spec of the value in KiB and above.
    """
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} B" if unit == "B" else f"{value:{spec}} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def code_bits(codebook_size: int) -> int:
    """Bits of one product-quantisation code into a `codebook_size`-entry codebook."""
    return max(1, math.ceil(math.log2(codebook_size)))


def mec_bytes(rows: int, codebooks: int, codebook_size: int, served_columns: int) -> int:
    """MEC's fp32 serving bytes: packed codes (`codebooks` codes a row, no padding between
    them) plus the code tables, `served_columns` wide together as served."""
    per_row = math.ceil(codebooks * code_bits(codebook_size) / 8)
    return rows * per_row + table_bytes(codebook_size, served_columns)


def mec_codebook_size(
    num_embeddings: int,
    rows: int,
    dim: int,
    codebooks: int,
    served_columns: int,
    max_size: int,
    rows_per_code: int,
    ratio: float | None = None,
) -> int:
    """Entries of each MEC codebook: the largest power of two ≤ `max_size` and ≤ rows /
    `rows_per_code` (the paper's 4,096 codes serve ≥ 100,000 values: ~25 rows a code) whose
    codes and tables fit an n×d table's bytes ÷ `ratio`. A ratio no codebook reaches is
    refused with the largest ratio MEC reaches there.

    Args:
        num_embeddings: the feature's values n (the ratio is measured against n×d).
        rows: rows of the trained table whose rows get codes.
        dim: the feature's width d.
        codebooks: codes per row.
        served_columns: served width of all code tables together.
        max_size: most entries a codebook may have.
        rows_per_code: fewest trained rows per codebook entry.
        ratio: compression ratio to meet, or None.
    """
    size = 2 ** math.floor(math.log2(max(2, min(max_size, rows // rows_per_code))))
    if ratio is None:
        return size
    allowed = uncompressed_bytes(num_embeddings, dim) / ratio
    while size > 2 and mec_bytes(rows, codebooks, size, served_columns) > allowed:
        size //= 2
    smallest = mec_bytes(rows, codebooks, size, served_columns)
    if smallest > allowed:
        best = uncompressed_bytes(num_embeddings, dim) / smallest
        raise BudgetUnreachable(
            f"mec cannot reach ratio {ratio:g} for n={num_embeddings}, d={dim} "
            f"({rows} coded rows, {codebooks} codebooks): its largest ratio is {best:.3g}",
            smallest_bytes=smallest, largest_ratio=best,
        )
    return size
