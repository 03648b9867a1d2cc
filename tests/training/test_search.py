"""The search on Ray Tune: planned bytes, a real small search, budget mode, a skipped
trial, and an interrupted search resumed by the job."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from search_helpers import raw_search, search_config

from embeddings.metrics import roc_auc
from embeddings.serving import load_model
from training.search import pareto
from training.search.driver import run_search
from training.search.trial import STARTS_FILE

REPO = Path(__file__).resolve().parents[2]


def test_planned_serving_bytes_are_the_exported_bytes(synth_data, ray_cluster, tmp_path):
    """What budget mode refuses trials on: exact for stateless mappers (learned hashing
    included, which the training job could not even plan without its statistics)."""
    from training.plan import plan_run
    from training.search.trial import planned_serving_bytes
    from training.worker import train_loop_per_worker

    config = search_config(synth_data, tmp_path, "bytes")
    point = {"method": "learned_hash", "mlet": 2, "ratio": 30.0, "embedding_dim": 8,
             "sparse_lr": 0.05, "dense_lr": 1e-3, "quantize": "int4"}
    train = config.trial_config(point, tmp_path / "trial")
    train = train.model_copy(update={
        "scaling": train.scaling.model_copy(update={"num_workers": 0}),
        "schedule": train.schedule.model_copy(update={"max_steps": 2, "eval_every": None}),
    })
    spec = plan_run(train, verbose=False)
    planned = planned_serving_bytes(spec, train)
    train_loop_per_worker({"spec": spec})
    model, document = load_model(train.export_dir)
    assert planned == model.embedding_bytes() == document["metrics"]["serving_bytes"]
    assert document["quantize"] == "int4"


def _read_csv(path: Path) -> list[dict]:
    with path.open() as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        r["validation_auc"] = float(r["validation_auc"]) if r["validation_auc"] else None
        r["serving_bytes"] = int(r["serving_bytes"]) if r["serving_bytes"] else None
    return rows


def _scalar_tags(logdir: Path) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(logdir))
    events.Reload()
    return set(events.Tags()["scalars"])


def _validation_auc_of(model, data: Path) -> float:
    from data_pipeline.datasets import iter_local_batches

    logits, labels = [], []
    for batch in iter_local_batches(data, "validation", 16384):
        logits.append(model(batch["dense"], batch["sparse"]))
        labels.append(batch["label"])
    scores = torch.cat(logits)
    assert torch.isfinite(scores).all()
    return roc_auc(scores.numpy(), torch.cat(labels).numpy())


@pytest.mark.slow
def test_small_search_reports_every_trial_the_front_and_the_best_model(
    synth_data, ray_cluster, tmp_path
):
    config = search_config(synth_data, tmp_path, "search")
    result = run_search(config)
    assert result.complete
    exp = result.experiment_dir

    # Every trial trained to the end and reported both objectives.
    rows = result.rows
    assert len(rows) == 3
    for r in rows:
        assert r["status"] == "finished", r
        assert 0.0 < r["validation_auc"] < 1.0 and 0.0 < r["test_auc"] < 1.0
        assert isinstance(r["serving_bytes"], int) and r["serving_bytes"] > 0
        assert r["step"] == 10
    assert len({r["trial"] for r in rows}) == 3

    # The reported front is exactly the non-dominated set, recomputed from trials.csv.
    written = _read_csv(exp / "trials.csv")
    expected = {
        a["trial"] for a in written
        if not any(b["validation_auc"] >= a["validation_auc"]
                   and b["serving_bytes"] <= a["serving_bytes"]
                   and (b["validation_auc"] > a["validation_auc"]
                        or b["serving_bytes"] < a["serving_bytes"]) for b in written)
    }
    assert {r["trial"] for r in _read_csv(exp / "pareto.csv")} == expected
    assert {r["trial"] for r in result.front} == expected
    assert {r["trial"] for r in written if r["on_front"] == "1"} == expected
    markdown = (exp / "pareto.md").read_text()
    assert all(f"| {t} |" in markdown for t in expected)

    # The best under the budget is exported, loads, and scores as its trial reported.
    budget = config.objective.max_serving_bytes
    fitting = [r for r in rows if r["serving_bytes"] <= budget]
    assert fitting, "the test's budget must admit at least one of its trials"
    best = max(fitting, key=lambda r: r["validation_auc"])
    assert result.best["trial"] == best["trial"]
    model, document = load_model(exp / "best_model")
    assert model.embedding_bytes() == best["serving_bytes"] <= budget
    assert document["quantize"] == best["quantize"]
    # The search ranks what it serves: a quantised model's own AUC, not its trained one's.
    assert _validation_auc_of(model, synth_data) == pytest.approx(best["validation_auc"],
                                                                  abs=1e-6)

    # TensorBoard curves for every trial: Tune's logger, and the training loop's own.
    for r in rows:
        trial_dir = Path(r["trial_dir"])
        assert trial_dir.parent == exp
        assert list(trial_dir.glob("events.out.tfevents.*")), trial_dir
        tags = _scalar_tags(trial_dir)
        assert {"ray/tune/validation_auc", "ray/tune/serving_bytes"} <= tags
        assert "validation/auc" in _scalar_tags(trial_dir / "train" / "tensorboard")

    # The plot is a real PNG.
    png = (exp / "pareto.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    assert matplotlib.image.imread(exp / "pareto.png").shape[:2] == (550, 880)
    summary = json.loads((exp / "summary.json").read_text())
    assert summary["best"]["trial"] == best["trial"] and summary["complete"]


@pytest.mark.slow
def test_budget_mode_never_trains_a_trial_that_cannot_fit(synth_data, ray_cluster, tmp_path):
    # 4 KiB cannot hold even the uncompressed small features: every trial is refused
    # from its planned bytes, before any training.
    config = search_config(synth_data, tmp_path, "budget",
                     objective={"mode": "budget", "max_serving_bytes": 4096},
                     trials={"num_samples": 3, "max_concurrent_trials": 2, "seed": 1})
    result = run_search(config)
    assert result.complete
    assert [r["status"] for r in result.rows] == ["skipped"] * 3
    for r in result.rows:
        assert r["serving_bytes"] > 4096 and r["validation_auc"] is None
        assert not (Path(r["trial_dir"]) / "train").exists(), "no training run may start"
    assert result.best is None and not (result.experiment_dir / "best_model").exists()
    assert "nothing exported" in (result.experiment_dir / "pareto.md").read_text()
    assert (result.experiment_dir / "pareto.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_a_point_out_of_a_methods_reach_is_a_skipped_trial(synth_data, ray_cluster, tmp_path):
    # QR cannot go below 2·sqrt(n) rows a feature: 300x is out of its reach on this data.
    config = search_config(synth_data, tmp_path, "reach",
                     search={"methods": {"qr": {"operation": ["sum"]}}, "mlet": [0],
                             "ratio": {"low": 300, "high": 400}, "embedding_dim": [16],
                             "quantize": ["none"]},
                     trials={"num_samples": 1, "max_concurrent_trials": 1, "seed": 1})
    result = run_search(config)
    (row,) = result.rows
    assert row["status"] == "skipped" and row["method"] == "qr"
    assert row["serving_bytes"] > 0 and result.best is None
    assert not (Path(row["trial_dir"]) / "train").exists(), "no training run may start"


# A search that Ctrl+C stops (a real SIGINT, through Tune's own handler) when its second
# trial completes. The callback is stored with the experiment, so it fires only once.
_INTERRUPTED_SEARCH = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path

    import ray.tune

    from jobs.config import load_config
    from jobs.ray_session import ensure_ray
    from training.search.config import TuneConfig
    from training.search.driver import run_search


    class InterruptOnce(ray.tune.Callback):
        def __init__(self, after, marker):
            self.after, self.marker, self.completed = after, marker, 0

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.completed += 1
            if self.completed == self.after and not self.marker.exists():
                self.marker.write_text(trial.trial_id)
                os.kill(os.getpid(), signal.SIGINT)


    ensure_ray()
    config = load_config(sys.argv[1], TuneConfig)
    result = run_search(config, callbacks=[InterruptOnce(2, Path(sys.argv[2]))])
    sys.exit(0 if result.complete else 130)
""")


