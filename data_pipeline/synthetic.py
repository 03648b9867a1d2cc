"""Synthetic Criteo: the shard format and skew of the real logs, with labels from a known model.

Real Criteo cannot say how good a model could be; here a planted "teacher" makes every label,
so its own AUC is the ceiling any model can reach, and the data is as large as one wishes,
deterministic for a seed, and drifts across days on request.

How a row is made (everything is a pure function of (seed, day, row), so the bytes do not
depend on how rows are cut into parts or which process writes them):

* categorical C_f: a popularity rank from a Zipf law P(rank r) ~ (r + 1)^-s (exponent
  ``zipf_exponent``) over ``n_f`` values, ``n_f`` = the Terabyte cardinality times ``scale``
  (see `scaled_cardinalities`); drawn exactly by the alias method for the first 65,536 ranks,
  from the continuous power law beyond (Terabyte-sized features only). Missing is one more
  outcome of the same draw, at the real Kaggle logs' per-feature rate. The rank becomes an
  *item* (``drift``: the ranking moves by ``drift * n_f`` items a day, so the hot set moves)
  and the item a 32-bit value through a seeded bijective scramble, so values look like
  Criteo's hex hashes and distinct items never collide.
* dense I_j: missing, zero (I2 also -1/-2) or a rounded log-normal count, with per-feature
  rates and ranges measured on the Kaggle sample (heavy tails up to ~10^6 for I5).
* teacher: each item has a latent vector (8 values) and a first-order weight, hashed from
  (seed, feature, item) so no table of the full vocabulary is ever needed, and scaled down
  by its popularity rank that day (rare ids are individually weak: `RARITY_KNEE`); the logit is
  ``bias + a_lin * (sum of first-order terms + dense linear) + a_pair * FM pairwise
  interactions`` (dot products between all the row's latents, dense features projected into
  the same space, as DLRM does), and the label is Bernoulli(sigmoid(logit)). A calibration
  sample fixes ``a_lin``, ``a_pair`` so the logit has standard deviation ``logit_std`` and
  then the bias so the positive rate is ``positive_rate``. The default ``logit_std`` = 1.4
  gives a teacher AUC of ~0.80, Criteo-like; a logistic regression on the features reaches
  ~0.67 (the interactions carry most of the signal).

Speed (2-core VM, one core, CPU time): ~0.32 µs a row to generate, ~0.49 µs to encode Parquet
(`shards.PARQUET_OPTIONS`: snappy, dictionaries for label and categoricals, byte-stream-split
dense columns, no statistics), ~0.04 µs for the manifest's SHA-256: ~1.17M rows/s per core end
to end (jobs/benchmarks/synth_speed.py).
"""

from __future__ import annotations

import functools
import math
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from numba import njit

from data_pipeline import shards
from data_pipeline.schema import (
    DENSE_COLUMNS,
    LABEL,
    NUM_DENSE,
    NUM_SPARSE,
    SCHEMA_VERSION,
    SPARSE_COLUMNS,
    TERABYTE_CARDINALITIES,
    arrow_schema,
)

# Largest feature ~40k values, 190k values over all 26: Zipf-skewed, rare ids aplenty at a few
# million rows, and every uncompressed table still fits on a laptop.
DEFAULT_SCALE = 1e-3
# Features at or below this many values (Terabyte C6, C9, C13, ...) keep their real size, and
# no scaled feature drops below it: a 3-value feature scaled by 1e-3 would be meaningless.
MIN_SCALED_CARDINALITY = 64
# Rows per part file: four row groups of shards.ROW_GROUP_ROWS, the unit of parallel work.
DEFAULT_PART_ROWS = 4 * shards.ROW_GROUP_ROWS
# Latents of items below this index per feature are tabulated once per process; the long
# tail of Terabyte-sized features is hashed on the fly, so memory stays bounded at any scale.
LATENT_TABLE_ROWS = 1 << 16
# Ranks drawn exactly (alias method) per feature; rarer ranks of larger features come from
# the continuous power law, which the discrete law approaches there.
ALIAS_HEAD_ROWS = 1 << 16
DENSE_QUANTILES = 1 << 13
# Teacher latent vectors: LATENT_DIM values, multiples of 1/LATENT_STEPS (int8, ±127: ~4
# sigma of range). Eight values make one 64-bit word (see `_latent`).
LATENT_DIM = 8
LATENT_STEPS = 32
# An item's latent vector and first-order weight shrink with its popularity rank r (0 = most
# popular) by (1 + r / RARITY_KNEE) ** -RARITY_POWER: rare ids are individually weak, as in
# the real logs, where an id seen a handful of times cannot carry much (and no model could
# learn it if it did). With every one of ~190k ids at full strength, an uncompressed DLRM
# trained on 2M rows here reached 0.730 AUC against the teacher's 0.80; with this, 0.745 (same
# training; the rest of the gap is estimation on the head, see issue 4's notes). Rank 10,000
# keeps 0.1 of the head's scale: rare ids still carry some signal for the rare-id band.
RARITY_KNEE = 100.0
RARITY_POWER = 0.5
CALIBRATION_ROWS = 200_000
TSV_FORMAT, PARQUET_FORMAT = "tsv", "parquet"
SYNTHETIC_JSON = "synthetic.json"

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

