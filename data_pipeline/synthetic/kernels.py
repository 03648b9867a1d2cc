"""The row generator's numba kernels: counter-based random numbers, so row r of day d never
depends on other rows, and the teacher's parameters hashed rather than stored.

Every random number is `mix64` (the one hash, `idhash.splitmix`) of a seeded stream key plus
the row's counter; the 32-bit scramble of items and the draws built on a hash are this
generator's own and fixed forever: the same seed gives the same bytes.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from numba import njit

from idhash.splitmix import GOLDEN_U64 as _GOLDEN
from idhash.splitmix import M2_U64 as _M2
from idhash.splitmix import mix64_scalar as _mix

# Teacher latent vectors: LATENT_DIM values, multiples of 1/LATENT_STEPS (int8, ±127: ~4
# sigma of range). Eight values make one 64-bit word (see `latent`).
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
# Teacher logits are binned for AUC: 16k bins over [-16, 16] make the binning error < 1e-4.
HIST_BINS = 1 << 14
HIST_LO, HIST_HI = -16.0, 16.0
# Rows generated together: each feature's tables (alias, latents, quantiles: up to ~1.5 MB)
# then stay in L2 for thousands of rows; with 1k-row tiles all 26 features' tables cycled
# through the cache every tile (~35% slower).
TILE_ROWS = 16384

_U = np.uint64
_M32 = _U(0xFFFFFFFF)
_F1 = _U(0x85EBCA6B)
_F2 = _U(0xC2B2AE35)
_S11, _S13, _S16, _S27, _S30, _S31, _S32 = (_U(s) for s in (11, 13, 16, 27, 30, 31, 32))
_INV53 = 1.0 / 9007199254740992.0
_INV16 = 1.0 / 65536.0
_SQRT3 = math.sqrt(3.0)


class Popularity(NamedTuple):
    """Per categorical feature (column order): how a value is drawn and named.

    alias: alias tables over (head ranks, tail, missing), concatenated (`al_off`, `al_len`);
    head: tabulated ranks (outcome `head` = the tail, `head + 1` = missing); tail_a/b/e: the
    tail's power-law inverse CDF; shift: the day's drift of the ranking; value_keys: the keys
    of the item → value scramble.
    """

    card: np.ndarray
    shift: np.ndarray
    alias: np.ndarray
    al_off: np.ndarray
    al_len: np.ndarray
    head: np.ndarray
    tail_a: np.ndarray
    tail_b: np.ndarray
    tail_e: np.ndarray
    value_keys: np.ndarray


class Latents(NamedTuple):
    """The teacher's item parameters: hashed from `keys`, tabulated by rank for the first
    `rows` ranks of each feature (at `offsets`) as the two words of `latent`."""

    keys: np.ndarray
    rows: np.ndarray
    offsets: np.ndarray
    vec: np.ndarray
    norm_w: np.ndarray


class DenseLaw(NamedTuple):
    """Per dense feature: missing/zero/negative thresholds (`thr`), the quantile table of its
    positive counts (`q_val`, their log1p `q_t`), and the teacher's weight (`beta`), centre and
    projection into the latent space (`proj`)."""

    thr: np.ndarray
    q_val: np.ndarray
    q_t: np.ndarray
    beta: np.ndarray
    center: np.ndarray
    proj: np.ndarray


class Teacher(NamedTuple):
    """The calibrated logit: bias + a_lin * first-order + a_pair * pairwise; and the rows where
    the validation and test splits start (for the logit histograms)."""

    a_lin: float
    a_pair: float
    bias: float
    val_start: np.int64
    test_start: np.int64


class Rows(NamedTuple):
    """Generated rows, column-major, and per-row teacher terms and logit histograms."""

    label: np.ndarray
    dense: np.ndarray
    dense_ok: np.ndarray
    cat: np.ndarray
    cat_ok: np.ndarray
    lin: np.ndarray
    pair: np.ndarray
    hist: np.ndarray  # [split, label, bin] counts of teacher logits


@njit(inline="always")
def uniform(h):
    return float(h >> _S11) * _INV53


@njit(inline="always")
def _gauss(h):
    # Irwin-Hall of four 16-bit uniforms: near-Gaussian, unit variance, one hash per draw.
    s = float(h & _U(0xFFFF)) + float((h >> _S16) & _U(0xFFFF))
    s += float((h >> _S32) & _U(0xFFFF)) + float(h >> _U(48))
    return (s * _INV16 - 2.0) * _SQRT3


@njit(inline="always")
def scramble32(item, key):
    """Bijection of [0, 2^32): add a key, then murmur3's fmix32 (xor-shifts and odd multipliers
    are invertible mod 2^32), then xor a second key. Distinct items → distinct values."""
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
def rarity_scale(rank):
    return (1.0 + rank * (1.0 / RARITY_KNEE)) ** -RARITY_POWER


@njit(inline="always")
def latent(feature_key, item, rank):
    """An item's teacher parameters, hashed from (feature, item) and scaled by its popularity
    `rank` that day (`rarity_scale`), in two words.

    Latent values are int8 multiples of 1/LATENT_STEPS. Word 1 holds the 8 latent values,
    byte q = value q + 128; word 2 the squared norm (low 32 bits) and the first-order weight
    + 128 (high bits). Biased bytes let a row's sums run as plain 64-bit additions with the
    bytes spread into 16-bit lanes (26 features × 255 < 2^16: no lane overflows), and integer
    sums are exact: the same bits on every machine, whatever its vector width.
    """
    base = feature_key + _U(item) * _GOLDEN
    scale = rarity_scale(rank)
    packed = _U(0)
    nsq = _U(0)
    for q in range(LATENT_DIM):
        x = _quantised_gauss(_mix(base + _U(q + 1) * _M2), scale)
        packed |= _U(x + 128) << _U(8 * q)
        nsq += _U(x * x)
    w = _quantised_gauss(_mix(base), scale)
    return packed, nsq | (_U(w + 128) << _S32)


@njit(cache=True, nogil=True)
def latent_table(feature_keys, rows, offsets, card, shift):
    # Indexed by popularity rank: row r holds the item at rank r on a day whose ranking is
    # moved by `shift` (drift), at rank r's strength, so the hot set stays strong as it moves.
    total = offsets[-1]
    vec = np.empty(total, dtype=np.uint64)
    norm_w = np.empty(total, dtype=np.uint64)
    for f in range(feature_keys.shape[0]):
        for i in range(rows[f]):
            item = (i + shift[f]) % card[f]
            vec[offsets[f] + i], norm_w[offsets[f] + i] = latent(feature_keys[f], item, i)
    return vec, norm_w


@njit(cache=True, nogil=True)
def alias_table(probs):
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


# ---------------------------------------------------------------------------------------------
# One tile of rows. Column-major inside a tile: each inner loop runs over independent rows, so
# the CPU overlaps their hashes and loads. The hashes run in a loop of their own, which the
# compiler vectorises. Selects instead of branches (missing or not, alias or not) because those
# are coin flips the branch predictor cannot learn. Indices are unsigned: numba then skips its
# negative-index wraparound, which otherwise costs as much as the work itself.


@njit(cache=True, nogil=True)
def fill_rows(day_key, row0, pop, lat, law, teacher, out):
    """Rows [row0, row0 + len(out.label)) of the day keyed `day_key` into `out`."""
    n = out.label.shape[0]
    k = law.proj.shape[1]
    tile = TILE_ROWS
    rk = np.empty(tile, np.uint64)
    hh = np.empty(tile, np.uint64)
    # Per-row sums of the categorical parameters, in the lanes of `latent`'s words: latent
    # values 0, 2, 4, 6; values 1, 3, 5, 7; squared norms (bits 0-31), first-order weights
    # + 128 (32-47) and present features (48-63).
    acc_even = np.zeros(tile, np.uint64)
    acc_odd = np.zeros(tile, np.uint64)
    acc_nw = np.zeros(tile, np.uint64)
    dv = np.zeros(tile * k, np.float32)
    lin = np.zeros(tile, np.float32)
    n_cat = pop.card.shape[0]
    for t0 in range(0, n, tile):
        m = min(tile, n - t0)
        for i in range(m):
            rk[i] = _mix(day_key + _U(row0 + t0 + i) * _GOLDEN)
        acc_even[:] = 0
        acc_odd[:] = 0
        acc_nw[:] = 0
        dv[:] = 0.0
        lin[:] = 0.0
        for f in range(n_cat):
            _categorical_column(f, t0, m, rk, hh, pop, lat, out, acc_even, acc_odd, acc_nw)
        for jd in range(law.q_val.shape[0]):
            _dense_column(jd, _U(n_cat + jd + 1) * _GOLDEN, t0, m, rk, hh, law, out, lin, dv)
        stream = _U(n_cat + law.q_val.shape[0] + 1) * _GOLDEN
        _label_rows(stream, row0, t0, m, k, rk, acc_even, acc_odd, acc_nw, dv, lin, teacher,
                    out)


@njit(inline="always")
def _draw_rank(h, tail_key, alias, off, size, h_f, n_f, tail_a, tail_b, tail_e):
    """(rank outcome, present) of a feature for a row's hash `h`: alias-drawn head rank, the
    tail (power-law inverse CDF from a second hash), or missing (outcome head + 1).

    The feature's scalars come as arguments: loaded once per tile, not once per row (numba
    cannot prove the row loop's stores leave them unchanged)."""
    j = ((h & _M32) * size) >> _S32
    e = alias[off + j]
    j = np.int64(j if (h >> _S32) < (e & _M32) else e >> _S32)
    if j != h_f:
        return j, j < h_f
    u = uniform(_mix(tail_key))
    x = tail_a * math.exp(u * tail_b) if tail_e == 0.0 else (tail_a + u * tail_b) ** tail_e
    return min(max(np.int64(x + 0.5) - 1, h_f), n_f - 1), True


