"""The sections of a training config (data, optimizer, schedule, scaling, run, export,
fault): pydantic models whose `Args:` are the documentation of every YAML field."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from embeddings.budget import ExportQuantize
from embeddings.tables import TableOptimizer


class Strict(BaseModel):
    """A config section: an unknown field is an error, never ignored."""

    model_config = ConfigDict(extra="forbid")


def _absolute(path: Path | None) -> Path | None:
    # Workers run in their own working directories: a relative path must be made absolute
    # where the user wrote it, on the driver.
    return None if path is None else path.expanduser().resolve()


class DataSettings(Strict):
    """Where the shards are and how they are batched.

    Args:
        path: a dataset folder from `jobs.prepare` or `jobs.synth` (manifest.json, day=N/,
            stats/): days 0..N-2 train, day N-1 halved into validation and test.
        batch_size: global batch (split evenly over the workers).
        eval_batch_size: rows per evaluation batch on each worker.
        block_rows: rows per Ray Data block.
        shuffle: reshuffle the order of blocks every epoch (seeded).
    """

    path: Path
    batch_size: int = Field(4096, ge=1)
    eval_batch_size: int = Field(16384, ge=1)
    block_rows: int = Field(131_072, ge=1024)
    shuffle: bool = True

    _path = field_validator("path")(_absolute)


class OptimizerSettings(Strict):
    """Optimizers: row-wise Adagrad (or lazy Adam) on embedding tables, Adam on dense layers.

    Args:
        sparse: optimizer of the embedding tables; it touches only the rows a batch used.
        sparse_lr: its learning rate.
        sparse_weight_decay: L2 penalty on the embedding rows a batch reads (g += wd · row
            before the row's update), applied lazily: rows no batch reads cost nothing and
            keep their values. 0 turns it off. On CPU a non-zero value trains the tables
            with the torch backend (FBGEMM 1.8's CPU kernel ignores weight decay).
        dense_lr: Adam's learning rate on the MLPs (and MLET projections).
        dense_lr_decay: schedule of the dense learning rate over the run's steps: "none"
            (constant), "linear" or "cosine" (from dense_lr down to dense_lr ·
            dense_lr_floor at the last step), "step" (halved at each quarter of the run,
            never below the floor). The rate is a function of the step alone, so a resumed
            run continues exactly where the checkpoint left it.
        dense_lr_floor: the fraction of dense_lr the decay ends at (0 < floor ≤ 1).
    """

    sparse: Literal["rowwise_adagrad", "adam"] = "rowwise_adagrad"
    sparse_lr: float = Field(0.05, gt=0)
    sparse_weight_decay: float = Field(0.0, ge=0)
    dense_lr: float = Field(1e-3, gt=0)
    dense_lr_decay: Literal["none", "linear", "cosine", "step"] = "none"
    dense_lr_floor: float = Field(0.1, gt=0, le=1)

    def table_optimizer(self) -> TableOptimizer:
        """The tables' optimizer (fused into FBGEMM's backward where it has a kernel)."""
        kind = "rowwise_adagrad" if self.sparse == "rowwise_adagrad" else "lazy_adam"
        return TableOptimizer(kind=kind, lr=self.sparse_lr, weight_decay=self.sparse_weight_decay)

    def dense_lr_at(self, step: int, total_steps: int) -> float:
        """The dense learning rate for the update that makes step `step` + 1 (0-based)."""
        if self.dense_lr_decay == "none" or total_steps <= 1:
            return self.dense_lr
        t = min(1.0, step / (total_steps - 1))
        floor = self.dense_lr_floor
        if self.dense_lr_decay == "linear":
            factor = 1 - (1 - floor) * t
        elif self.dense_lr_decay == "cosine":
            factor = floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))
        else:
            factor = max(floor, 0.5 ** min(3, int(4 * step / total_steps)))
        return self.dense_lr * factor


class EarlyStopping(Strict):
    """Stop when the validation metric stops improving, and export the best model seen.

    The metric is evaluated every `schedule.eval_every` steps, or at the end of every epoch
    when eval_every is not set; a run from a trained model (`from_model`) is evaluated before
    its first step too, so where fine-tuning only loses the start is the model kept (that
    evaluation counts towards patience like any other). Each time it improves by more than
    min_delta, every worker saves its part of the model (one file per rank under
    <run folder>/best/); when it has not improved for `patience` evaluations in a row,
    training stops. Either way the run ends by loading the best state back, so the final
    metrics and the exported model are the best evaluation's, not the last step's.

    Args:
        metric: "validation_auc" (higher is better) or "validation_log_loss" (lower is).
        patience: evaluations without improvement before stopping.
        min_delta: the least change that counts as an improvement.
    """

    metric: Literal["validation_auc", "validation_log_loss"] = "validation_auc"
    patience: int = Field(2, ge=1)
    min_delta: float = Field(0.0, ge=0)

    @property
    def higher_is_better(self) -> bool:
        return self.metric == "validation_auc"

    def improved(self, value: float, best: float | None) -> bool:
        if best is None or math.isnan(best):
            return not math.isnan(value)
        if self.higher_is_better:
            return value > best + self.min_delta
        return value < best - self.min_delta


class ScheduleSettings(Strict):
    """How long to train and how often to evaluate, log and checkpoint.

    Args:
        epochs: passes over the train split.
        max_steps: stop after this many steps in all (None: run every epoch).
        eval_every: evaluate on validation every N steps (None: only at the end).
        checkpoint_every: checkpoint every N steps (None: only at the end).
        log_every: progress line (step, samples/s, loss) every N steps.
        band_features: features whose id frequency decides a row's band (rare/medium/hot)
            for per-band AUC; default: every feature with at least 1,000 values.
        early_stopping: stop on a validation metric and export the best model (see
            `EarlyStopping`); None trains the whole schedule and exports the last step.
    """

    epochs: int = Field(1, ge=1)
    max_steps: int | None = Field(None, ge=1)
    eval_every: int | None = Field(None, ge=1)
    checkpoint_every: int | None = Field(None, ge=1)
    log_every: int = Field(50, ge=1)
    band_features: list[str] | None = None
    early_stopping: EarlyStopping | None = None


class ScalingSettings(Strict):
    """The Ray Train worker group.

    Args:
        num_workers: training workers; 0 runs the loop in the driver process (tests).
        cpus_per_worker: CPUs each worker reserves (fractions leave CPUs for Ray Data).
        use_gpu: one GPU per worker, NCCL between them.
        worker_budget_bytes: most embedding bytes one worker may hold; larger features
            are split over several workers.
        plan_for_workers: plan the embedding placement and cut the data for this many
            workers (default: num_workers); a run with fewer workers (a divisor) then sees
            the same global batches and trains the very same model.
        wait_for_resources_s: on a cluster that grows on demand (KubeRay, the cluster
            launcher), how long to wait for nodes that can run the worker group and its
            data reads; 0 (default) refuses such a run at once (`training.preflight`).
    """

    num_workers: int = Field(2, ge=0)
    cpus_per_worker: float = Field(0.5, gt=0)
    use_gpu: bool = False
    worker_budget_bytes: int | None = Field(None, gt=0)
    plan_for_workers: int | None = Field(None, ge=1)
    wait_for_resources_s: float = Field(0.0, ge=0)

    @property
    def data_shards(self) -> int:
        """Streams the train split is cut into: one per worker of the planned world size."""
        return max(1, self.plan_for_workers or self.num_workers)


class RunSettings(Strict):
    """Where the run keeps its checkpoints, TensorBoard curves and results.

    Args:
        name: the run's folder under storage_path; running again with the same name resumes.
        storage_path: root of run folders.
        max_failures: worker-group restarts from the latest checkpoint before giving up.
        stall_timeout_s: fail the run when no training step (or evaluation batch) has
            finished for this long, naming what rank 0 waited for (`training.stall`);
            None waits forever. Counted from the start, so it covers a worker group or a
            first batch that never comes.
    """

    name: str = Field("embpress", pattern=r"^[A-Za-z0-9_.-]+$")
    storage_path: Path = Field(Path("runs"), validate_default=True)

    _storage = field_validator("storage_path")(_absolute)
    max_failures: int = Field(1, ge=0)
    stall_timeout_s: float | None = Field(600.0, gt=0)


class ExportSettings(Strict):
    """The serving model written at the end.

    Args:
        out: directory for model.json + weights.safetensors (None: <run folder>/model).
        quantize: storage of the serving tables: none (fp32), fp16, int8 or int4.
    """

    out: Path | None = None
    quantize: ExportQuantize = ExportQuantize.NONE

    _out = field_validator("out")(_absolute)


class FaultSettings(Strict):
    """Injected failure, for testing recovery: rank `rank` fails once at step `step`.

    Args:
        step: the step at which to fail.
        rank: the worker that fails.
        marker: file written when the failure fires, so it fires only once.
        kind: `raise` (the worker dies; the group restarts from the latest checkpoint) or
            `hang` (the worker stops making progress; `run.stall_timeout_s` ends the run).
    """

    step: int = Field(ge=1)
    rank: int = Field(0, ge=0)
    marker: Path
    kind: Literal["raise", "hang"] = "raise"

    _marker = field_validator("marker")(_absolute)
