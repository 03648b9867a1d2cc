"""The space a search draws trials from: methods with their own fields, MLET, ratio, width,
learning rates and export quantisation, each a range, a list of choices or a fixed value.

A space is checked when it is read, by building every method at every extreme it can draw,
so an impossible trial fails before the search starts rather than an hour into it.
"""

from __future__ import annotations

import math
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

import embeddings.collection  # noqa: F401 - imports every method module: all register
from embeddings.budget import EXPORT_QUANTIZE
from embeddings.methods.base import METHODS, MethodConfig, TwoStageConfig, with_mlet
from embeddings.methods.mlet import MLET_MAX_RATIO, MLET_MIN_RATIO

# Method fields the search sets itself for every method (`ratio`, `mlet`), or that would
# fight the shared ratio (a fixed size) or the optimizer (sparse gradients).
SHARED_FIELDS = frozenset({"method", "mlet_dim", "ratio", "rows", "collisions", "sparse"})
# A feature this large is compressed at any ratio the search tries, so checking each
# method at it exercises the method's own rules (QR's concat halves, MLET widths).
_PROBE_VALUES = 1_000_000


class FrozenSection(BaseModel):
    """A config section that refuses unknown fields and does not change once read."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Range(FrozenSection):
    """A numeric interval the search samples from.

    Args:
        low: smallest value (inclusive).
        high: largest value (inclusive).
        log: sample uniformly in log space (learning rates, ratios).
        integer: whole numbers only.
    """

    low: float
    high: float
    log: bool = False
    integer: bool = False

    @model_validator(mode="after")
    def _ordered(self) -> Range:
        if not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError(f"a log range needs low > 0, got {self.low}")
        return self

    def ends(self) -> list[float | int]:
        if self.integer:
            return [math.ceil(self.low), math.floor(self.high)]
        return [self.low, self.high]


# One searched setting: a range, a list of choices, or a fixed value.
Param = Range | list[Any] | str | int | float | bool | None


def candidates(param: Param) -> list[Any]:
    """Values worth checking up front: a range's ends, every choice, or the fixed value."""
    if isinstance(param, Range):
        return param.ends()
    if isinstance(param, list):
        return list(param)
    return [param]


def sample(trial: Any, name: str, param: Param) -> Any:
    """Draw `param` from an Optuna trial (define-by-run); fixed values are not drawn."""
    if isinstance(param, Range):
        if param.integer:
            low, high = param.ends()
            return trial.suggest_int(name, int(low), int(high), log=param.log)
        return trial.suggest_float(name, param.low, param.high, log=param.log)
    if isinstance(param, list):
        return param[0] if len(param) == 1 else trial.suggest_categorical(name, param)
    return param


def first_line(e: Exception) -> str:
    """A validation error in one line: pydantic's messages joined, or the first line."""
    if isinstance(e, ValidationError):
        return "; ".join(err["msg"] for err in e.errors())
    return str(e).splitlines()[0]


def _choices(values: list[Any], name: str) -> list[Any]:
    if not values:
        raise ValueError(f"{name}: give at least one choice")
    if len(set(map(repr, values))) != len(values):
        raise ValueError(f"{name}: choices repeat: {values}")
    return values


def _check_all(param: Param, ok: Any, message: str) -> None:
    """Raise `message` (formatted with the value) for the first candidate `ok` refuses."""
    for value in candidates(param):
        if not ok(value):
            raise ValueError(message.format(value=value))


