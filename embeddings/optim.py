"""Optimizers for embedding tables that touch only the rows a batch read.

A compressed table still has millions of rows and a batch reads a few thousand, so the
update must cost per used row, never per table row: these optimizers take the sparse
gradients of `F.embedding(sparse=True)` and update, per unique row, the row and its state.
Dense gradients (MLET projections, small dense parameters) take the same rule over every
row. State tensors are row-shaped (first dim = the parameter's rows) so an adaptive method
that moves a row (CAFE's hot/cold migration) can move its state with it (`state_for`;
the table store hands a method its rows' state, `embeddings.tables`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch


def _rows_view(t: torch.Tensor) -> torch.Tensor:
    """A parameter seen as [rows, width] (a 1-D parameter is rows of width 1); a view, so
    in-place updates reach the parameter (a non-contiguous one fails loudly here)."""
    return t.view(t.shape[0], -1) if t.dim() >= 1 else t.view(1, 1)


def _grad_rows(p: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(unique rows or None for all rows, their summed gradients as [rows, width])."""
    grad = p.grad
    if grad.is_sparse:
        # Repeated ids leave repeated entries; coalesce sums them so each row updates once.
        grad = grad.coalesce()
        rows = grad.indices()[0]
        # reshape(0, -1) is ambiguous for an empty gradient (no id reached this table).
        width = _rows_view(p).shape[1] if p.dim() >= 1 else 1
        return rows, grad.values().reshape(rows.shape[0], width)
    return None, grad.reshape(grad.shape[0], -1) if grad.dim() >= 1 else grad.reshape(1, 1)


class _RowOptimizer(torch.optim.Optimizer):
    """What both optimizers share: `step` updates each parameter that has a gradient, by the
    subclass's rule (`_update`), over the rows its gradient names."""

    def state_for(self, p: torch.Tensor) -> dict[str, torch.Tensor]:
        """The state of `p`, created if it has none yet."""
        raise NotImplementedError

    def _update(self, p: torch.Tensor, group: dict[str, Any]) -> None:
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, group)
        return loss


class RowWiseAdagrad(_RowOptimizer):
    """Row-wise Adagrad (FBGEMM's / TorchRec's EXACT_ROWWISE_ADAGRAD): one accumulator per row.

    For each row r the batch used, with g its summed gradient of width w:
    state[r] += mean(g²); row -= lr · g / (sqrt(state[r]) + eps). Rows the batch did not use
    are not read or written. State: "sum" float32 [rows].

    Args:
        params: parameters or parameter groups.
        lr: learning rate.
        eps: added to the root of the accumulator.
        weight_decay: L2 penalty, applied to used rows only.
        initial_accumulator_value: the accumulator's start.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 0.01,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        initial_accumulator_value: float = 0.0,
    ) -> None:
        defaults = {
            "lr": lr,
            "eps": eps,
            "weight_decay": weight_decay,
            "initial_accumulator_value": initial_accumulator_value,
        }
        super().__init__(params, defaults)

    def state_for(self, p: torch.Tensor) -> dict[str, torch.Tensor]:
        state = self.state[p]
        if not state:
            group = next(g for g in self.param_groups if any(q is p for q in g["params"]))
            rows = _rows_view(p).shape[0]
            init = group["initial_accumulator_value"]
            state["sum"] = torch.full((rows,), init, dtype=torch.float32, device=p.device)
        return state

    def _update(self, p: torch.Tensor, group: dict[str, Any]) -> None:
        lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
        acc = self.state_for(p)["sum"]
        rows, g = _grad_rows(p)
        w = _rows_view(p.data)
        if rows is None:
            if wd:
                g = g + wd * w
            acc.add_(g.pow(2).mean(1))
            w.addcdiv_(g, (acc.sqrt() + eps)[:, None], value=-lr)
            return
        if wd:
            g = g + wd * w.index_select(0, rows)
        acc.index_add_(0, rows, g.pow(2).mean(1))
        step = g / (acc.index_select(0, rows).sqrt() + eps)[:, None]
        w.index_add_(0, rows, step, alpha=-lr)


class LazyAdam(_RowOptimizer):
    """Adam that updates only the rows a batch used (sparse gradients), dense otherwise.

    Like `torch.optim.SparseAdam` for sparse gradients, with two differences that make it
    fit a table whose rows move: it also takes dense gradients (one optimizer for tables
    and MLET projections), and it counts steps per row, so the bias correction of a row
    reflects the updates its own moments have seen and the count moves with the row.
    State: "exp_avg", "exp_avg_sq" [rows, width] and "step" float32 [rows].

    Args:
        params: parameters or parameter groups.
        lr: learning rate.
        betas: decay of the first and second moment.
        eps: added to the root of the second moment.
        weight_decay: L2 penalty, applied to used rows only.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay}
        super().__init__(params, defaults)

    def state_for(self, p: torch.Tensor) -> dict[str, torch.Tensor]:
        state = self.state[p]
        if not state:
            w = _rows_view(p.data)
            state["step"] = torch.zeros(w.shape[0], dtype=torch.float32, device=p.device)
            state["exp_avg"] = torch.zeros_like(w)
            state["exp_avg_sq"] = torch.zeros_like(w)
        return state

    def _update(self, p: torch.Tensor, group: dict[str, Any]) -> None:
        lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
        b1, b2 = group["betas"]
        state = self.state_for(p)
        rows, g = _grad_rows(p)
        w = _rows_view(p.data)
        if rows is None:
            rows = torch.arange(w.shape[0], device=w.device)
        if wd:
            g = g + wd * w.index_select(0, rows)
        step = state["step"].index_select(0, rows) + 1
        m = state["exp_avg"].index_select(0, rows).mul_(b1).add_(g, alpha=1 - b1)
        v = state["exp_avg_sq"].index_select(0, rows).mul_(b2)
        v.addcmul_(g, g, value=1 - b2)
        state["step"].index_copy_(0, rows, step)
        state["exp_avg"].index_copy_(0, rows, m)
        state["exp_avg_sq"].index_copy_(0, rows, v)
        bc1 = (1 - b1**step)[:, None]
        bc2 = (1 - b2**step)[:, None]
        update = (m / bc1) / ((v / bc2).sqrt() + eps)
        w.index_add_(0, rows, update, alpha=-lr)


def train_step(
    loss: torch.Tensor,
    sparse_opt: torch.optim.Optimizer | None,
    dense_opt: torch.optim.Optimizer,
    embeddings: torch.nn.Module,
) -> None:
    """One update: gradients of `loss` (a table store fused into backward updates its rows
    there), both optimizers, then the embeddings' post-step hook (a fallback store's update,
    CAFE's sketch update and row migration, which moves the optimizer's state)."""
    if sparse_opt is not None:
        sparse_opt.zero_grad(set_to_none=True)
    dense_opt.zero_grad(set_to_none=True)
    loss.backward()
    if sparse_opt is not None:
        sparse_opt.step()
    dense_opt.step()
    embeddings.step(sparse_opt)
