"""This machine as the dev stack uses it: its loopback and outward addresses, a free port on it,
and stopping a server started in its own session (process group).

Every server of the stack runs in its own session, so stopping it signals its process group and
never touches another Ray cluster or server on the same machine (``ray stop`` would).
"""

from __future__ import annotations

import ipaddress
import os
import signal
import socket
import subprocess

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    """A TCP port free on the loopback address now (for a server, or ``MASTER_PORT``)."""
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


def this_host_address() -> str | None:
    """A non-loopback IPv4 address of this machine's own interfaces, or None when it has none.

    A service bound to it is reached the way another machine reaches it: the Airflow side
    (``pipeline.preflight.is_local_host``) counts it as a remote cluster.
    """
    import psutil

    for addresses in psutil.net_if_addrs().values():
        for address in addresses:
            if (
                address.family == socket.AF_INET
                and not ipaddress.ip_address(address.address).is_loopback
            ):
                return str(address.address)
    return None


def stop_process_group(proc: subprocess.Popen[bytes]) -> None:
    """Stop a server started with ``start_new_session=True``: SIGTERM to its process group,
    SIGKILL after 5 s."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        # `ray start --block` does not always exit on SIGTERM; don't wait long for it.
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
