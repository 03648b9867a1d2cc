"""A run that stops making progress fails, naming what it waited for, instead of hanging
(issue 19): the heartbeat, the driver's watch, and a real run whose worker hangs."""

from __future__ import annotations

import threading
import time

import pytest

from training.config import TrainConfig
from training.progress import format_duration
from training.run import run
from training.stall import Pulse, StallWatch, TrainingStalled, heartbeat_actor


def test_durations_read_short() -> None:
    assert [format_duration(s) for s in (0, 42.4, 185, 7620)] == ["0s", "42s", "3m05s",
                                                                  "2h07m"]


def test_a_watch_fires_when_nothing_finishes_and_not_while_work_goes_on(ray_cluster) -> None:
    actor = heartbeat_actor("the worker group")
    pulse = Pulse(actor, report_every_s=0.2)
    pulse.waiting("step 7 to finish")
    working = threading.Event()
    working.set()

    def work() -> None:
        while working.is_set():
            pulse.progress()
            time.sleep(0.05)

    threading.Thread(target=work, daemon=True).start()
    start = time.monotonic()
    with pytest.raises(TrainingStalled) as stalled, StallWatch(actor, 1.5, poll_s=0.2):
        time.sleep(3)  # progress all along: the watch must stay quiet
        assert time.monotonic() - start >= 3
        working.clear()
        time.sleep(30)  # nothing finishes any more: interrupted after ~1.5 s
    waited = time.monotonic() - start
    assert 3 + 1.5 <= waited < 3 + 8, waited
    message = str(stalled.value)
    assert message.startswith("run.stall_timeout_s: nothing finished for ")
    assert "rank 0 was waiting for step 7 to finish" in message
    ray_cluster.kill(actor)


def test_before_any_report_the_watch_names_the_worker_group(ray_cluster) -> None:
    actor = heartbeat_actor("Ray to start the worker group (2 × 1 CPU)")
    with pytest.raises(TrainingStalled, match=r"waiting for Ray to start the worker group "
                                              r"\(2 × 1 CPU\)"), StallWatch(actor, 1.0,
                                                                            poll_s=0.2):
        time.sleep(30)
    ray_cluster.kill(actor)


@pytest.mark.slow
def test_a_hung_worker_ends_the_run_with_what_it_waited_for(synth_data, ray_cluster,
                                                          tmp_path) -> None:
    config = TrainConfig.model_validate({
        "data": {"path": str(synth_data), "batch_size": 1024},
        "embeddings": {"ratio": 10, "method": {"method": "hash"}},
        "schedule": {"max_steps": 20, "log_every": 5},
        "scaling": {"num_workers": 2, "cpus_per_worker": 0.5},
        "fault": {"step": 3, "rank": 0, "marker": str(tmp_path / "hung"), "kind": "hang"},
        "run": {"storage_path": str(tmp_path / "runs"), "name": "hangs",
                "stall_timeout_s": 20},
    })
    free = ray_cluster.available_resources().get("CPU", 0)
    start = time.monotonic()
    with pytest.raises(TrainingStalled, match="rank 0 was waiting for step 3 to finish"):
        run(config, verbose=False)
    assert time.monotonic() - start < 90
    assert (tmp_path / "hung").exists(), "the hang must have been injected"
    # The hung workers are gone: the next test gets the cluster's CPUs back.
    deadline = time.monotonic() + 30
    while ray_cluster.available_resources().get("CPU", 0) < free and time.monotonic() < deadline:
        time.sleep(1)
    assert ray_cluster.available_resources().get("CPU", 0) >= free
