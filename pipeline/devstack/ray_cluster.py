"""A local Ray cluster with token authentication: a head, and worker nodes joined to it on this
machine the way KubeRay worker groups join a production head.

``make demo`` and the test suite start their own head here and stop it afterwards; nothing is
assumed to be running. The head runs in its own process group (``ray start --block``) so that
stopping it never touches another Ray cluster on the same machine, which ``ray stop`` would.
"""

from __future__ import annotations

import http.client
import json
import os
import secrets
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.devstack.host import LOOPBACK, free_port, stop_process_group


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


def _wait_for_dashboard(url: str, token: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 120
    request = urllib.request.Request(
        f"{url}/api/jobs/", headers={"Authorization": f"Bearer {token}"}
    )
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"ray head exited with {proc.returncode}; {log} ends:\n{_log_tail(log)}"
            )
        try:
            with urllib.request.urlopen(request, timeout=2):
                return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(1)
    raise RuntimeError(f"ray dashboard at {url} did not come up within 120 s; see {log}")


DEV_DRIVER_RESOURCES = {"driver": 8.0}
"""What the development head advertises: the custom resource a KubeRay CPU worker group offers
job drivers (``orchestration.driver_resources: {driver: 1}``), so a config written for the
cluster also runs here. Nothing asks for it unless the config does."""

_NODE_PORT_FLAGS = (
    "dashboard-agent-listen-port",
    "dashboard-agent-grpc-port",
    "metrics-export-port",
    "runtime-env-agent-port",
    "node-manager-port",
    "object-manager-port",
)
"""Per-node ports with fixed defaults. Each gets a free port, so several heads and nodes (a
demo and a test run, say) can share a machine; a clash leaves the job agent dead and
submissions failing."""


def _node_ports() -> dict[str, int]:
    return {flag: free_port() for flag in _NODE_PORT_FLAGS}