# Teacher logits are binned for AUC: 16k bins over [-16, 16] make the binning error < 1e-4.
_HIST_BINS = 1 << 14
_HIST_LO, _HIST_HI = -16.0, 16.0
_SPLITS = ("train", "validation", "test")

_U = np.uint64
_GOLDEN = _U(0x9E3779B97F4A7C15)
_M1 = _U(0xBF58476D1CE4E5B9)
_M2 = _U(0x94D049BB133111EB)
_M32 = _U(0xFFFFFFFF)
_F1 = _U(0x85EBCA6B)
_F2 = _U(0xC2B2AE35)
_S11, _S13, _S16, _S27, _S30, _S31, _S32 = (_U(s) for s in (11, 13, 16, 27, 30, 31, 32))
_INV53 = 1.0 / 9007199254740992.0
_INV16 = 1.0 / 65536.0
_SQRT3 = math.sqrt(3.0)


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


def scaled_cardinalities(scale: float) -> tuple[int, ...]:
    """Values per categorical feature: ceil(Terabyte × scale), at least MIN_SCALED_CARDINALITY,
    never more than the real feature (so features of ≤ 64 values keep their real size)."""
    return tuple(
        min(n, max(math.ceil(n * scale), MIN_SCALED_CARDINALITY)) for n in TERABYTE_CARDINALITIES
    )


# ---------------------------------------------------------------------------------------------
# numba kernels: counter-based random numbers, so row r of day d never depends on other rows.


@njit(inline="always")
def _mix(z):
    z = (z ^ (z >> _S30)) * _M1
    z = (z ^ (z >> _S27)) * _M2
    return z ^ (z >> _S31)


@njit(inline="always")
def _uniform(h):
    return float(h >> _S11) * _INV53


@njit(inline="always")
def _gauss(h):
    # Irwin-Hall of four 16-bit uniforms: near-Gaussian, unit variance, one hash per draw.
    s = float(h & _U(0xFFFF)) + float((h >> _S16) & _U(0xFFFF))
    s += float((h >> _S32) & _U(0xFFFF)) + float(h >> _U(48))
    return (s * _INV16 - 2.0) * _SQRT3


@njit(inline="always")
def _scramble32(item, key):
    # Bijection of [0, 2^32): add a key, then murmur3's fmix32 (xor-shifts and odd multipliers
    # are invertible mod 2^32), then xor a second key. Distinct items → distinct values.
    x = (_U(item) + (key & _M32)) & _M32
    x ^= x >> _S16
    x = (x * _F1) & _M32
    x ^= x >> _S13
    x = (x * _F2) & _M32
    x ^= x >> _S16
    return x ^ (key >> _S32)


@njit(inline="always")
def _quantised_gauss(h, scale):
    return np.int64(min(max(round(_gauss(h) * (LATENT_STEPS * scale)), -127.0), 127.0))


@njit(inline="always")
def _rarity_scale(rank):
    return (1.0 + rank * (1.0 / RARITY_KNEE)) ** -RARITY_POWER


@njit(inline="always")
def _latent(feature_key, item, rank):
    """An item's teacher parameters, hashed from (feature, item) and scaled by its popularity
    `rank` that day (`_rarity_scale`), in two words.

    Latent values are int8 multiples of 1/LATENT_STEPS. Word 1 holds the 8 latent values,
    byte q = value q + 128; word 2 the squared norm (low 32 bits) and the first-order weight
    + 128 (high bits). Biased bytes let a row's sums run as plain 64-bit additions with the
    bytes spread into 16-bit lanes (26 features × 255 < 2^16: no lane overflows), and integer
    sums are exact: the same bits on every machine, whatever its vector width.
    """
    base = feature_key + _U(item) * _GOLDEN
    scale = _rarity_scale(rank)
    packed = _U(0)
    nsq = _U(0)
    for q in range(LATENT_DIM):
        x = _quantised_gauss(_mix(base + _U(q + 1) * _M2), scale)
        packed |= _U(x + 128) << _U(8 * q)
        nsq += _U(x * x)
    w = _quantised_gauss(_mix(base), scale)
    return packed, nsq | (_U(w + 128) << _S32)


@njit(cache=True, nogil=True)
def _latent_table(feature_keys, rows, offsets, card, shift):
    # Indexed by popularity rank: row r holds the item at rank r on a day whose ranking is
    # moved by `shift` (drift), at rank r's strength, so the hot set stays strong as it moves.
    total = offsets[-1]
    vec = np.empty(total, dtype=np.uint64)
    norm_w = np.empty(total, dtype=np.uint64)
    for f in range(feature_keys.shape[0]):
        for i in range(rows[f]):
            item = (i + shift[f]) % card[f]
            vec[offsets[f] + i], norm_w[offsets[f] + i] = _latent(feature_keys[f], item, i)
    return vec, norm_w


