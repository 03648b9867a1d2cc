"""The serving model's table-batched lookup scores like feature-by-feature lookups.

`ServingModel` reads every feature through one `TableBatchedLookup` call; each feature's own
forward (mapper, its tables, its combiner) is the reference, for every method's serving
form, quantised tables and split features included.
"""

from __future__ import annotations

import pytest
import torch

from data_pipeline.schema import TERABYTE_CARDINALITIES
from embeddings.collection import CollectionConfig, EmbeddingCollection, every_method
from embeddings.mapping import Combiner, FullMapper
from embeddings.models import model_preset
from embeddings.serving import ServingModel, export_model, load_model
from embeddings.serving_embedding import ServingEmbedding, TableBatchedLookup

CARDS = [max(c // 2000, 3) for c in TERABYTE_CARDINALITIES]


def _ids(n: int = 300) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 2**32, (n, 26), generator=gen)
    ids[:, :6] %= 50  # known values of small features, so full mappers hit their own rows
    return ids


def _per_feature(model: ServingModel, sparse: torch.Tensor) -> torch.Tensor:
    return torch.stack([e(sparse[:, j].contiguous()) for j, e in enumerate(model.embeddings)],
                       dim=1)


def _model(method: dict, fmt: str = "none") -> ServingModel:
    torch.manual_seed(0)
    ratio = 1 if method["method"] == "full" else 8
    config = CollectionConfig(dim=16, cardinalities=CARDS, method=method, ratio=ratio)
    serving = EmbeddingCollection(config).collapse()
    spec = model_preset("dlrm-small")
    model = ServingModel(spec, spec.build(), serving.names, list(serving.embeddings.values()))
    return model.quantize(fmt)


@pytest.mark.parametrize("name", ["hash", "full", "qr sum", "qr concat", "qr product",
                                  "mlet(hash)", "cafe"])
def test_one_lookup_call_reads_what_each_feature_reads(name):
    model = _model(every_method(32)[name])
    sparse = _ids()
    with torch.inference_mode():
        batched = model.lookup(sparse)
        reference = _per_feature(model, sparse)
    assert name in ("qr concat", "qr product") or len(model.lookup.batched) > 0
    torch.testing.assert_close(batched, reference, atol=1e-6, rtol=0)


def test_quantised_tables_and_a_reload_too(tmp_path):
    model = _model({"method": "hash"}, "int8")
    sparse = _ids()
    with torch.inference_mode():
        assert model.lookup.batched == []  # int8 tables keep their own lookup
        torch.testing.assert_close(model.lookup(sparse), _per_feature(model, sparse))
    fp32 = _model({"method": "hash"})
    dense = torch.rand(300, 13)
    with torch.inference_mode():
        before = fp32(dense, sparse)  # packs the tables into one weight
    # The packed tables (views into one weight) export as plain tensors and load back.
    loaded, _ = load_model(export_model(fp32, tmp_path / "m"))
    with torch.inference_mode():
        torch.testing.assert_close(loaded(dense, sparse), before, atol=0, rtol=0)


def test_uncompressed_features_with_known_values():
    # Known values read their own rows, the rest hash into the spare rows (or all rows).
    gen = torch.Generator().manual_seed(1)
    embeddings = []
    for rows, known in ((100, 60), (40, 40), (30, 0), (5000, 3)):
        vocabulary = torch.randperm(10_000, generator=gen)[:known]
        mapper = FullMapper.from_vocabulary(rows, vocabulary if known else None, seed=rows)
        embeddings.append(ServingEmbedding(mapper, [torch.randn(rows, 8, generator=gen)],
                                           Combiner.SUM))
    lookup = TableBatchedLookup(embeddings, 8)
    sparse = torch.randint(0, 10_000, (500, 4), generator=gen)
    sparse[:, 0] = torch.randperm(10_000, generator=gen)[:500]  # some hits, some misses
    with torch.inference_mode():
        reference = torch.stack([e(sparse[:, j].contiguous()) for j, e in enumerate(embeddings)],
                                dim=1)
        assert lookup.batched == [0, 1, 2, 3]
        torch.testing.assert_close(lookup(sparse), reference, atol=0, rtol=0)