@njit(cache=True, nogil=True)
def _categorical_column(f, t0, m, rk, hh, pop, lat, out, acc_even, acc_odd, acc_nw):
    """Feature f's values of one tile, and their teacher parameters added to the row sums."""
    stream = _U(f + 1) * _GOLDEN
    off = _U(pop.al_off[f])
    size = _U(pop.al_len[f])
    h_f = pop.head[f]
    n_f = pop.card[f]
    tail_a, tail_b, tail_e = pop.tail_a[f], pop.tail_b[f], pop.tail_e[f]
    alias = pop.alias
    key = pop.value_keys[f]
    s_f = pop.shift[f]
    lat_lo = lat.offsets[f]
    lat_hi = lat.rows[f]
    lanes = _U(0x00FF00FF00FF00FF)
    one_present = _U(1 << 48)
    for i in range(m):
        hh[i] = _mix(rk[i] + stream)
    for i in range(m):
        j, present = _draw_rank(hh[i], rk[i] + stream + _M2, alias, off, size, h_f, n_f,
                                tail_a, tail_b, tail_e)
        rank = min(j, n_f - 1)
        item = rank + s_f
        item = item - n_f if item >= n_f else item
        r = _U(t0 + i)
        out.cat[f, r] = np.int64(scramble32(item, key)) if present else 0
        out.cat_ok[f, r] = present
        if rank < lat_hi:  # the day's table is indexed by rank
            lr = _U(lat_lo + rank)
            vec, nw = lat.vec[lr], lat.norm_w[lr]
        else:  # beyond the table (Terabyte-sized features): hash it now
            vec, nw = latent(lat.keys[f], item, rank)
        vec = vec if present else _U(0)
        ui = _U(i)
        acc_even[ui] += vec & lanes
        acc_odd[ui] += (vec >> _U(8)) & lanes
        acc_nw[ui] += (nw + one_present) if present else _U(0)


