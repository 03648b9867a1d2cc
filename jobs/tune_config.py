"""The search job's configuration: a training config plus the space Ray Tune searches.

Every trial is an ordinary training run, so the search config *is* a `TrainConfig` (data,
model, optimizer, schedule, scaling, export) with four more sections: the search space,
the objective (a two-objective Pareto search or a hard byte budget), ASHA, and the trial
count. `trial_config` turns one point of the space into the `TrainConfig` a trial trains.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from embeddings.methods.base import METHODS, Combiner, MethodConfig
from embeddings.methods.mlet import MLET_MAX_RATIO, MLET_MIN_RATIO
from embeddings.models import ModelConfig
from jobs.train_config import TrainConfig

QUANTIZE_FORMATS = ("none", "fp16", "int8", "int4")
# Method fields the search sets itself for every method (`ratio`, `mlet`), or that would
# fight the shared ratio (a fixed size) or the optimizer (sparse gradients).
SHARED_FIELDS = frozenset({"method", "mlet_dim", "ratio", "rows", "collisions", "sparse"})
# A feature this large is compressed at any ratio the search tries, so checking each
# method at it exercises the method's own rules (QR's concat halves, MLET widths).
_PROBE_VALUES = 1_000_000

_MODEL = TypeAdapter(ModelConfig)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Range(_Strict):
    """A numeric interval the search samples from.

    Args:
        low: smallest value (inclusive).
        high: largest value (inclusive).
        log: sample uniformly in log space (learning rates, ratios).
        integer: whole numbers only.
    """

    low: float
    high: float
    log: bool = False
    integer: bool = False

    @model_validator(mode="after")
    def _ordered(self) -> Range:
        if not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError(f"a log range needs low > 0, got {self.low}")
        return self

    def ends(self) -> list[float | int]:
        if self.integer:
            return [math.ceil(self.low), math.floor(self.high)]
        return [self.low, self.high]


# One searched setting: a range, a list of choices, or a fixed value.
Param = Range | list[Any] | str | int | float | bool | None


def candidates(param: Param) -> list[Any]:
    """Values worth checking up front: a range's ends, every choice, or the fixed value."""
    if isinstance(param, Range):
        return param.ends()
    if isinstance(param, list):
        return list(param)
    return [param]


def sample(trial: Any, name: str, param: Param) -> Any:
    """Draw `param` from an Optuna trial (define-by-run); fixed values are not drawn."""
    if isinstance(param, Range):
        if param.integer:
            low, high = param.ends()
            return trial.suggest_int(name, int(low), int(high), log=param.log)
        return trial.suggest_float(name, param.low, param.high, log=param.log)
    if isinstance(param, list):
        return param[0] if len(param) == 1 else trial.suggest_categorical(name, param)
    return param


def _choices(values: list[Any], name: str) -> list[Any]:
    if not values:
        raise ValueError(f"{name}: give at least one choice")
    if len(set(map(repr, values))) != len(values):
        raise ValueError(f"{name}: choices repeat: {values}")
    return values


