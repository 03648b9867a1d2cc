"""The serving model: dense layers + one collapsed embedding per feature, as files.

`export_model` writes `model.json` (schema version, features, dimensions, each table's
mapper, MLP shapes, metrics, serving bytes, the training config, a checksum of the
weights) and `weights.safetensors`; `load_model` reads them back and refuses a directory
that is missing, truncated or fails its checksum. Nothing is pickled.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import TypeAdapter
from safetensors.torch import load_file, save_file
from torch import nn

from embeddings.models import ModelConfig
from embeddings.serving_embedding import FeatureEmbedding, SplitServingEmbedding, TableBatchedLookup
from embeddings.serving_io import embedding_from_state, embedding_state, unshared_tensors

SCHEMA_VERSION = 1
MODEL_FILE = "model.json"
WEIGHTS_FILE = "weights.safetensors"
FORMAT = "embpress.model"


class ModelFileError(RuntimeError):
    """A model directory that cannot be served (missing, truncated, wrong checksum)."""


class ServingModel(nn.Module):
    """forward(dense [n, 13] transformed, sparse [n, 26] raw ids) -> logits [n].

    Args:
        model_config: the dense model's shape (DLRM or DCN config).
        dense: the dense model (its forward takes dense features and the embedded ids).
        names: feature names, in the sparse input's column order.
        embeddings: the collapsed embedding of each feature.
    """

    def __init__(
        self,
        model_config: ModelConfig,
        dense: nn.Module,
        names: list[str],
        embeddings: list[FeatureEmbedding],
    ) -> None:
        super().__init__()
        self.model_config = model_config
        self.dense = dense.eval()
        self.names = list(names)
        self.embeddings = nn.ModuleList(embeddings)
        # One lookup call for all features (see TableBatchedLookup), not one per feature.
        # table_dim: d, + 1 where the model's first-order scalar is the tables' last column.
        self.lookup = TableBatchedLookup(list(self.embeddings), model_config.table_dim)

    @torch.no_grad()
    def forward(self, dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
        return self.dense(dense, self.lookup(sparse))

    def embedding_bytes(self) -> int:
        return sum(e.serving_bytes() for e in self.embeddings)

    def quantize(self, fmt: str) -> ServingModel:
        if fmt in ("none", "fp32"):
            return self
        return ServingModel(
            self.model_config, self.dense, self.names, [e.quantize(fmt) for e in self.embeddings]
        )


def _feature_state(emb: FeatureEmbedding, prefix: str) -> tuple[dict[str, Any], dict]:
    if isinstance(emb, SplitServingEmbedding):
        parts, tensors = [], {}
        for s, part in enumerate(emb.parts):
            cfg, ts = embedding_state(part, f"{prefix}part{s}.")
            parts.append(cfg)
            tensors.update(ts)
        return {"type": "split", "dim": emb.dim, "parts": parts}, tensors
    return embedding_state(emb, prefix)


def _feature_from_state(config: dict[str, Any], tensors: dict, prefix: str) -> FeatureEmbedding:
    if config.get("type") == "split":
        parts = [
            embedding_from_state(c, tensors, f"{prefix}part{s}.")
            for s, c in enumerate(config["parts"])
        ]
        return SplitServingEmbedding(parts, config["dim"])
    return embedding_from_state(config, tensors, prefix)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def export_model(
    model: ServingModel, directory: str | Path, metadata: Mapping[str, Any] | None = None
) -> Path:
    """Write model.json + weights.safetensors; the JSON last, so it always has its weights."""
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    clash = sorted(set(metadata or {}) & COMPUTED_KEYS)
    if clash:
        # A stale "weights_sha256" or "format" copied from another model.json would make
        # the new directory fail its own checksum, or lie about its contents.
        raise ValueError(f"metadata may not set {clash}: export_model computes them")
    tensors = {f"dense.{k}": v for k, v in model.dense.state_dict().items()}
    features = {}
    for name, emb in zip(model.names, model.embeddings, strict=True):
        features[name], ts = _feature_state(emb, f"embeddings.{name}.")
        tensors.update(ts)
    weights_tmp = path / f".{WEIGHTS_FILE}.tmp"
    save_file(unshared_tensors(tensors), str(weights_tmp), metadata={"format": FORMAT})
    os.replace(weights_tmp, path / WEIGHTS_FILE)
    document = {
        "format": FORMAT,
        "schema_version": SCHEMA_VERSION,
        "features": model.names,
        "num_dense": model.model_config.num_dense,
        "embedding_dim": model.model_config.embedding_dim,
        "model": model.model_config.model_dump(mode="json"),
        "embeddings": features,
        "serving_bytes": {
            "embeddings": model.embedding_bytes(),
            "dense": sum(t.numel() * t.element_size() for t in model.dense.state_dict().values()),
        },
        "weights_sha256": _sha256(path / WEIGHTS_FILE),
        **dict(metadata or {}),
    }
    tmp = path / f".{MODEL_FILE}.tmp"
    tmp.write_text(json.dumps(document, indent=1, default=_json_default))
    os.replace(tmp, path / MODEL_FILE)
    return path


# What export_model writes itself; any other key of model.json is the caller's metadata.
COMPUTED_KEYS = frozenset({
    "format", "schema_version", "features", "num_dense", "embedding_dim", "model",
    "embeddings", "serving_bytes", "weights_sha256",
})


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def read_model_json(directory: str | Path) -> dict[str, Any]:
    if not Path(directory).is_dir():
        raise ModelFileError(f"model directory {directory} does not exist")
    path = Path(directory) / MODEL_FILE
    if not path.is_file():
        raise ModelFileError(f"no {MODEL_FILE} in {directory}: not an exported model")
    try:
        document = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ModelFileError(f"{path} is not valid JSON (truncated?): {e}") from None
    if document.get("format") != FORMAT:
        raise ModelFileError(f"{path} is not an embpress model (format {document.get('format')!r})")
    if document.get("schema_version") != SCHEMA_VERSION:
        raise ModelFileError(
            f"{path} has schema version {document.get('schema_version')}; "
            f"this code reads {SCHEMA_VERSION}"
        )
    return document


def check_model_dir(directory: str | Path) -> dict[str, Any]:
    """model.json of a directory whose weights are present and pass their checksum.

    Reads the weights once but builds nothing, so a deploy can refuse a broken directory
    before any server touches it. Raises ModelFileError naming what is wrong.
    """
    document = read_model_json(directory)
    weights = Path(directory) / WEIGHTS_FILE
    if not weights.is_file():
        raise ModelFileError(f"no {WEIGHTS_FILE} in {directory}")
    digest = _sha256(weights)
    if digest != document.get("weights_sha256"):
        raise ModelFileError(
            f"{weights} fails its checksum (sha256 {digest[:12]}…, model.json says "
            f"{str(document.get('weights_sha256'))[:12]}…): truncated or replaced"
        )
    return document


def load_model(directory: str | Path) -> tuple[ServingModel, dict[str, Any]]:
    """The serving model and its model.json; ModelFileError when the files are not sound."""
    document = check_model_dir(directory)
    weights = Path(directory) / WEIGHTS_FILE
    tensors = load_file(str(weights))
    config = TypeAdapter(ModelConfig).validate_python(document["model"])
    dense = config.build()
    prefix = "dense."
    dense.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
    names = document["features"]
    embeddings = [
        _feature_from_state(document["embeddings"][n], tensors, f"embeddings.{n}.") for n in names
    ]
    return ServingModel(config, dense, names, embeddings), document
