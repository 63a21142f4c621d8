"""The whole DAG against a cluster Airflow must treat as remote, sharing only S3 and MLflow.

What runs, all real servers on this machine but reached as another machine would reach them:
- a private token-auth Ray head bound to this machine's own non-loopback address (so
  ``ray_default`` is not a local host and the first task applies ``check_remote_safe``), with
  the S3 credentials in its environment, as a KubeRay pod's spec gives them;
- S3 (moto's server): the input data, ``storage.artifact_root`` and MLflow's artifacts;
- ``mlflow server`` on that address, its backend store on PostgreSQL, artifacts on S3;
- Airflow's metadata DB on PostgreSQL: ``airflow db migrate`` and ``dag.test()`` run in a
  process of their own (``tests/e2e/dag_run_process.py``), since the session's Airflow is on
  SQLite and Airflow's settings are process-global.

The run is the demo config, short (4 CPT, 3 SFT steps, a small eval); it has no champion to
beat, so it must promote. Nothing may land in a local folder.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline.devstack.host import this_host_address
from pipeline.devstack.mlflow_server import mlflow_server
from pipeline.devstack.postgres import PostgresServer
from pipeline.devstack.ray_cluster import RayHead, ray_head
from pipeline.preflight import STAGES, is_local_host
from tests.chat_webhook import ChatWebhook, chat_webhook

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

REPO_ROOT = Path(__file__).resolve().parents[2]
DEMO_DATA = REPO_ROOT / "configs" / "demo_data"
BUCKET = "remote-cluster"
CPT_STEPS, SFT_STEPS = 4, 3
MODEL = "domain-llm"
LOSSES = {
    "continued_pretraining": [6.943106, 6.823287, 6.644735, 6.445851],
    "instruction_finetuning": [6.779917, 6.633105, 6.483918],
}
"""Per-step loss at seed 0 (demo model and data, two gloo workers, ZeRO-3 with CPU offload):
the run through S3 trains what the local path does. CPT starts at the random init's
ln(1024) = 6.93 nats."""


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


def _upload(s3: Any, local: Path, key: str) -> str:
    s3.upload_file(str(local), BUCKET, key)
    return f"s3://{BUCKET}/{key}"


@pytest.fixture(scope="module")
def config_path(s3: Any, tracking_url: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """configs/demo.yaml, short, with every input and output on S3 or the MLflow server."""
    raw = yaml.safe_load((REPO_ROOT / "configs" / "demo.yaml").read_text())
    raw["data"]["domain_corpus"] = _upload(s3, DEMO_DATA / "domain.jsonl", "data/domain.jsonl")
    raw["data"]["instructions"] = _upload(
        s3, DEMO_DATA / "instructions.jsonl", "data/instructions.jsonl"
    )
    raw["cpt"]["max_steps"], raw["sft"]["max_steps"] = CPT_STEPS, SFT_STEPS
    raw["eval"].update(
        max_documents=8,
        max_generations=2,
        max_new_tokens=8,
        bootstrap_samples=100,
        general_corpus=_upload(
            s3, REPO_ROOT / "configs" / "general_data" / "general.jsonl", "data/general.jsonl"
        ),
    )
    raw["storage"] = {"artifact_root": f"s3://{BUCKET}/artifacts"}
    # No artifact_location: the server stores artifacts on S3 and proxies them.
    raw["tracking"] = {
        "tracking_uri": tracking_url,
        "artifact_location": None,
        "ui_url": tracking_url,
        "registered_model": MODEL,
    }
    path = tmp_path_factory.mktemp("remote-config") / "remote.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _airflow_env(
    home: Path, database_url: str, s3_server: dict[str, str], hook: ChatWebhook
) -> dict[str, str]:
    """The Airflow process's environment: its own home and PostgreSQL DB, nothing of the
    session's Airflow settings; S3 credentials as the Airflow deployment would have them."""
    inherited = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "PIPELINE"))}
    return {
        **inherited,
        **s3_server,
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": database_url,
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO_ROOT / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO_ROOT / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "PIPELINE_RAY_POLL_INTERVAL": "2",
        "PIPELINE_NOTIFY_CONN": "pipeline_notify",
        "AIRFLOW_CONN_PIPELINE_NOTIFY": hook.url,
        "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), str(REPO_ROOT / "plugins")]),
    }


@pytest.fixture(scope="module")
def notified() -> Iterator[ChatWebhook]:
    with chat_webhook() as hook:
        yield hook


