"""Hook for the Ray Jobs REST API (``/api/jobs/``) of a Ray head's dashboard.

It speaks HTTP with httpx instead of importing the Ray SDK, so Airflow workers and the
triggerer need neither ``ray`` nor a matching Ray version. Ray 2.60 clusters started with
``RAY_AUTH_MODE=token`` expect ``Authorization: Bearer <token>`` on every request; the token is
looked up in the places listed in ``TOKEN_LOOKUP_ORDER``, first hit wins.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import httpx
from airflow.sdk.bases.hook import BaseHook
from airflow.sdk.exceptions import AirflowException
from airflow.sdk.log import amask_secret, mask_secret

AGENT_WAIT_S = 60.0
"""How long a submission waits for the job agent of a freshly started head."""

if TYPE_CHECKING:
    from airflow.sdk import Connection

_EXCEPTION_LINE = re.compile(r"^\w+(?:Error|Exception): .*$", re.MULTILINE)
TERMINAL_STATUSES = frozenset({"SUCCEEDED", "FAILED", "STOPPED"})
ACTIVE_STATUSES = frozenset({"PENDING", "RUNNING"})
DEFAULT_TOKEN_FILE = "~/.ray/auth_token"
TOKEN_LOOKUP_ORDER = (
    "the connection password",
    "the connection extra 'auth_token_path' (a file)",
    "env RAY_AUTH_TOKEN",
    "env RAY_AUTH_TOKEN_PATH (a file)",
    DEFAULT_TOKEN_FILE,
)


class RayJobsError(AirflowException):
    """A Ray Jobs API call failed."""


class RayJobsAuthError(RayJobsError):
    """The Ray head rejected the bearer token (HTTP 401/403)."""


class RayJobsUnreachableError(RayJobsError):
    """Nothing answered at the Ray dashboard address."""


class RaySubmissionExistsError(RayJobsError):
    """A job with this submission id already exists on the cluster."""


@dataclass(frozen=True)
class RayAuthToken:
    """A bearer token and where it came from; only the source is ever printed."""

    value: str = field(repr=False)
    source: str


@dataclass(frozen=True)
class RayApiTarget:
    """Where requests go and how they authenticate, resolved once from the connection."""

    base_url: str
    token: RayAuthToken | None

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token.value}"} if self.token else {}


def _read_token_file(path: str, source: str) -> RayAuthToken:
    file = Path(path).expanduser()
    try:
        value = file.read_text().strip()
    except OSError as err:
        raise RayJobsError(
            f"cannot read the Ray auth token file {file} named by {source}: {err}"
        ) from err
    if not value:
        raise RayJobsError(f"the Ray auth token file {file} named by {source} is empty")
    return RayAuthToken(value, f"{source} ({file})")


def resolve_auth_token(password: str | None, extra: dict[str, Any]) -> RayAuthToken | None:
    """Find the bearer token for a Ray head, in ``TOKEN_LOOKUP_ORDER``.

    Args:
        password: the connection's password, if any.
        extra: the connection's extra fields; ``auth_token_path`` names a token file.

    Returns:
        The token with a description of its source, or None when no source has one (the head
        then must run without token auth).

    Raises:
        RayJobsError: an explicitly configured token file is missing or empty; falling through
            to the next source would hide the misconfiguration behind a 401.
    """
    if password:
        return RayAuthToken(password, TOKEN_LOOKUP_ORDER[0])
    if extra.get("auth_token_path"):
        return _read_token_file(str(extra["auth_token_path"]), "connection extra auth_token_path")
    if os.environ.get("RAY_AUTH_TOKEN"):
        return RayAuthToken(os.environ["RAY_AUTH_TOKEN"].strip(), "env RAY_AUTH_TOKEN")
    if os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return _read_token_file(os.environ["RAY_AUTH_TOKEN_PATH"], "env RAY_AUTH_TOKEN_PATH")
    if Path(DEFAULT_TOKEN_FILE).expanduser().is_file():
        return _read_token_file(DEFAULT_TOKEN_FILE, "the default token file")
    return None


def dashboard_base_url(conn: Connection) -> str:
    """Base URL of the dashboard from a connection's host, port and schema.

    ``host`` may be a bare name (``127.0.0.1``) or a full URL (``https://ray.example.com/ray``);
    the scheme is then the connection's ``schema``, else its type when that is http/https.
    """
    host = (conn.host or "").strip().rstrip("/")
    if not host:
        raise RayJobsError(f"connection {conn.conn_id!r} has no host; expected e.g. 127.0.0.1:8265")
    if "://" not in host:
        scheme = conn.schema or (conn.conn_type if conn.conn_type in ("http", "https") else "http")
        host = f"{scheme}://{host}"
    url = httpx.URL(host)
    if conn.port and url.port is None:
        url = url.copy_with(port=conn.port)
    return str(url).rstrip("/")


class RayJobsHook(BaseHook):
    """Submit, watch, stop and read logs of Ray jobs through the dashboard's REST API.

    Args:
        ray_conn_id: Airflow connection whose host/port (and optional schema) point at the
            Ray dashboard, e.g. ``AIRFLOW_CONN_RAY_DEFAULT=http://ray-head:8265``.
        connect_timeout: seconds to wait for a TCP connection; kept short so a wrong address
            fails the task at once instead of hanging.
        request_timeout: seconds for the whole request once connected.
    """

    conn_name_attr = "ray_conn_id"
    default_conn_name = "ray_default"
    hook_name = "Ray Jobs"

    def __init__(
        self,
        ray_conn_id: str = default_conn_name,
        *,
        connect_timeout: float = 5.0,
        request_timeout: float = 30.0,
    ) -> None:
        super().__init__()
        self.ray_conn_id = ray_conn_id
        self._timeout = httpx.Timeout(request_timeout, connect=connect_timeout)
        self._target: RayApiTarget | None = None

    # -- connection ------------------------------------------------------------------------

    def _get_target(self) -> RayApiTarget:
        if self._target is None:
            conn = self.get_connection(self.ray_conn_id)
            token = resolve_auth_token(conn.password, conn.extra_dejson)
            if token:
                mask_secret(token.value)  # keep it out of task logs even if an error echoes it
            self._target = RayApiTarget(dashboard_base_url(conn), token)
        return self._target

    async def _aget_target(self) -> RayApiTarget:
        # Inside the triggerer's event loop: the connection lookup and the token file read
        # must not block it.
        if self._target is None:
            conn = await self.aget_connection(self.ray_conn_id)
            extra = await conn.aextra_dejson()
            token = await asyncio.to_thread(resolve_auth_token, conn.password, extra)
            if token:
                await amask_secret(token.value)
            self._target = RayApiTarget(dashboard_base_url(conn), token)
        return self._target

    def dashboard_job_url(self, submission_id: str) -> str:
        """Link to the job's page in the Ray dashboard."""
        return job_page_url(self._get_target().base_url, submission_id)

    async def adashboard_job_url(self, submission_id: str) -> str:
        """Async twin of :meth:`dashboard_job_url` for the triggerer."""
        return job_page_url((await self._aget_target()).base_url, submission_id)

    # -- requests --------------------------------------------------------------------------

    def _request(self, method: str, path: str, json: Any = None) -> httpx.Response:
        target = self._get_target()
        url = target.base_url + path
        try:
            with httpx.Client(timeout=self._timeout, headers=target.headers) as client:
                response = client.request(method, url, json=json)
        except httpx.TransportError as err:
            raise self._transport_error(url, err) from err
        return self._checked(response, target)

    async def _arequest(self, method: str, path: str, json: Any = None) -> httpx.Response:
        target = await self._aget_target()
        url = target.base_url + path
        try:
            async with httpx.AsyncClient(timeout=self._timeout, headers=target.headers) as client:
                response = await client.request(method, url, json=json)
        except httpx.TransportError as err:
            raise self._transport_error(url, err) from err
        return self._checked(response, target)

    def _transport_error(self, url: str, err: httpx.TransportError) -> RayJobsError:
        if isinstance(err, httpx.ConnectError | httpx.ConnectTimeout):
            env_var = f"AIRFLOW_CONN_{self.ray_conn_id.upper()}"
            return RayJobsUnreachableError(
                f"cannot reach the Ray Jobs API at {url} (Airflow connection "
                f"{self.ray_conn_id!r}): {type(err).__name__}: {err}. Check that the Ray head is "
                f"running with its dashboard reachable from this host, and that the connection "
                f"({env_var} or the Airflow UI) points at the dashboard port (default 8265)."
            )
        return RayJobsError(f"request to the Ray Jobs API at {url} failed: {type(err).__name__}")

    def _checked(self, response: httpx.Response, target: RayApiTarget) -> httpx.Response:
        """Turn HTTP errors into exceptions that say what to fix; 404 is left to the caller."""
        code, text = response.status_code, _error_summary(response.text)
        where = f"{response.request.method} {response.request.url}"
        if code in (401, 403):
            sent = f"a token from {target.token.source}" if target.token else "no token"
            raise RayJobsAuthError(
                f"Ray rejected {where} with HTTP {code} ({text}). The cluster has token auth "
                f"on (RAY_AUTH_MODE=token) and this hook sent {sent} for connection "
                f"{self.ray_conn_id!r}. The token is looked up, first hit wins, in: "
                f"{'; '.join(TOKEN_LOOKUP_ORDER)}. It must equal the head's token."
            )
        if code >= 400 and "already exists" in response.text:
            raise RaySubmissionExistsError(f"{where} failed: {text}")
        if code >= 400 and code != 404:
            raise RayJobsError(f"{where} failed with HTTP {code}: {text}")
        return response

    # -- jobs API --------------------------------------------------------------------------

    def submit_job(
        self,
        *,
        entrypoint: str,
        submission_id: str,
        metadata: dict[str, str] | None = None,
        runtime_env: dict[str, Any] | None = None,
        entrypoint_num_cpus: float | None = None,
    ) -> str:
        """Submit a job and return its submission id.

        Raises:
            RaySubmissionExistsError: a job with ``submission_id`` exists already.
            RayJobsAuthError, RayJobsUnreachableError, RayJobsError: see ``_checked``.
        """
        body = {
            "entrypoint": entrypoint,
            "submission_id": submission_id,
            "metadata": metadata,
            "runtime_env": runtime_env,
            "entrypoint_num_cpus": entrypoint_num_cpus,
        }
        # A head that just started (or restarted) answers before its job agent is up; Ray says
        # "No available agent" then. That is worth waiting for, briefly; anything else is not.
        deadline = time.monotonic() + AGENT_WAIT_S
        while True:
            try:
                response = self._request("POST", "/api/jobs/", json=body)
                break
            except RayJobsError as err:
                if "No available agent" not in str(err) or time.monotonic() > deadline:
                    raise
                self.log.info("Ray job agent not ready yet; retrying the submission")
                time.sleep(2)
        self._raise_if_404(response)
        submitted: str = response.json()["submission_id"]
        self.log.info("submitted Ray job %s: %s", submitted, self.dashboard_job_url(submitted))
        return submitted

    def get_job(self, submission_id: str) -> dict[str, Any] | None:
        """The job's info (status, message, start/end time in ms, metadata ...); None if absent."""
        response = self._request("GET", f"/api/jobs/{_quoted(submission_id)}")
        return self._job_or_none(response)

    async def aget_job(self, submission_id: str) -> dict[str, Any] | None:
        """Async twin of :meth:`get_job`, for the triggerer."""
        response = await self._arequest("GET", f"/api/jobs/{_quoted(submission_id)}")
        return self._job_or_none(response)

    def list_jobs(self) -> list[dict[str, Any]]:
        """Every job the cluster knows, in any status."""
        response = self._request("GET", "/api/jobs/")
        self._raise_if_404(response)
        jobs: list[dict[str, Any]] = response.json()
        return jobs

    def stop_job(self, submission_id: str) -> bool:
        """Ask Ray to stop a job; False when it had already ended or does not exist."""
        response = self._request("POST", f"/api/jobs/{_quoted(submission_id)}/stop")
        return response.status_code != 404 and bool(response.json().get("stopped"))

    async def astop_job(self, submission_id: str) -> bool:
        """Async twin of :meth:`stop_job`, for the trigger's ``on_kill``."""
        response = await self._arequest("POST", f"/api/jobs/{_quoted(submission_id)}/stop")
        return response.status_code != 404 and bool(response.json().get("stopped"))

    def get_job_logs(self, submission_id: str) -> str:
        """The driver's whole log (stdout and stderr of the entrypoint)."""
        response = self._request("GET", f"/api/jobs/{_quoted(submission_id)}/logs")
        self._raise_if_404(response)
        logs: str = response.json().get("logs", "")
        return logs

    def _job_or_none(self, response: httpx.Response) -> dict[str, Any] | None:
        # Ray answers an unknown id with 404 "Job <id> does not exist"; any other 404 means the
        # connection points at something that is not a Ray dashboard.
        if response.status_code == 404 and "does not exist" in response.text:
            return None
        self._raise_if_404(response)
        job: dict[str, Any] = response.json()
        return job

    def _raise_if_404(self, response: httpx.Response) -> None:
        if response.status_code == 404:
            raise RayJobsError(
                f"{response.request.method} {response.request.url} returned 404 "
                f"({response.text.strip()[:300]}); is connection {self.ray_conn_id!r} pointing "
                "at a Ray dashboard?"
            )


def job_page_url(base_url: str, submission_id: str) -> str:
    """The dashboard's page for one job (a client-side route, hence the ``#``)."""
    return f"{base_url}/#/jobs/{submission_id}"


def _quoted(submission_id: str) -> str:
    return quote(submission_id, safe="")


def _error_summary(body: str) -> str:
    """The gist of an error body: Ray answers server errors with whole Python tracebacks,
    nested when the head relays an agent's error; the innermost ``XxxError: ...`` line says it."""
    raised = _EXCEPTION_LINE.findall(body)
    return raised[-1].strip()[:500] if raised else body.strip()[:1000]
