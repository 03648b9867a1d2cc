"""Refuse a training run the cluster cannot schedule, before any worker starts.

Ray Train places `num_workers` workers of `cpus_per_worker` CPUs (and a GPU each with
`use_gpu`); Ray Data's read tasks then need CPUs of their own on some node. When the workers
take every CPU, the reads never schedule and the job hangs forever with nothing but Ray's
"may hang forever" line (issue 19: 1-CPU nodes with `cpus_per_worker: 1`). The arithmetic is
known before anything starts, so the run is refused with the field to change, what the
cluster has, and a value that fits. On a cluster that grows on demand (KubeRay, the cluster
launcher), `scaling.wait_for_resources_s` waits for the nodes instead of refusing at once.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from data_pipeline.datasets import DEFAULT_TASK_CPUS
from training.settings import ScalingSettings


class ResourcesUnavailable(RuntimeError):
    """The cluster cannot run the configured worker group and its data reads."""


@dataclass(frozen=True)
class Node:
    cpus: float
    gpus: float


def cluster_nodes() -> list[Node]:
    """CPUs and GPUs of every alive node of the connected Ray cluster."""
    import ray

    return [Node(n["Resources"].get("CPU", 0.0), n["Resources"].get("GPU", 0.0))
            for n in ray.nodes() if n.get("Alive")]


def fits(nodes: list[Node], workers: int, cpus: float, gpus: int, data_cpus: float) -> bool:
    """Whether `workers` workers (each `cpus` CPUs and `gpus` GPUs) fit on the nodes, first
    fit on the nodes with most room (as Ray's spread of a worker group), with `data_cpus`
    left on some node for a read task."""
    free = sorted(([n.cpus, n.gpus] for n in nodes), reverse=True)
    for _ in range(workers):
        for room in free:
            if room[0] + 1e-9 >= cpus and room[1] + 1e-9 >= gpus:
                room[0] -= cpus
                room[1] -= gpus
                break
        else:
            return False
        free.sort(reverse=True)
    return any(room[0] + 1e-9 >= data_cpus for room in free)


def fitting_cpus(nodes: list[Node], workers: int, gpus: int, data_cpus: float) -> float | None:
    """The largest CPUs per worker (a multiple of 0.05) that fits, or None."""
    top = max((n.cpus for n in nodes), default=0.0)
    for step in range(math.floor(top / 0.05), 0, -1):
        cpus = round(step * 0.05, 2)
        if fits(nodes, workers, cpus, gpus, data_cpus):
            return cpus
    return None


def unschedulable_reason(scaling: ScalingSettings, nodes: list[Node],
                         data_cpus: float) -> str | None:
    """Why the worker group cannot run on these nodes (naming the field), or None."""
    workers, cpus = scaling.num_workers, scaling.cpus_per_worker
    gpus = 1 if scaling.use_gpu else 0
    if workers == 0 or fits(nodes, workers, cpus, gpus, data_cpus):
        return None
    have = ", ".join(f"{n.cpus:g} CPU" + (f" + {n.gpus:g} GPU" if n.gpus else "")
                     for n in nodes) or "no alive node"
    need = (f"{workers} workers × {cpus:g} CPU" + (" + 1 GPU" if gpus else "")
            + f", and {data_cpus:g} CPU free on one node for Ray Data's reads")
    if gpus and sum(int(n.gpus) for n in nodes) < workers:
        return (f"scaling.num_workers: {need} cannot run on this cluster ({len(nodes)} "
                f"node(s): {have}); it has GPUs for {sum(int(n.gpus) for n in nodes)} "
                "worker(s) (scaling.use_gpu: one GPU each)")
    suggestion = fitting_cpus(nodes, workers, gpus, data_cpus)
    hint = (f"scaling.cpus_per_worker: {suggestion:g} would fit" if suggestion
            else "fewer scaling.num_workers would")
    return (f"scaling.cpus_per_worker: {need} cannot be scheduled on this cluster "
            f"({len(nodes)} node(s): {have}): the run would wait forever; {hint}")


def check_schedulable(scaling: ScalingSettings, data_cpus: float = DEFAULT_TASK_CPUS) -> None:
    """Raise `ResourcesUnavailable` when the connected cluster cannot run the worker group,
    after waiting up to `scaling.wait_for_resources_s` for it to grow."""
    deadline = time.monotonic() + (scaling.wait_for_resources_s or 0.0)
    announced = False
    while True:
        reason = unschedulable_reason(scaling, cluster_nodes(), data_cpus)
        if reason is None:
            return
        if time.monotonic() >= deadline:
            raise ResourcesUnavailable(reason)
        if not announced:
            print(f"[train] waiting up to {scaling.wait_for_resources_s:g} s for the cluster "
                  f"to grow: {reason}", flush=True)
            announced = True
        time.sleep(5)
