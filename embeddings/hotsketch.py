"""HotSketch: CAFE's bounded-memory ranking of feature ids by importance, with hot-row slots.

CAFE (Zhang et al., SIGMOD 2024) gives the most important ids of a feature rows of their own
and lets the rest share hash rows; which ids are "most important" changes while training, so a
small sketch keeps a running score per candidate id and hands out / takes back hot rows. The
sketch update is sequential per id, so it runs as numba kernels over numpy arrays; a batch is
pre-aggregated (one insert per distinct id) before the kernel sees it.

Layout: `buckets` × `slots` (4) entries of (id, score, hot row), bucket = hash(id). Slots of
a bucket stay sorted by score, descending; score 0 marks an empty slot. Every array starts
as zeros (hot rows are stored +1, 0 = none; never-used rows are counted, not listed), so a
sketch built only to count bytes (a meta-device build) maps no memory.

Two differences from the artifact's C++ sketch, both there to rank the true top ids instead
of the first-come ones:

- A miss into a full bucket takes over the lowest non-hot slot with probability
  s / (s_min + s) and then scores s_min + s (randomised admission of SpaceSaving). The
  artifact always takes the slot over, so every bucket's last slot churns and its inflated
  score promotes whichever light id happens to sit there.
- The adaptive threshold of CAFE+: when more than 1.2 × hot-rows ids score above the
  threshold, all slots are re-ranked, the top `hot_rows` get the hot rows and the threshold
  becomes the score of the last of them. It decays with the scores and never falls below
  the configured threshold.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numba as nb
import numpy as np
import torch

from idhash.splitmix import GOLDEN_U64, hash64, mix64_scalar

SLOTS = 4
PROMOTE = 1
DEMOTE = 2

# fstate / istate indices: scalars live in small arrays so kernels can update them in place.
_THRESHOLD, _MASS = 0, 1
# _NSTACK: rows on the free stack (given back); _FRESH: rows never handed out start here.
_NSTACK, _FRESH, _NABOVE, _RERANK_AT = 0, 1, 2, 3


# Columns of the event log the kernels write (one int64 row per event).
_KIND, _ID, _ROW, _MEDIUM, _HASH, _TAG = range(6)


def _log_column(column: int) -> property:
    """A read-only view of one column of the event log, as a property of `SketchEvents`."""
    return property(lambda self: self.log[:, column])


@dataclass
class SketchEvents:
    """Hot-row changes made by one update, in the order they happened.

    kind: PROMOTE / DEMOTE; ids; rows: the hot row taken or given back; medium: whether the
    id reads two hash rows on the hashed side of the move (just before a promotion, just
    after a demotion); hashes: the id's sketch hash and tags: the tag it was inserted with,
    both -1 where the event did not come from inserting the id (re-rank, decay).
    """

    log: np.ndarray

    kind = _log_column(_KIND)
    ids = _log_column(_ID)
    rows = _log_column(_ROW)
    hashes = _log_column(_HASH)
    tags = _log_column(_TAG)

    @property
    def medium(self) -> np.ndarray:
        return self.log[:, _MEDIUM].astype(np.bool_)

    def __len__(self) -> int:
        return int(self.log.shape[0])


@nb.njit(cache=True)
def _uniform(rng: np.ndarray) -> float:
    # SplitMix64 stream kept in the sketch so admission coins are reproducible and resumable.
    rng[0] += GOLDEN_U64
    return float(mix64_scalar(rng[0]) >> np.uint64(11)) * (1.0 / 9007199254740992.0)


@nb.njit(cache=True)
def _log(ev, n, kind, key, row, medium, hashed, tag):
    ev[n, _KIND] = kind
    ev[n, _ID] = key
    ev[n, _ROW] = row
    ev[n, _MEDIUM] = medium
    ev[n, _HASH] = hashed
    ev[n, _TAG] = tag
    return n + 1


@nb.njit(cache=True)
def _take_row(free, istate):
    if istate[_NSTACK] > 0:
        istate[_NSTACK] -= 1
        return free[istate[_NSTACK]]
    istate[_FRESH] += 1
    return istate[_FRESH] - 1


@nb.njit(cache=True)
def _give_row(free, istate, row):
    free[istate[_NSTACK]] = row
    istate[_NSTACK] += 1


@nb.njit(cache=True)
def _demote(keys, scores, rows, free, istate, b, k, medium_score, ev, n_ev):
    """Slot (b, k) fell below the threshold: free its hot row and log the demotion."""
    _give_row(free, istate, rows[b, k] - 1)
    n_ev = _log(ev, n_ev, DEMOTE, keys[b, k], rows[b, k] - 1, scores[b, k] >= medium_score,
                -1, -1)
    rows[b, k] = 0
    return n_ev


@nb.njit(cache=True)
def _count_above(scores: np.ndarray, threshold: float) -> int:
    c = 0
    for b in range(scores.shape[0]):
        for k in range(scores.shape[1]):
            if scores[b, k] > 0 and scores[b, k] >= threshold:
                c += 1
    return c


@nb.njit(cache=True, inline="always")
def _free_count(istate, hot_rows):
    """Hot rows not held by any id: the free stack plus the rows never handed out."""
    return istate[_NSTACK] + hot_rows - istate[_FRESH]


# The per-id helpers are inlined into the kernel (inline="always") and only read the sketch
# or draw a coin: as calls, or with the slot writes moved into them, the time per id grew by
# 15% to 2× (measured), so the writes stay in the kernel's loop.
@nb.njit(cache=True)
def _insert_kernel(
    keys: np.ndarray, scores: np.ndarray, rows: np.ndarray, free: np.ndarray,
    fstate: np.ndarray, istate: np.ndarray, rng: np.ndarray,
    hashes: np.ndarray, ids: np.ndarray, values: np.ndarray, tags: np.ndarray, start: int,
    ev: np.ndarray, base_threshold: float, medium_fraction: float, decay: float,
    decay_mass: float, adaptive: bool, hot_rows: int,
):
    """Insert ids[start:] in order; returns (next id, events written, finished).

    The event buffers are the caller's and never reallocated here (reassigning arrays inside
    the loop costs numba a reference count per iteration, tripling the time per id). When
    they are too small for what comes next, the kernel stops before it and the caller resumes
    from the returned index with a larger buffer: a pending re-rank or decay is implied by
    the state (ids above threshold, mass since decay), so resuming repeats nothing.
    """
    n_ev = 0
    n = ids.shape[0]
    for i in range(start, n + 1):
        rerank = adaptive and hot_rows > 0 and istate[_NABOVE] > istate[_RERANK_AT]
        if rerank or fstate[_MASS] >= decay_mass:
            n_ev, room = _upkeep(keys, scores, rows, free, fstate, istate, ev, n_ev, rerank,
                                 base_threshold, medium_fraction, decay, decay_mass, adaptive,
                                 hot_rows)
            if not room:
                return i, n_ev, False
        if i == n:
            break
        if n_ev == ev.shape[0]:
            return i, n_ev, False
        s = values[i]
        if not s > 0:
            continue
        b = hashes[i] % keys.shape[0]
        x = ids[i]
        thr = fstate[_THRESHOLD]
        fstate[_MASS] += s
        j = _find(keys, scores, b, x)
        old = 0.0
        if j >= 0:
            old = scores[b, j]
            scores[b, j] = old + s
        else:
            j = _victim(scores, rows, b)
            if j < 0 or _refused(rng, scores[b, j], s):
                continue
            low = scores[b, j]
            if low >= thr:
                istate[_NABOVE] -= 1
            keys[b, j] = x
            scores[b, j] = max(low, 0.0) + s
            rows[b, j] = 0
        j = _sift_up(keys, scores, rows, b, j)
        new = scores[b, j]
        if old < thr <= new:
            istate[_NABOVE] += 1
        if new >= thr and rows[b, j] == 0 and _free_count(istate, hot_rows) > 0:
            r = _take_row(free, istate)
            rows[b, j] = r + 1
            n_ev = _log(ev, n_ev, PROMOTE, x, r, old >= medium_fraction * thr, hashes[i], tags[i])
    return n, n_ev, True


@nb.njit(cache=True)
def _upkeep(keys, scores, rows, free, fstate, istate, ev, n_ev, rerank, base_threshold,
            medium_fraction, decay, decay_mass, adaptive, hot_rows):
    """The re-rank (when `rerank`) and the decay that are due; (events written, whether the
    buffer had room: without it, what needed the room did not run)."""
    cap = ev.shape[0]
    if rerank:
        if cap - n_ev < 2 * hot_rows:
            return n_ev, False
        n_ev = _rerank(keys, scores, rows, free, fstate, istate, base_threshold,
                       medium_fraction, hot_rows, ev, n_ev)
        # Ties at the new threshold may leave more than 1.2 × hot rows above it; wait for
        # a fifth of the hot rows' worth of new arrivals rather than re-rank every id.
        istate[_RERANK_AT] = max(math.ceil(1.2 * hot_rows),
                                 istate[_NABOVE] + math.ceil(0.2 * hot_rows))
    if fstate[_MASS] >= decay_mass:
        if cap - n_ev < hot_rows:
            return n_ev, False
        n_ev = _decay(keys, scores, rows, free, fstate, istate, base_threshold,
                      medium_fraction, decay, adaptive, ev, n_ev)
    return n_ev, True


@nb.njit(cache=True, inline="always")
def _find(keys, scores, b, x):
    """The slot of id x in bucket b, or -1."""
    for k in range(keys.shape[1]):
        if scores[b, k] > 0 and keys[b, k] == x:
            return k
    return -1


@nb.njit(cache=True, inline="always")
def _victim(scores, rows, b):
    """The slot a missed id may take in bucket b: the first empty one (they sit at the end,
    sorted, score 0), else the lowest non-hot one; -1 when all are hot."""
    for k in range(scores.shape[1] - 1, -1, -1):
        if scores[b, k] <= 0 or rows[b, k] == 0:
            return k
    return -1


@nb.njit(cache=True, inline="always")
def _refused(rng, low, s):
    """Whether a miss of score s leaves a slot scoring `low` to its id: with probability
    low / (low + s) when the slot is taken (see the module docstring), never when empty."""
    return low > 0 and _uniform(rng) * (low + s) >= s


@nb.njit(cache=True, inline="always")
def _sift_up(keys, scores, rows, b, j):
    """Move slot j of bucket b up to its place in the descending score order; its new slot."""
    while j > 0 and scores[b, j] > scores[b, j - 1]:
        keys[b, j], keys[b, j - 1] = keys[b, j - 1], keys[b, j]
        scores[b, j], scores[b, j - 1] = scores[b, j - 1], scores[b, j]
        rows[b, j], rows[b, j - 1] = rows[b, j - 1], rows[b, j]
        j -= 1
    return j


@nb.njit(cache=True)
def _decay(keys, scores, rows, free, fstate, istate, base_threshold, medium_fraction, decay,
           adaptive, ev, n_ev):
    fstate[_MASS] = 0.0
    # The adaptive threshold is a score, so it decays with them; the configured one is fixed.
    if adaptive:
        fstate[_THRESHOLD] = max(base_threshold, fstate[_THRESHOLD] * decay)
    thr = fstate[_THRESHOLD]
    for b in range(keys.shape[0]):
        for k in range(keys.shape[1]):
            if scores[b, k] > 0:
                scores[b, k] *= decay
                if rows[b, k] > 0 and scores[b, k] < thr:
                    n_ev = _demote(keys, scores, rows, free, istate, b, k,
                                   medium_fraction * thr, ev, n_ev)
    istate[_NABOVE] = _count_above(scores, thr)
    return n_ev


@nb.njit(cache=True)
def _rerank(keys, scores, rows, free, fstate, istate, base_threshold, medium_fraction, hot_rows,
            ev, n_ev):
    n_b, n_slots = keys.shape
    occupied = np.empty(n_b * n_slots, np.float32)
    m = 0
    for b in range(n_b):
        for k in range(n_slots):
            if scores[b, k] > 0:
                occupied[m] = scores[b, k]
                m += 1
    if m <= hot_rows:
        return n_ev
    thr = max(base_threshold, float(np.sort(occupied[:m])[m - hot_rows]))
    fstate[_THRESHOLD] = thr
    for b in range(n_b):
        for k in range(n_slots):
            if rows[b, k] > 0 and scores[b, k] < thr:
                n_ev = _demote(keys, scores, rows, free, istate, b, k,
                               medium_fraction * thr, ev, n_ev)
    # Fewer than hot_rows slots score above the new threshold, so those all get rows; ties
    # at it take what is left, in slot order.
    for tied in (False, True):
        n_ev = _promote_at(keys, scores, rows, free, istate, thr, tied, hot_rows, ev, n_ev)
    istate[_NABOVE] = _count_above(scores, thr)
    return n_ev


@nb.njit(cache=True)
def _promote_at(keys, scores, rows, free, istate, thr, tied, hot_rows, ev, n_ev):
    """Free hot rows to the slots scoring above `thr` (at it, if `tied`), in slot order."""
    for b in range(keys.shape[0]):
        for k in range(keys.shape[1]):
            if _free_count(istate, hot_rows) == 0:
                break
            above = scores[b, k] == thr if tied else scores[b, k] > thr
            if rows[b, k] == 0 and scores[b, k] > 0 and above:
                r = _take_row(free, istate)
                rows[b, k] = r + 1
                # Above the old threshold too (it only rises here): it read two hash rows.
                n_ev = _log(ev, n_ev, PROMOTE, keys[b, k], r, True, -1, -1)
    return n_ev


@nb.njit(cache=True)
def _aggregate_kernel(ids: np.ndarray, hashes: np.ndarray, values: np.ndarray, tags: np.ndarray):
    """Sum the values of duplicate ids (first-occurrence order; an id keeps its first hash
    and tag), by open addressing on the id's hash: linear in the batch, where sorting
    (torch.unique) costs several times more."""
    n = ids.shape[0]
    size = 16
    while size < 2 * n:
        size *= 2
    mask = size - 1
    table = np.full(size, -1, np.int64)
    out_ids = np.empty(n, np.int64)
    out_hash = np.empty(n, np.int64)
    out_val = np.zeros(n, np.float32)
    out_tag = np.empty(n, np.int64)
    m = 0
    for i in range(n):
        # High bits: the low ones already chose the sketch bucket.
        p = (hashes[i] >> 23) & mask
        while True:
            slot = table[p]
            if slot < 0:
                table[p] = m
                out_ids[m] = ids[i]
                out_hash[m] = hashes[i]
                out_val[m] = values[i]
                out_tag[m] = tags[i]
                m += 1
                break
            if out_ids[slot] == ids[i]:
                out_val[slot] += values[i]
                break
            p = (p + 1) & mask
    return out_ids[:m], out_hash[:m], out_val[:m], out_tag[:m]


@nb.njit(cache=True)
def _classify_kernel(
    keys: np.ndarray,
    scores: np.ndarray,
    rows: np.ndarray,
    hashes: np.ndarray,
    ids: np.ndarray,
    medium_threshold: float,
):
    n = ids.shape[0]
    hot = np.full(n, -1, np.int64)
    medium = np.zeros(n, np.bool_)
    for i in range(n):
        b = hashes[i] % keys.shape[0]
        for k in range(keys.shape[1]):
            sc = scores[b, k]
            if sc > 0 and keys[b, k] == ids[i]:
                if rows[b, k] > 0:
                    hot[i] = rows[b, k] - 1
                elif sc >= medium_threshold:
                    medium[i] = True
                break
    return hot, medium


class HotSketch:
    """Per-feature HotSketch with `hot_rows` hot rows to hand out.

    Args:
        buckets: sketch buckets (the artifact uses one per hot row).
        hot_rows: hot rows available; ids that hold one read the hot table.
        threshold: score at which an id takes a free hot row (the configured floor of the
            adaptive threshold).
        slots: entries per bucket (4 in CAFE).
        medium_fraction: ids scoring in [medium_fraction × threshold, threshold) are
            "medium" and read two hash rows.
        decay: every score is multiplied by it when the score mass inserted since the last
            decay reaches `buckets × threshold × decay_period`.
        adaptive: CAFE+'s re-ranking threshold (False = the artifact's first-come promotion).
        seed: seed of the bucket hash and of the admission coins.
    """

    def __init__(
        self,
        buckets: int,
        hot_rows: int,
        threshold: float,
        *,
        slots: int = SLOTS,
        medium_fraction: float = 0.2,
        decay: float = 0.99,
        decay_period: float = 10.0,
        adaptive: bool = True,
        seed: int = 0,
    ) -> None:
        if buckets < 1 or hot_rows < 0 or threshold <= 0:
            raise ValueError(f"bad sketch size: {buckets=} {hot_rows=} {threshold=}")
        self.buckets = buckets
        self.hot_rows = hot_rows
        self.base_threshold = float(threshold)
        self.slots = slots
        self.medium_fraction = medium_fraction
        self.decay = decay
        self.decay_mass = buckets * threshold * decay_period
        self.adaptive = adaptive
        self.seed = seed
        self.keys = np.zeros((buckets, slots), np.int64)
        self.scores = np.zeros((buckets, slots), np.float32)
        self.rows = np.zeros((buckets, slots), np.int32)  # hot row + 1; 0 = not hot
        self.free = np.zeros(hot_rows, np.int32)  # stack of rows given back
        self.fstate = np.array([threshold, 0.0], np.float64)
        self.istate = np.array([0, 0, 0, math.ceil(1.2 * hot_rows)], np.int64)
        self.rng = np.array([seed], np.uint64)

    # -- state -----------------------------------------------------------------------------

    def arrays(self) -> dict[str, np.ndarray]:
        """Every array the sketch holds: its exact memory, and what a checkpoint saves."""
        return {
            "keys": self.keys,
            "scores": self.scores,
            "rows": self.rows,
            "free": self.free,
            "fstate": self.fstate,
            "istate": self.istate,
            "rng": self.rng,
        }

    def load_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        for name, current in self.arrays().items():
            value = np.asarray(arrays[name], dtype=current.dtype)
            if value.shape != current.shape:
                raise ValueError(f"sketch array {name}: shape {value.shape} != {current.shape}")
            current[...] = value

    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays().values())

    @staticmethod
    def planned_nbytes(buckets: int, hot_rows: int, slots: int = SLOTS) -> int:
        """`nbytes()` of a sketch of this size, without building one."""
        per_slot = 8 + 4 + 4  # id int64, score float32, hot row int32
        return buckets * slots * per_slot + 4 * hot_rows + 2 * 8 + 4 * 8 + 8

    @property
    def threshold(self) -> float:
        return float(self.fstate[_THRESHOLD])

    @property
    def free_rows(self) -> int:
        return int(self.istate[_NSTACK] + self.hot_rows - self.istate[_FRESH])

    def hash(self, ids: torch.Tensor) -> np.ndarray:
        """The sketch's hash of each id (bucket = hash mod buckets); forward computes it once
        and hands it to the update after backward."""
        return hash64(ids.detach().to("cpu", torch.int64), self.seed).numpy()

    def hot_ids(self) -> np.ndarray:
        """Ids holding a hot row."""
        return self.keys[self.rows > 0]

    # -- update and lookup -----------------------------------------------------------------

    def insert(
        self, ids: torch.Tensor, scores: torch.Tensor, hashes: np.ndarray | None = None
    ) -> SketchEvents:
        """Insert ids with their scores in order, one at a time (no aggregation)."""
        ids = ids.detach().to("cpu", torch.int64).contiguous()
        values = scores.detach().to("cpu", torch.float32).contiguous().numpy()
        hashes = self.hash(ids) if hashes is None else hashes
        return self._insert(ids.numpy(), hashes, values, np.full(len(ids), -1, np.int64))

    def update(
        self, ids: torch.Tensor, scores: torch.Tensor, hashes: np.ndarray | None = None
    ) -> SketchEvents:
        """Insert a batch: duplicate ids are summed first, so the kernel runs once per id."""
        ids = ids.detach().to("cpu", torch.int64).reshape(-1).contiguous()
        values = scores.detach().to("cpu", torch.float32).reshape(-1).contiguous().numpy()
        hashes = self.hash(ids) if hashes is None else hashes
        return self.update_arrays(ids.numpy(), hashes, values)

    def update_arrays(
        self,
        ids: np.ndarray,
        hashes: np.ndarray,
        values: np.ndarray,
        tags: np.ndarray | None = None,
    ) -> SketchEvents:
        """`update` over numpy arrays (int64 ids and hashes, float32 scores): the training
        step's path, with no tensor conversions. `tags` (int64, one per id) come back on the
        events of the ids they were inserted with: a caller's precomputed per-id data."""
        tags = np.full(len(ids), -1, np.int64) if tags is None else tags
        return self._insert(*_aggregate_kernel(ids, hashes, values, tags))

    def _insert(
        self, keys: np.ndarray, hashes: np.ndarray, values: np.ndarray, tags: np.ndarray
    ) -> SketchEvents:
        parts: list[np.ndarray] = []
        cap, start = keys.shape[0] + 64, 0
        while True:
            log = np.empty((cap, 6), np.int64)
            start, n_ev, done = _insert_kernel(
                self.keys, self.scores, self.rows, self.free, self.fstate, self.istate,
                self.rng, hashes, keys, values, tags, start, log, self.base_threshold,
                self.medium_fraction, self.decay, self.decay_mass, self.adaptive, self.hot_rows,
            )
            parts.append(log[:n_ev])
            if done:
                break
            # Stopped for room: a re-rank or decay can log up to two events per hot row.
            cap = max(2 * cap, 2 * self.hot_rows + 64)
        return SketchEvents(parts[0] if len(parts) == 1 else np.concatenate(parts))

    def classify(
        self, ids: torch.Tensor, hashes: np.ndarray | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(hot row or -1, medium flag) for each id, as the sketch stands now."""
        ids = ids.detach().to("cpu", torch.int64).contiguous()
        hot, medium = _classify_kernel(
            self.keys,
            self.scores,
            self.rows,
            self.hash(ids) if hashes is None else hashes,
            ids.numpy(),
            self.medium_fraction * self.threshold,
        )
        return torch.from_numpy(hot), torch.from_numpy(medium)

    def _not_cold(self) -> np.ndarray:
        occupied = self.scores > 0
        hot = occupied & (self.rows > 0)
        # Compared in float64, as the classify kernel does (NumPy would round the bound to f32).
        bound = self.medium_fraction * self.threshold
        return hot | (occupied & (self.scores.astype(np.float64) >= bound))

    def frozen_size(self) -> int:
        """Ids `snapshot()` would list (hot or medium)."""
        return int(np.count_nonzero(self._not_cold()))

    def snapshot(self) -> tuple[np.ndarray, np.ndarray]:
        """Frozen mapping of every id that is not cold: sorted ids, hot row (-1 = medium)."""
        keep = self._not_cold()
        ids = self.keys[keep]
        rows = self.rows[keep] - 1
        order = np.argsort(ids, kind="stable")
        return ids[order], rows[order]
