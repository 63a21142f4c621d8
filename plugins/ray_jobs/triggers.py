"""Async trigger that owns the wait for a Ray job: status polls, deadline, log streaming.

Everything about waiting lives here, whether the operator defers or runs the trigger in its
own worker (``deferrable=False``): the stage's deadline (the job is stopped, not deleted,
when it passes), the transient-error budget (through the hook), and the job's new log lines,
which the triggerer writes into the Airflow task log.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

from ray_jobs.hooks import (
    TERMINAL_STATUSES,
    RayJobsError,
    RayJobsHook,
    RayJobStillRunningError,
)

DEFAULT_STOP_WAIT_S = 180.0
MAX_LOG_LINES_PER_FETCH = 50
"""Job log lines written to the task log per fetch; older ones are counted, not printed."""
FINAL_LOG_SETTLE_S = 1.0
"""Pause between the terminal status and the last log fetch: the driver log can lag."""
ON_KILL_WAIT_S = 20.0
"""Bound of the stop wait in ``on_kill``: the triggerer cancels it after ``on_kill_timeout``
(30 s by default)."""
ON_KILL_ERROR_BUDGET_S = 5.0
LOG_PREFIX = "[ray job]"


def redact_job_text(text: str) -> str:
    """``text`` from a Ray job (log lines, Ray's failure message, which quotes the log's end)
    with credentials replaced by ``***`` (``pipeline.redact.redact_text``): a job that prints
    its environment or a connection URI must not put the secret into the Airflow task log.

    Args:
        text: one line or many, as Ray returned them.

    Returns:
        The same text, credentials redacted.
    """
    # Imported here: the plugin module must import where the pipeline package is absent (the
    # scheduler and API server parse it); the triggerer and workers run the image that has it.
    from pipeline.redact import redact_text

    return redact_text(text)


def job_event_payload(
    *,
    status: str,
    submission_id: str,
    message: str | None,
    result_uri: str | None,
    dashboard_url: str,
    stage: str = "",
    was_being_stopped: bool = False,
) -> dict[str, Any]:
    """The event payload ``RayJobOperator.execute_complete`` reads.

    ``status`` is a Ray job status (SUCCEEDED, FAILED, STOPPED), TIMEOUT (the stage's deadline
    passed and the job was stopped), MISSING (the head does not know the job) or ERROR (Ray
    could not be asked within the transient-error budget). ``was_being_stopped``: an adopted
    job (one an earlier try submitted) ended STOPPED right after this try found it, i.e. it
    was already being stopped by the kill or clear of that earlier try. ``message`` is
    redacted here: Ray's message of a failed job quotes the end of the job's log.
    """
    return {
        "status": status,
        "submission_id": submission_id,
        "message": redact_job_text(message or ""),
        "result_uri": result_uri,
        "dashboard_url": dashboard_url,
        "stage": stage,
        "was_being_stopped": was_being_stopped,
    }


@dataclass(frozen=True)
class LogChunk:
    """New lines of a job log since the last fetch."""

    lines: list[str]
    skipped: int
    """Lines that were new but left out by the per-fetch limit (the oldest ones)."""
    offset: int
    """Characters of the log consumed so far; the next fetch starts there."""


LOG_FETCH_MAX_INTERVAL_S = 300.0
LOG_CHARS_PER_INTERVAL = 1_000_000
"""Past this many characters, each more million stretches the log fetch interval once more."""


def log_fetch_interval(interval_s: float, log_chars: int) -> float:
    """Seconds until the next job log fetch: ``interval_s`` for a log under a million
    characters, that many times as long per million (the whole log comes each time), at most
    ``LOG_FETCH_MAX_INTERVAL_S`` (a 50 MB log then costs one download every 5 minutes)."""
    scale = max(1.0, log_chars / LOG_CHARS_PER_INTERVAL)
    return max(interval_s, min(interval_s * scale, LOG_FETCH_MAX_INTERVAL_S))


def new_log_lines(logs: str, offset: int, *, max_lines: int, final: bool) -> LogChunk:
    """The complete lines of ``logs`` after character ``offset``, at most the last ``max_lines``.

    A line still being written (no newline yet) waits for the next fetch unless ``final``.
    A log shorter than ``offset`` was replaced, and is read again from its start.
    """
    if offset > len(logs):
        offset = 0
    end = len(logs) if final else logs.rfind("\n", offset) + 1
    if end <= offset:
        return LogChunk([], 0, offset)
    lines = logs[offset:end].splitlines()
    skipped = max(0, len(lines) - max_lines)
    return LogChunk(lines[skipped:], skipped, end)


class RayJobTrigger(BaseTrigger):
    """Poll a Ray job until it ends or its deadline passes, then fire one event.

    Args:
        submission_id: the Ray job's submission id.
        ray_conn_id: Airflow connection of the Ray dashboard.
        poll_interval: seconds between status polls.
        result_uri: passed through to the event so the resumed operator, a fresh instance,
            knows where the stage's ``result.json`` is.
        stage: the stage (task id), for messages.
        deadline: epoch seconds after which the job is stopped and the event is TIMEOUT;
            fixed from the job's first submission, so a triggerer restart never extends it.
            None: no deadline.
        timeout_s: the stage timeout the deadline came from, for the message.
        transient_error_budget_s: seconds of consecutive Ray API failures ridden out (with
            backoff) before the event is ERROR; None: the connection extra
            ``transient_error_budget_s``, else ``DEFAULT_TRANSIENT_ERROR_BUDGET_S``.
        stop_wait_s: how long to wait for Ray to report a stopped job STOPPED.
        log_interval_s: seconds between fetches of the job log for the task log.
        adopted_at: epoch seconds when this try re-attached to a job an earlier try
            submitted; None when this try submitted the job.
    """

    def __init__(
        self,
        *,
        submission_id: str,
        ray_conn_id: str,
        poll_interval: float = 5.0,
        result_uri: str | None = None,
        stage: str = "",
        deadline: float | None = None,
        timeout_s: float | None = None,
        transient_error_budget_s: float | None = None,
        stop_wait_s: float = DEFAULT_STOP_WAIT_S,
        log_interval_s: float = 15.0,
        adopted_at: float | None = None,
    ) -> None:
        super().__init__()
        self.submission_id = submission_id
        self.ray_conn_id = ray_conn_id
        self.poll_interval = poll_interval
        self.result_uri = result_uri
        self.stage = stage
        self.deadline = deadline
        self.timeout_s = timeout_s
        self.transient_error_budget_s = transient_error_budget_s
        self.stop_wait_s = stop_wait_s
        self.log_interval_s = log_interval_s
        self.adopted_at = adopted_at
        self._log_offset = 0  # in memory: after a triggerer restart the rate limit applies
        self._next_log_fetch = 0.0

    def serialize(self) -> tuple[str, dict[str, Any]]:
        """Class path and kwargs that rebuild this trigger in the triggerer."""
        return (
            "ray_jobs.triggers.RayJobTrigger",
            {
                "submission_id": self.submission_id,
                "ray_conn_id": self.ray_conn_id,
                "poll_interval": self.poll_interval,
                "result_uri": self.result_uri,
                "stage": self.stage,
                "deadline": self.deadline,
                "timeout_s": self.timeout_s,
                "transient_error_budget_s": self.transient_error_budget_s,
                "stop_wait_s": self.stop_wait_s,
                "log_interval_s": self.log_interval_s,
                "adopted_at": self.adopted_at,
            },
        )

    def _hook(self) -> RayJobsHook:
        return RayJobsHook(self.ray_conn_id, transient_error_budget_s=self.transient_error_budget_s)

    async def run(self) -> AsyncIterator[TriggerEvent]:
        """Yield exactly one event: terminal status, TIMEOUT, MISSING or ERROR."""
        hook, dashboard_url, job = self._hook(), "", None
        try:
            dashboard_url = await hook.adashboard_job_url(self.submission_id)
            status, message, job = await self._wait_for_end(hook)
        except RayJobsError as err:
            status, message = "ERROR", str(err)
        yield TriggerEvent(
            job_event_payload(
                status=status,
                submission_id=self.submission_id,
                message=message,
                result_uri=self.result_uri,
                dashboard_url=dashboard_url,
                stage=self.stage,
                was_being_stopped=status == "STOPPED" and self._stopped_before_adoption(job),
            )
        )

    async def _wait_for_end(self, hook: RayJobsHook) -> tuple[str, str, dict[str, Any] | None]:
        """Poll until the job ends or the deadline passes; returns (status, message, job).

        Raises:
            RayJobsError: a wrong token (that does not heal by waiting), or Ray unreachable
                for longer than the transient-error budget.
        """
        last_status = None
        while True:
            job = await hook.aget_job(self.submission_id)
            if job is None:
                return "MISSING", await self._missing_message(hook), None
            if job["status"] != last_status:
                last_status = job["status"]
                self.log.info("Ray job %s is %s", self.submission_id, last_status)
            if job["status"] in TERMINAL_STATUSES:
                await asyncio.sleep(FINAL_LOG_SETTLE_S)
                await self._stream_logs(hook, final=True)
                return job["status"], job.get("message") or "", job
            now = time.time()
            if self.deadline is not None and now >= self.deadline:
                return "TIMEOUT", await self._stop_for_timeout(hook), job
            if job["status"] == "RUNNING" and time.monotonic() >= self._next_log_fetch:
                await self._stream_logs(hook)
            left = self.poll_interval if self.deadline is None else self.deadline - now
            await asyncio.sleep(max(0.0, min(self.poll_interval, left)))

    async def _stop_for_timeout(self, hook: RayJobsHook) -> str:
        """Stop the job whose deadline passed and wait for STOPPED; returns the message."""
        deadline = datetime.fromtimestamp(self.deadline or 0, UTC).isoformat(timespec="seconds")
        self.log.warning(
            "stage %s passed its deadline %s; asking Ray to stop job %s",
            self.stage,
            deadline,
            self.submission_id,
        )
        try:
            job = await hook.astop_and_wait(self.submission_id, self.stop_wait_s)
            ended = f"Ray job {self.submission_id} was stopped and ended " + (
                job["status"] if job else "MISSING"
            )
        except RayJobStillRunningError as err:
            ended = str(err)
        await self._stream_logs(hook, final=True)
        timeout = f"{self.timeout_s:g} s" if self.timeout_s is not None else "its timeout"
        return (
            f"stage {self.stage!r} ran past {timeout} (job_options.timeout_s, counted from the "
            f"job's first submission; deadline {deadline}): {ended}"
        )

    async def _missing_message(self, hook: RayJobsHook) -> str:
        return (
            f"Ray job {self.submission_id} does not exist on the Ray head at "
            f"{await hook.abase_url()}: that head was restarted or replaced since the job was "
            "submitted, so the job's cluster is gone, with its logs and dashboard page. Clear "
            "the task to run the stage again on the current cluster."
        )

    def _stopped_before_adoption(self, job: dict[str, Any] | None) -> bool:
        if self.adopted_at is None or job is None:
            return False
        ended = (job.get("end_time") or time.time() * 1000) / 1000
        return ended - self.adopted_at <= self.stop_wait_s

    async def _stream_logs(self, hook: RayJobsHook, *, final: bool = False) -> None:
        """Write the job log's new lines into this trigger's log (the Airflow task log)."""
        self._next_log_fetch = time.monotonic() + self.log_interval_s
        try:
            # Best effort, one attempt: the status poll is what rides out an outage.
            logs = await hook.aget_job_logs(self.submission_id, retry=False)
        except RayJobsError as err:
            self.log.info("%s log not readable now: %s", LOG_PREFIX, redact_job_text(str(err)))
            return
        # Ray's REST API serves the whole log each time: a long one is fetched less often.
        self._next_log_fetch = time.monotonic() + log_fetch_interval(self.log_interval_s, len(logs))
        chunk = new_log_lines(
            logs, self._log_offset, max_lines=MAX_LOG_LINES_PER_FETCH, final=final
        )
        self._log_offset = chunk.offset
        if chunk.skipped:
            self.log.info(
                "%s ... %d lines skipped (the whole log is on the Ray dashboard)",
                LOG_PREFIX,
                chunk.skipped,
            )
        for line in chunk.lines:
            self.log.info("%s %s", LOG_PREFIX, redact_job_text(line))

    async def task_still_deferred(self) -> bool | None:
        """Whether this trigger's task instance is still DEFERRED, from the Airflow API; None
        when that cannot be asked (no task instance, no supervisor, the API failing)."""
        ti = getattr(self, "task_instance", None)
        if ti is None:
            return None
        try:
            from airflow.sdk.execution_time.task_runner import RuntimeTaskInstance

            states = await asyncio.to_thread(
                RuntimeTaskInstance.get_task_states,
                dag_id=ti.dag_id,
                task_ids=[ti.task_id],
                run_ids=[ti.run_id],
                map_index=ti.map_index,
            )
        except Exception as err:  # any comms or API error: the caller decides without it
            self.log.warning("could not read the state of %s: %s", ti.task_id, err)
            return None
        state = (states.get(ti.run_id) or {}).get(ti.task_id)
        return str(getattr(state, "value", state)) == "deferred"

    async def on_kill(self) -> None:
        """Stop the Ray job when a user marks the deferred task failed/succeeded or clears it
        (Airflow >= 3.3), and wait for STOPPED so a new try never adopts a dying job.

        Airflow 3.3 cancels a trigger the same way when it was reassigned to another triggerer
        (this one missed heartbeats): the task is then still DEFERRED and the other triggerer
        watches the job, so it is left running. When the state cannot be read, the job stops
        (a user's kill must not leave GPUs busy).
        """
        if await self.task_still_deferred():
            self.log.info(
                "Ray job %s keeps running: its task is still deferred (this trigger moved to "
                "another triggerer)",
                self.submission_id,
            )
            return
        hook = RayJobsHook(
            self.ray_conn_id,
            transient_error_budget_s=min(
                self.transient_error_budget_s or ON_KILL_ERROR_BUDGET_S, ON_KILL_ERROR_BUDGET_S
            ),
        )
        try:
            job = await hook.astop_and_wait(
                self.submission_id, min(self.stop_wait_s, ON_KILL_WAIT_S)
            )
        except RayJobsError as err:
            self.log.warning("could not stop Ray job %s: %s", self.submission_id, err)
            return
        status = job["status"] if job else "MISSING"
        self.log.info("Ray job %s stopped on task kill: %s", self.submission_id, status)


async def first_event(trigger: RayJobTrigger) -> dict[str, Any]:
    """Run the trigger to its event in this process (the operator's ``deferrable=False``)."""
    async for event in trigger.run():
        payload: dict[str, Any] = event.payload
        return payload
    raise RuntimeError(f"RayJobTrigger for {trigger.submission_id} ended without an event")
