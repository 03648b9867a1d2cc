"""`python -m jobs.tune --config deploy/configs/tune_<name>.yaml`: the best model in B bytes.

Ray Tune searches compression method, ratio, width, MLET, learning rates and export
quantisation; every trial is the training job itself (`jobs.train.run`, a Ray Train run
inside the Tune trial, reporting through `TuneReportCallback`). Optuna proposes trials,
either for two objectives (validation AUC up, serving bytes down) or for AUC under a hard
byte budget; weak trials stop early at ASHA's rungs (ASHA itself under a budget; in a
Pareto search, the trials another one dominates there). The experiment folder gets the
Pareto front (CSV, Markdown, PNG), every trial's TensorBoard curves, and the best model
under the budget in the serving format. `--resume` continues an interrupted search
without re-running the trials that finished.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import FIFOScheduler, TrialScheduler

from embeddings.allocation import BudgetUnreachable
from jobs import pareto
from jobs.config import ConfigError, load_config
from jobs.train import add_override_arguments, checked_config, overrides
from jobs.train_config import TrainConfig
from jobs.tune_config import TuneConfig

if TYPE_CHECKING:
    from jobs.train_loop import RunSpec

# Written by each trial when it starts (one line per start): a restarted trial shows twice.
STARTS_FILE = "trial_starts.log"
SEARCH_CONFIG_FILE = "search_config.json"
BEST_MODEL_DIR = "best_model"
TRIAL_DIR = "trial_{}"  # a trial's folder in the experiment, by trial id
EXIT_INTERRUPTED = 130  # the shell's code for a run ended by SIGINT
UNFINISHED = frozenset({"PENDING", "RUNNING", "PAUSED"})  # Tune trial statuses
TRIAL_COLUMNS = [
    "trial", "status", "method", "method_settings", "mlet", "ratio", "embedding_dim",
    "sparse_lr", "dense_lr", "quantize", "step", "validation_auc", "test_auc",
    "serving_bytes", "within_budget", "on_front", "model",
]
FRONT_COLUMNS = [
    "trial", "method", "method_settings", "mlet", "ratio", "embedding_dim", "quantize",
    "validation_auc", "test_auc", "serving_bytes", "within_budget",
]


# --------------------------------------------------------------------------- in the trial

def planned_serving_bytes(spec: RunSpec, config: TrainConfig) -> int:
    """Bytes of the serving embeddings this run will export, from meta-device builds.

    Exact for stateless mappers; for CAFE a lower bound (its frozen hot-id map grows while
    training). Counted shard by shard, as the workers build them.
    """
    from data_pipeline.stats import load_feature_stats
    from embeddings.methods.base import FeatureStats
    from embeddings.sharding.planner import ShardingPlan, shard_of

    fmt = "fp32" if config.export.quantize == "none" else config.export.quantize
    dim = config.model_spec.table_dim  # d, + 1 for a first-order column
    plan = ShardingPlan.model_validate(spec.plan)
    stats = None
    total = 0
    for feature in plan.features:
        i = spec.names.index(feature.name)
        method = spec.method(feature.name)
        feature_stats = None
        if method.method in ("full", "learned_hash"):  # their mappers hold the vocabulary
            stats = stats or load_feature_stats(config.data.path)
            feature_stats = FeatureStats(*stats.counts(feature.name))
        for s in range(feature.num_shards):
            part = feature_stats
            if part is not None and feature.num_shards > 1:
                keep = shard_of(part.values, feature.num_shards) == s
                part = FeatureStats(part.values[keep], part.counts[keep])
            n = math.ceil(spec.cardinalities[i] / feature.num_shards)
            total += method.planned_bytes(n, dim, part, fmt).serving
    return total


def budget_penalty(serving_bytes: float, budget: int) -> float:
    """Objective of a trial over the budget: below any AUC, and worse the further over."""
    return -serving_bytes / budget


def search_metrics(reported: dict[str, Any], planned: int, budget: int | None, mode: str,
                   max_steps: int) -> dict[str, Any]:
    """A training report with the search's own metrics added.

    Every report gets serving_bytes (the planned bytes until the final report measures
    them), so a trial ASHA stops still has both objectives. `asha_step`, ASHA's clock, is
    the step of reports before the last step only: from its last evaluation on, a trial
    must reach its final reports (test AUC, exported model, the served model's AUC).
    """
    out = {"planned_serving_bytes": planned, "serving_bytes": planned, **reported}
    out["final"] = int("test_auc" in reported)
    step = reported.get("step")
    if step is not None and step < max_steps:
        out["asha_step"] = step
    if budget is not None:
        out["within_budget"] = int(out["serving_bytes"] <= budget)
    if mode == "budget" and budget is not None:
        if not out["within_budget"]:
            out["objective"] = budget_penalty(out["serving_bytes"], budget)
        elif "validation_auc" in out:
            out["objective"] = out["validation_auc"]
    return out


class TrialReport(TuneReportCallback):
    """TuneReportCallback passing rank 0's reports on with `search_metrics` added."""

    def __init__(self, planned: int, budget: int | None, mode: str, max_steps: int) -> None:
        super().__init__()
        self.planned, self.budget, self.mode, self.max_steps = planned, budget, mode, max_steps

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]],
                     checkpoint: Any) -> None:
        if metrics:
            enriched = search_metrics(metrics[0], self.planned, self.budget, self.mode,
                                      self.max_steps)
            metrics = [enriched, *metrics[1:]]
        super().after_report(run_context, metrics, checkpoint)