def _ray_env(token_path: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """This interpreter's environment (with ``extra`` over it) first on PATH (jobs' ``python -m
    pipeline...`` resolves to this venv), token auth on, pointed at ``token_path``."""
    bin_dir = str(Path(sys.executable).parent)
    env = {
        **os.environ,
        **(extra or {}),
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token_path),
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_AUTH_TOKEN", None)  # it would win over the file and might not match it
    return env


def _resource_flags(num_cpus: int, num_gpus: int, resources: dict[str, float]) -> list[str]:
    flags = [f"--num-cpus={num_cpus}", f"--num-gpus={num_gpus}"]
    return flags + ([f"--resources={json.dumps(resources)}"] if resources else [])


def _start_blocking(
    cmd: list[str], env: dict[str, str], log: Path, cwd: Path | None = None
) -> subprocess.Popen[bytes]:
    """``ray start --block`` in its own session: stopping it never touches other clusters."""
    with log.open("wb") as log_file:
        return subprocess.Popen(
            cmd,
            env=env,
            cwd=cwd,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


@contextmanager
def ray_head(
    workdir: Path,
    num_cpus: int = 4,
    *,
    num_gpus: int = 0,
    resources: dict[str, float] | None = None,
    host: str = LOOPBACK,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> Iterator[RayHead]:
    """Start a token-authenticated Ray head and stop it on exit.

    Args:
        workdir: folder for the token file and the head's log.
        num_cpus: logical CPUs the head advertises; above the physical count is fine for
            tiny CPU training, where workers mostly wait on each other.
        num_gpus: GPUs the head advertises (0: CPU only, whatever the machine has).
        resources: custom Ray resources of the head; None: ``DEV_DRIVER_RESOURCES``.
        host: the address the node, its GCS and its dashboard (Jobs API) bind to and announce;
            ``host.this_host_address()`` makes it a cluster Airflow treats as remote.
        env: environment of the head's processes over this one's, as a KubeRay pod spec's
            ``env`` gives them (S3 credentials, say); every job inherits it.
        cwd: working directory of the head's processes and so of job drivers (default: this
            one's); a pod's is its image's, never the Airflow host's checkout.

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
    # Ray's socket paths must stay under ~107 bytes, so its temp dir lives under /tmp.
    temp_dir = Path("/tmp") / f"ray-{dashboard_port}"
    log = workdir / f"ray-head-{dashboard_port}.log"
    cmd = [
        str(Path(sys.executable).parent / "ray"),
        "start",
        "--head",
        "--block",
        # Ray announces the node by the address it detects; loopback heads keep doing so.
        *([] if host == LOOPBACK else [f"--node-ip-address={host}"]),
        f"--port={port}",
        f"--dashboard-port={dashboard_port}",
        f"--dashboard-host={host}",
        *_resource_flags(
            num_cpus, num_gpus, DEV_DRIVER_RESOURCES if resources is None else resources
        ),
        "--include-dashboard=true",
        "--disable-usage-stats",
        f"--temp-dir={temp_dir}",
        f"--ray-client-server-port={free_port()}",
        *(f"--{flag}={value}" for flag, value in _node_ports().items()),
    ]
    proc = _start_blocking(cmd, _ray_env(token_path, env), log, cwd)
    head = RayHead(
        gcs_address=f"{host}:{port}",
        dashboard_url=f"http://{host}:{dashboard_port}",
        token_path=token_path,
    )
    try:
        _wait_for_dashboard(head.dashboard_url, token, proc, log)
        yield head
    finally:
        stop_process_group(proc)


def state_list(head: RayHead, resource: str, limit: int = 1000) -> list[dict[str, Any]]:
    """Every entry of one of the dashboard state API's lists (``nodes``, ``tasks``...), in
    detail."""
    token = head.token_path.read_text().strip()
    request = urllib.request.Request(
        f"{head.dashboard_url}/api/v0/{resource}?detail=1&limit={limit}",
        headers={"Authorization": f"Bearer {token}"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        entries: list[dict[str, Any]] = json.load(response)["data"]["result"]["result"]
    return entries


def alive_nodes(head: RayHead) -> list[dict[str, Any]]:
    """The cluster's live nodes from the dashboard's state API: ``node_id``, ``is_head_node``,
    ``resources_total``, ``labels``..."""
    return [node for node in state_list(head, "nodes") if node.get("state") == "ALIVE"]


_DROPPED = (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError)
"""What a busy dashboard's answer can end in (a closed connection, a timeout): asked again."""


def _alive_nodes_or_none(head: RayHead) -> list[dict[str, Any]] | None:
    try:
        return alive_nodes(head)
    except _DROPPED:
        return None


@contextmanager
def ray_worker_node(
    head: RayHead,
    workdir: Path,
    *,
    num_cpus: int = 1,
    num_gpus: int = 0,
    resources: dict[str, float] | None = None,
) -> Iterator[str]:
    """Join a second node to ``head`` on this machine (``ray start --address``); stop it on exit.

    It gets its own temp dir and ports, so it is a separate raylet the scheduler treats like a
    node of a KubeRay worker group: ``resources`` is what that group would advertise.

    Yields:
        The new node's id (hex), once the head lists it alive.
    """
    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    before = {node["node_id"] for node in wait_for_nodes(head, 1)}
    for attempt in range(1, _NODE_START_ATTEMPTS + 1):
        node_port = free_port()
        log = workdir / f"ray-node-{node_port}.log"
        cmd = [
            str(Path(sys.executable).parent / "ray"),
            "start",
            f"--address={head.gcs_address}",
            "--block",
            *_resource_flags(num_cpus, num_gpus, resources or {}),
            "--disable-usage-stats",
            f"--temp-dir={Path('/tmp') / f'ray-node-{node_port}'}",
            *(f"--{flag}={value}" for flag, value in _node_ports().items()),
        ]
        proc = _start_blocking(cmd, _ray_env(head.token_path), log)
        try:
            node_id = _wait_for_new_node(head, before, proc, log)
        except _NodeExited:
            stop_process_group(proc)
            if attempt == _NODE_START_ATTEMPTS:
                raise
            continue
        try:
            yield node_id
        finally:
            stop_process_group(proc)
        return


_NODE_START_ATTEMPTS = 3
"""A node's ports are picked free before ``ray start`` binds them; another process on the
machine (a test worker's own Ray spawning workers) can take one in between, and the node exits
at once. Fresh ports on a second try get past that; a third failure is a real one."""


class _NodeExited(RuntimeError):
    """``ray start`` exited before its node joined (its log's last lines in the message)."""


def _log_tail(log: Path, lines: int = 15) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _wait_for_new_node(
    head: RayHead, before: set[str], proc: subprocess.Popen[bytes], log: Path
) -> str:
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise _NodeExited(
                f"ray worker node exited with {proc.returncode}; {log} ends:\n{_log_tail(log)}"
            )
        nodes = _alive_nodes_or_none(head) or []
        new = [node["node_id"] for node in nodes if node["node_id"] not in before]
        if new:
            return str(new[0])
        time.sleep(1)
    raise RuntimeError(f"ray worker node did not join {head.gcs_address} within 90 s; see {log}")


def wait_for_nodes(head: RayHead, count: int, timeout: float = 60) -> list[dict[str, Any]]:
    """The live nodes once at least ``count`` are listed (the dashboard answers before its own
    node has registered)."""
    deadline = time.monotonic() + timeout
    while (nodes := _alive_nodes_or_none(head)) is None or len(nodes) < count:
        if time.monotonic() > deadline:
            listed = "no answer" if nodes is None else f"{len(nodes)} live node(s)"
            raise RuntimeError(
                f"the Ray head at {head.dashboard_url} lists {listed}, not {count} live "
                f"node(s), after {timeout:.0f} s"
            )
        time.sleep(0.5)
    return nodes
