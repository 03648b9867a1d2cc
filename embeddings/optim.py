"""Optimizers for embedding tables that touch only the rows a batch read.

A compressed table still has millions of rows and a batch reads a few thousand, so the
update must cost per used row, never per table row: these optimizers take the sparse
gradients of `F.embedding(sparse=True)` and update, per unique row, the row and its state.
Dense gradients (MLET projections, small dense parameters) take the same rule over every
row. State tensors are row-shaped (first dim = the parameter's rows) so an adaptive method
that moves a row (CAFE's hot/cold migration) can move its state with it
(`copy_state_rows`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Annotated, Any, Literal, Union

import torch
from pydantic import BaseModel, ConfigDict, Field


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


class RowWiseAdagrad(torch.optim.Optimizer):
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
        """The state of `p`, created if it has none yet."""
        state = self.state[p]
        if not state:
            group = next(g for g in self.param_groups if any(q is p for q in g["params"]))
            rows = _rows_view(p).shape[0]
            init = group["initial_accumulator_value"]
            state["sum"] = torch.full((rows,), init, dtype=torch.float32, device=p.device)
        return state

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                acc = self.state_for(p)["sum"]
                rows, g = _grad_rows(p)
                w = _rows_view(p.data)
                if rows is None:
                    if wd:
                        g = g + wd * w
                    acc.add_(g.pow(2).mean(1))
                    w.addcdiv_(g, (acc.sqrt() + eps)[:, None], value=-lr)
                    continue
                if wd:
                    g = g + wd * w.index_select(0, rows)
                acc.index_add_(0, rows, g.pow(2).mean(1))
                step = g / (acc.index_select(0, rows).sqrt() + eps)[:, None]
                w.index_add_(0, rows, step, alpha=-lr)
        return loss


class LazyAdam(torch.optim.Optimizer):
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

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
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
        return loss


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


def optimizer_state_bytes(
    optimizer: torch.optim.Optimizer, params: Iterable[torch.Tensor] | None = None
) -> int:
    """Exact bytes of the optimizer's tensor state, for `params` or for every parameter
    (training memory beyond `training_bytes`, which excludes the optimizer)."""
    keys = list(optimizer.state) if params is None else list(params)
    return sum(
        v.numel() * v.element_size()
        for p in keys
        for v in optimizer.state.get(p, {}).values()
        if isinstance(v, torch.Tensor)
    )


@torch.no_grad()
def copy_state_rows(
    optimizer: torch.optim.Optimizer,
    src: torch.Tensor,
    src_rows: torch.Tensor,
    dst: torch.Tensor,
    dst_rows: torch.Tensor,
) -> None:
    """Copy the optimizer state of rows `src_rows` of parameter `src` onto rows `dst_rows`
    of `dst` (the same parameter or another one of the same width): what a row migration
    must do so the moved row keeps its accumulated state.

    Every state tensor whose first dimension is the parameter's rows is copied; others
    (scalars) are left alone. Optimizers with `state_for` (this module's) get the state
    created for `dst` when it has none yet; for others, missing state is left missing.
    """
    src_state = optimizer.state.get(src)
    if not src_state:
        return
    state_for = getattr(optimizer, "state_for", None)
    dst_state = state_for(dst) if state_for is not None else optimizer.state.get(dst)
    if not dst_state:
        return
    src_n, dst_n = _rows_view(src).shape[0], _rows_view(dst).shape[0]
    for key, value in src_state.items():
        target = dst_state.get(key)
        if not (isinstance(value, torch.Tensor) and isinstance(target, torch.Tensor)):
            continue
        if value.dim() >= 1 and value.shape[0] == src_n and target.shape[0] == dst_n:
            target[dst_rows] = value[src_rows].to(target.dtype)


class RowWiseAdagradConfig(BaseModel):
    """Row-wise Adagrad for embedding tables (the default).

    Args:
        lr: learning rate.
        eps: added to the accumulator's root.
        weight_decay: L2 penalty on used rows.
        initial_accumulator_value: the accumulator's start.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Literal["rowwise_adagrad"] = "rowwise_adagrad"
    lr: float = Field(0.01, gt=0)
    eps: float = Field(1e-8, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    initial_accumulator_value: float = Field(0.0, ge=0)

    def build(self, params: Iterable[Any]) -> RowWiseAdagrad:
        return RowWiseAdagrad(params, **self.model_dump(exclude={"name"}))


class AdamConfig(BaseModel):
    """Lazy (row-wise) Adam for embedding tables.

    Args:
        lr: learning rate.
        betas: moment decays.
        eps: added to the second moment's root.
        weight_decay: L2 penalty on used rows.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Literal["adam"] = "adam"
    lr: float = Field(1e-3, gt=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    weight_decay: float = Field(0.0, ge=0)

    def build(self, params: Iterable[Any]) -> LazyAdam:
        return LazyAdam(params, **self.model_dump(exclude={"name"}))


SparseOptimizerConfig = Annotated[
    Union[RowWiseAdagradConfig, AdamConfig],  # noqa: UP007 - a discriminated union
    Field(discriminator="name"),
]
"""The embedding-table optimizer of a training config, chosen by `name`."""
