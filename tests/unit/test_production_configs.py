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
from pipeline.runs import check_no_literal_secrets, check_remote_safe, is_local_host

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
    return {int(str(p).split(":")[0]) for p in service.get("ports", [])}


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
