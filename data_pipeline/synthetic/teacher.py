"""The planted teacher: the tables that say how each feature is drawn and how each value
weighs in the label's logit, a pure function of the config's teacher fields (and cached).

Calibration, which fits the logit's scales on generated rows, lives with the row generator
(`rows.calibrate`); `Calibration` is its result.
"""

from __future__ import annotations

import functools
import math
import statistics
from dataclasses import dataclass, field

import numpy as np

from data_pipeline.schema import NUM_DENSE, NUM_SPARSE
from data_pipeline.synthetic.config import scaled_cardinalities
from data_pipeline.synthetic.kernels import (
    LATENT_DIM,
    DenseLaw,
    Latents,
    Popularity,
    alias_table,
    latent_table,
)
from idhash.splitmix import GOLDEN, MASK64, mix64_int

# Latents of items below this index per feature are tabulated once per process; the long
# tail of Terabyte-sized features is hashed on the fly, so memory stays bounded at any scale.
LATENT_TABLE_ROWS = 1 << 16
# Ranks drawn exactly (alias method) per feature; rarer ranks of larger features come from
# the continuous power law, which the discrete law approaches there.
ALIAS_HEAD_ROWS = 1 << 16
DENSE_QUANTILES = 1 << 13

# Missing rates of C1..C26 in the real Kaggle logs (13k-row sample, rounded).
CAT_MISSING_RATES: tuple[float, ...] = (
    0.0, 0.0, 0.035, 0.035, 0.0, 0.13, 0.0, 0.0, 0.0, 0.0, 0.0, 0.035, 0.0,
    0.0, 0.0, 0.035, 0.0, 0.0, 0.45, 0.45, 0.035, 0.79, 0.0, 0.035, 0.45, 0.45,
)
# I1..I13 from the same sample: P(missing), P(zero | present), P(negative | present), and the
# log-normal (mu, sigma) of the positive counts; the quantiles of the real columns guided these.
DENSE_MISSING = (0.445, 0.0, 0.217, 0.222, 0.038, 0.24, 0.047, 0.001, 0.047, 0.445, 0.047,
                 0.771, 0.222)
DENSE_ZERO = (0.457, 0.18, 0.006, 0.06, 0.019, 0.065, 0.243, 0.117, 0.031, 0.493, 0.253,
              0.744, 0.063)
