"""Where each feature's embedding lives across training workers, balanced by bytes.

A feature is owned whole by one worker, split over several owners by `hash(id) mod shards`
when it is too big for one, or replicated on every worker when it is tiny and stateless.
The router (`embeddings.sharding.router`) executes the plan; the train job prints it.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import Enum

from pydantic import BaseModel, ConfigDict, Field, model_validator

from embeddings.budget import format_bytes

# The id → shard hash lives with the one hash (serving's split features read it too); its
# names stay importable from here.
from idhash.splitmix import SHARD_HASH_SEED as SHARD_HASH_SEED
from idhash.splitmix import shard_of as shard_of

# Stateless tables below this many training bytes are copied to every worker by default: a
# copy costs less than sending their ids and vectors across workers.
DEFAULT_REPLICATE_BELOW_BYTES = 1 << 20


class Placement(str, Enum):
    """Where a feature's embedding lives."""

    OWNED = "owned"  # one worker holds the whole method instance
    SPLIT = "split"  # `shard_of(id)` picks one of several owners, each a full instance
    REPLICATED = "replicated"  # every worker holds a copy; gradients are all-reduced


class FeatureSize(BaseModel):
    """What the planner needs to know about one feature.

    Args:
        name: the feature's name (C1..C26), shown in the plan.
        bytes: training bytes of the whole feature's method (parameters and state while
            training, e.g. `CompressedEmbedding.training_bytes()` or the budget function).
        stateless: the method's mapper holds no adaptive state (hash, QR, MLET, a frozen
            learned mapping), so identical copies on every worker stay identical.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    bytes: int = Field(ge=0)
    stateless: bool = False


class FeaturePlacement(BaseModel):
    """The plan for one feature.

    Args:
        name: the feature's name.
        placement: owned, split or replicated.
        bytes: training bytes of the whole feature.
        owners: the owning worker of each shard (one entry when owned, several when split,
            none when replicated).
        shard_bytes: bytes of each shard (one entry when owned or replicated). A split
            feature's parts are sized by their share of the id space: bytes / shards.
        groups: the worker each shard was first planned on (None: `owners`). Shards that
            share a hot table (CAFE's shared mode) share it with the shards of their group,
            so a relocated plan, which keeps the groups, trains the same model.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    placement: Placement
    bytes: int = Field(ge=0)
    owners: list[int]
    shard_bytes: list[int]
    groups: list[int] | None = None

    def group_of(self, shard: int) -> int:
        """The hot-table group of a shard (see `groups`)."""
        return (self.groups or self.owners or [0])[shard]

    @model_validator(mode="after")
    def _check(self) -> FeaturePlacement:
        if self.placement is Placement.REPLICATED:
            if self.owners or len(self.shard_bytes) != 1:
                raise ValueError(f"{self.name}: a replicated feature has no owners, one size")
        elif len(self.owners) != len(self.shard_bytes) or not self.owners:
            raise ValueError(f"{self.name}: one owner and one size per shard")
        elif (self.placement is Placement.OWNED) != (len(self.owners) == 1):
            raise ValueError(f"{self.name}: owned means one shard, split means several")
        return self

    def bytes_on(self, num_workers: int) -> list[int]:
        """Bytes of this feature on each of `num_workers` workers.

        Args:
            num_workers: the world size.
        """
        if self.placement is Placement.REPLICATED:
            return [self.bytes] * num_workers
        per = [0] * num_workers
        for owner, size in zip(self.owners, self.shard_bytes, strict=True):
            per[owner] += size
        return per

    @property
    def num_shards(self) -> int:
        """Method instances that make up the feature (replicated: one, copied everywhere)."""
        return len(self.shard_bytes)


class ShardingPlan(BaseModel):
    """Placement of every feature over `num_workers` workers; the same on every worker.

    Args:
        num_workers: the world size the plan is for.
        features: one placement per feature, in the order of the sparse input's columns.
        worker_budget_bytes: the per-worker budget the plan was made under, if any.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    num_workers: int = Field(ge=1)
    features: list[FeaturePlacement]
    worker_budget_bytes: int | None = None

    @model_validator(mode="after")
    def _check_owners(self) -> ShardingPlan:
        names = [f.name for f in self.features]
        if len(set(names)) != len(names):
            raise ValueError(f"feature names must be unique: {names}")
        for f in self.features:
            bad = [o for o in f.owners if not 0 <= o < self.num_workers]
            if bad:
                raise ValueError(f"{f.name}: owners {bad} outside 0..{self.num_workers - 1}")
        return self

    def worker_bytes(self) -> list[int]:
        """Training bytes each worker holds (replicated features count on every worker)."""
        loads = [0] * self.num_workers
        for f in self.features:
            loads = [a + b for a, b in zip(loads, f.bytes_on(self.num_workers), strict=True)]
        return loads

    def shards_on(self, rank: int) -> list[tuple[int, int]]:
        """(feature index, shard index) of every non-replicated shard `rank` owns, in order.

        Args:
            rank: a worker's rank.
        """
        return [
            (i, s)
            for i, f in enumerate(self.features)
            for s, owner in enumerate(f.owners)
            if owner == rank
        ]

    def relocate(self, num_workers: int) -> ShardingPlan:
        """The same features, placements and shard counts, owners rebalanced on `num_workers`.

        The shard count is part of the model (a split feature is several method instances),
        so a run on a different number of workers that must train the *same* model, e.g. a
        one-worker reference for an N-worker run, uses the relocated plan. Several shards of
        one feature may then share a worker.

        Args:
            num_workers: the new world size.
        """
        owners = _assign(
            [None if f.placement is Placement.REPLICATED else f.shard_bytes for f in self.features],
            num_workers,
        )
        return ShardingPlan(
            num_workers=num_workers,
            features=[
                f.model_copy(update={"owners": o, "groups": f.groups or f.owners or None})
                for f, o in zip(self.features, owners, strict=True)
            ],
        )

    def describe(self) -> str:
        """A table of the plan (feature, placement, shards, bytes per worker) for the job log."""
        budget = (
            f", budget {format_bytes(self.worker_budget_bytes)} per worker"
            if self.worker_budget_bytes is not None
            else ""
        )
        title = (
            f"Sharding plan: {len(self.features)} features over {self.num_workers} "
            f"worker{'s' if self.num_workers > 1 else ''}{budget}"
        )
        wide = self.num_workers <= _MAX_WORKER_COLUMNS
        header = ["feature", "placement", "shards", "total"]
        header += [f"worker {r}" for r in range(self.num_workers)] if wide else ["owners"]
        rows = [header]
        for f in self.features:
            row = [f.name, f.placement.value, str(f.num_shards), format_bytes(f.bytes)]
            if wide:
                held = (
                    range(self.num_workers)
                    if f.placement is Placement.REPLICATED
                    else set(f.owners)
                )
                per = f.bytes_on(self.num_workers)
                row += [format_bytes(b) if r in held else "-" for r, b in enumerate(per)]
            else:
                row.append(
                    "all"
                    if f.placement is Placement.REPLICATED
                    else ",".join(str(r) for r in f.owners)
                )
            rows.append(row)
        loads = self.worker_bytes()
        total_row = ["total", "", "", format_bytes(sum(f.bytes for f in self.features))]
        total_row += [format_bytes(b) for b in loads] if wide else [""]
        rows.append(total_row)
        widths = [max(len(r[c]) for r in rows) for c in range(len(header))]
        # Names and placements read left-aligned, numbers right-aligned.
        lines = [
            "  ".join(
                cell.ljust(w) if c < 2 else cell.rjust(w)
                for c, (cell, w) in enumerate(zip(row, widths, strict=True))
            ).rstrip()
            for row in rows
        ]
        lines.insert(1, "-" * len(lines[0]))
        lines.insert(len(lines) - 1, "-" * len(lines[0]))
        out = [title, *lines]
        if not wide:
            out.append(
                "worker bytes: min "
                f"{format_bytes(min(loads))}, max {format_bytes(max(loads))}, "
                + ", ".join(f"{r}: {format_bytes(b)}" for r, b in enumerate(loads))
            )
        return "\n".join(out)


_MAX_WORKER_COLUMNS = 8


def plan_sharding(
    features: Sequence[FeatureSize],
    num_workers: int,
    worker_budget_bytes: int | None = None,
    replicate_below_bytes: int = DEFAULT_REPLICATE_BELOW_BYTES,
    balance_tolerance: float = 0.1,
) -> ShardingPlan:
    """Place every feature on the workers, balancing bytes; deterministic for equal inputs.

    A stateless feature under `replicate_below_bytes` is replicated. Any other feature is
    split into ceil(bytes / limit) shards when it exceeds the limit, where the limit is the
    per-worker budget left after the replicated features, or, without a budget, the fair
    share (non-replicated bytes / workers) so that no single feature unbalances the plan.
    Shards are then placed greedily, largest first, each on the least loaded worker that
    does not already hold a shard of the same feature (ties go to the lowest rank). While
    that overflows the budget or leaves a worker more than `balance_tolerance` above the
    mean, the features with the largest shards are split once more and the placement is
    redone (finer parts pack better), until no feature can take more shards than there are
    workers; the plan with the smallest maximum load wins.

    Args:
        features: the features in the order of the sparse input's columns.
        num_workers: the world size.
        worker_budget_bytes: most training bytes one worker may hold; None = no limit.
        replicate_below_bytes: size under which a stateless feature is replicated
            (0 turns replication off).
        balance_tolerance: how far above the mean load a worker may be before features are
            split finer. Each extra shard is another method instance (and changes the
            model), so this trades balance for fewer parts; `inf` never splits for balance.

    Raises:
        ValueError: when the features cannot fit the budget on `num_workers` workers.
    """
    if num_workers < 1:
        raise ValueError(f"num_workers must be at least 1, got {num_workers}")
    replicated = [f.stateless and f.bytes < replicate_below_bytes for f in features]
    replicated_bytes = sum(f.bytes for f, r in zip(features, replicated, strict=True) if r)
    sharded_bytes = sum(f.bytes for f, r in zip(features, replicated, strict=True) if not r)
    limit = _shard_limit(worker_budget_bytes, replicated_bytes, sharded_bytes, num_workers)
    # Shard sizes of each feature; None marks a replicated one (no owners to choose).
    parts, too_big = _split(features, replicated, limit, num_workers)
    if too_big is not None:
        raise ValueError(
            f"feature {too_big.name} ({format_bytes(too_big.bytes)}) needs more than "
            f"{num_workers} shards of at most {format_bytes(limit)} but there are only "
            f"{num_workers} workers; compress it more, add workers or raise the budget"
        )
    # Replicated bytes sit on every worker, so the mean load includes them once per worker.
    target = (1 + balance_tolerance) * (sharded_bytes / num_workers + replicated_bytes)
    parts, owners = _balance(features, replicated, parts, num_workers, replicated_bytes,
                             target, worker_budget_bytes)
    return ShardingPlan(
        num_workers=num_workers,
        features=[_placement(f, p, o) for f, p, o in zip(features, parts, owners, strict=True)],
        worker_budget_bytes=worker_budget_bytes,
    )


def _shard_limit(
    worker_budget_bytes: int | None, replicated_bytes: int, sharded_bytes: int, num_workers: int
) -> int:
    """Most bytes one shard may hold: the budget left after the replicated features, or
    without a budget the fair share, so that no single feature unbalances the plan."""
    if worker_budget_bytes is None:
        return -(-sharded_bytes // num_workers)
    limit = worker_budget_bytes - replicated_bytes
    if limit <= 0 and sharded_bytes:
        raise ValueError(
            f"replicated features alone take {format_bytes(replicated_bytes)} of the "
            f"{format_bytes(worker_budget_bytes)} budget per worker; lower "
            "replicate_below_bytes or raise the budget"
        )
    return limit


def _balance(
    features: Sequence[FeatureSize],
    replicated: list[bool],
    parts: list[list[int] | None],
    num_workers: int,
    replicated_bytes: int,
    target: float,
    worker_budget_bytes: int | None,
) -> tuple[list[list[int] | None], list[list[int]]]:
    """(shard sizes, owners) of the placement with the smallest maximum load, splitting the
    largest shards finer until the load is within `target` and the budget, or no feature
    can take more shards; raises when even that placement overflows the budget."""
    best: tuple[int, list[list[int] | None], list[list[int]]] | None = None
    while True:
        owners = _assign(parts, num_workers)
        loads = [replicated_bytes] * num_workers
        for p, o in zip(parts, owners, strict=True):
            for size, rank in zip(p or [], o, strict=True):
                loads[rank] += size
        if best is None or max(loads) < best[0]:
            best = (max(loads), parts, owners)
        fits = worker_budget_bytes is None or max(loads) <= worker_budget_bytes
        if fits and max(loads) <= target:
            break
        # Smaller parts pack better: split the features with the largest shards once more
        # (e.g. ten 9.5 GiB halves do not fit eight 16 GiB workers; fifteen thirds do).
        largest = max((max(p) for p in parts if p), default=0)
        finer, too_big = _split(features, replicated, largest - 1, num_workers)
        if largest <= 1 or too_big is not None:
            break
        parts = finer
    max_load, parts, owners = best
    if worker_budget_bytes is not None and max_load > worker_budget_bytes:
        raise ValueError(
            f"no greedy placement fits {format_bytes(worker_budget_bytes)} per worker (the "
            f"best found needs {format_bytes(max_load)} on one worker); add workers, raise "
            "the budget or compress more"
        )
    return parts, owners


def _placement(f: FeatureSize, parts: list[int] | None, owners: list[int]) -> FeaturePlacement:
    """The plan line of a feature with these shard sizes (None: replicated) and owners."""
    if parts is None:
        placement = Placement.REPLICATED
    else:
        placement = Placement.SPLIT if len(parts) > 1 else Placement.OWNED
    return FeaturePlacement(
        name=f.name,
        placement=placement,
        bytes=f.bytes,
        owners=owners,
        shard_bytes=[f.bytes] if parts is None else parts,
    )


def _split(
    features: Sequence[FeatureSize], replicated: list[bool], limit: int, num_workers: int
) -> tuple[list[list[int] | None], FeatureSize | None]:
    """Shard sizes of each feature (None: replicated) with no shard over `limit` bytes.

    Returns the first feature that would need more shards than workers, if any.
    """
    parts: list[list[int] | None] = []
    for f, rep in zip(features, replicated, strict=True):
        shards = 1 if rep or f.bytes <= limit else -(-f.bytes // max(limit, 1))
        if shards > num_workers:
            return parts, f
        base, extra = divmod(f.bytes, shards)
        parts.append(None if rep else [base + (s < extra) for s in range(shards)])
    return parts, None


def _assign(parts: list[list[int] | None], num_workers: int) -> list[list[int]]:
    """Owner of every shard: largest first onto the least loaded worker (lowest rank on ties).

    Args:
        parts: bytes of each shard of each feature; None for a replicated feature.
        num_workers: the world size.
    """
    loads = [0] * num_workers
    items = [(size, i, s) for i, p in enumerate(parts) if p is not None for s, size in enumerate(p)]
    # Feature and shard index break ties, so equal inputs always give the same plan.
    items.sort(key=lambda item: (-item[0], item[1], item[2]))
    owners: list[list[int]] = [[] if p is None else [-1] * len(p) for p in parts]
    for size, i, s in items:
        taken = set(owners[i])
        # Two shards of one feature on one worker would only add a module, never spread
        # bytes; allow it only when there are more shards than workers (a relocated plan).
        free = [r for r in range(num_workers) if r not in taken] or list(range(num_workers))
        rank = min(free, key=lambda r: (loads[r], r))
        owners[i][s] = rank
        loads[rank] += size
    return owners
