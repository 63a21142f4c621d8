"""Async trigger that waits in the triggerer for a Ray job to reach a terminal status."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

from ray_jobs.hooks import TERMINAL_STATUSES, RayJobsAuthError, RayJobsError, RayJobsHook

MAX_CONSECUTIVE_POLL_ERRORS = 5
"""Failed status polls in a row before the trigger gives up with status ERROR; a dashboard
restart or a network blip of a few poll intervals must not fail a multi-hour training job."""


def job_event_payload(
    *,
    status: str,
    submission_id: str,
    message: str | None,
    result_uri: str | None,
    dashboard_url: str,
) -> dict[str, Any]:
    """The event payload ``RayJobOperator.execute_complete`` reads; also built by its sync path.

    ``status`` is a Ray job status (SUCCEEDED, FAILED, STOPPED) or MISSING (the job vanished)
    or ERROR (Ray could not be asked).
    """
    return {
        "status": status,
        "submission_id": submission_id,
        "message": message or "",
        "result_uri": result_uri,
        "dashboard_url": dashboard_url,
    }


class RayJobTrigger(BaseTrigger):
    """Poll a Ray job until it ends, then fire one event describing how it ended.

    Args:
        submission_id: the Ray job's submission id.
        ray_conn_id: Airflow connection of the Ray dashboard.
        poll_interval: seconds between status polls.
        result_uri: passed through to the event so the resumed operator, a fresh instance,
            knows where the stage's ``result.json`` is.
    """

    def __init__(
        self,
        *,
        submission_id: str,
        ray_conn_id: str,
        poll_interval: float = 5.0,
        result_uri: str | None = None,
    ) -> None:
        super().__init__()
        self.submission_id = submission_id
        self.ray_conn_id = ray_conn_id
        self.poll_interval = poll_interval
        self.result_uri = result_uri

    def serialize(self) -> tuple[str, dict[str, Any]]:
        """Class path and kwargs that rebuild this trigger in the triggerer."""
        return (
            "ray_jobs.triggers.RayJobTrigger",
            {
                "submission_id": self.submission_id,
                "ray_conn_id": self.ray_conn_id,
                "poll_interval": self.poll_interval,
                "result_uri": self.result_uri,
            },
        )

    async def run(self) -> AsyncIterator[TriggerEvent]:
        """Yield exactly one event: the job's terminal status, MISSING, or ERROR."""
        hook = RayJobsHook(self.ray_conn_id)
        try:
            dashboard_url = await hook.adashboard_job_url(self.submission_id)
            status, message = await self._wait_for_end(hook)
        except RayJobsError as err:
            dashboard_url, status, message = "", "ERROR", str(err)
        yield TriggerEvent(
            job_event_payload(
                status=status,
                submission_id=self.submission_id,
                message=message,
                result_uri=self.result_uri,
                dashboard_url=dashboard_url,
            )
        )

    async def _wait_for_end(self, hook: RayJobsHook) -> tuple[str, str]:
        """Poll until the job ends; returns (status, message).

        Raises:
            RayJobsError: a wrong token (that does not heal by waiting), or
                ``MAX_CONSECUTIVE_POLL_ERRORS`` failed polls in a row.
        """
        errors, last_status = 0, None
        while True:
            try:
                job = await hook.aget_job(self.submission_id)
            except RayJobsAuthError:
                raise
            except RayJobsError as err:
                errors += 1
                self.log.warning(
                    "polling Ray job %s failed (%d/%d): %s",
                    self.submission_id,
                    errors,
                    MAX_CONSECUTIVE_POLL_ERRORS,
                    err,
                )
                if errors >= MAX_CONSECUTIVE_POLL_ERRORS:
                    raise
                await asyncio.sleep(self.poll_interval)
                continue
            errors = 0
            if job is None:
                return "MISSING", f"Ray job {self.submission_id} no longer exists on the cluster"
            if job["status"] != last_status:
                last_status = job["status"]
                self.log.info("Ray job %s is %s", self.submission_id, last_status)
            if job["status"] in TERMINAL_STATUSES:
                return job["status"], job.get("message") or ""
            await asyncio.sleep(self.poll_interval)

    async def on_kill(self) -> None:
        """Stop the Ray job when a user marks or clears the deferred task (Airflow >= 3.3)."""
        stopped = await RayJobsHook(self.ray_conn_id).astop_job(self.submission_id)
        self.log.info("asked Ray to stop job %s: stopped=%s", self.submission_id, stopped)
