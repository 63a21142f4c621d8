"""Shared fixtures. Services are started here, never assumed to be running.

Airflow reads its settings when first imported, so the test AIRFLOW_HOME (its own SQLite DB,
separate from the demo's) is set at import time of this file, before any test module loads.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.localstack import RayHead, free_port
from pipeline.localstack import ray_head as start_ray_head

REPO_ROOT = Path(__file__).resolve().parent.parent
AIRFLOW_HOME = REPO_ROOT / ".local" / "airflow-test"
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
    port = free_port()
    cmd = [
        str(BIN / "mlflow"),
        "server",
        "--backend-store-uri",
        f"sqlite:///{root}/mlflow.db",
        "--artifacts-destination",
        str(root / "artifacts"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    log = (root / "server.log").open("wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2):
                    break
            except (urllib.error.URLError, ConnectionError) as err:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"mlflow server did not start; see {root / 'server.log'}"
                    ) from err
                time.sleep(1)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


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
