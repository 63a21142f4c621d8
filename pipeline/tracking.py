"""MLflow helpers: one parent run per DAG run, one child run per stage.

Runs are found by tags, not remembered in process state, so a stage retried on another machine
attaches to the same parent run.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.config import PipelineConfig, TrackingConfig
from pipeline.redact import redact

if TYPE_CHECKING:
    from mlflow import MlflowClient

RUN_KEY_TAG = "pipeline.run_key"
ROLE_TAG = "pipeline.role"
STAGE_TAG = "pipeline.stage"
DECISION_TAG = "pipeline.decision"
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING_KIND = "custom_model_development"
"""MLflow 3's UI opens an experiment by its kind; this one shows the runs table (model
training), not the GenAI traces and "Evaluations" view."""


def client(tracking: TrackingConfig) -> MlflowClient:
    import mlflow

    mlflow.set_tracking_uri(tracking.tracking_uri)
    mlflow.set_registry_uri(tracking.tracking_uri)
    return mlflow.MlflowClient(
        tracking_uri=tracking.tracking_uri, registry_uri=tracking.tracking_uri
    )


def experiment_id(tracking: TrackingConfig) -> str:
    """Id of the configured experiment, created (with its artifact location) if missing."""
    mlc = client(tracking)
    experiment = mlc.get_experiment_by_name(tracking.experiment)
    if experiment is not None:
        if experiment.tags.get(EXPERIMENT_KIND_TAG) is None:
            # Experiments created before the tag existed; a kind chosen in the UI is kept.
            mlc.set_experiment_tag(
                experiment.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND
            )
        return str(experiment.experiment_id)
    location = tracking.artifact_location
    if location and "://" not in location:
        location = f"file://{location}"
    return str(
        mlc.create_experiment(
            tracking.experiment,
            artifact_location=location,
            tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING_KIND},
        )
    )


def parent_run_id(tracking: TrackingConfig, run_key: str) -> str:
    """The DAG run's parent run, created on first use."""
    mlc = client(tracking)
    exp = experiment_id(tracking)
    found = mlc.search_runs(
        [exp], filter_string=f"tags.`{RUN_KEY_TAG}` = '{run_key}' and tags.`{ROLE_TAG}` = 'parent'"
    )
    if found:
        return str(found[0].info.run_id)
    run = mlc.create_run(exp, run_name=run_key, tags={RUN_KEY_TAG: run_key, ROLE_TAG: "parent"})
    return str(run.info.run_id)


ML_WORKFLOW_QUERY = "?workflowType=machine_learning"
"""MLflow 3's UI opens every run in its GenAI layout ("Evaluations") unless the URL asks for
the model-training one; the experiment's kind tag does not change that."""


def run_url(tracking: TrackingConfig, run_id: str, page: str = "") -> str | None:
    """The run's page in the MLflow UI (``page``: e.g. ``/artifacts/report/report.html``), in
    the model-training layout; None when ``tracking.ui_url`` is unset."""
    if not tracking.ui_url:
        return None
    exp = experiment_id(tracking)
    base = tracking.ui_url.rstrip("/")
    return f"{base}/#/experiments/{exp}/runs/{run_id}{page}{ML_WORKFLOW_QUERY}"


