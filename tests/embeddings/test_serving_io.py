"""Serving embeddings round-trip through JSON + safetensors, every format and mapper, unchanged."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from embeddings.collection import CollectionConfig, EmbeddingCollection
from embeddings.mapping import tensor_bytes
from embeddings.methods.base import FeatureStats
from embeddings.methods.quantize import quantize_collection_mixed
from embeddings.serving_embedding import ServingCollection
from embeddings.serving_io import embedding_from_state, embedding_state, unshared_tensors

FEATURES = {
    "C1": {"method": "qr", "collisions": 40, "operation": "concat"},
    "C2": {"method": "hash", "ratio": 4, "mlet_dim": 32},
    "C3": {"method": "full"},
    "C4": {"method": "qr", "ratio": 3},
}


def _collection() -> tuple[ServingCollection, torch.Tensor, dict[str, FeatureStats]]:
    torch.manual_seed(0)
    ids = torch.randint(0, 2**32, (3000, 4))
    ids[:, 2] %= 300
    names = ["C1", "C2", "C3", "C4"]
    stats = {n: FeatureStats.from_ids(ids[:, j]) for j, n in enumerate(names)}
    config = CollectionConfig(dim=8, cardinalities=[5000, 4000, 300, 2000], features=FEATURES)
    return EmbeddingCollection(config, stats).collapse(), ids, stats


@pytest.mark.parametrize("fmt", ["fp32", "fp16", "int8", "int4", "mixed"])
def test_every_feature_round_trips_through_safetensors_and_scores_identically(
    tmp_path, fmt: str
) -> None:
    serving, ids, stats = _collection()
    if fmt == "mixed":
        serving, _ = quantize_collection_mixed(serving, stats, serving.serving_bytes() // 2)
    elif fmt != "fp32":
        serving = serving.quantize(fmt)
    unseen = torch.randint(2**33, 2**40, (200, 4))
    for j, (name, emb) in enumerate(serving.embeddings.items()):
        # Under a prefix, as the model exporter merges every feature into one file.
        config, tensors = embedding_state(emb, prefix=f"embeddings.{name}.")
        assert all(k.startswith(f"embeddings.{name}.") for k in tensors)
        path = tmp_path / f"{name}.safetensors"
        save_file(unshared_tensors({"dense.weight": torch.ones(3), **tensors}), str(path))
        again = json.loads(json.dumps(config))  # plain JSON, nothing to pickle
        loaded = embedding_from_state(again, load_file(str(path)), prefix=f"embeddings.{name}.")
        for batch in (ids, unseen):
            assert torch.equal(loaded(batch[:, j]), emb(batch[:, j]))
        assert loaded.serving_bytes() == emb.serving_bytes()
        assert tensor_bytes(tensors.values()) == emb.serving_bytes()
