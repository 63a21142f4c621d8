"""Extra links on Ray job tasks: the job's dashboard page, the stage's MLflow run and its report.

In Airflow 3 ``get_link`` runs on the worker when the task instance finishes or defers (the
task runner's ``finalize``), and the returned URL is stored as the XCom ``_link_<ClassName>``
that the UI reads; so these links only have to look up the XComs the operator pushed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from airflow.sdk import BaseOperatorLink

if TYPE_CHECKING:
    from airflow.sdk import BaseOperator
    from airflow.sdk.types import TaskInstanceKey

RAY_DASHBOARD_URL_KEY = "ray_dashboard_url"
MLFLOW_RUN_URL_KEY = "mlflow_run_url"
REPORT_URL_KEY = "report_url"


def _task_xcom(ti_key: TaskInstanceKey, key: str) -> str:
    # Imported here: the module resolves the XCom backend on import, and the scheduler and
    # API server load this plugin without ever calling get_link.
    from airflow.sdk.execution_time.xcom import XCom

    return str(XCom.get_value(ti_key=ti_key, key=key) or "")


class RayJobLink(BaseOperatorLink):
    """The Ray dashboard page of the job this task submitted or re-attached to."""

    name = "Ray job"

    def get_link(self, operator: BaseOperator, *, ti_key: TaskInstanceKey) -> str:
        """URL from the XCom ``ray_dashboard_url``; empty (no button) before submission."""
        return _task_xcom(ti_key, RAY_DASHBOARD_URL_KEY)


class MLflowRunLink(BaseOperatorLink):
    """The MLflow run the stage logged to, once its ``result.json`` has been read."""

    name = "MLflow run"

    def get_link(self, operator: BaseOperator, *, ti_key: TaskInstanceKey) -> str:
        """URL from the XCom ``mlflow_run_url``; empty until the stage succeeded."""
        return _task_xcom(ti_key, MLFLOW_RUN_URL_KEY)


class StageReportLink(BaseOperatorLink):
    """The page the stage wrote for people (evaluate's HTML report with its gate table)."""

    name = "Report"

    def get_link(self, operator: BaseOperator, *, ti_key: TaskInstanceKey) -> str:
        """URL from the XCom ``report_url``; empty for stages without a report."""
        return _task_xcom(ti_key, REPORT_URL_KEY)
