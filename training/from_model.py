"""The second stage of two-stage methods (low-rank, MEC): a run that starts from a trained
model directory (`TrainConfig.from_model`).

The trained model is read with the serving loader (`embeddings.serving.load_model`: JSON and
safetensors, never pickle). Its features must be the run's features at the run's width; each
feature's collapsed embedding and statistics become the `TrainedFeature` a two-stage method
is built from, and the dense layers start from the trained ones wherever the shapes match
(that is the fine-tuning). A resumed run builds the same way and then loads its checkpoint
over it, so what it resumes is the checkpoint's state, never a fresh derivation.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from embeddings.methods.base import (
    CompressedEmbedding,
    FeatureStats,
    MethodBytes,
    MethodConfig,
    TrainedFeature,
    TwoStageConfig,
)
from embeddings.serving import ModelFileError, ServingModel, load_model, read_model_json
from training.config import ConfigError, TrainConfig

FIELD = "from_model"


def check_from_model(config: TrainConfig, names: list[str]) -> dict:
    """model.json of `config.from_model` when it can seed this run (its features are the
    run's, its tables the run's width); ConfigError naming the field otherwise."""
    directory = config.from_model
    if directory is None:
        raise ConfigError(f"{FIELD}: not set")
    try:
        document = read_model_json(directory)
    except ModelFileError as e:
        raise ConfigError(f"{FIELD}: {e}") from None
    features = list(document.get("features", []))
    if sorted(features) != sorted(names):
        missing, extra = sorted(set(names) - set(features)), sorted(set(features) - set(names))
        raise ConfigError(f"{FIELD}: the model in {directory} has other features than this "
                          f"run's data (missing {missing}, extra {extra})")
    trained_dim = _table_dim(document)
    dim = config.model_spec.table_dim
    if trained_dim != dim:
        raise ConfigError(f"{FIELD}: the model in {directory} has {trained_dim}-wide tables; "
                          f"this run's are {dim} wide (embeddings.dim / model.embedding_dim)")
    return document


def _table_dim(document: dict) -> int:
    model = document.get("model", {})
    return int(model.get("embedding_dim", 0)) + (1 if model.get("first_order") else 0)


def load_trained(directory: Path, stats: Mapping[str, FeatureStats] | None
                 ) -> tuple[ServingModel, dict[str, TrainedFeature]]:
    """The trained serving model and each of its features as a `TrainedFeature`."""
    try:
        model, _ = load_model(directory)
    except ModelFileError as e:
        raise ConfigError(f"{FIELD}: {e}") from None
    features = {
        name: TrainedFeature(emb, stats.get(name) if stats is not None else None)
        for name, emb in zip(model.names, model.embeddings, strict=True)
    }
    return model, features


def build_two_stage(config: MethodConfig, num_embeddings: int, dim: int,
                    trained: TrainedFeature | None, num_shards: int = 1) -> CompressedEmbedding:
    """A two-stage method from its trained feature, refusing what it cannot be built from."""
    if trained is None:
        config.build(num_embeddings, dim)  # raises the method's own "set from_model" message
    if num_shards > 1:
        raise ConfigError(f"{FIELD}: method {config.method!r} is built from a trained feature "
                          "whole; this run splits the feature over workers (give it one "
                          "worker, or fewer workers)")
    try:
        return config.from_trained(num_embeddings, dim, trained)
    except ValueError as e:  # a ratio beyond the method's reach, a trained form it refuses
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"embeddings.method: {e}") from e


def planned_two_stage_bytes(config: MethodConfig, num_embeddings: int, dim: int,
                            trained: TrainedFeature | None, fmt: str = "fp32") -> MethodBytes:
    """Exact bytes of a two-stage method, from a real build (it needs the trained tables)."""
    method = build_two_stage(config, num_embeddings, dim, trained)
    return MethodBytes(method.training_bytes(), method.serving_bytes(fmt))


def is_two_stage(config: MethodConfig) -> bool:
    return isinstance(config, TwoStageConfig)


@torch.no_grad()
def init_dense(dense: nn.Module, trained: nn.Module) -> list[str]:
    """Copy the trained dense parameters and buffers into `dense` wherever a name and shape
    match; the names copied (the rest keep their fresh initialisation)."""
    source = trained.state_dict()
    copied = []
    for name, tensor in dense.state_dict().items():
        if name in source and source[name].shape == tensor.shape:
            tensor.copy_(source[name].to(tensor.device, tensor.dtype))
            copied.append(name)
    return copied
