"""MLET (Deng et al., "Learning to Embed Categorical Features without Embedding Tables"):
train a k-wide method followed by a k×d projection (k > d), serve it collapsed to d wide.

The projection itself lives in `CompressedEmbedding` (base.py), which folds it into every
table at collapse; this module is the composition rule: which base methods MLET may wrap,
with which widths, and the refusal of QR by product. Every method config checks it
(`MethodConfig.check`), so it depends on nothing of the methods; every registered method,
CAFE and learned hashing included, composes through `with_mlet` (in base.py, next to the
registry it reads).
"""

from __future__ import annotations

from embeddings.mapping import Combiner

# k/d range the paper explores; wider buys nothing and narrower is barely MLET.
MLET_MIN_RATIO = 2
MLET_MAX_RATIO = 16

_NONLINEAR = (
    "MLET cannot follow {method} with a {combiner} combiner: the k→d projection folds into "
    "the tables only through a linear combiner (sum or concat), since (a⊙b)·P ≠ (a·P)⊙(b·P); "
    "choose a sum or concat combiner (QR's operation 'sum' or 'concat') or drop mlet_dim"
)


def nonlinear_refusal(method: str, combiner: Combiner) -> str:
    """The message that refuses MLET over a non-linear combiner, and says why."""
    return _NONLINEAR.format(method=method, combiner=combiner.value)


def check_mlet(method: str, combiner: Combiner, dim: int, mlet_dim: int | None) -> None:
    """Raise ValueError unless `mlet_dim` is None or a valid MLET width over this base."""
    if mlet_dim is None:
        return
    if combiner is Combiner.PRODUCT:
        raise ValueError(nonlinear_refusal(method, combiner))
    if mlet_dim % dim or not MLET_MIN_RATIO <= mlet_dim // dim <= MLET_MAX_RATIO:
        raise ValueError(
            f"mlet_dim k={mlet_dim} must be a multiple of d={dim} with k/d from "
            f"{MLET_MIN_RATIO} to {MLET_MAX_RATIO}"
        )
