"""Operator that runs one pipeline stage as a Ray job: submit (or re-attach), defer, read result.

Every try of a task instance shares one *job key* derived from (dag_id, run_id, task_id,
map_index) and stored in the Ray job's metadata. A retry looks the key up first, so a worker
that died while its job kept running re-attaches to it instead of starting a second training
run, and a job that already succeeded is not run again.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowException

from ray_jobs.hooks import (
    ACTIVE_STATUSES,
    TERMINAL_STATUSES,
    RayJobsError,
    RayJobsHook,
    RaySubmissionExistsError,
)
from ray_jobs.links import MLFLOW_RUN_URL_KEY, RAY_DASHBOARD_URL_KEY, MLflowRunLink, RayJobLink
from ray_jobs.triggers import RayJobTrigger, job_event_payload

if TYPE_CHECKING:
    from airflow.sdk import Context

JOB_KEY_METADATA_FIELD = "airflow_job_key"
SUBMISSION_ID_XCOM_KEY = "ray_submission_id"
MAX_JOB_KEY_LENGTH = 96
"""Room is left for the ``-t<try>-<suffix>`` tail; Ray names driver log files after the id."""
LOG_TAIL_LINES = 60
_NOT_ID_SAFE = re.compile(r"[^A-Za-z0-9_-]+")


def base_submission_id(dag_id: str, run_id: str, task_id: str, map_index: int | None) -> str:
    """The job key of one task instance, shared by all its tries.

    Readable (``<dag>__<run>__<task>[__m<i>]`` reduced to ``[A-Za-z0-9_-]``, cut to fit) and
    ended by a hash of the exact, unsanitized tuple: sanitizing and cutting can make two
    different task instances look alike, and a collision would re-attach to another run's job.

    Returns:
        At most ``MAX_JOB_KEY_LENGTH`` characters; the same inputs always give the same key.
    """
    index = -1 if map_index is None else map_index
    parts = [dag_id, run_id, task_id] + ([f"m{index}"] if index >= 0 else [])
    readable = "__".join(_NOT_ID_SAFE.sub("-", part).strip("-") for part in parts)
    exact = json.dumps([dag_id, run_id, task_id, index])
    digest = hashlib.sha256(exact.encode()).hexdigest()[:12]
    return f"{readable[: MAX_JOB_KEY_LENGTH - len(digest) - 1]}-{digest}"


@dataclass(frozen=True)
class SubmissionPlan:
    """What to do about the Ray job of a task instance, given the jobs already on the cluster."""

    action: Literal["attach", "reuse", "submit"]
    """attach: wait for a PENDING/RUNNING job; reuse: it SUCCEEDED, read its result;
    submit: start a new job (none yet, or the newest FAILED or was STOPPED)."""
    job: dict[str, Any] | None = None
    """The newest earlier job with this key, None when there is none."""


def choose_plan(jobs: Iterable[dict[str, Any]], job_key: str) -> SubmissionPlan:
    """Decide from the cluster's job list (``RayJobsHook.list_jobs``) alone; no I/O."""
    mine = [job for job in jobs if _job_key_of(job) == job_key]
    if not mine:
        return SubmissionPlan("submit")
    # A job that has not started yet has no start_time: it is the most recent one.
    newest = max(mine, key=lambda job: job.get("start_time") or float("inf"))
    if newest["status"] in ACTIVE_STATUSES:
        return SubmissionPlan("attach", newest)
    if newest["status"] == "SUCCEEDED":
        return SubmissionPlan("reuse", newest)
    return SubmissionPlan("submit", newest)


def _job_key_of(job: dict[str, Any]) -> str | None:
    # Jobs submitted without metadata (by hand, by other tools) list it as null.
    key: str | None = (job.get("metadata") or {}).get(JOB_KEY_METADATA_FIELD)
    return key


def plan_submission(hook: RayJobsHook, job_key: str) -> SubmissionPlan:
    """Look up the jobs already submitted under ``job_key`` and decide what to do."""
    return choose_plan(hook.list_jobs(), job_key)


