"""MPE: mixed-precision embeddings learned per frequency group (Li et al., arXiv 2409.20305).

Values are ranked by frequency and cut into g = 128 groups; each group learns logits γ over
the bit widths {0, …, 6} (0 = its rows are pruned to zero). While searching, a row reads
Σ_b softmax(γ_g/τ)_b · LSQ+(e; α_b, β) (τ = 3e-3, a learned step α_b per width and an
offset β per dimension), and the loss adds λ·Σ_g w_g Σ_b p_gb·b with w_g the group's rarity
(the lowest group mean count over group g's: the rarest group weighs 1, as the paper's
1 / (count_g / min count)), so rare groups are pushed to few bits. After `search_steps`
(default: half the run, which the train job announces through `schedule`) each group keeps
the largest width whose probability is ≥ 1/14, the tables are reset to their initial values
(regenerated from a stored seed, not copied), their optimizer rows zeroed, and training goes
on quantisation-aware at those widths (α, β and the dense model are kept, as the paper's
code keeps them). Serving stores per-width packed codes (`embeddings.serving_mpe`).

Changed from the paper's code (Leopold1423/mpe, model/embedding.py OptFP_Embedding), and why:
- No exact vocabulary of every value: a key costs 8 bytes a value, more than the codes, and
  would cap the ratio at 8× (a d = 16 fp32 row is 64 bytes). The most frequent values (as
  many as the budget pays for, at the largest width) own rows; the rest hash into tail rows
  that form one more group, the last, whose rarity is its count per tail row. Without
  statistics every value hashes to the tail.
- The budget is planned at the largest width (every group's widths are undecided before the
  search), so the realised serving bytes are at most the planned ones; the table reports
  the realised ones.
- Rows start N(0, 0.003²) as in the paper's code, not U(±1/sqrt(d)) like other embpress
  methods: at an ordinary scale the random rows score worse than zero vectors, and the
  search (τ = 3e-3 saturates the softmax within a few steps) prunes every group at once.
  The dense optimizer keeps its state over the switch (the paper's code rebuilds it).
- Evaluation (no gradient) during the search scores the widths the search would fix now,
  which is what `collapse` serves; only a training forward reads the soft mixture.
- MLET is refused: its projection would fold into the rows and undo their codes.
- On CPU a training step runs the transform in two compiled kernels (`_MixedLsq`: the paper's
  LSQ+ gradients, widths of negligible probability skipped); elsewhere, and without
  gradients, torch ops compute the same values.
"""

from __future__ import annotations

import math
from typing import Literal

import numba as nb
import numpy as np
import torch
from pydantic import Field, model_validator

from embeddings import budget
from embeddings.batched_lookup import compiled_path, open_addressing_builder
from embeddings.mapping import Combiner, FullMapper
from embeddings.methods.base import (
    CompressedEmbedding,
    FeatureStats,
    MethodConfig,
    gather,
)
from embeddings.serving_embedding import ServingEmbedding
from embeddings.serving_mpe import (
    MpeMapper,
    MpePackedTable,
    code_bytes,
    pack_codes,
)
from idhash.splitmix import hash64_scalar, seed_offset

__all__ = ["MpeConfig", "MpeEmbedding", "mpe_serving_bytes"]