DENSE_NEGATIVE = (0.0, 0.11, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
DENSE_MU = tuple(math.log(m) for m in (2.0, 15.0, 6.0, 5.0, 2700.0, 35.0, 6.0, 9.0, 41.0, 1.2,
                                       2.5, 2.0, 5.0))
DENSE_SIGMA = (1.2, 2.0, 1.5, 1.0, 2.0, 1.6, 1.5, 1.0, 1.5, 0.4, 1.0, 1.2, 1.2)

# Keys of the generator's streams (`key(seed, stream, ...)`).
VALUE_KEYS, LATENT_KEYS, CALIBRATION_KEY, DAY_KEY = 1, 2, 4, 5


def key(*parts: int) -> np.uint64:
    """A 64-bit key for a tuple of ints (seed, stream, feature, day, ...)."""
    z = 0x2545F4914F6CDD1D
    for p in parts:
        z = mix64_int((z + (p & MASK64) * GOLDEN + 0x632BE59BD9B4E019) & MASK64)
    return np.uint64(z)


@dataclass(frozen=True)
class Calibration:
    """The teacher's logit, fitted on a calibration sample (see the package docstring).

    Args:
        a_lin, a_pair: scales of the first-order and of the pairwise terms.
        bias: the offset that gives the target positive rate.
        dense_center: mean log1p of each dense feature, subtracted before it meets the
            latents, so their product is a true interaction.
    """

    a_lin: float
    a_pair: float
    bias: float
    dense_center: tuple[float, ...]


@dataclass
class TeacherModel:
    """The tables every part needs; a pure function of the teacher fields of the config."""

    popularity: Popularity  # day 0's: no drift (`shift` zero)
    latents: Latents  # day 0's, indexed by popularity rank
    d_thr: np.ndarray
    q_val: np.ndarray
    q_t: np.ndarray
    d_beta: np.ndarray
    d_proj: np.ndarray
    # Latent tables of drifting days, by shift (see `day_latents`).
    by_shift: dict[bytes, Latents] = field(default_factory=dict)

    def dense_law(self, cal: Calibration) -> DenseLaw:
        return DenseLaw(self.d_thr, self.q_val, self.q_t, self.d_beta,
                        np.asarray(cal.dense_center, np.float64), self.d_proj)

    def day_latents(self, shift: np.ndarray) -> Latents:
        """The latent tables of a day whose ranking is moved by `shift`: they are indexed by
        rank, so drift moves which item holds each rank (tens of ms to rebuild, so the latest
        few days are kept)."""
        if not shift.any():
            return self.latents
        k = shift.tobytes()
        if k not in self.by_shift:
            if len(self.by_shift) >= 4:
                self.by_shift.pop(next(iter(self.by_shift)))
            lat = self.latents
            vec, norm_w = latent_table(lat.keys, lat.rows, lat.offsets,
                                       self.popularity.card, shift.astype(np.int64))
            self.by_shift[k] = lat._replace(vec=vec, norm_w=norm_w)
        return self.by_shift[k]


def _power_integral(lo: float, hi: float, s: float) -> float:
    if abs(s - 1.0) < 1e-9:
        return math.log(hi / lo)
    return (hi ** (1.0 - s) - lo ** (1.0 - s)) / (1.0 - s)


def _tail_law(h: int, n: int, s: float) -> tuple[float, float, float]:
    """(a, b, e) of the tail's inverse CDF on [h + 0.5, n + 0.5): rank + 1 = a·exp(u·b) for
    s = 1, else (a + u·b)^e."""
    lo, hi = h + 0.5, n + 0.5
    if abs(s - 1.0) < 1e-9:
        return lo, math.log(hi / lo), 0.0
    return lo ** (1.0 - s), hi ** (1.0 - s) - lo ** (1.0 - s), 1.0 / (1.0 - s)


def _popularity(card: np.ndarray, s: float, value_keys: np.ndarray) -> Popularity:
    tables, off, length, head, tails = [], [0], [], [], []
    for n, miss in zip(card.tolist(), CAT_MISSING_RATES, strict=True):
        h = min(n, ALIAS_HEAD_ROWS)
        weights = np.arange(1, h + 1, dtype=np.float64) ** -s  # P(rank r) ~ (r + 1)^-s
        # The tail (ranks ≥ h) is drawn from the continuous law on [h + 0.5, n + 0.5).
        tail = _power_integral(h + 0.5, n + 0.5, s) if n > h else 0.0
        z = weights.sum() + tail
        probs = np.concatenate([weights * ((1 - miss) / z), [tail * (1 - miss) / z, miss]])
        tables.append(alias_table(probs))
        length.append(len(probs))
        off.append(off[-1] + len(probs))
        head.append(h)
        tails.append(_tail_law(h, n, s))
    tail_a, tail_b, tail_e = (np.array(t) for t in zip(*tails, strict=True))
    return Popularity(
        card=card, shift=np.zeros(NUM_SPARSE, np.int64), alias=np.concatenate(tables),
        al_off=np.array(off[:-1], np.int64), al_len=np.array(length, np.int64),
        head=np.array(head, np.int64), tail_a=tail_a, tail_b=tail_b, tail_e=tail_e,
        value_keys=value_keys,
    )


def _dense_tables() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    # Thresholds in units of 2^-32 on one 32-bit uniform: missing, then zero, then negative.
    miss, zero, neg = (np.array(x) for x in (DENSE_MISSING, DENSE_ZERO, DENSE_NEGATIVE))
    cum = np.stack([miss, miss + (1 - miss) * zero, miss + (1 - miss) * (zero + neg)], axis=1)
    d_thr = np.round(cum * 2.0**32).astype(np.uint64)
    # Positive counts come from a quantile table of their log-normal law: a load instead of an
    # exp and a log1p per value; the top quantile reaches 3.7 sigma (I5: ~4M).
    nd = statistics.NormalDist()
    z = np.array([nd.inv_cdf((q + 0.5) / DENSE_QUANTILES) for q in range(DENSE_QUANTILES)])
    mu, sigma = np.array(DENSE_MU)[:, None], np.array(DENSE_SIGMA)[:, None]
    values = np.clip(np.round(np.exp(mu + sigma * z[None, :])), 1, 2**31 - 1)
    q_val = values.astype(np.int32)
    q_t = np.log1p(values).astype(np.float32)
    return d_thr, q_val, q_t


@functools.lru_cache(maxsize=4)
def base_model(teacher: tuple) -> TeacherModel:
    """The teacher of `SynthConfig.teacher_fields()`."""
    scale, seed, _, s, _, _ = teacher
    card = np.array(scaled_cardinalities(scale), dtype=np.int64)
    value_keys = np.array([key(seed, VALUE_KEYS, f) for f in range(NUM_SPARSE)], np.uint64)
    lat_keys = np.array([key(seed, LATENT_KEYS, f) for f in range(NUM_SPARSE)], np.uint64)
    lat_rows = np.minimum(card, LATENT_TABLE_ROWS)
    lat_offsets = np.concatenate([[0], np.cumsum(lat_rows)]).astype(np.int64)
    vec, norm_w = latent_table(lat_keys, lat_rows, lat_offsets, card,
                               np.zeros(NUM_SPARSE, np.int64))
    d_thr, q_val, q_t = _dense_tables()
    rng = np.random.default_rng([seed, 3])
    return TeacherModel(
        popularity=_popularity(card, s, value_keys),
        latents=Latents(lat_keys, lat_rows, lat_offsets, vec, norm_w),
        d_thr=d_thr, q_val=q_val, q_t=q_t, d_beta=rng.normal(0.0, 1.0, NUM_DENSE),
        d_proj=rng.normal(0.0, 1.0, (NUM_DENSE, LATENT_DIM)).astype(np.float32),
    )
