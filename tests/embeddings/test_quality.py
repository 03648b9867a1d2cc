"""Compression quality on the generator's data: adaptive methods must beat the hashing trick.

Single process, no Ray: the collection and DLRM trained on synthetic Criteo whose labels
come from the planted teacher, validation AUC compared at one compression ratio.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from data_pipeline.datasets import iter_local_batches
from data_pipeline.stats import load_feature_stats
from embeddings.collection import CollectionConfig, EmbeddingCollection
from embeddings.metrics import roc_auc
from embeddings.models import model_preset
from embeddings.optim import train_step
from embeddings.tables import TableOptimizer
from jobs import synth

STEPS = 120
BATCH = 4096


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("quality") / "data"
    assert synth.main(["--rows", str(2 * STEPS * BATCH + 200_000), "--days", "2", "--out",
                       str(out), "--seed", "11", "--no-ray", "--no-progress"]) == 0
    return out


def validation_auc(data: Path, method: dict, ratio: float) -> float:
    torch.manual_seed(0)
    stats = load_feature_stats(data)
    cards = [stats.num_distinct(f) for f in stats.features]
    model_config = model_preset("dlrm-small")
    collection = EmbeddingCollection(CollectionConfig(
        dim=model_config.embedding_dim, cardinalities=cards, ratio=ratio, method=method),
        optimizer=TableOptimizer(lr=0.1))
    dense = model_config.build()
    sparse_opt = None  # the tables train in the collection's store
    dense_opt = torch.optim.Adam([*dense.parameters(), *collection.dense_parameters()], lr=1e-3)
    loss_fn = nn.BCEWithLogitsLoss()
    for step, batch in enumerate(iter_local_batches(data, "train", BATCH, drop_last=True)):
        if step == STEPS:
            break
        loss = loss_fn(dense(batch["dense"], collection(batch["sparse"])), batch["label"])
        train_step(loss, sparse_opt, dense_opt, collection)
    logits, labels = [], []
    with torch.no_grad():
        for batch in iter_local_batches(data, "validation", 65536):
            logits.append(dense(batch["dense"], collection(batch["sparse"])))
            labels.append(batch["label"])
    return roc_auc(torch.cat(logits).numpy(), torch.cat(labels).numpy())


@pytest.mark.slow
@pytest.mark.parametrize("ratio", [100, 1000])
def test_cafe_beats_the_hashing_trick(data, ratio):
    torch.set_num_threads(2)
    hashed = validation_auc(data, {"method": "hash"}, ratio)
    cafe = validation_auc(data, {"method": "cafe"}, ratio)
    print(f"validation AUC at {ratio}x: hash {hashed:.4f}, cafe {cafe:.4f}")
    assert hashed > 0.6, "the baseline itself must learn"
    # Measured: +0.005 at 100x, +0.011 at 1000x (hot ids get rows of their own).
    assert cafe > hashed + 0.003, (cafe, hashed)


@pytest.mark.slow
def test_mlet_over_hash_learns_as_well_as_hash_at_100x(data):
    # Issue 3 asks MLET(hash) to beat hash at 100x; on this data it ties (paired seeds: +0.000
    # at 120 steps, +0.001..+0.002 after a 2.5M-row epoch, seed spread about as large; d = 4,
    # 8 or 16, k = 2d..8d, three inits). MLET changes how a table is trained, not what it can
    # hold, and hash at 100x is limited by what it can hold: its AUC is flat for table lrs
    # from 0.03 to 0.4, and QR, whose ids keep distinct vectors, is 0.08 ahead of it in the
    # 10M-row quality run (jobs/benchmarks/compression_quality.py). This guards
    # what holds: the wider table and projection train to the base method's quality.
    torch.set_num_threads(2)
    hashed = validation_auc(data, {"method": "hash"}, 100)
    mlet = validation_auc(data, {"method": "hash", "mlet_dim": 64}, 100)
    print(f"validation AUC at 100x: hash {hashed:.4f}, mlet(hash) {mlet:.4f}")
    assert mlet > hashed - 0.01, (mlet, hashed)
