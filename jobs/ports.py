"""Ports for the servers embpress starts (Ray dashboard, Serve, benchmarks, tests).

A port the kernel hands out as free (bind to port 0) comes from its ephemeral range
(32768-60999 on Linux), which every outgoing connection draws from too; with Ray's many
processes connecting, another connection can take the port before the server binds it, and
Serve's proxy or the dashboard then fails to start. These ports come from above Ray's worker
ports (10002-19999 by default) and below the ephemeral range instead.
"""

from __future__ import annotations

import random
import socket

PORT_RANGE = (20000, 32000)
_rng = random.Random()


def free_port(host: str = "127.0.0.1") -> int:
    """A port in PORT_RANGE that nothing holds now, chosen at random so that parallel runs
    rarely try the same one."""
    for _ in range(500):
        port = _rng.randrange(*PORT_RANGE)
        with socket.socket() as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
        return port
    raise RuntimeError(f"no free port in {PORT_RANGE[0]}-{PORT_RANGE[1] - 1} on {host}")
