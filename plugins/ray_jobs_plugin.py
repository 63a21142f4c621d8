"""Registers the Ray job operator's extra links with Airflow (plugins folder entry point)."""

from __future__ import annotations

from airflow.plugins_manager import AirflowPlugin

from ray_jobs.links import MLflowRunLink, RayJobLink, StageReportLink


class RayJobsPlugin(AirflowPlugin):
    """Airflow plugin ``ray_jobs``: the "Ray job", "MLflow run" and "Report" buttons on task pages."""

    name = "ray_jobs"
    # AirflowPlugin declares this as a plain list attribute, hence no ClassVar.
    operator_extra_links = [RayJobLink(), MLflowRunLink(), StageReportLink()]  # noqa: RUF012
