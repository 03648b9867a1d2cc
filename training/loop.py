"""The schedule around a worker's steps: which batches it reads, when it logs, evaluates,
checkpoints and stops early, and the metrics it ends with."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from typing import Any

import torch

from data_pipeline.stats import DatasetStats
from training.audit import FINGERPRINT_MOD, add_rows
from training.batches import train_streams, worker_shards, zip_batches
from training.checkpoint import load_best, report, save_best, saver
from training.context import WorkerContext
from training.evaluation import evaluate
from training.model import TrainableModel
from training.plan import RunSpec
from training.progress import Monitor, Progress, format_duration
from training.stall import pulse


class TrainLoop:
    """Everything a step leaves behind: counting, logging, evaluation, checkpoints and
    early stopping, as `schedule` says; the train function runs the step itself.

    Args:
        spec: the run's plan.
        ctx: this worker.
        model: what it trains.
        progress: where training stands (restored from a checkpoint or fresh); updated here.
        stats: the data's statistics (frequency bands of the evaluation).
        monitor: progress lines and TensorBoard.
        audit: fingerprint every trained row (the recovery test's proof).
    """

    def __init__(self, spec: RunSpec, ctx: WorkerContext, model: TrainableModel,
                 progress: Progress, stats: DatasetStats, monitor: Monitor,
                 audit: bool = False) -> None:
        self.spec, self.ctx, self.model, self.progress = spec, ctx, model, progress
        self.stats, self.monitor, self.audit = stats, monitor, audit
        self.config = spec.config
        self.schedule = self.config.schedule
        self.save = saver(ctx, progress, model)
        self.t0, self.rows0, self.step0 = time.perf_counter(), progress.samples, progress.step
        self.t_first: float | None = None  # when the first batch was in hand: startup ends there
        mine = worker_shards(self.config, ctx.rank, ctx.world)
        self._streams, self.steps_per_epoch = train_streams(self.config, progress, mine)
        self.total_steps = self.steps_per_epoch * self.schedule.epochs
        if self.schedule.max_steps is not None:
            self.total_steps = min(self.total_steps, self.schedule.max_steps)
        self.loss_curve: list[float] = []
        self.last_metrics: dict[str, Any] = {}
        self.last_eval_step = -1

    def judge_start(self) -> None:
        """A run that starts from a trained model (`from_model`) under early stopping is
        judged before its first step too: where fine-tuning only loses (a second pass over
        the rows the first stage fitted), the start is the model kept."""
        p = self.progress
        if self.schedule.early_stopping is None or self.config.from_model is None \
                or p.step != 0 or p.best_step >= 0:
            return
        self._validate()

    def batches(self) -> Iterator[dict[str, torch.Tensor]]:
        """This worker's batches, one per step still to train (none after early stopping)."""
        if self.progress.stopped:
            return
        beat = pulse()
        beat.waiting("the first batch from Ray Data (its read tasks need a free CPU)")
        for batch in zip_batches(self._streams):
            if self.t_first is None:
                self.t_first = time.perf_counter()
            beat.waiting(f"step {self.progress.step + 1} to finish (lookups, all-to-all, "
                         "backward, on every worker)")
            yield batch
            beat.waiting(f"the batch of step {self.progress.step + 1} from Ray Data")

    def dense_lr(self) -> float:
        """The dense learning rate of the next step."""
        return self.config.optimizer.dense_lr_at(self.progress.step, self.total_steps)

    def after_step(self, sparse: torch.Tensor, loss: torch.Tensor, lr: float) -> bool:
        """Count the step just taken; log, evaluate and checkpoint as scheduled. True when
        training is over (early stopping or max_steps)."""
        p, sched = self.progress, self.schedule
        pulse().progress()
        p.step += 1
        p.step_in_epoch += 1
        p.samples += self.config.data.batch_size
        if self.audit:
            p.fingerprint = add_rows(p.fingerprint, sparse)
        if p.step % sched.log_every == 0:
            self._log_loss(loss, lr)
        epoch_end = p.step_in_epoch == self.steps_per_epoch
        evaluate_now = bool(sched.eval_every and p.step % sched.eval_every == 0) or (
            self.schedule.early_stopping is not None and not sched.eval_every and epoch_end)
        checkpoint_now = bool(sched.checkpoint_every and p.step % sched.checkpoint_every == 0)
        if evaluate_now:
            self._validate()
        # Count the stopping step's epoch as done, so a checkpoint reads consistently.
        checkpoint_now = checkpoint_now or bool(p.stopped)
        if evaluate_now or checkpoint_now:
            metrics = {**self.last_metrics, **p.as_dict(), "loss": loss.item()}
            pulse().waiting(f"the checkpoint of step {p.step} to be saved" if checkpoint_now
                            else f"every worker to report step {p.step}")
            report(self.ctx, metrics, self.save if checkpoint_now else None)
            pulse().progress()
        if p.stopped:
            self._say_stopped()
            return True
        if sched.max_steps is not None and p.step >= sched.max_steps:
            return True
        if epoch_end:
            p.epoch += 1
            p.step_in_epoch = 0
        return False

    def finish(self) -> None:
        """Early stopping's end: the steps since the last evaluation are a candidate too,
        and the best evaluation's model is loaded back."""
        stopping, p = self.schedule.early_stopping, self.progress
        if stopping is None:
            return
        if not p.stopped and self.last_eval_step != p.step and p.step > 0:
            self._judge(self._evaluate("validation"))
        if 0 <= p.best_step != p.step:
            self.monitor.say(f"[train] restoring the best model: step {p.best_step}, "
                             f"{stopping.metric} {p.best_value:.4f}")
            load_best(self.config.run_dir, self.ctx, self.model)

    def final_metrics(self) -> dict[str, Any]:
        """Validation and test metrics of the final model, progress and throughput."""
        # Throughput of training alone, from the first batch in hand (the data pipeline's
        # start-up is reported apart): the final evaluation below is not training either.
        t_end = time.perf_counter()
        startup = (self.t_first or t_end) - self.t0
        elapsed = t_end - (self.t_first or t_end)
        p = self.progress
        final = {**self._evaluate("validation"), **self._evaluate("test")}
        self.monitor.metrics(final, p.step)
        final.update(p.as_dict())
        if math.isnan(final["best_value"]):
            del final["best_value"]  # no early stopping: nothing to report (and NaN is no JSON)
        final["fingerprint"] = self.ctx.sum_int(p.fingerprint) % FINGERPRINT_MOD
        final["samples_per_s"] = (p.samples - self.rows0) / elapsed if elapsed > 0 else 0.0
        final["startup_s"] = startup
        final["device"] = str(self.ctx.device)
        final["training_bytes_rank0"] = self.model.embeddings.training_bytes()
        final["loss_curve"] = self.loss_curve
        return final

    def _evaluate(self, split: str) -> dict[str, float]:
        return evaluate(split, self.spec, self.ctx, self.model, self.stats)

    def _log_loss(self, loss: torch.Tensor, lr: float) -> None:
        p = self.progress
        global_loss = self.ctx.mean(loss.detach())  # a collective: every rank computes it
        self.loss_curve.append(global_loss)
        if not self.monitor.enabled:
            return
        elapsed = time.perf_counter() - (self.t_first or self.t0)
        rate = (p.samples - self.rows0) / elapsed
        self.monitor.say(f"[train] epoch {p.epoch} step {p.step_in_epoch}/"
                         f"{self.steps_per_epoch} loss {global_loss:.4f} {rate:,.0f} samples/s, "
                         f"{format_duration(self._epoch_left(elapsed))} left in the epoch")
        self.monitor.scalars({"train/loss": global_loss, "train/dense_lr": lr,
                              "train/samples_per_s": rate}, p.step)

    def _epoch_left(self, elapsed: float) -> float:
        """Seconds until this epoch's last step (or max_steps) at this run's pace so far."""
        p = self.progress
        last = self.steps_per_epoch
        if self.schedule.max_steps is not None:
            last = min(last, p.step_in_epoch + self.schedule.max_steps - p.step)
        return (last - p.step_in_epoch) * elapsed / max(1, p.step - self.step0)

    def _validate(self) -> None:
        p, stopping = self.progress, self.schedule.early_stopping
        self.last_metrics = self._evaluate("validation")
        self.last_eval_step = p.step
        self.monitor.metrics(self.last_metrics, p.step)
        if stopping is not None:
            self._judge(self.last_metrics)
            if p.evals_since_best >= stopping.patience:
                p.stopped = 1

    def _judge(self, metrics: dict[str, Any]) -> None:
        """Keep the model if this evaluation is the best; count towards patience if not."""
        stopping, p = self.schedule.early_stopping, self.progress
        assert stopping is not None
        value = float(metrics[stopping.metric])
        if stopping.improved(value, p.best_value):
            p.best_value, p.best_step = value, p.step
            p.evals_since_best = 0
            save_best(self.config.run_dir, self.ctx.rank, self.save)
        else:
            p.evals_since_best += 1
        self.monitor.say(f"[train] step {p.step}: {stopping.metric} {value:.4f} (best "
                         f"{p.best_value:.4f} at step {p.best_step}, "
                         f"{p.evals_since_best}/{stopping.patience} without improvement)")

    def _say_stopped(self) -> None:
        stopping = self.schedule.early_stopping
        assert stopping is not None
        self.monitor.say(f"[train] early stopping at step {self.progress.step}: no "
                         f"improvement of {stopping.metric} in {stopping.patience} evaluations")