def flatten(obj: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"cpt": {"lr": 0.1}}`` -> ``{"cpt.lr": "0.1"}`` for MLflow params (redact first)."""
    out: dict[str, str] = {}
    for key, value in obj.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = str(value)
    return out


@contextmanager
def stage_run(config: PipelineConfig, run_key: str, stage: str) -> Iterator[str]:
    """A child run for one stage attempt; FINISHED on success, FAILED (and parent FAILED) on error."""
    from mlflow.entities import Param

    mlc = client(config.tracking)
    parent = parent_run_id(config.tracking, run_key)
    mlc.update_run(parent, status="RUNNING")
    run = mlc.create_run(
        experiment_id(config.tracking),
        run_name=stage,
        tags={
            "mlflow.parentRunId": parent,
            RUN_KEY_TAG: run_key,
            ROLE_TAG: "stage",
            STAGE_TAG: stage,
        },
    )
    run_id = str(run.info.run_id)
    shown = redact(config.model_dump(mode="json"))  # no tokens or URI passwords in params
    params = [Param(k, v[:6000]) for k, v in flatten(shown).items()]
    mlc.log_batch(run_id, params=params)
    try:
        yield run_id
    except BaseException:
        mlc.set_terminated(run_id, status="FAILED")
        mlc.update_run(parent, status="FAILED")
        raise
    mlc.set_terminated(run_id, status="FINISHED")


def finish_parent(tracking: TrackingConfig, run_key: str) -> None:
    client(tracking).set_terminated(parent_run_id(tracking, run_key), status="FINISHED")


def log_metrics(
    tracking: TrackingConfig, run_id: str, metrics: dict[str, float], step: int | None = None
) -> None:
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    batch = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()]
    client(tracking).log_batch(run_id, metrics=batch)


CHAMPION_ALIAS = "champion"
CHALLENGER_ALIAS = "challenger"
"""Always the newest registered candidate, promoted or not."""


def champion_version(tracking: TrackingConfig) -> Any | None:
    """The registered model version holding the champion alias, or None."""
    from mlflow.exceptions import MlflowException

    try:
        return client(tracking).get_model_version_by_alias(
            tracking.registered_model, CHAMPION_ALIAS
        )
    except MlflowException as err:
        if err.error_code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND", "INVALID_PARAMETER_VALUE"):
            return None
        raise


def download_model_version(tracking: TrackingConfig, source: str, dest: str) -> str:
    """Download a registered version's files (``source``: its source or download URI) into
    ``dest``; returns the folder holding ``config.json``, the weights and the tokenizer.

    A version logged with MLflow's transformers flavour keeps the weights under ``model/`` and
    the tokenizer under ``components/tokenizer/``; the tokenizer files are moved next to the
    weights so the folder loads with ``from_pretrained`` like any exported model. A version
    registered from a plain folder (before the flavour was used) is returned as downloaded.
    """
    import mlflow.artifacts

    client(tracking)
    path: str = mlflow.artifacts.download_artifacts(
        artifact_uri=source, dst_path=dest, tracking_uri=tracking.tracking_uri
    )
    return str(transformers_model_files(Path(path)))


def champion_model_dir(tracking: TrackingConfig, version: str | int, dest: str) -> str:
    """Local folder of registered ``version`` of ``tracking.registered_model`` with
    ``config.json``, weights and tokenizer files, ready for ``from_pretrained``."""
    source = client(tracking).get_model_version_download_uri(
        tracking.registered_model, str(version)
    )
    return download_model_version(tracking, str(source), dest)


def transformers_model_files(root: Path) -> Path:
    """The Hugging Face folder inside a downloaded transformers-flavour MLflow model (``root``
    unchanged when it holds no ``MLmodel`` with that flavour)."""
    import shutil

    import yaml

    mlmodel = root / "MLmodel"
    if not mlmodel.is_file():
        return root
    flavor = (yaml.safe_load(mlmodel.read_text()).get("flavors") or {}).get("transformers")
    if not flavor:
        return root
    model_dir = root / flavor.get("model_binary", "model")
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(
            f"{mlmodel} names the weights folder {model_dir.name}/, which holds no config.json; "
            "the version was logged without its weights (save_pretrained=False) and cannot be "
            "evaluated or fine-tuned from the registry"
        )
    for component in flavor.get("components", []):
        # Weights and tokenizer never share file names; the tokenizer's copy wins if they did.
        for item in (root / "components" / component).glob("*"):
            shutil.move(str(item), str(model_dir / item.name))
    return model_dir


def log_plan(tracking: TrackingConfig, run_key: str, plan: dict[str, Any]) -> None:
    """Attach the planner's output to the DAG run's parent run: ``plan.json`` (every candidate)
    and the chosen plan's predictions as ``plan.<section>.<metric>`` metrics."""
    parent = parent_run_id(tracking, run_key)
    log_json_artifact(tracking, parent, "plan.json", plan)
    metrics = {}
    for section, doc in plan.items():
        chosen = doc.get("chosen") or {}
        for name in ("gpu_memory_gib", "host_memory_gib", "step_time_s", "tokens_per_s", "mfu"):
            if name in chosen:
                metrics[f"plan.{section}.predicted_{name}"] = float(chosen[name])
    log_metrics(tracking, parent, metrics)


def log_json_artifact(tracking: TrackingConfig, run_id: str, name: str, obj: Any) -> None:
    """Attach a small JSON document (manifest, eval report) to a run."""
    import json
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / name
        path.write_text(json.dumps(obj, indent=2, sort_keys=True))
        client(tracking).log_artifact(run_id, str(path))
