"""Serving embeddings round-trip through JSON + safetensors, every format and mapper, unchanged."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from embeddings.collection import CollectionConfig, EmbeddingCollection
from embeddings.mapping import tensor_bytes
from embeddings.methods.base import FeatureStats
from embeddings.methods.quantize import quantize_collection_mixed
from embeddings.serving_embedding import ServingCollection, ServingEmbedding
from embeddings.serving_io import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    load_serving,
    save_serving,
    serving_from_state,
    serving_state,
)

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
def test_collection_round_trip_scores_identically(tmp_path, fmt: str) -> None:
    serving, ids, stats = _collection()
    if fmt == "mixed":
        serving, _ = quantize_collection_mixed(serving, stats, serving.serving_bytes() // 2)
    elif fmt != "fp32":
        serving = serving.quantize(fmt)
    save_serving(serving, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([CONFIG_FILE, WEIGHTS_FILE])
    loaded = load_serving(tmp_path)
    assert isinstance(loaded, ServingCollection)
    unseen = torch.randint(2**33, 2**40, (200, 4))
    for batch in (ids, unseen):
        assert torch.equal(loaded(batch), serving(batch))
    assert loaded.serving_bytes() == serving.serving_bytes()
    document = json.loads((tmp_path / CONFIG_FILE).read_text())
    assert document["serving_bytes"] == serving.serving_bytes()
    assert tensor_bytes(load_file(str(tmp_path / WEIGHTS_FILE)).values()) == serving.serving_bytes()


def test_single_embedding_round_trip(tmp_path) -> None:
    serving, ids, _ = _collection()
    emb = serving.embeddings["C3"]  # a full mapper with its vocabulary tensors
    save_serving(emb, tmp_path)
    loaded = load_serving(tmp_path)
    assert isinstance(loaded, ServingEmbedding)
    assert torch.equal(loaded(ids[:, 2]), emb(ids[:, 2]))


def test_state_merges_under_a_prefix_for_the_model_exporter() -> None:
    serving, ids, _ = _collection()
    config, tensors = serving_state(serving, prefix="embeddings.")
    assert all(k.startswith("embeddings.") for k in tensors)
    json.dumps(config)  # plain JSON, nothing to pickle
    model_tensors = {"dense.weight": torch.ones(3), **tensors}
    again = serving_from_state(config, model_tensors, prefix="embeddings.")
    assert torch.equal(again(ids), serving(ids))


def test_a_foreign_or_newer_file_is_refused(tmp_path) -> None:
    serving, _, _ = _collection()
    save_serving(serving, tmp_path)
    path = tmp_path / CONFIG_FILE
    document = json.loads(path.read_text())
    path.write_text(json.dumps({**document, "version": 99}))
    with pytest.raises(ValueError, match="version 99"):
        load_serving(tmp_path)
    path.write_text(json.dumps({**document, "format": "other"}))
    with pytest.raises(ValueError, match="not a"):
        load_serving(tmp_path)
