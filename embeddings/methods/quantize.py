"""Mixed-precision quantisation (after MPE, arXiv 2409.20305): each row of the serving tables
stored in its own format, chosen from its access count so that the model fits a byte budget.

The formats, their row-wise encodings and error bounds are the serving form's
(`embeddings.serving_tables`); this module is the planning that runs once at export, on the
collapsed tables: which rows deserve the more precise formats. Single-format quantisation
needs no planning (`ServingEmbedding.quantize`, `ServingCollection.quantize`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from embeddings.budget import MIXED_ID_BYTES, row_bytes
from embeddings.serving_embedding import ServingCollection, ServingEmbedding
from embeddings.serving_tables import FP16_UNIT, LEVELS, MixedServingTable, ServingTable

if TYPE_CHECKING:
    from embeddings.methods.base import FeatureStats

# Precision order, best first: a format is only worth its bytes if it is more precise.
_PRECISION = {"fp32": 0, "fp16": 1, "int8": 2, "int4": 3}


@dataclass
class MixedPrecisionReport:
    """What a mixed-precision quantisation chose and what it costs.

    Args:
        budget_bytes: the budget asked for.
        bytes: serving bytes reached (mapper state and every table tensor included).
        rows_per_format: rows stored in each format, over all tables.
        expected_mse: estimated mean squared error per looked-up element, weighted by the
            access counts (uniform rounding noise for int formats, relative for fp16).
    """

    budget_bytes: int
    bytes: int
    rows_per_format: dict[str, int] = field(default_factory=dict)
    expected_mse: float = 0.0

    def __str__(self) -> str:
        rows = ", ".join(f"{k}: {v}" for k, v in sorted(self.rows_per_format.items()))
        return (
            f"mixed precision: {self.bytes} of {self.budget_bytes} bytes; rows {rows}; "
            f"expected MSE per element {self.expected_mse:.3g}"
        )


def _format_ladder(width: int, formats: tuple[str, ...]) -> list[str]:
    """Formats worth using for this width, cheapest first, each more precise than the last
    (narrow rows make fp16 cheaper than int8 with its 8-byte scale and bias)."""
    ladder: list[str] = []
    for fmt in sorted(formats, key=lambda f: (row_bytes(width, f), _PRECISION[f])):
        if not ladder or _PRECISION[fmt] < _PRECISION[ladder[-1]]:
            if ladder and row_bytes(width, fmt) == row_bytes(width, ladder[-1]):
                ladder[-1] = fmt
            else:
                ladder.append(fmt)
    return ladder


def _row_errors(table: torch.Tensor, fmt: str) -> torch.Tensor:
    """Expected squared error summed over a row, for each row of an fp32 table."""
    x = table.double()
    if fmt == "fp32" or x.shape[1] == 0:
        return torch.zeros(x.shape[0], dtype=torch.float64)
    if fmt == "fp16":
        return x.pow(2).sum(1) * FP16_UNIT**2 / 3
    step = (x.max(1).values - x.min(1).values) / LEVELS[fmt]
    return step.pow(2) / 12 * x.shape[1]


@torch.no_grad()
def quantize_mixed(
    groups: list[list[torch.Tensor]],
    row_counts: list[list[torch.Tensor]],
    budget_bytes: int,
    fixed_bytes: int = 0,
    formats: tuple[str, ...] = ("int4", "int8", "fp16"),
) -> tuple[list[list[ServingTable | MixedServingTable]], MixedPrecisionReport]:
    """Choose each row's format from its access count so all tables fit `budget_bytes`.

    Every row starts in the cheapest format; upgrades (to the next format of the ladder) are
    bought greedily by expected error removed per byte, the error of a row weighted by how
    often it is read: hot rows end up fp16 or int8, rare and unread rows stay int4.

    Args:
        groups: tables of several embeddings (one list of fp32 tables per embedding), planned
            jointly under one budget.
        row_counts: the access count of every row of every table (same nesting).
        budget_bytes: the serving bytes to fit, `fixed_bytes` included.
        fixed_bytes: bytes outside the tables (mappers), charged to the budget.
        formats: the formats rows may take.
    """
    flat = [t.detach().float() for g in groups for t in g]
    counts = [c.double().flatten() for g in row_counts for c in g]
    if len(flat) != len(counts) or any(
        len(c) != t.shape[0] for t, c in zip(flat, counts, strict=True)
    ):
        raise ValueError("row_counts must give one count per row of every table")
    ladders = [_format_ladder(t.shape[1], formats) for t in flat]
    base_bytes = sum(
        t.shape[0] * row_bytes(t.shape[1], lad[0]) for t, lad in zip(flat, ladders, strict=True)
    )
    spare = budget_bytes - fixed_bytes - base_bytes
    if spare < 0:
        raise ValueError(
            f"budget of {budget_bytes} bytes is below the all-{formats[0]} size "
            f"{fixed_bytes + base_bytes}"
        )
    errors = [
        torch.stack([_row_errors(t, f) for f in lad], 1)
        for t, lad in zip(flat, ladders, strict=True)
    ]
    tiers = _buy_upgrades(_upgrades(flat, ladders, errors, counts), [t.shape[0] for t in flat],
                          spare)
    out_flat, rows_per_format, expected_mse = _encode(flat, ladders, tiers, errors, counts)
    out: list[list[ServingTable | MixedServingTable]] = []
    k = 0
    for g in groups:
        out.append(out_flat[k : k + len(g)])
        k += len(g)
    report = MixedPrecisionReport(
        budget_bytes=budget_bytes,
        bytes=fixed_bytes + sum(t.nbytes() for t in out_flat),
        rows_per_format=rows_per_format,
        expected_mse=expected_mse,
    )
    return out, report


# One kind of upgrade: (gain per byte of each row, bytes it costs, table index).
_Upgrade = tuple[torch.Tensor, float, int]


def _upgrades(
    flat: list[torch.Tensor],
    ladders: list[list[str]],
    errors: list[torch.Tensor],
    counts: list[torch.Tensor],
) -> dict[int, list[_Upgrade]]:
    """Candidate upgrades by step: step j moves a row from ladder[j] to ladder[j+1]."""
    by_step: dict[int, list[_Upgrade]] = {}
    for i, (t, lad, err, cnt) in enumerate(zip(flat, ladders, errors, counts, strict=True)):
        if len(lad) < 2:
            continue
        costs = [
            row_bytes(t.shape[1], lad[j + 1]) - row_bytes(t.shape[1], lad[j])
            + (MIXED_ID_BYTES if j == 0 else 0)
            for j in range(len(lad) - 1)
        ]
        gain = (err[:, :-1] - err[:, 1:]).clamp(min=0) * cnt[:, None]
        ratio = gain / torch.tensor(costs, dtype=torch.float64)
        # A later step of a row never ranks above an earlier one.
        ratio = torch.cummin(ratio, 1).values
        for j, cost in enumerate(costs):
            by_step.setdefault(j, []).append((ratio[:, j], float(cost), i))
    return by_step


def _buy_upgrades(
    by_step: dict[int, list[_Upgrade]], rows: list[int], spare: int
) -> list[torch.Tensor]:
    """The ladder level of every row of every table (`rows` each) after buying the upgrades
    with the most gain per byte that `spare` bytes pay for."""
    tiers = [torch.zeros(n, dtype=torch.int64) for n in rows]
    if not by_step:
        return tiers
    # Gathered step-major so that a stable sort keeps each row's steps in order on ties.
    parts = [p for j in sorted(by_step) for p in by_step[j]]
    steps = [j for j in sorted(by_step) for _ in by_step[j]]
    ratio = torch.cat([r for r, _, _ in parts])
    cost = torch.cat([torch.full((len(r),), c, dtype=torch.float64) for r, c, _ in parts])
    table_of = torch.cat([torch.full((len(r),), i) for r, _, i in parts])
    row_of = torch.cat([torch.arange(len(r)) for r, _, _ in parts])
    level_of = torch.cat(
        [torch.full((len(r),), j + 1) for (r, _, _), j in zip(parts, steps, strict=True)]
    )
    order = torch.sort(-ratio, stable=True).indices
    order = order[ratio[order] > 0]
    taken = order[torch.cumsum(cost[order], 0) <= spare]
    for i in range(len(rows)):
        mine = taken[table_of[taken] == i]
        tiers[i].scatter_reduce_(0, row_of[mine], level_of[mine], reduce="amax")
    return tiers


def _encode(
    flat: list[torch.Tensor],
    ladders: list[list[str]],
    tiers: list[torch.Tensor],
    errors: list[torch.Tensor],
    counts: list[torch.Tensor],
) -> tuple[list[ServingTable | MixedServingTable], dict[str, int], float]:
    """Each table stored in its rows' formats; the rows stored in each format; the expected
    squared error per looked-up element."""
    out_flat: list[ServingTable | MixedServingTable] = []
    per_format: dict[str, int] = {}
    weighted_err, weight = 0.0, 0.0
    for t, lad, tier, err, cnt in zip(flat, ladders, tiers, errors, counts, strict=True):
        used = torch.unique(tier)
        if len(used) == 1:
            out_flat.append(ServingTable.encode(t, lad[int(used[0])]))
        else:
            out_flat.append(MixedServingTable.encode(t, tier, lad))
        for level, fmt in enumerate(lad):
            per_format[fmt] = per_format.get(fmt, 0) + int((tier == level).sum())
        weighted_err += float((cnt * err.gather(1, tier[:, None]).squeeze(1)).sum())
        weight += float(cnt.sum()) * t.shape[1]
    rows_per_format = {f: n for f, n in per_format.items() if n}
    return out_flat, rows_per_format, weighted_err / weight if weight else 0.0


def quantize_embedding_mixed(
    emb: ServingEmbedding, row_counts: list[torch.Tensor], budget_bytes: int
) -> tuple[ServingEmbedding, MixedPrecisionReport]:
    """`emb` with per-row formats from the access count of each row of each of its tables
    (`ServingEmbedding.row_counts`), so that the whole embedding fits `budget_bytes`."""
    tables, report = quantize_mixed(
        [[t.dequantize() for t in emb.tables]],
        [row_counts],
        budget_bytes,
        fixed_bytes=emb.mapper.state_bytes(),
    )
    return ServingEmbedding(emb.mapper, tables[0], emb.combiner, emb.projection, emb.bias), report


def quantize_collection_mixed(
    collection: ServingCollection, stats: Mapping[str, FeatureStats], budget_bytes: int
) -> tuple[ServingCollection, MixedPrecisionReport]:
    """Per-row formats from access frequencies so the whole collection fits `budget_bytes`.

    Rows of features without statistics count as never read (they stay at the cheapest
    format).
    """
    groups, counts = [], []
    for name, emb in collection.embeddings.items():
        tables = [t.dequantize() for t in emb.tables]
        groups.append(tables)
        if name in stats:
            counts.append(emb.row_counts(stats[name].values, stats[name].counts))
        else:
            counts.append([torch.zeros(t.shape[0], dtype=torch.float64) for t in tables])
    # Everything outside the tables is charged: mappers, and a low-rank projection and bias.
    fixed = sum(emb.serving_bytes() - sum(t.nbytes() for t in emb.tables)
                for emb in collection.embeddings.values())
    tables, report = quantize_mixed(groups, counts, budget_bytes, fixed_bytes=fixed)
    out = [
        ServingEmbedding(emb.mapper, ts, emb.combiner, emb.projection, emb.bias)
        for emb, ts in zip(collection.embeddings.values(), tables, strict=True)
    ]
    return ServingCollection(collection.names, out, collection.dim), report