def served_auc(model_dir: Path, data: Path, batch_size: int) -> dict[str, float]:
    """Validation and test AUC of the exported model itself, scored in this process.

    The training job evaluates the model it trained; a quantised export scores slightly
    differently, and the search must rank what it would serve.
    """
    import torch

    from data_pipeline.datasets import iter_local_batches
    from embeddings.metrics import roc_auc
    from embeddings.serving import load_model

    model, _ = load_model(model_dir)
    out = {}
    for split in ("validation", "test"):
        scores, labels = [], []
        for batch in iter_local_batches(data, split, batch_size):
            scores.append(model(batch["dense"], batch["sparse"]))
            labels.append(batch["label"])
        out[f"{split}_auc"] = roc_auc(torch.cat(scores).numpy(), torch.cat(labels).numpy())
    return out


def run_trial(point: dict[str, Any], search: dict[str, Any]) -> None:
    """The Tune trainable: one point of the space, trained by the training job itself."""
    import ray.tune

    from jobs.train import plan_run, run

    config = TuneConfig.model_validate(search)
    # The trial's folder in the experiment's storage, not get_trial_dir(): that is a
    # per-session staging folder on the trial's node, which a resumed search replaces, so
    # the Ray Train run (its checkpoints) and the model must not live there.
    trial_dir = config.experiment_dir / TRIAL_DIR.format(ray.tune.get_context().get_trial_id())
    trial_dir.mkdir(parents=True, exist_ok=True)
    with (trial_dir / STARTS_FILE).open("a") as f:
        f.write(f"{time.time():.3f} pid={os.getpid()}\n")
    train_config = config.trial_config(point, trial_dir)
    budget = config.objective.max_serving_bytes
    mode = config.objective.mode
    try:
        spec = plan_run(train_config, verbose=False)
    except ConfigError as e:
        if not isinstance(e.__cause__, BudgetUnreachable):
            raise
        # A point of the space the method cannot reach (QR's floor): a trial that never
        # trains, ranked below every trained one, its smallest bytes on the record.
        print(f"[tune] trial {trial_dir.name}: {point} → {e}", flush=True)
        smallest = e.__cause__.smallest_bytes
        report = {"planned_serving_bytes": smallest, "serving_bytes": smallest,
                  "within_budget": 0, "skipped": 1, "final": 1,
                  "objective": budget_penalty(smallest, budget or smallest) - 1}
        if mode == "pareto":
            report["validation_auc"] = 0.5  # chance: a Pareto searcher needs both objectives
        ray.tune.report(report)
        return
    planned = planned_serving_bytes(spec, train_config)
    print(f"[tune] trial {trial_dir.name}: {point} → planned serving bytes {planned:,}",
          flush=True)
    if mode == "budget" and budget is not None and planned > budget:
        # Its bytes only grow while training (CAFE) or stay put: it can never fit.
        ray.tune.report({"planned_serving_bytes": planned, "serving_bytes": planned,
                         "within_budget": 0, "skipped": 1, "final": 1,
                         "objective": budget_penalty(planned, budget)})
        return
    max_steps = train_config.schedule.max_steps or sys.maxsize
    result = run(train_config, verbose=False,
                 callbacks=[TrialReport(planned, budget, mode, max_steps)])
    if train_config.export.quantize != "none":
        # One more final report: the AUC of the quantised model this trial would serve.
        trained = dict(result.metrics or {})
        served = served_auc(train_config.export_dir, train_config.data.path,
                            train_config.data.eval_batch_size)
        report = {**trained, **served, "trained_validation_auc": trained["validation_auc"],
                  "trained_test_auc": trained["test_auc"]}
        report = {k: v for k, v in report.items() if isinstance(v, (int, float))}
        ray.tune.report(search_metrics(report, planned, budget, mode, max_steps))


