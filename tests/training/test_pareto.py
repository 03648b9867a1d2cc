"""The Pareto front, the best model under a budget, and the files a search writes."""

from __future__ import annotations

import csv
import itertools
import random

import pytest

from training.search import pareto


def _brute_force_front(rows):
    """Non-dominated rows by the definition: no other row at least as good on both
    objectives and better on one."""
    return [
        a for a in rows
        if not any(b is not a and b["validation_auc"] >= a["validation_auc"]
                   and b["serving_bytes"] <= a["serving_bytes"]
                   and (b["validation_auc"] > a["validation_auc"]
                        or b["serving_bytes"] < a["serving_bytes"])
                   for b in rows)
    ]


@pytest.mark.parametrize("seed", range(20))
def test_front_is_exactly_the_non_dominated_set(seed):
    rng = random.Random(seed)
    # Few distinct values, so equal bytes, equal AUCs and exact ties all occur.
    rows = [{"trial": i, "validation_auc": rng.choice([0.70, 0.71, 0.72, 0.73, 0.74]),
             "serving_bytes": rng.choice([1000, 2000, 3000, 5000])} for i in range(25)]
    front = pareto.pareto_front(rows)
    assert sorted(r["trial"] for r in front) == sorted(r["trial"] for r in _brute_force_front(rows))
    # Ascending bytes, rising AUC: the shape the plot draws.
    for a, b in itertools.pairwise(front):
        assert a["serving_bytes"] <= b["serving_bytes"]
        assert a["validation_auc"] <= b["validation_auc"]


def test_rows_without_both_objectives_take_no_part():
    rows = [
        {"trial": "a", "validation_auc": 0.7, "serving_bytes": 100},
        {"trial": "b", "validation_auc": None, "serving_bytes": 10},
        {"trial": "c", "validation_auc": float("nan"), "serving_bytes": 10},
        {"trial": "d", "validation_auc": 0.9},
    ]
    assert [r["trial"] for r in pareto.pareto_front(rows)] == ["a"]


def test_best_under_budget_is_the_highest_auc_that_fits():
    rows = [{"trial": "small", "validation_auc": 0.70, "serving_bytes": 100},
            {"trial": "mid", "validation_auc": 0.75, "serving_bytes": 500},
            {"trial": "mid-tie", "validation_auc": 0.75, "serving_bytes": 400},
            {"trial": "big", "validation_auc": 0.80, "serving_bytes": 5000}]
    assert pareto.best_under_budget(rows, None)["trial"] == "big"
    assert pareto.best_under_budget(rows, 1000)["trial"] == "mid-tie"
    assert pareto.best_under_budget(rows, 100)["trial"] == "small"
    assert pareto.best_under_budget(rows, 99) is None


def test_tables(tmp_path):
    rows = [{"trial": "t1", "method": "qr", "validation_auc": 0.712345, "serving_bytes": 2048,
             "ratio": 104.79827114829882},
            {"trial": "t|2", "method": "hash", "validation_auc": 0.7, "serving_bytes": 1536}]
    columns = ["trial", "method", "validation_auc", "serving_bytes", "ratio", "missing"]
    path = pareto.write_csv(rows, tmp_path / "front.csv", columns)
    with path.open() as f:
        read = list(csv.DictReader(f))
    assert [r["trial"] for r in read] == ["t1", "t|2"]
    assert read[0]["serving_bytes"] == "2048" and read[0]["missing"] == ""
    assert float(read[0]["validation_auc"]) == 0.712345, "the CSV keeps every digit"
    table = pareto.markdown_table(rows, columns).splitlines()
    assert table[0] == "| trial | method | validation_auc | serving_bytes | ratio | missing |"
    assert table[2] == "| t1 | qr | 0.7123 | 2,048 (2 KiB) | 104.8 |  |"
    assert "t\\|2" in table[3], "a pipe in a cell must not split the row"
    assert pareto.format_bytes(1536) == "1.5 KiB"
    assert pareto.format_bytes(3 * 1024**3) == "3 GiB"


def _png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    assert data[12:16] == b"IHDR"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


@pytest.mark.parametrize("budget", [None, 3000])
def test_plot_is_a_valid_png(tmp_path, budget):
    import matplotlib.image

    rows = [{"trial": i, "method": m, "status": s, "validation_auc": a, "serving_bytes": b}
            for i, (m, s, a, b) in enumerate([("hash", "finished", 0.70, 1000),
                                              ("qr", "finished", 0.72, 4000),
                                              ("cafe", "stopped", 0.65, 2000),
                                              ("cafe", "finished", 0.74, 90000)])]
    front = pareto.pareto_front([r for r in rows if r["status"] == "finished"])
    path = pareto.plot_front(rows, front, tmp_path / "plot" / "front.png", budget=budget)
    width, height = _png_size(path)
    assert (width, height) == (880, 550)  # 8 × 5 inches at 110 dpi
    image = matplotlib.image.imread(path)
    assert image.shape[:2] == (height, width)


def test_plot_of_nothing_still_writes_a_png(tmp_path):
    path = pareto.plot_front([], [], tmp_path / "empty.png", budget=1000)
    assert _png_size(path) == (880, 550)


def test_rungs_lie_before_the_last_step():
    assert pareto.rungs(40, 2, 120) == [40, 80]
    assert pareto.rungs(30, 2, 120) == [30, 60]  # never at the last step: trials end there
    assert pareto.rungs(10, 3, 10) == []  # grace = trial length: nothing can be stopped
    assert pareto.rungs(5, 1.5, 20) == [5, 8, 11, 17]


def test_pareto_rungs_stop_only_trials_dominated_at_the_same_rung():
    rungs = pareto.ParetoRungs([10, 20])
    assert not rungs.should_stop("big", 10, auc=0.70, nbytes=1000)
    # Lower AUC but fewer bytes: could end on the front, so it goes on (ASHA would stop it).
    assert not rungs.should_stop("small", 10, auc=0.60, nbytes=100)
    # Worse on both counts than "big" at this rung: stopped.
    assert rungs.should_stop("worse", 10, auc=0.65, nbytes=2000)
    # Between rungs nothing is decided; a trial is judged once per rung.
    assert not rungs.should_stop("small", 15, auc=0.10, nbytes=100)
    assert not rungs.should_stop("small", 10, auc=0.10, nbytes=100)
    # At the next rung only the trials that reached it count.
    assert not rungs.should_stop("small", 20, auc=0.61, nbytes=100)
    assert rungs.should_stop("big", 20, auc=0.60, nbytes=1000)
    # An exact tie dominates nobody.
    assert not rungs.should_stop("twin", 20, auc=0.61, nbytes=100)
