"""The DAG file parses like Airflow parses it, cheaply, with the expected wiring and form."""

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
from airflow.dag_processing.dagbag import DagBag
bag = DagBag(dag_folder=sys.argv[1])
dag = bag.get_dag("domain_llm_retraining")
heavy = [m for m in ("torch", "ray", "deepspeed", "transformers", "mlflow", "datasets") if m in sys.modules]
print(json.dumps({
    "errors": {k: str(v) for k, v in bag.import_errors.items()},
    "tasks": dag.task_ids,
    "upstream": {t.task_id: sorted(t.upstream_task_ids) for t in dag.tasks},
    "entrypoints": {t.task_id: getattr(t, "entrypoint", None) for t in dag.tasks},
    "params": {k: dag.params.get_param(k).schema for k in dag.params.keys()},
    "schedule": str(dag.timetable.expression),
    "heavy": heavy,
}))
"""


@pytest.fixture(scope="module")
def parsed(airflow_db: Path) -> dict[str, Any]:
    """The parsed DAG; DagBag looks DAGs up in the metadata DB, so it needs a migrated one."""
    # A fresh interpreter: sys.modules then shows exactly what parsing the DAG imported.
    out = subprocess.run(
        [sys.executable, "-c", PARSE, str(REPO_ROOT / "dags")], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def test_dag_parses_without_heavy_imports_and_wires_the_stages(parsed: dict[str, Any]) -> None:
    assert parsed["errors"] == {}
    assert parsed["heavy"] == []
    assert parsed["tasks"] == ["resolve_config", *STAGES]
    chain = ["resolve_config", *STAGES]
    for upstream, task in itertools.pairwise(chain):
        assert parsed["upstream"][task] == [upstream]
    for index, stage in enumerate(STAGES):
        entry = parsed["entrypoints"][stage]
        assert entry.startswith(f"python -m pipeline.stages.{stage} --config ")
        assert ("--input" in entry) == (index > 0)
    assert parsed["schedule"] == "0 0 * * 0"  # @weekly


def test_trigger_form_is_derived_from_the_config_schema(parsed: dict[str, Any]) -> None:
    params = parsed["params"]
    assert params["config"]["type"] == "string"
    assert params["compute.zero_stage"]["enum"] == [None, 0, 1, 2, 3]
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