def trial_dirname(trial: Any) -> str:
    """Short trial folders (Tune's default repeats the whole config in the name)."""
    return TRIAL_DIR.format(trial.trial_id)


# --------------------------------------------------------------------------- the driver

class SpaceSampler:
    """Optuna define-by-run space (a picklable callable, so searches resume)."""

    def __init__(self, config: TuneConfig) -> None:
        self.space = config.search

    def __call__(self, trial: Any) -> dict[str, Any]:
        # Drawn values are recorded by Optuna; the fixed ones reach the trial through this.
        return self.space.draw(trial)


def _searcher(config: TuneConfig) -> Any:
    from ray.tune.search.optuna import OptunaSearch

    if config.objective.mode == "pareto":
        metric: Any = ["validation_auc", "serving_bytes"]
        mode: Any = ["max", "min"]
    else:
        metric, mode = "objective", "max"
    return OptunaSearch(SpaceSampler(config), metric=metric, mode=mode, seed=config.trials.seed)


class ParetoRungScheduler(FIFOScheduler):
    """Tune's side of `pareto.ParetoRungs`: stops trials dominated at a rung."""

    def __init__(self, milestones: list[int]) -> None:
        super().__init__()
        self.rungs = pareto.ParetoRungs(milestones)
        self.num_stopped = 0

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        step, auc, nbytes = (result.get(k) for k in ("asha_step", pareto.AUC, pareto.BYTES))
        if step is None or auc is None or nbytes is None:
            return TrialScheduler.CONTINUE
        if self.rungs.should_stop(trial.trial_id, step, auc, nbytes):
            self.num_stopped += 1
            return TrialScheduler.STOP
        return TrialScheduler.CONTINUE

    def debug_string(self) -> str:
        return (f"Pareto rungs at steps {list(self.rungs.rungs)}: {self.num_stopped} trials "
                "stopped as dominated")


def _scheduler(config: TuneConfig) -> Any:
    from ray.tune.schedulers import ASHAScheduler

    if not config.asha.enabled:
        return FIFOScheduler()
    assert config.schedule.max_steps is not None
    if config.objective.mode == "pareto":
        milestones = pareto.rungs(config.asha.grace_steps, config.asha.reduction_factor,
                                  config.schedule.max_steps)
        return ParetoRungScheduler(milestones)
    # In budget mode ASHA ranks by the searcher's objective, so a trial over budget is weak.
    return ASHAScheduler(
        time_attr="asha_step", metric="objective", mode="max",
        max_t=config.schedule.max_steps, grace_period=config.asha.grace_steps,
        reduction_factor=config.asha.reduction_factor, brackets=config.asha.brackets,
        # The final report ends the trial by itself; stopping it there would only race it.
        stop_last_trials=False,
    )


def _trainable(config: TuneConfig) -> Any:
    import ray.tune

    trainable = ray.tune.with_parameters(run_trial, search=config.model_dump(mode="json"))
    return ray.tune.with_resources(trainable, {"cpu": config.trials.driver_cpus})


