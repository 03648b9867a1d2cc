"""Save and load the serving form of embeddings: JSON for structure, safetensors for tensors.

Nothing is pickled: a mapper is its `kind` plus the JSON config and tensors of
`Mapper.export`, rebuilt through `Mapper.build`; a table is its format, width and the
tensors of `export()` (data, scale, bias, tier ids). `serving_state` returns the
(config, tensors) pair without writing, so the model exporter can merge it into the model's
own model.json and weights.safetensors under a prefix; `save_serving`/`load_serving` write
and read a standalone directory.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from embeddings.mapping import Combiner, Mapper
from embeddings.serving_embedding import ServingCollection, ServingEmbedding
from embeddings.serving_tables import table_from_export

FORMAT = "embpress.serving_embeddings"
VERSION = 1
CONFIG_FILE = "embeddings.json"
WEIGHTS_FILE = "embeddings.safetensors"


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
    return ServingEmbedding(mapper, tables, Combiner(config["combiner"]))


def serving_state(
    obj: ServingEmbedding | ServingCollection, prefix: str = ""
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(JSON-able config, tensors) of a serving embedding or collection.

    Tensor names start with `prefix` (e.g. "embeddings."), so the model exporter can merge
    them with its own; pass the same prefix to `serving_from_state`.
    """
    if isinstance(obj, ServingEmbedding):
        return embedding_state(obj, prefix)
    features, tensors = {}, {}
    for name, emb in obj.embeddings.items():
        features[name], ts = embedding_state(emb, f"{prefix}{name}.")
        tensors.update(ts)
    config = {"type": "collection", "dim": obj.dim, "names": obj.names, "features": features}
    return config, tensors


def serving_from_state(
    config: dict[str, Any], tensors: dict[str, torch.Tensor], prefix: str = ""
) -> ServingEmbedding | ServingCollection:
    """Inverse of `serving_state`."""
    kind = config.get("type")
    if kind == "embedding":
        return embedding_from_state(config, tensors, prefix)
    if kind != "collection":
        raise ValueError(f"not a serving embedding config (type {kind!r})")
    embeddings = [
        embedding_from_state(config["features"][name], tensors, f"{prefix}{name}.")
        for name in config["names"]
    ]
    return ServingCollection(config["names"], embeddings, config["dim"])


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


def save_serving(obj: ServingEmbedding | ServingCollection, directory: str | Path) -> Path:
    """Write `embeddings.json` and `embeddings.safetensors` into `directory` (created).

    Each file is written under a temporary name and renamed, the JSON last, so a directory
    with a JSON file always has its matching weights.
    """
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    config, tensors = serving_state(obj)
    document = {"format": FORMAT, "version": VERSION, "serving_bytes": obj.serving_bytes()}
    document["embeddings"] = config
    text = json.dumps(document, indent=1)
    weights_tmp = path / f".{WEIGHTS_FILE}.tmp"
    save_file(unshared_tensors(tensors), str(weights_tmp), metadata={"format": FORMAT})
    os.replace(weights_tmp, path / WEIGHTS_FILE)
    config_tmp = path / f".{CONFIG_FILE}.tmp"
    config_tmp.write_text(text)
    os.replace(config_tmp, path / CONFIG_FILE)
    return path


def load_serving(directory: str | Path) -> ServingEmbedding | ServingCollection:
    """Read what `save_serving` wrote."""
    path = Path(directory)
    document = json.loads((path / CONFIG_FILE).read_text())
    if document.get("format") != FORMAT:
        raise ValueError(f"{path / CONFIG_FILE} is not a {FORMAT} file")
    if document.get("version") != VERSION:
        raise ValueError(f"{path / CONFIG_FILE} has version {document.get('version')}, "
                         f"this code reads version {VERSION}")
    tensors = load_file(str(path / WEIGHTS_FILE))
    return serving_from_state(document["embeddings"], tensors)