@njit(cache=True, nogil=True)
def _dense_column(jd, stream, t0, m, rk, hh, law, out, lin, dv):
    """Dense feature jd's values of one tile, and its teacher terms added to the row sums."""
    k = law.proj.shape[1]
    uk = _U(k)
    q_n = _U(law.q_val.shape[1])
    zero = np.float32(0.0)
    th_miss, th_zero, th_neg = law.thr[jd, 0], law.thr[jd, 1], law.thr[jd, 2]
    beta = np.float32(law.beta[jd])
    center = np.float32(law.center[jd])
    for i in range(m):
        hh[i] = _mix(rk[i] + stream)
    for i in range(m):
        h = hh[i]
        lo = h & _M32
        hi = h >> _S32
        qi = (hi * q_n) >> _S32
        positive = lo >= th_neg
        val = law.q_val[jd, qi] if positive else (
            (-1 - np.int32(hi & _U(1))) if lo >= th_zero else np.int32(0))
        r = _U(t0 + i)
        out.dense[jd, r] = val
        out.dense_ok[jd, r] = lo >= th_miss
        t = (law.q_t[jd, qi] if positive else zero) - center
        ui = _U(i)
        lin[ui] += beta * t
        for q in range(k):
            uq = _U(q)
            dv[ui * uk + uq] += law.proj[jd, uq] * t


@njit(cache=True, nogil=True)
def _label_rows(stream, row0, t0, m, k, rk, acc_even, acc_odd, acc_nw, dv, lin, teacher, out):
    """Each row's teacher terms, its label, and its logit counted in the split's histogram.

    FM identity: all pairs of categorical latents, plus each against the dense projection
    (DLRM's dense-sparse interaction)."""
    uk = _U(k)
    step = np.float32(1.0 / LATENT_STEPS)
    step2 = np.float32(1.0 / (LATENT_STEPS * LATENT_STEPS))
    n_bins = out.hist.shape[2]
    bin_scale = n_bins / (HIST_HI - HIST_LO)
    for i in range(m):
        ss = np.int64(0)
        sd = np.float32(0.0)
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
        out.lin[r] = lin_i
        out.pair[r] = pair
        logit = teacher.bias + teacher.a_lin * lin_i + teacher.a_pair * pair
        y = uniform(_mix(rk[i] + stream)) < 1.0 / (1.0 + math.exp(-logit))
        out.label[r] = 1 if y else 0
        row = row0 + t0 + i
        split = 0 if row < teacher.val_start else (1 if row < teacher.test_start else 2)
        b = min(max(int((logit - HIST_LO) * bin_scale), 0), n_bins - 1)
        out.hist[split, out.label[r], b] += 1
