"""Serving tables: plain d-wide rows, stored fp32 or quantised row-wise, dequantised on lookup."""

from __future__ import annotations

import torch
from torch import nn

from embeddings.methods.base import tensor_bytes


class ServingTable(nn.Module):
    """One serving table. `fmt` is the storage format; `lookup(rows)` returns float32 rows.

    TODO(issue 3): fp16, int8 and int4 row-wise (scale and bias per row), mixed precision.
    """

    def __init__(self, fmt: str, data: torch.Tensor, width: int) -> None:
        super().__init__()
        self.fmt = fmt
        self.width = width
        self.register_buffer("data", data)

    @classmethod
    def fp32(cls, table: torch.Tensor) -> ServingTable:
        return cls("fp32", table.detach().to(torch.float32).contiguous(), table.shape[1])

    def lookup(self, rows: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.embedding(rows, self.data)

    def nbytes(self) -> int:
        return tensor_bytes(self.buffers())
