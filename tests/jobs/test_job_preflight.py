"""The serve and prepare jobs refuse what the cluster can never schedule (issue 19), naming
the flag, what the cluster has and a value that fits, instead of waiting forever."""

from __future__ import annotations

from jobs import serve as serve_job
from jobs.ports import free_port
from jobs.preflight import replicas_reason, tasks_reason
from training.preflight import Node


def test_replicas_that_cannot_all_be_placed_name_a_count_that_fits() -> None:
    nodes = [Node(2, 0), Node(1, 0)]
    assert replicas_reason(nodes, 3, 1) is None
    reason = replicas_reason(nodes, 4, 1)
    assert reason == ("--replicas: 4 replica(s) × 1 CPU cannot be placed on this cluster "
                      "(2 node(s): 2 CPU, 1 CPU): the deployment would wait forever; "
                      "--replicas 3 would fit")
    assert "needs a node with 1 CPU" in replicas_reason([Node(0, 0)], 1, 1)


def test_conversion_tasks_need_one_node_with_a_cpu() -> None:
    # A head started with --num-cpus=0 and no worker node yet: the usual production setup.
    reason = tasks_reason([Node(0, 0)], 1, "convert the files")
    assert reason is not None and reason.startswith(
        "no node has 1 CPU for the tasks that convert the files (1 node(s): 0 CPU)")
    assert tasks_reason([Node(0, 0), Node(4, 0)], 1, "convert the files") is None


def test_serve_refuses_more_replicas_than_the_cluster_holds(model_dirs, ray_cluster, capsys):
    cpus = int(ray_cluster.cluster_resources()["CPU"])
    code = serve_job.main(["--model", str(model_dirs["v1"]), "--replicas", str(cpus + 1),
                           "--port", str(free_port())])
    assert code == 2
    err = capsys.readouterr().err
    assert f"serve: error: --replicas: {cpus + 1} replica(s) × 1 CPU cannot be placed" in err
    assert f"--replicas {cpus} would fit" in err
