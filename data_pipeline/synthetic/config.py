"""What the synthetic generator makes: its config (recorded in every manifest) and the sizes
of its features."""

from __future__ import annotations

import math
from dataclasses import dataclass

from data_pipeline import shards
from data_pipeline.schema import TERABYTE_CARDINALITIES

# Largest feature ~40k values, 190k values over all 26: Zipf-skewed, rare ids aplenty at a few
# million rows, and every uncompressed table still fits on a laptop.
DEFAULT_SCALE = 1e-3
# Features at or below this many values (Terabyte C6, C9, C13, ...) keep their real size, and
# no scaled feature drops below it: a 3-value feature scaled by 1e-3 would be meaningless.
MIN_SCALED_CARDINALITY = 64
# Rows per part file: four row groups of shards.ROW_GROUP_ROWS, the unit of parallel work.
DEFAULT_PART_ROWS = 4 * shards.ROW_GROUP_ROWS
TSV_FORMAT, PARQUET_FORMAT = "tsv", "parquet"
SYNTHETIC_JSON = "synthetic.json"


@dataclass(frozen=True)
class SynthConfig:
    """What to generate. Every field is recorded in the manifest.

    Args:
        rows: total rows over all days (spread evenly; the first days take the remainder).
        days: number of days (one `day=N` folder each).
        scale: multiplies the Terabyte cardinalities (`scaled_cardinalities`).
        drift: fraction of each feature's values by which the popularity ranking moves per
            day; 0 keeps the hot set fixed, 0.01 moves it by 1% of the values a day.
        seed: everything is a function of it; same seed, same bytes.
        positive_rate: target fraction of label 1 (Kaggle: ~0.25).
        zipf_exponent: popularity exponent s (P(rank r) ~ r^-s) of every categorical feature.
        logit_std: spread of the teacher's logit; sets how predictable labels are (1.4:
            teacher AUC ≈ 0.80).
        pair_share: share of the logit's standard deviation carried by pairwise interactions
            (the rest by first-order terms); what a linear model cannot learn.
        part_rows: rows per part file, the unit of parallel work.
    """

    rows: int
    days: int = 1
    scale: float = DEFAULT_SCALE
    drift: float = 0.0
    seed: int = 0
    positive_rate: float = 0.25
    zipf_exponent: float = 1.05
    logit_std: float = 1.4
    pair_share: float = 0.8
    part_rows: int = DEFAULT_PART_ROWS

    def __post_init__(self) -> None:
        if self.rows < 1 or self.days < 1:
            raise ValueError(f"rows and days must be ≥ 1 (rows={self.rows}, days={self.days})")
        if self.rows < self.days:
            raise ValueError(f"rows ({self.rows}) must be at least days ({self.days})")
        if not 0 < self.scale <= 1:
            raise ValueError(f"scale must be in (0, 1], got {self.scale}")
        if not 0 <= self.drift <= 1:
            raise ValueError(f"drift must be in [0, 1], got {self.drift}")
        if not 0 < self.positive_rate < 1:
            raise ValueError(f"positive_rate must be in (0, 1), got {self.positive_rate}")
        if not 0 <= self.pair_share <= 1:
            raise ValueError(f"pair_share must be in [0, 1], got {self.pair_share}")
        if self.zipf_exponent <= 0 or self.logit_std <= 0:
            raise ValueError("zipf_exponent and logit_std must be positive")
        if self.part_rows < 1:
            raise ValueError(f"part_rows must be ≥ 1, got {self.part_rows}")
        if not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be in [0, 2^63), got {self.seed}")

    def day_rows(self) -> list[int]:
        base, extra = divmod(self.rows, self.days)
        return [base + (d < extra) for d in range(self.days)]

    def teacher_fields(self) -> tuple:
        """The fields that make the teacher; rows/days/part_rows do not change it, so configs
        that differ only there share one calibration."""
        return (self.scale, self.seed, self.positive_rate, self.zipf_exponent,
                self.logit_std, self.pair_share)


def scaled_cardinalities(scale: float) -> tuple[int, ...]:
    """Values per categorical feature: ceil(Terabyte × scale), at least MIN_SCALED_CARDINALITY,
    never more than the real feature (so features of ≤ 64 values keep their real size)."""
    return tuple(
        min(n, max(math.ceil(n * scale), MIN_SCALED_CARDINALITY)) for n in TERABYTE_CARDINALITIES
    )
