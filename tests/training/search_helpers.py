"""A tiny search config shared by the search tests (a helper module, not a test)."""

from __future__ import annotations

from training.search.config import TuneConfig


def raw_search(data, tmp_path, name, **overrides) -> dict:
    """A tiny search: three 10-step trials at once, one worker each at half a CPU."""
    raw = {
        "data": {"path": str(data), "batch_size": 1024, "eval_batch_size": 32768},
        "model": "dlrm-small",
        "schedule": {"max_steps": 10, "eval_every": 5, "log_every": 5},
        "scaling": {"num_workers": 1, "cpus_per_worker": 0.5},
        "run": {"name": name, "storage_path": str(tmp_path / "tune")},
        "search": {
            "methods": {"hash": {}, "qr": {"operation": ["sum", "concat"]},
                        "cafe": {"hash_share": {"low": 0.3, "high": 0.7}}, "learned_hash": {}},
            "mlet": [0, 2],
            # QR reaches about 36x on this data (2·sqrt(n) rows a feature): beyond, its
            # trials are skipped (test_a_point_out_of_a_methods_reach_is_a_skipped_trial).
            "ratio": {"low": 10, "high": 30, "log": True},
            "embedding_dim": [8, 16],
            "quantize": ["none", "int8"],
        },
        "objective": {"mode": "pareto", "max_serving_bytes": 150_000},
        # No rung before the last step: the scheduler runs but stops no trial, because
        # freeing a stopped trial's workers needs the dashboard's state API, which the
        # test cluster does not start (the rung logic is tested in test_pareto.py).
        "asha": {"enabled": True, "grace_steps": 10},
        "trials": {"num_samples": 3, "max_concurrent_trials": 3, "seed": 7},
    }
    for key, value in overrides.items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
    return raw


def search_config(data, tmp_path, name, **overrides) -> TuneConfig:
    return TuneConfig.model_validate(raw_search(data, tmp_path, name, **overrides))