@njit(cache=True, nogil=True)
def _alias_table(probs):
    # Vose's alias method: one uniform index plus one comparison draws from `probs` exactly.
    n = probs.shape[0]
    scaled = probs * (n / probs.sum())
    keep = np.ones(n)
    alias = np.arange(n).astype(np.int32)
    small = np.empty(n, np.int64)
    large = np.empty(n, np.int64)
    ns = nl = 0
    for i in range(n):
        if scaled[i] < 1.0:
            small[ns] = i
            ns += 1
        else:
            large[nl] = i
            nl += 1
    while ns > 0 and nl > 0:
        ns -= 1
        s = small[ns]
        g = large[nl - 1]
        keep[s] = scaled[s]
        alias[s] = g
        scaled[g] = scaled[g] + scaled[s] - 1.0
        if scaled[g] < 1.0:
            nl -= 1
            small[ns] = g
            ns += 1
    # One uint64 per entry, alias index above the 32-bit keep threshold: one load per draw.
    packed = np.empty(n, np.uint64)
    for i in range(n):
        packed[i] = (_U(alias[i]) << _S32) | _U(min(keep[i] * 4294967296.0, 4294967295.0))
    return packed


@njit(cache=True, nogil=True)
def _fill_rows(
    day_key, row0, card, shift, alias, al_off, al_len, head, tail_a, tail_b, tail_e,
    value_keys, lat_keys, lat_rows, lat_offsets, lat_v, lat_nw, d_thr, q_val, q_t,
    d_beta, d_center, d_proj, a_lin, a_pair, bias, val_start, test_start,
    label, dense, dense_ok, cat, cat_ok, lin_out, pair_out, hist,
):
    # Tiled, and column-major inside a tile: each inner loop runs over independent rows, so
    # the CPU overlaps their hashes and loads. Tiles are long because one feature's tables
    # (alias, latents, quantiles: up to ~1.5 MB) then stay in L2 for thousands of rows: with
    # 1k-row tiles all 26 features' tables cycled through the cache every tile (~35% slower).
    # The hashes run in a loop of their own, which the compiler vectorises. Selects
    # instead of branches (missing or not, alias or not) because those are coin flips the
    # branch predictor cannot learn. Indices are unsigned: numba then skips its
    # negative-index wraparound, which otherwise costs as much as the work itself.
    n = label.shape[0]
    k = d_proj.shape[1]
    uk = _U(k)
    tile = 16384
    rk = np.empty(tile, np.uint64)
    hh = np.empty(tile, np.uint64)
    # Per-row sums of the categorical parameters, in the lanes of `_latent`'s words.
    acc_even = np.zeros(tile, np.uint64)  # latent values 0, 2, 4, 6
    acc_odd = np.zeros(tile, np.uint64)  # latent values 1, 3, 5, 7
    # Squared norms (bits 0-31), first-order weights + 128 (32-47), present features (48-63).
    acc_nw = np.zeros(tile, np.uint64)
    one_present = _U(1 << 48)
    dv = np.zeros(tile * k, np.float32)
    lin = np.zeros(tile, np.float32)
    lanes = _U(0x00FF00FF00FF00FF)
    step = np.float32(1.0 / LATENT_STEPS)
    step2 = np.float32(1.0 / (LATENT_STEPS * LATENT_STEPS))
    n_bins = hist.shape[2]
    bin_scale = n_bins / (_HIST_HI - _HIST_LO)
    q_n = _U(q_val.shape[1])
    zero = np.float32(0.0)
    for t0 in range(0, n, tile):
        m = min(tile, n - t0)
        for i in range(m):
            rk[i] = _mix(day_key + _U(row0 + t0 + i) * _GOLDEN)
        acc_even[:] = 0
        acc_odd[:] = 0
        acc_nw[:] = 0
        dv[:] = 0.0
        lin[:] = 0.0
        for f in range(card.shape[0]):
            stream = _U(f + 1) * _GOLDEN
            off = _U(al_off[f])
            size = _U(al_len[f])
            h_f = head[f]
            n_f = card[f]
            key = value_keys[f]
            s_f = shift[f]
            lat_lo = lat_offsets[f]
            lat_hi = lat_rows[f]
            for i in range(m):
                hh[i] = _mix(rk[i] + stream)
            for i in range(m):
                h = hh[i]
                j = ((h & _M32) * size) >> _S32
                e = alias[off + j]
                j = np.int64(j if (h >> _S32) < (e & _M32) else e >> _S32)
                present = j < h_f  # outcome h_f is the tail, h_f + 1 missing
                if j == h_f:  # the tail beyond the tabulated head: power-law inverse CDF
                    u = _uniform(_mix(rk[i] + stream + _M2))
                    if tail_e[f] == 0.0:
                        x = tail_a[f] * math.exp(u * tail_b[f])
                    else:
                        x = (tail_a[f] + u * tail_b[f]) ** tail_e[f]
                    j = min(max(np.int64(x + 0.5) - 1, h_f), n_f - 1)
                    present = True
                rank = min(j, n_f - 1)
                item = rank + s_f
                item = item - n_f if item >= n_f else item
                r = _U(t0 + i)
                cat[f, r] = np.int64(_scramble32(item, key)) if present else 0
                cat_ok[f, r] = present
                if rank < lat_hi:  # the day's table is indexed by rank
                    lr = _U(lat_lo + rank)
                    vec, nw = lat_v[lr], lat_nw[lr]
                else:  # beyond the table (Terabyte-sized features): hash it now
                    vec, nw = _latent(lat_keys[f], item, rank)
                vec = vec if present else _U(0)
                ui = _U(i)
                acc_even[ui] += vec & lanes
                acc_odd[ui] += (vec >> _U(8)) & lanes
                acc_nw[ui] += (nw + one_present) if present else _U(0)
        for jd in range(q_val.shape[0]):
            stream = _U(card.shape[0] + jd + 1) * _GOLDEN
            th_miss, th_zero, th_neg = d_thr[jd, 0], d_thr[jd, 1], d_thr[jd, 2]
            beta = np.float32(d_beta[jd])
            center = np.float32(d_center[jd])
            for i in range(m):
                hh[i] = _mix(rk[i] + stream)
            for i in range(m):
                h = hh[i]
                lo = h & _M32
                hi = h >> _S32
                qi = (hi * q_n) >> _S32
                positive = lo >= th_neg
                val = q_val[jd, qi] if positive else (
                    (-1 - np.int32(hi & _U(1))) if lo >= th_zero else np.int32(0))
                r = _U(t0 + i)
                dense[jd, r] = val
                dense_ok[jd, r] = lo >= th_miss
                t = (q_t[jd, qi] if positive else zero) - center
                ui = _U(i)
                lin[ui] += beta * t
                for q in range(k):
                    uq = _U(q)
                    dv[ui * uk + uq] += d_proj[jd, uq] * t
        stream = _U(card.shape[0] + q_val.shape[0] + 1) * _GOLDEN
        for i in range(m):
            # FM identity: all pairs of categorical latents, plus each against the dense
            # projection (DLRM's dense-sparse interaction).
            ss = np.int64(0)
            sd = zero
            ui = _U(i)
            bias128 = 128 * np.int64(acc_nw[ui] >> _U(48))
            for q in range(k):
                word = acc_even[ui] if q % 2 == 0 else acc_odd[ui]
                a = np.int64((word >> _U(16 * (q // 2))) & _U(0xFFFF)) - bias128
                ss += a * a
                sd += np.float32(a) * dv[ui * uk + _U(q)]
            nsq = np.int64(acc_nw[ui] & _M32)
            w_sum = np.int64((acc_nw[ui] >> _S32) & _U(0xFFFF)) - bias128
            pair = np.float32(ss - nsq) * (np.float32(0.5) * step2) + sd * step
            lin_i = lin[ui] + np.float32(w_sum) * step
            r = _U(t0 + i)
            lin_out[r] = lin_i
            pair_out[r] = pair
            logit = bias + a_lin * lin_i + a_pair * pair
            p = 1.0 / (1.0 + math.exp(-logit))
            y = _uniform(_mix(rk[i] + stream)) < p
            label[r] = 1 if y else 0
            row = row0 + t0 + i
            split = 0 if row < val_start else (1 if row < test_start else 2)
            b = min(max(int((logit - _HIST_LO) * bin_scale), 0), n_bins - 1)
            hist[split, label[r], b] += 1


@njit(cache=True, nogil=True)
def _format_tsv(label, dense, dense_ok, cat, cat_ok):
    n = label.shape[0]
    out = np.empty(n * (2 + dense.shape[0] * 12 + cat.shape[0] * 9), dtype=np.uint8)
    digits = np.empty(12, dtype=np.uint8)
    pos = 0
    for i in range(n):
        out[pos] = 48 + label[i]
        pos += 1
        for j in range(dense.shape[0]):
            out[pos] = 9
            pos += 1
            if not dense_ok[j, i]:
                continue
            v = np.int64(dense[j, i])
            if v < 0:
                out[pos] = 45
                pos += 1
                v = -v
            m = 0
            while True:
                digits[m] = 48 + v % 10
                m += 1
                v //= 10
                if v == 0:
                    break
            for q in range(m - 1, -1, -1):
                out[pos] = digits[q]
                pos += 1
        for f in range(cat.shape[0]):
            out[pos] = 9
            pos += 1
            if not cat_ok[f, i]:
                continue
            v = cat[f, i]
            for q in range(7, -1, -1):
                d = (v >> (4 * q)) & 15
                out[pos] = 48 + d if d < 10 else 87 + d
                pos += 1
        out[pos] = 10
        pos += 1
    return out[:pos]


# ---------------------------------------------------------------------------------------------
# The teacher: everything a part needs besides its row range, derived from the config alone.


def _key(*parts: int) -> np.uint64:
    z = 0x2545F4914F6CDD1D
    m = (1 << 64) - 1
    for p in parts:
        z = (z + (p & m) * 0x9E3779B97F4A7C15 + 0x632BE59BD9B4E019) & m
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
        z ^= z >> 31
    return np.uint64(z)


@dataclass(frozen=True)
class Calibration:
    """Scales and bias fitted on a calibration sample (see the module docstring)."""

    a_lin: float
    a_pair: float
    bias: float
    dense_center: tuple[float, ...]


@dataclass
class _Model:
    """The tables every part needs; a pure function of the teacher fields of the config."""

    cardinalities: np.ndarray
    alias: np.ndarray  # alias tables over (head ranks, tail, missing), concatenated
    al_off: np.ndarray
    al_len: np.ndarray
    head: np.ndarray  # tabulated ranks per feature; outcome `head` = tail, `head + 1` = missing
    tail_a: np.ndarray
    tail_b: np.ndarray
    tail_e: np.ndarray
    value_keys: np.ndarray
    lat_keys: np.ndarray
    lat_rows: np.ndarray
    lat_offsets: np.ndarray
    lat_v: np.ndarray  # day 0's (no drift) latent tables, indexed by popularity rank
    lat_nw: np.ndarray
    d_thr: np.ndarray
    q_val: np.ndarray
    q_t: np.ndarray
    d_beta: np.ndarray
    d_proj: np.ndarray
    # Latent tables of drifting days, by shift (see `_day_latents`).
    day_latents: dict[bytes, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)


def _teacher_fields(config: SynthConfig) -> tuple:
    # The fields that change the teacher; rows/days/part_rows do not, so calibration is shared.
    return (config.scale, config.seed, config.positive_rate, config.zipf_exponent,
            config.logit_std, config.pair_share)


def _power_integral(lo: float, hi: float, s: float) -> float:
    if abs(s - 1.0) < 1e-9:
        return math.log(hi / lo)
    return (hi ** (1.0 - s) - lo ** (1.0 - s)) / (1.0 - s)


def _popularity_tables(card: np.ndarray, s: float) -> tuple[np.ndarray, ...]:
    tables, off, length, head = [], [0], [], []
    tail_a, tail_b, tail_e = [], [], []
    for n, miss in zip(card.tolist(), CAT_MISSING_RATES, strict=True):
        h = min(n, ALIAS_HEAD_ROWS)
        weights = np.arange(1, h + 1, dtype=np.float64) ** -s  # P(rank r) ~ (r + 1)^-s
        # The tail (ranks ≥ h) is drawn from the continuous law on [h + 0.5, n + 0.5).
        tail = _power_integral(h + 0.5, n + 0.5, s) if n > h else 0.0
        z = weights.sum() + tail
        probs = np.concatenate([weights * ((1 - miss) / z), [tail * (1 - miss) / z, miss]])
        tables.append(_alias_table(probs))
        length.append(len(probs))
        off.append(off[-1] + len(probs))
        head.append(h)
        lo, hi = h + 0.5, n + 0.5
        if abs(s - 1.0) < 1e-9:
            tail_a.append(lo)
            tail_b.append(math.log(hi / lo))
            tail_e.append(0.0)
        else:
            tail_a.append(lo ** (1.0 - s))
            tail_b.append(hi ** (1.0 - s) - lo ** (1.0 - s))
            tail_e.append(1.0 / (1.0 - s))
    return (np.concatenate(tables), np.array(off[:-1], np.int64),
            np.array(length, np.int64), np.array(head, np.int64), np.array(tail_a),
            np.array(tail_b), np.array(tail_e))


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
def _base_model(teacher: tuple) -> _Model:
    scale, seed, _, s, _, _ = teacher
    card = np.array(scaled_cardinalities(scale), dtype=np.int64)
    alias, al_off, al_len, head, tail_a, tail_b, tail_e = _popularity_tables(card, s)
    value_keys = np.array([_key(seed, 1, f) for f in range(NUM_SPARSE)], dtype=np.uint64)
    lat_keys = np.array([_key(seed, 2, f) for f in range(NUM_SPARSE)], dtype=np.uint64)
    lat_rows = np.minimum(card, LATENT_TABLE_ROWS)
    lat_offsets = np.concatenate([[0], np.cumsum(lat_rows)]).astype(np.int64)
    lat_v, lat_nw = _latent_table(lat_keys, lat_rows, lat_offsets, card,
                                  np.zeros(NUM_SPARSE, np.int64))
    d_thr, q_val, q_t = _dense_tables()
    rng = np.random.default_rng([seed, 3])
    return _Model(
        cardinalities=card, alias=alias, al_off=al_off, al_len=al_len,
        head=head, tail_a=tail_a, tail_b=tail_b, tail_e=tail_e, value_keys=value_keys,
        lat_keys=lat_keys, lat_rows=lat_rows, lat_offsets=lat_offsets,
        lat_v=lat_v, lat_nw=lat_nw,
        d_thr=d_thr, q_val=q_val, q_t=q_t, d_beta=rng.normal(0.0, 1.0, NUM_DENSE),
        d_proj=rng.normal(0.0, 1.0, (NUM_DENSE, LATENT_DIM)).astype(np.float32),
    )


@dataclass
class _Rows:
    label: np.ndarray
    dense: np.ndarray
    dense_ok: np.ndarray
    cat: np.ndarray
    cat_ok: np.ndarray
    lin: np.ndarray
    pair: np.ndarray
    hist: np.ndarray


def _new_rows(n: int) -> _Rows:
    return _Rows(
        label=np.empty(n, np.int8), dense=np.empty((NUM_DENSE, n), np.int32),
        dense_ok=np.empty((NUM_DENSE, n), np.bool_), cat=np.empty((NUM_SPARSE, n), np.int64),
        cat_ok=np.empty((NUM_SPARSE, n), np.bool_), lin=np.empty(n, np.float32),
        pair=np.empty(n, np.float32), hist=np.zeros((3, 2, _HIST_BINS), np.int64),
    )


_SCRATCH: list[_Rows] = []  # one set of buffers, as large as the largest part yet


def _prefix(a: np.ndarray, n: int) -> np.ndarray:
    # The first n rows of a per-row buffer, C-contiguous: a 2-D [columns, capacity] buffer
    # becomes [columns, n] over the start of the same memory.
    return a.reshape(-1)[: a.shape[0] * n].reshape(a.shape[0], n) if a.ndim == 2 else a[:n]


def _scratch_rows(n: int) -> _Rows:
    # Fresh pages cost a fault each on first touch (~300 bytes a row here, a large share of
    # the work); a writer that drops each table before the next part reuses one set, and a
    # shorter part (a day's last) takes a prefix of it rather than fresh pages.
    if not _SCRATCH or _SCRATCH[0].label.shape[0] < n:
        _SCRATCH[:] = [_new_rows(n)]
    buf = _SCRATCH[0]
    buf.hist[:] = 0
    return _Rows(**{f.name: _prefix(getattr(buf, f.name), n) for f in fields(_Rows)
                    if f.name != "hist"}, hist=buf.hist)


def _day_latents(model: _Model, shift: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # The latent tables are indexed by rank; a drifting day moves which item holds each rank
    # (tens of ms to rebuild, so the latest few days are kept).
    if not shift.any():
        return model.lat_v, model.lat_nw
    key = shift.tobytes()
    days = model.day_latents
    if key not in days:
        if len(days) >= 4:
            days.pop(next(iter(days)))
        days[key] = _latent_table(model.lat_keys, model.lat_rows, model.lat_offsets,
                                  model.cardinalities, shift.astype(np.int64))
    return days[key]


def _fill(model: _Model, cal: Calibration, day_key: np.uint64, shift: np.ndarray, row0: int,
          n: int, val_start: int, test_start: int, reuse: bool = False) -> _Rows:
    r = _scratch_rows(n) if reuse else _new_rows(n)
    m = model
    lat_v, lat_nw = _day_latents(m, shift)
    _fill_rows(
        day_key, np.int64(row0), m.cardinalities, shift, m.alias, m.al_off, m.al_len,
        m.head, m.tail_a, m.tail_b, m.tail_e, m.value_keys, m.lat_keys, m.lat_rows,
        m.lat_offsets, lat_v, lat_nw, m.d_thr, m.q_val, m.q_t, m.d_beta,
        np.asarray(cal.dense_center, np.float64), m.d_proj, cal.a_lin, cal.a_pair, cal.bias,
        np.int64(val_start), np.int64(test_start),
        r.label, r.dense, r.dense_ok, r.cat, r.cat_ok, r.lin, r.pair, r.hist,
    )
    return r


def _sigmoid_mean(z: np.ndarray, b: float) -> float:
    return float(np.mean(1.0 / (1.0 + np.exp(-(z + b)))))


@functools.lru_cache(maxsize=4)
def _calibrate(teacher: tuple) -> Calibration:
    model = _base_model(teacher)
    _, seed, rate, _, logit_std, pair_share = teacher
    key = _key(seed, 4)
    no_shift = np.zeros(NUM_SPARSE, np.int64)
    n = CALIBRATION_ROWS
    # Pass 1 centres the dense features, so that their product with the latents is a true
    # interaction rather than a disguised first-order term a linear model could learn.
    r = _fill(model, Calibration(0, 0, 0, (0.0,) * NUM_DENSE), key, no_shift, 0, n, n, n)
    t = np.where(r.dense_ok & (r.dense > 0), np.log1p(np.maximum(r.dense, 0)), 0.0)
    center = tuple(float(c) for c in t.mean(axis=1))
    r = _fill(model, Calibration(0, 0, 0, center), key, no_shift, 0, n, n, n)
    lin_share = math.sqrt(max(0.0, 1.0 - pair_share**2))
    a_lin = lin_share * logit_std / max(float(r.lin.std(dtype=np.float64)), 1e-12)
    a_pair = pair_share * logit_std / max(float(r.pair.std(dtype=np.float64)), 1e-12)
    z = a_lin * r.lin.astype(np.float64) + a_pair * r.pair.astype(np.float64)
    lo, hi = -30.0, 30.0
    for _ in range(100):  # bisection: mean sigmoid is increasing in the bias
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if _sigmoid_mean(z, mid) < rate else (lo, mid)
    return Calibration(a_lin=a_lin, a_pair=a_pair, bias=0.5 * (lo + hi), dense_center=center)


def _day_shift(config: SynthConfig, day: int) -> np.ndarray:
    card = np.array(scaled_cardinalities(config.scale), dtype=np.int64)
    return np.round(config.drift * day * card).astype(np.int64) % card


def split_boundaries(day_rows: Sequence[int], day: int) -> tuple[int, int]:
    """(validation start, test start) as row positions within `day`; both = rows for a
    training day. Follows datasets.split_row_ranges, the one place the split rule lives."""
    from data_pipeline.datasets import split_row_ranges

    ranges = split_row_ranges(dict(enumerate(day_rows)))
    val = [(s, e) for d, s, e in ranges["validation"] if d == day]
    test = [(s, e) for d, s, e in ranges["test"] if d == day]
    n = day_rows[day]
    return (val[0][0] if val else n, test[0][0] if test else n)


# ---------------------------------------------------------------------------------------------
# Public generation API.


def generate_rows(config: SynthConfig, day: int, start: int, stop: int) -> pa.Table:
    """Rows [start, stop) of `day` as an Arrow table with the shard schema (no I/O)."""
    table, _ = _generate(config, day, start, stop)
    return table


def teacher_logits(config: SynthConfig, day: int, start: int,
                   stop: int) -> tuple[np.ndarray, pa.Table]:
    """The teacher's logits (float64) of rows [start, stop) of `day`, with the rows: the
    ceiling model's scores, e.g. for its AUC on a subset of rows (rare ids, one split)."""
    table, r = _generate(config, day, start, stop)
    cal = _calibrate(_teacher_fields(config))
    logits = cal.bias + cal.a_lin * r.lin.astype(np.float64) + cal.a_pair * r.pair.astype(
        np.float64)
    return logits, table


def _generate(config: SynthConfig, day: int, start: int, stop: int, reuse: bool = False,
              cal: Calibration | None = None) -> tuple[pa.Table, _Rows]:
    # reuse=True: the arrays (and the zero-copy table over them) are valid only until the
    # next reusing call in this process.
    teacher = _teacher_fields(config)
    model, cal = _base_model(teacher), cal or _calibrate(teacher)
    val_start, test_start = split_boundaries(config.day_rows(), day)
    r = _fill(model, cal, _key(config.seed, 5, day), _day_shift(config, day), start,
              stop - start, val_start, test_start, reuse)
    return _to_arrow(r), r


def _column(values: np.ndarray, ok: np.ndarray, typ: pa.DataType) -> pa.Array:
    n = len(values)
    nulls = n - int(np.count_nonzero(ok))
    bitmap = pa.py_buffer(np.packbits(ok, bitorder="little")) if nulls else None
    return pa.Array.from_buffers(typ, n, [bitmap, pa.py_buffer(values)], null_count=nulls)


def _to_arrow(r: _Rows) -> pa.Table:
    schema = arrow_schema()
    cols = [pa.array(r.label, pa.int8())]
    cols += [_column(r.dense[j], r.dense_ok[j], pa.int32()) for j in range(NUM_DENSE)]
    cols += [_column(r.cat[f], r.cat_ok[f], pa.int64()) for f in range(NUM_SPARSE)]
    return pa.Table.from_arrays(cols, schema=schema)


def _to_tsv(r: _Rows) -> bytes:
    return _format_tsv(r.label, r.dense, r.dense_ok, r.cat, r.cat_ok).tobytes()


@dataclass
class PartResult:
    """What one generated part reports back to the driver."""

    day: int
    part: int
    rows: int
    positives: int
    hist: np.ndarray  # [split, label, bin] counts of teacher logits
    path: str | None = None
    sha256: str | None = None


def _parts(config: SynthConfig) -> list[tuple[int, int, int, int]]:
    """(day, part, start, stop) for every part file."""
    out = []
    for day, n in enumerate(config.day_rows()):
        for part, start in enumerate(range(0, n, config.part_rows)):
            out.append((day, part, start, min(n, start + config.part_rows)))
    return out


def write_part(config: SynthConfig, out: str, day: int, part: int, start: int,
               stop: int, cal: Calibration | None = None) -> PartResult:
    """Generate one part and write it as `day=N/part-XXXXX.parquet` (atomically)."""
    table, r = _generate(config, day, start, stop, reuse=True, cal=cal)
    path = shards.shard_path(Path(out), day, part)
    shards.write_table_atomic(table, path)
    return PartResult(day, part, stop - start, int(r.label.sum()), r.hist.copy(),
                      str(path.relative_to(out)), shards.sha256_file(path))


def write_tsv_day(config: SynthConfig, out: str, day: int,
                  cal: Calibration | None = None) -> PartResult:
    """Generate one day as a Criteo text file `day_N` (the Terabyte naming), atomically."""
    path = Path(out) / f"day_{day}"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    hist = np.zeros((3, 2, _HIST_BINS), np.int64)
    positives = rows = 0
    with open(tmp, "wb") as f:
        for d, _, start, stop in _parts(config):
            if d != day:
                continue
            _, r = _generate(config, day, start, stop, reuse=True, cal=cal)
            f.write(_to_tsv(r))
            hist += r.hist
            positives += int(r.label.sum())
            rows += stop - start
    os.replace(tmp, path)
    return PartResult(day, 0, rows, positives, hist, path.name, shards.sha256_file(path))


def auc_from_histogram(pos: np.ndarray, neg: np.ndarray) -> float | None:
    """AUC of a score from per-bin positive and negative counts (bins in increasing score;
    ties within a bin count one half). None when a class is absent."""
    pos = np.asarray(pos, dtype=np.float64)
    neg = np.asarray(neg, dtype=np.float64)
    n_pos, n_neg = pos.sum(), neg.sum()
    if n_pos == 0 or n_neg == 0:
        return None
    neg_below = np.cumsum(neg) - neg
    return float((pos * (neg_below + 0.5 * neg)).sum() / (n_pos * n_neg))


def _split_summary(results: Sequence[PartResult]) -> dict[str, dict[str, Any]]:
    hist = sum(r.hist for r in results)
    # Log-loss from the binned logits: bins are 0.002 wide, far below what the figure needs.
    centre = _HIST_LO + (np.arange(_HIST_BINS) + 0.5) * (_HIST_HI - _HIST_LO) / _HIST_BINS
    loss = (hist[:, 1] * np.logaddexp(0.0, -centre) + hist[:, 0] * np.logaddexp(0.0, centre))
    loss = loss.sum(axis=1)
    out = {}
    for s, name in enumerate(_SPLITS):
        rows = int(hist[s].sum())
        out[name] = {
            "rows": rows,
            "positives": int(hist[s, 1].sum()),
            "teacher_auc": auc_from_histogram(hist[s, 1], hist[s, 0]),
            "teacher_logloss": float(loss[s] / rows) if rows else None,
        }
    return out


def _run_tasks(
    fn: Callable[..., PartResult], calls: list[tuple], use_ray: bool, progress: bool,
) -> list[PartResult]:
    from tqdm import tqdm

    bar = tqdm(total=len(calls), desc="synthetic parts", unit="part", disable=not progress)
    results: list[PartResult] = []
    if use_ray:
        import ray

        remote = ray.remote(num_cpus=1)(fn)
        pending = [remote.remote(*c) for c in calls]
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            results.extend(ray.get(done))
            bar.update(len(done))
    else:
        for c in calls:
            results.append(fn(*c))
            bar.update(1)
    bar.close()
    return sorted(results, key=lambda r: (r.day, r.part))


def generate(
    config: SynthConfig,
    out: str | Path,
    fmt: str = PARQUET_FORMAT,
    *,
    use_ray: bool | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Write a synthetic dataset under `out` and return its manifest.

    Parquet: `day=N/part-XXXXX.parquet` shards and `manifest.json` (written last), the same
    layout as converted real data. TSV: Criteo text files `day_N` (label, I1..I13, C1..C26,
    hex as 8 lowercase digits, empty when missing) and `synthetic.json`, for the converter.
    Parts (Parquet) or days (TSV) run as Ray tasks when Ray is initialised (or `use_ray`).
    """
    if fmt not in (PARQUET_FORMAT, TSV_FORMAT):
        raise ValueError(f"format must be {PARQUET_FORMAT!r} or {TSV_FORMAT!r}, got {fmt!r}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    # A manifest left from an earlier run would vouch for a folder being rewritten.
    (out / (shards.MANIFEST if fmt == PARQUET_FORMAT else SYNTHETIC_JSON)).unlink(missing_ok=True)
    if use_ray is None:
        import ray

        use_ray = ray.is_initialized()
    t0 = time.perf_counter()
    cal = _calibrate(_teacher_fields(config))  # once here and sent along, not once per task
    if fmt == PARQUET_FORMAT:
        calls = [(config, str(out), *p, cal) for p in _parts(config)]
        results = _run_tasks(write_part, calls, use_ray, progress)
    else:
        calls = [(config, str(out), d, cal) for d in range(config.days)]
        results = _run_tasks(write_tsv_day, calls, use_ray, progress)
    seconds = time.perf_counter() - t0
    manifest = _manifest(config, fmt, results, cal, seconds)
    shards.write_json_atomic(manifest, out / (shards.MANIFEST if fmt == PARQUET_FORMAT
                                              else SYNTHETIC_JSON))
    return manifest


def _manifest(config: SynthConfig, fmt: str, results: Sequence[PartResult], cal: Calibration,
              seconds: float) -> dict[str, Any]:
    days: dict[str, Any] = {}
    for r in results:
        d = days.setdefault(str(r.day), {"rows": 0, "positives": 0, "files": []})
        d["rows"] += r.rows
        d["positives"] += r.positives
        d["files"].append({"path": r.path, "rows": r.rows, "sha256": r.sha256})
    splits = _split_summary(results)
    rows = sum(r.rows for r in results)
    positives = sum(r.positives for r in results)
    return {
        "schema_version": SCHEMA_VERSION,
        "source": "synthetic",
        "format": fmt,
        "labelled": True,
        "columns": [LABEL, *DENSE_COLUMNS, *SPARSE_COLUMNS],
        "rows": rows,
        "positives": positives,
        "rejects": 0,
        "days": days,
        "splits": splits,
        "synthetic": {
            "params": asdict(config),
            "cardinalities": dict(zip(SPARSE_COLUMNS, scaled_cardinalities(config.scale),
                                      strict=True)),
            "teacher_auc": {k: v["teacher_auc"] for k, v in splits.items()},
            "teacher_logloss": {k: v["teacher_logloss"] for k, v in splits.items()},
            "calibration": asdict(cal),
            "rarity": {"knee": RARITY_KNEE, "power": RARITY_POWER},
            "positive_rate": positives / rows,
            "seconds": round(seconds, 3),
        },
    }
