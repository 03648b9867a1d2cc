"""The serving form of one embedding as data: JSON for structure, tensors for safetensors.

Nothing is pickled: a mapper is its `kind` plus the JSON config and tensors of
`Mapper.export`, rebuilt through `Mapper.build`; a table is its format, width and the
tensors of `export()` (data, scale, bias, tier ids). The model exporter
(`embeddings.serving`) merges each feature's (config, tensors) into the model's own
model.json and weights.safetensors under a prefix.
"""

from __future__ import annotations

from typing import Any

import torch

from embeddings.mapping import Combiner, Mapper
from embeddings.serving_embedding import ServingEmbedding
from embeddings.serving_tables import table_from_export


def embedding_state(
    emb: ServingEmbedding, prefix: str = ""
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(JSON config, tensors named `prefix`mapper.* / `prefix`tables.<i>.*) of one embedding."""
    mapper_config, mapper_tensors = emb.mapper.export()
    tensors = {f"{prefix}mapper.{k}": v for k, v in mapper_tensors.items()}
    tables = []
    for i, table in enumerate(emb.tables):
        cfg, ts = table.export()
        tables.append(cfg)
        tensors.update({f"{prefix}tables.{i}.{k}": v for k, v in ts.items()})
    config = {
        "type": "embedding",
        "combiner": emb.combiner.value,
        "mapper": {"kind": emb.mapper.kind, "config": mapper_config},
        "tables": tables,
    }
    if emb.projection is not None:
        # Low-rank (AFM): the k×d projection and its bias are served, not folded.
        config["projection"] = list(emb.projection.shape)
        tensors[f"{prefix}projection"] = emb.projection
        tensors[f"{prefix}bias"] = emb.bias
    return config, tensors


def _part(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def embedding_from_state(
    config: dict[str, Any], tensors: dict[str, torch.Tensor], prefix: str = ""
) -> ServingEmbedding:
    """Inverse of `embedding_state`: tensors may hold other entries; only `prefix`'s are read."""
    mapper = Mapper.build(
        config["mapper"]["kind"], config["mapper"]["config"], _part(tensors, f"{prefix}mapper.")
    )
    tables = [
        table_from_export(cfg, _part(tensors, f"{prefix}tables.{i}."))
        for i, cfg in enumerate(config["tables"])
    ]
    projection = bias = None
    if "projection" in config:
        projection, bias = tensors[f"{prefix}projection"], tensors[f"{prefix}bias"]
    return ServingEmbedding(mapper, tables, Combiner(config["combiner"]), projection, bias)


def unshared_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors, cloning only those that share memory with an earlier one or
    are views into a larger storage, such as the tables a TableBatchedLookup packed
    (safetensors refuses shared storage)."""
    out, seen = {}, set()
    for name, t in tensors.items():
        t = t.detach().to("cpu").contiguous()
        key = (t.untyped_storage().data_ptr(), t.storage_offset()) if t.numel() else None
        partial = t.numel() and t.untyped_storage().nbytes() != t.numel() * t.element_size()
        if partial or (key is not None and key in seen):
            t = t.clone()
        seen.add(key)
        out[name] = t
    return out
