"""MPE's serving form (mixed-precision embeddings, arXiv 2409.20305): b-bit codes per row.

After MPE's search every row has a width b in {0, …, 6} (its frequency group's). Serving
keeps, per width, the sorted raw values of the rows of that width and their LSQ+ codes
packed b bits a value (ceil(d·b/8) bytes a row), one step α_b per width and one offset β
per dimension: x̂ = (u − 2^(b−1))·α_b + β, u the stored unsigned code. 0-bit rows store
nothing and score as zero vectors. Values without a row of their own hash into the tail
rows (one more segment, at the tail group's width). Imports no training code.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import nn

from embeddings.mapping import Lookup, Mapper, tensor_bytes
from idhash.splitmix import hash_bucket


def code_bytes(dim: int, bits: int) -> int:
    """Bytes of one row of `dim` codes of `bits` bits, packed."""
    return math.ceil(dim * bits / 8)


def code_range(bits: int) -> tuple[int, int]:
    """LSQ+'s signed integer range of a `bits`-bit code: [−2^(b−1), 2^(b−1) − 1]."""
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 [n, ceil(d·bits/8)]: unsigned codes [n, d] (each < 2^bits), bit-packed row-wise
    (value j's bit i is bit j·bits + i of the row, least significant first)."""
    n, d = codes.shape
    shifts = torch.arange(bits, dtype=torch.int64)
    flat = ((codes.to(torch.int64)[:, :, None] >> shifts) & 1).reshape(n, d * bits)
    width = code_bytes(d, bits)
    flat = torch.nn.functional.pad(flat, (0, width * 8 - d * bits))
    weights = torch.tensor([1 << i for i in range(8)], dtype=torch.int64)
    return (flat.view(n, width, 8) * weights).sum(-1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Inverse of `pack_codes`: int64 [n, dim]."""
    n = packed.shape[0]
    shifts = torch.arange(8, dtype=torch.int64, device=packed.device)
    flat = ((packed.to(torch.int64)[:, :, None] >> shifts) & 1).reshape(n, -1)[:, : dim * bits]
    powers = (1 << torch.arange(bits, dtype=torch.int64, device=packed.device))
    return (flat.view(n, dim, bits) * powers).sum(-1)


class MpeMapper(Mapper):
    """Raw ids → rows of an `MpePackedTable`: per-width segments of sorted values, a tail.

    `values` holds each stored width's sorted values one segment after another (segment
    s's rows start at the sum of the earlier segments' lengths), then `zero_keys` sorted
    values that score zero (rows pruned to 0 bits, kept only while the tail is not itself
    0 bits: otherwise they would read the tail). Other values hash into `tail_rows` rows
    after the segments; with no tail rows they score zero. Zero scores are weight-0 reads.

    Args:
        segments: rows of each stored width segment (explicit values).
        zero_keys: values at the end of `values` that score zero.
        tail_rows: rows of the tail segment (0: the tail is pruned).
        seed: hash seed of the tail (the training mapper's).
        values: int64 [sum(segments) + zero_keys].
    """

    kind = "mpe"
    tensor_args: ClassVar[dict[str, str]] = {"values": "values"}

    def __init__(self, segments: list[int], zero_keys: int, tail_rows: int, seed: int = 0,
                 values: torch.Tensor | None = None) -> None:
        super().__init__()
        self.segments = [int(s) for s in segments]
        self.zero_keys = int(zero_keys)
        self.tail_rows = int(tail_rows)
        self.seed = seed
        if values is None:
            values = torch.zeros(0, dtype=torch.int64)
        if values.shape[0] != sum(self.segments) + self.zero_keys:
            raise ValueError("values must hold every segment and the zero keys")
        self.register_buffer("values", values.to(torch.int64))

    def forward(self, ids: torch.Tensor) -> Lookup:
        ids = ids.contiguous()
        kept = sum(self.segments)
        if self.tail_rows:
            rows = kept + hash_bucket(ids, self.tail_rows, self.seed)
            read = torch.ones(ids.shape, dtype=torch.bool, device=ids.device)
        else:
            rows = torch.zeros_like(ids)
            read = torch.zeros(ids.shape, dtype=torch.bool, device=ids.device)
        start = 0
        for length in [*self.segments, self.zero_keys]:
            if length:
                seg = self.values[start : start + length]
                pos = torch.searchsorted(seg, ids).clamp_(max=length - 1)
                hit = seg[pos] == ids
                if start < kept:
                    rows = torch.where(hit, start + pos, rows)
                    read = read | hit
                else:  # the zero keys
                    read = read & ~hit
            start += length
        rows = torch.where(read, rows, torch.zeros_like(rows))
        return Lookup(rows[:, None], read[:, None].to(torch.float32))

    def export(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        config = {"segments": self.segments, "zero_keys": self.zero_keys,
                  "tail_rows": self.tail_rows, "seed": self.seed}
        return config, {"values": self.values}


class MpePackedTable(nn.Module):
    """Rows in segments of one bit width each, codes packed; `lookup` returns float32.

    x̂ = (u + lo_b)·α_b + β computed in that order (a product, then a sum), which is how
    training computes its quantised rows, so serving scores exactly like training.

    Args:
        bits: width of each segment (1…8).
        codes: uint8 [rows_s, ceil(d·b_s/8)] packed unsigned codes of each segment.
        step: float32 [segments] α of each segment's width.
        offset: float32 [d] β.
    """

    fmt = "mpe"

    def __init__(self, bits: list[int], codes: list[torch.Tensor], step: torch.Tensor,
                 offset: torch.Tensor) -> None:
        super().__init__()
        if len(bits) != len(codes) or step.shape[0] != len(bits):
            raise ValueError("one code table and one step per segment")
        self.bits = [int(b) for b in bits]
        self.width = int(offset.shape[0])
        for i, c in enumerate(codes):
            self.register_buffer(f"codes{i}", c.to(torch.uint8).contiguous())
        self.register_buffer("step", step.to(torch.float32).contiguous())
        self.register_buffer("offset", offset.to(torch.float32).contiguous())

    def segment_codes(self) -> list[torch.Tensor]:
        return [getattr(self, f"codes{i}") for i in range(len(self.bits))]

    @property
    def rows(self) -> int:
        return sum(c.shape[0] for c in self.segment_codes())

    def lookup(self, rows: torch.Tensor) -> torch.Tensor:
        """Rows outside the table (a zero-scoring value's weight-0 read) give zeros."""
        out = torch.zeros(rows.shape[0], self.width, device=self.offset.device)
        start = 0
        for i, (b, codes) in enumerate(zip(self.bits, self.segment_codes(), strict=True)):
            end = start + codes.shape[0]
            hit = (rows >= start) & (rows < end)
            if bool(hit.any()):
                u = unpack_codes(codes.index_select(0, rows[hit] - start), b, self.width)
                q = (u + code_range(b)[0]).to(torch.float32)
                out[hit] = q * self.step[i] + self.offset
            start = end
        return out

    def dequantize(self) -> torch.Tensor:
        return self.lookup(torch.arange(self.rows, device=self.offset.device))

    def error_bound(self) -> torch.Tensor:
        """Zero: the codes are the trained model's own values (its quantisation is learned)."""
        return torch.zeros(self.rows)

    def nbytes(self) -> int:
        return tensor_bytes(self.buffers())

    def export(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        config = {"fmt": self.fmt, "width": self.width, "rows": self.rows, "bits": self.bits}
        return config, {name: buf for name, buf in self.named_buffers()}

    @classmethod
    def from_export(cls, config: dict[str, Any], tensors: dict[str, torch.Tensor]
                    ) -> MpePackedTable:
        codes = [tensors[f"codes{i}"] for i in range(len(config["bits"]))]
        return cls(config["bits"], codes, tensors["step"], tensors["offset"])
