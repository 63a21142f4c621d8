"""The DAG file parses like Airflow parses it, without the heavy stack, with the expected
wiring and form (its parse time is benchmarks/dag_parse.py's)."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
STAGES = ["prepare_data", "continued_pretraining", "instruction_finetuning", "evaluate", "promote"]

PARSE = """
import json, sys
import airflow.sdk, airflow.providers.standard.decorators.python  # the DAG processor pre-imports
from airflow.dag_processing.dagbag import DagBag
bag = DagBag(dag_folder=sys.argv[1])
dag = bag.get_dag("domain_llm_retraining")
heavy = [m for m in ("torch", "ray", "deepspeed", "transformers", "mlflow", "datasets") if m in sys.modules]
print(json.dumps({
    "errors": {k: str(v) for k, v in bag.import_errors.items()},
    "tasks": dag.task_ids,
    "upstream": {t.task_id: sorted(t.upstream_task_ids) for t in dag.tasks},
    "entrypoints": {t.task_id: getattr(t, "entrypoint", None) for t in dag.tasks},
    "job_options": {t.task_id: getattr(t, "job_options", None) for t in dag.tasks},
    "inputs": {t.task_id: getattr(t, "inputs_fingerprint", None) for t in dag.tasks},
    "params": {k: dag.params.get_param(k).schema for k in dag.params.keys()},
    "timetable": type(dag.timetable).__name__,
    "dagrun_timeout_s": dag.dagrun_timeout.total_seconds(),
    "filters": sorted(dag.user_defined_filters or {}),
    "callbacks": [type(dag.on_failure_callback).__name__, type(dag.on_success_callback).__name__],
    "heavy": heavy,
}))
"""


@pytest.fixture(scope="module")
def parsed(airflow_db: Path) -> dict[str, Any]:
    """The parsed DAG; DagBag looks DAGs up in the metadata DB, so it needs a migrated one."""
    # A fresh interpreter: sys.modules then shows exactly what parsing the DAG imported.
    dag_file = REPO_ROOT / "dags" / "domain_llm_retraining.py"
    out = subprocess.run(
        [sys.executable, "-c", PARSE, str(dag_file)], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def test_dag_parses_fast_without_heavy_imports_and_wires_the_stages(
    parsed: dict[str, Any],
) -> None:
    assert parsed["errors"] == {}
    assert parsed["heavy"] == []
    assert parsed["tasks"] == ["resolve_config", *STAGES]
    chain = ["resolve_config", *STAGES]
    for upstream, task in itertools.pairwise(chain):
        assert parsed["upstream"][task] == [upstream]
    resolved = "ti.xcom_pull(task_ids='resolve_config')"
    for index, stage in enumerate(STAGES):
        entry = parsed["entrypoints"][stage]
        assert entry.startswith(f"python -m pipeline.stages.{stage} --config ")
        assert ("--input " in entry) == (index > 0)
        assert ("--inputs-fingerprint" in entry) == (index == 0)
        # Every templated value is shell-quoted.
        assert entry.count("{{") == entry.count("| shquote }}") == 4
        assert f"--code-version {{{{ {resolved}['code_version'] | shquote }}}}" in entry
        options = parsed["job_options"][stage]
        assert options == f"{{{{ {resolved}['jobs']['{stage}'] | tojson }}}}"
        inputs = parsed["inputs"][stage]
        assert inputs.startswith(f"{{{{ {resolved}['inputs_fingerprint'] }}}}")
        assert ("result_digest" in inputs) == (index > 0)
    assert parsed["filters"] == ["shquote"]
    assert parsed["callbacks"] == ["PipelineRunNotifier", "PipelineRunNotifier"]


def test_demo_config_schedules_nothing_and_bounds_the_run(parsed: dict[str, Any]) -> None:
    # demo.yaml keeps orchestration.schedule: manual, so unpausing never starts a run.
    assert parsed["timetable"] == "NullTimetable"
    assert parsed["dagrun_timeout_s"] == 168 * 3600


def test_trigger_form_is_derived_from_the_config_schema(parsed: dict[str, Any]) -> None:
    params = parsed["params"]
    assert params["config"]["type"] == "string"
    assert params["compute.zero_stage"]["enum"] == [None, 0, 1, 2, 3]
    assert params["compute.zero_stage"]["values_display"]["null"] == "(keep demo.yaml's value: 3)"
    assert params["cpt.max_steps"]["title"] == "CPT max steps"
    assert params["cpt.max_steps"]["section"] == "Continued pre-training"
    assert params["compute.offload_optimizer"]["enum"] == [None, True, False]
    assert "type" not in params["compute.offload_optimizer"]  # a select, not a switch
    assert all("``" not in p.get("description", "") for p in params.values())
    assert params["cpt.max_steps"]["type"] == ["null", "integer"]
    assert params["cpt.max_steps"]["minimum"] == 1
    assert params["cpt.lr"]["exclusiveMinimum"] == 0
    assert params["compute.attention"]["enum"] == [
        None,
        "auto",
        "flash_attention_2",
        "flex_attention",
        "sdpa",
        "eager",
    ]
