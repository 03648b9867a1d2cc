"""The embedding tables of a CTR model: one compression method per categorical feature.

Built from one pydantic config: per-feature method configs, or one compression ratio or
byte budget for the whole model split over the features in proportion to their size (the
CAFE artifact's budget maths: every compressed feature keeps n / ratio of its rows, and a
feature with at most 2000 / ratio values stays uncompressed). Methods come from the
registry `embeddings.methods.base.METHODS`; every module under `embeddings/methods/` is
imported here first, so a method registers by being defined there, never by editing this
file.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Mapping
from typing import Annotated, Any, Literal, Union

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator
from torch import nn

import embeddings.methods as _methods_package
from embeddings import budget
from embeddings.allocation import Allocated, Allocation, allocate
from embeddings.batched_lookup import LookupLayout, column_norms
from embeddings.methods.base import (
    METHODS,
    Combiner,
    CompressedEmbedding,
    FeatureStats,
    MethodConfig,
    TrainedFeature,
    TwoStageConfig,
)
from embeddings.methods.cafe_shared import join_shared
from embeddings.methods.full import FullConfig
from embeddings.serving_embedding import ServingCollection
from embeddings.serving_embedding import check_ids as _check_ids
from embeddings.tables import Backend, TableOptimizer, TableSpec, build_store


def _import_method_modules() -> None:
    for info in pkgutil.iter_modules(_methods_package.__path__):
        importlib.import_module(f"{_methods_package.__name__}.{info.name}")


_import_method_modules()

AnyMethodConfig = Annotated[
    Union[tuple(METHODS.values())],  # noqa: UP007 - a Union built from the registry
    Field(discriminator="method"),
]
"""Any registered method config, chosen by its `method` name."""


def every_method(mlet_dim: int) -> dict[str, dict[str, Any]]:
    """Name → method config of every registered method, each QR combiner, and every MLET
    composition DESIGN.md allows (MLET over QR by product is not one), MLET at `mlet_dim`."""
    out: dict[str, dict[str, Any]] = {
        "full": {"method": "full"},
        "hash": {"method": "hash"},
        "qr product": {"method": "qr"},
        "qr sum": {"method": "qr", "operation": "sum"},
        "qr concat": {"method": "qr", "operation": "concat"},
        "mlet(full)": {"method": "full", "mlet_dim": mlet_dim},
        "mlet(hash)": {"method": "hash", "mlet_dim": mlet_dim},
        "mlet(qr sum)": {"method": "qr", "operation": "sum", "mlet_dim": mlet_dim},
        "mlet(qr concat)": {"method": "qr", "operation": "concat", "mlet_dim": mlet_dim},
    }
    # Two-stage methods (low-rank, MEC) need a trained model, which a config alone lacks.
    for name in sorted(n for n in set(METHODS) - {"full", "hash", "qr"}
                       if not issubclass(METHODS[n], TwoStageConfig)):
        out[name] = {"method": name}
        if METHODS[name].model_validate({"method": name}).accepts_mlet():
            out[f"mlet({name})"] = {"method": name, "mlet_dim": mlet_dim}
    out["cafe shared"] = {"method": "cafe", "hot_table": "shared"}
    out["mlet(cafe shared)"] = {"method": "cafe", "hot_table": "shared", "mlet_dim": mlet_dim}
    return out


class CollectionConfig(BaseModel):
    """The embedding collection: which method each categorical feature gets, and how big.

    Sizing. With a global `ratio` or `budget_bytes` the collection has one budget (a ratio
    r means the uncompressed fp32 bytes / r), spent over the features by `allocation`
    (`embeddings.allocation`): some features stay whole, the others get their method (from
    `features`, else `method`) at one ratio solved on their exact planned bytes, so the
    model's realised bytes land on the budget whatever each method's overheads. Without
    one, every feature's config is used as written and must size itself (e.g.
    `{"method": "hash", "ratio": 10}`).

    Args:
        dim: embedding width d of every feature.
        cardinalities: distinct values of each feature, in feature order (sizes the tables).
        names: feature names; default C1..C<number of cardinalities> (Criteo's).
        ratio: one compression ratio for the whole collection: the budget is the
            uncompressed bytes / ratio.
        budget_bytes: one byte budget for the whole collection instead of a ratio.
        budget_memory: which bytes the budget counts: "serving" (the collapsed fp32
            model: tables and mapper state) or "training" (parameters, buffers and adaptive
            state such as sketches; optimizer state excluded).
        allocation: how the budget is spread (`embeddings.allocation`): "frequency" gives
            each feature the rows its ids earn by their counts in the data's statistics,
            all features ranked together (small features with frequent values stay whole);
            "sqrt" gives rows in proportion to sqrt(values); "fill" keeps the smallest
            features whole while each costs at most an equal share; "uniform" is the CAFE
            artifact's one ratio. "auto": frequency with statistics, else sqrt.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    dim: int = Field(16, ge=1)
    cardinalities: list[Annotated[int, Field(ge=1)]] = Field(min_length=1)
    names: list[str] | None = None
    ratio: float | None = Field(None, ge=1)
    budget_bytes: int | None = Field(None, gt=0)
    budget_memory: Literal["serving", "training"] = "serving"
    allocation: Allocation = "auto"
    features: dict[str, AnyMethodConfig] = Field(default_factory=dict)
    method: AnyMethodConfig = Field(default_factory=FullConfig)

    @field_validator("names")
    @classmethod
    def _names(cls, names: list[str] | None, info: ValidationInfo) -> list[str] | None:
        if names is None:
            return names
        cards = info.data.get("cardinalities")
        if cards is not None and len(names) != len(cards):
            raise ValueError(f"{len(names)} names for {len(cards)} cardinalities")
        if len(set(names)) != len(names):
            raise ValueError("feature names must be unique")
        bad = [n for n in names if not n or "." in n]
        if bad:
            raise ValueError(f"feature names must be non-empty and without '.': {bad}")
        return names

    @field_validator("features")
    @classmethod
    def _features(
        cls, features: dict[str, MethodConfig], info: ValidationInfo
    ) -> dict[str, MethodConfig]:
        sizes = _sizes(info.data)
        if sizes is None:
            return features
        for name, config in features.items():
            if name not in sizes:
                raise ValueError(f"features.{name}: no such feature; known: {list(sizes)}")
            _check(f"features.{name}", config, sizes[name], info.data)
        return features

    @field_validator("method")
    @classmethod
    def _method(cls, method: MethodConfig, info: ValidationInfo) -> MethodConfig:
        sizes = _sizes(info.data)
        if sizes is None:
            return method
        overridden = info.data.get("features", {})
        for name, n in sizes.items():
            if name not in overridden:
                _check(f"method (for feature {name})", method, n, info.data)
        return method

    @model_validator(mode="after")
    def _one_budget(self) -> CollectionConfig:
        if self.ratio is not None and self.budget_bytes is not None:
            raise ValueError("give either ratio or budget_bytes, not both")
        return self

    @property
    def feature_names(self) -> list[str]:
        return self.names or [f"C{i + 1}" for i in range(len(self.cardinalities))]

    def sizes(self) -> dict[str, int]:
        return dict(zip(self.feature_names, self.cardinalities, strict=True))

    def uncompressed_bytes(self) -> int:
        """Bytes of every feature as a plain fp32 n×d table: what a ratio divides."""
        return sum(budget.uncompressed_bytes(n, self.dim) for n in self.cardinalities)

    def target_bytes(self) -> int | None:
        """The one budget of a globally sized collection (None when each feature sizes
        itself): `budget_bytes`, or the uncompressed bytes over `ratio`."""
        if self.budget_bytes is not None:
            return self.budget_bytes
        if self.ratio is not None:
            return int(self.uncompressed_bytes() / self.ratio)
        return None

    def allocate(self, stats: Mapping[str, FeatureStats] | None = None) -> Allocated | None:
        """The global budget spent over the features by `allocation` (None when each
        feature sizes itself). Solved on exact planned bytes, `stats` included because
        vocabularies and id maps count."""
        target = self.target_bytes()
        if target is None or self.two_stage():
            return None
        methods = {n: self.features.get(n, self.method) for n in self.feature_names}
        what = "budget_bytes" if self.budget_bytes is not None else "ratio"
        return allocate(self.sizes(), self.dim, methods, target, self.allocation,
                        self.budget_memory, stats, what)

    def resolve(
        self, stats: Mapping[str, FeatureStats] | None = None
    ) -> tuple[dict[str, MethodConfig], float | None]:
        """Each feature's final method config, and the requested ratio: `ratio`, or the
        uncompressed bytes over `budget_bytes` (None when each feature sizes itself)."""
        allocated = self.allocate(stats)
        if allocated is None and self.two_stage() and self.target_bytes() is not None:
            if self.ratio is None:
                raise ValueError("budget_bytes: a two-stage method (built from a trained "
                                 "model) is sized by a ratio against the trained tables")
            # Against the trained model's tables, feature by feature: the trained model
            # already spent its budget over the features, a two-stage method shrinks each.
            return {n: self.features.get(n, self.method).at_ratio(self.ratio)
                    for n in self.feature_names}, self.ratio
        if allocated is None:
            return {n: self.features.get(n, self.method) for n in self.feature_names}, None
        return allocated.configs, self.ratio or self.uncompressed_bytes() / allocated.budget_bytes

    def two_stage(self) -> bool:
        """Whether any feature's method is built from a trained model (low-rank, MEC)."""
        methods = [self.method, *self.features.values()]
        return any(isinstance(m, TwoStageConfig) for m in methods)


def build_method(config: MethodConfig, num_embeddings: int, dim: int,
                 stats: FeatureStats | None, trained: TrainedFeature | None
                 ) -> CompressedEmbedding:
    """One feature's method: a two-stage method from its trained feature, others by `build`."""
    if isinstance(config, TwoStageConfig) and trained is not None:
        return config.from_trained(num_embeddings, dim, trained)
    return config.build(num_embeddings, dim, stats)


def _sizes(data: dict[str, Any]) -> dict[str, int] | None:
    cards = data.get("cardinalities")
    if cards is None or "dim" not in data:
        return None
    names = data.get("names") or [f"C{i + 1}" for i in range(len(cards))]
    return dict(zip(names, cards, strict=True))


def _check(where: str, config: MethodConfig, n: int, data: dict[str, Any]) -> None:
    """Run the config's own checks at the size it will get, naming the field on failure."""
    ratio = data.get("ratio")
    globally_sized = ratio is not None or data.get("budget_bytes") is not None
    if globally_sized:
        probe = ratio if ratio is not None else 2.0
        if budget.stays_uncompressed(n, probe):
            return
        config = config.at_ratio(probe)
    try:
        config.check(n, data["dim"])
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


class EmbeddingCollection(nn.Module):
    """Every categorical feature's compressed method: forward(sparse [n, F]) -> [n, F, d].

    TorchRec's shape, with embpress's compression where TorchRec puts managed collisions:
    each feature's mapper turns raw ids into rows; the tables of all features live in one
    table-batched store (`embeddings.tables`: FBGEMM's TBE with the optimizer fused into
    backward, or the plain-torch fallback) that one call looks up for the whole batch; then
    the combiners (QR's product) and MLET's projections run once for all features (one
    batched matmul per MLET width). Training: `loss.backward()`, the dense optimizer's
    step, then `step()` (the fallback's table update and the adaptive methods' post-step
    update, CAFE's sketch and migrations).

    Args:
        config: the collection config.
        stats: optional frequency statistics per feature name (vocabularies for uncompressed
            features, access frequencies for learned hashing).
        optimizer: how the tables train (default row-wise Adagrad, lr 0.05).
        backend: "auto" (fbgemm where it has a kernel for the optimizer here), "fbgemm" or
            "torch".
        device: where the tables live (a TBE is built for its device: move the collection
            by building it there).
        trained: each feature of a trained model by name, for two-stage methods (low-rank,
            MEC), which are built from it (`TwoStageConfig.from_trained`).
    """

    def __init__(
        self,
        config: CollectionConfig,
        stats: Mapping[str, FeatureStats] | None = None,
        optimizer: TableOptimizer | None = None,
        backend: Backend = "auto",
        device: torch.device | str | None = None,
        trained: Mapping[str, TrainedFeature] | None = None,
    ) -> None:
        super().__init__()
        method_configs, ratio = config.resolve(stats)
        sizes = config.sizes()
        methods = {
            name: build_method(method_configs[name], sizes[name], config.dim,
                               stats.get(name) if stats else None,
                               trained.get(name) if trained else None)
            for name in config.feature_names
        }
        self._setup(methods, config.dim, optimizer, backend, device)
        self.config = config
        self.method_configs = method_configs
        self.ratio = ratio

    @classmethod
    def from_methods(
        cls,
        methods: Mapping[str, CompressedEmbedding],
        dim: int,
        optimizer: TableOptimizer | None = None,
        backend: Backend = "auto",
        device: torch.device | str | None = None,
    ) -> EmbeddingCollection:
        """A collection over methods built elsewhere (the sharder builds each worker's part,
        seeded per feature and shard)."""
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._setup(dict(methods), dim, optimizer, backend, device)
        self.config = None
        self.method_configs = {}
        self.ratio = None
        return self

    def _setup(
        self,
        methods: dict[str, CompressedEmbedding],
        dim: int,
        optimizer: TableOptimizer | None,
        backend: Backend,
        device: torch.device | str | None,
    ) -> None:
        device = torch.device(device) if device is not None else torch.device("cpu")
        self.names = list(methods)
        self._dim = dim
        self.embeddings = nn.ModuleDict(methods)
        for emb in methods.values():
            emb.to(device)
        # Shared-hot-table CAFE features: one hot table and sketch for all of them.
        self.cafe_groups = nn.ModuleList(join_shared(methods, optimizer, backend, device))
        # Store order: features grouped by MLET width (0 = none), so each group's vectors are
        # adjacent columns of the store's output and project in one batched matmul.
        order = sorted(range(len(self.names)), key=lambda j: (methods[self.names[j]].mlet_dim or 0))
        self._order = order
        specs, slot_table, first_cols, second_cols = self._store_layout()
        identity = self._table_of == list(range(len(specs)))
        self.store = build_store(specs, optimizer, backend, device,
                                 None if identity else self._table_of)
        initial = []
        for j in order:
            initial += methods[self.names[j]].packed_initial()
        self.store.load_tables(initial)
        self._bind()
        # Lookup layout: slot s (a table read by a feature) belongs to store table
        # slot_table[s]; store table t's bags are its slots, per sample.
        self._lookup = LookupLayout([self.names[j] for j in order],
                                    [methods[self.names[j]] for j in order], order,
                                    slot_table, len(self._table_of))
        self._product = any(c >= 0 for c in second_cols)
        self._first_cols = torch.tensor(first_cols, dtype=torch.int64, device=device)
        # Features without a second factor read the column of ones forward appends.
        ones = sum(self._store_width(n) for n in self.names)
        self._second_cols = torch.tensor(
            [c if c >= 0 else ones for c in second_cols], dtype=torch.int64, device=device
        )
        self._projection_layout(device)

    def _width(self, name: str) -> int:
        """Width of a feature's vectors before its projection (MLET's k, else d)."""
        return self.embeddings[name].mlet_dim or self._dim

    def _store_width(self, name: str) -> int:
        """Columns of the store's output a feature reads: two factors for QR by product."""
        return self._width(name) * (2 if self.embeddings[name].combiner is Combiner.PRODUCT else 1)

    def _store_layout(self) -> tuple[list[TableSpec], list[int], list[int], list[int]]:
        """(store tables, the store table each lookup slot reads, each feature's first and
        second factor columns of the store output (-1: no second factor)), in store order;
        sets each feature's store tables and `_table_of`, the store table each bag column
        (virtual table) reads: slot_table names virtual tables, which are the store tables
        themselves except where a method reads one table in several bags (SCMA)."""
        specs: list[TableSpec] = []
        self._store_tables: dict[str, list[int]] = {}
        self._table_of: list[int] = []
        slot_table: list[int] = []
        first_cols: list[int] = []
        second_cols: list[int] = []
        col = 0
        for j in self._order:
            name = self.names[j]
            emb = self.embeddings[name]
            tables = []
            for rows, width in emb.packed_specs():
                tables.append(len(specs))
                specs.append(TableSpec(rows, width))
            self._store_tables[name] = tables
            bags = emb.packed_bags()
            if bags is None:
                first = len(self._table_of)
                self._table_of += tables
                virtual = list(range(first, first + len(tables)))
                slot_table += [virtual[0]] * emb.packed_slots() \
                    if emb.combiner is Combiner.SUM else virtual
            else:  # one slot per bag, each bag a virtual table over one of its store tables
                slot_table += range(len(self._table_of), len(self._table_of) + len(bags))
                self._table_of += [tables[b] for b in bags]
            w = self._width(name)
            first_cols += range(col, col + w)
            second_cols += range(col + w, col + 2 * w) if emb.combiner is Combiner.PRODUCT \
                else [-1] * w
            col += self._store_width(name)
        return specs, slot_table, first_cols, second_cols

    def _projection_layout(self, device: torch.device) -> None:
        """Where each feature's pre-projection columns sit: MLET groups, the permutation back
        to input order, shared CAFE groups' columns, gradient-norm features' columns."""
        order = self._order
        # Projection groups: (MLET width or d, first feature position, count) in store order.
        self._groups: list[tuple[int | None, int, int]] = []
        for pos, j in enumerate(order):
            k = self.embeddings[self.names[j]].mlet_dim
            if self._groups and self._groups[-1][0] == k:
                g = self._groups[-1]
                self._groups[-1] = (k, g[1], g[2] + 1)
            else:
                self._groups.append((k, pos, 1))
        inverse = [order.index(j) for j in range(len(order))]
        self._inverse = None if inverse == list(range(len(inverse))) else torch.tensor(
            inverse, dtype=torch.int64, device=device
        )
        # Shared CAFE members: their sparse column and pre-projection columns, in group order.
        start_of = {self.names[j]: sum(self._width(self.names[i]) for i in order[:pos])
                    for pos, j in enumerate(order)}
        self._hot_layout = [
            ([self.names.index(n) for n in group.members],
             torch.cat([torch.arange(start_of[n], start_of[n] + self._width(n))
                        for n in group.members]).to(device))
            for group in self.cafe_groups
        ]
        # Features whose vectors pass a per-id transform after the lookup (MPE), by class:
        # their pre-projection columns (None: every column, in order, so no gather).
        by_class: dict[type, list[str]] = {}
        for j in order:
            emb = self.embeddings[self.names[j]]
            if emb.has_post_lookup:
                by_class.setdefault(type(emb), []).append(self.names[j])
        total = sum(self._width(n) for n in self.names)
        self._post_lookup: list[tuple[type, list[str | None], torch.Tensor | None]] = []
        if len(by_class) == 1 and total == self._dim * len(self.names):
            # Every feature d wide: the class sees the whole [n, F, d] block, None for the
            # features of other methods (passed unchanged), and nothing is gathered.
            ((cls, members),) = by_class.items()
            slots = [self.names[j] if self.names[j] in members else None for j in order]
            self._post_lookup.append((cls, slots, None))
            by_class = {}
        for cls, members in by_class.items():
            cols = torch.cat([torch.arange(start_of[n], start_of[n] + self._width(n))
                              for n in members])
            whole = len(members) == len(self.names) and bool(
                (cols == torch.arange(total)).all())
            self._post_lookup.append((cls, members, None if whole else cols.to(device)))
        # Features that rank ids by gradient norms (CAFE): their pre-projection columns.
        self._norm_features = [
            (self.names[j], start_of[self.names[j]], self._width(self.names[j]))
            for j in order
            if self.embeddings[self.names[j]].wants_gradient_norms
        ]

    def _bind(self) -> None:
        views = self.store.weights()
        for name, emb in self.embeddings.items():
            tables = self._store_tables[name]
            emb.bind([views[t] for t in tables])
            emb.bind_row_states(lambda i, ts=tables: self.store.row_states(ts[i]))

    def _apply(self, fn: Any, recurse: bool = True) -> EmbeddingCollection:
        super()._apply(fn, recurse)
        if hasattr(self, "store"):
            self._bind()  # the store's tensors may have moved: methods read the new ones
        return self

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def fused(self) -> bool:
        """Whether the table update runs inside backward (FBGEMM's TBE)."""
        return self.store.fused

    def lookup_inputs(
        self, sparse: torch.Tensor, valid: torch.Tensor | None = None,
        compiled: bool | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """(indices, offsets) of the store call for a batch, and each adaptive feature's
        lookup key (`embeddings.batched_lookup.LookupLayout.lookup_inputs`)."""
        return self._lookup.lookup_inputs(sparse, valid, compiled)

    def forward(self, sparse: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        _check_ids(sparse, len(self.names))
        n = sparse.shape[0]
        indices, offsets, keys = self.lookup_inputs(sparse, valid)
        out = self.store(indices, offsets)
        if self._product:
            out = torch.cat([out, out.new_ones(n, 1)], dim=1)
            pre = out.index_select(1, self._first_cols) * out.index_select(1, self._second_cols)
        else:
            pre = out
        for group, (columns, cols) in zip(self.cafe_groups, self._hot_layout, strict=True):
            pre = self._add_shared_hot(pre, valid, group, columns, cols)
        for cls, members, cols in self._post_lookup:
            methods = [self.embeddings[name] if name else None for name in members]
            if cols is None:
                pre = cls.post_lookup_batch(methods, pre.view(n, len(members), -1)).reshape(n, -1)
            else:
                x = pre.index_select(1, cols).view(n, len(members), -1)
                y = cls.post_lookup_batch(methods, x).reshape(n, -1)
                pre = pre.index_copy(1, cols, y)
        if self._norm_features and self.training and pre.requires_grad:
            pre.register_hook(self._norm_hook(keys))
        # split, not slicing: the backward of a slice fills a zero tensor of the whole width.
        widths = [(k or self._dim) * count for k, _, count in self._groups]
        parts = pre.split(widths, dim=1) if len(widths) > 1 else [pre]
        blocks = []
        for (k, start, count), part in zip(self._groups, parts, strict=True):
            x = part.reshape(n, count, k or self._dim)
            if k is not None:
                projections = torch.stack([
                    self.embeddings[self.names[j]].projection
                    for j in self._order[start : start + count]
                ])
                x = torch.bmm(x.transpose(0, 1), projections).transpose(0, 1)
                members = [self.embeddings[self.names[j]]
                           for j in self._order[start : start + count]]
                if any(m.bias is not None for m in members):
                    # Low-rank (k < d) projections end in a bias; a group holds one k, and
                    # every k < d is low-rank, so the group's members all have one.
                    x = x + torch.stack([m.bias for m in members])[None]
            blocks.append(x)
        out = blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=1)
        if self._inverse is None:
            return out
        return out.index_select(1, self._inverse.to(out.device))

    def _add_shared_hot(self, pre: torch.Tensor, valid: torch.Tensor | None, group: nn.Module,
                        columns: list[int], cols: torch.Tensor) -> torch.Tensor:
        """A group of shared CAFE features' hot rows, read from its table and added to their
        columns (`columns`: theirs in the input, `cols`: in `pre`; each id reads a hot row
        or its hash rows, never both)."""
        hot = torch.stack([self.embeddings[n].last_hot for n in group.members], dim=1)
        if valid is not None:
            hot = hot.masked_fill(~valid[:, columns], -1)
        vectors = group(hot.to(pre.device))
        return pre.index_add(1, cols, vectors.reshape(pre.shape[0], -1))

    def _norm_hook(self, keys: dict[str, Any]) -> Any:
        features = self._norm_features

        columns = [(a, w) for _, a, w in features]

        def hook(grad: torch.Tensor) -> None:
            norms = column_norms(grad, columns)
            for i, (name, _, _) in enumerate(features):
                self.embeddings[name].observe_gradient_norms(norms[:, i], keys.get(name))

        return hook

    def step(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """After the backward pass: the table update where it was not fused, then every
        method's post-step hook (CAFE's sketch update and migrations)."""
        self.store.step()
        for group in self.cafe_groups:
            group.store.step()
        self.after_step(optimizer)

    def after_step(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """The methods' post-step hooks alone (the store's update is `step`'s)."""
        for emb in self.embeddings.values():
            emb.after_step(optimizer)
        for group in self.cafe_groups:
            group.after_step()

    def schedule(self, total_steps: int) -> None:
        """Tell every method the run's optimizer steps (`CompressedEmbedding.schedule`)."""
        for emb in self.embeddings.values():
            emb.schedule(total_steps)

    def regularization(self) -> torch.Tensor | None:
        """The sum of the methods' loss terms (MPE's bit-width penalty); None if none has one."""
        terms = [t for emb in self.embeddings.values() if (t := emb.regularization()) is not None]
        return torch.stack(terms).sum() if terms else None

    def dense_parameters(self) -> list[nn.Parameter]:
        """Everything else that trains (MLET projections): for the dense optimizer."""
        stores = [self.store, *(group.store for group in self.cafe_groups)]
        store = {id(p) for st in stores for p in st.parameters()}
        return [p for p in self.parameters() if id(p) not in store and p.requires_grad]

    def training_bytes(self) -> int:
        return sum(emb.training_bytes() for emb in self.embeddings.values())

    def serving_bytes(self, fmt: str = "fp32") -> int:
        return sum(emb.serving_bytes(fmt) for emb in self.embeddings.values())

    @torch.no_grad()
    def collapse(self) -> ServingCollection:
        return ServingCollection(
            self.names, [emb.collapse() for emb in self.embeddings.values()], self.dim
        )

    def method(self, name: str) -> CompressedEmbedding:
        return self.embeddings[name]
