"""What the driver decides once for a training run: every feature's method at its size, and
where each feature lives across the workers (printed). The result, `RunSpec`, is what every
worker builds from."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from data_pipeline.row_signatures import read_signatures, sign_dataset_once
from data_pipeline.shards import read_manifest
from data_pipeline.stats import DatasetStats, load_feature_stats
from embeddings import budget
from embeddings.allocation import Allocated
from embeddings.budget import BudgetUnreachable
from embeddings.collection import CollectionConfig
from embeddings.methods.base import (
    FeatureStats,
    MethodBytes,
    MethodConfig,
    TrainedFeature,
    TwoStageConfig,
)
from embeddings.sharding.planner import FeatureSize, ShardingPlan, plan_sharding
from training.config import ConfigError, TrainConfig

# Methods whose mapper adapts while training (their copies would drift apart if replicated).
ADAPTIVE_METHODS = frozenset({"cafe"})
BAND_MIN_VALUES = 1000


@dataclass(frozen=True)
class RunSpec:
    """What the driver decides once and every worker builds from; it travels to the workers
    pickled, typed as it is.

    Args:
        config: the validated training config.
        names: feature names, in the batch's column order.
        cardinalities: distinct values of each feature.
        methods: each feature's method config at its final size.
        plan: where each feature (or each part of a split one) lives.
        band_columns: columns whose id frequency decides a row's band for per-band AUC.
        ratio: the requested compression ratio (None when each feature sizes itself).
    """

    config: TrainConfig
    names: list[str]
    cardinalities: list[int]
    methods: dict[str, MethodConfig]
    plan: ShardingPlan
    band_columns: list[int] = field(default_factory=list)
    ratio: float | None = None

    def method(self, name: str) -> MethodConfig:
        return self.methods[name]


def feature_stats_of(stats: DatasetStats, name: str) -> FeatureStats:
    """One feature's statistics for the methods: values and counts, with the SCMA
    signatures `data_pipeline.row_signatures` wrote beside them where there are any."""
    values, counts = stats.counts(name)
    signed = [read_signatures(stats.directory, name, sets) for sets in ("rows", "contexts")]
    if signed[0] is None or not np.array_equal(signed[0][0], values[: len(signed[0][0])]):
        return FeatureStats(values, counts)  # none, or stale (statistics rewritten since)
    return FeatureStats(values, counts, signed[0][1], None if signed[1] is None else signed[1][1])


class LazyFeatureStats(Mapping[str, FeatureStats]):
    """One feature's statistics at a time, read when first asked for."""

    def __init__(self, stats: DatasetStats) -> None:
        self._stats: DatasetStats = stats
        self._cache: dict[str, FeatureStats] = {}
        self._names = list(stats.features)

    def __getitem__(self, name: str) -> FeatureStats:
        if name not in self._names:
            raise KeyError(name)
        if name not in self._cache:
            self._cache[name] = feature_stats_of(self._stats, name)
        return self._cache[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def cardinalities_of(stats: DatasetStats) -> tuple[list[str], list[int]]:
    """Feature names and distinct values per feature, from the data's statistics."""
    names = list(stats.features)
    return names, [max(1, int(stats.num_distinct(n))) for n in names]


def realised_ratio(requested: float | None, uncompressed_bytes: int, serving_bytes: int) -> str:
    """One line: the serving model's embedding bytes and how much smaller than uncompressed
    fp32 they are, with a warning when that falls short of the requested ratio (QR cannot go
    below 2·sqrt(n) rows; CAFE's hot table and learned hashing's id map cost bytes too; small
    tables round up), so a user comparing methods at one nominal ratio sees the real sizes."""
    got = uncompressed_bytes / max(1, serving_bytes)
    line = f"[train] serving embeddings: {serving_bytes:,} bytes, {got:,.1f}x smaller than fp32"
    if requested is not None:
        line += f" (requested {requested:g}x)"
        if got < requested / 1.2:
            line += ("; warning: short of the requested ratio (QR's floor of 2*sqrt(n) rows, "
                     "CAFE's hot table, learned hashing's id map, small tables rounded up); "
                     "compare methods by the realised bytes")
    return line


def plan_run(config: TrainConfig, verbose: bool = True) -> RunSpec:
    """Everything decided once on the driver: method sizes and the sharding plan."""
    read_manifest(config.data.path)  # a clear error when the data folder is not finished
    stats = load_feature_stats(config.data.path)
    collection = config.collection(cardinalities_of(stats)[1])
    names, sizes = collection.feature_names, collection.sizes()
    ensure_signatures(config.data.path, collection)
    # Planned bytes are the built ones only with the statistics the workers build from
    # (vocabularies of whole features, learned hashing's id map): read where needed.
    feature_stats = LazyFeatureStats(stats)
    try:
        allocated = collection.allocate(feature_stats)
    except BudgetUnreachable as e:
        raise ConfigError(f"embeddings.{e}") from e
    methods = allocated.configs if allocated else collection.resolve()[0]
    ratio = None if allocated is None else (
        collection.ratio or collection.uncompressed_bytes() / allocated.budget_bytes)
    trained = None
    if config.from_model is not None:
        from training.from_model import check_from_model, load_trained

        check_from_model(config, names)
        trained = load_trained(config.from_model, feature_stats)[1]
    features, serving = [], 0
    unreachable: list[tuple[ConfigError, BudgetUnreachable]] = []
    for name in names:
        try:
            nbytes = planned_bytes(methods[name], sizes[name], collection.dim,
                                   feature_stats.get(name), trained, name)
        except ConfigError as e:
            if not isinstance(e.__cause__, BudgetUnreachable):
                raise
            unreachable.append((e, e.__cause__))  # a two-stage method's ratio (MEC)
            continue
        serving += nbytes.serving
        features.append(FeatureSize(name=name, bytes=nbytes.training,
                                    stateless=methods[name].method not in ADAPTIVE_METHODS))
    if unreachable:
        _refuse_unreachable(unreachable, serving, uncompressed=collection.uncompressed_bytes())
    workers = max(1, config.scaling.plan_for_workers or config.scaling.num_workers)
    plan = plan_sharding(features, workers, config.scaling.worker_budget_bytes)
    bands = band_columns(config, names, sizes)
    if verbose:
        _print_plan(collection, allocated, methods, ratio, serving)
        print(plan.describe(), flush=True)
    return RunSpec(config=config, names=names, cardinalities=[sizes[n] for n in names],
                   methods={n: methods[n] for n in names}, plan=plan,
                   band_columns=bands, ratio=ratio)


def _refuse_unreachable(unreachable: list[tuple[ConfigError, BudgetUnreachable]],
                        others: int, uncompressed: int) -> None:
    """One refusal for the features whose method cannot reach the ratio, carrying what the
    model's smallest form would serve (the other features as planned, these at their
    smallest codes: a lower bound, their vocabularies uncounted) so a search records the
    point as skipped instead of failing."""
    first, _ = unreachable[0]
    smallest = others + sum(cause.smallest_bytes for _, cause in unreachable)
    more = f" (and {len(unreachable) - 1} more features)" if len(unreachable) > 1 else ""
    cause = BudgetUnreachable(str(first) + more, smallest, uncompressed / max(1, smallest))
    raise ConfigError(cause.args[0]) from cause


def ensure_signatures(root: str | Path, collection: CollectionConfig) -> None:
    """SCMA addresses its frequent values by minhash signatures of their training rows: a
    pass over the training split writes them beside the statistics the first time a run
    asks for SCMA (workers and trials then read them with the statistics)."""
    methods = [collection.method, *collection.features.values()]
    if any(m.method == "scma" for m in methods):
        sign_dataset_once(root)


def planned_bytes(method: MethodConfig, num_embeddings: int, dim: int,
                  stats: FeatureStats | None, trained: Mapping[str, TrainedFeature] | None,
                  name: str | None = None, fmt: str = "fp32") -> MethodBytes:
    """Exact bytes of one feature's method; two-stage methods from their trained feature."""
    if isinstance(method, TwoStageConfig):
        from training.from_model import planned_two_stage_bytes

        feature = None if trained is None else trained.get(name) if name else None
        return planned_two_stage_bytes(method, num_embeddings, dim, feature, fmt)
    return method.planned_bytes(num_embeddings, dim, stats, fmt)


def band_columns(config: TrainConfig, names: list[str], sizes: dict[str, int]) -> list[int]:
    """Columns that decide a row's frequency band: `schedule.band_features`, or every
    feature with at least BAND_MIN_VALUES values."""
    wanted = config.schedule.band_features
    if wanted is None:
        return [j for j, n in enumerate(names) if sizes[n] >= BAND_MIN_VALUES]
    unknown = sorted(set(wanted) - set(names))
    if unknown:
        raise ConfigError(f"schedule.band_features: unknown features {unknown}")
    return [names.index(n) for n in wanted]


def _print_plan(collection: CollectionConfig, allocated: Allocated | None,
                methods: dict[str, MethodConfig], ratio: float | None, serving: int) -> None:
    sizes = collection.sizes()
    if allocated is not None:
        print(f"[train] one budget over the features ({allocated.rule} allocation):")
        print("\n".join(allocated.describe(sizes, collection.dim)))
    else:
        print("[train] embedding methods per feature:")
        for name in collection.feature_names:
            shown = methods[name].model_dump(exclude_defaults=True)
            print(f"  {name:<4} n={sizes[name]:>10,}  {shown}")
    uncompressed = sum(budget.uncompressed_bytes(n, collection.dim) for n in sizes.values())
    print(realised_ratio(ratio, uncompressed, serving))
