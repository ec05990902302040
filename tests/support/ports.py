"""A free loopback port: the one helper for it, standard library only so that
scripts/compose_check.py (run by the system's python3, without the project installed) can
import it too."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A TCP port on 127.0.0.1 nothing listens on now (the OS picks it: never a default)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
