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
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator
from torch import nn

import embeddings.methods as _methods_package
from embeddings import budget
from embeddings.methods.base import (
    METHODS,
    CompressedEmbedding,
    FeatureStats,
    MethodBytes,
    MethodConfig,
    ServingEmbedding,
)
from embeddings.methods.full import FullConfig
from embeddings.methods.quantize import MixedPrecisionReport, quantize_mixed


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
    for name in sorted(set(METHODS) - {"full", "hash", "qr"}):
        out[name] = {"method": name}
        out[f"mlet({name})"] = {"method": name, "mlet_dim": mlet_dim}
    return out


class CollectionConfig(BaseModel):
    """The embedding collection: which method each categorical feature gets, and how big.

    Sizing follows one rule. With a global `ratio` (or a `budget_bytes`, from which the
    ratio is solved), every feature is sized by that ratio: features with at most
    2000 / ratio values stay uncompressed, the others get their method (from `features`,
    else `method`) at that ratio. Without one, every feature's config is used as written
    and must size itself (e.g. `{"method": "hash", "ratio": 10}`).

    Args:
        dim: embedding width d of every feature.
        cardinalities: distinct values of each feature, in feature order (sizes the tables).
        names: feature names; default C1..C<number of cardinalities> (Criteo's).
        ratio: one compression ratio for the whole collection.
        budget_bytes: one byte budget for the whole collection instead of a ratio; the
            smallest ratio that fits is used.
        budget_memory: which bytes `budget_bytes` counts: "serving" (the collapsed fp32
            model: tables and mapper state) or "training" (parameters, buffers and adaptive
            state such as sketches; optimizer state excluded).
        features: a method config per feature name, overriding `method` for that feature.
        method: the method of every feature not in `features`.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    dim: int = Field(16, ge=1)
    cardinalities: list[Annotated[int, Field(ge=1)]] = Field(min_length=1)
    names: list[str] | None = None
    ratio: float | None = Field(None, ge=1)
    budget_bytes: int | None = Field(None, gt=0)
    budget_memory: Literal["serving", "training"] = "serving"
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

    def at_ratio(self, ratio: float) -> dict[str, MethodConfig]:
        """Every feature's method config under the global sizing rule at `ratio`."""
        out: dict[str, MethodConfig] = {}
        for name, n in self.sizes().items():
            if budget.stays_uncompressed(n, ratio):
                out[name] = FullConfig()
            else:
                out[name] = self.features.get(name, self.method).at_ratio(ratio)
        return out

    def resolve(
        self, stats: Mapping[str, FeatureStats] | None = None
    ) -> tuple[dict[str, MethodConfig], float | None]:
        """Each feature's final method config, and the global ratio used (None if none).

        A byte budget is solved on exact byte counts (meta-device builds, so nothing is
        allocated), `stats` included because vocabularies count.
        """
        if self.ratio is not None:
            return self.at_ratio(self.ratio), self.ratio
        if self.budget_bytes is None:
            return {n: self.features.get(n, self.method) for n in self.feature_names}, None
        sizes = self.sizes()
        cache: dict[tuple[str, str], MethodBytes] = {}

        def bytes_at(ratio: float) -> int:
            total = 0
            for name, config in self.at_ratio(ratio).items():
                key = (name, config.model_dump_json())
                if key not in cache:
                    feature_stats = stats.get(name) if stats else None
                    cache[key] = config.planned_bytes(sizes[name], self.dim, feature_stats)
                total += getattr(cache[key], self.budget_memory)
            return total

        ratio = budget.ratio_for_budget(bytes_at, self.budget_bytes)
        return self.at_ratio(ratio), ratio


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


def _check_ids(sparse: torch.Tensor, features: int) -> None:
    if sparse.dim() != 2 or sparse.shape[1] != features:
        raise ValueError(f"expected sparse ids [n, {features}], got {list(sparse.shape)}")


@dataclass
class FeaturePlan:
    """One feature's line of the collection plan."""

    name: str
    num_embeddings: int
    dim: int
    method: str
    table_rows: list[int]
    training_bytes: int
    serving_bytes: int

    @property
    def ratio(self) -> float:
        """Bytes of the uncompressed fp32 table over the serving bytes (mapper included)."""
        return budget.uncompressed_bytes(self.num_embeddings, self.dim) / self.serving_bytes


