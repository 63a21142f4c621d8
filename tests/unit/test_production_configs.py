"""The production example and the compose stack pass every check a remote cluster applies, and
the compose file and its config agree on services, buckets, ports and resources."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import yaml

from pipeline.config import REPO_ROOT, load_config
from pipeline.preflight import check_no_literal_secrets, check_remote_safe, is_local_host

COMPOSE = REPO_ROOT / "docker" / "compose.yaml"
EXAMPLE = REPO_ROOT / "configs" / "production.example.yaml"


def test_the_production_example_passes_the_remote_cluster_checks() -> None:
    config = load_config(EXAMPLE)
    check_remote_safe(config, str(EXAMPLE))
    check_no_literal_secrets(config, str(EXAMPLE))
    assert config.tracking.ui_url and config.tracking.ui_url.startswith("https://")
    assert config.orchestration.driver_resources == {"driver": 1.0}
    assert config.orchestration.schedule == "weekly_or_asset"
    assert config.compute.placement_timeout_minutes == 30
    assert set(config.orchestration.stage_timeout_minutes) == {
        "prepare_data",
        "continued_pretraining",
        "instruction_finetuning",
        "evaluate",
        "promote",
    }


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    services: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())["services"]
    return services


def _published(service: dict[str, Any]) -> set[int]:
    # "127.0.0.1:5000:5000": the host port is the one before the container port.
    return {int(str(p).split(":")[-2]) for p in service.get("ports", [])}


def _flag(command: list[str], name: str) -> str:
    (value,) = [c.split("=", 1)[1] for c in command if c.startswith(f"--{name}=")]
    return value


def test_the_compose_stack_runs_its_config_as_a_remote_cluster(compose: dict[str, Any]) -> None:
    airflow_env = compose["airflow"]["environment"]
    config_path = Path(airflow_env["PIPELINE_CONFIG"].replace("/opt/project", str(REPO_ROOT)))
    config = load_config(config_path)
    # The Ray head is another container: the first task applies the remote checks.
    ray_conn = urlsplit(airflow_env["AIRFLOW_CONN_RAY_DEFAULT"])
    assert ray_conn.hostname == "ray-head" and not is_local_host(ray_conn.netloc)
    check_remote_safe(config, str(config_path))
    check_no_literal_secrets(config, str(config_path))

    # The connection reaches the head's dashboard; its links use the published port.
    head = compose["ray-head"]["command"]
    assert ray_conn.port == int(_flag(head, "dashboard-port"))
    public = urlsplit(parse_qs(ray_conn.query)["public_url"][0])
    assert public.hostname == "localhost" and public.port in _published(compose["ray-head"])
    # Tracking: the MLflow service by name inside, its published port for a browser.
    tracking, ui = urlsplit(config.tracking.tracking_uri), urlsplit(config.tracking.ui_url or "")
    mlflow = compose[tracking.hostname or ""]
    assert mlflow["command"][:2] == ["mlflow", "server"]
    assert tracking.port == int(_flag(mlflow["command"], "port"))
    assert ui.hostname == "localhost" and ui.port in _published(mlflow)

    # Every bucket the config names is created by init, and its data files are uploaded there.
    script = "\n".join(compose["init"]["command"])
    (buckets,) = re.findall(r"for name in \(([^)]*)\):\n\s+if name not in existing", script)
    created = set(re.findall(r'"([^"]+)"', buckets))
    (files,) = re.findall(r"for name in \(([^)]*)\):\n\s+s3.upload_file", script)
    (target,) = re.findall(
        r'upload_file\(f"/opt/project/([^{]+)\{name\}", "(\w+)", f"([^{]*)', script
    )
    uploaded = {
        f"s3://{target[1]}/{target[2]}{name}": REPO_ROOT / target[0] / name
        for name in re.findall(r'"([^"]+)"', files)
    }
    assert config.storage.artifact_root.split("/")[2] in created
    for uri in (config.data.domain_corpus, config.data.instructions):
        assert isinstance(uri, str) and uri.split("/")[2] in created
        assert uri in uploaded and uploaded[uri].is_file(), uri
    # The head advertises whatever the drivers ask for (nothing extra here: one CPU host).
    resources = (
        yaml.safe_load(_flag(head, "resources"))
        if any(c.startswith("--resources=") for c in head)
        else {}
    )
    for name, amount in config.orchestration.driver_resources.items():
        assert resources.get(name, 0) >= amount, name
    # prepare_data's tasks too: a resource no node advertises would leave them pending.
    for name, amount in config.data.worker_resources.items():
        assert resources.get(name, 0) >= amount, name


REQUIRED_VARIABLE = re.compile(r"^\$\{(?P<name>[A-Z_][A-Z0-9_]*):\?[^}]+\}$")


def _credentials(environment: dict[str, Any]) -> dict[str, str]:
    """The entries of a service's environment that hold a credential."""
    from pipeline.redact import is_secret_key

    names = ("MINIO_ROOT_USER", "AWS_ACCESS_KEY_ID")  # MinIO's user is half its credential
    return {k: str(v) for k, v in environment.items() if is_secret_key(k) or k in names}


