"""``pipeline demo``: the whole DAG once with ``dag.test()`` on a private Ray head, then where to
look (the promotion decision, the artifacts, the jobs' driver logs, MLflow).

Also what the demo does to Airflow's own database so that nothing of it outlives its head
(``retire_test_runs``, ``forget_ray_job_links``), and its one use of the head's Jobs API
(``keep_job_logs``). Airflow, Ray, httpx and SQLAlchemy are imported inside the functions that
use them, so importing this module imports none of them.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.config import REPO_ROOT, PipelineConfig, load_config

if TYPE_CHECKING:
    from pipeline.devstack.ray_cluster import RayHead

DAG_ID = "domain_llm_retraining"
DAG_FILE = REPO_ROOT / "dags" / f"{DAG_ID}.py"


def airflow_env(workdir: Path) -> None:
    """Point Airflow at this repo's DAGs and plugins and a migrated SQLite DB under ``workdir``.

    Must run before ``airflow`` is first imported; values already set in the environment win.
    """
    import subprocess

    home = workdir / "airflow"
    defaults = {
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO_ROOT / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO_ROOT / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "PIPELINE_RAY_POLL_INTERVAL": "3",
    }
    for key, value in defaults.items():
        os.environ.setdefault(key, value)
    sys.path.insert(0, os.environ["AIRFLOW__CORE__PLUGINS_FOLDER"])
    if not (Path(os.environ["AIRFLOW_HOME"]) / "airflow.db").exists():
        airflow = Path(sys.executable).parent / "airflow"
        subprocess.run([str(airflow), "db", "migrate"], check=True, stdout=subprocess.DEVNULL)


def load_dag() -> Any:
    """Import the DAG file the way Airflow's parser does (a fresh module)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("domain_llm_retraining_dag", DAG_FILE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.dag


def run_dag(conf: dict[str, Any], head: RayHead) -> Any:
    """Run the real DAG once with ``dag.test()`` (deferred tasks run their triggers in process).

    The run is retired afterwards (``retire_test_runs``), also when it is interrupted: the
    head it used stops with the caller, so nothing of it may be left for a triggerer.

    Returns:
        The finished DagRun.
    """
    from airflow.sdk import timezone

    os.environ["AIRFLOW_CONN_RAY_DEFAULT"] = head.airflow_conn_uri()
    # A local run of the operator's own config file: its folder is trusted like configs/
    # (a triggered run may only name config files in the allowed folders).
    config_dir = str(Path(conf["config"]).resolve().parent) if conf.get("config") else None
    os.environ["PIPELINE_CONFIG_DIRS"] = os.pathsep.join(
        filter(None, [os.environ.get("PIPELINE_CONFIG_DIRS"), config_dir])
    )
    started = timezone.utcnow()
    try:
        return load_dag().test(run_conf=conf)
    finally:
        retire_test_runs(DAG_ID, started)


def retire_test_runs(dag_id: str, since: Any) -> None:
    """Leave nothing of ``dag.test()`` runs started since ``since`` for a later triggerer.

    ``dag.test()`` runs each trigger in process but leaves its row behind, and an interrupted
    run leaves tasks deferred; ``make airflow-ui`` would then run those triggers against a Ray
    head that is gone. Unfinished tasks and runs are marked failed, and trigger rows no
    deferred task needs are deleted (Airflow's own ``Trigger.clean_unused``).
    """
    from airflow.models.dagrun import DagRun
    from airflow.models.taskinstance import TaskInstance
    from airflow.models.trigger import Trigger
    from airflow.utils.session import create_session
    from airflow.utils.state import DagRunState, TaskInstanceState
    from sqlalchemy import select, update

    with create_session() as session:
        unfinished = select(DagRun.run_id).where(
            DagRun.dag_id == dag_id,
            DagRun.start_date >= since,
            DagRun.state.not_in([DagRunState.SUCCESS, DagRunState.FAILED]),
        )
        run_ids = list(session.scalars(unfinished))
        if run_ids:
            session.execute(
                update(TaskInstance)
                .where(
                    TaskInstance.dag_id == dag_id,
                    TaskInstance.run_id.in_(run_ids),
                    TaskInstance.state.not_in(
                        [
                            TaskInstanceState.SUCCESS,
                            TaskInstanceState.SKIPPED,
                            TaskInstanceState.UPSTREAM_FAILED,
                        ]
                    ),
                )
                .values(state=TaskInstanceState.FAILED, trigger_id=None)
                .execution_options(synchronize_session=False)
            )
            session.execute(
                update(DagRun)
                .where(DagRun.dag_id == dag_id, DagRun.run_id.in_(run_ids))
                .values(state=DagRunState.FAILED)
                .execution_options(synchronize_session=False)
            )
        session.flush()
        Trigger.clean_unused(session=session)


