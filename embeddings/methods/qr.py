"""Quotient–remainder embeddings (Shi et al., KDD 2020): two small tables instead of one.

An index i in [0, n) reads row i // c of a quotient table (ceil(n / c) rows) and row i % c of
a remainder table (c rows); the two vectors combine by element-wise product (the paper's
default), sum or concatenation, so every index gets a distinct combination.

Criteo values are raw 32-bit hashes, not indices in [0, n): QR is applied to
`hash(id) mod n` with n the feature's cardinality (values colliding in that first step share
both rows, as in any n-row hashed table). Both divisions are integer (ids exceed 2^24, where
float division loses digits).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from embeddings import budget
from embeddings.mapping import Combiner, QRMapper
from embeddings.methods.base import (
    CompressedEmbedding,
    FeatureStats,
    MethodConfig,
    ordinary_bound,
)
from embeddings.methods.mlet import nonlinear_refusal

__all__ = ["QRConfig", "QRMapper", "qr_init_bounds"]


def qr_init_bounds(combiner: Combiner, width: int) -> list[float]:
    """U(-a, a) bounds of the two tables so the combined vector has the variance of an
    ordinary U(-b, b) embedding, b = 1/sqrt(width).

    product: (a²/3)² = b²/3 → a = (√3·b)^½; sum: 2a²/3 = b²/3 → a = b/√2; concat: each half
    already holds ordinary elements → a = b. (The reference `uniform_(w, sqrt(1/n))` draws
    from U(√(1/n), 1), all positive; not reproduced.)
    """
    b = ordinary_bound(width)
    a = {Combiner.PRODUCT: (3**0.5 * b) ** 0.5, Combiner.SUM: b / 2**0.5, Combiner.CONCAT: b}
    return [a[combiner]] * 2


class QRConfig(MethodConfig):
    """Quotient–remainder embedding.

    Args:
        operation: how the quotient and remainder vectors combine: "product" (the paper's
            default), "sum" or "concat" (each table d/2 wide, or k/2 under MLET).
        ratio: compression ratio of the serving tables; c chosen for the fewest collisions
            (the smaller root of c + n/c = rows, as in the CAFE artifact). Ratios beyond
            QR's reach (rows < 2·sqrt(n)) give the most compressed QR, c = ceil(sqrt(n)).
        collisions: the remainder table size c, instead of a ratio.
        seed: hash seed of the first step, hash(id) mod n.
    """

    method: Literal["qr"] = "qr"
    operation: Combiner = Combiner.PRODUCT
    ratio: float | None = Field(None, ge=1)
    collisions: int | None = Field(None, gt=0)
    seed: int = 0

    @model_validator(mode="after")
    def _valid(self) -> QRConfig:
        if self.ratio is not None and self.collisions is not None:
            raise ValueError("give either ratio or collisions, not both")
        if self.mlet_dim is not None and self.operation is Combiner.PRODUCT:
            raise ValueError(nonlinear_refusal("qr", self.operation))
        return self

    def combiner(self) -> Combiner:
        return self.operation

    def check(self, num_embeddings: int, dim: int) -> None:
        super().check(num_embeddings, dim)
        if self.ratio is None and self.collisions is None:
            raise ValueError("qr needs a size: set ratio or collisions (or a collection ratio)")
        width = self.mlet_dim or dim
        if self.operation is Combiner.CONCAT and width % 2:
            raise ValueError(f"qr by concat needs an even width, got {width}")

    def at_ratio(self, ratio: float) -> QRConfig:
        return self.model_copy(update={"ratio": ratio, "collisions": None})

    def build(
        self, num_embeddings: int, dim: int, stats: FeatureStats | None = None
    ) -> CompressedEmbedding:
        self.check(num_embeddings, dim)
        c = self.collisions
        if c is None:
            # Concatenated halves serve d/2 wide (unless MLET folds them to d): twice the rows.
            half = self.operation is Combiner.CONCAT and self.mlet_dim is None
            row_budget = budget.rows_at_ratio(num_embeddings, self.ratio, 0.5 if half else 1.0)
            c = budget.qr_collisions(num_embeddings, row_budget)
        c = min(c, num_embeddings)
        mapper = QRMapper(num_embeddings, c, self.seed)
        return CompressedEmbedding(
            mapper,
            budget.qr_rows(num_embeddings, c),
            self.operation,
            dim,
            self.mlet_dim,
            self.sparse,
            init_scale=qr_init_bounds(self.operation, self.mlet_dim or dim),
        )