class SearchSpace(_Strict):
    """What each trial may vary. Settings are a range (`{low, high, log}`), a list of
    choices, or one fixed value.

    Args:
        methods: compression method name (embeddings/methods: hash, qr, cafe, learned_hash,
            full) → the method's own fields to search, e.g. `cafe: {hash_share: {low: 0.2,
            high: 0.8}, threshold: [50, 500]}`, `qr: {operation: [sum, concat]}`; `{}`
            searches the method with its defaults. Size fields are not searched per method:
            `ratio` sizes every method.
        mlet: MLET's k/d to try, each 2..16; 0 trains without MLET. A trial whose method
            combines tables non-linearly (QR by product) never gets MLET.
        ratio: compression ratio of every feature (features with at most 2000 / ratio
            values stay uncompressed, as in the training job).
        embedding_dim: width d of every embedding (the model follows; a DLRM's bottom MLP
            ends in d).
        sparse_lr: learning rate of the embedding tables' row-wise optimizer.
        dense_lr: Adam's learning rate on the MLPs and MLET projections.
        quantize: storage of the exported serving tables (none = fp32, fp16, int8, int4).
    """

    methods: dict[str, dict[str, Param]] = Field(
        default_factory=lambda: {"hash": {}, "qr": {"operation": ["sum", "concat"]},
                                 "cafe": {}, "learned_hash": {}},
        min_length=1,
    )
    mlet: list[int] = Field(default_factory=lambda: [0, 2])
    ratio: Param = Field(default_factory=lambda: Range(low=10, high=1000, log=True))
    embedding_dim: Param = 16
    sparse_lr: Param = 0.05
    dense_lr: Param = 1e-3
    quantize: Param = "none"

    @model_validator(mode="after")
    def _valid(self) -> SearchSpace:
        for name, fields in self.methods.items():
            if name not in METHODS:
                raise ValueError(f"methods.{name}: unknown method; known: {sorted(METHODS)}")
            known = set(METHODS[name].model_fields) - SHARED_FIELDS
            for field, param in fields.items():
                if field in SHARED_FIELDS:
                    raise ValueError(f"methods.{name}.{field}: set by the search for every "
                                     "method (ratio, mlet); remove it here")
                if field not in known:
                    raise ValueError(f"methods.{name}.{field}: no such field of {name}; "
                                     f"searchable: {sorted(known)}")
                if isinstance(param, list):
                    _choices(param, f"methods.{name}.{field}")
        for k in _choices(self.mlet, "mlet"):
            if k and not MLET_MIN_RATIO <= k <= MLET_MAX_RATIO:
                raise ValueError(f"mlet: k/d must be 0 (no MLET) or {MLET_MIN_RATIO}.."
                                 f"{MLET_MAX_RATIO}, got {k}")
        for ratio in candidates(self.ratio):
            if not (isinstance(ratio, (int, float)) and ratio >= 1):
                raise ValueError(f"ratio: every compression ratio must be ≥ 1, got {ratio!r}")
        for dim in candidates(self.embedding_dim):
            if not (isinstance(dim, int) and dim >= 1):
                raise ValueError(f"embedding_dim: must be whole and ≥ 1, got {dim!r}")
        for field in ("sparse_lr", "dense_lr"):
            for lr in candidates(getattr(self, field)):
                if not (isinstance(lr, (int, float)) and lr > 0):
                    raise ValueError(f"{field}: learning rates must be > 0, got {lr!r}")
        for fmt in candidates(self.quantize):
            if fmt not in QUANTIZE_FORMATS:
                raise ValueError(f"quantize: {fmt!r} is not one of {list(QUANTIZE_FORMATS)}")
        self._check_combinations()
        return self

    def _check_combinations(self) -> None:
        """Build every method at every extreme of its fields, width and MLET: a space that
        could draw an impossible trial fails here, not an hour into the search."""
        for name, fields in self.methods.items():
            variants: list[dict[str, Any]] = [{}]
            for field, param in fields.items():
                variants = [{**v, field: value} for v in variants for value in candidates(param)]
            for values in variants:
                for dim in candidates(self.embedding_dim):
                    for k in self.mlet:
                        where = f"methods.{name} {values or ''} at d={dim}, mlet {k}"
                        try:
                            config = METHODS[name].model_validate({"method": name, **values})
                            if k and config.combiner() is Combiner.PRODUCT:
                                continue  # the sampler leaves MLET off for these
                            config = _with_mlet(config, k * dim if k else None)
                            for ratio in candidates(self.ratio):
                                config.at_ratio(float(ratio)).check(_PROBE_VALUES, int(dim))
                        except (ValidationError, ValueError) as e:
                            raise ValueError(f"{where}: {_first_line(e)}") from None

    def draw(self, trial: Any) -> dict[str, Any]:
        """One point of the space from an Optuna trial: a flat dict of plain values.

        Keys: method, <method>.<field> for that method's searched fields, mlet, ratio,
        embedding_dim, sparse_lr, dense_lr, quantize. Conditional settings use their own
        names, so Optuna sees one fixed distribution per name.
        """
        methods = list(self.methods)
        method = sample(trial, "method", methods)
        point: dict[str, Any] = {"method": method}
        for field, param in self.methods[method].items():
            point[f"{method}.{field}"] = sample(trial, f"{method}.{field}", param)
        config = METHODS[method].model_validate(
            {"method": method, **{f: point[f"{method}.{f}"] for f in self.methods[method]}})
        linear = config.combiner() is not Combiner.PRODUCT
        point["mlet"] = sample(trial, "mlet", self.mlet) if linear else 0
        for name in ("ratio", "embedding_dim", "sparse_lr", "dense_lr", "quantize"):
            point[name] = sample(trial, name, getattr(self, name))
        return point


