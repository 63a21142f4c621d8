"""The Airflow image's side of the pipeline, without Docker: laid out as
``docker/Dockerfile.airflow`` copies it, with only the packages it installs importable.

DAG parsing, the first task (``resolve_config`` with ``compute.plan: auto`` against an MLflow
server) and a Ray job through the operator and its trigger run in a subprocess where every
other installed distribution (torch, ray, deepspeed, transformers, the MLflow server's stack...)
fails to import (see ``tests/airflow_image.py``).
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from pipeline.devstack.ray_cluster import RayHead
from tests.airflow_image import REPO_ROOT, ImageLayout, lay_out_image, refused_modules

pytestmark = pytest.mark.integration

PUBLIC_MLFLOW = "https://mlflow.example.com"


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> ImageLayout:
    return lay_out_image(tmp_path_factory.mktemp("airflow-image"))


def _probe(layout: ImageLayout, spec: dict[str, Any], env: dict[str, str], tmp: Path) -> Any:
    spec_file = tmp / "spec.json"
    spec_file.write_text(json.dumps({"refused": refused_modules(layout.requirements), **spec}))
    # The official image's AIRFLOW_HOME is /opt/airflow: its dags/ and plugins/ are Airflow's.
    airflow_home = layout.path("/opt/airflow")
    env = {
        **os.environ,
        **layout.env,
        **env,
        "PYTHONPATH": os.pathsep.join(map(str, layout.editable)),
        "AIRFLOW__CORE__DAGS_FOLDER": str(airflow_home / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(airflow_home / "plugins"),
    }
    env.pop("PIPELINE_CONFIG", None)
    out = subprocess.run(
        [sys.executable, str(REPO_ROOT / "tests" / "airflow_image.py"), str(spec_file)],
        env=env,
        cwd=airflow_home,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_layout_and_packages_come_from_the_dockerfile(layout: ImageLayout) -> None:
    assert layout.base_image == "apache/airflow:3.3.2-python3.11"
    assert layout.requirements == ["apache-airflow==3.3.2", "domain-llm-pipeline[airflow]"]
    assert layout.editable == [layout.path("/opt/project")]
    for copied in ("opt/project/configs/demo.yaml", "opt/airflow/dags", "opt/airflow/plugins"):
        assert (layout.root / copied).exists(), copied
    refused = set(refused_modules(layout.requirements))
    assert {"torch", "ray", "deepspeed", "transformers", "flask", "pytest"} <= refused
    assert not {"airflow", "mlflow", "boto3", "httpx", "pydantic", "yaml"} & refused


def test_the_airflow_side_runs_with_only_the_image_packages(
    layout: ImageLayout,
    airflow_db: Path,
    mlflow_server: str,
    ray_head: RayHead,
    tmp_path: Path,
) -> None:
    result = tmp_path / "result.json"
    write_result = (
        f"import json, pathlib; pathlib.Path({str(result)!r}).write_text('{{\"ok\": 1}}')"
    )
    spec = {
        "dags_folder": str(layout.path("/opt/airflow/dags")),
        "resolve": {
            "config": str(layout.path("/opt/project/configs/demo.yaml")),
            "overrides": {
                "compute.plan": "auto",
                "storage.artifact_root": str(tmp_path / "artifacts"),
                "tracking.tracking_uri": mlflow_server,
                "tracking.artifact_location": None,
                "tracking.ui_url": PUBLIC_MLFLOW,
            },
            "key": "image-run",
        },
        "ray_job": {
            "entrypoint": f"{shlex.quote(sys.executable)} -c {shlex.quote(write_result)}",
            "conn_id": "ray_image",
            "result_uri": str(result),
            "run_id": f"image-{tmp_path.name}",
        },
    }
    env = {"AIRFLOW_CONN_RAY_IMAGE": ray_head.airflow_conn_uri()}
    seen = _probe(layout, spec, env, tmp_path)

    assert Path(seen["pipeline_file"]).is_relative_to(layout.root)  # the image's copy ran
    # Both DAGs import, finding their default config in the image's /opt/project/configs.
    assert seen["dags"] == {"errors": {}, "dags": ["domain_data_watch", "domain_llm_retraining"]}
    resolved = seen["resolve"]
    assert resolved["mlflow_run_url"].startswith(f"{PUBLIC_MLFLOW}/#/experiments/")
    assert set(resolved["plan"]) == {"cpt", "sft"}
    job = seen["ray_job"]
    assert job["status"] == "SUCCEEDED" and job["result"] == {"ok": 1}
    assert job["xcoms"]["ray_dashboard_url"].startswith(f"{ray_head.dashboard_url}/#/jobs/")
    # What was refused on the way were optional imports (pandas for MLflow, ...); nothing on
    # the Airflow side even tries the training stack.
    assert not {"torch", "ray", "deepspeed", "transformers"} & set(seen["refused_imports"])
