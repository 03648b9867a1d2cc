"""A run that stops making progress fails, naming what it waited for, instead of hanging.

The pre-flight check (`training.preflight`) refuses what the cluster cannot schedule, but a
run can still stall: Ray Data's reads starved by another job, a worker stuck in a
collective, a node gone without Ray noticing. Rank 0 keeps a `Pulse`: the loop marks each
finished step (and evaluation batch) and what it waits for next, which costs an attribute
write; a daemon thread sends that to a zero-CPU `Heartbeat` actor every few seconds, so a
heartbeat means progress, not just a live process. The driver's `StallWatch` reads the
actor and, once nothing finished for `run.stall_timeout_s`, interrupts `trainer.fit()` and
raises `TrainingStalled` with rank 0's last word.
"""

from __future__ import annotations

import signal
import threading
import time
from types import TracebackType
from typing import Any

REPORT_EVERY_S = 2.0


class TrainingStalled(RuntimeError):
    """No training step (or evaluation batch) finished within `run.stall_timeout_s`."""


class HeartbeatState:
    """The actor's state: when rank 0 last reported, and what it said."""

    def __init__(self, starting: str) -> None:
        self.created = time.monotonic()
        self.reported: float | None = None
        self.idle_s = 0.0  # rank 0's seconds since its last progress, as of `reported`
        self.waiting_for = starting

    def report(self, waiting_for: str, idle_s: float) -> None:
        self.reported, self.idle_s, self.waiting_for = time.monotonic(), idle_s, waiting_for

    def stalled_for(self) -> tuple[float, str]:
        """(seconds since anything finished, what rank 0 waits for). Before any report, the
        time since the actor started: the worker group itself has not come up."""
        now = time.monotonic()
        if self.reported is None:
            return now - self.created, self.waiting_for
        return self.idle_s + (now - self.reported), self.waiting_for


def heartbeat_actor(starting: str) -> Any:
    """A `HeartbeatState` in a zero-CPU actor: it schedules on any cluster, even a full one."""
    import ray

    return ray.remote(num_cpus=0)(HeartbeatState).remote(starting)


class Pulse:
    """Rank 0's side: `progress()` after each finished unit of work, `waiting()` before a
    wait; a daemon thread reports both to the heartbeat actor every `REPORT_EVERY_S`."""

    def __init__(self, actor: Any | None, report_every_s: float = REPORT_EVERY_S) -> None:
        self.actor, self.report_every_s = actor, report_every_s
        self._last = time.monotonic()
        self._waiting_for = "the model to be built"
        if actor is not None:
            threading.Thread(target=self._report, name="embpress-pulse", daemon=True).start()

    def progress(self) -> None:
        self._last = time.monotonic()

    def waiting(self, what: str) -> None:
        self._waiting_for = what

    def _report(self) -> None:
        while True:
            try:
                self.actor.report.remote(self._waiting_for, time.monotonic() - self._last)
            except Exception:  # the run (and its actor) is gone: nothing left to tell
                return
            time.sleep(self.report_every_s)


_PULSE = Pulse(None)


def pulse() -> Pulse:
    """This worker's pulse (a silent one until `start_pulse`)."""
    return _PULSE


def start_pulse(actor: Any | None) -> Pulse:
    global _PULSE
    _PULSE = Pulse(actor)
    return _PULSE


class StallWatch:
    """The driver's side, around `trainer.fit()`: raises `TrainingStalled` from the `with`
    block once the heartbeat says nothing finished for `timeout_s`.

    Only the main thread can be interrupted this way, so elsewhere (a Tune trial's thread)
    the watch does nothing; Tune's own stoppers cover trials.
    """

    def __init__(self, actor: Any, timeout_s: float | None, poll_s: float = REPORT_EVERY_S
                 ) -> None:
        self.actor, self.timeout_s, self.poll_s = actor, timeout_s, poll_s
        self.reason: str | None = None
        self._done = threading.Event()
        self._previous: Any = None
        self._installed = False

    def __enter__(self) -> StallWatch:
        if self.timeout_s and threading.current_thread() is threading.main_thread():
            # SIGINT must end the wait even where an earlier library left a handler that
            # does not raise (Ray Tune's stays after its search); Ray Train's `fit()` puts
            # its own in place while it runs (it aborts the run, then exits) and restores ours.
            self._previous = signal.signal(signal.SIGINT, signal.default_int_handler)
            self._installed = True
            threading.Thread(target=self._watch, name="embpress-stall-watch",
                             daemon=True).start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._done.set()
        if self._installed:
            # None: the handler was not Python's; the default is what was in force.
            signal.signal(signal.SIGINT, self._previous if self._previous is not None
                          else signal.default_int_handler)
        # Ray Train answers the SIGINT by aborting the run (its workers go) and exiting.
        interrupted = kind is None or issubclass(kind, (KeyboardInterrupt, SystemExit))
        if self.reason is not None and interrupted:
            raise TrainingStalled(self.reason) from None

    def _watch(self) -> None:
        import ray

        while not self._done.wait(self.poll_s):
            try:
                idle, waiting_for = ray.get(self.actor.stalled_for.remote(), timeout=30)
            except Exception:  # an unanswered poll is no evidence of a stall
                continue
            if idle > self.timeout_s:
                self.reason = (
                    f"run.stall_timeout_s: nothing finished for {idle:.0f} s (limit "
                    f"{self.timeout_s:g} s); rank 0 was waiting for {waiting_for}. Check "
                    "`ray status` for pending tasks and the workers' logs; raise "
                    "run.stall_timeout_s if the run is only slow to start")
                # A real SIGINT, not `_thread.interrupt_main()`: only a signal wakes a main
                # thread blocked in a wait, as `trainer.fit()` is.
                signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
                return
