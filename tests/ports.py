"""The one free-port helper of the tests: every MASTER_PORT / ``--master_port`` a test hands to torch.distributed,
DeepSpeed or its launcher comes from here, never from a fixed number or a random draw from a range (two tests,
or two workers on one machine, drawing the same port is a failure that has nothing to do with the code)."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing was bound to a moment ago: the one the OS gives for port 0.

    The socket is closed before returning, so the caller's process group can bind the port itself."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


__all__ = ["free_port"]
