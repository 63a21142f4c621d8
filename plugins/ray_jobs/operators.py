"""Operator that runs one pipeline stage as a Ray job: submit (or re-attach), defer, read result.

Which job a try runs is decided in ``ray_jobs.submission`` (job key, re-attach, reuse); how
the job is waited for (deadline, transient errors, log streaming) in ``RayJobTrigger``, which
the operator either defers to or, with ``deferrable=False``, runs in its own process.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowException, AirflowFailException, AirflowSkipException

from ray_jobs.hooks import RayJobsError, RayJobsHook
from ray_jobs.links import (
    MLFLOW_RUN_URL_KEY,
    RAY_DASHBOARD_URL_KEY,
    REPORT_URL_KEY,
    MLflowRunLink,
    RayJobLink,
    StageReportLink,
)
from ray_jobs.submission import (
    JobOptions,
    SubmissionPlan,
    base_submission_id,
    plan_submission,
    submit_new_job,
    submitted_at,
)
from ray_jobs.triggers import RayJobTrigger, first_event, job_event_payload, redact_job_text

log = logging.getLogger(__name__)

SUBMISSION_ID_STATE_KEY = "ray_submission_id"
"""The task's last Ray submission id in its ``task_state_store`` (read by its next try)."""
CODE_VERSION_MISMATCH = "code version mismatch:"
"""How a stage's error starts when the run's code changed under it (pipeline.identity
prints it; the plugin does not import the pipeline package)."""

if TYPE_CHECKING:
    from airflow.sdk import Context

SUBMISSION_ID_XCOM_KEY = "ray_submission_id"
LOG_TAIL_LINES = 60