class _ScaleGrad(torch.autograd.Function):
    """Identity forward, gradient × scale backward (LSQ's gradient scale, value untouched so
    training and serving compute bit-identical rows)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(scale)
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        (scale,) = ctx.saved_tensors
        return grad * scale, None


# A width whose probability is below this adds nothing a float32 sum would keep, and its
# logit's gradient is as small (it carries a factor p_b): the CPU kernels skip it.
_NEGLIGIBLE = 1e-7


@nb.njit(nogil=True, cache=True, error_model="numpy")
def _mixed_forward(x, probs, groups, alpha, beta, lo, hi, slot,
                   out):  # pragma: no cover - compiled
    """out[i, f] = Σ_b p_b · (clamp(round((x − β_f)/α_fb), lo_b, hi_b)·α_fb + β_f), p_b =
    probs[s, groups[i, s], b], s = slot[f]; a feature with slot −1 (another method's)
    passes unchanged."""
    n, k, d = x.shape
    widths = probs.shape[2]
    for i in range(n):
        for f in range(k):
            s = slot[f]
            for c in range(d):  # explicit loops: a slice per (i, f) cost more than the math
                out[i, f, c] = x[i, f, c] if s < 0 else 0.0
            if s < 0:
                continue
            group = groups[i, s]
            for b in range(widths):  # widths outside, so the loop over d vectorises
                pb = probs[s, group, b]
                if pb < _NEGLIGIBLE:
                    continue
                a, low, high = alpha[f, b], lo[b], hi[b]
                for c in range(d):
                    q = min(max(np.round((x[i, f, c] - beta[f, c]) / a), low), high)
                    out[i, f, c] += pb * (q * a + beta[f, c])


# Reassociated sums (gradients only): the reductions over d then vectorise, 7× faster.
@nb.njit(nogil=True, cache=True, error_model="numpy", fastmath={"reassoc", "nsz", "contract"})
def _mixed_backward(g, x, probs, groups, alpha, beta, lo, hi, scale, slot, want_p,
                    dx, dprobs, dalpha, dbeta):  # pragma: no cover - compiled
    """LSQ+'s gradients (the paper's code): x passes where lo ≤ w ≤ hi; α gets
    round(w) − w inside and the bound outside, β the gradient outside, both × scale."""
    n, k, d = x.shape
    widths = probs.shape[2]
    gx = np.empty(d, np.float32)
    gb = np.empty(d, np.float32)
    for i in range(n):
        for f in range(k):
            s = slot[f]
            if s < 0:
                for c in range(d):
                    dx[i, f, c] = g[i, f, c]
                continue
            for c in range(d):
                gx[c] = 0.0
                gb[c] = 0.0
            group = groups[i, s]
            for b in range(widths):
                pb = probs[s, group, b]
                if pb < _NEGLIGIBLE:
                    continue
                a, low, high = alpha[f, b], lo[b], hi[b]
                psc = pb * scale[f, b]
                da = np.float32(0.0)
                dpb = np.float32(0.0)
                for c in range(d):  # branch-free, so it vectorises
                    gc = g[i, f, c]
                    w = (x[i, f, c] - beta[f, c]) / a
                    q = min(max(np.round(w), low), high)
                    inside = (w >= low) & (w <= high)
                    da += gc * (q - w if inside else q)
                    gb[c] += np.float32(0.0) if inside else gc * psc
                    gx[c] += pb * gc if inside else np.float32(0.0)
                    dpb += gc * (q * a + beta[f, c])
                dalpha[f, b] += da * psc
                if want_p:
                    dprobs[s, group, b] += dpb
            for c in range(d):
                dx[i, f, c] = gx[c]
                dbeta[f, c] += gb[c]




@nb.njit(nogil=True, cache=True)
def _map_ids(ids, keys, slot_rows, explicit, tail, offset, group_size, tail_group,
             rows, groups):  # pragma: no cover - compiled
    """The training mapper's rule (an explicit value's rank row, else explicit + hash mod
    tail) and each row's group, in one pass (torch's sorted search took 1 ms a feature)."""
    mask = keys.shape[0] - 1
    zero = np.uint64(0)
    for i in range(ids.shape[0]):
        x = ids[i]
        row = -1
        if explicit > 0:
            slot = hash64_scalar(x, zero) & mask
            while slot_rows[slot] >= 0:
                if keys[slot] == x:
                    row = slot_rows[slot]
                    break
                slot = (slot + 1) & mask
        if row < 0:
            rows[i] = explicit + hash64_scalar(x, offset) % tail
            groups[i] = tail_group
        else:
            rows[i] = row
            groups[i] = row // group_size


class _MixedLsq(torch.autograd.Function):
    """Σ_b p_b·LSQ+(x; α_b, β) for [n, k, d] rows of k features in one compiled pass each
    way (CPU): torch's ops over [n, k, widths, d] took 15× a hash step."""

    @staticmethod
    def forward(ctx, x, probs, groups, alpha, beta, scale, lo, hi, slot,  # type: ignore[override]
                want_p):
        x, probs = x.detach().contiguous(), probs.detach().contiguous()
        alpha, beta = alpha.detach().contiguous(), beta.detach().contiguous()
        groups = groups.contiguous()
        out = torch.empty_like(x)
        _mixed_forward(x.numpy(), probs.numpy(), groups.numpy(), alpha.numpy(), beta.numpy(),
                       lo.numpy(), hi.numpy(), slot.numpy(), out.numpy())
        ctx.save_for_backward(x, probs, groups, alpha, beta, scale, lo, hi, slot)
        ctx.want_p = want_p
        return out

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        x, probs, groups, alpha, beta, scale, lo, hi, slot = ctx.saved_tensors
        grad = grad.contiguous()
        dx, dprobs = torch.empty_like(x), torch.zeros_like(probs)
        dalpha, dbeta = torch.zeros_like(alpha), torch.zeros_like(beta)
        _mixed_backward(grad.numpy(), x.numpy(), probs.numpy(), groups.numpy(), alpha.numpy(),
                        beta.numpy(), lo.numpy(), hi.numpy(), scale.numpy(), slot.numpy(),
                        ctx.want_p, dx.numpy(), dprobs.numpy(), dalpha.numpy(), dbeta.numpy())
        return (dx, dprobs if ctx.want_p else None, None, dalpha, dbeta, None, None, None, None,
                None)