def test_the_compose_stack_publishes_on_loopback_with_required_credentials(
    compose: dict[str, Any],
) -> None:
    published = {name: service.get("ports", []) for name, service in compose.items()}
    assert published == {
        "minio": ["127.0.0.1:9000:9000", "127.0.0.1:9001:9001"],
        "init": [],
        "mlflow": ["127.0.0.1:5000:5000"],
        "ray-head": ["127.0.0.1:8265:8265"],
        "postgres": [],
        "airflow": ["127.0.0.1:8080:8080"],
    }
    # Every credential is a required variable (compose refuses to start without it): no default.
    found = {
        f"{name}.{key}": value
        for name, service in compose.items()
        for key, value in _credentials(service.get("environment") or {}).items()
    }
    assert set(found) == {
        "minio.MINIO_ROOT_USER", "minio.MINIO_ROOT_PASSWORD",
        "mlflow.AWS_ACCESS_KEY_ID", "mlflow.AWS_SECRET_ACCESS_KEY",
        "mlflow.MLFLOW_AUTH_ADMIN_PASSWORD", "mlflow.MLFLOW_FLASK_SERVER_SECRET_KEY",
        "init.AWS_ACCESS_KEY_ID", "init.AWS_SECRET_ACCESS_KEY",
        "ray-head.AWS_ACCESS_KEY_ID", "ray-head.AWS_SECRET_ACCESS_KEY",
        "ray-head.MLFLOW_TRACKING_PASSWORD", "ray-head.RAY_AUTH_TOKEN_PATH",
        "postgres.POSTGRES_PASSWORD",
        "airflow.AWS_ACCESS_KEY_ID", "airflow.AWS_SECRET_ACCESS_KEY",
        "airflow.MLFLOW_TRACKING_PASSWORD",
    }  # fmt: skip
    found.pop("ray-head.RAY_AUTH_TOKEN_PATH")  # a path to the token init generates
    required = {k: m["name"] for k, v in found.items() if (m := REQUIRED_VARIABLE.match(v))}
    assert set(required) == set(found)
    assert set(required.values()) == {
        "MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD", "MLFLOW_ADMIN_PASSWORD", "POSTGRES_PASSWORD",
        "MLFLOW_FLASK_SERVER_SECRET_KEY",
    }  # fmt: skip
    airflow_db = compose["airflow"]["environment"]["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]
    assert airflow_db == (
        "postgresql+psycopg2://airflow:${POSTGRES_PASSWORD:?set POSTGRES_PASSWORD}"
        "@postgres:5432/airflow"
    )
    assert "minioadmin" not in COMPOSE.read_text()


def test_the_compose_mlflow_server_requires_a_login_and_its_clients_have_one(
    compose: dict[str, Any],
) -> None:
    mlflow = compose["mlflow"]
    assert _flag(mlflow["command"], "app-name") == "basic-auth"
    # The app needs Flask-WTF: the image the service runs installs MLflow's auth extra.
    assert mlflow["image"] == "domain-llm/ray-gpu:dev"
    gpu_requirements = (REPO_ROOT / "docker" / "requirements-gpu.txt").read_text().splitlines()
    assert "mlflow[auth]==3.17.2" in gpu_requirements
    assert mlflow["environment"]["MLFLOW_AUTH_ADMIN_USERNAME"] == "admin"
    # The auth app's user store (sqlite:///basic_auth.db, relative) lands in the volume.
    assert mlflow["working_dir"] == "/mlflow" and "mlflow-db:/mlflow" in mlflow["volumes"]
    admin_password = mlflow["environment"]["MLFLOW_AUTH_ADMIN_PASSWORD"]
    for client in ("airflow", "ray-head"):
        env = compose[client]["environment"]
        assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
        assert env["MLFLOW_TRACKING_USERNAME"] == "admin"
        assert env["MLFLOW_TRACKING_PASSWORD"] == admin_password
