"""MEC (Li et al., "MEC: A Model-Agnostic Embedding Compression Framework for CTR
Prediction", DASFAA 2025, arXiv 2502.15355; code USTC-StarTeam/MEC): product-quantisation
codes learned from a trained model's embeddings, then a CTR model retrained on small tables.

Stage 1 (`fit_mec_codes`): a feature's trained vectors, each repeated ⌊log2 count⌋ times (at
least once: popularity weighting, so frequent values are reconstructed best), train a small
VQ-VAE: an encoder, 4 codebooks of 4,096 entries over 4 sub-vectors, a decoder; each trained
row keeps the nearest entry of every codebook, 4 × 12-bit codes. Stage 2 (`MECConfig`): the
codes are frozen and the feature's embedding is the concatenation of 4 small trainable code
tables read at its codes, fine-tuned with the model.

What differs from the reference code (`pretrain_embedding/vqvae_with_freq_and_contras.py`,
`layers.py`), and why:
- Its code-balancing term is computed from hard argmin counts wrapped in `torch.tensor`, so it
  carries no gradient (and compares the perplexity, not its log, with log K). Here it is the
  gap between log K and the entropy of the batch's mean *soft* assignment (softmax of −distance
  / temperature), which does push the codes towards even use.
- Its encoder and decoder are single linear layers and the encoder gets no gradient (no
  straight-through estimator, the commitment cost is defined but unused). Here the encoder is
  a residual MLP trained through the straight-through estimator with the usual codebook and
  commitment (β = 0.25, its unused default) losses.
- The decoder is one residual MLP per sub-space, so decoding the codebooks *is* the code
  tables: the retrained model starts exactly at the VQ-VAE's reconstruction of the trained
  embeddings (the reference initialises its code tables with the raw codebooks, in the
  encoder's latent space, which only the trained decoder relates to the embeddings).
- Codebooks start at encoded training rows (the reference: U(±1/K), which leaves most of 4,096
  entries unused in a short CPU fit); inputs are centred and scaled, undone in the tables.
- Adam at 1e-3 for a fixed number of steps (the reference: 1e-4 for up to 100 epochs with
  early stopping on a GPU); no contrastive term (its weight is 2e-3 and it only reorders
  near-ties).
- Fields with fewer than `min_values` trained rows (the reference's cut-down, 100,000) keep
  their trained table, copied and trainable, as the reference keeps their plain embedding.
  Under a compression ratio (measured, as for every two-stage method, against the trained
  table's fp32 bytes) the collection's rule for every method decides instead: tables of at
  most 2000 / ratio rows are kept, every other is coded with the largest codebooks that fit
  the ratio (never more than one entry per `rows_per_code` trained rows), and a ratio that
  2-entry codebooks cannot reach is refused with the largest ratio MEC reaches.

The trained feature must be served from one d-wide table (full, hashing, learned hashing,
any of them under MLET): its mapper (raw id → row) and then the row's codes are MEC's mapper
(`embeddings.mapping.CodeMapper`). Stored: the packed codes (4 × 12 bits = 6 bytes a row),
the code tables and the trained mapper's own arrays.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

from embeddings import budget
from embeddings.mapping import CodeMapper, Combiner, Mapper, concat_widths, pack_codes
from embeddings.methods.base import (
    CompressedEmbedding,
    FeatureStats,
    TrainedFeature,
    TwoStageConfig,
)

__all__ = ["MECCodes", "MECConfig", "code_perplexity", "fit_mec_codes", "popularity_repeats"]


@dataclass
class MECCodes:
    """What stage 1 learned for one feature.

    Args:
        codes: int64 [rows, M] the nearest entry of each codebook, per trained row.
        tables: M decoded codebooks, [K, w_j] each (`concat_widths(d, M)`): the initial code
            tables.
        perplexity: mean over codebooks of exp(entropy of code use over the rows).
        reconstruction: mean squared error of the decoded codes against the trained rows.
    """

    codes: torch.Tensor
    tables: list[torch.Tensor]
    perplexity: float
    reconstruction: float


def popularity_repeats(counts: torch.Tensor | None, rows: int) -> torch.Tensor:
    """int64 [rows]: how often each row appears in the VQ-VAE's training set, ⌊log2 count⌋
    and at least once (the reference's frequency weighting)."""
    if counts is None:
        return torch.ones(rows, dtype=torch.int64)
    c = counts.to(torch.float64).clamp(min=1)
    return torch.floor(torch.log2(c)).to(torch.int64).clamp(min=1)


def code_perplexity(codes: torch.Tensor, size: int) -> float:
    """Mean over codebooks of exp(entropy) of the codes' use: `size` when every entry is used
    equally often, 1 when one entry takes every row."""
    out = []
    for j in range(codes.shape[1]):
        p = torch.bincount(codes[:, j], minlength=size).to(torch.float64)
        p = p[p > 0] / p.sum()
        out.append(math.exp(float(-(p * p.log()).sum())))
    return sum(out) / len(out)


class _ResidualMLP(nn.Module):
    """x + W2·relu(W1·x): starts as the identity (W2 = 0), so the codes start as plain
    product quantisation of the (centred, scaled) rows."""

    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.inner = nn.Linear(width, hidden)
        self.outer = nn.Linear(hidden, width)
        nn.init.zeros_(self.outer.weight)
        nn.init.zeros_(self.outer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.outer(F.relu(self.inner(x)))


class _VQVAE(nn.Module):
    """Encoder → M sub-vectors → nearest codebook entry each → one decoder per sub-space.

    Sub-vectors are `concat_widths(d, M)` wide (d + 1 with a first-order column need not
    divide by M); each is zero-padded to the widest so all M codebooks stay one [M, K, w]
    tensor and the distances one batched matmul. Padded columns are zero in the sub-vectors
    and masked to zero in the codebooks, so they add nothing to any distance."""

    def __init__(self, dim: int, count: int, size: int, hidden: int) -> None:
        super().__init__()
        self.widths = concat_widths(dim, count)
        self.count, self.width = count, self.widths[0]
        self.encoder = _ResidualMLP(dim, hidden)
        self.decoders = nn.ModuleList(
            _ResidualMLP(w, max(4, hidden // count)) for w in self.widths
        )
        self.codebooks = nn.Parameter(torch.zeros(count, size, self.width))
        # Column c of sub-vector j reads encoder column place[j, c]; `dim` (a zero column
        # appended to the encoding) fills the padding.
        place = torch.full((count, self.width), dim, dtype=torch.int64)
        mask = torch.zeros(count, 1, self.width)
        for j, (start, w) in enumerate(zip(self.starts(), self.widths, strict=True)):
            place[j, :w] = torch.arange(start, start + w)
            mask[j, :, :w] = 1
        self.register_buffer("place", place)
        self.register_buffer("mask", mask)

    def starts(self) -> list[int]:
        """First encoder column of each sub-vector."""
        return [sum(self.widths[:j]) for j in range(self.count)]

    def entries(self) -> torch.Tensor:
        """The codebooks [M, K, w] with their padded columns at zero."""
        return self.codebooks * self.mask

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Sub-vectors [M, n, w] (codebook-major: the distances are one batched matmul)."""
        z = F.pad(self.encoder(x), (0, 1))
        return z[:, self.place].permute(1, 0, 2)

    def distances(self, z: torch.Tensor) -> torch.Tensor:
        """Squared distances [M, n, K] of each sub-vector to every entry of its codebook,
        less ‖z‖² (the same for every entry, so the nearest entry and the softmax keep)."""
        books = self.entries()
        norms = books.pow(2).sum(-1)[:, None, :]
        return torch.baddbmm(norms, z, books.transpose(1, 2), alpha=-2)

    def decode(self, quantised: torch.Tensor) -> torch.Tensor:
        parts = [dec(quantised[j, :, :w])
                 for j, (dec, w) in enumerate(zip(self.decoders, self.widths, strict=True))]
        return torch.cat(parts, dim=1)

    def decoded_tables(self) -> list[torch.Tensor]:
        """Each codebook through its decoder: [K, w_j] in the (centred, scaled) row space."""
        books = self.entries()
        return [dec(books[j, :, :w])
                for j, (dec, w) in enumerate(zip(self.decoders, self.widths, strict=True))]

    def pick(self, codes: torch.Tensor) -> torch.Tensor:
        """Codebook entries [M, n, w] at codes [M, n]."""
        which = torch.arange(self.count, device=codes.device)[:, None]
        return self.entries()[which, codes]


def fit_mec_codes(
    vectors: torch.Tensor,
    counts: torch.Tensor | None = None,
    *,
    codebooks: int = 4,
    codebook_size: int = 4096,
    hidden: int | None = None,
    steps: int = 200,
    batch_size: int = 256,
    lr: float = 1e-3,
    commitment: float = 0.25,
    perplexity_weight: float = 1.0,
    temperature: float = 0.1,
    seed: int = 0,
    progress: bool = False,
) -> MECCodes:
    """Stage 1 of MEC: product-quantisation codes of a trained table's rows.

    Args:
        vectors: float [rows, d] the trained rows (d ≥ `codebooks`; sub-vectors are
            `concat_widths(d, codebooks)` wide).
        counts: int [rows] how often each row was read in the data (None: all alike); each
            row is repeated max(1, ⌊log2 count⌋) times in the training set.
        codebooks: M, codes per row.
        codebook_size: K, entries of each codebook (≤ rows).
        hidden: width of the encoder's hidden layer (default 4d).
        steps: optimizer steps (each a batch drawn in order from shuffled epochs).
        batch_size: rows of the repeated set per step.
        lr: Adam's learning rate.
        commitment: β of the commitment loss ‖z − sg(e)‖².
        perplexity_weight: weight of log K − H(mean soft assignment) (0 turns it off).
        temperature: soft assignment is softmax(−distance / (temperature · mean nearest
            distance)): small values follow the hard codes closely.
        seed: seed of initialisation and shuffling.
        progress: show a progress bar.
    """
    x_raw = vectors.detach().to(torch.float32)
    rows, dim = x_raw.shape
    if dim < codebooks:
        raise ValueError(f"width {dim} cannot hold {codebooks} sub-vectors (codebooks)")
    if not 2 <= codebook_size <= rows:
        raise ValueError(f"codebook size must be in [2, rows={rows}], got {codebook_size}")
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _VQVAE(dim, codebooks, codebook_size, hidden or 4 * dim)
    # Centred and scaled so the losses and the temperature mean the same at any init scale.
    mean = x_raw.mean(0)
    scale = (x_raw - mean).pow(2).mean().sqrt().clamp(min=1e-12)
    x = (x_raw - mean) / scale
    repeated = torch.repeat_interleave(torch.arange(rows), popularity_repeats(counts, rows))
    with torch.no_grad():
        start = repeated[torch.randperm(repeated.numel(), generator=gen)]
        # Distinct rows where there are enough, so no two entries start equal.
        picks = torch.unique(start, sorted=False)
        picks = picks[torch.randperm(picks.numel(), generator=gen)][:codebook_size]
        if picks.numel() < codebook_size:
            extra = torch.randint(rows, (codebook_size - picks.numel(),), generator=gen)
            picks = torch.cat([picks, extra])
        init = model.encode(x[picks]).clone()
        init += 1e-3 * torch.randn(init.shape, generator=gen)
        model.codebooks.copy_(init)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    log_k = math.log(codebook_size)
    order, cursor = torch.randperm(repeated.numel(), generator=gen), 0
    for _ in tqdm(range(steps), desc="mec codes", disable=not progress, leave=False):
        if cursor + batch_size > order.numel():
            order, cursor = torch.randperm(repeated.numel(), generator=gen), 0
        batch = x[repeated[order[cursor : cursor + batch_size]]]
        cursor += batch_size
        z = model.encode(batch)
        dist = model.distances(z)
        codes = dist.argmin(-1)
        chosen = model.pick(codes)
        loss = F.mse_loss(chosen, z.detach()) + commitment * F.mse_loss(z, chosen.detach())
        straight = z + (chosen - z).detach()
        loss = loss + F.mse_loss(model.decode(straight), batch)
        if perplexity_weight:
            # Mean distance to the nearest entry (‖z‖² added back) sets the softmax's scale.
            nearest = (dist.detach().min(-1).values + z.detach().pow(2).sum(-1)).mean()
            nearest = nearest.clamp(min=1e-12)
            soft = torch.softmax(-dist / (temperature * nearest), dim=-1).mean(1)
            entropy = -(soft * torch.log(soft + 1e-12)).sum(-1)
            loss = loss + perplexity_weight * (log_k - entropy).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        chunk = max(1, (1 << 22) // (codebooks * codebook_size))
        codes = torch.cat(
            [
                model.distances(model.encode(x[s : s + chunk])).argmin(-1).T
                for s in range(0, rows, chunk)
            ]
        )
        decoded = [
            t * scale + part
            for t, part in zip(model.decoded_tables(), mean.split(model.widths), strict=True)
        ]
        recon = torch.cat([decoded[j][codes[:, j]] for j in range(codebooks)], dim=1)
        error = float((recon - x_raw).pow(2).mean())
    tables = [t.detach().clone() for t in decoded]
    return MECCodes(codes, tables, code_perplexity(codes, codebook_size), error)


def _row_counts(mapper: Mapper, stats: FeatureStats | None, rows: int) -> torch.Tensor | None:
    """How often each trained row was read: the counts of the values it serves, summed."""
    if stats is None or stats.values.numel() == 0:
        return None
    at = mapper(stats.values).rows[:, 0]
    return torch.zeros(rows, dtype=torch.int64).index_add_(0, at, stats.counts)


@torch.no_grad()
def _seed_tables(emb: CompressedEmbedding, blocks: list[torch.Tensor]) -> None:
    """Start `emb` at the d-wide output `blocks` give (table i's block, concatenated).

    Under MLET each table is wider than its block: the block fills its first columns, the rest
    start at zero, and the projection rows of those first columns copy them to the block's
    output columns, so the method starts exactly at `blocks` and the extra width trains from
    the (random) rest of the projection."""
    col, top = 0, 0
    for table, block in zip(emb.tables, blocks, strict=True):
        w = block.shape[1]
        if emb.projection is None:
            table.copy_(block)
            continue
        table.zero_()
        table[:, :w] = block
        emb.projection[top : top + w] = 0
        emb.projection[top : top + w, col : col + w] = torch.eye(w)
        col += w
        top += table.shape[1] if emb.combiner is Combiner.CONCAT else 0


class MECConfig(TwoStageConfig):
    """MEC: a trained feature's rows replaced by frozen product-quantisation codes into small
    trainable code tables (concatenated), built from a trained model (`from_trained`).

    Args:
        ratio: compression ratio of codes + code tables against the trained table's fp32
            bytes (the trained mapper's arrays are counted in the bytes, not the ratio, as
            for every method); None = the paper's sizes (`codebook_size`, `min_values`).
        codebooks: M, codes per row (the paper: 4).
        codebook_size: most entries of a codebook (the paper: 4,096, 12-bit codes).
        min_values: without a ratio, trained tables with fewer rows are kept (the paper's
            cut-down: 100,000).
        rows_per_code: a codebook has at most rows / rows_per_code entries (so small fields
            get smaller codebooks; 100,000 rows / 4,096 ≈ 24 in the paper).
        steps, batch_size, lr, commitment, perplexity_weight, temperature: stage 1's VQ-VAE
            (see `fit_mec_codes`).
        seed: seed of stage 1.
    """

    method: Literal["mec"] = "mec"
    ratio: float | None = Field(None, ge=1)
    codebooks: int = Field(4, ge=1, le=16)
    codebook_size: int = Field(4096, ge=2, le=1 << 15)
    min_values: int = Field(100_000, ge=1)
    rows_per_code: int = Field(16, ge=1)
    steps: int = Field(200, ge=1)
    batch_size: int = Field(256, ge=1)
    lr: float = Field(1e-3, gt=0)
    commitment: float = Field(0.25, ge=0)
    perplexity_weight: float = Field(1.0, ge=0)
    temperature: float = Field(0.1, gt=0)
    seed: int = 0

    def combiner(self) -> Combiner:
        return Combiner.CONCAT

    def check(self, num_embeddings: int, dim: int) -> None:
        super().check(num_embeddings, dim)
        if dim < self.codebooks:
            raise ValueError(f"mec's {self.codebooks} codebooks each need a column of the "
                             f"width {dim}")
        if self.codebooks * budget.code_bits(self.codebook_size) > 63:
            raise ValueError("mec's codes of one row must fit 63 bits")

    def at_ratio(self, ratio: float) -> MECConfig:
        return self.model_copy(update={"ratio": ratio})

    def from_trained(
        self, num_embeddings: int, dim: int, trained: TrainedFeature
    ) -> CompressedEmbedding:
        self.check(num_embeddings, dim)
        serving = trained.serving
        if len(serving.tables) != 1 or serving.tables[0].width != dim:
            raise ValueError(
                f"mec codes the rows of a trained feature served from one {dim}-wide table "
                f"(full, hash, learned_hash); this one has {len(serving.tables)} tables"
            )
        config, tensors = serving.mapper.export()
        tensors = {k: v.clone() for k, v in tensors.items()}
        inner = Mapper.build(serving.mapper.kind, config, tensors)
        table = serving.tables[0].dequantize().detach().cpu()
        rows = table.shape[0]
        small = (
            rows < self.min_values
            if self.ratio is None
            else budget.stays_uncompressed(rows, self.ratio)
        )
        if rows < 2 or small:
            emb = CompressedEmbedding(inner, [rows], Combiner.SUM, dim, self.mlet_dim, self.sparse)
            _seed_tables(emb, [table])
            return emb
        # Served columns over all code tables: d together, or d each once MLET's projection
        # folds into them.
        served = dim * self.codebooks if self.mlet_dim is not None else dim
        size = budget.mec_codebook_size(
            rows,
            rows,
            dim,
            self.codebooks,
            served,
            self.codebook_size,
            self.rows_per_code,
            self.ratio,
        )
        fit = fit_mec_codes(
            table,
            _row_counts(inner, trained.stats, rows),
            codebooks=self.codebooks,
            codebook_size=size,
            steps=self.steps,
            batch_size=self.batch_size,
            lr=self.lr,
            commitment=self.commitment,
            perplexity_weight=self.perplexity_weight,
            temperature=self.temperature,
            seed=self.seed,
            progress=rows >= 200_000,
        )
        bits = budget.code_bits(size)
        mapper = CodeMapper(inner, pack_codes(fit.codes, bits), self.codebooks, bits)
        emb = CompressedEmbedding(
            mapper, [size] * self.codebooks, Combiner.CONCAT, dim, self.mlet_dim, self.sparse
        )
        _seed_tables(emb, fit.tables)
        return emb
