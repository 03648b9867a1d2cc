"""`python -m jobs.train --config deploy/configs/<name>.yaml`: train on Ray Train, then export.

The driver reads the data's statistics, sizes every feature's compressed method, plans
where each feature lives across the workers (printed), and starts a `TorchTrainer` whose
workers run `jobs.train_loop.train_loop_per_worker`. Running again with the same run name
resumes from the latest checkpoint.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

from data_pipeline.shards import read_manifest
from data_pipeline.stats import FeatureStats as DataFeatureStats
from data_pipeline.stats import load_feature_stats
from embeddings import budget
from embeddings.allocation import BudgetUnreachable
from embeddings.collection import CollectionConfig
from embeddings.methods.base import FeatureStats
from embeddings.sharding.planner import FeatureSize, ShardingPlan, plan_sharding
from jobs.config import ConfigError, load_config
from jobs.ray_session import connect_or_start
from jobs.train_config import TrainConfig
from jobs.train_loop import RunSpec, train_loop_per_worker

C = TypeVar("C", bound=TrainConfig)

# Methods whose mapper adapts while training (their copies would drift apart if replicated).
ADAPTIVE_METHODS = frozenset({"cafe"})
BAND_MIN_VALUES = 1000


class LazyFeatureStats(Mapping[str, FeatureStats]):
    """One feature's statistics at a time, read when first asked for."""

    def __init__(self, stats: DataFeatureStats) -> None:
        self._stats, self._cache = stats, {}
        self._names = list(stats.features)

    def __getitem__(self, name: str) -> FeatureStats:
        if name not in self._names:
            raise KeyError(name)
        if name not in self._cache:
            self._cache[name] = FeatureStats(*self._stats.counts(name))
        return self._cache[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def cardinalities_of(config: TrainConfig) -> tuple[list[str], list[int]]:
    """Feature names and distinct values per feature, from the data's statistics."""
    stats = load_feature_stats(config.data.path)
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
    # Validated again here, on the driver, so that paths set by model_copy become absolute.
    config = type(config).model_validate(config.model_dump())
    read_manifest(config.data.path)  # a clear error when the data folder is not finished
    names, cards = cardinalities_of(config)
    collection: CollectionConfig = config.collection(cards)
    names = collection.feature_names
    sizes = collection.sizes()
    stats = load_feature_stats(config.data.path)
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
    features = []
    serving = 0
    for name in names:
        nbytes = methods[name].planned_bytes(sizes[name], collection.dim,
                                             feature_stats.get(name))
        serving += nbytes.serving
        features.append(FeatureSize(name=name, bytes=nbytes.training,
                                    stateless=methods[name].method not in ADAPTIVE_METHODS))
    workers = max(1, config.scaling.plan_for_workers or config.scaling.num_workers)
    plan: ShardingPlan = plan_sharding(features, workers, config.scaling.worker_budget_bytes)
    wanted = config.schedule.band_features
    if wanted is None:
        band_columns = [j for j, n in enumerate(names) if sizes[n] >= BAND_MIN_VALUES]
    else:
        unknown = sorted(set(wanted) - set(names))
        if unknown:
            raise ConfigError(f"schedule.band_features: unknown features {unknown}")
        band_columns = [names.index(n) for n in wanted]
    if verbose:
        if allocated is not None:
            print(f"[train] one budget over the features ({allocated.rule} allocation):")
            print("\n".join(allocated.describe(sizes, collection.dim)))
        else:
            print("[train] embedding methods per feature:")
            for name in names:
                shown = methods[name].model_dump(exclude_defaults=True)
                print(f"  {name:<4} n={sizes[name]:>10,}  {shown}")
        uncompressed = sum(budget.uncompressed_bytes(n, collection.dim) for n in sizes.values())
        print(realised_ratio(ratio, uncompressed, serving))
        print(plan.describe(), flush=True)
    return RunSpec(
        config=config.model_dump(mode="json"),
        names=names,
        cardinalities=[sizes[n] for n in names],
        methods={n: methods[n].model_dump(mode="json") for n in names},
        plan=plan.model_dump(mode="json"),
        band_columns=band_columns,
        ratio=ratio,
    )


def ensure_ray(num_cpus: int | None = None) -> None:
    """Join the cluster in RAY_ADDRESS or start a local one (see `jobs.ray_session`)."""
    connect_or_start(num_cpus)

def run(
    config: TrainConfig, audit: bool = False, verbose: bool = True,
    callbacks: list[Any] | None = None,
) -> Any:
    """Train as configured; returns the Ray Train result (metrics of rank 0, checkpoint).

    `callbacks` are Ray Train user callbacks (a Tune trial passes its TuneReportCallback).
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    spec = plan_run(config, verbose)
    loop_config = {"spec": spec.__dict__, "audit": audit}
    scaling = config.scaling
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=scaling.num_workers,
            use_gpu=scaling.use_gpu,
            resources_per_worker={"CPU": scaling.cpus_per_worker,
                                  **({"GPU": 1} if scaling.use_gpu else {})},
        ),
        run_config=ray.train.RunConfig(
            name=config.run.name,
            storage_path=str(config.run.storage_path.resolve()),
            failure_config=ray.train.FailureConfig(max_failures=config.run.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            callbacks=callbacks,
        ),
    )
    return trainer.fit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.train",
        description="Train a CTR model with compressed embeddings on Ray Train, evaluate it "
        "(AUC overall and per id-frequency band), checkpoint it, and export the collapsed "
        "serving model. Running again with the same run.name resumes from the latest "
        "checkpoint.",
    )
    parser.add_argument("--config", required=True, type=Path,
                        help="YAML training config (see deploy/configs/)")
    add_override_arguments(parser)
    parser.add_argument("--export", type=Path, help="override export.out")
    return parser


def add_override_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags `overrides` reads (and --num-cpus), shared by the train and tune jobs."""
    parser.add_argument("--data", type=Path, help="override data.path")
    parser.add_argument("--name", help="override run.name (the run or experiment folder)")
    parser.add_argument("--storage-path", type=Path, help="override run.storage_path")
    parser.add_argument("--num-cpus", type=int, help="CPUs of a local Ray started by this job")


def overrides(config: TrainConfig, args: argparse.Namespace) -> dict[str, Any]:
    """Section updates from the --data, --name and --storage-path flags (train and tune)."""
    update: dict[str, Any] = {}
    if args.data:
        update["data"] = config.data.model_copy(update={"path": args.data})
    run_update = {k: v for k, v in (("name", args.name), ("storage_path", args.storage_path)) if v}
    if run_update:
        update["run"] = config.run.model_copy(update=run_update)
    return update


def load(args: argparse.Namespace) -> TrainConfig:
    config = load_config(args.config, TrainConfig)
    update = overrides(config, args)
    if args.export:
        update["export"] = config.export.model_copy(update={"out": args.export})
    return config.model_copy(update=update)


def checked_config(
    load_fn: Callable[[argparse.Namespace], C], args: argparse.Namespace
) -> C | None:
    """The job's config, or None after printing why it cannot run (a bad field, no data)."""
    try:
        config = load_fn(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return None
    if not (Path(config.data.path) / "manifest.json").is_file():
        print(f"error: data.path {config.data.path} holds no finished dataset (manifest.json); "
              "run `python -m jobs.synth` or `python -m jobs.prepare` first", file=sys.stderr)
        return None
    return config


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = checked_config(load, args)
    if config is None:
        return 2
    ensure_ray(args.num_cpus)
    result = run(config)
    metrics = result.metrics or {}
    print(f"[train] validation AUC {metrics.get('validation_auc', float('nan')):.4f}  "
          f"test AUC {metrics.get('test_auc', float('nan')):.4f}  "
          f"serving bytes {metrics.get('serving_bytes', 0):,}")
    print(f"[train] model: {config.export_dir}  run: {config.run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
