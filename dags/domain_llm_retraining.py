"""Weekly, on fresh data, or on demand: retrain the domain LLM: data -> CPT -> SFT -> eval -> promote.

Each heavy stage is a Ray job (``python -m pipeline.stages.<stage>``) submitted through the
``ray_default`` connection; tasks defer while the job runs, so no Airflow worker slot is held.
Only URIs and small dicts travel through XCom. Parse-time work is reading the default YAML
config (form hints, schedule, Asset): no torch, ray or mlflow imports, no network.

Triggering: only the form's fields may be set in ``dag_run.conf`` (anything else fails the
first task with the list of allowed keys); ``config`` must name a file under ``configs/`` or a
folder listed in ``PIPELINE_CONFIG_DIRS``.
"""

from __future__ import annotations

import os
import shlex
from typing import Any

import pendulum
from airflow.sdk import (
    DAG,
    Asset,
    AssetOrTimeSchedule,
    CronTriggerTimetable,
    Param,
    get_current_context,
    task,
)

from pipeline.config import OrchestrationConfig, default_config_path, load_config
from pipeline.contract import STAGES
from pipeline.data_watch import data_asset_uri
from pipeline.form import CONFIG_PARAM, form_fields
from ray_jobs.notifiers import PipelineRunNotifier
from ray_jobs.operators import RayJobOperator

DEFAULT_CONFIG = default_config_path()
POLL_INTERVAL = float(os.environ.get("PIPELINE_RAY_POLL_INTERVAL", "10"))
WEEKLY_CRON = "0 3 * * 1"
"""Mondays 03:00 UTC."""

RESOLVED = "ti.xcom_pull(task_ids='resolve_config')"


def build_schedule(orchestration: OrchestrationConfig, asset: Asset) -> Any:
    """``orchestration.schedule`` as an Airflow schedule.

    The weekly timetable fires at its cron time only: with no ``start_date`` and
    ``run_immediately=False``, unpausing (the form's "unpause on trigger" included) never
    starts the past week's run. A DAG paused over a Monday still runs that Monday's slot when
    unpaused again (Airflow's ``catchup=False`` keeps the latest missed time).
    """
    weekly = CronTriggerTimetable(WEEKLY_CRON, timezone="UTC", run_immediately=False)
    return {
        "manual": None,
        "weekly": weekly,
        "asset": [asset],
        "weekly_or_asset": AssetOrTimeSchedule(timetable=weekly, assets=[asset]),
    }[orchestration.schedule]


default_config = load_config(DEFAULT_CONFIG)
orchestration = default_config.orchestration
domain_data = Asset(data_asset_uri(default_config))

params: dict[str, Any] = {
    CONFIG_PARAM: Param(
        DEFAULT_CONFIG,
        type="string",
        title="Config file",
        description="Pipeline YAML config on the Airflow workers (under configs/ or a folder in "
        "PIPELINE_CONFIG_DIRS). The fields below override it.",
        section="Run",
    )
}
for dotted, schema in form_fields(DEFAULT_CONFIG).items():
    params[dotted] = Param(None, **schema)

with DAG(
    dag_id="domain_llm_retraining",
    description="Continued pre-training + SFT of the domain LLM on Ray/DeepSpeed, gated promotion in MLflow",
    schedule=build_schedule(orchestration, domain_data),
    catchup=False,
    max_active_runs=1,
    dagrun_timeout=(
        pendulum.duration(hours=orchestration.dagrun_timeout_hours)
        if orchestration.dagrun_timeout_hours
        else None
    ),
    params=params,
    user_defined_filters={"shquote": shlex.quote},
    on_failure_callback=PipelineRunNotifier(succeeded=False),
    on_success_callback=PipelineRunNotifier(succeeded=True),
    tags=["llm", "ray", "deepspeed", "mlflow"],
    doc_md=__doc__,
    default_args={"retries": 1, "retry_delay": pendulum.duration(minutes=1)},
) as dag:

    @task
    def resolve_config() -> dict[str, Any]:
        """Validate config file + form overrides and write the resolved config (fails before any GPU)."""
        from airflow.sdk import BaseHook
        from airflow.sdk.exceptions import AirflowFailException

        from pipeline.config import ConfigError
        from pipeline.form import allowed_config_dirs, trigger_overrides
        from pipeline.preflight import is_local_host, resolve_run, run_key

        context = get_current_context()
        dag_run = context["dag_run"]
        try:
            # Params already hold dag_run.conf merged in; the raw conf shows what the caller set.
            config_path, overrides = trigger_overrides(
                dict(context["params"]),
                dict(dag_run.conf or {}),
                allowed_config_dirs(DEFAULT_CONFIG),
            )
            ray_host = BaseHook.get_connection("ray_default").host
            return resolve_run(
                config_path,
                overrides,
                run_key(dag_run.dag_id, dag_run.run_id),
                remote_cluster=not is_local_host(ray_host),
            )
        except ConfigError as err:
            # A config error does not heal by retrying: fail now, with the message.
            raise AirflowFailException(str(err)) from err

    previous: Any = resolve_config()
    for index, stage in enumerate(STAGES):
        stage_dir = f"{{{{ {RESOLVED}['artifact_root'] }}}}/{{{{ {RESOLVED}['run_key'] }}}}/{stage}"
        entrypoint = (
            f"python -m pipeline.stages.{stage}"
            f" --config {{{{ {RESOLVED}['config_uri'] | shquote }}}}"
            f" --run-key {{{{ {RESOLVED}['run_key'] | shquote }}}}"
            f" --code-version {{{{ {RESOLVED}['code_version'] | shquote }}}}"
        )
        inputs = f"{{{{ {RESOLVED}['inputs_fingerprint'] }}}}"
        if index == 0:
            entrypoint += (
                f" --inputs-fingerprint {{{{ {RESOLVED}['inputs_fingerprint'] | shquote }}}}"
            )
        else:
            upstream = f"ti.xcom_pull(task_ids='{STAGES[index - 1]}')"
            entrypoint += f" --input {{{{ {upstream}['output_uri'] | shquote }}}}"
            # Upstream outputs changed (a cleared, rerun stage): this stage's job key changes too.
            inputs += f"-{{{{ {upstream}.get('result_digest', '') }}}}"
        current = RayJobOperator(
            task_id=stage,
            entrypoint=entrypoint,
            result_uri=f"{stage_dir}/result.json",
            poll_interval=POLL_INTERVAL,
            job_options=f"{{{{ {RESOLVED}['jobs']['{stage}'] | tojson }}}}",
            inputs_fingerprint=inputs,
            mlflow_run_url=f"{{{{ {RESOLVED}['mlflow_run_url'] }}}}",
        )
        previous >> current
        previous = current
