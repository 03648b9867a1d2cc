"""One trial of a search: a point of the space, trained by the training run itself.

The trial plans the run, refuses points that cannot fit (never training them), trains on
Ray Train reporting through Tune with the search's own metrics added, and, for a quantised
export, scores the model it would serve: the search ranks what it serves.
"""

from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ray.tune.integration.ray_train import TuneReportCallback

from embeddings.budget import BudgetUnreachable, ExportQuantize
from training.config import ConfigError
from training.search.config import TuneConfig

if TYPE_CHECKING:
    from training.config import TrainConfig
    from training.plan import RunSpec

# Written by each trial when it starts (one line per start): a restarted trial shows twice.
STARTS_FILE = "trial_starts.log"
TRIAL_DIR = "trial_{}"  # a trial's folder in the experiment, by trial id


def planned_serving_bytes(spec: RunSpec, config: TrainConfig) -> int:
    """Bytes of the serving embeddings this run will export, from meta-device builds.

    Exact for stateless mappers; for CAFE a lower bound (its frozen hot-id map grows while
    training). Counted shard by shard, as the workers build them.
    """
    from data_pipeline.stats import load_feature_stats
    from embeddings.methods.base import TwoStageConfig
    from embeddings.sharding.planner import shard_of
    from training.plan import feature_stats_of, planned_bytes

    fmt = ExportQuantize(config.export.quantize).serving_format
    dim = config.model_spec.table_dim  # d, + 1 for a first-order column
    stats = None
    total = 0
    trained = None
    if config.from_model is not None:  # two-stage methods count from the trained features
        from training.from_model import load_trained
        from training.plan import LazyFeatureStats

        stats = load_feature_stats(config.data.path)
        trained = load_trained(config.from_model, LazyFeatureStats(stats))[1]
    for feature in spec.plan.features:
        i = spec.names.index(feature.name)
        method = spec.method(feature.name)
        if isinstance(method, TwoStageConfig):
            total += planned_bytes(method, spec.cardinalities[i], dim, None, trained,
                                   feature.name, fmt).serving
            continue
        feature_stats = None
        # Their mappers hold the vocabulary (SCMA: its signed values and signatures; MPE: its
        # explicit values).
        if method.method in ("full", "learned_hash", "scma", "mpe"):
            stats = stats or load_feature_stats(config.data.path)
            feature_stats = feature_stats_of(stats, feature.name)
        for s in range(feature.num_shards):
            part = feature_stats
            if part is not None and feature.num_shards > 1:
                keep = shard_of(part.values, feature.num_shards) == s
                part = part.select(keep)
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


def _trial_dir(config: TuneConfig) -> Path:
    """This trial's folder in the experiment's storage, its start recorded there.

    Not get_trial_dir(): that is a per-session staging folder on the trial's node, which a
    resumed search replaces, so the Ray Train run (its checkpoints) and the model must not
    live there.
    """
    import ray.tune

    trial_dir = config.experiment_dir / TRIAL_DIR.format(ray.tune.get_context().get_trial_id())
    trial_dir.mkdir(parents=True, exist_ok=True)
    with (trial_dir / STARTS_FILE).open("a") as f:
        f.write(f"{time.time():.3f} pid={os.getpid()}\n")
    return trial_dir


def _skip(planned: int, objective: float, auc: bool) -> None:
    """The one report of a trial that never trains; `auc`: with chance AUC, because a
    Pareto searcher needs both objectives."""
    import ray.tune

    report: dict[str, Any] = {"planned_serving_bytes": planned, "serving_bytes": planned,
                              "within_budget": 0, "skipped": 1, "final": 1,
                              "objective": objective}
    if auc:
        report["validation_auc"] = 0.5
    ray.tune.report(report)


def _report_served(train_config: TrainConfig, trained: dict[str, Any], report: TrialReport
                   ) -> None:
    """One more final report: the AUC of the quantised model this trial would serve."""
    import ray.tune

    served = served_auc(train_config.export_dir, train_config.data.path,
                        train_config.data.eval_batch_size)
    metrics = {**trained, **served, "trained_validation_auc": trained["validation_auc"],
               "trained_test_auc": trained["test_auc"]}
    metrics = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    ray.tune.report(search_metrics(metrics, report.planned, report.budget, report.mode,
                                   report.max_steps))


def run_trial(point: dict[str, Any], search: dict[str, Any]) -> None:
    """The Tune trainable: one point of the space, trained by the training job itself."""
    from training.plan import plan_run
    from training.run import run

    config = TuneConfig.model_validate(search)
    trial_dir = _trial_dir(config)
    train_config = config.trial_config(point, trial_dir)
    budget, mode = config.objective.max_serving_bytes, config.objective.mode
    try:
        spec = plan_run(train_config, verbose=False)
    except ConfigError as e:
        if not isinstance(e.__cause__, BudgetUnreachable):
            raise
        # A point of the space the method cannot reach (QR's floor): a trial that never
        # trains, ranked below every trained one, its smallest bytes on the record.
        print(f"[tune] trial {trial_dir.name}: {point} → {e}", flush=True)
        smallest = e.__cause__.smallest_bytes
        _skip(smallest, budget_penalty(smallest, budget or smallest) - 1, mode == "pareto")
        return
    planned = planned_serving_bytes(spec, train_config)
    print(f"[tune] trial {trial_dir.name}: {point} → planned serving bytes {planned:,}",
          flush=True)
    if mode == "budget" and budget is not None and planned > budget:
        # Its bytes only grow while training (CAFE) or stay put: it can never fit.
        _skip(planned, budget_penalty(planned, budget), auc=False)
        return
    report = TrialReport(planned, budget, mode, train_config.schedule.max_steps or sys.maxsize)
    result = run(train_config, verbose=False, callbacks=[report])
    if ExportQuantize(train_config.export.quantize) is not ExportQuantize.NONE:
        _report_served(train_config, dict(result.metrics or {}), report)


def trial_dirname(trial: Any) -> str:
    """Short trial folders (Tune's default repeats the whole config in the name)."""
    return TRIAL_DIR.format(trial.trial_id)
