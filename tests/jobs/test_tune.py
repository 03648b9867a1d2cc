"""The search job: its config, a real small search on Ray Tune, budget mode, and resume."""

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

from embeddings.metrics import roc_auc
from embeddings.serving import load_model
from jobs import pareto
from jobs.cli import COMMANDS
from jobs.config import ConfigError, load_config
from jobs.tune import STARTS_FILE, build_parser, run_search
from jobs.tune_config import TuneConfig

REPO = Path(__file__).resolve().parents[2]


def _raw(data, tmp_path, name, **overrides) -> dict:
    """A tiny search: 10-step trials, one worker each at half a CPU, two at a time."""
    raw = {
        "data": {"path": str(data), "batch_size": 1024, "eval_batch_size": 32768},
        "model": "dlrm-small",
        "schedule": {"max_steps": 10, "eval_every": 5, "log_every": 5},
        "scaling": {"num_workers": 1, "cpus_per_worker": 0.5},
        "run": {"name": name, "storage_path": str(tmp_path / "tune")},
        "search": {
            "methods": {"hash": {}, "qr": {"operation": ["sum", "concat"]},
                        "cafe": {"hash_share": {"low": 0.3, "high": 0.7}}, "learned_hash": {}},
            "mlet": [0, 2],
            # QR reaches about 36x on this data (2·sqrt(n) rows a feature): beyond, its
            # trials are skipped (test_a_point_out_of_a_methods_reach_is_a_skipped_trial).
            "ratio": {"low": 10, "high": 30, "log": True},
            "embedding_dim": [8, 16],
            "quantize": ["none", "int8"],
        },
        "objective": {"mode": "pareto", "max_serving_bytes": 150_000},
        # No rung before the last step: the scheduler runs but stops no trial, because
        # freeing a stopped trial's workers needs the dashboard's state API, which the
        # test cluster does not start (the rung logic is tested in test_pareto.py).
        "asha": {"enabled": True, "grace_steps": 10},
        "trials": {"num_samples": 4, "max_concurrent_trials": 2, "seed": 7},
    }
    for key, value in overrides.items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
    return raw


def _config(data, tmp_path, name, **overrides) -> TuneConfig:
    return TuneConfig.model_validate(_raw(data, tmp_path, name, **overrides))


# ----------------------------------------------------------------------- without Ray

def _invalid(tmp_path, **overrides) -> str:
    with pytest.raises(ValueError) as e:
        _config(tmp_path / "data", tmp_path, "x", **overrides)
    return str(e.value)


def test_config_errors_name_the_field(tmp_path):
    assert "methods.nope: unknown method" in _invalid(tmp_path, search={"methods": {"nope": {}}})
    message = _invalid(tmp_path, search={"methods": {"cafe": {"treshold": [1, 2]}}})
    assert "methods.cafe.treshold: no such field" in message and "threshold" in message
    assert "set by the search" in _invalid(tmp_path, search={"methods": {"hash": {"ratio": 5}}})
    assert "k/d must be 0" in _invalid(tmp_path, search={"mlet": [0, 1]})
    assert "hash_share" in _invalid(
        tmp_path, search={"methods": {"cafe": {"hash_share": {"low": 0.5, "high": 1.5}}}})
    # QR by concatenation splits the width in two: an odd width is refused up front.
    assert "even width" in _invalid(
        tmp_path, search={"methods": {"qr": {"operation": "concat"}}, "embedding_dim": [7, 8]})
    assert "quantize" in _invalid(tmp_path, search={"quantize": ["int3"]})
    assert "needs max_serving_bytes" in _invalid(tmp_path, objective={"mode": "budget",
                                                                      "max_serving_bytes": None})
    assert "schedule.eval_every" in _invalid(tmp_path, schedule={"eval_every": None})


