"""One budget over the features: every method lands within ±5% of it or is refused with the
largest ratio it can reach; the rules keep the features they should whole."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from data_pipeline.schema import TERABYTE_CARDINALITIES
from embeddings import budget
from embeddings.collection import CollectionConfig, EmbeddingCollection
from embeddings.methods.base import FeatureStats

# Criteo Terabyte's 26 cardinalities scaled down 1000× (at least 3 values each).
SCALED = [max(3, n // 1000) for n in TERABYTE_CARDINALITIES]
METHODS = {
    "hash": {"method": "hash"},
    "qr product": {"method": "qr"},
    "qr concat": {"method": "qr", "operation": "concat"},
    "mlet(hash)": {"method": "hash", "mlet_dim": 64},
    "cafe": {"method": "cafe"},
    "learned_hash": {"method": "learned_hash"},
}


@pytest.fixture(scope="module")
def stats() -> dict[str, FeatureStats]:
    out = {}
    for i, n in enumerate(SCALED):
        counts = (1e6 / np.arange(1, n + 1) ** 1.1).astype(np.int64) + 1
        out[f"C{i + 1}"] = FeatureStats(np.arange(n, dtype=np.int64) * 7919 + 1, counts)
    return out


CASES = [(m, r, "frequency") for m in METHODS for r in (10, 100, 1000)] + [
    (m, r, rule) for m in ("hash", "cafe") for r in (10, 1000) for rule in ("fill", "uniform",
                                                                            "sqrt")]


@pytest.mark.parametrize(("method", "ratio", "rule"), CASES)
def test_every_method_meets_the_budget_within_five_percent_or_says_how_far_it_can_go(
    method: str, ratio: float, rule: str, stats: dict[str, FeatureStats]
) -> None:
    config = CollectionConfig(dim=16, cardinalities=SCALED, ratio=ratio, method=METHODS[method],
                              allocation=rule)
    target = config.target_bytes()
    assert target == int(config.uncompressed_bytes() / ratio)
    try:
        allocated = config.allocate(stats)
    except ValueError as e:
        # Only QR has a floor (2·sqrt(n) rows a feature) above these budgets.
        assert method.startswith("qr"), e
        reach = float(str(e).split("largest ratio it can reach here is ")[1].rstrip("x"))
        assert str(e).startswith("ratio: ") and 1 < reach < ratio
        return
    assert 0.95 * target <= allocated.planned_bytes <= target
    assert allocated.planned_bytes == sum(allocated.feature_bytes.values())


@pytest.mark.parametrize("method", ["hash", "cafe", "mlet(hash)"])
def test_built_collections_hold_the_planned_bytes(method: str) -> None:
    config = CollectionConfig(dim=16, cardinalities=SCALED, ratio=100, method=METHODS[method])
    col = EmbeddingCollection(config)
    allocated = config.allocate()
    assert allocated is not None
    # CAFE's plan counts its frozen id map full (a fresh sketch maps nothing yet).
    reserved = sum(e.sketch.buckets * e.sketch.slots * 12 for e in col.embeddings.values()
                   if hasattr(e, "sketch"))
    assert (reserved > 0) == (method == "cafe")
    assert col.serving_bytes() + reserved == allocated.planned_bytes
    assert 0.95 * config.target_bytes() <= allocated.planned_bytes <= config.target_bytes()


def test_fill_keeps_small_features_whole_while_each_costs_at_most_an_equal_share() -> None:
    config = CollectionConfig(dim=16, cardinalities=SCALED, ratio=100, method=METHODS["hash"],
                              allocation="fill")
    allocated = config.allocate()
    sizes = config.sizes()
    whole = sorted(allocated.whole, key=lambda name: sizes[name])
    compressed = [n for n in sizes if n not in whole]
    assert whole and compressed
    assert max(sizes[n] for n in whole) <= min(sizes[n] for n in compressed)
    # The next feature would have cost more than its share of what was left.
    left = config.target_bytes() - sum(budget.uncompressed_bytes(sizes[n], 16) for n in whole)
    nxt = min(compressed, key=lambda name: sizes[name])
    assert budget.uncompressed_bytes(sizes[nxt], 16) * len(compressed) > left
    for name in compressed:
        assert allocated.configs[name].ratio == pytest.approx(allocated.ratio)


def test_uniform_is_the_artifact_rule_and_sqrt_gives_small_features_more() -> None:
    kw = {"dim": 16, "cardinalities": SCALED, "ratio": 1000, "method": METHODS["hash"]}
    uniform = CollectionConfig(**kw, allocation="uniform").allocate()
    sizes = dict(zip(CollectionConfig(**kw).feature_names, SCALED, strict=True))
    assert set(uniform.whole) == {n for n, v in sizes.items() if v <= 2000 / uniform.ratio}
    sqrt = CollectionConfig(**kw, allocation="sqrt").allocate()
    largest = max(SCALED)
    for name, n in sizes.items():
        if name not in sqrt.whole:
            expected = sqrt.ratio * math.sqrt(n / largest)
            assert sqrt.configs[name].ratio == pytest.approx(expected)
    big, small = max(sizes, key=sizes.get), "C11"  # 2,953 values
    assert sqrt.configs[small].ratio < sqrt.configs[big].ratio
    assert uniform.configs[small].ratio == uniform.configs[big].ratio


def test_the_plan_prints_each_feature_and_requested_against_planned() -> None:
    config = CollectionConfig(dim=16, cardinalities=SCALED, ratio=100, method=METHODS["cafe"])
    lines = config.allocate().describe(config.sizes(), 16)
    assert len(lines) == 2 + len(SCALED)
    assert "whole" in "\n".join(lines) and "cafe" in lines[1 + SCALED.index(max(SCALED))]
    assert lines[-1].startswith(f"  requested {config.target_bytes():,} serving bytes (100.0x)")


def test_frequency_gives_each_feature_the_rows_its_frequent_ids_earn(
    stats: dict[str, FeatureStats],
) -> None:
    config = CollectionConfig(dim=16, cardinalities=SCALED, ratio=100, method=METHODS["hash"],
                              allocation="frequency")
    allocated = config.allocate(stats)
    threshold = allocated.ratio
    factors = []
    for name, n in config.sizes().items():
        counts = stats[name].counts.double()
        # A row per id seen at least `threshold` times, (count / threshold)² of one per rarer
        # id; a feature earning half its rows or more stays whole.
        earned = float((torch.clamp(counts / threshold, max=1.0) ** 2).sum())
        if name in allocated.whole:
            assert earned >= n / 2 - 1e-6
        else:
            factors.append(allocated.configs[name].ratio * earned / n)
    # Every compressed feature's ratio is n / earned, scaled by one factor (the top-up).
    assert factors and max(factors) == pytest.approx(min(factors), rel=1e-6)
    assert 0.95 * config.target_bytes() <= allocated.planned_bytes <= config.target_bytes()
    assert allocated.whole and len(allocated.whole) < len(SCALED)
    with pytest.raises(ValueError, match="allocation 'frequency' ranks ids by their counts"):
        config.allocate()


def test_auto_ranks_by_frequency_with_statistics_and_by_sqrt_without(
    stats: dict[str, FeatureStats],
) -> None:
    config = CollectionConfig(dim=16, cardinalities=SCALED, ratio=100, method=METHODS["hash"])
    assert config.allocation == "auto"
    assert config.allocate(stats).rule == "frequency"
    assert config.allocate().rule == "sqrt"
    partial = {"C1": stats["C1"]}
    assert config.allocate(partial).rule == "sqrt"