@pytest.fixture(scope="module")
def dag_run(
    postgres_server: PostgresServer,
    s3_server: dict[str, str],
    remote_head: RayHead,
    config_path: Path,
    workdirs: dict[str, Path],
    notified: ChatWebhook,
) -> dict[str, Any]:
    """``airflow db migrate`` and one ``dag.test()`` run on PostgreSQL; the run's summary."""
    postgres_server.create_database("airflow")
    database_url = postgres_server.sqlalchemy_url("airflow")
    home = workdirs["airflow"]
    home.mkdir(parents=True)
    env = _airflow_env(home, database_url, s3_server, notified)
    airflow = str(Path(sys.executable).parent / "airflow")
    _run_logged("db_migrate", [airflow, "db", "migrate"], env, home)
    summary_path = home / "summary.json"
    head = json.dumps({k: str(v) for k, v in asdict(remote_head).items()})
    conf = json.dumps({"config": str(config_path)})
    cmd = [sys.executable, "-m", "tests.e2e.dag_run_process", conf, head, str(summary_path)]
    _run_logged("dag_test", cmd, env, home)
    summary: dict[str, Any] = json.loads(summary_path.read_text())
    return summary


def _run_logged(name: str, cmd: list[str], env: dict[str, str], cwd: Path) -> None:
    """Run ``cmd`` in ``cwd``, its output to ``<cwd>/<name>.log``; a failure shows its end."""
    log = cwd / f"{name}.log"
    with log.open("wb") as out:
        done = subprocess.run(cmd, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:])
        pytest.fail(f"{name} exited {done.returncode}; {log} ends:\n{tail}")


def _keys(s3: Any, prefix: str) -> list[str]:
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return [obj["Key"] for page in pages for obj in page.get("Contents", [])]


def _read_json(s3: Any, key: str) -> Any:
    return json.loads(s3.get_object(Bucket=BUCKET, Key=key)["Body"].read())


def _query(postgres_server: PostgresServer, database: str, sql: str, *args: Any) -> list[Any]:
    import psycopg2

    with psycopg2.connect(postgres_server.dsn(database)) as conn, conn.cursor() as cur:
        cur.execute(sql, args)
        rows: list[Any] = cur.fetchall()
    conn.close()
    return rows


def test_every_stage_succeeds_on_postgres_airflow_against_the_remote_head(
    dag_run: dict[str, Any], node_ip: str, postgres_server: PostgresServer
) -> None:
    assert dag_run["metadata_db"] == "postgresql"
    assert dag_run["ray_host"] == node_ip and not is_local_host(dag_run["ray_host"])
    assert dag_run["state"] == "success"
    assert dag_run["tasks"] == dict.fromkeys(["resolve_config", *STAGES], "success")
    # The same states, read back from Airflow's tables on the PostgreSQL server.
    rows = _query(
        postgres_server,
        "airflow",
        "select task_id, state from task_instance where run_id = %s",
        dag_run["run_id"],
    )
    assert dict(rows) == dag_run["tasks"]
    (state,) = _query(
        postgres_server, "airflow", "select state from dag_run where run_id = %s", dag_run["run_id"]
    )
    assert state == ("success",)


def test_stage_results_and_checkpoints_are_in_the_bucket(
    dag_run: dict[str, Any], s3: Any, tracking_url: str
) -> None:
    prefix = f"artifacts/{dag_run['run_key']}/"
    keys = [key.removeprefix(prefix) for key in _keys(s3, prefix)]
    for stage in STAGES:
        assert f"{stage}/result.json" in keys and f"{stage}/_SUCCESS" in keys, stage
    assert {"config.yaml", "run.json", "evaluate/report/report.html"} <= set(keys)
    results = {s: _read_json(s3, f"{prefix}{s}/result.json") for s in STAGES}
    assert {r["status"] for r in results.values()} == {"succeeded"}
    # Every output a stage handed on is in the run's folder of the bucket (or names the model).
    outputs = {k: v for r in results.values() for k, v in r["outputs"].items()}
    elsewhere = {k: v for k, v in outputs.items() if not v.startswith(f"s3://{BUCKET}/{prefix}")}
    assert elsewhere == {"registered_model": MODEL, "model_version": "1"}
    # The report link a person follows points at the MLflow server, not at a local file.
    assert results["evaluate"]["report_url"].startswith(f"{tracking_url}/#/experiments/")

    for stage, losses in LOSSES.items():
        steps = len(losses)
        metrics = results[stage]["metrics"]
        assert metrics["steps"] == steps
        assert metrics["loss_history"] == pytest.approx(losses, abs=1e-5), (
            f"{stage}: {metrics['loss_history']}"
        )
        checkpoints = f"{stage}/checkpoints/"
        complete = [k for k in keys if k.startswith(checkpoints) and k.endswith("/_COMPLETE")]
        # One series (one fingerprint folder), checkpointed after the last step.
        assert [k.split("/")[-2] for k in complete] == [f"step-{steps:07d}"], complete
        (latest,) = [k for k in keys if k.startswith(checkpoints) and k.endswith("/latest")]
        pointer = s3.get_object(Bucket=BUCKET, Key=prefix + latest)["Body"].read().decode()
        assert pointer.strip() == f"step-{steps:07d}"

    manifest = _read_json(s3, f"{prefix}prepare_data/data/manifest.json")
    domain_lines = len((DEMO_DATA / "domain.jsonl").read_text().splitlines())
    assert manifest["counts"]["corpora"]["domain"]["read"] == domain_lines
    assert [s["uri"] for s in manifest["sources"]["domain"]] == [f"s3://{BUCKET}/data/domain.jsonl"]


