"""The contract every compression method keeps: mapper → plain tables → combiner (→ MLET).

Keeping the three parts apart is what makes collapse, sharding and quantisation generic:
a method only says how raw ids become (table, row) lookups; this module owns the tables,
the combination, the optional MLET projection, byte counting, collapse, and the registry
of method configs that the embedding collection builds from. The mappers, combiners and
the collapsed form are the serving form's (`embeddings.mapping`,
`embeddings.serving_embedding`), which imports nothing from here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

# The serving form's names (mappers, combiners, the serving embedding) stay importable from
# here: training imports serving, never the reverse.
from embeddings.mapping import Combiner, Lookup, Mapper, combine, concat_widths, tensor_bytes
from embeddings.methods.mlet import check_mlet
from embeddings.serving_embedding import ServingEmbedding, shared_slots


@dataclass
class FeatureStats:
    """Access frequencies of one feature's raw values, most frequent first.

    The data pipeline's statistics reach the methods in this form: the uncompressed method
    gives the top values rows of their own, learned hashing clusters them, mixed-precision
    quantisation ranks rows by them.

    Args:
        values: int64 [m] raw values, sorted by descending count, no duplicates.
        counts: int64 [m] occurrences of each value.
        signatures: optional int32 [m, K] minhash signatures of each value's set of training
            rows (32-bit bit patterns; SCMA's addresses, `data_pipeline.row_signatures`),
            for the first rows of `values` only when shorter.
        contexts: the same for each value's set of co-occurring values of other features.
    """

    values: torch.Tensor
    counts: torch.Tensor
    signatures: torch.Tensor | None = None
    contexts: torch.Tensor | None = None

    def __post_init__(self) -> None:
        self.values = torch.as_tensor(np.asarray(self.values), dtype=torch.int64)
        self.counts = torch.as_tensor(np.asarray(self.counts), dtype=torch.int64)
        if self.values.shape != self.counts.shape or self.values.dim() != 1:
            raise ValueError("FeatureStats.values and .counts must be 1-D and of equal length")
        for name in ("signatures", "contexts"):
            sigs = getattr(self, name)
            if sigs is None:
                continue
            sigs = torch.as_tensor(np.asarray(sigs), dtype=torch.int32)
            if sigs.dim() != 2 or sigs.shape[0] > self.values.shape[0]:
                raise ValueError(f"FeatureStats.{name} must be [m' ≤ values, K]")
            setattr(self, name, sigs)

    def select(self, keep: torch.Tensor) -> FeatureStats:
        """The statistics of the values where `keep` (bool [m]) is set, signatures kept
        aligned (a feature split over workers keeps each shard's part)."""
        sigs = [None if s is None else s[keep[: s.shape[0]]]
                for s in (self.signatures, self.contexts)]
        return FeatureStats(self.values[keep], self.counts[keep], *sigs)

    @classmethod
    def from_ids(cls, ids: torch.Tensor | np.ndarray) -> FeatureStats:
        """Exact statistics of a stream of raw ids (ties broken by value, for determinism)."""
        values, counts = torch.unique(torch.as_tensor(np.asarray(ids)), return_counts=True)
        order = torch.argsort(counts, descending=True, stable=True)
        return cls(values[order], counts[order])


def ordinary_bound(width: int) -> float:
    """Init bound U(-b, b) of an ordinary `width`-wide embedding: every method's target scale."""
    return (1.0 / width) ** 0.5


def gather(
    tables: list[torch.Tensor] | nn.ParameterList,
    lookup: Lookup,
    combiner: Combiner,
    sparse: bool = False,
) -> torch.Tensor:
    """Read every table at its rows, weight, combine: the lookup shared by training and serving."""
    vectors = []
    for t, table in enumerate(shared_slots(list(tables), lookup)):
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
        mlet_dim: MLET's k (> dim): tables are k wide (or about k/T each for CONCAT) and a k×d
            projection follows. None = no MLET.
        sparse: tables produce sparse gradients (row-wise optimizers touch only used rows).
        init_scale: tables start U(-s, s); default `ordinary_bound(width)` per table (methods
            that combine several tables choose their own so the output has an ordinary scale).
        low_rank: the projection is a rank-k map (k = `mlet_dim` < d) followed by a d-wide
            bias, as low-rank compression (AFM) needs: the serving form keeps both, since
            folding k×d into the tables would undo the compression.
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
        low_rank: bool = False,
    ) -> None:
        super().__init__()
        if low_rank and (mlet_dim is None or not 0 < mlet_dim < dim):
            raise ValueError(f"a low-rank projection needs 0 < k < d={dim}, got k={mlet_dim}")
        if mlet_dim is not None:
            if mlet_dim <= dim and not low_rank:
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
            widths = concat_widths(width, len(table_rows))
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
        self.bias: nn.Parameter | None = nn.Parameter(torch.zeros(dim)) if low_rank else None

    @property
    def low_rank(self) -> bool:
        """Whether the projection is rank k < d with a bias, kept apart in the serving form."""
        return self.bias is not None

    def project(self, out: torch.Tensor) -> torch.Tensor:
        """The k-wide combined vectors through the projection (and bias), if any."""
        if self.projection is None:
            return out
        out = out @ self.projection
        return out + self.bias if self.bias is not None else out

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """The method alone (tests, small tools); a collection packs the tables and looks up
        every feature at once instead (`packed_lookup`)."""
        if self.bound:
            raise RuntimeError(
                "this method's tables live in a collection's table store: look ids up "
                "through the collection"
            )
        return self.project(gather(self.tables, self.mapper(ids), self.combiner, self.sparse))

    # -- packing into a collection's table store ------------------------------------------

    @property
    def bound(self) -> bool:
        """Whether the tables are views of a collection's store (see `bind`)."""
        return not isinstance(self.tables, nn.ParameterList)

    def packed_specs(self) -> list[tuple[int, int]]:
        """(rows, width) of each store table this method needs: a sum combiner reads all its
        tables in one bag, so they stack into one store table; concat and product read one
        bag per table, side by side in the store's output."""
        widths = [t.shape[1] for t in self.tables]
        if self.combiner is Combiner.SUM:
            return [(sum(t.shape[0] for t in self.tables), widths[0])]
        return [(t.shape[0], w) for t, w in zip(self.tables, widths, strict=True)]

    def packed_row_offsets(self) -> list[int]:
        """Offset of each of this method's tables inside its store table."""
        if self.combiner is not Combiner.SUM:
            return [0] * len(self.tables)
        offsets, start = [], 0
        for t in self.tables:
            offsets.append(start)
            start += t.shape[0]
        return offsets

    def packed_slots(self) -> int:
        """Columns of `packed_lookup`'s rows: the reads of one id (at most)."""
        return len(self.tables)

    def packed_bags(self) -> list[int] | None:
        """Where one table is read in several bags side by side (SCMA's slots over its one
        shared array): the table of `packed_specs` each bag reads, one slot per bag, in
        output order. None: the usual layout (sum: one bag; concat, product: a bag per
        table)."""
        return None

    def packed_initial(self) -> list[torch.Tensor]:
        """The initial values of each store table of `packed_specs`."""
        if self.combiner is Combiner.SUM:
            return [torch.cat([t.detach() for t in self.tables])]
        return [t.detach() for t in self.tables]

    def packed_lookup(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(rows [n, T] inside the store tables, read mask [n, T] or None = all read).

        Lookup weights must be 0/1 (which rows an id reads); the store sums what is read.
        """
        lookup = self.mapper(ids)
        rows = lookup.rows
        if self.combiner is Combiner.SUM and len(self.tables) > 1:
            rows = rows + self._row_offsets_tensor(rows.device)
        mask = None if lookup.weights is None else lookup.weights != 0
        return rows, mask

    def _row_offsets_tensor(self, device: torch.device) -> torch.Tensor:
        cached = getattr(self, "_offsets_cache", None)
        if cached is None or cached.device != device:
            cached = torch.tensor(self.packed_row_offsets(), dtype=torch.int64, device=device)
            self._offsets_cache = cached
        return cached

    def bind(self, store_tables: list[torch.Tensor]) -> None:
        """Hand the tables to a store: `store_tables` are the store's views (one per entry of
        `packed_specs`), which from now on are this method's tables (collapse, byte counts
        and CAFE's migrations read and write them there)."""
        views = []
        if self.combiner is Combiner.SUM:
            (whole,) = store_tables
            for start, t in zip(self.packed_row_offsets(), self.tables, strict=True):
                views.append(whole[start : start + t.shape[0]])
        else:
            views = list(store_tables)
        del self.tables
        self.tables = views

    def bind_row_states(self, row_states: Any) -> None:
        """`row_states(i)`: the row-shaped optimizer states of store table i (see
        `TableStore.row_states`), for methods that move state with rows."""
        self._store_row_states = row_states

    def table_row_states(self, table: int) -> list[torch.Tensor]:
        """Row-shaped optimizer states of one of this method's (bound) tables, [rows, k]."""
        if self.combiner is Combiner.SUM:
            start, rows = self.packed_row_offsets()[table], self.tables[table].shape[0]
            return [s[start : start + rows] for s in self._store_row_states(0)]
        return self._store_row_states(table)

    def observe_gradient_norms(self, norms: torch.Tensor, key: Any = None) -> None:
        """Per-id L2 norm of the gradient of what each id of the last training lookup read
        (before MLET's projection); adaptive methods (CAFE) rank ids by it."""

    @property
    def wants_gradient_norms(self) -> bool:
        return False

    def extra_state_bytes(self) -> int:
        """Bytes of adaptive state outside parameters and mapper buffers (e.g. a sketch)."""
        return 0

    def training_bytes(self) -> int:
        """Tables, projection and every buffer the method holds while training (optimizer
        excluded), wherever the tables live."""
        tables = {id(t) for t in self.tables}
        others = [p for p in self.parameters() if id(p) not in tables]
        return (
            tensor_bytes(self.tables)
            + tensor_bytes(others)
            + tensor_bytes(self.buffers())
            + self.extra_state_bytes()
        )

    def serving_widths(self) -> list[int]:
        """Width of each table after collapse (MLET folds every table to d; a low-rank
        projection stays, so its tables keep their k)."""
        if self.projection is None or self.low_rank:
            return [t.shape[1] for t in self.tables]
        return [self.dim] * len(self.tables)

    def serving_bytes(self, fmt: str = "fp32") -> int:
        """Exact bytes of `collapse()` stored in `fmt`, computed without collapsing."""
        from embeddings.budget import table_bytes

        tables = sum(
            table_bytes(t.shape[0], w, fmt)
            for t, w in zip(self.tables, self.serving_widths(), strict=True)
        )
        # A low-rank projection and bias are served as they are, in fp32 whatever `fmt`.
        kept = tensor_bytes([self.projection, self.bias]) if self.low_rank else 0
        return self.mapper.serving_bytes() + tables + kept

    def frozen_mapper(self) -> Mapper:
        """The mapper as serving will use it (adaptive methods snapshot their state)."""
        config, tensors = self.mapper.export()
        return Mapper.build(self.mapper.kind, config, {k: v.clone() for k, v in tensors.items()})

    @torch.no_grad()
    def serving_tables(self) -> list[torch.Tensor]:
        """Copies of the tables the serving form keeps (before MLET folds into them)."""
        return [t.detach().clone() for t in self.tables]

    @torch.no_grad()
    def collapse(self) -> ServingEmbedding:
        """Serving form: frozen mapper, MLET folded into every table; scores exactly alike."""
        tables = self.serving_tables()
        combiner = self.combiner
        if self.low_rank:
            mapper = self.frozen_mapper().to(tables[0].device)
            return ServingEmbedding(mapper, tables, combiner, self.projection.detach().clone(),
                                    self.bias.detach().clone())
        if self.projection is not None:
            p = self.projection.detach()
            if combiner is Combiner.CONCAT:
                # [a, b] @ P == a @ P_top + b @ P_bottom: concat of projections becomes a sum.
                rows = p.split([t.shape[1] for t in tables])
                tables = [t @ part for t, part in zip(tables, rows, strict=True)]
                combiner = Combiner.SUM
            else:
                tables = [t @ p for t in tables]
        # An adaptive mapper's snapshot comes from host-side state (CAFE's sketch): serve
        # it from the tables' device.
        mapper = self.frozen_mapper().to(tables[0].device)
        return ServingEmbedding(mapper, tables, combiner)

    def after_step(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Called after each optimizer step; adaptive methods update their state here."""

    # -- per-id transform after the lookup, and an auxiliary loss (MPE) ---------------------

    has_post_lookup: ClassVar[bool] = False
    """Whether the vectors read from the store pass through `post_lookup_batch` (a
    collection then routes this class's features through it; the others keep their path)."""

    @classmethod
    def post_lookup_batch(
        cls, methods: list[CompressedEmbedding | None], vectors: torch.Tensor
    ) -> torch.Tensor:
        """[n, k, width] vectors of k features as read from the store → what the features
        output. Each method of this class knows its last `packed_lookup`; None marks a
        feature of another method, whose vectors must pass unchanged. Identity here."""
        return vectors

    def regularization(self) -> torch.Tensor | None:
        """A term the training loss adds (MPE's bit-width penalty); None = nothing."""
        return None

    def schedule(self, total_steps: int) -> None:
        """Told the run's optimizer steps before training (MPE places its search in them)."""


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

    def accepts_mlet(self) -> bool:
        """Whether MLET's projection may follow this method (a linear combiner, and a
        serving form the projection folds into)."""
        return self.combiner() is not Combiner.PRODUCT

    def check(self, num_embeddings: int, dim: int) -> None:
        """Raise ValueError (saying why) if this config cannot be built at this size and width.

        The collection calls it while validating, so a bad feature fails with its name; `build`
        calls it too. Subclasses extend it (calling super) with their own conditions.
        """
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


def with_mlet(base: MethodConfig | dict[str, Any], mlet_dim: int) -> MethodConfig:
    """`base` (a method config or its dict) with MLET of width `mlet_dim` on top, validated
    (the rule: `embeddings.methods.mlet`)."""
    data = base.model_dump() if isinstance(base, MethodConfig) else dict(base)
    data["mlet_dim"] = mlet_dim
    if data.get("method") not in METHODS:
        raise ValueError(f"unknown method {data.get('method')!r}; known: {sorted(METHODS)}")
    return METHODS[data["method"]].model_validate(data)


@dataclass
class TrainedFeature:
    """One feature of an already trained model, for methods built from it (two-stage methods:
    low-rank, MEC): its collapsed serving embedding (raw ids → [n, d]) and its statistics."""

    serving: ServingEmbedding
    stats: FeatureStats | None


class TwoStageConfig(MethodConfig):
    """A method built from a trained model's feature (`from_trained`), then fine-tuned.

    The training job passes every feature of the model named by its `from_model` field;
    `build` alone (no trained model) is refused with a message that says so."""

    def build(
        self, num_embeddings: int, dim: int, stats: FeatureStats | None = None
    ) -> CompressedEmbedding:
        raise ValueError(
            f"method {self.method!r} is built from a trained model: set the training "
            "config's from_model to an exported model directory"
        )

    def from_trained(
        self, num_embeddings: int, dim: int, trained: TrainedFeature
    ) -> CompressedEmbedding:
        raise NotImplementedError
