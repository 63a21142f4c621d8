"""The servers of the end-to-end module, each started for it: what a production deployment
has, reached as another machine would reach it.

- S3 (the session's moto server): the first run's inputs, ``storage.artifact_root`` and
  MLflow's artifacts, in this module's bucket;
- ``mlflow server`` on this machine's own non-loopback address, its backend store on
  PostgreSQL, artifacts on S3: both runs' tracking and registry;
- a private token-auth Ray head bound to that address (so ``ray_default`` is not a local host
  and the first task applies ``check_remote_safe``), with the S3 credentials in its
  environment, as a KubeRay pod's spec gives them;
- a local chat webhook for the runs' notifications.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pipeline.devstack.host import this_host_address
from pipeline.devstack.mlflow_server import mlflow_server
from pipeline.devstack.postgres import PostgresServer
from pipeline.devstack.ray_cluster import RayHead, ray_head
from pipeline.preflight import is_local_host
from tests.chat_webhook import ChatWebhook, chat_webhook

BUCKET = "remote-cluster"


@pytest.fixture(scope="module")
def node_ip() -> str:
    """This machine's own interface address: what a remote cluster's address looks like."""
    address = this_host_address()
    if address is None:
        pytest.skip("this machine has no non-loopback IPv4 address to bind the Ray head to")
    assert not is_local_host(address)
    return address


@pytest.fixture(scope="module")
def s3(s3_server: dict[str, str]) -> Any:
    """A boto3 client of the session's S3 server, with this module's bucket created."""
    import boto3

    client = boto3.session.Session().client(
        "s3",
        endpoint_url=s3_server["AWS_ENDPOINT_URL"],
        aws_access_key_id=s3_server["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=s3_server["AWS_SECRET_ACCESS_KEY"],
        region_name=s3_server["AWS_DEFAULT_REGION"],
    )
    client.create_bucket(Bucket=BUCKET)
    return client


@pytest.fixture(scope="module")
def workdirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The working directory of each process: where a relative path would have landed."""
    root = tmp_path_factory.mktemp("remote")
    return {name: root / name for name in ("ray", "mlflow", "airflow")}


@pytest.fixture(scope="module")
def tracking_url(
    node_ip: str,
    postgres_server: PostgresServer,
    s3_server: dict[str, str],
    s3: Any,
    workdirs: dict[str, Path],
) -> Iterator[str]:
    """MLflow server on the node's address: runs and registry on PostgreSQL, artifacts on S3."""
    postgres_server.create_database("mlflow")
    store = postgres_server.sqlalchemy_url("mlflow")
    env = {**s3_server, "MLFLOW_S3_ENDPOINT_URL": s3_server["AWS_ENDPOINT_URL"]}
    artifacts = f"s3://{BUCKET}/mlflow"
    with mlflow_server(workdirs["mlflow"], store, artifacts, host=node_ip, env=env) as url:
        yield url


@pytest.fixture(scope="module")
def remote_head(
    node_ip: str, s3_server: dict[str, str], workdirs: dict[str, Path]
) -> Iterator[RayHead]:
    with ray_head(workdirs["ray"], host=node_ip, env=s3_server, cwd=workdirs["ray"]) as head:
        assert not is_local_host(head.dashboard_url)
        yield head


@pytest.fixture(scope="module")
def notified() -> Iterator[ChatWebhook]:
    """Run notifications go to a local chat webhook: the connection is also set in this
    process's environment, which ``airflow standalone`` inherits."""
    names = ("PIPELINE_NOTIFY_CONN", "AIRFLOW_CONN_PIPELINE_NOTIFY")
    saved = {name: os.environ.get(name) for name in names}
    with chat_webhook() as hook:
        os.environ.update({names[0]: "pipeline_notify", names[1]: hook.url})
        try:
            yield hook
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
