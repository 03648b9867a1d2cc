"""SCMA: semantically constrained memory allocation (Desai, Chou, Shrivastava et al.,
"Semantically Constrained Memory Allocation (SCMA) for Embedding in Efficient Recommendation
Systems", arXiv 2103.06124; code yanzhoupan/dlrm_ssm, tricks/lsh_embedding_bag.py).

Every value is represented by the set of training rows it occurs in; D minhashes of that set
address one shared array W of M floats (element j of the embedding is W[minhash_j mod M]), so
values that occur together share memory and values with identical row sets share it all.

What is changed, and why:
* Bounded sketch instead of an n × D minhash table. The paper's prototype stores D minhashes
  for every value, which costs more than the embedding table it compresses. Here only K
  (default 2) 32-bit minhash signatures are kept, only for the most frequent values above a
  frequency floor (`min_count`) and only as many as `sketch_share` of the byte budget pays
  for; every other value addresses W by hashing its id (ROBE-style). The stored sketch
  (sorted values, 8 bytes each, plus 4·K bytes of signatures) is counted in the method's
  training and serving bytes, and W gets the rest of the budget.
* D addresses from K signatures: slot s reads hash(signature[s mod K], s) mod rows, so two
  values agree in a slot with the probability their minhashes agree (the Jaccard similarity
  of their row sets), and identical row sets give identical embeddings, as in the paper.
* Chunked addressing: W is an (M / c) × c table read c contiguous floats at a time, d / c
  reads per id concatenated (c = 1 is the paper's per-element addressing). Width-1 reads of
  a table-batched store cost one bag per element, and FBGEMM's TBE refuses widths below 4
  (such stores train on the torch fallback); the default c = 4 keeps 4 slots per id at
  d = 16: 0.90 of hash's training samples/s in `jobs/benchmarks/embedding_speed.py`
  (c = 1: 0.11, c = 8: 0.57, one loaded 2-core run).
  In the collection the slots are virtual tables over the one store table (FBGEMM's
  `feature_table_map`), so all slots train one shared W.
* The signatures come from a pass over the training shards (`data_pipeline.row_signatures`,
  written beside the frequency statistics); without them (no statistics) every value
  hashes its id.
* Within one feature, row sets are disjoint (a row holds one value of each feature), so the
  paper's row-set minhashes agree between two values of one feature only by chance: they
  place values like a hash. `sets="contexts"` signs instead the set of other features'
  values a value occurs with, whose overlap is semantic (identical row sets still give
  identical signatures); the quality table compares both.
* MLET composes: training reads k-wide vectors from W; collapse folds the projection into
  one d-wide table per slot (W · P_s, summed), exact but S times W's rows × d in bytes.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, model_validator
from torch import nn

from embeddings import budget
from embeddings.batched_lookup import compiled_path
from embeddings.mapping import Combiner, ScmaMapper
from embeddings.methods.base import (
    CompressedEmbedding,
    FeatureStats,
    MethodConfig,
    ordinary_bound,
)
from embeddings.serving_embedding import ServingEmbedding

__all__ = ["ScmaConfig", "ScmaEmbedding", "ScmaMapper", "signed_values"]

DEFAULT_CHUNK = 4  # floats per read: ≥ 0.5 of hash's samples/s at d = 16 (embedding_speed)
VALUE_BYTES = 8  # one int64 sorted value per signed value
SIGNATURE_BYTES = 4  # one 32-bit minhash


class ScmaEmbedding(CompressedEmbedding):
    """One shared (rows × chunk) array read in `slots` chunks per id, concatenated.

    Args:
        mapper: the SCMA mapper (slot rows of each id).
        rows: rows of the shared array.
        chunk: floats per read (c).
        dim: output width d.
        mlet_dim: MLET's k (k/c slots, then the k×d projection); None = none.
        sparse: sparse gradients.
    """

    def __init__(
        self,
        mapper: ScmaMapper,
        rows: int,
        chunk: int,
        dim: int,
        mlet_dim: int | None = None,
        sparse: bool = False,
    ) -> None:
        nn.Module.__init__(self)
        width = mlet_dim or dim
        if width % chunk or mapper.slots != width // chunk:
            raise ValueError(f"width {width} must be {mapper.slots} chunks of {chunk}")
        self.mapper = mapper
        self.combiner = Combiner.CONCAT
        self.dim = dim
        self.mlet_dim = mlet_dim
        self.sparse = sparse
        self.chunk = chunk
        # Each output element is one element of W: W starts at an ordinary width-wide scale.
        bound = ordinary_bound(width)
        self.tables = nn.ParameterList(
            [nn.Parameter(torch.empty(rows, chunk).uniform_(-bound, bound))]
        )
        self.projection: nn.Parameter | None = None
        if mlet_dim is not None:
            # As CompressedEmbedding: N(0, 1/d) keeps the output at an ordinary scale.
            self.projection = nn.Parameter(torch.randn(mlet_dim, dim) / dim**0.5)
        self.bias: nn.Parameter | None = None  # no low-rank projection (see CompressedEmbedding)

    @property
    def slots(self) -> int:
        return self.mapper.slots

    def packed_slots(self) -> int:
        return self.slots

    def packed_bags(self) -> list[int] | None:
        return [0] * self.slots

    def packed_lookup(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The mapper's rows, by one compiled pass on CPU where numba is loaded (torch's
        searchsorted and int64 hash passes took most of a step's mapping time); the same
        rows as the mapper's torch form, which serving keeps (tested)."""
        if not compiled_path(ids):
            return super().packed_lookup(ids)
        mapper = self.mapper
        ids = ids.detach().contiguous()
        out = np.empty((ids.shape[0], self.slots), np.int64)
        _scma_kernel()(ids.numpy(), mapper.values.numpy(), mapper.signatures.numpy(),
                       *self._kernel_constants(), np.int64(mapper.rows), out)
        return torch.from_numpy(out), None

    def _kernel_constants(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if getattr(self, "_constants", None) is None:
            m = self.mapper
            self._constants = tuple(
                m._constant(name, torch.device("cpu")).numpy().astype(dtype)
                for name, dtype in (("column", np.int64), ("sig", np.uint64), ("id", np.uint64))
            )
        return self._constants

    def serving_widths(self) -> list[int]:
        if self.projection is None:
            return [self.chunk]
        return [self.dim] * self.slots  # one folded table per slot, see `collapse`

    def serving_bytes(self, fmt: str = "fp32") -> int:
        rows = self.tables[0].shape[0]
        return self.mapper.serving_bytes() + sum(
            budget.table_bytes(rows, w, fmt) for w in self.serving_widths()
        )

    @torch.no_grad()
    def collapse(self) -> ServingEmbedding:
        """W itself (the serving mapper reads it at every slot, concatenated); under MLET,
        slot s's chunk times its rows of the projection, one d-wide table per slot, summed
        ([w_0, …, w_S] · P = Σ_s w_s · P_s)."""
        (table,) = self.serving_tables()
        mapper = self.frozen_mapper().to(table.device)
        if self.projection is None:
            return ServingEmbedding(mapper, [table], Combiner.CONCAT)
        p, c = self.projection.detach(), self.chunk
        tables = [table @ p[s * c : (s + 1) * c] for s in range(self.slots)]
        return ServingEmbedding(mapper, tables, Combiner.SUM)


_KERNELS: dict[str, Any] = {}


def _scma_kernel() -> Any:
    """`ScmaMapper.forward` as one compiled pass (compiled on first use)."""
    if "rows" not in _KERNELS:
        import numba as nb

        from idhash.splitmix import hash64_scalar

        @nb.njit(nogil=True)
        def scma_rows(ids, values, signatures, columns, sig_offsets, id_offsets, rows,
                      out):  # pragma: no cover - compiled
            m = values.shape[0]
            for i in range(ids.shape[0]):
                x = ids[i]
                p = -1
                if m > 0:
                    q = min(np.searchsorted(values, x), m - 1)
                    if values[q] == x:
                        p = q
                for s in range(out.shape[1]):
                    if p >= 0:
                        key = np.int64(signatures[p, columns[s]]) & np.int64(0xFFFFFFFF)
                        out[i, s] = hash64_scalar(key, sig_offsets[s]) % rows
                    else:
                        out[i, s] = hash64_scalar(x, id_offsets[s]) % rows

        _KERNELS["rows"] = scma_rows
    return _KERNELS["rows"]


def signed_values(
    stats: FeatureStats | None, sigs: torch.Tensor | None, limit: int, min_count: int,
    keep: int,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(sorted values, their first `keep` signatures of `sigs`) of the at most `limit` most
    frequent values seen at least `min_count` times that have signatures; None if none."""
    if stats is None or sigs is None or limit <= 0:
        return None
    m = sigs.shape[0]
    eligible = torch.nonzero(stats.counts[:m] >= min_count).flatten()[:limit]
    if eligible.numel() == 0:
        return None
    values, order = torch.sort(stats.values[eligible])
    return values, sigs[eligible[order], :keep].contiguous()


class ScmaConfig(MethodConfig):
    """SCMA: minhash-addressed shared memory (arXiv 2103.06124), with a bounded sketch.

    Args:
        ratio: compression ratio: the shared array plus the signature sketch take
            n·d·4 / ratio bytes.
        memory: floats of the shared array (M), instead of a ratio; the sketch then takes
            what `sketch_share` of M·4 bytes pays for.
        chunk: floats per read (c); d (or MLET's k) must be a multiple. c = 1 is the
            paper's per-element addressing; None (default) is 4 where it divides the width
            (hash's speed class, see the module's notes), else gcd(width, 4).
        signatures: minhash signatures kept per signed value (K; the paper's D addresses
            are derived from them by hashing with the slot).
        min_count: frequency floor: values seen fewer times get no signature.
        sketch_share: most of the budget the signature sketch may take.
        sets: what a value's signatures summarise: "rows" (the paper's: the training rows
            it occurs in) or "contexts" (the values of other features in those rows; see
            `data_pipeline.row_signatures` for why).
        seed: hash seed.
    """

    method: Literal["scma"] = "scma"
    ratio: float | None = Field(None, ge=1)
    memory: int | None = Field(None, gt=0)
    chunk: int | None = Field(None, ge=1)
    signatures: int = Field(2, ge=1, le=16)
    min_count: int = Field(3, ge=1)
    sketch_share: float = Field(0.25, ge=0, lt=1)
    sets: Literal["rows", "contexts"] = "rows"
    seed: int = 0

    @model_validator(mode="after")
    def _one_size(self) -> ScmaConfig:
        if self.ratio is not None and self.memory is not None:
            raise ValueError("give either ratio or memory, not both")
        return self

    def combiner(self) -> Combiner:
        return Combiner.CONCAT

    def check(self, num_embeddings: int, dim: int) -> None:
        super().check(num_embeddings, dim)
        if self.ratio is None and self.memory is None:
            raise ValueError("scma needs a size: set ratio or memory (or a collection ratio)")
        width = self.mlet_dim or dim
        if width % self.chunk_for(width):
            raise ValueError(f"scma's chunk {self.chunk} must divide the width {width}")

    def at_ratio(self, ratio: float) -> ScmaConfig:
        return self.model_copy(update={"ratio": ratio, "memory": None})

    def chunk_for(self, width: int) -> int:
        """The chunk c at this width (the default: 4 where it divides it)."""
        return self.chunk if self.chunk is not None else math.gcd(width, DEFAULT_CHUNK)

    def entry_bytes(self) -> int:
        """Stored bytes of one signed value: its value and its K signatures."""
        return VALUE_BYTES + SIGNATURE_BYTES * self.signatures

    def build(
        self, num_embeddings: int, dim: int, stats: FeatureStats | None = None
    ) -> CompressedEmbedding:
        self.check(num_embeddings, dim)
        available = 0
        sigs = None if stats is None else (
            stats.signatures if self.sets == "rows" else stats.contexts)
        if sigs is not None:
            m = sigs.shape[0]
            available = int((stats.counts[:m] >= self.min_count).sum())
            if sigs.shape[1] < self.signatures:
                raise ValueError(f"scma wants {self.signatures} signatures per value; the "
                                 f"statistics hold {sigs.shape[1]}")
        width = self.mlet_dim or dim
        chunk = self.chunk_for(width)
        if self.ratio is not None:
            rows, signed = budget.scma_sizes(num_embeddings, dim, self.ratio, chunk,
                                             self.entry_bytes(), available, self.sketch_share)
        else:
            rows = max(1, self.memory // chunk)
            signed = min(available, int(self.memory * 4 * self.sketch_share)
                         // self.entry_bytes())
        sketch = signed_values(stats, sigs, signed, self.min_count, self.signatures)
        mapper = ScmaMapper(rows, width // chunk, self.seed,
                            *(sketch if sketch is not None else (None, None)))
        return ScmaEmbedding(mapper, rows, chunk, dim, self.mlet_dim, self.sparse)
