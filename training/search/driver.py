"""The search driver: Optuna proposes points, Tune runs them as trials, weak ones stop early.

Two objectives (validation AUC up, serving bytes down) or AUC under a hard byte budget;
ASHA stops weak trials at its rungs (in a Pareto search, the trials another one dominates
there). The driver runs on an already connected Ray cluster, resumes an interrupted search
without re-running finished trials, and writes the results (`training.search.results`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ray.tune.schedulers import FIFOScheduler, TrialScheduler

from training.config import ConfigError
from training.search import pareto
from training.search.config import TuneConfig
from training.search.results import UNFINISHED, SearchResult, trial_rows, write_results
from training.search.trial import run_trial, trial_dirname

SEARCH_CONFIG_FILE = "search_config.json"


class SpaceSampler:
    """Optuna define-by-run space (a picklable callable, so searches resume)."""

    def __init__(self, config: TuneConfig) -> None:
        self.space = config.search

    def __call__(self, trial: Any) -> dict[str, Any]:
        # Drawn values are recorded by Optuna; the fixed ones reach the trial through this.
        return self.space.draw(trial)


def searcher(config: TuneConfig) -> Any:
    """Optuna over the space: two objectives in a Pareto search, else the budget objective."""
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


def scheduler(config: TuneConfig) -> Any:
    """Early stopping: none, Pareto rungs (Pareto search) or ASHA on the budget objective."""
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


def trainable(config: TuneConfig) -> Any:
    """`run_trial` with the search config bound and each trial's driver CPUs reserved."""
    import ray.tune

    bound = ray.tune.with_parameters(run_trial, search=config.model_dump(mode="json"))
    return ray.tune.with_resources(bound, {"cpu": config.trials.driver_cpus})


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
        return ray.tune.Tuner.restore(str(path), trainable=trainable(config),
                                      resume_unfinished=True, resume_errored=True)
    if ray.tune.Tuner.can_restore(str(path)):
        raise ConfigError(f"{path} already holds a search: pass --resume to continue it, or "
                          "choose another run.name")
    return ray.tune.Tuner(
        trainable(config),
        tune_config=ray.tune.TuneConfig(
            search_alg=searcher(config),
            scheduler=scheduler(config),
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


def check_search(config: TuneConfig, resume: bool) -> None:
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


def warn_about_resources(config: TuneConfig, asha: bool) -> None:
    """Say up front when trials would wait for CPUs, or ASHA could not free stopped ones."""
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
    check_search(config, resume)
    warn_about_resources(config, config.asha_can_stop)
    if "scma" in config.search.methods:  # signed once here, not by each trial at its start
        from data_pipeline.row_signatures import sign_dataset_once

        sign_dataset_once(config.data.path)
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
