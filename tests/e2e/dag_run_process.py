"""Run the DAG once with ``dag.test()`` in a process of its own and write a JSON summary.

Airflow's settings (its metadata DB among them) are process-global and fixed at first import;
the test session's are SQLite (tests/conftest.py). A test that needs Airflow on another
database runs this module with that database in ``AIRFLOW__DATABASE__SQL_ALCHEMY_CONN`` and
reads the summary it writes:

    python -m tests.e2e.dag_run_process CONF_JSON HEAD_JSON SUMMARY_PATH

``CONF_JSON`` is the run's ``dag_run.conf``, ``HEAD_JSON`` the ``RayHead`` fields (the
``ray_default`` connection points at its dashboard).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from pipeline.devstack.demo import run_dag
from pipeline.devstack.ray_cluster import RayHead


def _name(state: Any) -> str:
    """``success`` for ``DagRunState.SUCCESS`` and the like (None: ``none``)."""
    return str(getattr(state, "value", state)).lower()


def summarize(dag_run: Any) -> dict[str, Any]:
    """What the test asserts on: the run's and each task's state, its run key, and which
    database and Ray host this Airflow used."""
    from airflow import settings
    from airflow.sdk import BaseHook

    from pipeline.preflight import run_key

    return {
        "run_id": dag_run.run_id,
        "run_key": run_key(dag_run.dag_id, dag_run.run_id),
        "state": _name(dag_run.state),
        "tasks": {ti.task_id: _name(ti.state) for ti in dag_run.get_task_instances()},
        "metadata_db": settings.engine.dialect.name,
        "ray_host": BaseHook.get_connection("ray_default").host,
    }


def main(argv: list[str]) -> int:
    conf, head_fields, out = json.loads(argv[0]), json.loads(argv[1]), Path(argv[2])
    head = RayHead(
        gcs_address=head_fields["gcs_address"],
        dashboard_url=head_fields["dashboard_url"],
        token_path=Path(head_fields["token_path"]),
    )
    out.write_text(json.dumps(summarize(run_dag(conf, head)), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
