"""Table-batched storage: every table of every feature in one store, one lookup call per step.

The field trains embedding tables with FBGEMM's table-batched embedding (TBE): all tables
of a model in one kernel, the optimizer fused into the backward pass, so nothing runs per
feature and no row gradient is ever materialised. `FbgemmTables` wraps that kernel;
`TorchTables` is the fallback where fbgemm is not installed (or the optimizer has no CPU
kernel there, as Adam): one concatenated weight per table width, one `embedding_bag` call
for each width, sparse gradients and the row-wise optimizers of `embeddings.optim`. Both
take TBE's input layout (indices plus table-major bag offsets) and return TBE's output
layout ([batch, Σ widths], each table's pooled vector in table order), and start from the
same values, so they train the same model.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from embeddings.optim import LazyAdam, RowWiseAdagrad

Backend = Literal["auto", "fbgemm", "torch"]


class TableOptimizer(BaseModel):
    """How the tables train: the update is fused into backward where the backend allows.

    Args:
        kind: "rowwise_adagrad" (one accumulator per row, FBGEMM's EXACT_ROWWISE_ADAGRAD)
            or "lazy_adam" (Adam over the rows a batch read).
        lr: learning rate.
        eps: added to the root of the accumulator (second moment).
        weight_decay: L2 penalty on the rows a batch reads (g += weight_decay · row before
            the update), so rows no batch touches cost nothing and never shrink.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["rowwise_adagrad", "lazy_adam"] = "rowwise_adagrad"
    lr: float = Field(0.05, gt=0)
    eps: float = Field(1e-8, gt=0)
    weight_decay: float = Field(0.0, ge=0)


@dataclass(frozen=True)
class TableSpec:
    """One table of the store: rows × width."""

    rows: int
    width: int


def fbgemm_available() -> bool:
    try:
        import fbgemm_gpu.split_table_batched_embeddings_ops_training  # noqa: F401
    except Exception:  # not installed, or built for another torch (undefined symbols)
        return False
    return True


def choose_backend(backend: Backend, optimizer: TableOptimizer, device: torch.device) -> str:
    """The backend a store gets: fbgemm where installed and where it has a kernel for the
    optimizer on this device (fbgemm 1.8 refuses Adam on CPU, and its CPU row-wise Adagrad
    ignores `weight_decay`: measured, the rows come out as with no decay), else torch."""
    cpu = device.type == "cpu"
    if backend != "auto":
        if backend == "fbgemm" and not fbgemm_available():
            raise RuntimeError("backend 'fbgemm' asked for, but fbgemm_gpu does not import here")
        if backend == "fbgemm" and optimizer.kind == "lazy_adam" and cpu:
            raise ValueError("fbgemm has no CPU kernel for Adam; use backend 'torch' or 'auto'")
        if backend == "fbgemm" and optimizer.weight_decay and cpu:
            raise ValueError("fbgemm 1.8's CPU kernel ignores weight_decay (the decay would "
                             "silently not happen); use backend 'torch' or 'auto'")
        return backend
    if (optimizer.kind == "lazy_adam" or optimizer.weight_decay) and cpu:
        return "torch"
    return "fbgemm" if fbgemm_available() else "torch"


class TableStore(nn.Module):
    """All tables, one lookup: forward(indices, offsets) -> [batch, Σ widths].

    `offsets` has tables × batch + 1 entries: bag (t, b) is indices[offsets[t·B + b] :
    offsets[t·B + b + 1]], rows local to table t, summed. An empty bag reads zeros.

    `table_of` (FBGEMM's `feature_table_map`): where several bag columns read one table
    (SCMA's slots over its one shared array), "tables" in the layout above are virtual:
    virtual table v reads physical table `table_of[v]` and has its own bags and output
    columns. None = one virtual table per physical table.
    """

    fused: bool = False

    def __init__(self, specs: Sequence[TableSpec], optimizer: TableOptimizer,
                 table_of: Sequence[int] | None = None) -> None:
        super().__init__()
        self.specs = list(specs)
        self.table_of = list(range(len(self.specs))) if table_of is None else list(table_of)
        if any(not 0 <= t < len(self.specs) for t in self.table_of):
            raise ValueError(f"table_of names a table outside 0..{len(self.specs) - 1}")

    def forward(self, indices: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def weights(self) -> list[torch.Tensor]:
        """Each table as a [rows, width] view of the store (writes reach the store)."""
        raise NotImplementedError

    def row_states(self, table: int) -> list[torch.Tensor]:
        """Each row-shaped optimizer state of `table` as a [rows, k] view (created if the
        optimizer has none yet): what moves with a row when CAFE migrates it."""
        raise NotImplementedError

    def step(self) -> None:
        """Apply the update of the last backward pass (nothing where it was fused)."""

    @torch.no_grad()
    def load_tables(self, tables: Sequence[torch.Tensor]) -> None:
        """Copy initial values in, one tensor per table."""
        for view, table in zip(self.weights(), tables, strict=True):
            view.copy_(table.to(view.device, view.dtype))


class FbgemmTables(TableStore):
    """FBGEMM's SplitTableBatchedEmbeddingBagsCodegen with the optimizer fused into backward.

    Rows live in host memory on a CPU device and in HBM on a GPU, as fp32 (the training
    precision of every other path, so collapse stays exact).
    """

    fused = True

    def __init__(
        self, specs: Sequence[TableSpec], optimizer: TableOptimizer, device: torch.device,
        table_of: Sequence[int] | None = None,
    ) -> None:
        super().__init__(specs, optimizer, table_of)
        from fbgemm_gpu.split_embedding_configs import EmbOptimType
        from fbgemm_gpu.split_table_batched_embeddings_ops_common import (
            EmbeddingLocation,
            PoolingMode,
        )
        from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
            ComputeDevice,
            SplitTableBatchedEmbeddingBagsCodegen,
        )
        from fbgemm_gpu.tbe.config.optimizer_config import WeightDecayMode

        if optimizer.weight_decay and device.type == "cpu":
            # choose_backend keeps this from happening; a direct construction must not train
            # a different model than the torch fallback without saying so.
            raise ValueError("fbgemm 1.8's CPU kernel ignores weight_decay")

        if device.type == "cuda":
            location, compute = EmbeddingLocation.DEVICE, ComputeDevice.CUDA
        else:
            location, compute = EmbeddingLocation.HOST, ComputeDevice.CPU
        kind = {
            "rowwise_adagrad": EmbOptimType.EXACT_ROWWISE_ADAGRAD,
            "lazy_adam": EmbOptimType.ADAM,
        }[optimizer.kind]
        # The constructor logs its whole optimizer configuration at INFO, once per worker
        # and table store: noise in every job's output.
        previous = logging.root.manager.disable
        logging.disable(logging.INFO)
        try:
            self.tbe = SplitTableBatchedEmbeddingBagsCodegen(
                [(max(1, s.rows), s.width, location, compute) for s in specs],
                feature_table_map=self.table_of,
                optimizer=kind,
                learning_rate=optimizer.lr,
                eps=optimizer.eps,
                # L2 (g += wd·w inside the fused update): the rule of embeddings.optim, so
                # both backends train the same model.
                weight_decay=optimizer.weight_decay,
                weight_decay_mode=(WeightDecayMode.L2 if optimizer.weight_decay
                                   else WeightDecayMode.NONE),
                pooling_mode=PoolingMode.SUM,
                device=device,
            )
        finally:
            logging.disable(previous)
        # The row-shaped optimizer states' tensors (for `row_states`' cache key).
        self._state_names = [
            name for name in (f"momentum{i}_{where}" for i in (1, 2)
                              for where in ("host", "dev", "uvm"))
            if getattr(self.tbe, name, None) is not None and getattr(self.tbe, name).numel() > 1
        ]
        self._states_key: tuple[int, ...] | None = None
        self._states: list[list[torch.Tensor]] = []

    def forward(self, indices: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        return self.tbe(indices, offsets)

    def weights(self) -> list[torch.Tensor]:
        return [w.detach() for w in self.tbe.split_embedding_weights()]

    def row_states(self, table: int) -> list[torch.Tensor]:
        # `split_optimizer_states` splits every table's state on each call (a CAFE step
        # asks a dozen times): the views are kept while the state tensors stay where they
        # are (a loaded state dict copies into them; a new tensor would change the key).
        key = tuple(getattr(self.tbe, name).data_ptr() for name in self._state_names)
        if self._states_key != key:
            self._states = [
                [s.detach().view(max(1, spec.rows), -1)[: spec.rows] for s in states]
                for spec, states in zip(self.specs, self.tbe.split_optimizer_states(),
                                        strict=True)
            ]
            self._states_key = key
        return self._states[table]


class TorchTables(TableStore):
    """Plain torch: one weight per distinct width (tables of that width stacked by rows), one
    `embedding_bag` per width, sparse gradients, and `embeddings.optim`'s row-wise
    optimizers stepped by `step()`. Its optimizer state travels in the module's state_dict."""

    def __init__(
        self, specs: Sequence[TableSpec], optimizer: TableOptimizer, device: torch.device,
        table_of: Sequence[int] | None = None,
    ) -> None:
        super().__init__(specs, optimizer, table_of)
        widths = sorted({s.width for s in specs})
        # Tables of one width are contiguous in TBE order only if the caller sorted them;
        # any order works: each width's output columns are scattered back by `_columns`.
        self.groups: list[list[int]] = [[t for t, s in enumerate(specs) if s.width == w]
                                        for w in widths]
        self.weight_list = nn.ParameterList()
        self._row_offsets: list[int] = [0] * len(specs)
        for group in self.groups:
            start = 0
            for t in group:
                self._row_offsets[t] = start
                start += max(1, specs[t].rows)
            w = specs[group[0]].width
            self.weight_list.append(nn.Parameter(torch.zeros(start, w, device=device)))
        self._group_of = {t: g for g, group in enumerate(self.groups) for t in group}
        # Bags and output columns belong to virtual tables (see TableStore): each width's
        # weight is read by the virtual tables over its physical tables.
        virtual = self.table_of
        self._virtual_groups = [[v for v, t in enumerate(virtual) if self._group_of[t] == g]
                                for g in range(len(self.groups))]
        order = [v for group in self._virtual_groups for v in group]
        col = 0
        starts = {}
        for v in order:
            starts[v] = col
            col += specs[virtual[v]].width
        columns = [starts[v] + c for v in range(len(virtual))
                   for c in range(specs[virtual[v]].width)]
        identity = columns == list(range(len(columns)))
        self.register_buffer(
            "_columns", None if identity else torch.tensor(columns, device=device), False
        )
        # Each virtual table's first row inside its width's weight, and that weight's index.
        self.register_buffer("_table_row_offset", torch.tensor(
            [self._row_offsets[t] for t in virtual], dtype=torch.int64, device=device), False)
        self.register_buffer("_table_group", torch.tensor(
            [self._group_of[t] for t in virtual], dtype=torch.int64, device=device), False)
        params = list(self.weight_list)
        if optimizer.kind == "rowwise_adagrad":
            self.optimizer = RowWiseAdagrad(params, lr=optimizer.lr, eps=optimizer.eps,
                                            weight_decay=optimizer.weight_decay)
        else:
            self.optimizer = LazyAdam(params, lr=optimizer.lr, eps=optimizer.eps,
                                      weight_decay=optimizer.weight_decay)

    def forward(self, indices: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        tables = len(self.table_of)
        batch = (offsets.numel() - 1) // tables
        if tables == 1:
            weight = self.weight_list[0]
            return nn.functional.embedding_bag(
                indices, weight, offsets, mode="sum", sparse=True, include_last_offset=True
            ).view(tables, batch, -1).transpose(0, 1).reshape(batch, -1)
        lengths = (offsets[1:] - offsets[:-1]).view(tables, batch)
        bag_table = torch.repeat_interleave(
            torch.arange(tables, device=indices.device), lengths.sum(1)
        )
        rows = indices + self._table_row_offset[bag_table]
        outs = []
        for g, weight in enumerate(self.weight_list):
            if len(self.groups) == 1:
                idx, off = rows, offsets
            else:
                idx = rows[self._table_group[bag_table] == g]
                glen = lengths[self._table_group == g].reshape(-1)
                off = torch.cat([glen.new_zeros(1), glen.cumsum(0)])
            out = nn.functional.embedding_bag(
                idx, weight, off, mode="sum", sparse=True, include_last_offset=True
            )
            outs.append(out.view(len(self._virtual_groups[g]), batch, -1).transpose(0, 1)
                        .reshape(batch, -1))
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
        return out if self._columns is None else out.index_select(1, self._columns)

    def weights(self) -> list[torch.Tensor]:
        out = []
        for t, s in enumerate(self.specs):
            weight = self.weight_list[self._group_of[t]].detach()
            start = self._row_offsets[t]
            out.append(weight[start : start + s.rows])
        return out

    def row_states(self, table: int) -> list[torch.Tensor]:
        g = self._group_of[table]
        weight = self.weight_list[g]
        state = self.optimizer.state_for(weight)
        start, rows = self._row_offsets[table], self.specs[table].rows
        return [
            v.view(v.shape[0], -1)[start : start + rows]
            for v in state.values()
            if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == weight.shape[0]
        ]

    def step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def get_extra_state(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict()}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        if state and state.get("optimizer"):
            self.optimizer.load_state_dict(state["optimizer"])


def build_store(
    specs: Sequence[TableSpec],
    optimizer: TableOptimizer | None = None,
    backend: Backend = "auto",
    device: torch.device | str | None = None,
    table_of: Sequence[int] | None = None,
) -> TableStore:
    """A store for `specs` with the backend `choose_backend` picks (`table_of`: the physical
    table each virtual table reads, see `TableStore`)."""
    optimizer = optimizer or TableOptimizer()
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "meta":
        raise ValueError("a table store holds real memory; count bytes from the specs instead")
    narrow = [s.width for s in specs if s.width % 4]
    if narrow and backend == "fbgemm":
        raise ValueError(f"fbgemm's TBE needs table widths that are multiples of 4, got "
                         f"{sorted(set(narrow))}; use backend 'torch' or 'auto'")
    # FBGEMM's TBE refuses such widths (SCMA's per-element chunks, c = 1; low-rank's k = d /
    # ratio): auto → torch, the same rule.
    chosen = "torch" if narrow else choose_backend(backend, optimizer, device)
    cls = FbgemmTables if chosen == "fbgemm" else TorchTables
    return cls(specs, optimizer, device, table_of)

