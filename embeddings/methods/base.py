"""The contract every compression method keeps: mapper → plain tables → combiner (→ MLET).

Keeping the three parts apart is what makes collapse, sharding and quantisation generic:
a method only says how raw ids become (table, row) lookups; this module owns the tables,
the combination, the optional MLET projection, byte counting, collapse, and the registry
of method configs that the embedding collection builds from.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

if TYPE_CHECKING:
    from embeddings.methods.quantize import (
        MixedPrecisionReport,
        MixedServingTable,
        ServingTable,
    )


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


@dataclass
class FeatureStats:
    """Access frequencies of one feature's raw values, most frequent first.

    The data pipeline's statistics reach the methods in this form: the uncompressed method
    gives the top values rows of their own, learned hashing clusters them, mixed-precision
    quantisation ranks rows by them.

    Args:
        values: int64 [m] raw values, sorted by descending count, no duplicates.
        counts: int64 [m] occurrences of each value.
    """

    values: torch.Tensor
    counts: torch.Tensor

    def __post_init__(self) -> None:
        self.values = torch.as_tensor(np.asarray(self.values), dtype=torch.int64)
        self.counts = torch.as_tensor(np.asarray(self.counts), dtype=torch.int64)
        if self.values.shape != self.counts.shape or self.values.dim() != 1:
            raise ValueError("FeatureStats.values and .counts must be 1-D and of equal length")

    @classmethod
    def from_ids(cls, ids: torch.Tensor | np.ndarray) -> FeatureStats:
        """Exact statistics of a stream of raw ids (ties broken by value, for determinism)."""
        values, counts = torch.unique(torch.as_tensor(np.asarray(ids)), return_counts=True)
        order = torch.argsort(counts, descending=True, stable=True)
        return cls(values[order], counts[order])


def tensor_bytes(tensors: Any) -> int:
    """Exact bytes of an iterable of tensors (the one budget primitive every count uses)."""
    return sum(t.numel() * t.element_size() for t in tensors)


def ordinary_bound(width: int) -> float:
    """Init bound U(-b, b) of an ordinary `width`-wide embedding: every method's target scale."""
    return (1.0 / width) ** 0.5


