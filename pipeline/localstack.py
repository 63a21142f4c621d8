"""Local stand-ins for production services: a Ray head with token authentication.

``make demo`` and the test suite start their own head here and stop it afterwards; nothing is
assumed to be running. The head runs in its own process group (``ray start --block``) so that
stopping it never touches another Ray cluster on the same machine, which ``ray stop`` would.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RayHead:
    gcs_address: str
    """``host:port`` of the GCS, for ``ray.init(address=...)``."""
    dashboard_url: str
    """Base URL of the dashboard and the Jobs REST API."""
    token_path: Path
    """File holding the bearer token the head was started with."""

    def airflow_conn_uri(self) -> str:
        """Value for ``AIRFLOW_CONN_RAY_DEFAULT``: the token travels as a file path, not a secret."""
        host = self.dashboard_url.removeprefix("http://")
        return f"http://{host}?auth_token_path={self.token_path}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _wait_for_dashboard(url: str, token: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 120
    request = urllib.request.Request(
        f"{url}/api/jobs/", headers={"Authorization": f"Bearer {token}"}
    )
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ray head exited with {proc.returncode}; see {log}")
        try:
            with urllib.request.urlopen(request, timeout=2):
                return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(1)
    raise RuntimeError(f"ray dashboard at {url} did not come up within 120 s; see {log}")


@contextmanager
def ray_head(workdir: Path, num_cpus: int = 4) -> Iterator[RayHead]:
    """Start a token-authenticated single-node Ray head and stop it on exit.

    Args:
        workdir: folder for the token file and the head's log.
        num_cpus: logical CPUs the head advertises; above the physical count is fine for
            tiny CPU training, where workers mostly wait on each other.

    Yields:
        The head's addresses and token path. Jobs submitted to it run with this interpreter's
        environment first on PATH, so ``python -m pipeline...`` resolves to the same venv.
    """
    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    token_path = workdir / "auth_token"
    if not token_path.exists():
        token_path.write_text(secrets.token_hex(32))
        token_path.chmod(0o600)
    token = token_path.read_text().strip()
    port, dashboard_port = free_port(), free_port()
    # Every fixed default port gets a free one too, so two heads (a demo and a test run, say)
    # can share a machine; a clash leaves the job agent dead and submissions failing.
    service_ports = {
        flag: free_port()
        for flag in (
            "dashboard-agent-listen-port",
            "dashboard-agent-grpc-port",
            "metrics-export-port",
            "runtime-env-agent-port",
            "node-manager-port",
            "object-manager-port",
            "ray-client-server-port",
        )
    }
    # Ray's socket paths must stay under ~107 bytes, so its temp dir lives under /tmp.
    temp_dir = Path("/tmp") / f"ray-{dashboard_port}"
    bin_dir = str(Path(sys.executable).parent)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token_path),
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    env.pop("RAY_ADDRESS", None)
    log = workdir / f"ray-head-{dashboard_port}.log"
    cmd = [
        os.path.join(bin_dir, "ray"),
        "start",
        "--head",
        "--block",
        f"--port={port}",
        f"--dashboard-port={dashboard_port}",
        "--dashboard-host=127.0.0.1",
        f"--num-cpus={num_cpus}",
        "--num-gpus=0",
        "--include-dashboard=true",
        "--disable-usage-stats",
        f"--temp-dir={temp_dir}",
        *(f"--{flag}={value}" for flag, value in service_ports.items()),
    ]
    with log.open("wb") as log_file:
        proc = subprocess.Popen(
            cmd, env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
        )
    head = RayHead(
        gcs_address=f"127.0.0.1:{port}",
        dashboard_url=f"http://127.0.0.1:{dashboard_port}",
        token_path=token_path,
    )
    try:
        _wait_for_dashboard(head.dashboard_url, token, proc, log)
        yield head
    finally:
        _stop(proc)


def _stop(proc: subprocess.Popen[bytes]) -> None:
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
