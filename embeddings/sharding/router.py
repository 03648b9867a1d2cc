"""Embedding lookups across training workers: ids travel to each feature's owner, vectors back.

A feature's method instance lives whole on its owner (or, when split, each owner holds a
full instance for its part of the id space), so adaptive state such as CAFE's sketch never
needs synchronising. One `all_to_all_single` carries the ids of every feature, one carries
the vectors back, and autograd runs the reverse exchange to send gradients to the owners.
Tiny stateless tables are replicated instead and their gradients all-reduced.

Gradient scale: DDP averages dense gradients over the workers, so with a per-worker mean
loss the dense gradient equals that of one worker on the global batch. To train the same
model, embedding gradients are averaged the same way: an owner receives every worker's
gradient for the rows it serves and the sum is divided by the world size (in the backward
of the vector exchange), and replicated gradients are all-reduced and divided likewise.
Like DDP this assumes every worker's local batch has the same size.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.autograd import Variable

from embeddings.collection import EmbeddingCollection
from embeddings.methods.base import CompressedEmbedding
from embeddings.sharding.planner import SHARD_HASH_SEED, Placement, ShardingPlan
from embeddings.tables import Backend, TableOptimizer
from idhash.splitmix import hash64

ModuleFactory = Callable[[int, int, int], nn.Module]
"""make_module(feature_index, shard_index, num_shards) -> module with forward(ids[n]) -> [n, d].

It must give the same module (initial values included) for the same arguments on every
worker, e.g. by seeding a generator from the feature and shard, so that the model does not
depend on which worker a shard lands on. A split feature's part should be sized by its share
of the id space (the planner assumed bytes / num_shards).
"""


class _AllToAll(torch.autograd.Function):
    """all_to_all_single whose backward is the reverse exchange, with the gradient scaled."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        tensor: torch.Tensor,
        output_splits: list[int],
        input_splits: list[int],
        group: dist.ProcessGroup | None,
        grad_scale: float,
    ) -> torch.Tensor:
        ctx.output_splits = output_splits
        ctx.input_splits = input_splits
        ctx.group = group
        ctx.grad_scale = grad_scale
        return _all_to_all(tensor, output_splits, input_splits, group)

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        grad_in = _all_to_all(grad, ctx.input_splits, ctx.output_splits, ctx.group)
        if ctx.grad_scale != 1.0:
            grad_in = grad_in * ctx.grad_scale
        return grad_in, None, None, None, None