def build_tuner(config: TuneConfig, resume: bool = False, callbacks: list[Any] | None = None
                ) -> Any:
    """A new Tuner for the experiment folder, or (`resume`) the interrupted one restored.

    `callbacks` are extra Tune callbacks (loggers); Tune stores them with the experiment, so
    a resumed search keeps those it started with.
    """
    import ray.tune

    path = config.experiment_dir
    if resume:
        if not ray.tune.Tuner.can_restore(str(path)):
            raise ConfigError(f"--resume: {path} holds no Tune experiment to resume")
        # Finished trials are kept as they are; unfinished and failed ones run again (a
        # trial's Ray Train run then resumes from its latest checkpoint, if it has one).
        return ray.tune.Tuner.restore(str(path), trainable=_trainable(config),
                                      resume_unfinished=True, resume_errored=True)
    if ray.tune.Tuner.can_restore(str(path)):
        raise ConfigError(f"{path} already holds a search: pass --resume to continue it, or "
                          "choose another run.name")
    return ray.tune.Tuner(
        _trainable(config),
        tune_config=ray.tune.TuneConfig(
            search_alg=_searcher(config),
            scheduler=_scheduler(config),
            num_samples=config.trials.num_samples,
            max_concurrent_trials=config.trials.max_concurrent_trials,
            trial_dirname_creator=trial_dirname,
        ),
        run_config=ray.tune.RunConfig(
            name=config.run.name,
            storage_path=str(config.run.storage_path),
            failure_config=ray.tune.FailureConfig(max_failures=0),
            callbacks=callbacks,
            verbose=1,
        ),
    )


@dataclass
class SearchResult:
    """What a search leaves in its experiment folder, and where."""

    experiment_dir: Path
    rows: list[dict[str, Any]]
    front: list[dict[str, Any]]
    best: dict[str, Any] | None
    budget: int | None
    complete: bool = True
    files: dict[str, Path] = field(default_factory=dict)


def _status(result: Any, metrics: dict[str, Any], saved: str | None) -> str:
    if saved in UNFINISHED:
        return "interrupted"
    if saved == "ERROR" or result.error is not None:
        return "error"
    if metrics.get("skipped"):
        return "skipped"
    if "test_auc" in metrics:
        return "finished"
    return "stopped"


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _last_line(error: BaseException | None) -> str:
    """The message of a trial's error without Ray's traceback and terminal colours."""
    if error is None:
        return ""
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    return lines[-1] if lines else type(error).__name__