class SearchSpace(FrozenSection):
    """What each trial may vary. Settings are a range (`{low, high, log}`), a list of
    choices, or one fixed value.

    Args:
        methods: compression method name (embeddings/methods: hash, qr, cafe, learned_hash,
            scma, mpe, full; lowrank and the other two-stage methods with the config's
            from_model, the ratio then against the trained model's tables) → the method's own
            fields to search, e.g. `cafe: {hash_share: {low: 0.2, high: 0.8}, threshold: [50,
            500]}`, `qr: {operation: [sum, concat]}`; `{}` searches the method with its
            defaults. Size fields are not searched per method: `ratio` sizes every method.
            Two-stage methods (lowrank, mec: `{codebook_size: [256, 4096],
            perplexity_weight: [0, 1]}`) are built from the trained model the search names,
            so they are not in the default.
        mlet: MLET's k/d to try, each 2..16; 0 trains without MLET. A trial whose method
            refuses MLET (QR by product combines tables non-linearly; MPE's codes would
            not survive the fold) never gets MLET.
        ratio: compression ratio of every feature (features with at most 2000 / ratio
            values stay uncompressed, as in the training job).
        embedding_dim: width d of every embedding (the model follows; a DLRM's bottom MLP
            ends in d).
        sparse_lr: learning rate of the embedding tables' row-wise optimizer.
        dense_lr: Adam's learning rate on the MLPs and MLET projections.
        quantize: storage of the exported serving tables (none = fp32, fp16, int8, int4).
    """

    methods: dict[str, dict[str, Param]] = Field(
        default_factory=lambda: {"hash": {}, "qr": {"operation": ["sum", "concat"]},
                                 "cafe": {}, "learned_hash": {}, "scma": {},
                                 "mpe": {}},
        min_length=1,
    )
    mlet: list[int] = Field(default_factory=lambda: [0, 2])
    ratio: Param = Field(default_factory=lambda: Range(low=10, high=1000, log=True))
    embedding_dim: Param = 16
    sparse_lr: Param = 0.05
    dense_lr: Param = 1e-3
    quantize: Param = "none"

    @model_validator(mode="after")
    def _valid(self) -> SearchSpace:
        for name, fields in self.methods.items():
            _check_method_fields(name, fields)
        for k in _choices(self.mlet, "mlet"):
            if k and not MLET_MIN_RATIO <= k <= MLET_MAX_RATIO:
                raise ValueError(f"mlet: k/d must be 0 (no MLET) or {MLET_MIN_RATIO}.."
                                 f"{MLET_MAX_RATIO}, got {k}")
        _check_all(self.ratio, lambda r: isinstance(r, (int, float)) and r >= 1,
                   "ratio: every compression ratio must be ≥ 1, got {value!r}")
        _check_all(self.embedding_dim, lambda d: isinstance(d, int) and d >= 1,
                   "embedding_dim: must be whole and ≥ 1, got {value!r}")
        for field in ("sparse_lr", "dense_lr"):
            _check_all(getattr(self, field), lambda lr: isinstance(lr, (int, float)) and lr > 0,
                       field + ": learning rates must be > 0, got {value!r}")
        _check_all(self.quantize, lambda fmt: fmt in EXPORT_QUANTIZE,
                   "quantize: {value!r} is not one of " + str(list(EXPORT_QUANTIZE)))
        self._check_combinations()
        return self

    def _check_combinations(self) -> None:
        """Build every method at every extreme of its fields, width and MLET: a space that
        could draw an impossible trial fails here, not an hour into the search."""
        for name, fields in self.methods.items():
            variants: list[dict[str, Any]] = [{}]
            for field, param in fields.items():
                variants = [{**v, field: value} for v in variants for value in candidates(param)]
            for values in variants:
                for dim in candidates(self.embedding_dim):
                    for k in self.mlet:
                        where = f"methods.{name} {values or ''} at d={dim}, mlet {k}"
                        try:
                            self._check_one(name, values, int(dim), k)
                        except (ValidationError, ValueError) as e:
                            raise ValueError(f"{where}: {first_line(e)}") from None

    def _check_one(self, name: str, values: dict[str, Any], dim: int, k: int) -> None:
        """Build one method config at every candidate ratio (MLET of k·dim on top)."""
        config = METHODS[name].model_validate({"method": name, **values})
        if k and not takes_mlet(config):
            return  # the sampler leaves MLET off for these
        if k:
            config = with_mlet(config, k * dim)
        for ratio in candidates(self.ratio):
            config.at_ratio(float(ratio)).check(_PROBE_VALUES, dim)

    def draw(self, trial: Any) -> dict[str, Any]:
        """One point of the space from an Optuna trial: a flat dict of plain values.

        Keys: method, <method>.<field> for that method's searched fields, mlet, ratio,
        embedding_dim, sparse_lr, dense_lr, quantize. Conditional settings use their own
        names, so Optuna sees one fixed distribution per name.
        """
        methods = list(self.methods)
        method = sample(trial, "method", methods)
        point: dict[str, Any] = {"method": method}
        for field, param in self.methods[method].items():
            point[f"{method}.{field}"] = sample(trial, f"{method}.{field}", param)
        config = METHODS[method].model_validate(
            {"method": method, **{f: point[f"{method}.{f}"] for f in self.methods[method]}})
        point["mlet"] = sample(trial, "mlet", self.mlet) if takes_mlet(config) else 0
        for name in ("ratio", "embedding_dim", "sparse_lr", "dense_lr", "quantize"):
            point[name] = sample(trial, name, getattr(self, name))
        return point


def takes_mlet(config: MethodConfig) -> bool:
    """Whether MLET may follow this method: one that accepts it (a linear combiner, a serving
    form it folds into), and not a two-stage method (low-rank holds its own k→d projection;
    two-stage methods are shaped by their trained model)."""
    return config.accepts_mlet() and not isinstance(config, TwoStageConfig)


def _check_method_fields(name: str, fields: dict[str, Param]) -> None:
    """A method the registry knows, searched only over fields of its own."""
    if name not in METHODS:
        raise ValueError(f"methods.{name}: unknown method; known: {sorted(METHODS)}")
    known = set(METHODS[name].model_fields) - SHARED_FIELDS
    for field, param in fields.items():
        if field in SHARED_FIELDS:
            raise ValueError(f"methods.{name}.{field}: set by the search for every "
                             "method (ratio, mlet); remove it here")
        if field not in known:
            raise ValueError(f"methods.{name}.{field}: no such field of {name}; "
                             f"searchable: {sorted(known)}")
        if isinstance(param, list):
            _choices(param, f"methods.{name}.{field}")
