"""`ray job submit` against a real `ray start --head`: the README's cluster path, for real."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from jobs.ports import free_port

REPO = Path(__file__).resolve().parents[2]


def _start_head(bin_dir: Path, env: dict, temp_dir: Path, log: Path) -> tuple[subprocess.Popen,
                                                                               str | None]:
    """`ray start --head --block` on ports of its own; (the process, the job server's
    address once it answers, or None)."""
    gcs, dashboard = free_port(), free_port()
    # Every port of its own: the session's cluster (and any other on this machine) already
    # holds Ray's defaults, and a job agent that cannot bind never registers.
    flags = ("dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
             "runtime-env-agent-port", "node-manager-port", "object-manager-port",
             "ray-client-server-port")
    ports = {flag: free_port() for flag in flags}
    own_ports = [f"--{flag}={port}" for flag, port in ports.items()]
    # The workers' range must hold none of those: `ray start` refuses to start when it
    # does (what failed this test in full-suite runs, one in a few).
    taken = {gcs, dashboard, *ports.values()}
    low = free_port()
    while any(low <= port <= low + 200 for port in taken):
        low = free_port()
    with log.open("ab") as out:
        head = subprocess.Popen(
            [str(bin_dir / "ray"), "start", "--head", "--block", f"--port={gcs}",
             f"--dashboard-port={dashboard}", "--dashboard-host=127.0.0.1", "--num-cpus=2",
             f"--temp-dir={temp_dir}", "--include-dashboard=true", *own_ports,
             f"--min-worker-port={low}", f"--max-worker-port={low + 200}"],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    address = f"http://127.0.0.1:{dashboard}"
    deadline = time.time() + 120  # a loaded 2-core machine has taken over 90 s
    while time.time() < deadline and head.poll() is None:
        ping = subprocess.run([str(bin_dir / "ray"), "job", "list", "--address", address],
                              env=env, capture_output=True, text=True)
        if ping.returncode == 0:
            return head, address
        time.sleep(2)
    return head, None


def _stop_head(head: subprocess.Popen) -> None:
    try:
        os.killpg(head.pid, signal.SIGTERM)
    except ProcessLookupError:  # it exited by itself (a start that failed)
        return
    try:
        # A graceful `ray start --block` shutdown takes ~30 s here; the cluster is throwaway,
        # and its whole process group goes with the SIGKILL (checked: nothing is left behind).
        head.wait(timeout=5)
    except subprocess.TimeoutExpired:
        os.killpg(head.pid, signal.SIGKILL)
        head.wait()


def _dashboard_log(temp_dir: Path) -> str:
    logs = sorted(temp_dir.glob("session_*/logs/dashboard.*"))
    return "".join(f"--- {p.name}\n{p.read_text(errors='replace')[-1500:]}" for p in logs)


@pytest.mark.slow
def test_job_submit_trains_on_a_local_cluster_and_writes_the_export(synth_data, tmp_path):
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "RAY_AUTH_MODE": "token"}
    env.pop("RAY_ADDRESS", None)
    config = {
        "data": {"path": str(synth_data), "batch_size": 1024},
        "embeddings": {"ratio": 10, "method": {"method": "hash"}},
        "schedule": {"max_steps": 10, "log_every": 5},
        "scaling": {"num_workers": 2, "cpus_per_worker": 0.5},
        "run": {"storage_path": str(tmp_path / "runs"), "name": "submitted"},
        "export": {"out": str(tmp_path / "model")},
    }
    config_path = tmp_path / "job.yaml"
    config_path.write_text(yaml.safe_dump(config))
    temp_dir = Path("/tmp") / f"ep{os.getpid()}"
    log = tmp_path / "head.log"
    head, address = _start_head(bin_dir, env, temp_dir, log)
    if address is None:
        # One fresh start on new ports, and the head's own output and the dashboard's log
        # if that fails too.
        first = _dashboard_log(temp_dir)
        _stop_head(head)
        head, address = _start_head(bin_dir, env, temp_dir, log)
    try:
        if address is None:
            pytest.fail("the local cluster's job server never answered, twice:\n"
                        f"{log.read_text(errors='replace')[-3000:]}\n{first}\n"
                        f"{_dashboard_log(temp_dir)}")
        deadline = time.time() + 240
        while True:
            job = subprocess.run(
                [str(bin_dir / "ray"), "job", "submit", "--address", address,
                 "--working-dir", str(REPO), "--",
                 "python", "-m", "jobs.train", "--config", str(config_path)],
                env=env, capture_output=True, text=True, timeout=480,
            )
            # The job server answers before its agent has registered; that is worth a retry.
            if "No available agent" not in job.stderr or time.time() > deadline:
                break
            time.sleep(5)
        assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
        output = job.stdout + job.stderr
        assert "succeeded" in output.lower()
        # What a user reads: each progress line once (Ray Train's print patch doubled them),
        # and no warning raised in the project's own modules.
        lines = output.splitlines()
        for step in (5, 10):
            assert sum(f"step {step}/" in line for line in lines) == 1, output[-3000:]
        assert sum("exported the serving model" in line for line in lines) == 1
        assert "TrainingReport(" not in output, "Ray Train's INFO dumps are off by default"
        own = [line for line in lines if "Warning" in line
               and any(f"/{room}/" in line for room in ("embeddings", "training", "jobs",
                                                          "data_pipeline", "services"))]
        assert not own, own
        model = json.loads((tmp_path / "model" / "model.json").read_text())
        assert model["metrics"]["samples"] == 10 * 1024
        assert 0.5 < model["metrics"]["validation_auc"] <= 1.0
        # The job ends with its result, once, and the same in the run folder for scripts.
        summary = json.loads((tmp_path / "runs" / "submitted" / "summary.json").read_text())
        assert summary["validation_auc"] == pytest.approx(model["metrics"]["validation_auc"])
        assert summary["serving_bytes"] == model["serving_bytes"]["embeddings"] > 0
        assert summary["model"] == str(tmp_path / "model")
        assert sum("=== train: result ===" in line for line in lines) == 1
        shown = next(line for line in lines if line.startswith("validation AUC "))
        assert shown.split()[2] == f"{summary['validation_auc']:.4f}"
        assert f"tensorboard --logdir {tmp_path / 'runs' / 'submitted' / 'tensorboard'}" in output
    finally:
        _stop_head(head)
        shutil.rmtree(temp_dir, ignore_errors=True)