class EmbeddingCollection(nn.Module):
    """Every categorical feature's compressed method: forward(sparse [n, F]) -> [n, F, d].

    Args:
        config: the collection config.
        stats: optional frequency statistics per feature name (vocabularies for uncompressed
            features, access frequencies for learned hashing).
    """

    def __init__(
        self, config: CollectionConfig, stats: Mapping[str, FeatureStats] | None = None
    ) -> None:
        super().__init__()
        self.config = config
        self.names = config.feature_names
        self.method_configs, self.ratio = config.resolve(stats)
        sizes = config.sizes()
        self.embeddings = nn.ModuleDict(
            {
                name: self.method_configs[name].build(
                    sizes[name], config.dim, stats.get(name) if stats else None
                )
                for name in self.names
            }
        )

    @property
    def dim(self) -> int:
        return self.config.dim

    def forward(self, sparse: torch.Tensor) -> torch.Tensor:
        _check_ids(sparse, len(self.names))
        # One transpose, so each feature reads a contiguous column (searchsorted, hashing).
        columns = sparse.t().contiguous()
        vectors = [emb(columns[j]) for j, emb in enumerate(self.embeddings.values())]
        return torch.stack(vectors, dim=1)

    def after_step(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Forward the post-step hook to every method (CAFE's sketch update and migration)."""
        for emb in self.embeddings.values():
            emb.after_step(optimizer)

    def table_parameters(self) -> list[nn.Parameter]:
        """The embedding tables (sparse gradients when their method is sparse)."""
        return [t for emb in self.embeddings.values() for t in emb.tables]

    def dense_parameters(self) -> list[nn.Parameter]:
        """Everything else that trains (MLET projections, any method's dense parameters)."""
        tables = {id(t) for t in self.table_parameters()}
        return [p for p in self.parameters() if id(p) not in tables]

    def training_bytes(self) -> int:
        return sum(emb.training_bytes() for emb in self.embeddings.values())

    def serving_bytes(self, fmt: str = "fp32") -> int:
        return sum(emb.serving_bytes(fmt) for emb in self.embeddings.values())

    def plan(self) -> list[FeaturePlan]:
        sizes = self.config.sizes()
        return [
            FeaturePlan(
                name,
                sizes[name],
                self.dim,
                self.method_configs[name].method
                + (f"+mlet{emb.mlet_dim}" if emb.mlet_dim else ""),
                [t.shape[0] for t in emb.tables],
                emb.training_bytes(),
                emb.serving_bytes(),
            )
            for name, emb in self.embeddings.items()
        ]

    def format_plan(self) -> str:
        """The plan as a table: feature, values, method, rows, bytes, ratio."""
        lines = [f"{'feature':<8} {'values':>11} {'method':<16} {'rows':>22} "
                 f"{'train B':>13} {'serve B':>13} {'ratio':>8}"]
        for p in self.plan():
            rows = "+".join(str(r) for r in p.table_rows)
            lines.append(
                f"{p.name:<8} {p.num_embeddings:>11} {p.method:<16} {rows:>22} "
                f"{p.training_bytes:>13} {p.serving_bytes:>13} {p.ratio:>8.1f}"
            )
        lines.append(
            f"{'total':<8} {sum(self.config.cardinalities):>11} {'':<16} {'':>22} "
            f"{self.training_bytes():>13} {self.serving_bytes():>13}"
        )
        return "\n".join(lines)

    @torch.no_grad()
    def collapse(self) -> ServingCollection:
        return ServingCollection(
            self.names, [emb.collapse() for emb in self.embeddings.values()], self.dim
        )

    def method(self, name: str) -> CompressedEmbedding:
        return self.embeddings[name]


class ServingCollection(nn.Module):
    """The serving form of a collection: one ServingEmbedding per feature, no training state."""

    def __init__(self, names: list[str], embeddings: list[ServingEmbedding], dim: int) -> None:
        super().__init__()
        self.names = list(names)
        self.dim = dim
        self.embeddings = nn.ModuleDict(dict(zip(self.names, embeddings, strict=True)))

    @torch.no_grad()
    def forward(self, sparse: torch.Tensor) -> torch.Tensor:
        _check_ids(sparse, len(self.names))
        # One transpose, so each feature reads a contiguous column (searchsorted, hashing).
        columns = sparse.t().contiguous()
        vectors = [emb(columns[j]) for j, emb in enumerate(self.embeddings.values())]
        return torch.stack(vectors, dim=1)

    def serving_bytes(self) -> int:
        return sum(emb.serving_bytes() for emb in self.embeddings.values())

    def quantize(self, fmt: str | Mapping[str, str]) -> ServingCollection:
        """Every table stored in `fmt` (one format, or one per feature name)."""
        fmts = fmt if isinstance(fmt, Mapping) else dict.fromkeys(self.names, fmt)
        return ServingCollection(
            self.names,
            [emb.quantize(fmts.get(name, "fp32")) for name, emb in self.embeddings.items()],
            self.dim,
        )

    def quantize_mixed(
        self, stats: Mapping[str, FeatureStats], budget_bytes: int
    ) -> tuple[ServingCollection, MixedPrecisionReport]:
        """Per-row formats from access frequencies so the whole collection fits `budget_bytes`.

        Rows of features without statistics count as never read (they stay at the cheapest
        format).
        """
        groups, counts = [], []
        for name, emb in self.embeddings.items():
            tables = [t.dequantize() for t in emb.tables]
            groups.append(tables)
            if name in stats:
                counts.append(emb.row_counts(stats[name].values, stats[name].counts))
            else:
                counts.append([torch.zeros(t.shape[0], dtype=torch.float64) for t in tables])
        fixed = sum(emb.mapper.state_bytes() for emb in self.embeddings.values())
        tables, report = quantize_mixed(groups, counts, budget_bytes, fixed_bytes=fixed)
        out = [
            ServingEmbedding(emb.mapper, ts, emb.combiner)
            for emb, ts in zip(self.embeddings.values(), tables, strict=True)
        ]
        return ServingCollection(self.names, out, self.dim), report
