"""The one budget module: bytes per format, rows per ratio, QR's remainder size, CAFE's
artifact formula, the uncompressed threshold, the byte-budget solver and byte formatting."""

from __future__ import annotations

import math

import pytest

from embeddings import budget


def test_row_bytes_per_format() -> None:
    assert [budget.row_bytes(16, f) for f in ("fp32", "fp16", "int8", "int4")] == [64, 32, 24, 16]
    assert budget.row_bytes(13, "int4") == 7 + 8  # two per byte, rounded up
    assert budget.table_bytes(10, 16, "int8") == 240
    with pytest.raises(ValueError, match="unknown serving format"):
        budget.row_bytes(16, "int2")


def test_uncompressed_threshold_is_2000_over_the_ratio() -> None:
    assert budget.stays_uncompressed(1000, 2) and not budget.stays_uncompressed(1001, 2)
    assert budget.stays_uncompressed(2, 1000) and not budget.stays_uncompressed(3, 1000)


def test_hash_and_full_rows() -> None:
    assert budget.hash_rows(1000, 7) == math.ceil(1000 / 7)
    assert budget.hash_rows(1000, 10) == 100  # exact division does not round up
    assert budget.hash_rows(3, 1000) == 1
    assert budget.full_rows(39_884_406, 40_000_000) == 39_884_406
    assert budget.full_rows(50_000_000, 40_000_000) == 40_000_000
    assert budget.full_rows(1000, 40_000_000, ratio=4) == 250


@pytest.mark.parametrize("n", [1000, 100_000, 39_884_406])
@pytest.mark.parametrize("ratio", [2, 10, 100])
def test_qr_collisions_fit_the_rows_with_fewest_collisions(n: int, ratio: float) -> None:
    rows = n / ratio
    c = budget.qr_collisions(n, rows)
    q, r = budget.qr_rows(n, c)
    if rows >= 2 * math.sqrt(n) + 2:
        assert q + r <= rows
        # One fewer remainder row would not fit: c is the fewest collisions that does.
        assert c == 1 or math.ceil(n / (c - 1)) + c - 1 > rows
    else:
        assert c == math.ceil(math.sqrt(n))  # beyond QR's reach: the most compressed QR
    assert q * r >= n


def test_cafe_rows_match_the_artifact_formula() -> None:
    # hotn = int(n × rate × (1 − hash_rate) × 4d / (4d + 48)); hash rows ceil(n × rate × share)
    hot, hashed = budget.cafe_rows(1_000_000, 100, 0.3, 16)
    assert hot == int(1_000_000 / 100 * 0.7 * 64 / 112)
    assert hashed == 3000


def test_ratio_for_budget_returns_a_ratio_that_fits() -> None:
    def bytes_at(r: float) -> int:
        return 1000 + math.ceil(1_000_000 / r)

    r = budget.ratio_for_budget(bytes_at, 11_000)
    assert bytes_at(r) <= 11_000 and r == pytest.approx(100, rel=1e-6)
    assert budget.ratio_for_budget(bytes_at, 10**9) == 1.0
    with pytest.raises(ValueError, match="cannot be met"):
        budget.ratio_for_budget(bytes_at, 500)


def test_format_bytes_uses_binary_units() -> None:
    assert [budget.format_bytes(b) for b in (0, 1023, 1024, 3 << 29, 5 << 40)] == [
        "0 B",
        "1023 B",
        "1.00 KiB",
        "1.50 GiB",
        "5.00 TiB",
    ]
    # Plots and reports ask for three significant figures.
    assert budget.format_bytes(1536, ".3g") == "1.5 KiB"
    assert budget.format_bytes(3 * 1024**3, ".3g") == "3 GiB"