def trial_rows(results: Any, saved: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """One plain row per trial of a Tune ResultGrid (config, status, objectives, model).

    `saved`: trial folder name → the status Tune saved in the experiment state (an
    interrupted search leaves unfinished trials RUNNING or PENDING there).
    """
    rows = []
    for result in results:
        metrics = dict(result.metrics or {})
        point = dict(result.config or {})
        method = point.get("method", "")
        settings = ", ".join(f"{k.split('.', 1)[1]}={_short(v)}"
                             for k, v in sorted(point.items()) if k.startswith(f"{method}."))
        trial_dir = Path(result.path)
        status = _status(result, metrics, (saved or {}).get(trial_dir.name))
        model = trial_dir / "model"
        rows.append({
            "trial": metrics.get("trial_id") or trial_dir.name.removeprefix("trial_"),
            "status": status,
            "method": method,
            "method_settings": settings,
            "mlet": point.get("mlet"),
            "ratio": point.get("ratio"),
            "embedding_dim": point.get("embedding_dim"),
            "sparse_lr": point.get("sparse_lr"),
            "dense_lr": point.get("dense_lr"),
            "quantize": point.get("quantize"),
            "step": metrics.get("step"),
            "validation_auc": metrics.get("validation_auc"),
            "test_auc": metrics.get("test_auc"),
            "serving_bytes": metrics.get("serving_bytes"),
            "within_budget": metrics.get("within_budget"),
            "model": str(model) if status == "finished" and (model / "model.json").is_file()
            else "",
            "trial_dir": str(trial_dir),
            "error": _last_line(result.error),
        })
    rows.sort(key=lambda r: r["trial"])
    return rows


def write_results(config: TuneConfig, rows: list[dict[str, Any]], complete: bool = True
                  ) -> SearchResult:
    """The Pareto front (CSV, Markdown, PNG), every trial (CSV), and the best model
    under the budget copied to <experiment>/best_model in the serving format."""
    from embeddings.serving import load_model

    out = config.experiment_dir
    budget = config.objective.max_serving_bytes
    finished = [r for r in rows if r["status"] == "finished"]
    # Only finished trials made a model; a stopped trial's AUC is that of a half-trained one.
    front = list(pareto.pareto_front(finished))
    on_front = {r["trial"] for r in front}
    for r in rows:
        r["on_front"] = int(r["trial"] in on_front)
    best = pareto.best_under_budget(finished, budget)
    files = {
        "trials_csv": pareto.write_csv(rows, out / "trials.csv", TRIAL_COLUMNS),
        "pareto_csv": pareto.write_csv(front, out / "pareto.csv", FRONT_COLUMNS),
    }
    counts = {s: sum(r["status"] == s for r in rows)
              for s in ("finished", "stopped", "skipped", "interrupted", "error")}
    objective = ("two objectives: max validation AUC, min serving bytes"
                 if config.objective.mode == "pareto"
                 else "max validation AUC with serving bytes ≤ the budget")
    lines = [
        f"# Pareto front of `{config.run.name}`",
        "",
        f"Objective: {objective}. Budget: "
        + (f"{budget:,} bytes ({pareto.format_bytes(budget)})." if budget else "none."),
        f"Trials: {len(rows)} ({counts['finished']} finished, {counts['stopped']} stopped "
        f"early at a rung, {counts['skipped']} skipped as over budget or out of the "
        f"method's reach, {counts['interrupted']} interrupted, {counts['error']} failed)."
        + ("" if complete else " The search was interrupted: `--resume` continues it."),
        "",
        pareto.markdown_table(front, FRONT_COLUMNS),
    ]
    if best is not None:
        lines.append(f"Best under the budget: trial `{best['trial']}`, validation AUC "
                     f"{best['validation_auc']:.4f}, {best['serving_bytes']:,} serving bytes; "
                     f"exported to `{BEST_MODEL_DIR}/`.")
    else:
        lines.append("No finished trial fits the budget: nothing exported.")
    files["pareto_md"] = out / "pareto.md"
    files["pareto_md"].write_text("\n".join(lines) + "\n")
    files["pareto_png"] = pareto.plot_front(
        [r for r in rows if r["status"] in ("finished", "stopped", "interrupted")], front,
        out / "pareto.png",
        budget=budget, title=f"{config.run.name}: validation AUC against serving bytes")
    best_dir = out / BEST_MODEL_DIR
    if best is not None:
        if best_dir.exists():
            shutil.rmtree(best_dir)
        shutil.copytree(best["model"], best_dir)
        load_model(best_dir)  # a copy that does not load is no answer
        files["best_model"] = best_dir
    elif best_dir.exists():
        shutil.rmtree(best_dir)  # left over from an earlier budget
    summary = {
        "experiment": str(out),
        "objective": config.objective.model_dump(),
        "trials": counts,
        "complete": complete,
        "front": [r["trial"] for r in front],
        "best": None if best is None else {k: best[k] for k in (*FRONT_COLUMNS, "model")},
        "files": {k: str(v) for k, v in files.items()},
    }
    files["summary"] = out / "summary.json"
    files["summary"].write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return SearchResult(out, rows, front, best, budget, complete, files)


def _check_search(config: TuneConfig, resume: bool) -> None:
    """Refuse a resume whose config differs (Tune cannot change a search midway); record
    the config of a new search."""
    saved = config.experiment_dir / SEARCH_CONFIG_FILE
    current = config.model_dump(mode="json")
    if resume and saved.is_file():
        before = json.loads(saved.read_text())
        changed = sorted(k for k in set(before) | set(current) if before.get(k) != current.get(k))
        if changed:
            raise ConfigError(f"--resume: the config differs from the one the search started "
                              f"with in {changed} (see {saved}); resume with that config or "
                              "start a new run.name")
    elif not resume:
        saved.parent.mkdir(parents=True, exist_ok=True)
        saved.write_text(json.dumps(current, indent=2) + "\n")


def _warn_about_resources(config: TuneConfig, asha: bool) -> None:
    import ray

    per_trial = (config.scaling.num_workers * config.scaling.cpus_per_worker
                 + config.trials.driver_cpus)
    need = per_trial * config.trials.max_concurrent_trials
    have = ray.cluster_resources().get("CPU", 0.0)
    if need > have:
        print(f"[tune] warning: {config.trials.max_concurrent_trials} concurrent trials need "
              f"{need:g} CPUs, the cluster has {have:g}: trials will wait for workers "
              "(and may time out); lower trials.max_concurrent_trials", flush=True)
    if asha:
        try:
            from ray.util.state import list_nodes

            list_nodes(limit=1, timeout=10)
        except Exception:
            print("[tune] warning: the Ray dashboard (state API) is not reachable; Ray Train "
                  "cannot release the workers of trials ASHA stops, so later trials may fail "
                  "to start. Start Ray with the dashboard (ray start --head does).",
                  flush=True)


def run_search(config: TuneConfig, resume: bool = False, callbacks: list[Any] | None = None
               ) -> SearchResult:
    """Run (or resume) the search on the connected Ray cluster and write its results.

    An interrupted search (Ctrl+C, SIGINT) still writes the results so far, with
    `complete=False`; `resume=True` then continues it.
    """
    import ray.tune

    config = _absolute(config)
    _check_search(config, resume)
    _warn_about_resources(config, config.asha_can_stop)
    tuner = build_tuner(config, resume, callbacks)
    results = tuner.fit()
    # Tune returns normally from an interrupt. The state it saved (before stopping the
    # trials) still says which ones were unfinished; the ResultGrid no longer does.
    saved = {Path(t.path).name: t.status
             for t in ray.tune.ExperimentAnalysis(str(config.experiment_dir)).trials}
    complete = (len(saved) >= config.trials.num_samples
                and not any(s in UNFINISHED for s in saved.values()))
    return write_results(config, trial_rows(results, saved), complete)


def _absolute(config: TuneConfig) -> TuneConfig:
    # Trials run with the trial folder as working directory: relative paths would break.
    return config.model_copy(update={
        "data": config.data.model_copy(update={"path": config.data.path.resolve()}),
        "run": config.run.model_copy(update={"storage_path": config.run.storage_path.resolve()}),
    })


def ensure_ray(num_cpus: int | None = None) -> None:
    """Join RAY_ADDRESS's cluster or start a local one with its dashboard (trials show
    there, and Ray Train needs its state API to free the workers of stopped trials)."""
    from jobs.ray_session import connect_or_start

    connect_or_start(num_cpus)



def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.tune",
        description="Search compression settings with Ray Tune for the best validation AUC "
        "per serving byte: method (hash, qr, cafe, learned_hash, each with or without MLET), "
        "compression ratio, embedding width, learning rates and export quantisation. Each "
        "trial is a training run (jobs.train) on Ray Train; Optuna proposes trials for two "
        "objectives (AUC up, bytes down) or for AUC under objective.max_serving_bytes, and "
        "weak trials stop early at ASHA's rungs (in a Pareto search: those dominated there).",
        epilog="Results in <run.storage_path>/<run.name>/: pareto.csv, pareto.md, pareto.png "
        "(every trial a point, the front a line, the budget a vertical line), trials.csv, "
        "best_model/ (the best finished trial under the budget, in the serving format), "
        "summary.json, and one trial_<id>/ folder per trial with its TensorBoard events "
        "(`tensorboard --logdir <experiment>`), its Ray Train run and its model. The "
        "config holds the training job's sections (data, model, schedule, scaling, run, ...) "
        "plus search, objective, asha and trials; jobs/tune_config.py documents every field. "
        "On a cluster: ray job submit --working-dir . -- python -m jobs.tune --config ...",
    )
    parser.add_argument("--config", required=True, type=Path,
                        help="YAML search config (see deploy/configs/tune_small.yaml)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the interrupted search in the experiment folder; "
                        "finished trials are not run again")
    add_override_arguments(parser)
    parser.add_argument("--num-samples", type=int, help="override trials.num_samples")
    return parser


def load(args: argparse.Namespace) -> TuneConfig:
    config = load_config(args.config, TuneConfig)
    update = overrides(config, args)
    if args.num_samples:
        update["trials"] = config.trials.model_copy(update={"num_samples": args.num_samples})
    return TuneConfig.model_validate({**config.model_dump(), **update})


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = checked_config(load, args)
    if config is None:
        return 2
    ensure_ray(args.num_cpus)
    try:
        result = run_search(config, resume=args.resume)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(pareto.markdown_table(result.front, FRONT_COLUMNS))
    if not result.complete:
        print(f"[tune] the search was interrupted; continue it with: python -m jobs.tune "
              f"--config {args.config} --resume", flush=True)
    if result.best is not None:
        print(f"[tune] best under the budget: trial {result.best['trial']} "
              f"(validation AUC {result.best['validation_auc']:.4f}, "
              f"{result.best['serving_bytes']:,} bytes) → {result.files['best_model']}")
    else:
        print("[tune] no finished trial fits the budget")
    print(f"[tune] front: {result.files['pareto_md']}  plot: {result.files['pareto_png']}")
    print(f"[tune] TensorBoard: tensorboard --logdir {result.experiment_dir}")
    return 0 if result.complete else EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
