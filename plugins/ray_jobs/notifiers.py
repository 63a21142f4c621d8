"""DAG-run notifications: what the run decided (promoted, or refused with the failed gates) or
which stage it failed at, with the Ray job and MLflow run links, in the log always and to a chat
webhook or e-mail when one is configured.

``PIPELINE_NOTIFY_CONN`` names an Airflow connection: an ``smtp`` connection sends e-mail (to
the addresses in its extra ``{"to": "a@x, b@y"}``) through the SMTP provider; any other type is
an incoming webhook (Slack, Mattermost, Teams...), e.g. ``https://hooks.slack.com/services/T/B/X``
(the password, if set, is appended as the last path segment), and the message is POSTed as
``{"text": ...}``.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseNotifier

from pipeline.config import default_config_path
from ray_jobs.links import MLFLOW_RUN_URL_KEY, RAY_DASHBOARD_URL_KEY

if TYPE_CHECKING:
    from airflow.sdk import Context

log = logging.getLogger(__name__)

NOTIFY_CONN_ENV = "PIPELINE_NOTIFY_CONN"
RESOLVE_TASK = "resolve_config"


def _pull(ti: Any, task_id: str, key: str) -> Any:
    # Links only enrich the message: an XCom that cannot be read must not cost the message.
    try:
        return ti.xcom_pull(task_ids=task_id, key=key)
    except Exception as err:  # any XCom backend error: logged, not hidden
        log.warning("could not read XCom %s of %s: %s", key, task_id, err)
        return None


def run_outcome_of(context: Context) -> dict[str, Any] | None:
    """The run's decision and parent run link, read from its artifacts (``preflight.run_outcome``),
    which a DAG callback can read under ``dag.test()`` and in the DAG processor alike; its
    artifact root comes from the run's own config (file + form fields, as the first task
    resolved them). None when that config cannot be read: the run failed validating it."""
    from pipeline.config import load_config
    from pipeline.form import allowed_config_dirs, trigger_overrides
    from pipeline.preflight import run_key, run_outcome

    dag = context["dag"]
    dag_run = context.get("dag_run")
    conf = dict(getattr(dag_run, "conf", None) or {})
    try:
        params = {**dag.params.dump(), **conf}
        config_path, overrides = trigger_overrides(
            params, conf, allowed_config_dirs(default_config_path())
        )
        root = load_config(config_path, overrides).storage.artifact_root
        return run_outcome(root, run_key(dag.dag_id, str(context.get("run_id"))))
    except Exception as err:  # a bad config or an unreadable store: the message goes anyway
        log.warning("could not read the run's outcome: %s", err)
        return None


def run_message(context: Context, succeeded: bool) -> str:
    """One paragraph naming the DAG run, what it decided (promoted, refused with the failed
    gates) or the stage it failed at, and the links a person needs."""
    from pipeline.redact import redact_text

    dag_id = context["dag"].dag_id
    run_id = context.get("run_id", "?")
    ti = context.get("ti")
    stage = ti.task_id if ti is not None else "unknown"
    # A run that failed resolving its config has no outcome to read (and no links).
    outcome = (run_outcome_of(context) if succeeded or stage != RESOLVE_TASK else None) or {}
    parent_url = outcome.get("mlflow_run_url") or ""
    if succeeded:
        decision = outcome.get("decision")
        if decision == "promoted":
            lines = [f"{dag_id} run {run_id} succeeded: {outcome['model']} promoted to champion."]
        elif decision == "refused":
            lines = [
                f"{dag_id} run {run_id} did not promote {outcome['model']}: {outcome['reason']}."
            ]
        else:
            lines = [f"{dag_id} run {run_id} succeeded."]
        if parent_url:
            lines.append(f"MLflow parent run: {parent_url}")
        return redact_text("\n".join(lines))
    lines = [f"{dag_id} run {run_id} failed at stage {stage}: {context.get('reason') or '-'}"]
    if ti is not None and stage != RESOLVE_TASK:
        ray_url = _pull(ti, stage, RAY_DASHBOARD_URL_KEY)
        run_url = _pull(ti, stage, MLFLOW_RUN_URL_KEY) or parent_url
        if ray_url:
            lines.append(f"Ray job: {ray_url}")
        if run_url:
            lines.append(f"MLflow run: {run_url}")
    return redact_text("\n".join(lines))


class PipelineRunNotifier(BaseNotifier):
    """DAG-level ``on_failure_callback`` / ``on_success_callback`` of the retraining DAG.

    Args:
        succeeded: True for the success callback (the message then says so).
        conn_id: Airflow connection to notify through; default ``$PIPELINE_NOTIFY_CONN``
            (read when the callback runs); none configured: log only.
    """

    template_fields = ()

    def __init__(self, *, succeeded: bool, conn_id: str | None = None) -> None:
        super().__init__()
        self.succeeded = succeeded
        self.conn_id = conn_id

    def render_template_fields(self, context: Context, jinja_env: Any = None) -> None:
        """Nothing is templated; skipping the render also spares ``dag.test()``, whose callback
        context holds a serialized DAG without a template environment."""

    def notify(self, context: Context) -> None:
        """Log the message, then send it through the configured connection, if any."""
        message = run_message(context, self.succeeded)
        (log.info if self.succeeded else log.error)("%s", message)
        conn_id = self.conn_id or os.environ.get(NOTIFY_CONN_ENV)
        if conn_id:
            send(conn_id, message, subject=message.splitlines()[0])


def send(conn_id: str, message: str, subject: str) -> None:
    """Deliver ``message`` through connection ``conn_id`` (e-mail for smtp, else a webhook).

    Raises:
        WebhookError: the webhook answered an HTTP error or could not be reached.
        ValueError: an smtp connection without recipients.
    """
    from airflow.sdk import BaseHook

    conn = BaseHook.get_connection(conn_id)
    if conn.conn_type == "smtp":
        from airflow.providers.smtp.hooks.smtp import SmtpHook

        recipients = str(conn.extra_dejson.get("to") or "")
        if not recipients:
            raise ValueError(f"connection {conn_id!r}: set extra {{'to': 'a@example.com'}}")
        with SmtpHook(smtp_conn_id=conn_id) as smtp:
            smtp.send_email_smtp(
                to=recipients, subject=subject, html_content=f"<pre>{message}</pre>"
            )
        return
    import httpx

    url = conn.host or ""
    if "://" not in url:  # AIRFLOW_CONN_X=https://host:port/path: path is the schema
        scheme = conn.conn_type if conn.conn_type in ("http", "https") else "https"
        port = f":{conn.port}" if conn.port else ""
        url = f"{scheme}://{url}{port}/{conn.schema or ''}"
    if conn.password:
        url = f"{url.rstrip('/')}/{conn.password}"
    # An incoming webhook's path is its secret (hooks.slack.com/services/T/B/<secret>): errors
    # name the connection and the host only, and chain nothing that holds the URL.
    where = f"connection {conn_id!r} (webhook host {httpx.URL(url).host or '?'})"
    try:
        response = httpx.post(url, json={"text": message}, timeout=10)
    except httpx.HTTPError as err:
        raise WebhookError(f"{where}: could not post: {type(err).__name__}") from None
    if response.is_error:
        raise WebhookError(f"{where} answered HTTP {response.status_code}")


class WebhookError(RuntimeError):
    """A chat webhook refused or could not take a notification; the message names the
    connection and host, never the webhook URL's secret path."""