def test_yaml_config_errors_name_the_file_and_field(tmp_path):
    path = tmp_path / "bad.yaml"
    raw = _raw(tmp_path / "data", tmp_path, "x")
    raw["trials"]["num_samples"] = 0
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"trials\.num_samples"):
        load_config(path, TuneConfig)


def test_every_drawn_point_makes_a_valid_training_config(tmp_path):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    config = _config(tmp_path / "data", tmp_path, "x",
                     search={"methods": {"qr": {"operation": ["product", "sum"]}, "hash": {}},
                             "mlet": [0, 2, 4], "dense_lr": {"low": 1e-4, "high": 1e-2,
                                                              "log": True}})
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(60):
        point = config.search.draw(study.ask())
        train = config.trial_config(point, tmp_path / "trial")
        method = train.embeddings["method"]
        seen.add((method["method"], method.get("operation"), point["mlet"]))
        dim = point["embedding_dim"]
        assert train.model_spec.embedding_dim == dim == train.embeddings["dim"]
        assert train.model_spec.bottom_mlp[-1] == dim  # DLRM dots it with the embeddings
        assert method.get("mlet_dim") == (point["mlet"] * dim or None)
        assert 1e-4 <= train.optimizer.dense_lr <= 1e-2
        assert train.export.out == tmp_path / "trial" / "model"
        assert train.run_dir == (tmp_path / "trial" / "train").resolve()
        # The training job's own validation accepts it once cardinalities are known.
        train.collection([50_000] * 26)
    # QR by product never gets MLET (the projection cannot fold through a product) ...
    assert all(k == 0 for m, op, k in seen if op == "product")
    # ... while the linear combiners get every MLET width.
    assert {k for m, op, k in seen if m == "hash"} == {0, 2, 4}


def test_cli_lists_tune_and_help_explains_resume():
    assert COMMANDS["tune"][0] == "jobs.tune"
    text = build_parser().format_help()
    assert "--resume" in text and "pareto.png" in text and "best_model" in text


# ----------------------------------------------------------------------- on Ray

def test_planned_serving_bytes_are_the_exported_bytes(synth_data, ray_cluster, tmp_path):
    """What budget mode refuses trials on: exact for stateless mappers (learned hashing
    included, which the training job could not even plan without its statistics)."""
    from jobs.train import plan_run
    from jobs.train_loop import train_loop_per_worker
    from jobs.tune import planned_serving_bytes

    config = _config(synth_data, tmp_path, "bytes")
    point = {"method": "learned_hash", "mlet": 2, "ratio": 30.0, "embedding_dim": 8,
             "sparse_lr": 0.05, "dense_lr": 1e-3, "quantize": "int4"}
    train = config.trial_config(point, tmp_path / "trial")
    train = train.model_copy(update={
        "scaling": train.scaling.model_copy(update={"num_workers": 0}),
        "schedule": train.schedule.model_copy(update={"max_steps": 2, "eval_every": None}),
    })
    spec = plan_run(train, verbose=False)
    planned = planned_serving_bytes(spec, train)
    train_loop_per_worker({"spec": spec.__dict__})
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
    config = _config(synth_data, tmp_path, "search")
    result = run_search(config)
    assert result.complete
    exp = result.experiment_dir

    # Every trial trained to the end and reported both objectives.
    rows = result.rows
    assert len(rows) == 4
    for r in rows:
        assert r["status"] == "finished", r
        assert 0.0 < r["validation_auc"] < 1.0 and 0.0 < r["test_auc"] < 1.0
        assert isinstance(r["serving_bytes"], int) and r["serving_bytes"] > 0
        assert r["step"] == 10
    assert len({r["trial"] for r in rows}) == 4

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
    config = _config(synth_data, tmp_path, "budget",
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
    config = _config(synth_data, tmp_path, "reach",
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
    from jobs.tune import ensure_ray, run_search
    from jobs.tune_config import TuneConfig


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
    raw = _raw(synth_data, tmp_path, "resume",
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