def submit_new_job(
    hook: RayJobsHook,
    *,
    job_key: str,
    try_number: int,
    entrypoint: str,
    metadata: dict[str, str],
    runtime_env: dict[str, Any] | None = None,
    entrypoint_num_cpus: float | None = None,
) -> str:
    """Submit as ``<job_key>-t<try_number>``, tagged with the key; returns the submission id.

    A cleared task can come back with a try number whose (failed) job is still listed; that id
    then gets a short random suffix rather than failing the task.
    """
    tagged = {**metadata, JOB_KEY_METADATA_FIELD: job_key, "try_number": str(try_number)}

    def submit(submission_id: str) -> str:
        return hook.submit_job(
            entrypoint=entrypoint,
            submission_id=submission_id,
            metadata=tagged,
            runtime_env=runtime_env,
            entrypoint_num_cpus=entrypoint_num_cpus,
        )

    submission_id = f"{job_key}-t{try_number}"
    try:
        return submit(submission_id)
    except RaySubmissionExistsError:
        return submit(f"{submission_id}-{secrets.token_hex(3)}")


class RayJobOperator(BaseOperator):
    """Run ``entrypoint`` as a Ray job and return the stage's ``result.json``.

    Args:
        entrypoint: shell command the Ray job runs, e.g. ``python -m pipeline.stages.evaluate
            --config ...`` (templated).
        ray_conn_id: Airflow connection of the Ray dashboard.
        result_uri: where the stage writes its ``result.json`` (templated); returned as the
            task's XCom once the job succeeded. Without it the task returns the job status.
        runtime_env: Ray runtime environment (templated), e.g. ``{"env_vars": {...}}``.
        entrypoint_num_cpus: CPUs reserved for the driver process.
        poll_interval: seconds between status polls.
        deferrable: wait in the triggerer (frees the worker slot) instead of polling here.
    """

    template_fields: Sequence[str] = ("entrypoint", "result_uri", "runtime_env")
    template_fields_renderers: ClassVar[dict[str, str]] = {"runtime_env": "json"}
    operator_extra_links = (RayJobLink(), MLflowRunLink())

    def __init__(
        self,
        *,
        entrypoint: str,
        ray_conn_id: str = "ray_default",
        result_uri: str | None = None,
        runtime_env: dict[str, Any] | None = None,
        entrypoint_num_cpus: float | None = None,
        poll_interval: float = 5.0,
        deferrable: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.entrypoint = entrypoint
        self.ray_conn_id = ray_conn_id
        self.result_uri = result_uri
        self.runtime_env = runtime_env
        self.entrypoint_num_cpus = entrypoint_num_cpus
        self.poll_interval = poll_interval
        self.deferrable = deferrable
        self._submission_id: str | None = None  # for on_kill in the synchronous mode

    def execute(self, context: Context) -> dict[str, Any]:
        """Submit or re-attach to the job, then defer (or poll) until it ends."""
        hook = RayJobsHook(self.ray_conn_id)
        plan, submission_id = self._start(context, hook)
        self._submission_id = submission_id
        dashboard_url = hook.dashboard_job_url(submission_id)
        context["ti"].xcom_push(key=SUBMISSION_ID_XCOM_KEY, value=submission_id)
        context["ti"].xcom_push(key=RAY_DASHBOARD_URL_KEY, value=dashboard_url)
        # Links are rendered when the task defers too; an empty value (no button yet) spares
        # the log an "XCom not found" error for a run URL that only exists once the stage ends.
        context["ti"].xcom_push(key=MLFLOW_RUN_URL_KEY, value="")
        if plan.action == "reuse" and plan.job is not None:
            event = job_event_payload(
                status="SUCCEEDED",
                submission_id=submission_id,
                message=plan.job.get("message"),
                result_uri=self.result_uri,
                dashboard_url=dashboard_url,
            )
            return self.execute_complete(context, event)
        if self.deferrable:
            trigger = RayJobTrigger(
                submission_id=submission_id,
                ray_conn_id=self.ray_conn_id,
                poll_interval=self.poll_interval,
                result_uri=self.result_uri,
            )
            self.defer(trigger=trigger, method_name="execute_complete")
        return self.execute_complete(context, self._wait(hook, submission_id, dashboard_url))

    def _start(self, context: Context, hook: RayJobsHook) -> tuple[SubmissionPlan, str]:
        ti = context["ti"]
        job_key = base_submission_id(ti.dag_id, ti.run_id, ti.task_id, ti.map_index)
        plan = plan_submission(hook, job_key)
        if plan.action != "submit" and plan.job is not None:
            existing: str = plan.job["submission_id"]
            verb = "re-attaching to" if plan.action == "attach" else "reusing the result of"
            self.log.info("%s Ray job %s (%s)", verb, existing, plan.job["status"])
            return plan, existing
        if plan.job is not None:
            self.log.info(
                "previous Ray job %s ended %s; submitting a new one",
                plan.job["submission_id"],
                plan.job["status"],
            )
        submission_id = submit_new_job(
            hook,
            job_key=job_key,
            try_number=ti.try_number,
            entrypoint=self.entrypoint,
            metadata={"dag_id": ti.dag_id, "run_id": ti.run_id, "task_id": ti.task_id},
            runtime_env=self.runtime_env,
            entrypoint_num_cpus=self.entrypoint_num_cpus,
        )
        return plan, submission_id

    def _wait(self, hook: RayJobsHook, submission_id: str, dashboard_url: str) -> dict[str, Any]:
        """Synchronous twin of ``RayJobTrigger.run``: poll until the job ends."""
        while True:
            job = hook.get_job(submission_id)
            if job is None:
                status, message = "MISSING", f"Ray job {submission_id} no longer exists"
            elif job["status"] in TERMINAL_STATUSES:
                status, message = job["status"], job.get("message") or ""
            else:
                time.sleep(self.poll_interval)
                continue
            return job_event_payload(
                status=status,
                submission_id=submission_id,
                message=message,
                result_uri=self.result_uri,
                dashboard_url=dashboard_url,
            )

    def execute_complete(self, context: Context, event: dict[str, Any]) -> dict[str, Any]:
        """Finish the task from the trigger's event.

        The operator is a fresh instance after deferral, so everything about the job comes
        from ``event`` (see ``job_event_payload``); only constructor args are read from self.

        Returns:
            The stage's ``result.json`` when the event has a ``result_uri``, else
            ``{"submission_id", "status"}``.

        Raises:
            AirflowException: the job did not succeed (with its message and log tail), or its
                result file is missing or not a JSON object.
        """
        if event["status"] != "SUCCEEDED":
            raise AirflowException(self._failure_report(event))
        if not event.get("result_uri"):
            return {"submission_id": event["submission_id"], "status": event["status"]}
        result = _read_stage_result(event["result_uri"], event["submission_id"])
        if result.get(MLFLOW_RUN_URL_KEY):
            context["ti"].xcom_push(key=MLFLOW_RUN_URL_KEY, value=result[MLFLOW_RUN_URL_KEY])
        return result

    def _failure_report(self, event: dict[str, Any]) -> str:
        submission_id = event["submission_id"]
        report = (
            f"Ray job {submission_id} ended {event['status']}: {event.get('message') or '-'}\n"
            f"Dashboard: {event.get('dashboard_url') or '-'}"
        )
        if event["status"] == "MISSING":
            return report
        try:
            logs = RayJobsHook(self.ray_conn_id).get_job_logs(submission_id)
        except RayJobsError as err:
            # The report must still reach the user when Ray itself is what failed.
            return f"{report}\n(job log unavailable: {err})"
        tail = "\n".join(logs.rstrip().splitlines()[-LOG_TAIL_LINES:])
        return f"{report}\nLast {LOG_TAIL_LINES} lines of the job log:\n{tail}"

    def on_kill(self) -> None:
        """Stop the Ray job when the task is killed while polling synchronously.

        A deferred task is killed in the triggerer instead: see ``RayJobTrigger.on_kill``.
        """
        if self._submission_id:
            stopped = RayJobsHook(self.ray_conn_id).stop_job(self._submission_id)
            self.log.info("asked Ray to stop job %s: stopped=%s", self._submission_id, stopped)


def _read_stage_result(result_uri: str, submission_id: str) -> dict[str, Any]:
    # Imported lazily: pipeline.storage pulls boto3 in for s3:// URIs only when used, and the
    # plugin must import without the pipeline package on the scheduler and API server.
    from pipeline.storage import read_json

    try:
        result = read_json(result_uri)
    except FileNotFoundError as err:
        raise AirflowException(
            f"Ray job {submission_id} succeeded but wrote no result at {result_uri}; "
            "the stage entrypoint must commit result.json there before exiting 0"
        ) from err
    if not isinstance(result, dict):
        raise AirflowException(
            f"{result_uri} holds a {type(result).__name__}; a stage result must be a JSON object"
        )
    return result
