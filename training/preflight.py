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
from collections.abc import Callable
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


def fits(nodes: list[Node], workers: int, cpus: float, gpus: int, data_cpus: float,
         driver_cpus: float = 0.0) -> bool:
    """Whether `workers` workers (each `cpus` CPUs and `gpus` GPUs) fit on the nodes, first
    fit on the nodes with most room (as Ray's spread of a worker group), after a driver of
    `driver_cpus` (a Tune trial's) and with `data_cpus` left on some node for a read task
    (0: none needed)."""
    free = sorted(([n.cpus, n.gpus] for n in nodes), reverse=True)
    demands = [(driver_cpus, 0)] * (driver_cpus > 0) + [(cpus, gpus)] * workers
    for need_cpus, need_gpus in demands:
        for room in free:
            if room[0] + 1e-9 >= need_cpus and room[1] + 1e-9 >= need_gpus:
                room[0] -= need_cpus
                room[1] -= need_gpus
                break
        else:
            return False
        free.sort(reverse=True)
    return data_cpus <= 0 or any(room[0] + 1e-9 >= data_cpus for room in free)


def describe_nodes(nodes: list[Node]) -> str:
    """"2 node(s): 1 CPU, 1 CPU": what the cluster has, for a refusal."""
    have = ", ".join(f"{n.cpus:g} CPU" + (f" + {n.gpus:g} GPU" if n.gpus else "")
                     for n in nodes) or "no alive node"
    return f"{len(nodes)} node(s): {have}"


def fitting_cpus(nodes: list[Node], workers: int, gpus: int, data_cpus: float,
                 driver_cpus: float = 0.0) -> float | None:
    """The largest CPUs per worker (a multiple of 0.05) that fits, or None."""
    top = max((n.cpus for n in nodes), default=0.0)
    for step in range(math.floor(top / 0.05), 0, -1):
        cpus = round(step * 0.05, 2)
        if fits(nodes, workers, cpus, gpus, data_cpus, driver_cpus):
            return cpus
    return None


def unschedulable_reason(scaling: ScalingSettings, nodes: list[Node], data_cpus: float,
                         driver_cpus: float = 0.0) -> str | None:
    """Why the worker group cannot run on these nodes (naming the field), or None."""
    workers, cpus = scaling.num_workers, scaling.cpus_per_worker
    gpus = 1 if scaling.use_gpu else 0
    if workers == 0 or fits(nodes, workers, cpus, gpus, data_cpus, driver_cpus):
        return None
    need = (f"{workers} workers × {cpus:g} CPU" + (" + 1 GPU" if gpus else "")
            + (f" after the trial's driver ({driver_cpus:g} CPU)" if driver_cpus else "")
            + f", and {data_cpus:g} CPU free on one node for Ray Data's reads")
    gpus_there = sum(int(n.gpus) for n in nodes)
    if gpus and gpus_there < workers:
        return (f"scaling.num_workers: {need} cannot run on this cluster "
                f"({describe_nodes(nodes)}); it has GPUs for {gpus_there} worker(s) "
                "(scaling.use_gpu: one GPU each)")
    suggestion = fitting_cpus(nodes, workers, gpus, data_cpus, driver_cpus)
    hint = (f"scaling.cpus_per_worker: {suggestion:g} would fit" if suggestion
            else "fewer scaling.num_workers would")
    return (f"scaling.cpus_per_worker: {need} cannot be scheduled on this cluster "
            f"({describe_nodes(nodes)}): the run would wait forever; {hint}")


def wait_until_fits(reason: Callable[[list[Node]], str | None], wait_s: float,
                    who: str) -> None:
    """Return once `reason(nodes)` is None for the cluster's nodes; raise
    `ResourcesUnavailable` with it when it is not, after waiting up to `wait_s` for a
    cluster that grows on demand (KubeRay, the cluster launcher) to add nodes."""
    deadline = time.monotonic() + wait_s
    announced = False
    while True:
        why = reason(cluster_nodes())
        if why is None:
            return
        if time.monotonic() >= deadline:
            raise ResourcesUnavailable(why)
        if not announced:
            print(f"[{who}] waiting up to {wait_s:g} s for the cluster to grow: {why}",
                  flush=True)
            announced = True
        time.sleep(5)


def check_schedulable(scaling: ScalingSettings, data_cpus: float = DEFAULT_TASK_CPUS,
                      driver_cpus: float = 0.0) -> None:
    """Raise `ResourcesUnavailable` when the connected cluster cannot run the worker group
    (after a Tune trial's driver of `driver_cpus`), after waiting up to
    `scaling.wait_for_resources_s` for it to grow."""
    wait_until_fits(lambda nodes: unschedulable_reason(scaling, nodes, data_cpus, driver_cpus),
                    scaling.wait_for_resources_s, "train")