def _with_mlet(config: MethodConfig, mlet_dim: int | None) -> MethodConfig:
    return type(config).model_validate({**config.model_dump(), "mlet_dim": mlet_dim})


def _first_line(e: Exception) -> str:
    if isinstance(e, ValidationError):
        return "; ".join(err["msg"] for err in e.errors())
    return str(e).splitlines()[0]


class ObjectiveSettings(_Strict):
    """What the search optimises.

    Args:
        mode: "pareto": two objectives, maximise validation AUC and minimise serving bytes
            (Optuna's multi-objective TPE); the result is the whole front. "budget": maximise
            validation AUC subject to serving bytes ≤ max_serving_bytes; a trial that cannot
            fit (its planned bytes already exceed the budget) is not trained.
        max_serving_bytes: the byte budget of the served embeddings (tables and mappers, as
            exported, quantisation included). Required for "budget"; in "pareto" mode it
            is drawn on the plot and picks the exported best model.
    """

    mode: Literal["pareto", "budget"] = "pareto"
    max_serving_bytes: int | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _budget(self) -> ObjectiveSettings:
        if self.mode == "budget" and self.max_serving_bytes is None:
            raise ValueError("mode 'budget' needs max_serving_bytes")
        return self


class AshaSettings(_Strict):
    """Early stopping at ASHA's rungs: steps grace_steps × reduction_factor^i before the
    last step, where trials report validation AUC (every `schedule.eval_every` steps).

    In "budget" mode this is ASHA itself on the objective: at each rung only the best
    1/reduction_factor of the trials go on. In "pareto" mode a trial stops at a rung when
    another trial there had at least its AUC with at most its bytes: ranking by AUC alone
    would stop the small models, the very end of the front the search is for.

    Args:
        enabled: stop weak trials early.
        grace_steps: steps every trial trains before it may be stopped (the first rung).
        reduction_factor: spacing of the rungs; in budget mode also 1/the share that
            passes each rung.
        brackets: ASHA brackets in budget mode (1 is the usual choice).
    """

    enabled: bool = True
    grace_steps: int = Field(100, ge=1)
    reduction_factor: float = Field(3.0, gt=1)
    brackets: int = Field(1, ge=1)


class TrialSettings(_Strict):
    """How many trials, and how many at once.

    Args:
        num_samples: trials in all.
        max_concurrent_trials: trials training at the same time; each holds
            scaling.num_workers × scaling.cpus_per_worker CPUs.
        seed: seed of the Optuna sampler (None: a fresh search each time).
        driver_cpus: CPUs each trial's driver reserves; it only plans and waits for its
            workers, which reserve their own CPUs (Tune refuses a trial that asks for none).
    """

    num_samples: int = Field(8, ge=1)
    max_concurrent_trials: int = Field(2, ge=1)
    seed: int | None = 0
    driver_cpus: float = Field(0.1, gt=0)


