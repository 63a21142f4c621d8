"""Shared fixtures. Services are started here, never assumed to be running.

Airflow reads its settings when first imported, so the test AIRFLOW_HOME (its own SQLite DB,
separate from the demo's) is set at import time of this file, before any test module loads.
``make test`` runs the suite in two pytest-xdist workers, whole files to one worker: each worker
starts its own services and has its own AIRFLOW_HOME (one SQLite file takes one writer).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.devstack.host import free_port
from pipeline.devstack.mlflow_server import mlflow_server as start_mlflow_server
from pipeline.devstack.postgres import PostgresServer
from pipeline.devstack.postgres import postgres_server as start_postgres_server
from pipeline.devstack.ray_cluster import RayHead
from pipeline.devstack.ray_cluster import ray_head as start_ray_head

REPO_ROOT = Path(__file__).resolve().parent.parent
_XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER")
AIRFLOW_HOME = (
    REPO_ROOT / ".local" / (f"airflow-test-{_XDIST_WORKER}" if _XDIST_WORKER else "airflow-test")
)
os.environ.update(
    {
        "AIRFLOW_HOME": str(AIRFLOW_HOME),
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO_ROOT / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO_ROOT / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "PIPELINE_RAY_POLL_INTERVAL": "2",
    }
)
BIN = Path(sys.executable).parent


@pytest.fixture(scope="session", autouse=True)
def in_process_ray() -> None:
    """The local Ray that in-process ``prepare_data`` runs join (``engine.connect``), started
    with each worker's first test. ``ray.init`` forks its GCS and raylet from this process
    (with a ``preexec_fn``, so never by vfork): started later, after the modules that train
    many DeepSpeed engines in-process (tens of GB mapped), the fork fails with ENOMEM."""
    from pipeline.cpus import usable_cpus
    from pipeline.data import engine

    engine.connect(usable_cpus())


@pytest.fixture(scope="session")
def airflow_db() -> Path:
    """A migrated Airflow metadata DB (SQLite) for ``dag.test()``."""
    AIRFLOW_HOME.mkdir(parents=True, exist_ok=True)
    if not (AIRFLOW_HOME / "airflow.db").exists():
        subprocess.run([str(BIN / "airflow"), "db", "migrate"], check=True, capture_output=True)
    return AIRFLOW_HOME


@pytest.fixture(scope="session")
def ray_head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayHead]:
    """A private token-auth Ray head for the whole session (``ray stop`` would hit others)."""
    with start_ray_head(tmp_path_factory.mktemp("ray-head")) as head:
        yield head


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real ``mlflow server`` over HTTP (SQLite backend, local artifact store); yields its URL."""
    root = tmp_path_factory.mktemp("mlflow-server")
    with start_mlflow_server(root, f"sqlite:///{root}/mlflow.db", str(root / "artifacts")) as url:
        yield url


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresServer]:
    """A private PostgreSQL server on a free port; each test creates the databases it needs."""
    with start_postgres_server(tmp_path_factory.mktemp("postgres")) as server:
        yield server


@pytest.fixture(scope="session")
def s3_server() -> Iterator[dict[str, str]]:
    """A real S3 endpoint (moto's server on a free port) and the AWS environment that points
    boto3 at it and at nothing else; tests apply it to os.environ or to a Ray job's env."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield {
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_CONFIG_FILE": "/nonexistent/aws-config",
            "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/aws-credentials",
        }
    finally:
        server.stop()
