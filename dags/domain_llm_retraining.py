"""Weekly (or on demand) retraining of the domain LLM: data -> CPT -> SFT -> eval -> promote.

Each heavy stage is a Ray job (``python -m pipeline.stages.<stage>``) submitted through the
``ray_default`` connection; tasks defer while the job runs, so no Airflow worker slot is held.
Only URIs and small dicts travel through XCom. Parse-time work is reading one YAML file for the
form's hints: no torch, ray or mlflow imports, no network.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pendulum
from airflow.sdk import DAG, Param, get_current_context, task

from pipeline.form import form_fields
from ray_jobs.operators import RayJobOperator

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = os.environ.get("PIPELINE_CONFIG", str(REPO_ROOT / "configs" / "demo.yaml"))
POLL_INTERVAL = float(os.environ.get("PIPELINE_RAY_POLL_INTERVAL", "10"))
STAGES = ("prepare_data", "continued_pretraining", "instruction_finetuning", "evaluate", "promote")

RESOLVED = "ti.xcom_pull(task_ids='resolve_config')"

params: dict[str, Any] = {
    "config": Param(
        DEFAULT_CONFIG,
        type="string",
        title="Config file",
        description="Pipeline YAML config (path on the Airflow workers). Fields below override it.",
    )
}
for dotted, schema in form_fields(DEFAULT_CONFIG).items():
    params[dotted] = Param(None, title=dotted, **schema)

with DAG(
    dag_id="domain_llm_retraining",
    description="Continued pre-training + SFT of the domain LLM on Ray/DeepSpeed, gated promotion in MLflow",
    schedule="@weekly",
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    params=params,
    tags=["llm", "ray", "deepspeed", "mlflow"],
    doc_md=__doc__,
    default_args={"retries": 1, "retry_delay": pendulum.duration(minutes=1)},
) as dag:

    @task
    def resolve_config() -> dict[str, Any]:
        """Validate config file + form overrides and write the resolved config (fails before any GPU)."""
        from pipeline.runs import resolve_run, run_key

        context = get_current_context()
        form = dict(context["params"])
        config_path = form.pop("config")
        dag_run = context["dag_run"]
        return resolve_run(config_path, form, run_key(dag_run.dag_id, dag_run.run_id))

    previous: Any = resolve_config()
    for index, stage in enumerate(STAGES):
        stage_dir = f"{{{{ {RESOLVED}['artifact_root'] }}}}/{{{{ {RESOLVED}['run_key'] }}}}/{stage}"
        entrypoint = (
            f"python -m pipeline.stages.{stage}"
            f" --config {{{{ {RESOLVED}['config_uri'] }}}}"
            f" --run-key {{{{ {RESOLVED}['run_key'] }}}}"
        )
        if index > 0:
            upstream = f"ti.xcom_pull(task_ids='{STAGES[index - 1]}')"
            entrypoint += f" --input {{{{ {upstream}['output_uri'] }}}}"
        current = RayJobOperator(
            task_id=stage,
            entrypoint=entrypoint,
            result_uri=f"{stage_dir}/result.json",
            poll_interval=POLL_INTERVAL,
        )
        previous >> current
        previous = current
