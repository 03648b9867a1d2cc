"""The search's configuration: a training config plus the space Ray Tune searches.

Every trial is an ordinary training run, so the search config *is* a `TrainConfig` (data,
model, optimizer, schedule, scaling, export) with four more sections: the search space,
the objective (a two-objective Pareto search or a hard byte budget), ASHA, and the trial
count. `trial_config` turns one point of the space into the `TrainConfig` a trial trains.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, TypeAdapter, ValidationError, model_validator

from embeddings.methods.base import METHODS, TwoStageConfig
from embeddings.models import ModelConfig
from training.config import TrainConfig
from training.search.space import FrozenSection, SearchSpace, candidates, first_line

_MODEL = TypeAdapter(ModelConfig)


class ObjectiveSettings(FrozenSection):
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


class AshaSettings(FrozenSection):
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


class TrialSettings(FrozenSection):
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
        if self.embeddings.budget_bytes is not None:
            raise ValueError("embeddings.budget_bytes: the search sizes trials by "
                             "search.ratio; give a byte budget as objective.max_serving_bytes")
        if self.fault is not None:
            raise ValueError("fault: failure injection is for the training job's tests only")
        two_stage = sorted(m for m in self.search.methods
                           if issubclass(METHODS[m], TwoStageConfig))
        if two_stage and self.from_model is None:
            raise ValueError(f"from_model: search.methods draws {two_stage}, built from a "
                             "trained model: set from_model to an exported model directory")
        for dim in candidates(self.search.embedding_dim):
            try:
                with_embedding_dim(self.model_spec, int(dim))
            except ValidationError as e:
                raise ValueError(f"search.embedding_dim={dim}: the model cannot take it: "
                                 f"{first_line(e)}") from None
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
        # What the config itself set (pinned features, names, ...), not the defaults; the
        # trial's own ratio, method and width replace those.
        embeddings = self.embeddings.model_dump(mode="json", exclude_unset=True,
                                                exclude={"ratio", "method", "dim"})
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
