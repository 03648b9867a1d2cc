"""A training run's configuration: one pydantic model, validated once where it is loaded and
handed down typed to the plan and every worker (it pickles as it is)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, ValidationError, ValidationInfo, field_validator, model_validator

from embeddings.collection import CollectionConfig
from embeddings.models import ModelConfig, model_preset
from training.settings import (
    DataSettings,
    ExportSettings,
    FaultSettings,
    OptimizerSettings,
    RunSettings,
    ScalingSettings,
    ScheduleSettings,
    Strict,
)


class ConfigError(ValueError):
    """A config that cannot be used; the message names the file and the field."""


def format_validation_error(source: str, err: ValidationError) -> str:
    """pydantic's errors as one line per field, each named by its dotted path."""
    lines = [f"invalid config {source}:"]
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "<root>"
        lines.append(f"  {field}: {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


class EmbeddingSettings(CollectionConfig):
    """`embeddings:` of a training config: a `CollectionConfig` (every field documented
    there) whose `cardinalities` may be left out, to be read from the data's statistics
    when the run is planned (`TrainConfig.collection`). Method configs are validated at load;
    the checks that need each feature's size run at load only when cardinalities are given.
    Not a collection by itself until the cardinalities are known: use
    `TrainConfig.collection`, never this object, to build one.
    """

    cardinalities: list[Annotated[int, Field(ge=1)]] | None = Field(None, min_length=1)


def _default_embeddings() -> dict[str, Any]:
    return {"method": {"method": "hash"}, "ratio": 10}


class TrainConfig(Strict):
    """A training run: data, model, compressed embeddings, optimizer, schedule, scaling.

    Args:
        model: a preset name (dlrm-small, dcn-small, dlrm-mlperf, dcn-mlperf) or a model config
            with `kind: dlrm|dcn`.
        embeddings: the embedding collection (see `EmbeddingSettings`); `cardinalities` may
            be left out and are then read from the data's statistics; `dim` defaults to the
            model's `table_dim` (embedding_dim, + 1 when the model's first_order term is on:
            its scalar is the tables' last column).
        seed: seeds initialisation and the data order.
        from_model: an exported model directory to start from (two-stage methods: low-rank,
            MEC): each two-stage feature is built from the trained model's feature, and the
            dense layers start from its dense layers where shapes match, then fine-tune.
            Its features and width must be this run's (checked when the run is planned).
    """

    data: DataSettings
    model: ModelConfig | str = Field("dlrm-small", validate_default=True)
    embeddings: EmbeddingSettings = Field(default_factory=_default_embeddings,
                                          validate_default=True)
    optimizer: OptimizerSettings = Field(default_factory=OptimizerSettings)
    schedule: ScheduleSettings = Field(default_factory=ScheduleSettings)
    scaling: ScalingSettings = Field(default_factory=ScalingSettings)
    run: RunSettings = Field(default_factory=RunSettings)
    export: ExportSettings = Field(default_factory=ExportSettings)
    fault: FaultSettings | None = None
    seed: int = 0
    from_model: Path | None = None

    @field_validator("model")
    @classmethod
    def _model(cls, model: ModelConfig | str) -> ModelConfig:
        return model_preset(model) if isinstance(model, str) else model

    @field_validator("embeddings", mode="before")
    @classmethod
    def _embeddings_dim(cls, embeddings: Any, info: ValidationInfo) -> Any:
        # The tables' width follows the model unless the config says otherwise.
        model = info.data.get("model")  # absent when the model itself was invalid
        if model is not None and isinstance(embeddings, dict):
            return {"dim": model.table_dim, **embeddings}
        return embeddings

    @field_validator("embeddings")
    @classmethod
    def _embeddings_width(cls, embeddings: EmbeddingSettings,
                          info: ValidationInfo) -> EmbeddingSettings:
        model = info.data.get("model")
        if model is not None and embeddings.dim != model.table_dim:
            raise ValueError(
                f"embeddings.dim={embeddings.dim} differs from the model's table width "
                f"{model.table_dim} (embedding_dim={model.embedding_dim}"
                + (" + 1 for model.first_order)" if model.first_order else ")")
            )
        return embeddings

    @field_validator("from_model")
    @classmethod
    def _from_model_exists(cls, directory: Path | None) -> Path | None:
        if directory is not None and not (directory / "model.json").is_file():
            raise ValueError(f"{directory} is not an exported model directory (no model.json)")
        return directory

    @model_validator(mode="after")
    def _two_stage_needs_a_model(self) -> TrainConfig:
        from embeddings.methods.base import TwoStageConfig

        methods = [self.embeddings.method, *self.embeddings.features.values()]
        two_stage = sorted({m.method for m in methods if isinstance(m, TwoStageConfig)})
        if two_stage and self.from_model is None:
            raise ValueError(f"from_model: methods {two_stage} are built from a trained "
                             "model: set from_model to an exported model directory")
        return self

    @property
    def model_spec(self) -> ModelConfig:
        assert not isinstance(self.model, str)
        return self.model

    def collection(self, cardinalities: list[int] | None = None) -> CollectionConfig:
        """The collection config, with the data's cardinalities where the config gives none;
        errors name `embeddings.*`."""
        settings = self.embeddings
        cards = settings.cardinalities or cardinalities
        if cards is None:
            raise ConfigError("embeddings.cardinalities: not given and no data statistics")
        try:
            # The method configs go in as the objects they are (not revalidated).
            return CollectionConfig.model_validate({**dict(settings), "cardinalities": cards})
        except ValidationError as e:
            message = format_validation_error("embeddings", e)
            if self.model_spec.first_order:
                message += (f" (model.first_order makes every table {settings.dim} wide: "
                            "d + 1, the first-order scalar being the last column)")
            raise ConfigError(message) from None

    @property
    def run_dir(self) -> Path:
        return self.run.storage_path.resolve() / self.run.name

    @property
    def export_dir(self) -> Path:
        return (self.export.out or self.run_dir / "model").resolve()