def _round_ste(w: torch.Tensor) -> torch.Tensor:
    """round(w) with a straight-through gradient (exactly round(w) in value)."""
    if not w.requires_grad:
        return torch.round(w)
    return w + (torch.round(w) - w).detach()


def mpe_serving_bytes(group_rows: torch.Tensor, tail_rows: int, bits: torch.Tensor,
                      dim: int) -> int:
    """Exact bytes of the serving form (`embeddings.serving_mpe`) for given group widths.

    Args:
        group_rows: int64 [g] explicit rows of each group (the tail group's are 0).
        tail_rows: rows of the tail (the last group's).
        bits: int [g] width of each group.
        dim: d.
    """
    bits = bits.to(torch.int64).cpu()
    group_rows = group_rows.cpu()
    total, segments = 0, 0
    for b in range(1, int(bits.max()) + 1 if len(bits) else 1):
        rows = int(group_rows[bits == b].sum())
        if rows:
            total += rows * (8 + code_bytes(dim, b))  # key, codes
            segments += 1
    tail_bits = int(bits[-1])
    if tail_bits > 0:
        total += tail_rows * code_bytes(dim, tail_bits)
        segments += 1
        # Pruned explicit rows keep their keys, so they do not read the tail; under a
        # pruned tail they need none (their hash reads zero as well).
        total += int(group_rows[bits == 0].sum()) * 8
    return total + 4 * segments + 4 * dim  # α per segment, β