class Mapper(nn.Module):
    """Raw 64-bit ids → Lookup. Subclasses register any state as buffers.

    `kind` names the mapper in model.json; `export`/`from_export` freeze it for serving
    (plain JSON config + tensors for safetensors, never pickle). Subclasses with a `kind`
    register themselves in `Mapper.registry`, which `Mapper.build` reads.
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

    def serving_bytes(self) -> int:
        """Bytes of the frozen mapper's tensors (what serving keeps of this mapper)."""
        return tensor_bytes(self.export()[1].values())

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
        init_scale: tables start U(-s, s); default `ordinary_bound(width)` per table (methods
            that combine several tables choose their own so the output has an ordinary scale).
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
            bound = s if s is not None else ordinary_bound(w)
            self.tables.append(nn.Parameter(torch.empty(rows, w).uniform_(-bound, bound)))
        self.projection: nn.Parameter | None = None
        if mlet_dim is not None:
            # Var(out) = k · Var(row) · Var(P) = Var(P)/3 for U(±1/sqrt(k)) rows, so N(0, 1/d)
            # gives the output the variance of an ordinary d-wide U(±1/sqrt(d)) embedding.
            self.projection = nn.Parameter(torch.randn(mlet_dim, dim) / dim**0.5)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = gather(self.tables, self.mapper(ids), self.combiner, self.sparse)
        return out @ self.projection if self.projection is not None else out

    def extra_state_bytes(self) -> int:
        """Bytes of adaptive state outside parameters and mapper buffers (e.g. a sketch)."""
        return 0

    def training_bytes(self) -> int:
        """Parameters plus every buffer the method holds while training (optimizer excluded)."""
        return (
            tensor_bytes(self.parameters())
            + tensor_bytes(self.buffers())
            + self.extra_state_bytes()
        )

    def serving_widths(self) -> list[int]:
        """Width of each table after collapse (MLET folds every table to d)."""
        if self.projection is None:
            return [t.shape[1] for t in self.tables]
        return [self.dim] * len(self.tables)

    def serving_bytes(self, fmt: str = "fp32") -> int:
        """Exact bytes of `collapse()` stored in `fmt`, computed without collapsing."""
        from embeddings.budget import table_bytes

        tables = sum(
            table_bytes(t.shape[0], w, fmt)
            for t, w in zip(self.tables, self.serving_widths(), strict=True)
        )
        return self.mapper.serving_bytes() + tables

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
        # An adaptive mapper's snapshot comes from host-side state (CAFE's sketch): serve
        # it from the tables' device.
        mapper = self.frozen_mapper().to(tables[0].device)
        return ServingEmbedding(mapper, tables, combiner)

    def after_step(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Called after each optimizer step; adaptive methods update their state here."""


class ServingEmbedding(nn.Module):
    """The serving form: a frozen mapper, plain d-wide tables (maybe quantised), a combiner."""

    def __init__(
        self,
        mapper: Mapper,
        tables: list[torch.Tensor | ServingTable | MixedServingTable],
        combiner: Combiner,
    ) -> None:
        super().__init__()
        from embeddings.methods.quantize import ServingTable

        self.mapper = mapper
        self.combiner = combiner
        # Raw tensors are fp32 tables; anything else is already a serving table (any format).
        self.tables = nn.ModuleList(
            ServingTable.fp32(t) if isinstance(t, torch.Tensor) else t for t in tables
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
        """Mapper tensors plus every table tensor (data, scale, bias, tier ids)."""
        return self.mapper.state_bytes() + sum(t.nbytes() for t in self.tables)

    def quantize(self, fmt: str) -> ServingEmbedding:
        """A copy whose tables are stored row-wise in `fmt` (fp32, fp16, int8, int4)."""
        from embeddings.methods.quantize import ServingTable

        tables = [ServingTable.encode(t.dequantize(), fmt) for t in self.tables]
        return ServingEmbedding(self.mapper, tables, self.combiner)

    def quantize_mixed(
        self, row_counts: list[torch.Tensor], budget_bytes: int
    ) -> tuple[ServingEmbedding, MixedPrecisionReport]:
        """Per-row bit widths from access counts so the whole embedding fits `budget_bytes`."""
        from embeddings.methods.quantize import quantize_mixed

        tables, report = quantize_mixed(
            [[t.dequantize() for t in self.tables]],
            [row_counts],
            budget_bytes,
            fixed_bytes=self.mapper.state_bytes(),
        )
        return ServingEmbedding(self.mapper, tables[0], self.combiner), report

    @torch.no_grad()
    def row_counts(self, values: torch.Tensor, counts: torch.Tensor) -> list[torch.Tensor]:
        """How often each row of each table is read, given raw values and their counts."""
        lookup = self.mapper(torch.as_tensor(values, dtype=torch.int64))
        out = []
        for t, table in enumerate(self.tables):
            w = counts.to(torch.float64)
            if lookup.weights is not None:
                w = w * (lookup.weights[:, t] != 0)
            out.append(torch.bincount(lookup.rows[:, t], weights=w, minlength=table.rows))
        return out


class MethodBytes(NamedTuple):
    """Exact bytes of one built method: while training, and of its fp32 serving form."""

    training: int
    serving: int


METHODS: dict[str, type[MethodConfig]] = {}
"""Method name → config class. A config class registers itself by being defined with a
`method: Literal["name"] = "name"` field; the collection's discriminated union reads this."""


class MethodConfig(BaseModel):
    """Base of every method's config: one per feature, the `method` field names the method.

    A subclass declares `method: Literal["name"] = "name"` and implements `build`; defining
    it registers it in `METHODS` (so `embeddings/methods/<name>.py` is all a new method adds).
    Budgets and ratios are turned into table sizes by `embeddings.budget`, never inline.

    Args:
        method: the method's registered name.
        mlet_dim: MLET's inner width k (k/d from 2 to 16); None = no MLET. Only methods with
            a linear combiner accept it (see `embeddings.methods.mlet`).
        sparse: tables produce sparse gradients (for the row-wise optimizers).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: str
    mlet_dim: int | None = Field(None, gt=0)
    sparse: bool = True

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        name = cls.model_fields["method"].default
        if isinstance(name, str) and name:
            METHODS[name] = cls

    def combiner(self) -> Combiner:
        """The combiner this config builds (decides whether MLET may follow)."""
        return Combiner.SUM

    def check(self, num_embeddings: int, dim: int) -> None:
        """Raise ValueError (saying why) if this config cannot be built at this size and width.

        The collection calls it while validating, so a bad feature fails with its name; `build`
        calls it too. Subclasses extend it (calling super) with their own conditions.
        """
        from embeddings.methods.mlet import check_mlet

        if num_embeddings < 1 or dim < 1:
            raise ValueError(f"need n ≥ 1 values and width d ≥ 1, got n={num_embeddings}, d={dim}")
        check_mlet(self.method, self.combiner(), dim, self.mlet_dim)

    def build(
        self, num_embeddings: int, dim: int, stats: FeatureStats | None = None
    ) -> CompressedEmbedding:
        """The trainable method for a feature of `num_embeddings` values and width `dim`."""
        raise NotImplementedError

    def at_ratio(self, ratio: float) -> MethodConfig:
        """This config resized to compression `ratio` (used by the collection's global budget)."""
        if "ratio" not in type(self).model_fields:
            raise ValueError(f"method {self.method!r} cannot be sized by a compression ratio")
        return self.model_copy(update={"ratio": ratio})

    def planned_bytes(
        self, num_embeddings: int, dim: int, stats: FeatureStats | None = None, fmt: str = "fp32"
    ) -> MethodBytes:
        """Exact training and serving bytes, from a build on the meta device (no memory)."""
        with torch.device("meta"):
            method = self.build(num_embeddings, dim, stats)
        return MethodBytes(method.training_bytes(), method.serving_bytes(fmt))


class RowsOrRatioConfig(MethodConfig):
    """A method sized by one table's rows: a compression `ratio` or an explicit `rows`.

    Args:
        ratio: compression ratio: ceil(n / ratio) rows.
        rows: the number of rows, instead of a ratio.
    """

    ratio: float | None = Field(None, ge=1)
    rows: int | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _one_size(self) -> RowsOrRatioConfig:
        if self.ratio is not None and self.rows is not None:
            raise ValueError("give either ratio or rows, not both")
        return self

    def check(self, num_embeddings: int, dim: int) -> None:
        super().check(num_embeddings, dim)
        if self.ratio is None and self.rows is None:
            raise ValueError(
                f"{self.method} needs a size: set ratio or rows (or a collection ratio)"
            )

    def at_ratio(self, ratio: float) -> RowsOrRatioConfig:
        return self.model_copy(update={"ratio": ratio, "rows": None})
