"""Serving tables: plain d-wide rows, stored fp32 or quantised row-wise, dequantised on lookup.

Quantisation happens once, at export, on the collapsed tables; lookups return float32 so the
combiner and the model above never see the storage format. Formats and their error bounds
(x̂ the dequantised value of x, per row of the fp32 table it was encoded from):

- fp32: exact.
- fp16: |x − x̂| ≤ 2⁻¹¹·|x| (round to nearest; 2⁻²⁵ absolute below fp16's normal range).
  Values beyond ±65504 are refused rather than stored as inf.
- int8: q = round((x − min)/s) with s = (max − min)/255, x̂ = q·s + min, so
  |x − x̂| ≤ s/2 = (max − min)/255/2 per row.
- int4: the same with 15 levels, |x − x̂| ≤ (max − min)/15/2; two values packed per byte.
- mixed (after MPE, arXiv 2409.20305): each row in one of the formats above (its own row's
  bound applies); `embeddings.methods.quantize.quantize_mixed` chooses the formats.

int8/int4 rows carry an fp32 scale and bias (8 bytes); float32 arithmetic in the lookup adds
at most a few units in the last place (~1e-7 relative) to these bounds.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from embeddings.budget import SERVING_FORMATS
from embeddings.mapping import tensor_bytes
from embeddings.serving_mpe import MpePackedTable

# Levels of the int formats, and fp16's limits (the bounds in this module's docstring).
LEVELS = {"int8": 255, "int4": 15}
FP16_MAX = 65504.0
FP16_UNIT = 2.0**-11
FP16_SUBNORMAL = 2.0**-25


def _round_down_f32(x: torch.Tensor) -> torch.Tensor:
    """float64 → the largest float32 ≤ x (so a rounded bias never sits above the row's min)."""
    y = x.to(torch.float32)
    return torch.where(y.double() > x, torch.nextafter(y, torch.full_like(y, -torch.inf)), y)


def _round_up_f32(x: torch.Tensor) -> torch.Tensor:
    y = x.to(torch.float32)
    return torch.where(y.double() < x, torch.nextafter(y, torch.full_like(y, torch.inf)), y)


class ServingTable(nn.Module):
    """One serving table in one storage format; `lookup(rows)` returns float32 rows.

    Args:
        fmt: "fp32", "fp16", "int8" or "int4".
        data: the stored rows: float32/float16 [rows, width], uint8 [rows, width] for int8,
            uint8 [rows, ceil(width / 2)] for int4 (even column in the low nibble).
        width: the row width d.
        scale, bias: float32 [rows] for int8/int4 (x̂ = q·scale + bias), None otherwise.
    """

    def __init__(
        self,
        fmt: str,
        data: torch.Tensor,
        width: int,
        scale: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        if fmt not in SERVING_FORMATS:
            raise ValueError(f"unknown serving format {fmt!r}; known: {list(SERVING_FORMATS)}")
        if (fmt in LEVELS) != (scale is not None and bias is not None):
            raise ValueError(f"format {fmt} needs scale and bias exactly when it is an int format")
        self.fmt = fmt
        self.width = width
        self.register_buffer("data", data)
        if scale is not None:
            self.register_buffer("scale", scale)
            self.register_buffer("bias", bias)

    @property
    def rows(self) -> int:
        return self.data.shape[0]

    @classmethod
    def fp32(cls, table: torch.Tensor) -> ServingTable:
        return cls("fp32", table.detach().to(torch.float32).contiguous(), table.shape[1])

    @classmethod
    @torch.no_grad()
    def encode(cls, table: torch.Tensor, fmt: str) -> ServingTable:
        """Store an fp32 [rows, width] table in `fmt`, row-wise."""
        table = table.detach().to(torch.float32)
        width = table.shape[1]
        if fmt == "fp32":
            return cls.fp32(table)
        if fmt == "fp16":
            if table.numel() and table.abs().max() > FP16_MAX:
                raise ValueError("table has values beyond fp16's range (±65504); keep it fp32")
            return cls("fp16", table.to(torch.float16).contiguous(), width)
        if fmt not in LEVELS:
            raise ValueError(f"unknown serving format {fmt!r}; known: {list(SERVING_FORMATS)}")
        levels = LEVELS[fmt]
        x = table.double()
        empty = x.shape[1] == 0
        lo = x.min(1).values if not empty else torch.zeros(x.shape[0], dtype=torch.float64)
        hi = x.max(1).values if not empty else lo
        # Bias rounded down and scale up, so [bias, bias + levels·scale] still covers the row
        # after float32 rounding and the s/2 bound holds.
        bias = _round_down_f32(lo)
        scale = _round_up_f32((hi - bias.double()) / levels)
        step = torch.where(scale > 0, scale.double(), torch.ones_like(lo))
        q = torch.round((x - bias.double()[:, None]) / step[:, None]).clamp_(0, levels)
        q = q.to(torch.uint8)
        if fmt == "int4":
            if width % 2:
                q = torch.cat([q, torch.zeros(q.shape[0], 1, dtype=torch.uint8)], dim=1)
            q = q[:, 0::2] | (q[:, 1::2] << 4)
        return cls(fmt, q.contiguous(), width, scale, bias)

    def _decode(self, stored: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
        if self.fmt in ("fp32", "fp16"):
            return stored.to(torch.float32)
        if self.fmt == "int4":
            stored = torch.stack([stored & 0x0F, stored >> 4], dim=-1).flatten(-2)
            stored = stored[:, : self.width]
        scale = self.scale if rows is None else self.scale.index_select(0, rows)
        bias = self.bias if rows is None else self.bias.index_select(0, rows)
        return torch.addcmul(bias[:, None], stored.to(torch.float32), scale[:, None])

    def lookup(self, rows: torch.Tensor) -> torch.Tensor:
        if self.fmt == "fp32":
            return torch.nn.functional.embedding(rows, self.data)
        return self._decode(self.data.index_select(0, rows), rows)

    def dequantize(self) -> torch.Tensor:
        """The whole table as float32 [rows, width]."""
        return self._decode(self.data, None)

    def error_bound(self) -> torch.Tensor:
        """Per-row bound on |x − x̂| against the fp32 table this was encoded from."""
        if self.fmt == "fp32":
            return torch.zeros(self.rows)
        if self.fmt == "fp16":
            peak = self.data.abs().amax(1).float() if self.width else torch.zeros(self.rows)
            return peak * FP16_UNIT / (1 - FP16_UNIT) + FP16_SUBNORMAL
        return self.scale / 2

    def nbytes(self) -> int:
        return tensor_bytes(self.buffers())

    def export(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """JSON config and tensors (safetensors-ready) that rebuild this table."""
        config = {"fmt": self.fmt, "width": self.width, "rows": self.rows}
        return config, {name: buf for name, buf in self.named_buffers()}

    @classmethod
    def from_export(cls, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> ServingTable:
        scale, bias = tensors.get("scale"), tensors.get("bias")
        return cls(config["fmt"], tensors["data"], config["width"], scale, bias)


class MixedServingTable(nn.Module):
    """Rows of one table stored in several formats: a base format for most rows, and tiers
    of promoted rows in more precise formats.

    Each tier keeps the sorted int32 ids of its rows; the base table stores the remaining
    rows in order, so a base row's slot is its id minus the number of promoted ids below it
    and no per-row index is needed (4 bytes per promoted row, none per base row).
    """

    fmt = "mixed"

    def __init__(
        self, base: ServingTable, tiers: list[ServingTable], tier_ids: list[torch.Tensor]
    ) -> None:
        super().__init__()
        self.width = base.width
        self.base = base
        self.tiers = nn.ModuleList(tiers)
        for i, ids in enumerate(tier_ids):
            self.register_buffer(f"ids{i}", ids.to(torch.int32).contiguous())

    @property
    def tier_ids(self) -> list[torch.Tensor]:
        return [getattr(self, f"ids{i}") for i in range(len(self.tiers))]

    @property
    def rows(self) -> int:
        return self.base.rows + sum(len(ids) for ids in self.tier_ids)

    @classmethod
    @torch.no_grad()
    def encode(
        cls, table: torch.Tensor, tier_of_row: torch.Tensor, formats: list[str]
    ) -> MixedServingTable:
        """Row r stored in formats[tier_of_row[r]]; formats[0] is the base format."""
        tier_of_row = tier_of_row.to(torch.int64)
        base = ServingTable.encode(table[tier_of_row == 0], formats[0])
        tiers, ids = [], []
        for level, fmt in enumerate(formats[1:], start=1):
            rows = torch.nonzero(tier_of_row == level).flatten()
            if len(rows):
                tiers.append(ServingTable.encode(table[rows], fmt))
                ids.append(rows)
        return cls(base, tiers, ids)

    def lookup(self, rows: torch.Tensor) -> torch.Tensor:
        out = torch.empty(rows.shape[0], self.width)
        rows32 = rows.to(torch.int32)
        promoted_below = torch.zeros_like(rows)
        in_base = torch.ones_like(rows, dtype=torch.bool)
        for table, ids in zip(self.tiers, self.tier_ids, strict=True):
            pos = torch.searchsorted(ids, rows32)
            hit = ids[pos.clamp(max=len(ids) - 1)] == rows32
            out[hit] = table.lookup(pos[hit])
            promoted_below += pos
            in_base &= ~hit
        out[in_base] = self.base.lookup((rows - promoted_below)[in_base])
        return out

    def dequantize(self) -> torch.Tensor:
        return self.lookup(torch.arange(self.rows))

    def error_bound(self) -> torch.Tensor:
        out = torch.empty(self.rows)
        promoted = torch.zeros(self.rows, dtype=torch.bool)
        for table, ids in zip(self.tiers, self.tier_ids, strict=True):
            out[ids.long()] = table.error_bound()
            promoted[ids.long()] = True
        out[~promoted] = self.base.error_bound()
        return out

    def formats(self) -> dict[str, int]:
        """Rows stored in each format."""
        counts = {self.base.fmt: self.base.rows}
        for table in self.tiers:
            counts[table.fmt] = counts.get(table.fmt, 0) + table.rows
        return counts

    def nbytes(self) -> int:
        return tensor_bytes(self.buffers())

    def export(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        base_cfg, base_tensors = self.base.export()
        config: dict[str, Any] = {"fmt": "mixed", "width": self.width, "rows": self.rows}
        config["base"] = base_cfg
        config["tiers"] = []
        tensors = {f"base.{k}": v for k, v in base_tensors.items()}
        for i, (table, ids) in enumerate(zip(self.tiers, self.tier_ids, strict=True)):
            cfg, ts = table.export()
            config["tiers"].append(cfg)
            tensors.update({f"tier{i}.{k}": v for k, v in ts.items()})
            tensors[f"tier{i}.ids"] = ids
        return config, tensors

    @classmethod
    def from_export(
        cls, config: dict[str, Any], tensors: dict[str, torch.Tensor]
    ) -> MixedServingTable:
        def part(prefix: str) -> dict[str, torch.Tensor]:
            return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}

        base = ServingTable.from_export(config["base"], part("base."))
        tiers = [
            ServingTable.from_export(cfg, part(f"tier{i}."))
            for i, cfg in enumerate(config["tiers"])
        ]
        ids = [tensors[f"tier{i}.ids"] for i in range(len(tiers))]
        return cls(base, tiers, ids)


def table_from_export(
    config: dict[str, Any], tensors: dict[str, torch.Tensor]
) -> ServingTable | MixedServingTable | MpePackedTable:
    """Rebuild any serving table from its `export()`."""
    kinds = {"mixed": MixedServingTable, "mpe": MpePackedTable}
    return kinds.get(config["fmt"], ServingTable).from_export(config, tensors)