class MpeEmbedding(CompressedEmbedding):
    """One feature's MPE: explicit rows by frequency rank, hashed tail rows, γ/α/β.

    Args:
        mapper: the training mapper (a FullMapper whose value rows are frequency ranks).
        rows: table rows (explicit + tail).
        explicit: explicit rows (rows [explicit, rows) are the tail).
        dim: d.
        groups: g (the last is the tail's).
        max_bits: widths are {0, …, max_bits}.
        tau: softmax temperature of γ.
        threshold: a width survives the search if its probability is ≥ threshold.
        reg: λ.
        rarity: float32 [g] w_g of the penalty.
        search_steps: optimizer steps before the widths are fixed (None: `search_fraction`
            of the steps `schedule` announces; 1000 if none is announced).
        search_fraction: share of the run spent searching when `search_steps` is None.
        init_std: rows start N(0, init_std²).
        sparse: sparse table gradients.
    """

    has_post_lookup = True

    def __init__(self, mapper: FullMapper, rows: int, explicit: int, dim: int, groups: int,
                 max_bits: int, tau: float, threshold: float, reg: float,
                 rarity: torch.Tensor, search_steps: int | None, search_fraction: float = 0.5,
                 init_std: float = 0.003, sparse: bool = False) -> None:
        super().__init__(mapper, [rows], Combiner.SUM, dim, None, sparse)
        self.explicit = explicit
        self.tail_rows = rows - explicit
        self.groups = groups
        self.group_size = max(1, math.ceil(explicit / max(1, groups - 1)))
        self.max_bits = max_bits
        self.tau = tau
        self.threshold = threshold
        self.reg = reg
        self.fixed_search = search_steps is not None
        self.search_steps = search_steps if search_steps is not None else 1000
        self.search_fraction = search_fraction
        self.init_std = init_std
        table = self.tables[0]
        self.gamma = torch.nn.Parameter(torch.zeros(groups, max_bits + 1, device=table.device))
        # 2^(b−1) for b = 1…max_bits (on the CPU even while a plan builds on the meta device)
        levels = 2.0 ** torch.arange(max_bits, device="cpu")
        # The paper's init: α_b = 2·mean|e| / sqrt(2^(b−1)), mean|e| = σ·sqrt(2/π) for N(0, σ²).
        mean_abs = init_std * math.sqrt(2 / math.pi)
        self.alpha = torch.nn.Parameter((2 * mean_abs / levels.sqrt()).to(table.device))
        self.beta = torch.nn.Parameter(torch.zeros(dim, device=table.device))
        # LSQ's gradient scale 1/sqrt(levels · table elements), per width.
        self._grad_scale = (1.0 / (levels * rows * dim).sqrt()).tolist()
        self.register_buffer("rarity", rarity.to(torch.float32).to(table.device))
        # -1 while searching; the fixed width of each group after.
        self.register_buffer("bits", torch.full((groups,), -1, dtype=torch.int8,
                                                device=table.device))
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64, device=table.device))
        # The initial rows are regenerated from this seed at the switch (a copy would double
        # the table's bytes); drawn from torch's generator, which callers seed per feature.
        self.register_buffer("init_seed", torch.randint(
            0, 2**62, (), dtype=torch.int64, device="cpu").to(table.device))
        self.last_groups: torch.Tensor | None = None
        if not table.is_meta:
            with torch.no_grad():
                table.copy_(self.initial_table())

    # -- rows, groups, widths ----------------------------------------------------------

    def initial_table(self) -> torch.Tensor:
        """The table's initial rows, regenerated from `init_seed` (CPU generator)."""
        g = torch.Generator().manual_seed(int(self.init_seed))
        rows, width = self.tables[0].shape
        return torch.empty(rows, width).normal_(0.0, self.init_std, generator=g)

    def group_of(self, rows: torch.Tensor) -> torch.Tensor:
        """Group of each table row: explicit rows by frequency rank, the tail the last."""
        explicit = torch.div(rows, self.group_size, rounding_mode="floor")
        return torch.where(rows < self.explicit, explicit, self.groups - 1)

    def group_rows(self) -> torch.Tensor:
        """int64 [g] explicit rows of each group (the tail group's explicit rows: 0)."""
        starts = torch.arange(self.groups, dtype=torch.int64, device="cpu") * self.group_size
        sizes = (self.explicit - starts).clamp(min=0, max=self.group_size)
        sizes[-1] = 0
        return sizes

    @property
    def searching(self) -> bool:
        return int(self.bits[0]) < 0

    def probabilities(self) -> torch.Tensor:
        """[g, max_bits + 1] softmax(γ/τ)."""
        return torch.softmax(self.gamma / self.tau, dim=-1)

    @torch.no_grad()
    def current_bits(self) -> torch.Tensor:
        """int64 [g]: the fixed widths, or while searching the largest width with p ≥ threshold."""
        if not self.searching:
            return self.bits.to(torch.int64)
        keep = self.probabilities() >= self.threshold
        widths = torch.arange(self.max_bits + 1, device=keep.device)
        return (keep * widths).amax(dim=1)

    def step_sizes(self) -> torch.Tensor:
        """[max_bits] α_b as used: |α| + 1e-10 (as the paper's code)."""
        return self.alpha.abs() + 1e-10

    # -- training ----------------------------------------------------------------------

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.bound:
            return super().forward(ids)  # refuses, with the reason
        lookup = self.mapper(ids)
        self.last_groups = self.group_of(lookup.rows[:, 0])
        out = gather(self.tables, lookup, self.combiner, self.sparse)
        return type(self).post_lookup_batch([self], out[:, None]).squeeze(1)

    def packed_lookup(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not compiled_path(ids):
            rows, mask = super().packed_lookup(ids)
            self.last_groups = self.group_of(rows[:, 0])
            return rows, mask
        keys, slot_rows = self._slots()
        cpu = ids.contiguous().numpy()
        rows = np.empty(cpu.shape[0], np.int64)
        groups = np.empty(cpu.shape[0], np.int64)
        mapper: FullMapper = self.mapper  # type: ignore[assignment]
        _map_ids(cpu, keys, slot_rows, self.explicit, self.tail_rows, seed_offset(mapper.seed),
                 self.group_size, self.groups - 1, rows, groups)
        self.last_groups = torch.from_numpy(groups)
        return torch.from_numpy(rows)[:, None], None

    def _slots(self) -> tuple[np.ndarray, np.ndarray]:
        """The explicit values' open-addressing table, rebuilt when the mapper's buffers
        change (a loaded state dict writes them in place)."""
        mapper: FullMapper = self.mapper  # type: ignore[assignment]
        if not mapper.known:
            return np.zeros(1, np.int64), np.full(1, -1, np.int64)
        key = (mapper.values.data_ptr(), mapper.values._version, mapper.value_rows._version)
        cached = getattr(self, "_slot_cache", None)
        if cached is None or cached[0] != key:
            size = 1 << max(1, (2 * mapper.known - 1).bit_length())
            keys, rows = np.zeros(size, np.int64), np.full(size, -1, np.int64)
            # The engine's open-addressing builder (load ≤ 1/2), the table its lookups probe.
            open_addressing_builder()(mapper.values.cpu().numpy(),
                        mapper.value_rows.cpu().numpy().astype(np.int64), keys, rows)
            cached = (key, keys, rows)
            self._slot_cache = cached
        return cached[1], cached[2]

    @classmethod
    def post_lookup_batch(cls, methods: list[CompressedEmbedding | None],
                          vectors: torch.Tensor) -> torch.Tensor:
        """LSQ+ of every id's row at its group's width (fixed, or while evaluating a search
        the width it would fix now), or the soft mixture over widths (a training search)."""
        present = [i for i, m in enumerate(methods) if m is not None]
        mpe: list[MpeEmbedding] = [methods[i] for i in present]  # type: ignore[misc]
        kinds = {(m.max_bits, m.searching and m.training and torch.is_grad_enabled())
                 for m in mpe}
        compiled = (vectors.requires_grad and compiled_path(vectors)
                    and vectors.dtype == torch.float32 and len(kinds) == 1
                    and len({m.groups for m in mpe}) == 1)
        if compiled:
            ((max_bits, soft),) = kinds
            return cls._compiled(methods, vectors, max_bits, soft)  # type: ignore[arg-type]
        if len(present) < len(methods):  # other methods' features pass unchanged
            out = vectors.clone()
            out[:, present] = cls.post_lookup_batch(mpe, vectors[:, present])  # type: ignore[arg-type]
            return out
        if len(kinds) > 1:  # features in different phases: each on its own
            return torch.stack([cls.post_lookup_batch([m], vectors[:, i : i + 1])[:, 0]
                                for i, m in enumerate(mpe)], dim=1)
        ((max_bits, soft),) = kinds
        device = vectors.device
        k = len(mpe)
        groups = torch.stack([m.last_groups.to(device) for m in mpe], dim=1)  # [n, k]
        scale = torch.tensor([m._grad_scale for m in mpe], device=device)  # [k, B]
        feature = torch.arange(k, device=device)[None, :]
        alpha = _ScaleGrad.apply(torch.stack([m.step_sizes() for m in mpe]), scale)
        beta = torch.stack([m.beta for m in mpe])  # [k, d]
        if soft:
            widths = torch.arange(1, max_bits + 1, device=device)
            lo = (-(2.0 ** (widths - 1)))[None, None, :, None]
            hi = (2.0 ** (widths - 1) - 1)[None, None, :, None]
            b = _ScaleGrad.apply(beta[:, None, :].expand(k, max_bits, -1), scale[..., None])
            a = alpha[None, :, :, None]
            w = (vectors[:, :, None, :] - b[None]) / a  # [n, k, B, d]
            q = torch.clamp(_round_ste(w), lo, hi) * a + b[None]
            probs = torch.stack([m.probabilities() for m in mpe])  # [k, g, B + 1]
            p = probs[feature, groups]  # [n, k, B + 1]
            return (q * p[..., 1:, None]).sum(dim=2)
        bits = torch.stack([m.current_bits().to(device) for m in mpe])  # [k, g]
        width = bits[feature, groups]  # [n, k]
        index = (width - 1).clamp(min=0)
        a = alpha[feature, index][..., None]  # [n, k, 1]
        b = _ScaleGrad.apply(beta[None].expand(vectors.shape[0], -1, -1),
                             scale[feature, index][..., None])
        half = 2.0 ** (width.to(torch.float32) - 1)
        w = (vectors - b) / a
        q = torch.clamp(_round_ste(w), (-half)[..., None], (half - 1)[..., None]) * a + b
        return torch.where(width[..., None] > 0, q, torch.zeros_like(q))

    @staticmethod
    def _compiled(methods: list[MpeEmbedding | None], vectors: torch.Tensor, max_bits: int,
                  soft: bool) -> torch.Tensor:
        """The training forward on CPU through `_MixedLsq`: a search's probabilities, or
        one-hot ones at the fixed widths (no gradient to the logits then). None: another
        method's feature, passed through by the kernel (no gather and scatter around it)."""
        present = [i for i, m in enumerate(methods) if m is not None]
        mpe: list[MpeEmbedding] = [methods[i] for i in present]  # type: ignore[misc]
        k, d = vectors.shape[1:]
        widths = torch.arange(1, max_bits + 1, dtype=torch.float32)
        lo, hi = -(2.0 ** (widths - 1)), 2.0 ** (widths - 1) - 1
        ones, zeros = torch.ones(max_bits), torch.zeros(d)
        alpha = torch.stack([m.step_sizes() if m is not None else ones for m in methods])
        beta = torch.stack([m.beta if m is not None else zeros for m in methods])
        scale = torch.tensor([m._grad_scale if m is not None else [0.0] * max_bits
                              for m in methods])
        slot = torch.full((k,), -1, dtype=torch.int64)
        slot[present] = torch.arange(len(present))
        groups = torch.stack([m.last_groups for m in mpe], dim=1)  # [n, k present]
        if soft:  # [k present, g, B]: width 0 adds nothing; the kernel reads each id's group
            probs = torch.stack([m.probabilities()[:, 1:] for m in mpe])
        else:  # one-hot at the fixed widths
            bits = torch.stack([m.current_bits() for m in mpe])
            probs = (bits[..., None] == widths.to(torch.int64)).to(torch.float32)
        return _MixedLsq.apply(vectors, probs, groups, alpha, beta, scale, lo, hi, slot, soft)

    def schedule(self, total_steps: int) -> None:
        if not self.fixed_search:
            self.search_steps = max(1, int(total_steps * self.search_fraction))

    def regularization(self) -> torch.Tensor | None:
        """λ·Σ_g w_g Σ_b p_gb·b while searching; None once the widths are fixed."""
        if not self.searching:
            return None
        widths = torch.arange(self.max_bits + 1, device=self.gamma.device, dtype=torch.float32)
        return self.reg * (self.probabilities() @ widths * self.rarity).sum()

    @torch.no_grad()
    def after_step(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        self.steps += 1
        if self.searching and int(self.steps) >= self.search_steps:
            self.fix_widths(optimizer)

    @torch.no_grad()
    def fix_widths(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """End the search: each group keeps the largest width with p ≥ threshold; rows back
        to their initial values, their optimizer state zeroed (a retrain from the start)."""
        self.bits.copy_(self.current_bits().to(torch.int8))
        table = self.tables[0]
        table.copy_(self.initial_table().to(table.device, table.dtype))
        if self.bound:
            for state in self.table_row_states(0):
                state.zero_()
        elif optimizer is not None:
            for value in (optimizer.state.get(table) or {}).values():
                if isinstance(value, torch.Tensor) and value.dim() >= 1 \
                        and value.shape[0] == table.shape[0]:
                    value.zero_()

    # -- bytes and serving -------------------------------------------------------------

    def serving_bytes(self, fmt: str = "fp32") -> int:
        """Exact bytes of `collapse()` (its own packed format: `fmt` does not apply)."""
        if self.tables[0].is_meta:  # a plan: every width undecided, so the largest
            bits = torch.full((self.groups,), self.max_bits, dtype=torch.int64, device="cpu")
        else:
            bits = self.current_bits()
        return mpe_serving_bytes(self.group_rows(), self.tail_rows, bits, self.dim)

    @torch.no_grad()
    def collapse(self) -> ServingEmbedding:
        """Per-width segments of sorted values with their packed codes, then the tail."""
        table = self.tables[0].detach()
        device = table.device
        bits = self.current_bits().to(device)
        rows = torch.arange(table.shape[0], device=device)
        width = bits[self.group_of(rows)]  # [rows]
        alpha = self.step_sizes().detach()
        beta = self.beta.detach()
        index = (width - 1).clamp(min=0)
        a = alpha[index][:, None]
        half = 2.0 ** (width.to(torch.float32) - 1)
        codes = torch.clamp(torch.round((table - beta) / a), (-half)[:, None], (half - 1)[:, None])
        unsigned = (codes + half[:, None]).to(torch.int64).cpu()  # u = q − lo
        width, alpha = width.cpu(), alpha.cpu()
        mapper: FullMapper = self.mapper  # type: ignore[assignment]
        value_of_row = torch.zeros(self.explicit, dtype=torch.int64)
        if mapper.known:
            value_of_row[mapper.value_rows.long().cpu()] = mapper.values.cpu()
        explicit_width = width[: self.explicit]
        segments, seg_bits, seg_codes, steps, keys = [], [], [], [], []
        for b in range(1, self.max_bits + 1):
            own = torch.nonzero(explicit_width == b).flatten()
            if not len(own):
                continue
            values, order = torch.sort(value_of_row[own])
            keys.append(values)
            segments.append(len(own))
            seg_bits.append(b)
            seg_codes.append(pack_codes(unsigned[own[order]], b))
            steps.append(alpha[b - 1])
        tail_bits = int(width[-1]) if self.tail_rows else 0
        zero_keys = 0
        if tail_bits > 0:
            pruned = torch.sort(value_of_row[explicit_width == 0]).values
            keys.append(pruned)
            zero_keys = len(pruned)
            seg_bits.append(tail_bits)
            seg_codes.append(pack_codes(unsigned[self.explicit :], tail_bits))
            steps.append(alpha[tail_bits - 1])
        values = torch.cat(keys) if keys else torch.zeros(0, dtype=torch.int64)
        serving_mapper = MpeMapper(segments, zero_keys, self.tail_rows if tail_bits else 0,
                                   mapper.seed, values).to(device)
        step = torch.stack(steps) if steps else torch.zeros(0)
        packed = MpePackedTable(seg_bits, seg_codes, step, beta.cpu()).to(device)
        return ServingEmbedding(serving_mapper, [packed], Combiner.SUM)


class MpeConfig(MethodConfig):
    """MPE: mixed-precision rows learned per frequency group (arXiv 2409.20305).

    Args:
        ratio: compression ratio of the serving bytes, planned at `max_bits` for every row
            (the search only lowers them).
        groups: g, frequency groups (the last holds the hashed tail).
        max_bits: widths {0, …, max_bits} (the paper's 6).
        tau: softmax temperature of the width logits (the paper's 3e-3).
        threshold: a width survives the search if its probability is ≥ this (1/14, i.e.
            1/(2·7) as the paper's code).
        reg: λ of the bit-width penalty (3e-4, the paper's Criteo script's l2_gamma).
        search_steps: optimizer steps of the search before the widths are fixed; default
            `search_fraction` of the run's steps (the train job announces them).
        search_fraction: share of the run that searches (the paper searches, then
            retrains from the initial rows for as long again: half).
        tail_share: share of the planned bytes given to hashed tail rows (the rest pays for
            explicit rows of the most frequent values, 8-byte key each).
        init_std: rows start N(0, init_std²) (the paper's 0.003), and restart there.
        seed: hash seed of the tail.
    """

    method: Literal["mpe"] = "mpe"
    ratio: float | None = Field(None, ge=1)
    groups: int = Field(128, ge=2, le=4096)
    max_bits: int = Field(6, ge=1, le=8)
    tau: float = Field(3e-3, gt=0)
    threshold: float = Field(1 / 14, gt=0, lt=1)
    reg: float = Field(3e-4, ge=0)
    search_steps: int | None = Field(None, ge=1)
    search_fraction: float = Field(0.5, gt=0, lt=1)
    tail_share: float = Field(0.25, gt=0, lt=1)
    init_std: float = Field(0.003, gt=0)
    seed: int = 0

    @model_validator(mode="after")
    def _no_mlet(self) -> MpeConfig:
        if self.mlet_dim is not None:
            raise ValueError("mpe does not compose with MLET: the k→d projection would fold "
                             "into the rows and undo their per-width codes")
        return self

    def accepts_mlet(self) -> bool:
        return False

    def check(self, num_embeddings: int, dim: int) -> None:
        super().check(num_embeddings, dim)
        if self.ratio is None:
            raise ValueError("mpe needs a size: set ratio (or a collection ratio)")

    def sizes(self, num_embeddings: int, dim: int, stats: FeatureStats | None) -> tuple[int, int]:
        """(explicit rows, tail rows) whose serving bytes at `max_bits` fit the ratio."""
        assert self.ratio is not None
        row = code_bytes(dim, self.max_bits)
        fixed = 4 * dim + 4 * (self.max_bits + 1)
        avail = max(0.0, budget.uncompressed_bytes(num_embeddings, dim) / self.ratio - fixed)
        known = 0 if stats is None else min(len(stats.values), num_embeddings)
        explicit = min(known, int((1 - self.tail_share) * avail / (8 + row)))
        tail = max(1, int((avail - explicit * (8 + row)) / row))
        return explicit, min(tail, num_embeddings)

    def build(self, num_embeddings: int, dim: int, stats: FeatureStats | None = None
              ) -> CompressedEmbedding:
        self.check(num_embeddings, dim)
        explicit, tail = self.sizes(num_embeddings, dim, stats)
        rows = explicit + tail
        # The `explicit` most frequent values own rows 0, 1, … by rank; the tail rows after
        # them take the rest by hash (FullMapper's spare rows).
        vocabulary = stats.values[:explicit] if stats is not None and explicit else None
        mapper = FullMapper.from_vocabulary(rows, vocabulary, self.seed)
        rarity = _rarity(stats, explicit, tail, self.groups)
        return MpeEmbedding(mapper, rows, explicit, dim, self.groups, self.max_bits, self.tau,
                            self.threshold, self.reg, rarity, self.search_steps,
                            self.search_fraction, self.init_std, self.sparse)


def _rarity(stats: FeatureStats | None, explicit: int, tail: int, groups: int) -> torch.Tensor:
    """w_g: the lowest mean count per row of any group over group g's (the paper's 1 /
    (count_g / min count) with groups ranked the other way; equal-size groups make sums and
    means alike, and the tail's mean is per tail row). All ones without statistics."""
    if stats is None:
        return torch.ones(groups, device="cpu")
    counts = stats.counts.to("cpu", torch.float64)
    size = max(1, math.ceil(explicit / max(1, groups - 1)))
    means = torch.zeros(groups, dtype=torch.float64, device="cpu")
    for g in range(groups - 1):
        part = counts[g * size : min(explicit, (g + 1) * size)]
        means[g] = part.mean() if len(part) else 0.0
    means[-1] = counts[explicit:].sum() / max(1, tail)
    positive = means[means > 0]
    if not len(positive):
        return torch.ones(groups, device="cpu")
    return (positive.min() / means.clamp(min=positive.min())).to(torch.float32)
