"""Instruments for testing recovery: a failure injected once at a chosen step, and a
fingerprint of every trained row that shows a resumed run saw each sample exactly once."""

from __future__ import annotations

import time

import torch

from idhash.splitmix import hash64
from training.settings import FaultSettings

# Fingerprints are summed over workers in int64: the modulus leaves room for 128 of them.
FINGERPRINT_MOD = 1 << 56


def row_fingerprint(sparse: torch.Tensor) -> int:
    """Sum over rows of a hash of the row's ids: equal sums ⇒ (almost surely) equal row sets."""
    h = torch.zeros(sparse.shape[0], dtype=torch.int64, device=sparse.device)
    for j in range(sparse.shape[1]):
        h = hash64(h ^ sparse[:, j], seed=j)
    return int(h.remainder(1 << 40).sum().item())


def add_rows(fingerprint: int, sparse: torch.Tensor) -> int:
    """`fingerprint` with the rows of `sparse` added in."""
    return (fingerprint + row_fingerprint(sparse)) % FINGERPRINT_MOD


def inject_fault(fault: FaultSettings | None, step: int, rank: int) -> None:
    """Raise once, on `fault.rank` at `fault.step`; the marker file keeps it from firing
    again after the restart."""
    if fault is None or step != fault.step or rank != fault.rank or fault.marker.exists():
        return
    fault.marker.write_text(f"failed at step {step}\n")
    if fault.kind == "hang":
        while True:  # as a worker stuck in a collective or a read: alive, doing nothing
            time.sleep(60)
    raise RuntimeError(f"injected failure at step {step}")