def keep_job_logs(head: RayHead, artifact_root: str) -> list[str]:
    """Copy every job's driver log off a head that is about to stop, next to its stage's output.

    Jobs are matched to stages by the metadata the Ray job operator tags them with (dag_id,
    run_id, task_id, try_number); jobs without it are left out.

    Returns:
        The URIs written, ``<artifact_root>/<run_key>/<task_id>/ray_job_try<N>.log``.
    """
    import httpx

    from pipeline import storage
    from pipeline.preflight import run_key

    headers = {"Authorization": f"Bearer {head.token_path.read_text().strip()}"}
    with httpx.Client(base_url=head.dashboard_url, headers=headers, timeout=30) as client:
        jobs = client.get("/api/jobs/").raise_for_status().json()
        written = []
        for job in jobs:
            meta = job.get("metadata") or {}
            if not {"dag_id", "run_id", "task_id"} <= meta.keys() or not job.get("submission_id"):
                continue
            logs = client.get(f"/api/jobs/{job['submission_id']}/logs").raise_for_status()
            folder = storage.join(artifact_root, run_key(meta["dag_id"], meta["run_id"]))
            name = f"ray_job_try{meta.get('try_number', 0)}.log"
            uri = storage.join(folder, meta["task_id"], name)
            storage.write_bytes(uri, logs.json().get("logs", "").encode())
            written.append(uri)
    return written


def forget_ray_job_links(dag_id: str, run_id: str) -> None:
    """Blank the "Ray job" links of a run whose head has stopped (the UI hides empty links)."""
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    from ray_jobs.links import RAY_DASHBOARD_URL_KEY, RayJobLink

    keys = (RAY_DASHBOARD_URL_KEY, RayJobLink().xcom_key)
    with create_session() as session:
        rows = session.scalars(
            select(XComModel).where(
                XComModel.dag_id == dag_id, XComModel.run_id == run_id, XComModel.key.in_(keys)
            )
        )
        for row in rows:
            row.value = ""


def print_decision(config: PipelineConfig, key: str) -> None:
    """The gate table, the promotion decision and where the evaluation report is."""
    from pipeline import storage

    print("evaluation and promotion (the evaluate summary names the HTML report):")
    for stage in ("evaluate", "promote"):
        result = storage.committed_result(
            storage.stage_uri(config.storage.artifact_root, key, stage)
        )
        if result is None:
            print(f"{stage}: no committed result")
            continue
        print(f"{stage}:")
        for line in result.get("summary") or []:
            print(f"  {line}")


def run_demo(config_path: str, overrides: dict[str, Any]) -> int:
    """Run the DAG once on a private Ray head (``config_path`` with ``overrides``) and print
    where to look: the promotion decision, the artifacts, the kept job logs, MLflow.

    Returns:
        The exit code: 0 when the DAG run succeeded, else 1.
    """
    import signal

    from pipeline.devstack.ray_cluster import ray_head

    # The head runs in its own session; turn SIGTERM into an exit so the `with` stops it.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    conf = {"config": str(Path(config_path).resolve()), **overrides}
    workdir = REPO_ROOT / ".local"
    airflow_env(workdir)
    config = load_config(conf["config"], {k: v for k, v in conf.items() if k != "config"})
    with ray_head(workdir / "ray") as head:
        dag_run = run_dag(conf, head)
        kept = keep_job_logs(head, config.storage.artifact_root)
    # The head is gone now: a "Ray job" button would open a dead page, so the UI shows none.
    forget_ray_job_links(DAG_ID, dag_run.run_id)
    print(f"\nDAG run {dag_run.run_id}: {dag_run.state}")
    from pipeline.preflight import run_key

    print_decision(config, run_key(DAG_ID, dag_run.run_id))
    print(f"artifacts: {config.storage.artifact_root}")
    print(f"Ray jobs:  the demo's head is stopped; their driver logs are kept: {len(kept)} files,")
    print("           <artifacts>/<run_key>/<stage>/ray_job_try<N>.log (also in the task logs)")
    print(
        f"MLflow:    {config.tracking.tracking_uri}  (make mlflow-ui, then {config.tracking.ui_url})"
    )
    return 0 if str(dag_run.state) in ("success", "DagRunState.SUCCESS") else 1
