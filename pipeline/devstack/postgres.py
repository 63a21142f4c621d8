"""A private PostgreSQL server on a free loopback port: Airflow's and MLflow's database as in
production (the remote-cluster test runs both on it), touching no system cluster."""

from __future__ import annotations

import os
import pwd
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pipeline.devstack.host import LOOPBACK, free_port

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