def _starts(trial_dir: Path) -> int:
    path = trial_dir / STARTS_FILE
    return len(path.read_text().splitlines()) if path.exists() else 0


def _finished_trials(exp: Path) -> dict[str, float]:
    """Trials whose final report (test AUC, exported model) reached Tune: id → AUC."""
    done = {}
    for result in exp.glob("trial_*/result.json"):
        for line in result.read_text().splitlines():
            report = json.loads(line)
            if report.get("final"):
                done[result.parent.name] = report["validation_auc"]
    return done


@pytest.mark.slow
def test_an_interrupted_search_resumes_without_rerunning_finished_trials(
    synth_data, ray_cluster, tmp_path
):
    raw = raw_search(synth_data, tmp_path, "resume",
               schedule={"max_steps": 10, "eval_every": 5, "log_every": 5,
                         "checkpoint_every": 5},
               trials={"num_samples": 3, "max_concurrent_trials": 2, "seed": 3})
    path = tmp_path / "tune_resume.yaml"
    path.write_text(yaml.safe_dump(raw))
    # Like `ray job submit`: the job joins the running cluster through RAY_ADDRESS.
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
    first = subprocess.run([sys.executable, "-c", _INTERRUPTED_SEARCH, str(path),
                            str(tmp_path / "interrupted")],
                           cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert first.returncode == 130, first.stdout[-3000:] + first.stderr[-3000:]
    exp = tmp_path / "tune" / "resume"
    finished = _finished_trials(exp)
    assert len(finished) >= 2, finished
    starts_before = {d.name: _starts(d) for d in exp.glob("trial_*")}
    assert all(starts_before[t] == 1 for t in finished)
    assert len(finished) < 3, "the interrupt must leave a trial to resume"
    assert not json.loads((exp / "summary.json").read_text())["complete"]

    second = subprocess.run([sys.executable, "-m", "jobs.tune", "--config", str(path),
                             "--resume"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    rows = _read_csv(exp / "trials.csv")
    assert len(rows) == 3 and all(r["status"] == "finished" for r in rows), rows
    trial_dirs = sorted(exp.glob("trial_*"))
    assert len(trial_dirs) == 3, "resuming must not add trials"
    for d in trial_dirs:
        if d.name in finished:
            assert _starts(d) == 1, f"{d.name} finished before the interrupt but ran again"
        else:
            assert _starts(d) == starts_before.get(d.name, 0) + 1
    # The finished trials keep the results they had.
    after = {f"trial_{r['trial']}": r["validation_auc"] for r in rows}
    for name, auc in finished.items():
        assert after[name] == pytest.approx(auc)
    assert load_model(exp / "best_model")[0] is not None
    assert pareto.pareto_front(rows), "the resumed search reports its front"
    # The job ends with its result block: the front, and where the files are, the same as
    # the experiment's summary.json.
    block = second.stdout[second.stdout.index("=== tune: result ==="):]
    summary = json.loads((exp / "summary.json").read_text())
    assert f"front           {summary['files']['pareto_csv']}" in block
    assert f"plot            {summary['files']['pareto_png']}" in block
    assert f"this summary    {exp / 'summary.json'}" in block
    best = summary["best"]
    assert f"trial {best['trial']}, validation AUC {best['validation_auc']:.4f}" in block


@pytest.mark.slow
def test_a_search_over_low_rank_starts_every_trial_from_the_trained_model(
    synth_data, ray_cluster, tmp_path
):
    from training.config import TrainConfig
    from training.plan import plan_run
    from training.worker import train_loop_per_worker

    first = TrainConfig.model_validate({
        "data": {"path": str(synth_data), "batch_size": 1024},
        "embeddings": {"method": {"method": "full"}},
        "schedule": {"max_steps": 10, "log_every": 5},
        "scaling": {"num_workers": 0},
        "run": {"storage_path": str(tmp_path / "runs"), "name": "full"},
    })
    train_loop_per_worker({"spec": plan_run(first, verbose=False)})
    trained_bytes = load_model(first.export_dir)[0].embedding_bytes()
    config = search_config(
        synth_data, tmp_path, "lowrank", from_model=str(first.export_dir),
        search={"methods": {"lowrank": {}}, "mlet": [0, 2], "ratio": [2, 4],
                "embedding_dim": 16, "quantize": "none"},
        objective={"mode": "pareto", "max_serving_bytes": trained_bytes},
        # One trial: what it proves (the trial builds from from_model, counts its bytes from
        # the trained tables, exports the projection) needs no second one.
        trials={"num_samples": 1, "max_concurrent_trials": 1, "seed": 7},
    )
    result = run_search(config)
    assert result.complete
    for r in result.rows:
        assert r["status"] == "finished", r
        assert r["serving_bytes"] < trained_bytes / 1.5
    model, _ = load_model(result.experiment_dir / "best_model")
    assert all(e.projection is not None for e in model.embeddings)


@pytest.mark.slow
def test_a_ratio_mec_cannot_reach_is_a_skipped_trial(synth_data, ray_cluster, tmp_path):
    from training.config import TrainConfig
    from training.plan import plan_run
    from training.worker import train_loop_per_worker

    first = TrainConfig.model_validate({
        "data": {"path": str(synth_data), "batch_size": 1024},
        "embeddings": {"method": {"method": "full"}},
        "schedule": {"max_steps": 2},
        "scaling": {"num_workers": 0},
        "run": {"storage_path": str(tmp_path / "runs"), "name": "full"},
    })
    train_loop_per_worker({"spec": plan_run(first, verbose=False)})
    # 12-bit codes cost 6 bytes a row: 1000x of a 16-wide table (0.064 bytes a row) is out
    # of reach, found before stage 1 fits any code.
    config = search_config(
        synth_data, tmp_path, "mec", from_model=str(first.export_dir),
        search={"methods": {"mec": {}}, "mlet": [0], "ratio": [1000],
                "embedding_dim": 16, "quantize": "none"},
        trials={"num_samples": 1, "max_concurrent_trials": 1, "seed": 1},
    )
    result = run_search(config)
    (row,) = result.rows
    assert row["status"] == "skipped" and row["method"] == "mec", row
    assert row["serving_bytes"] > 0 and result.best is None
    assert not (Path(row["trial_dir"]) / "train").exists(), "no training run may start"
