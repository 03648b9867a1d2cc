"""Evaluation metrics of a CTR model over a whole split: exact AUC, log loss, AUC per id band.

AUC is not an average of per-worker AUCs, so every worker's predictions are gathered and the
metric is computed once over all of them, exactly (ties count one half, as scikit-learn's
`roc_auc_score` does). Pass logits, not probabilities: a float32 sigmoid saturates to 1.0
for large logits and the ties it creates would change the AUC.

AUC for rare ids: the data statistics give each (row, feature) value a frequency band
(rare, medium, hot). A row's band over a chosen set of features is the rarest band among
them, so "rare" = rows where at least one chosen feature has a rare id; "medium" = no rare
id but at least one medium; "hot" = every chosen feature hot. The three bands partition the
rows; choose the large (high-cardinality) features, where compression hurts most.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import IntEnum
from typing import Any

import numpy as np
import torch
import torch.distributed as dist


class FrequencyBand(IntEnum):
    """How often an id occurs in the training data; smaller codes are rarer."""

    RARE = 0
    MEDIUM = 1
    HOT = 2


def _numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def roc_auc(scores: Any, labels: Any) -> float:
    """Exact area under the ROC curve; tied scores count one half.

    Equal to `sklearn.metrics.roc_auc_score(labels, scores)`. Counts are kept in integers,
    so the result is exact up to the final division even over billions of rows.

    Args:
        scores: [n] scores (logits preferred), array or tensor.
        labels: [n] 0/1 labels.

    Returns:
        The AUC, or NaN when one class is absent or a score is NaN (a diverged model).
    """
    s = _numpy(scores).astype(np.float64, copy=False).ravel()
    y = _numpy(labels).ravel() != 0
    if s.shape != y.shape:
        raise ValueError(f"scores and labels differ in length: {s.size} vs {y.size}")
    positives = int(y.sum())
    negatives = y.size - positives
    if positives == 0 or negatives == 0 or np.isnan(s).any():
        return float("nan")
    order = np.argsort(s, kind="stable")
    s, y = s[order], y[order]
    starts = np.concatenate([[0], np.flatnonzero(np.diff(s)) + 1])
    group_pos = np.add.reduceat(y.astype(np.int64), starts)
    group_neg = np.diff(np.append(starts, s.size)) - group_pos
    neg_below = np.cumsum(group_neg) - group_neg
    # Twice the Mann-Whitney U: each positive beats the negatives below its group (2 each)
    # and ties with those in its group (1 each); integer, hence exact.
    twice_u = int(np.sum(group_pos * (2 * neg_below + group_neg)))
    return twice_u / (2 * positives * negatives)


def log_loss(logits: Any, labels: Any) -> float:
    """Mean binary cross-entropy of logits, computed stably in float64.

    Args:
        logits: [n] model outputs before the sigmoid.
        labels: [n] 0/1 labels.
    """
    x = _numpy(logits).astype(np.float64, copy=False).ravel()
    y = _numpy(labels).astype(np.float64, copy=False).ravel()
    if x.size == 0:
        return float("nan")
    # softplus(x) - y*x, with softplus written so exp never overflows.
    return float(np.mean(np.maximum(x, 0) - x * y + np.log1p(np.exp(-np.abs(x)))))


def row_bands(bands: Any, features: Sequence[int] | None = None) -> np.ndarray:
    """Each row's band over the chosen features: the rarest band among them.

    Args:
        bands: [n, F] band code (`FrequencyBand`) of each (row, feature).
        features: columns that decide (e.g. the large features); None = all columns.
    """
    b = _numpy(bands)
    if b.ndim != 2:
        raise ValueError(f"bands must be [n, F], got shape {b.shape}")
    if features is not None:
        b = b[:, list(features)]
    if b.shape[1] == 0:
        raise ValueError("choose at least one feature to band rows by")
    return b.min(axis=1).astype(np.int8)


def auc_by_band(scores: Any, labels: Any, bands_of_rows: Any) -> dict[str, float]:
    """AUC over the rows of each band (NaN for a band without both classes).

    Args:
        scores: [n] scores (logits preferred).
        labels: [n] 0/1 labels.
        bands_of_rows: [n] band code of each row (see `row_bands`).
    """
    s, y, b = _numpy(scores).ravel(), _numpy(labels).ravel(), _numpy(bands_of_rows).ravel()
    return {band.name.lower(): roc_auc(s[b == band], y[b == band]) for band in FrequencyBand}


def gather_across_workers(
    tensor: torch.Tensor, group: dist.ProcessGroup | None = None
) -> torch.Tensor:
    """Every worker's tensor concatenated along dim 0 in rank order (sizes may differ).

    Without an initialised process group (or with one worker) returns the tensor itself.
    The tensor must be on the device the backend communicates from (CUDA for NCCL).

    Args:
        tensor: [n_local, ...] this worker's part.
        group: the process group (default: the default group).
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return tensor
    world = dist.get_world_size(group)
    size = torch.tensor([tensor.shape[0]], dtype=torch.int64, device=tensor.device)
    sizes = [torch.empty_like(size) for _ in range(world)]
    dist.all_gather(sizes, size, group=group)
    counts = [int(s.item()) for s in sizes]
    if max(counts) == 0:
        return tensor
    # all_gather wants equal shapes: pad to the longest part, then cut the padding off.
    padded = tensor.new_zeros((max(counts), *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous(), group=group)
    return torch.cat([p[:c] for p, c in zip(parts, counts, strict=True)])


class EvalAccumulator:
    """Collects a split's predictions batch by batch; computes exact metrics over all workers.

    Every worker calls `update` for each of its batches and then `compute` (a collective);
    all get the same metrics. Predictions are held on the CPU until `compute`: 6 bytes per
    row (float32 logit, int8 label, int8 band).

    Args:
        with_bands: every batch comes with band codes and AUC per band is computed. Fixed
            up front so that all workers gather the same tensors, even one without rows.
        band_features: columns of the band codes that decide a row's band (see the module
            docstring); None = all columns.
    """

    def __init__(
        self, with_bands: bool = False, band_features: Sequence[int] | None = None
    ) -> None:
        self.with_bands = with_bands
        self.band_features = band_features
        self.reset()

    def reset(self) -> None:
        """Forget everything collected (before the next evaluation)."""
        self._logits: list[torch.Tensor] = []
        self._labels: list[torch.Tensor] = []
        self._bands: list[torch.Tensor] = []

    def update(self, logits: torch.Tensor, labels: torch.Tensor, bands: Any = None) -> None:
        """Add one batch.

        Args:
            logits: [n] model outputs before the sigmoid.
            labels: [n] 0/1 labels.
            bands: [n, F] band code of each (row, feature); required when `with_bands`.
        """
        if (bands is not None) != self.with_bands:
            raise ValueError("band codes are required" if self.with_bands else "with_bands is off")
        self._logits.append(logits.detach().reshape(-1).float().cpu())
        self._labels.append(labels.detach().reshape(-1).to(torch.int8).cpu())
        if bands is not None:
            self._bands.append(torch.from_numpy(row_bands(bands, self.band_features)))

    def compute(self, group: dist.ProcessGroup | None = None) -> dict[str, float]:
        """Metrics over every worker's rows: auc, log_loss, rows, and per band when given.

        Keys: `auc`, `log_loss`, `rows`, `positive_rate`, and with band codes
        `auc_rare`, `auc_medium`, `auc_hot`, `rows_rare`, `rows_medium`, `rows_hot`.

        Args:
            group: the process group to gather over (default: the default group).
        """
        device = torch.device("cpu")
        if dist.is_available() and dist.is_initialized() and dist.get_backend(group) == "nccl":
            device = torch.device("cuda", torch.cuda.current_device())
        local = [
            torch.cat(self._logits) if self._logits else torch.zeros(0),
            torch.cat(self._labels) if self._labels else torch.zeros(0, dtype=torch.int8),
        ]
        if self.with_bands:
            local.append(
                torch.cat(self._bands) if self._bands else torch.zeros(0, dtype=torch.int8)
            )
        logits, labels, *bands = (
            gather_across_workers(t.to(device), group).cpu().numpy() for t in local
        )
        out = {
            "auc": roc_auc(logits, labels),
            "log_loss": log_loss(logits, labels),
            "rows": float(labels.size),
            "positive_rate": float(labels.mean()) if labels.size else float("nan"),
        }
        if bands:
            for name, auc in auc_by_band(logits, labels, bands[0]).items():
                out[f"auc_{name}"] = auc
                out[f"rows_{name}"] = float((bands[0] == FrequencyBand[name.upper()]).sum())
        return out