class _Scatter(torch.autograd.Function):
    """out[pos[i]] = x[i] for a permutation `pos`; the gradient gathers back (no accumulation)."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor, pos: torch.Tensor
    ) -> torch.Tensor:
        ctx.save_for_backward(pos)
        out = x.new_empty(x.shape)
        out[pos] = x
        return out

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor
    ) -> tuple[torch.Tensor, None]:
        (pos,) = ctx.saved_tensors
        return grad[pos], None


def _all_to_all(
    tensor: torch.Tensor,
    output_splits: list[int],
    input_splits: list[int],
    group: dist.ProcessGroup | None,
) -> torch.Tensor:
    """Rows of `tensor` split by `input_splits` go to each rank; returns what every rank sent."""
    out = tensor.new_empty((sum(output_splits), *tensor.shape[1:]))
    dist.all_to_all_single(out, tensor.contiguous(), output_splits, input_splits, group=group)
    return out


class ShardedEmbeddingCollection(nn.Module):
    """The embedding lookup of all features, executed across workers as `plan` says.

    forward(sparse [n_local, F] int64) -> [n_local, F, d]. Every worker must call forward
    (and backward) together: each call runs collectives. With world_size 1 no process group
    is needed and every lookup is local. On a GPU (NCCL) keep the inputs and the modules on
    the worker's device; nothing in the exchange goes through the CPU except split sizes.
    Modules return float32 vectors (the exchange buffers of every rank must agree).

    Gradients: embedding gradients are averaged over the workers like DDP's dense ones (see
    the module docstring), so N workers on equal halves of a batch train exactly what one
    worker trains on the whole batch, given the same plan (`plan.relocate`).

    Each rank's `state_dict` holds its own shards (`owned.<feature>[_shard<s>of<S>]`) and
    the replicas (`replicated.<feature>`): one checkpoint file per rank restores it.

    Dense layers wrapped in DDP and this module may share one process group: every worker
    runs the same autograd graph, so the collectives are issued in the same order. A
    dedicated group (`dist.new_group()`) can be passed all the same.

    Args:
        plan: the placement of every feature; its `num_workers` must equal `world_size`.
        make_module: builds the module of (feature index, shard index, num_shards); only
            the modules this rank owns, and the replicated ones, are built.
        embedding_dim: d, the width every module returns.
        rank: this worker's rank (default: from the initialised process group, else 0).
        world_size: number of workers (default: from the process group, else 1).
        process_group: the group for the exchanges (default: the default group).
        device: where the modules live (the worker's GPU under NCCL); default: wherever
            `make_module` put them.
    """

    def __init__(
        self,
        plan: ShardingPlan,
        make_module: ModuleFactory,
        embedding_dim: int,
        rank: int | None = None,
        world_size: int | None = None,
        process_group: dist.ProcessGroup | None = None,
        device: torch.device | str | None = None,
        table_optimizer: TableOptimizer | None = None,
        backend: Backend = "auto",
    ) -> None:
        super().__init__()
        rank, world_size = _rank_and_world_size(plan, rank, world_size, process_group)
        self.plan = plan
        self.rank = rank
        self.world_size = world_size
        self.embedding_dim = embedding_dim
        self.group = process_group
        self.num_features = len(plan.features)

        self.owned = nn.ModuleDict()
        self.replicated = nn.ModuleDict()
        self._replicated_columns: list[int] = []
        for i, f in enumerate(plan.features):
            if f.placement is Placement.REPLICATED:
                self.replicated[module_key(f.name, 0, 1)] = make_module(i, 0, 1)
                self._replicated_columns.append(i)
        self._build_owned(make_module)

        # The owned methods' tables go into one table-batched store: every owned slot is
        # looked up in one call per step (methods that are not compressed-embedding methods,
        # as in some tests, keep their own forward).
        self.local: EmbeddingCollection | None = None
        owned = dict(self.owned.items())
        if owned and all(isinstance(m, CompressedEmbedding) for m in owned.values()):
            self.local = EmbeddingCollection.from_methods(
                owned, embedding_dim, optimizer=table_optimizer, backend=backend, device=device
            )
        if device is not None:
            self.to(device)
        self._replicated_params = [p for p in self.replicated.parameters() if p.requires_grad]
        self._sync_queued = False
        if world_size > 1 and len(self.replicated):
            self._broadcast_replicated()
            for p in self._replicated_params:
                p.register_post_accumulate_grad_hook(self._on_replicated_grad)

    def _build_owned(self, make_module: ModuleFactory) -> None:
        """The routed features' send layout, and the modules of the slots this rank owns."""
        plan = self.plan
        # Slots are (feature, shard) pairs of routed features, numbered in send order: by
        # owner rank, then feature, then shard. Ids bound for one rank are then contiguous,
        # and within them grouped by slot, which is the layout all_to_all_single needs.
        routed = [i for i, f in enumerate(plan.features) if f.placement is not Placement.REPLICATED]
        slots = sorted(
            (owner, i, s) for i in routed for s, owner in enumerate(plan.features[i].owners)
        )
        self._slots_per_rank = [sum(o == r for o, _, _ in slots) for r in range(self.world_size)]
        self._my_slots: list[str] = []
        for owner, i, s in slots:
            if owner == self.rank:
                key = module_key(plan.features[i].name, s, plan.features[i].num_shards)
                self.owned[key] = make_module(i, s, plan.features[i].num_shards)
                # Shared CAFE hot tables are per planned worker: the same on any world size.
                self.owned[key].hot_table_group = plan.features[i].group_of(s)
                self._my_slots.append(key)
        self._routed = routed
        self._any_split = any(plan.features[i].num_shards > 1 for i in routed)
        self._register_layout(routed, slots)

    def _register_layout(self, routed: list[int], slots: list[tuple[int, int, int]]) -> None:
        """The index tensors `_routed_lookup` sends ids by, and `forward` orders columns by.

        Buffers follow the module to its device; they are derived from the plan, so they stay
        out of checkpoints."""
        features = self.plan.features
        # Numbering (feature, shard) as base[feature] + shard, then mapping to send order.
        base, order_of = [], {}
        for i in routed:
            base.append(len(order_of))
            for s in range(features[i].num_shards):
                order_of[(i, s)] = len(order_of)
        to_send_order = [0] * len(order_of)
        for position, (_, i, s) in enumerate(slots):
            to_send_order[order_of[(i, s)]] = position
        self.register_buffer("_routed_columns", torch.tensor(routed, dtype=torch.int64), False)
        self.register_buffer(
            "_num_shards",
            torch.tensor([features[i].num_shards for i in routed], dtype=torch.int64),
            False,
        )
        self.register_buffer("_slot_base", torch.tensor(base, dtype=torch.int64), False)
        self.register_buffer("_send_order", torch.tensor(to_send_order, dtype=torch.int64), False)
        # Without split features each routed feature is one slot: k-th routed feature in
        # send order, for sending ids feature by feature.
        slot_of_feature = [to_send_order[b] for b in base]
        self.register_buffer(
            "_routed_in_send_order",
            torch.tensor(sorted(range(len(routed)), key=slot_of_feature.__getitem__),
                         dtype=torch.int64),
            False,
        )
        # forward builds [routed..., replicated...] columns; this puts them in plan order.
        built = routed + [i for i, f in enumerate(features) if f.placement is Placement.REPLICATED]
        order = [built.index(i) for i in range(len(features))]
        identity = order == list(range(len(order)))
        self.register_buffer(
            "_column_order", None if identity else torch.tensor(order, dtype=torch.int64), False
        )

    def forward(self, sparse: torch.Tensor) -> torch.Tensor:
        """Embedding vectors of every (row, feature).

        Args:
            sparse: [n_local, F] raw int64 feature values, one column per plan feature.
        """
        if sparse.dim() != 2 or sparse.shape[1] != self.num_features:
            raise ValueError(f"sparse must be [n, {self.num_features}], got {list(sparse.shape)}")
        n = sparse.shape[0]
        # One transpose, so each feature's ids are a contiguous column (hashing, searchsorted).
        columns = sparse.to(torch.int64).t().contiguous()
        blocks = []
        if self._routed:
            pos, vec = self._routed_lookup(columns)
            blocks.append(_Scatter.apply(vec, pos).view(n, len(self._routed), self.embedding_dim))
        if self._replicated_columns:
            blocks.append(torch.stack(
                [m(columns[c]) for c, m in zip(self._replicated_columns, self.replicated.values(),
                                               strict=True)],
                dim=1,
            ))
        out = blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=1)
        if self._column_order is not None:
            out = out[:, self._column_order]
        return out

    def _routed_lookup(self, columns: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(positions row * R + k among the R routed features, vectors), in send order."""
        n = columns.shape[1]
        routed = len(self._routed)
        ids = columns[self._routed_columns]  # [R, n]
        if self._any_split:
            shard = hash64(ids, SHARD_HASH_SEED) % self._num_shards[:, None]  # planner.shard_of
            slot = self._send_order[self._slot_base[:, None] + shard].t().reshape(-1)
            # Stable, so within one slot the rows keep their order: a one-worker run and an
            # N-worker run then feed each module the same ids in the same order.
            order = torch.sort(slot, stable=True).indices
            send_ids = ids.t().reshape(-1)[order]
            send_pos = order
            send_counts = torch.bincount(slot, minlength=self._send_order.numel())
        else:
            # One slot per feature: sending feature by feature in slot order needs no sort.
            send_ids = ids[self._routed_in_send_order].reshape(-1)
            rows = torch.arange(n, device=columns.device, dtype=torch.int64)
            send_pos = (rows * routed + self._routed_in_send_order[:, None]).reshape(-1)
            send_counts = None

        mine = len(self._my_slots)
        if self.world_size == 1:
            recv_ids = send_ids
            input_splits = output_splits = [send_ids.numel()]
            counts = [n] * routed if send_counts is None else send_counts.tolist()
        else:
            if send_counts is None:
                send_counts = torch.full((routed,), n, dtype=torch.int64, device=columns.device)
            # Every rank's counts in one all_gather (not an all-to-all): a step then makes
            # two all-to-alls forward (ids, vectors) and one backward, whatever the features.
            gathered = send_counts.new_empty(self.world_size * send_counts.numel())
            gather_one = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
            gather_one(gathered, send_counts.contiguous(), group=self.group)
            gathered = gathered.view(self.world_size, -1)
            first = sum(self._slots_per_rank[: self.rank])
            recv_counts = gathered[:, first : first + mine].reshape(-1)
            per_rank_send = torch.stack([c.sum() for c in send_counts.split(self._slots_per_rank)])
            # Split sizes must be Python ints: one host sync for all of them.
            sizes = torch.cat([per_rank_send, recv_counts]).tolist()
            input_splits = sizes[: self.world_size]
            counts = sizes[self.world_size :]
            output_splits = [sum(counts[r * mine : (r + 1) * mine]) for r in range(self.world_size)]
            recv_ids = _all_to_all(send_ids, output_splits, input_splits, self.group)

        if mine:
            out = self._serve(recv_ids, counts)
        else:
            out = recv_ids.new_zeros((0, self.embedding_dim), dtype=torch.float32)
        if self.world_size > 1:
            out = _AllToAll.apply(
                out, input_splits, output_splits, self.group, 1.0 / self.world_size
            )
        return send_pos, out

    def _serve(self, recv_ids: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """Vectors of the ids this rank owns, in the order they arrived.

        Args:
            recv_ids: ids from every rank, grouped by source rank, then by owned slot.
            counts: ids per (source rank, owned slot), source-major.
        """
        mine = len(self._my_slots)
        if self.local is not None:
            return self._serve_batched(recv_ids, counts)
        pieces = recv_ids.split(counts)
        sources = range(len(counts) // mine)
        # Each module takes all of its ids at once, sources in rank order (as the rows of a
        # one-worker run would be), and its vectors go back where the ids came from.
        per_slot = []
        for s, key in enumerate(self._my_slots):
            ids = [pieces[r * mine + s] for r in sources]
            vectors = self.owned[key](ids[0] if len(ids) == 1 else torch.cat(ids))
            per_slot.append(vectors.split([counts[r * mine + s] for r in sources]))
        return torch.cat([per_slot[s][r] for r in sources for s in range(mine)])

    def _serve_batched(self, recv_ids: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """`_serve` through the local collection: one store lookup for every owned slot.

        Ids arrive per (source rank, slot); each source's block becomes rows of an
        [ids, slots] matrix. Slots of a split feature hold fewer ids than the others: their
        column is padded, and the padding is read by no table (empty bags, zero vectors,
        dropped on the way back).
        """
        mine = len(self._my_slots)
        sources = len(counts) // mine
        per_source = [counts[r * mine : (r + 1) * mine] for r in range(sources)]
        equal = all(len(set(c)) == 1 for c in per_source)
        blocks, valid_blocks = [], []
        offset = 0
        for c in per_source:
            if equal:
                block = recv_ids[offset : offset + mine * c[0]].view(mine, c[0]).t()
                valid = None
            else:
                m = max(c)
                pieces = recv_ids[offset : offset + sum(c)].split(c)
                block = recv_ids.new_zeros((m, mine))
                valid = torch.zeros((m, mine), dtype=torch.bool, device=recv_ids.device)
                for s, piece in enumerate(pieces):
                    block[: piece.numel(), s] = piece
                    valid[: piece.numel(), s] = True
            offset += sum(c)
            blocks.append(block)
            valid_blocks.append(valid)
        matrix = blocks[0] if sources == 1 else torch.cat(blocks)
        valid = None if equal else torch.cat(valid_blocks)
        vectors = self.local(matrix, valid=valid)  # [rows, slots, d]
        out, start = [], 0
        for c, block in zip(per_source, blocks, strict=True):
            part = vectors[start : start + block.shape[0]]
            start += block.shape[0]
            if equal:
                out.append(part.transpose(0, 1).reshape(-1, self.embedding_dim))
            else:
                out += [part[: c[s], s] for s in range(mine)]
        return out[0] if len(out) == 1 else torch.cat(out)

    def _on_replicated_grad(self, _: torch.Tensor) -> None:
        # Runs once per replicated parameter during backward; the all-reduce waits for the
        # end of the backward pass so that all of them happen in one collective.
        if not self._sync_queued:
            self._sync_queued = True
            Variable._execution_engine.queue_callback(self._sync_after_backward)

    def _sync_after_backward(self) -> None:
        self._sync_queued = False
        self.sync_replicated_grads()

    @torch.no_grad()
    def sync_replicated_grads(self) -> None:
        """Average the replicated tables' gradients over the workers (runs after backward).

        Called automatically at the end of every backward pass; calling it again is harmless
        because averaging identical gradients changes nothing. Sparse gradients travel dense
        (replicated tables are tiny by construction) and come back sparse over the rows that
        any worker touched. Gradient accumulation over several backward passes stays exact.
        """
        if self.world_size == 1 or not self._replicated_params:
            return
        dense: list[torch.Tensor] = []
        touched: list[torch.Tensor] = []  # per sparse gradient: 1 for each row this worker used
        for p in self._replicated_params:
            g = p.grad
            if g is None:
                dense.append(torch.zeros_like(p))
            elif g.is_sparse:
                # Uncoalesced: index_add_ sums repeated rows, which is what coalescing would do
                # first, without its sort.
                rows = g._indices()[0]
                dense.append(torch.zeros_like(p).index_add_(0, rows, g._values()))
                mask = torch.zeros(p.shape[0], dtype=torch.float32, device=p.device)
                touched.append(mask.index_fill_(0, rows, 1.0))
            else:
                dense.append(g)
        # One collective for the gradients and the touched-row masks together.
        flat = torch.cat([g.reshape(-1).to(torch.float32) for g in dense] + touched)
        dist.all_reduce(flat, group=self.group)
        flat /= self.world_size
        offset = 0
        averaged = []
        for g in dense:
            averaged.append(flat[offset : offset + g.numel()].view_as(g).to(g.dtype))
            offset += g.numel()
        masks = iter(flat[offset:].split([m.numel() for m in touched]))
        for p, avg in zip(self._replicated_params, averaged, strict=True):
            if p.grad is None:
                p.grad = avg.clone()
            elif p.grad.is_sparse:
                # Rows any worker touched, found from the masks: converting the dense sum
                # back with to_sparse() scans every value and cost half of a training step.
                rows = next(masks).nonzero().squeeze(1)
                # Built here from unique sorted rows, so valid by construction: the check
                # would scan what it builds on every step.
                p.grad = torch.sparse_coo_tensor(
                    rows.unsqueeze(0), avg[rows], avg.shape, is_coalesced=True,
                    check_invariants=False,
                )
            else:
                p.grad.copy_(avg)

    @torch.no_grad()
    def _broadcast_replicated(self) -> None:
        """Copy rank 0's replicated tables everywhere, as DDP does for dense parameters."""
        tensors = [t for t in self.replicated.state_dict().values() if t.is_floating_point()]
        if not tensors:
            return
        flat = torch.cat([t.reshape(-1).to(torch.float32) for t in tensors])
        if dist.get_backend(self.group) == "nccl" and not flat.is_cuda:
            # NCCL only moves GPU memory; tables may still be on the CPU at construction.
            flat = flat.to(torch.device("cuda", torch.cuda.current_device()))
        dist.broadcast(flat, src=_global_rank(0, self.group), group=self.group)
        offset = 0
        for t in tensors:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()

    def step(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """After the backward pass: the local store's update where it was not fused, then
        every local module's post-step hook.

        Args:
            optimizer: the replicated tables' optimizer, for methods that move its state.
        """
        others = list(self.replicated.values())
        if self.local is not None:
            # The store's update, the owned methods' hooks and shared CAFE hot tables'.
            self.local.step(optimizer)
        else:
            others += list(self.owned.values())
        for module in others:
            hook = getattr(module, "after_step", None)
            if callable(hook):
                hook(optimizer)

    def replicated_tables(self) -> list[nn.Parameter]:
        """Tables outside the local store (the replicated ones, and owned modules that are
        not compression methods): they train with a row-wise optimizer of the caller's."""
        modules = [*self.replicated.values()]
        if self.local is None:
            modules += list(self.owned.values())
        return [p for m in modules for p in m.tables]

    def schedule(self, total_steps: int) -> None:
        """Tell this worker's methods the run's optimizer steps (MPE's search length)."""
        modules = [*self.replicated.values()]
        modules += [self.local] if self.local is not None else list(self.owned.values())
        for m in modules:
            if callable(getattr(m, "schedule", None)):
                m.schedule(total_steps)

    def regularization(self) -> torch.Tensor | None:
        """The loss terms of this worker's methods (MPE's bit-width penalty), or None: each
        method's term lives where its parameters do, so every worker adds its own."""
        modules = [*self.replicated.values()]
        modules += [self.local] if self.local is not None else list(self.owned.values())
        terms = [t for m in modules
                 if callable(getattr(m, "regularization", None))
                 and (t := m.regularization()) is not None]
        return torch.stack(terms).sum() if terms else None

    def dense_parameters(self) -> list[nn.Parameter]:
        """Everything else that trains (MLET projections): for the dense optimizer."""
        skip = {id(p) for p in self.replicated_tables()}
        if self.local is not None:
            # The local tables, shared CAFE hot tables included, train in their own stores.
            dense = {id(p) for p in self.local.dense_parameters()}
            skip |= {id(p) for p in self.local.parameters() if id(p) not in dense}
        return [p for p in self.parameters() if id(p) not in skip and p.requires_grad]

    def training_bytes(self) -> int:
        """Bytes this worker holds for its modules (the methods' own count where they have one)."""
        total = 0
        for module in [*self.owned.values(), *self.replicated.values()]:
            count = getattr(module, "training_bytes", None)
            if callable(count):
                total += int(count())
            else:
                total += sum(t.numel() * t.element_size() for t in module.parameters())
                total += sum(t.numel() * t.element_size() for t in module.buffers())
        return total


def module_key(name: str, shard: int, num_shards: int) -> str:
    """Name of a shard's module under `owned`/`replicated`: the feature, plus the shard if split.

    Args:
        name: the feature's name.
        shard: the shard index.
        num_shards: the feature's number of shards.
    """
    name = name.replace(".", "_")  # a module name may not contain dots
    return name if num_shards == 1 else f"{name}_shard{shard}of{num_shards}"



def _global_rank(group_rank: int, group: dist.ProcessGroup | None) -> int:
    return group_rank if group is None else dist.get_global_rank(group, group_rank)


def _rank_and_world_size(
    plan: ShardingPlan, rank: int | None, world_size: int | None,
    group: dist.ProcessGroup | None,
) -> tuple[int, int]:
    """(rank, world size): the given ones, else the process group's (one worker without
    one), checked against the plan."""
    initialised = dist.is_available() and dist.is_initialized()
    if world_size is None:
        world_size = dist.get_world_size(group) if initialised else 1
    if rank is None:
        rank = dist.get_rank(group) if initialised else 0
    if plan.num_workers != world_size:
        raise ValueError(
            f"the plan is for {plan.num_workers} workers but world_size is {world_size}; "
            "use plan.relocate(world_size) to train the same model on another world size"
        )
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside 0..{world_size - 1}")
    if world_size > 1 and not initialised:
        raise RuntimeError(f"world_size {world_size} needs torch.distributed initialised")
    return rank, world_size
