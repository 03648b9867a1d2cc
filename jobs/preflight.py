"""The pre-flight checks of the jobs that start Ray work without a training worker group:
`serve` (its replicas) and `prepare` (its conversion tasks). Like training's
(`training.preflight`), each refuses at once, naming the flag, what the cluster has and a
value that fits, where Ray would otherwise wait forever for resources that never come (a
head started with `--num-cpus=0` and no worker nodes yet is the usual case)."""

from __future__ import annotations

from training.preflight import Node, describe_nodes, fits, wait_until_fits


def replicas_reason(nodes: list[Node], replicas: int, cpus: float) -> str | None:
    """Why `replicas` Serve replicas of `cpus` CPUs each cannot all be placed, or None."""
    if fits(nodes, replicas, cpus, 0, data_cpus=0):
        return None
    room = max((n for n in range(replicas - 1, 0, -1) if fits(nodes, n, cpus, 0, 0)),
               default=0)
    hint = (f"--replicas {room} would fit" if room
            else f"the cluster needs a node with {cpus:g} CPU")
    return (f"--replicas: {replicas} replica(s) × {cpus:g} CPU cannot be placed on this "
            f"cluster ({describe_nodes(nodes)}): the deployment would wait forever; {hint}")


def check_replicas(replicas: int, cpus: float, wait_s: float = 0.0) -> None:
    """Raise `ResourcesUnavailable` unless the cluster can place every replica."""
    wait_until_fits(lambda nodes: replicas_reason(nodes, replicas, cpus), wait_s, "serve")


def tasks_reason(nodes: list[Node], task_cpus: float, what: str) -> str | None:
    """Why no task of `task_cpus` CPUs can run anywhere (so `what` would never start)."""
    if fits(nodes, 1, task_cpus, 0, data_cpus=0):
        return None
    return (f"no node has {task_cpus:g} CPU for the tasks that {what} ({describe_nodes(nodes)})"
            ": they would wait forever; add a node with CPUs, or run with --no-ray")


def check_tasks(task_cpus: float, what: str, wait_s: float = 0.0) -> None:
    """Raise `ResourcesUnavailable` unless some node can run one task of `task_cpus`."""
    wait_until_fits(lambda nodes: tasks_reason(nodes, task_cpus, what), wait_s, "prepare")
