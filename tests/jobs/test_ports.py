"""Server ports: free now, and never from the kernel's ephemeral range."""

from __future__ import annotations

import socket
from pathlib import Path

from jobs.ports import PORT_RANGE, free_port


def test_ports_bind_and_stay_out_of_the_ephemeral_range():
    low, high = (int(x) for x in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text()
                 .split())
    held = []
    try:
        for _ in range(20):
            port = free_port()
            assert PORT_RANGE[0] <= port < PORT_RANGE[1]
            assert not low <= port <= high
            sock = socket.socket()
            sock.bind(("127.0.0.1", port))  # free when returned: binding it works
            sock.listen()
            held.append(sock)
        # A port somebody listens on is never handed out again.
        taken = {s.getsockname()[1] for s in held}
        assert not taken & {free_port() for _ in range(200)}
    finally:
        for sock in held:
            sock.close()
