"""The contract every compression method keeps: mapper → plain tables → combiner (→ MLET).

Keeping the three parts apart is what makes collapse, sharding and quantisation generic:
a method only says how raw ids become (table, row) lookups; this module owns the tables,
the combination, the optional MLET projection, byte counting and collapse.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any, ClassVar

import torch
from torch import nn


class Combiner(str, Enum):
    """How the per-table vectors of one id become one vector."""

    SUM = "sum"  # weighted sum (hashing, multi-level hash, QR by sum)
    CONCAT = "concat"  # side by side; each table is width/T wide (QR by concatenation)
    PRODUCT = "product"  # element-wise product (QR by product); not linear, so no MLET


@dataclass
class Lookup:
    """Where each id reads: one row per table, and a per-table weight (0 = does not read).

    rows: LongTensor [n, T]; weights: float Tensor [n, T] or None (all ones).
    """

    rows: torch.Tensor
    weights: torch.Tensor | None = None


def tensor_bytes(tensors: Any) -> int:
    """Exact bytes of an iterable of tensors (the one budget primitive every count uses)."""
    return sum(t.numel() * t.element_size() for t in tensors)


class Mapper(nn.Module):
    """Raw 64-bit ids → Lookup. Subclasses register any state as buffers.

    `kind` names the mapper in model.json; `export`/`from_export` freeze it for serving
    (plain JSON config + tensors for safetensors, never pickle).
    """

    kind: ClassVar[str] = ""
    registry: ClassVar[dict[str, type[Mapper]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.kind:
            Mapper.registry[cls.kind] = cls

    def forward(self, ids: torch.Tensor) -> Lookup:  # pragma: no cover - abstract
        raise NotImplementedError

    def export(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """JSON-able config and the tensors that fully determine the (frozen) mapping."""
        raise NotImplementedError

    @classmethod
    def from_export(cls, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Mapper:
        raise NotImplementedError

    def state_bytes(self) -> int:
        """Bytes of the mapper's own state (buffers) while training."""
        return tensor_bytes(self.buffers())

    @staticmethod
    def build(kind: str, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Mapper:
        if kind not in Mapper.registry:
            raise ValueError(f"unknown mapper kind {kind!r}; known: {sorted(Mapper.registry)}")
        return Mapper.registry[kind].from_export(config, tensors)


def combine(vectors: list[torch.Tensor], combiner: Combiner) -> torch.Tensor:
    if len(vectors) == 1:
        return vectors[0]
    if combiner is Combiner.CONCAT:
        return torch.cat(vectors, dim=1)
    out = vectors[0]
    for v in vectors[1:]:
        out = out * v if combiner is Combiner.PRODUCT else out + v
    return out


def gather(
    tables: list[torch.Tensor] | nn.ParameterList,
    lookup: Lookup,
    combiner: Combiner,
    sparse: bool = False,
) -> torch.Tensor:
    """Read every table at its rows, weight, combine: the lookup shared by training and serving."""
    vectors = []
    for t, table in enumerate(tables):
        v = torch.nn.functional.embedding(lookup.rows[:, t], table, sparse=sparse)
        if lookup.weights is not None:
            v = v * lookup.weights[:, t : t + 1].to(v.dtype)
        vectors.append(v)
    return combine(vectors, combiner)


class CompressedEmbedding(nn.Module):
    """A trainable compressed table for one feature: forward(ids[n]) -> [n, dim].

    Args:
        mapper: raw ids → (table, row) lookups.
        table_rows: rows of each plain table.
        combiner: how per-table vectors combine.
        dim: output width d.
        mlet_dim: MLET's k (> dim): tables are k wide (or k/T each for CONCAT) and a k×d
            projection follows. None = no MLET.
        sparse: tables produce sparse gradients (row-wise optimizers touch only used rows).
        init_scale: tables start U(-s, s); default 1/sqrt(width) per table (methods that
            combine several tables choose their own so the output has an ordinary scale).
    """

    def __init__(
        self,
        mapper: Mapper,
        table_rows: list[int],
        combiner: Combiner,
        dim: int,
        mlet_dim: int | None = None,
        sparse: bool = False,
        init_scale: float | list[float] | None = None,
    ) -> None:
        super().__init__()
        if mlet_dim is not None:
            if mlet_dim <= dim:
                raise ValueError(f"mlet_dim (k={mlet_dim}) must exceed dim (d={dim})")
            if combiner is Combiner.PRODUCT:
                raise ValueError(
                    "MLET cannot be combined with a product combiner: the k→d projection "
                    "only folds into tables when the combiner is linear (sum or concat)"
                )
        self.mapper = mapper
        self.combiner = combiner
        self.dim = dim
        self.mlet_dim = mlet_dim
        self.sparse = sparse
        width = mlet_dim or dim
        if combiner is Combiner.CONCAT:
            if width % len(table_rows):
                raise ValueError(f"width {width} is not divisible by {len(table_rows)} tables")
            widths = [width // len(table_rows)] * len(table_rows)
        else:
            widths = [width] * len(table_rows)
        scales = init_scale if isinstance(init_scale, list) else [init_scale] * len(table_rows)
        self.tables = nn.ParameterList()
        for rows, w, s in zip(table_rows, widths, scales, strict=True):
            bound = s if s is not None else (1.0 / w) ** 0.5
            self.tables.append(nn.Parameter(torch.empty(rows, w).uniform_(-bound, bound)))
        self.projection: nn.Parameter | None = None
        if mlet_dim is not None:
            # Scaled so that a k-wide U(-1/sqrt(k)) row maps to an ordinary-scale d vector.
            self.projection = nn.Parameter(torch.randn(mlet_dim, dim) / mlet_dim**0.5)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = gather(self.tables, self.mapper(ids), self.combiner, self.sparse)
        return out @ self.projection if self.projection is not None else out

    def extra_state_bytes(self) -> int:
        """Bytes of adaptive state outside parameters and mapper buffers (e.g. a sketch)."""
        return 0

    def training_bytes(self) -> int:
        """Parameters plus every buffer the method holds while training (optimizer excluded)."""
        return tensor_bytes(self.parameters()) + tensor_bytes(self.buffers()) + self.extra_state_bytes()

    def frozen_mapper(self) -> Mapper:
        """The mapper as serving will use it (adaptive methods snapshot their state)."""
        config, tensors = self.mapper.export()
        return Mapper.build(self.mapper.kind, config, {k: v.clone() for k, v in tensors.items()})

    @torch.no_grad()
    def collapse(self) -> ServingEmbedding:
        """Serving form: frozen mapper, MLET folded into every table; scores exactly alike."""
        tables = [t.detach().clone() for t in self.tables]
        combiner = self.combiner
        if self.projection is not None:
            p = self.projection.detach()
            if combiner is Combiner.CONCAT:
                # [a, b] @ P == a @ P_top + b @ P_bottom: concat of projections becomes a sum.
                w = tables[0].shape[1]
                tables = [t @ p[i * w : (i + 1) * w] for i, t in enumerate(tables)]
                combiner = Combiner.SUM
            else:
                tables = [t @ p for t in tables]
        return ServingEmbedding(self.frozen_mapper(), tables, combiner)

    def after_step(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Called after each optimizer step; adaptive methods update their state here."""


class ServingEmbedding(nn.Module):
    """The serving form: a frozen mapper, plain d-wide tables (maybe quantised), a combiner."""

    def __init__(self, mapper: Mapper, tables: list[Any], combiner: Combiner) -> None:
        super().__init__()
        from embeddings.methods.quantize import ServingTable

        self.mapper = mapper
        self.combiner = combiner
        self.tables = nn.ModuleList(
            t if isinstance(t, ServingTable) else ServingTable.fp32(t) for t in tables
        )
        self.mapper.requires_grad_(False)

    @torch.no_grad()
    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        lookup = self.mapper(ids)
        vectors = []
        for t, table in enumerate(self.tables):
            v = table.lookup(lookup.rows[:, t])
            if lookup.weights is not None:
                v = v * lookup.weights[:, t : t + 1].to(v.dtype)
            vectors.append(v)
        return combine(vectors, self.combiner)

    def serving_bytes(self) -> int:
        return self.mapper.state_bytes() + sum(t.nbytes() for t in self.tables)