class TuneConfig(TrainConfig):
    """A search: the training config every trial starts from, and what the trials vary.

    Args:
        search: the search space (see `SearchSpace`).
        objective: Pareto search or hard byte budget (see `ObjectiveSettings`).
        asha: early stopping (see `AshaSettings`); needs `schedule.eval_every`.
        trials: trial count and concurrency (see `TrialSettings`).

    The inherited fields are the training job's. `run.name` names the experiment folder
    under `run.storage_path`; each trial trains in its own trial folder. `embeddings`
    may pin features (`features`, `names`, `cardinalities`); `ratio`, `method` and `dim`
    come from the search. `export.quantize` is replaced by `search.quantize`.
    """

    search: SearchSpace = Field(default_factory=SearchSpace)
    objective: ObjectiveSettings = Field(default_factory=ObjectiveSettings)
    asha: AshaSettings = Field(default_factory=AshaSettings)
    trials: TrialSettings = Field(default_factory=TrialSettings)

    @model_validator(mode="after")
    def _consistent(self) -> TuneConfig:
        if self.asha.enabled and (self.schedule.eval_every is None
                                  or self.schedule.max_steps is None):
            raise ValueError("asha.enabled needs schedule.eval_every and schedule.max_steps: "
                             "ASHA compares trials by the validation AUC they report while "
                             "training, at rungs up to the trial length")
        checkpoint_every, eval_every = self.schedule.checkpoint_every, self.schedule.eval_every
        if checkpoint_every is not None and (eval_every is None or checkpoint_every % eval_every):
            raise ValueError("schedule.checkpoint_every must be a multiple of "
                             "schedule.eval_every in a search: every report Tune sees must "
                             "carry a validation AUC")
        if self.embeddings.get("budget_bytes") is not None:
            raise ValueError("embeddings.budget_bytes: the search sizes trials by "
                             "search.ratio; give a byte budget as objective.max_serving_bytes")
        if self.fault is not None:
            raise ValueError("fault: failure injection is for the training job's tests only")
        for dim in candidates(self.search.embedding_dim):
            try:
                with_embedding_dim(self.model_spec, int(dim))
            except ValidationError as e:
                raise ValueError(f"search.embedding_dim={dim}: the model cannot take it: "
                                 f"{_first_line(e)}") from None
        return self

    @property
    def asha_can_stop(self) -> bool:
        """Whether ASHA has a rung before the trials' last step (else it never stops one)."""
        max_steps = self.schedule.max_steps
        return self.asha.enabled and max_steps is not None and self.asha.grace_steps < max_steps

    @property
    def experiment_dir(self) -> Path:
        """Tune's experiment folder: trials, the Pareto front, the best model."""
        return self.run_dir

    def trial_config(self, point: dict[str, Any], trial_dir: Path) -> TrainConfig:
        """The training run of one point of the space (from `SearchSpace.draw`), kept in
        `trial_dir`: its Ray Train run in <trial_dir>/train, its model in <trial_dir>/model."""
        method = point["method"]
        fields = {k.split(".", 1)[1]: v for k, v in point.items()
                  if k.startswith(f"{method}.")}
        dim = int(point["embedding_dim"])
        mlet = int(point.get("mlet") or 0)
        method_config = {"method": method, **fields, **({"mlet_dim": mlet * dim} if mlet else {})}
        embeddings = {k: v for k, v in self.embeddings.items()
                      if k not in ("ratio", "method", "dim")}
        embeddings.update(ratio=float(point["ratio"]), method=method_config, dim=dim)
        base = self.model_dump(mode="json", include=set(TrainConfig.model_fields))
        base.update(
            model=with_embedding_dim(self.model_spec, dim).model_dump(mode="json"),
            embeddings=embeddings,
            optimizer={**base["optimizer"], "sparse_lr": float(point["sparse_lr"]),
                       "dense_lr": float(point["dense_lr"])},
            run={**base["run"], "name": "train", "storage_path": str(trial_dir)},
            export={"out": str(trial_dir / "model"), "quantize": point["quantize"]},
            fault=None,
        )
        return TrainConfig.model_validate(base)


def with_embedding_dim(model: ModelConfig, dim: int) -> ModelConfig:
    """`model` with embedding width `dim`; a DLRM's bottom MLP ends in `dim` too, because its
    output is dotted with the embeddings."""
    data = model.model_dump()
    data["embedding_dim"] = dim
    if data.get("kind") == "dlrm":
        data["bottom_mlp"] = [*data["bottom_mlp"][:-1], dim]
    return _MODEL.validate_python(data)