def test_champion_is_registered_on_the_postgres_backed_server(
    dag_run: dict[str, Any],
    tracking_url: str,
    postgres_server: PostgresServer,
    s3: Any,
    notified: ChatWebhook,
) -> None:
    from mlflow import MlflowClient

    prefix = f"artifacts/{dag_run['run_key']}/"
    promote = _read_json(s3, f"{prefix}promote/result.json")
    report = _read_json(s3, promote["outputs"]["eval_report"].removeprefix(f"s3://{BUCKET}/"))
    assert report["reference"] == "base" and report["passed"] is True, report["gates"]
    assert promote["skip_reason"] is None

    client = MlflowClient(tracking_uri=tracking_url, registry_uri=tracking_url)
    champion = client.get_model_version_by_alias(MODEL, "champion")
    assert str(champion.version) == promote["outputs"]["model_version"] == "1"
    assert champion.tags["pipeline.run_key"] == dag_run["run_key"]
    # The aliases live in the server's PostgreSQL store (challenger always moves with it) ...
    aliases = _query(
        postgres_server, "mlflow", "select name, alias, version from registered_model_aliases"
    )
    assert sorted(aliases) == [(MODEL, "challenger", 1), (MODEL, "champion", 1)]
    # ... and every stage's run finished under one parent there.
    runs = {
        s: client.get_run(_read_json(s3, f"{prefix}{s}/result.json")["mlflow_run_id"])
        for s in STAGES
    }
    assert {r.info.status for r in runs.values()} == {"FINISHED"}
    (parent_id,) = {r.data.tags["mlflow.parentRunId"] for r in runs.values()}
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["pipeline.decision"] == "promoted"
    # The registered weights went through the server to its S3 destination, once.
    weights = [k for k in _keys(s3, "mlflow/") if k.endswith("model.safetensors")]
    assert len(weights) == 1, weights
    # The notifier read the decision from the S3 artifact root.
    (message,) = notified.received
    assert message["text"].splitlines()[0] == (
        f"domain_llm_retraining run {dag_run['run_id']} succeeded: {MODEL} v1 promoted to champion."
    )


def test_next_run_fetches_the_champion_through_the_server(
    dag_run: dict[str, Any], tracking_url: str, s3: Any, tmp_path: Path
) -> None:
    """What the next run's evaluate does on a Ray node: the champion comes back from the
    registry (the server proxying S3) with the SFT model's weights and its tokenizer."""
    import numpy as np
    from safetensors.numpy import load_file

    from pipeline import tracking
    from pipeline.config import TrackingConfig

    config = TrackingConfig(
        tracking_uri=tracking_url,
        artifact_location=None,
        ui_url=tracking_url,
        registered_model=MODEL,
    )
    folder = Path(tracking.champion_model_dir(config, 1, str(tmp_path / "champion")))
    sft = _read_json(s3, f"artifacts/{dag_run['run_key']}/instruction_finetuning/result.json")
    key = sft["outputs"]["sft_model"].removeprefix(f"s3://{BUCKET}/") + "/model.safetensors"
    s3.download_file(BUCKET, key, str(tmp_path / "sft.safetensors"))
    champion, trained = (
        load_file(folder / "model.safetensors"),
        load_file(tmp_path / "sft.safetensors"),
    )
    assert sorted(champion) == sorted(trained)
    assert all(np.array_equal(champion[name], trained[name]) for name in trained)
    assert (folder / "tokenizer.json").is_file()


def test_nothing_was_written_to_a_local_folder(
    dag_run: dict[str, Any], workdirs: dict[str, Path]
) -> None:
    """No process wrote artifacts, shards, checkpoints or an MLflow store next to itself, nor
    into the repository's default local artifact root."""
    assert not (REPO_ROOT / ".local" / "artifacts" / dag_run["run_key"]).exists()
    local = [
        path
        for folder in workdirs.values()
        for path in folder.rglob("*")
        if path.name in {"mlruns", "mlartifacts", "artifacts", dag_run["run_key"]}
    ]
    assert local == []
