"""Synthetic Criteo: the shard format and skew of the real logs, with labels from a known model.

Real Criteo cannot say how good a model could be; here a planted "teacher" makes every label,
so its own AUC is the ceiling any model can reach, and the data is as large as one wishes,
deterministic for a seed, and drifts across days on request.

How a row is made (everything is a pure function of (seed, day, row), so the bytes do not
depend on how rows are cut into parts or which process writes them):

* categorical C_f: a popularity rank from a Zipf law P(rank r) ~ (r + 1)^-s (exponent
  ``zipf_exponent``) over ``n_f`` values, ``n_f`` = the Terabyte cardinality times ``scale``
  (see `config.scaled_cardinalities`); drawn exactly by the alias method for the first 65,536 ranks,
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

Modules, in the order a row is made: `config` (what to generate), `kernels` (the numba
kernels and the arrays they share), `teacher` (the planted model's tables), `rows` (rows of a
day, and the calibration), `writers` (Parquet/TSV files, Ray tasks, the manifest).
"""

from __future__ import annotations

from data_pipeline.synthetic.config import (
    DEFAULT_PART_ROWS,
    DEFAULT_SCALE,
    PARQUET_FORMAT,
    SYNTHETIC_JSON,
    TSV_FORMAT,
    SynthConfig,
    scaled_cardinalities,
)
from data_pipeline.synthetic.rows import generate_rows, split_boundaries, teacher_logits
from data_pipeline.synthetic.teacher import Calibration
from data_pipeline.synthetic.writers import (
    PartResult,
    auc_from_histogram,
    generate,
    write_part,
    write_tsv_day,
)

__all__ = [
    "DEFAULT_PART_ROWS",
    "DEFAULT_SCALE",
    "PARQUET_FORMAT",
    "SYNTHETIC_JSON",
    "TSV_FORMAT",
    "Calibration",
    "PartResult",
    "SynthConfig",
    "auc_from_histogram",
    "generate",
    "generate_rows",
    "scaled_cardinalities",
    "split_boundaries",
    "teacher_logits",
    "write_part",
    "write_tsv_day",
]
