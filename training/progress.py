"""Where training stands (saved in every checkpoint) and how a run shows it: progress lines
and TensorBoard curves, both written by rank 0 only."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from training.config import TrainConfig


@dataclass
class Progress:
    """Where training stands; saved in every checkpoint."""

    epoch: int = 0
    step_in_epoch: int = 0
    step: int = 0
    samples: int = 0
    fingerprint: int = 0  # sum of row hashes (mod 2^56) of every trained row, when audited
    # Early stopping's state, so a resumed run keeps counting from where it stopped.
    best_value: float = math.nan
    best_step: int = -1  # -1: no evaluation kept yet
    evals_since_best: int = 0
    stopped: int = 0  # 1 once early stopping ended training: a rerun trains no more

    def as_dict(self) -> dict[str, float]:
        return dict(self.__dict__)


def format_duration(seconds: float) -> str:
    """"42s", "3m05s", "2h07m": a time left, short enough for a progress line."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Monitor:
    """Progress lines on stdout and curves under <run folder>/tensorboard, from rank 0."""

    def __init__(self, config: TrainConfig, rank: int) -> None:
        self.enabled = rank == 0
        self._writer: Any = None
        if self.enabled:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(config.run_dir / "tensorboard"))

    def say(self, line: str) -> None:
        if self.enabled:
            print(line, flush=True)

    def scalars(self, values: dict[str, float], step: int) -> None:
        """Training curves, named as given (e.g. "train/loss")."""
        if self._writer is not None:
            for name, value in values.items():
                self._writer.add_scalar(name, value, step)

    def metrics(self, metrics: dict[str, Any], step: int) -> None:
        """Evaluation metrics, "validation_auc" drawn as "validation/auc"."""
        self.scalars({k.replace("_", "/", 1): v for k, v in metrics.items()
                      if isinstance(v, float) and math.isfinite(v)}, step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
