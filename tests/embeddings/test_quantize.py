"""Row-wise serving formats keep their documented error bounds and exact byte sizes, and
mixed precision spends a byte budget on the rows that are read most."""

from __future__ import annotations

import math

import pytest
import torch

from embeddings.budget import row_bytes, table_bytes
from embeddings.methods.quantize import quantize_mixed
from embeddings.serving_tables import MixedServingTable, ServingTable, table_from_export


def _table(rows: int = 300, width: int = 13, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(rows, width, generator=g) * torch.logspace(-3, 2, rows)[:, None]
    t[0] = 0.7  # a constant row: zero range
    t[1] += 50.0  # far from zero, so the bias matters
    return t


@pytest.mark.parametrize(("fmt", "levels"), [("int8", 255), ("int4", 15)])
def test_int_formats_stay_within_half_a_step_per_row(fmt: str, levels: int) -> None:
    for width in (13, 16):
        t = _table(width=width)
        q = ServingTable.encode(t, fmt)
        err = (q.dequantize() - t).abs().amax(1)
        span = t.amax(1) - t.amin(1)
        bound = span / levels / 2
        slack = 1e-6 * t.abs().amax(1)  # float32 arithmetic of the lookup
        assert bool((err <= bound + slack).all())
        assert err[0].item() == 0.0  # constant rows are exact
        assert bool((q.error_bound() <= bound * (1 + 1e-6) + 1e-30).all())
        assert bool((err <= q.error_bound() + slack).all())


def test_fp16_is_within_its_relative_bound_and_refuses_overflow() -> None:
    t = _table()
    q = ServingTable.encode(t, "fp16")
    err = (q.dequantize() - t).abs()
    assert bool((err <= t.abs() * 2.0**-11 + 2.0**-25).all())
    assert bool((err.amax(1) <= q.error_bound()).all())
    with pytest.raises(ValueError, match="fp16"):
        ServingTable.encode(torch.tensor([[1e6, 0.0]]), "fp16")


@pytest.mark.parametrize("fmt", ["fp32", "fp16", "int8", "int4"])
def test_lookup_matches_dequantised_rows_and_bytes_are_exact(fmt: str) -> None:
    t = _table(width=13)
    q = ServingTable.encode(t, fmt)
    rows = torch.tensor([5, 0, 299, 5, 1])
    assert torch.equal(q.lookup(rows), q.dequantize()[rows])
    assert q.nbytes() == table_bytes(300, 13, fmt)
    assert q.nbytes() == sum(v.numel() * v.element_size() for v in q.export()[1].values())
    if fmt == "int4":
        assert q.data.shape == (300, math.ceil(13 / 2)) and q.data.dtype == torch.uint8
    back = table_from_export(*q.export())
    assert torch.equal(back.lookup(rows), q.lookup(rows))


def test_mixed_precision_gives_hot_rows_more_bits_and_fits_the_budget() -> None:
    t = _table(rows=1000, width=16)
    counts = torch.zeros(1000, dtype=torch.float64)
    counts[:50] = 1000.0  # hot
    counts[50:300] = 10.0  # warm
    all_int4 = table_bytes(1000, 16, "int4")
    budget = all_int4 + 50 * (row_bytes(16, "fp16") - row_bytes(16, "int4") + 4) + 3000
    (tables,), report = quantize_mixed([[t]], [[counts]], budget)
    (q,) = tables
    assert isinstance(q, MixedServingTable)
    assert report.bytes == q.nbytes() <= budget
    assert report.bytes == sum(v.numel() * v.element_size() for v in q.export()[1].values())
    bounds = q.error_bound()
    # The hot rows are at least int8, the never-read rows stay int4.
    int4_bound = ServingTable.encode(t, "int4").error_bound()
    assert bool((bounds[2:50] < int4_bound[2:50] / 10).all())
    assert torch.equal(bounds[300:], int4_bound[300:])
    assert sum(report.rows_per_format.values()) == 1000
    err = (q.dequantize() - t).abs().amax(1)
    assert bool((err <= bounds + 1e-6 * t.abs().amax(1)).all())
    rows = torch.tensor([0, 3, 999, 49, 50, 299, 300])
    assert torch.equal(q.lookup(rows), q.dequantize()[rows])
    back = table_from_export(*q.export())
    assert torch.equal(back.lookup(rows), q.lookup(rows))
    assert back.nbytes() == q.nbytes()


def test_mixed_precision_with_room_for_everything_and_with_too_little() -> None:
    t = _table(rows=200, width=16)
    counts = torch.arange(200, 0, -1).double()
    (tables,), report = quantize_mixed([[t]], [[counts]], 10**9)
    # Every row takes its most precise format: fp16, except the constant row (exact in int4)
    # and the row offset by 50 (int8's step over its small range beats fp16's relative error).
    assert report.rows_per_format == {"int4": 1, "int8": 1, "fp16": 198}
    err = (tables[0].dequantize() - t).abs().amax(1)
    assert bool((err <= tables[0].error_bound() + 1e-6 * t.abs().amax(1)).all())
    with pytest.raises(ValueError, match="below the all-int4 size"):
        quantize_mixed([[t]], [[counts]], table_bytes(200, 16, "int4") - 1)


def test_narrow_tables_never_pay_more_for_less_precision() -> None:
    # At width 4 an fp16 row (8 B) is cheaper than an int4 one (2 + 8 B): fp16 is the floor.
    t = _table(rows=50, width=4)
    (tables,), report = quantize_mixed([[t]], [[torch.ones(50)]], table_bytes(50, 4, "fp16"))
    assert tables[0].fmt == "fp16" and report.bytes == table_bytes(50, 4, "fp16")
