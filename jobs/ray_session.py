"""Joining a Ray cluster, or starting a local one, the same way in every job."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from jobs.ports import free_port

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
    address = os.environ.get("RAY_ADDRESS")
    if address:
        _check_reachable(address)
        ray.init()
        return True
    env_vars = {"PYTHONPATH": str(REPO)}
    port = None
    if dashboard:
        # Ray Train's placement-group cleaner finds the dashboard by looking for "the" Ray on
        # this machine and gives up when it finds several (a shared machine, parallel CI);
        # naming our dashboard for every worker removes the guess.
        port = free_port()
        env_vars["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    context = ray.init(num_cpus=num_cpus or os.cpu_count() or 2, include_dashboard=dashboard,
                       dashboard_port=port, runtime_env={"env_vars": env_vars})
    if dashboard and context.dashboard_url:
        os.environ["RAY_API_SERVER_ADDRESS"] = f"http://{context.dashboard_url}"
        print(f"Ray dashboard: http://{context.dashboard_url}", flush=True)
    return True


def ensure_ray(num_cpus: int | None = None) -> None:
    """Join RAY_ADDRESS's cluster or start a local one with its dashboard (Ray Train needs
    its state API to free the workers of stopped runs and trials); a no-op when Ray is up."""
    connect_or_start(num_cpus)


def _check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail fast, saying what to do, when RAY_ADDRESS names no listening cluster.

    ray.init() retries an unreachable address for minutes before it gives up.
    """
    hostport = address.split("://")[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        return  # "auto" and other forms Ray resolves itself
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise SystemExit(
            f"error: cannot reach the Ray cluster at RAY_ADDRESS={address} ({e}). Is it "
            "running (`ray status`)? Unset RAY_ADDRESS to start a local Ray instead."
        ) from None
