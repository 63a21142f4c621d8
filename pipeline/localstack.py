"""Local stand-ins for production services: a Ray head with token authentication, extra nodes
joined to it, and a PostgreSQL server.

``make demo`` and the test suite start their own head here and stop it afterwards; nothing is
assumed to be running. The head runs in its own process group (``ray start --block``) so that
stopping it never touches another Ray cluster on the same machine, which ``ray stop`` would.
"""

from __future__ import annotations

import ipaddress
import json
import os
import pwd
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LOOPBACK = "127.0.0.1"


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
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


def this_host_address() -> str | None:
    """A non-loopback IPv4 address of this machine's own interfaces, or None when it has none.

    A service bound to it is reached the way another machine reaches it: the Airflow side
    (``pipeline.runs.is_local_host``) counts it as a remote cluster.
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
            ``this_host_address()`` makes it a cluster Airflow treats as remote.
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
        _stop(proc)


def alive_nodes(head: RayHead) -> list[dict[str, Any]]:
    """The cluster's live nodes from the dashboard's state API: ``node_id``, ``is_head_node``,
    ``resources_total``, ``labels``..."""
    token = head.token_path.read_text().strip()
    request = urllib.request.Request(
        f"{head.dashboard_url}/api/v0/nodes?detail=1&limit=1000",
        headers={"Authorization": f"Bearer {token}"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        nodes: list[dict[str, Any]] = json.load(response)["data"]["result"]["result"]
    return [node for node in nodes if node.get("state") == "ALIVE"]


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
        yield _wait_for_new_node(head, before, proc, log)
    finally:
        _stop(proc)


def _wait_for_new_node(
    head: RayHead, before: set[str], proc: subprocess.Popen[bytes], log: Path
) -> str:
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ray worker node exited with {proc.returncode}; see {log}")
        new = [node["node_id"] for node in alive_nodes(head) if node["node_id"] not in before]
        if new:
            return str(new[0])
        time.sleep(1)
    raise RuntimeError(f"ray worker node did not join {head.gcs_address} within 90 s; see {log}")


def wait_for_nodes(head: RayHead, count: int, timeout: float = 60) -> list[dict[str, Any]]:
    """The live nodes once at least ``count`` are listed (the dashboard answers before its own
    node has registered)."""
    deadline = time.monotonic() + timeout
    while len(nodes := alive_nodes(head)) < count:
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"the Ray head at {head.dashboard_url} lists {len(nodes)} live node(s), "
                f"not {count}, after {timeout:.0f} s"
            )
        time.sleep(0.5)
    return nodes


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


POSTGRES_BIN = Path(os.environ.get("PIPELINE_POSTGRES_BIN", "/usr/lib/postgresql/15/bin"))
"""Where ``initdb`` and ``pg_ctl`` are (Debian's postgresql-15 package by default)."""


@dataclass(frozen=True)
class PostgresServer:
    host: str
    port: int
    user: str
    """Superuser; connections from ``host`` are trusted (no password)."""

    def dsn(self, database: str) -> str:
        """libpq URL of ``database`` (``psql``, ``psycopg2.connect``)."""
        return f"postgresql://{self.user}@{self.host}:{self.port}/{database}"

    def sqlalchemy_url(self, database: str) -> str:
        """SQLAlchemy URL of ``database`` through psycopg2 (Airflow's and MLflow's stores);
        SQLAlchemy 2.1 reads a bare ``postgresql://`` as psycopg 3, which is not installed."""
        return f"postgresql+psycopg2://{self.user}@{self.host}:{self.port}/{database}"

    def create_database(self, name: str) -> None:
        createdb = str(POSTGRES_BIN / "createdb")
        cmd = [createdb, "-h", self.host, "-p", str(self.port), "-U", self.user, name]
        subprocess.run(cmd, check=True, capture_output=True)


def _as_postgres_user(cmd: list[str]) -> None:
    """Run a server command as the data dir's owner: PostgreSQL refuses to run as root."""
    if os.geteuid() == 0:
        cmd = ["su", "postgres", "-s", "/bin/bash", "-c", shlex.join(cmd)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(
            f"{shlex.join(cmd)} failed ({result.returncode}): {result.stderr or result.stdout}"
        )


@contextmanager
def postgres_server(workdir: Path) -> Iterator[PostgresServer]:
    """Start a private PostgreSQL server on a free loopback port and stop it on exit.

    The cluster lives in a fresh folder under /tmp (as root, owned by the ``postgres`` user,
    who cannot enter root's pytest folders), with its socket there too, so it touches no
    system cluster; it is deleted on exit, after its log is copied to ``workdir``.

    Yields:
        The server: connect as its superuser without a password; ``create_database`` per use.
    """
    if not (POSTGRES_BIN / "initdb").is_file():
        raise RuntimeError(
            f"no PostgreSQL server binaries in {POSTGRES_BIN}: install the server (Debian: "
            "apt-get install postgresql-15) or set PIPELINE_POSTGRES_BIN to its bin folder"
        )
    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    data_dir = Path(tempfile.mkdtemp(prefix="pipeline-pg-"))
    if os.geteuid() == 0:
        owner = pwd.getpwnam("postgres")
        os.chown(data_dir, owner.pw_uid, owner.pw_gid)
        user = "postgres"
    else:
        user = pwd.getpwuid(os.geteuid()).pw_name
    port = free_port()
    log = data_dir / "server.log"
    pg_ctl = str(POSTGRES_BIN / "pg_ctl")
    options = f"-p {port} -k {data_dir} -c listen_addresses={LOOPBACK}"
    initdb = [str(POSTGRES_BIN / "initdb"), "-D", str(data_dir), "-A", "trust", "-U", user]
    try:
        _as_postgres_user(initdb)
        _as_postgres_user(
            [pg_ctl, "-D", str(data_dir), "-o", options, "-l", str(log), "-w", "start"]
        )
        try:
            yield PostgresServer(host=LOOPBACK, port=port, user=user)
        finally:
            _as_postgres_user([pg_ctl, "-D", str(data_dir), "-m", "fast", "-w", "stop"])
    finally:
        if log.exists():
            shutil.copyfile(log, workdir / f"postgres-{port}.log")
        shutil.rmtree(data_dir, ignore_errors=True)


@contextmanager
def mlflow_server(
    workdir: Path,
    backend_store_uri: str,
    artifacts_destination: str,
    *,
    host: str = LOOPBACK,
    env: dict[str, str] | None = None,
) -> Iterator[str]:
    """Run ``mlflow server`` (one worker, serving artifacts) on a free port; stop it on exit.

    Args:
        workdir: the server's working directory and log folder.
        backend_store_uri: runs and registry (``sqlite:///...``, ``postgresql://...``).
        artifacts_destination: where the server stores the artifacts it proxies (a folder or
            ``s3://bucket/prefix``; for S3 ``env`` carries ``MLFLOW_S3_ENDPOINT_URL`` and keys).
        host: address to bind; clients must call it by that address (the server refuses
            other ``Host`` headers).
        env: environment of the server over this one's.

    Yields:
        The server's URL, once ``/health`` answers.
    """
    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    url = f"http://{host}:{port}"
    cmd = [
        str(Path(sys.executable).parent / "mlflow"),
        "server",
        f"--backend-store-uri={backend_store_uri}",
        f"--artifacts-destination={artifacts_destination}",
        f"--host={host}",
        f"--port={port}",
        "--workers=1",
    ]
    if host != LOOPBACK:  # MLflow's default allows loopback and private addresses only
        cmd.append(f"--allowed-hosts={host}:{port},{host}")
    log = workdir / f"mlflow-server-{port}.log"
    with log.open("wb") as log_file:
        proc = subprocess.Popen(
            cmd,
            env={**os.environ, **(env or {})},
            cwd=workdir,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2):
                    break
            except (urllib.error.URLError, ConnectionError) as err:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"mlflow server did not start; see {log}") from err
                time.sleep(1)
        yield url
    finally:
        _stop(proc)
