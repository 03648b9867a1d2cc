"""Joining a Ray cluster, or starting a local one, the same way in every job."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def connect_or_start(num_cpus: int | None = None, *, dashboard: bool = True) -> bool:
    """Join RAY_ADDRESS's cluster (as `ray job submit` sets it) or start a local instance.

    Returns True when this call started Ray (the caller then shuts it down). CPUs are given
    explicitly because Ray's own count can be the host's, not this container's; the
    dashboard stays on by default because Ray Train's and Tune's placement-group cleaner
    needs its state API.
    """
    import ray

    if ray.is_initialized():
        return False
    if os.environ.get("RAY_ADDRESS"):
        ray.init()
    else:
        ray.init(num_cpus=num_cpus or os.cpu_count() or 2, include_dashboard=dashboard,
                 runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    return True