class RayJobOperator(BaseOperator):
    """Run ``entrypoint`` as a Ray job and return the stage's ``result.json``.

    Args:
        entrypoint: shell command the Ray job runs, e.g. ``python -m pipeline.stages.evaluate
            --config ...`` (templated).
        ray_conn_id: Airflow connection of the Ray dashboard.
        result_uri: where the stage writes its ``result.json`` (templated); returned as the
            task's XCom once the job succeeded. Without it the task returns the job status.
        job_options: the stage's ``JobOptions`` as a dict or its JSON (templated): timeout,
            driver resources, ``runtime_env``, transient-error budget, stop wait.
        inputs_fingerprint: hash of the stage's resolved inputs (templated); part of the job
            key, so a cleared task whose inputs changed runs a new job and one whose inputs
            did not reuses or re-attaches.
        mlflow_run_url: the DAG run's MLflow parent run (templated), linked while the stage
            runs; replaced by the stage's own run from ``result.json`` once it ends.
        poll_interval: seconds between status polls.
        log_interval_s: seconds between fetches of new job log lines for the task log.
        deferrable: wait in the triggerer (frees the worker slot); False runs the same
            trigger in this worker.
    """

    template_fields: Sequence[str] = (
        "entrypoint",
        "result_uri",
        "job_options",
        "inputs_fingerprint",
        "mlflow_run_url",
    )
    template_fields_renderers: ClassVar[dict[str, str]] = {"job_options": "json"}
    operator_extra_links = (RayJobLink(), MLflowRunLink(), StageReportLink())

    def __init__(
        self,
        *,
        entrypoint: str,
        ray_conn_id: str = "ray_default",
        result_uri: str | None = None,
        job_options: dict[str, Any] | str | None = None,
        inputs_fingerprint: str | None = None,
        mlflow_run_url: str | None = None,
        poll_interval: float = 5.0,
        log_interval_s: float = 15.0,
        deferrable: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.entrypoint = entrypoint
        self.ray_conn_id = ray_conn_id
        self.result_uri = result_uri
        self.job_options = job_options
        self.inputs_fingerprint = inputs_fingerprint
        self.mlflow_run_url = mlflow_run_url
        self.poll_interval = poll_interval
        self.log_interval_s = log_interval_s
        self.deferrable = deferrable
        self._watched: tuple[str, float] | None = None  # (submission id, stop wait): on_kill

    def execute(self, context: Context) -> dict[str, Any]:
        """Submit, re-attach to or reuse the job, then defer (or wait here) until it ends."""
        options = JobOptions.parse(self.job_options, self.task_id)
        ti = context["ti"]
        # The parent run exists before the stage starts: link it while the task runs.
        ti.xcom_push(key=MLFLOW_RUN_URL_KEY, value=self.mlflow_run_url or "")
        ti.xcom_push(key=REPORT_URL_KEY, value="")
        hook = self._hook(options)
        known = _state_get(context, SUBMISSION_ID_STATE_KEY)
        plan = plan_submission(hook, self._job_key(context), options, known)
        if plan.action == "submit" or plan.job is None:
            return self._submit_and_watch(context, hook, options, plan)
        submission_id: str = plan.job["submission_id"]
        verb = "re-attaching to" if plan.action == "attach" else "reusing the result of"
        self.log.info("%s Ray job %s (%s)", verb, submission_id, plan.job["status"])
        if plan.action == "attach":
            adopted_at = time.time()
            return self._watch(context, options, submission_id, submitted_at(plan.job), adopted_at)
        dashboard_url = self._push_job_links(context, hook, submission_id)
        event = job_event_payload(
            status="SUCCEEDED",
            submission_id=submission_id,
            message=plan.job.get("message"),
            result_uri=self.result_uri,
            dashboard_url=dashboard_url,
            stage=self.task_id,
        )
        return self.execute_complete(context, event)

    def _hook(self, options: JobOptions) -> RayJobsHook:
        return RayJobsHook(
            self.ray_conn_id, transient_error_budget_s=options.transient_error_budget_s
        )

    def _job_key(self, context: Context) -> str:
        ti = context["ti"]
        return base_submission_id(
            ti.dag_id, ti.run_id, ti.task_id, ti.map_index, self.inputs_fingerprint
        )

    def _submit_and_watch(
        self, context: Context, hook: RayJobsHook, options: JobOptions, plan: SubmissionPlan
    ) -> dict[str, Any]:
        if plan.job is not None:
            self.log.info(
                "previous Ray job %s ended %s; submitting a new one",
                plan.job["submission_id"],
                plan.job["status"],
            )
        ti = context["ti"]
        started = time.time()
        submission_id = submit_new_job(
            hook,
            job_key=self._job_key(context),
            try_number=ti.try_number,
            entrypoint=self.entrypoint,
            metadata={
                "dag_id": ti.dag_id,
                "run_id": ti.run_id,
                "task_id": ti.task_id,
                "inputs_fingerprint": self.inputs_fingerprint or "",
            },
            options=options,
        )
        _state_set(context, SUBMISSION_ID_STATE_KEY, submission_id)
        return self._watch(context, options, submission_id, started, None)

    def _watch(
        self,
        context: Context,
        options: JobOptions,
        submission_id: str,
        started: float,
        adopted_at: float | None,
    ) -> dict[str, Any]:
        """Defer to the trigger, or run it here when not deferrable."""
        self._watched = (submission_id, options.stop_wait_s)
        self._push_job_links(context, self._hook(options), submission_id)
        trigger = RayJobTrigger(
            submission_id=submission_id,
            ray_conn_id=self.ray_conn_id,
            poll_interval=self.poll_interval,
            result_uri=self.result_uri,
            stage=self.task_id,
            deadline=options.deadline_from(started),
            timeout_s=options.timeout_s,
            transient_error_budget_s=options.transient_error_budget_s,
            stop_wait_s=options.stop_wait_s,
            log_interval_s=self.log_interval_s,
            adopted_at=adopted_at,
        )
        if self.deferrable:
            self.defer(trigger=trigger, method_name="execute_complete")
        return self.execute_complete(context, asyncio.run(first_event(trigger)))

    def _push_job_links(self, context: Context, hook: RayJobsHook, submission_id: str) -> str:
        dashboard_url = hook.dashboard_job_url(submission_id)
        context["ti"].xcom_push(key=SUBMISSION_ID_XCOM_KEY, value=submission_id)
        context["ti"].xcom_push(key=RAY_DASHBOARD_URL_KEY, value=dashboard_url)
        return dashboard_url

    def execute_complete(self, context: Context, event: dict[str, Any]) -> dict[str, Any]:
        """Finish the task from the trigger's event.

        The operator is a fresh instance after deferral, so everything about the job comes
        from ``event`` (see ``job_event_payload``); only constructor args are read from self.

        Returns:
            The stage's ``result.json`` when the event has a ``result_uri``, else
            ``{"submission_id", "status"}``.

        Raises:
            AirflowSkipException: the stage's result has a ``skip_reason`` (e.g. promotion
                refused by a gate).
            AirflowException: the job did not succeed (with its message and log tail), or its
                result file is missing or not a JSON object.
        """
        if event["status"] == "STOPPED" and event.get("was_being_stopped"):
            # The job this try re-attached to was being stopped by the kill or clear of an
            # earlier try; a cleared task means "run again", now that the old job is gone.
            self.log.info(
                "Ray job %s was already being stopped when this try found it; it is STOPPED now",
                event["submission_id"],
            )
            options = JobOptions.parse(self.job_options, self.task_id)
            plan = SubmissionPlan(
                "submit", {"submission_id": event["submission_id"], "status": "STOPPED"}
            )
            return self._submit_and_watch(context, self._hook(options), options, plan)
        if event["status"] != "SUCCEEDED":
            report = self._failure_report(event)
            if CODE_VERSION_MISMATCH in report:
                # The same image would run again: no retry; the report says the way on.
                raise AirflowFailException(report)
            raise AirflowException(report)
        if not event.get("result_uri"):
            return {"submission_id": event["submission_id"], "status": event["status"]}
        result = _read_stage_result(event["result_uri"], event["submission_id"])
        if result.get(MLFLOW_RUN_URL_KEY):
            context["ti"].xcom_push(key=MLFLOW_RUN_URL_KEY, value=result[MLFLOW_RUN_URL_KEY])
        if result.get(REPORT_URL_KEY):
            context["ti"].xcom_push(key=REPORT_URL_KEY, value=result[REPORT_URL_KEY])
        summary = result.get("summary") or []
        if summary:
            self.log.info("stage summary:")
            for line in summary:
                self.log.info("  %s", line)
        if result.get("skip_reason"):
            raise AirflowSkipException(str(result["skip_reason"]))
        return result

    def _failure_report(self, event: dict[str, Any]) -> str:
        """The exception text of a job that did not succeed: status, message, dashboard link
        and the log's last lines, credentials redacted (it reaches the task log, the UI and
        the failure notification)."""
        return redact_job_text(self._unredacted_failure_report(event))

    def _unredacted_failure_report(self, event: dict[str, Any]) -> str:
        submission_id, status = event["submission_id"], event["status"]
        dashboard = event.get("dashboard_url") or "-"
        if status == "MISSING":
            dashboard += " (dead link: that head no longer knows the job)"
        elif status == "ERROR":
            dashboard += " (may be unreachable, see above)"
        headline = f"Ray job {submission_id} ended {status}"
        if status == "TIMEOUT":
            headline = f"stage {event.get('stage') or self.task_id!r} timed out; {headline}"
        report = f"{headline}: {event.get('message') or '-'}\nDashboard: {dashboard}"
        if status in ("MISSING", "ERROR"):
            return report
        try:
            # One attempt: the report must reach the user even when Ray itself is failing.
            logs = RayJobsHook(self.ray_conn_id).get_job_logs(submission_id, retry=False)
        except RayJobsError as err:
            return f"{report}\n(job log unavailable: {err})"
        tail = "\n".join(logs.rstrip().splitlines()[-LOG_TAIL_LINES:])
        return f"{report}\nLast {LOG_TAIL_LINES} lines of the job log:\n{tail}"

    def on_kill(self) -> None:
        """Stop the Ray job, and wait for STOPPED, when the task is killed while this worker
        holds it (submitting, or waiting with ``deferrable=False``). A deferred task is killed
        in the triggerer instead: see ``RayJobTrigger.on_kill``."""
        if self._watched is None:
            return
        submission_id, stop_wait_s = self._watched
        try:
            job = RayJobsHook(self.ray_conn_id).stop_and_wait(submission_id, stop_wait_s)
        except RayJobsError as err:
            self.log.warning("could not stop Ray job %s: %s", submission_id, err)
            return
        self.log.info("Ray job %s stopped on task kill: %s", submission_id, job and job["status"])


def _state_get(context: Context, key: str) -> str | None:
    """``key`` from the task instance's state store (kept across its tries); None when there
    is no store (``dag.test()`` before Airflow 3.3, a bare context) or it cannot be read."""
    store: Any = context.get("task_state_store")
    if store is None:
        return None
    try:
        value = store.get(key)
    except Exception as err:  # an unreadable store costs a job listing, not the task
        log.warning("could not read %s from the task state store: %s", key, err)
        return None
    return str(value) if value else None


def _state_set(context: Context, key: str, value: str) -> None:
    store: Any = context.get("task_state_store")
    if store is None:
        return
    try:
        store.set(key, value)
    except Exception as err:  # the next try then lists the cluster's jobs instead
        log.warning("could not write %s to the task state store: %s", key, err)


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
