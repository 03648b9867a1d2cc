"""Exact AUC, log loss and AUC per frequency band, alone and gathered across workers."""

from __future__ import annotations

import json
import math
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from embeddings.metrics import (
    EvalAccumulator,
    FrequencyBand,
    auc_by_band,
    gather_across_workers,
    log_loss,
    roc_auc,
    row_bands,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def roc_auc_score(labels: np.ndarray, scores: np.ndarray) -> float:
    # Imported here, not at the top: spawned workers import this module, and scikit-learn
    # would cost each of them a second of start-up on two shared cores.
    from sklearn.metrics import roc_auc_score as sklearn_auc

    return float(sklearn_auc(labels, scores))


def data(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = (rng.random(n) < 0.25).astype(np.int64)
    # Rounded scores tie often; the label shifts them so the AUC is far from 0.5.
    logits = np.round(rng.normal(size=n) + labels, 1).astype(np.float32)
    bands = rng.integers(0, 3, size=(n, 4))
    return logits, labels, bands


@pytest.mark.parametrize("seed", range(3))
def test_auc_equals_sklearn_with_and_without_ties(seed: int):
    logits, labels, _ = data(5000, seed)
    assert len(np.unique(logits)) < 200  # plenty of ties
    assert abs(roc_auc(logits, labels) - roc_auc_score(labels, logits)) < 1e-12
    continuous = np.random.default_rng(seed).normal(size=5000) + labels
    assert abs(roc_auc(continuous, labels) - roc_auc_score(labels, continuous)) < 1e-12
    coarse = np.floor(continuous).astype(np.int64)  # a handful of distinct scores
    assert abs(roc_auc(coarse, labels) - roc_auc_score(labels, coarse)) < 1e-12


def test_auc_edge_cases():
    labels = np.array([0, 1, 0, 1])
    assert roc_auc([0.1, 0.9, 0.2, 0.8], labels) == 1.0
    assert roc_auc([0.9, 0.1, 0.8, 0.2], labels) == 0.0
    assert roc_auc([0.5] * 4, labels) == 0.5
    assert math.isnan(roc_auc([0.1, 0.2], [1, 1]))
    assert math.isnan(roc_auc([float("nan"), 0.2], [0, 1]))
    assert roc_auc(torch.tensor([0.3, 0.1, 0.2]), torch.tensor([1, 0, 0])) == 1.0
    with pytest.raises(ValueError, match="differ in length"):
        roc_auc([0.1, 0.2], [1])


def test_log_loss_equals_sklearn_and_is_stable_for_extreme_logits():
    logits, labels, _ = data(2000)
    from sklearn.metrics import log_loss as sklearn_log_loss

    probabilities = 1 / (1 + np.exp(-logits.astype(np.float64)))
    assert abs(log_loss(logits, labels) - sklearn_log_loss(labels, probabilities)) < 1e-9
    extreme = log_loss(np.array([1000.0, -1000.0, 1000.0]), np.array([1, 0, 0]))
    assert extreme == pytest.approx(1000.0 / 3)


def test_a_row_is_in_the_rarest_band_of_its_chosen_features():
    bands = np.array(
        [
            [FrequencyBand.HOT, FrequencyBand.RARE, FrequencyBand.HOT],
            [FrequencyBand.HOT, FrequencyBand.MEDIUM, FrequencyBand.HOT],
            [FrequencyBand.HOT, FrequencyBand.HOT, FrequencyBand.HOT],
        ]
    )
    assert row_bands(bands).tolist() == [0, 1, 2]
    # Only the chosen features count: column 1 is ignored here.
    assert row_bands(bands, features=[0, 2]).tolist() == [2, 2, 2]
    with pytest.raises(ValueError, match="at least one feature"):
        row_bands(bands, features=[])


def test_auc_by_band_is_auc_over_each_bands_rows():
    logits, labels, bands = data(3000)
    per_row = row_bands(bands, features=[0, 1])
    got = auc_by_band(logits, labels, per_row)
    for band in FrequencyBand:
        rows = per_row == band
        expected = roc_auc_score(labels[rows], logits[rows])
        assert abs(got[band.name.lower()] - expected) < 1e-12


def test_accumulator_on_one_worker_matches_sklearn():
    logits, labels, bands = data(1000)
    acc = EvalAccumulator(with_bands=True, band_features=[0, 1])
    for part in np.array_split(np.arange(1000), 7):
        acc.update(torch.from_numpy(logits[part]), torch.from_numpy(labels[part]), bands[part])
    metrics = acc.compute()
    assert metrics["rows"] == 1000
    assert abs(metrics["auc"] - roc_auc_score(labels, logits)) < 1e-12
    per_row = row_bands(bands, [0, 1])
    rare = per_row == FrequencyBand.RARE
    assert metrics["rows_rare"] == rare.sum()
    assert abs(metrics["auc_rare"] - roc_auc_score(labels[rare], logits[rare])) < 1e-12
    with pytest.raises(ValueError, match="band codes are required"):
        acc.update(torch.zeros(2), torch.zeros(2))
    acc.reset()
    assert math.isnan(acc.compute()["auc"])
    plain = EvalAccumulator()
    with pytest.raises(ValueError, match="with_bands is off"):
        plain.update(torch.zeros(2), torch.zeros(2), np.zeros((2, 4)))


# Exactness must not depend on how rows were split: uneven parts, then one part empty.
SPLITS = [[(0, 600), (600, 1001)], [(0, 0), (0, 1001)]]


def _worker(rank: int, world: int, store: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{store}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=60),
    )
    try:
        logits, labels, bands = data(1001)
        results = []
        for split in SPLITS:
            start, stop = split[rank]
            acc = EvalAccumulator(with_bands=True, band_features=[0, 1])
            # Two batches per worker, as an evaluation loop would feed them.
            middle = (start + stop) // 2
            for a, b in ((start, middle), (middle, stop)):
                if b > a:
                    acc.update(
                        torch.from_numpy(logits[a:b]), torch.from_numpy(labels[a:b]), bands[a:b]
                    )
            metrics = acc.compute()
            gathered = gather_across_workers(torch.arange(start, stop))
            metrics["order_ok"] = float(torch.equal(gathered, torch.arange(1001)))
            results.append(metrics)
        Path(out, f"rank{rank}.json").write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


def test_auc_over_workers_is_exact(tmp_path: Path):
    world = 2
    mp.spawn(_worker, args=(world, str(tmp_path / "store"), str(tmp_path)), nprocs=world)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]
    assert results[0] == results[1]  # every worker gets the same metrics
    logits, labels, bands = data(1001)
    per_row = row_bands(bands, [0, 1])
    for metrics in results[0]:
        assert metrics["order_ok"] == 1.0
        assert metrics["rows"] == 1001
        assert abs(metrics["auc"] - roc_auc_score(labels, logits)) < 1e-12
        assert metrics["log_loss"] == pytest.approx(log_loss(logits, labels), abs=1e-12)
        for band in FrequencyBand:
            rows = per_row == band
            name = band.name.lower()
            assert metrics[f"rows_{name}"] == rows.sum()
            expected = roc_auc_score(labels[rows], logits[rows])
            assert abs(metrics[f"auc_{name}"] - expected) < 1e-12
