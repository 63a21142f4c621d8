"""Preflight of a pipeline run, on the Airflow side: the checks and decisions made before any
Ray job starts.

The first Airflow task turns a DAG run into a pipeline run here (``resolve_run``): the run key,
the config checked (``check_inputs``, ``check_remote_safe``, ``check_no_literal_secrets``), the
plan applied under ``compute.plan: auto``, the resolved config written next to the artifacts,
the code version and the Ray job options. So a bad config, a missing data file or a setting
that cannot work on a remote Ray cluster fails there, before any Ray job or GPU is involved.
What it returns is the run's XCom: small, and with secrets redacted. After the run,
``run_outcome`` reads what it decided back for the notifications.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Any
from urllib.parse import urlsplit

from pipeline import storage
from pipeline.config import ConfigError, PipelineConfig, load_config
from pipeline.contract import MODEL_VERSION, REGISTERED_MODEL, STAGES
from pipeline.identity import code_version, write_resolved_config
from pipeline.redact import is_secret_key, literal_secrets, redact

LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")

_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")
_INPUT_FIELDS = (
    "data.domain_corpus",
    "data.instructions",
    "data.replay_corpus",
    "data.eval_sets",
    "eval.general_corpus",
)


RUN_FILE = "run.json"
"""What the first task resolved (its XCom), in the run's folder of the artifact store."""


DEPLOYMENT_ENV = "PIPELINE_DEPLOYMENT"
"""Names the Airflow deployment when several share one Ray cluster and artifact root (their
scheduled runs have the same ids): it leads the run key and the Ray job keys."""


def run_key(dag_id: str, run_id: str) -> str:
    """Folder-safe, unique per DAG run: ``[<deployment>__]<dag_id>__<run_id>-<digest>``, unsafe
    characters replaced (``PIPELINE_DEPLOYMENT`` names the deployment, when set).

    The digest is of the exact names: replacing characters alone maps run ids such as
    ``...T03:00:00+00:00`` and ``...T03-00-00-00-00`` to one folder, one MLflow parent run and
    one registry lookup.
    """
    parts = [os.environ.get(DEPLOYMENT_ENV, ""), dag_id, run_id]
    readable = "__".join(_UNSAFE.sub("-", part) for part in parts if part).strip("-")
    digest = hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:8]
    return f"{readable}-{digest}"


def is_local_host(host: str | None) -> bool:
    """True when a Ray connection's host (``127.0.0.1:8265`` or ``http://localhost:8265``)
    names this machine; an empty host counts as local (nothing to be remote from)."""
    host = (host or "").strip()
    if not host:
        return True
    name = urlsplit(host if "://" in host else f"//{host}").hostname or ""
    return name in LOCAL_HOSTS or name.startswith("127.")


def _input_specs(config: PipelineConfig) -> list[tuple[str, str | list[str]]]:
    values: dict[str, Any] = {
        "data.domain_corpus": config.data.domain_corpus,
        "data.instructions": config.data.instructions,
        "data.replay_corpus": config.data.replay_corpus,
        "data.eval_sets": config.data.eval_sets,
        "eval.general_corpus": getattr(config.eval, "general_corpus", None),
    }
    return [(field, values[field]) for field in _INPUT_FIELDS if values[field]]


def check_inputs(config: PipelineConfig) -> dict[str, list[str]]:
    """Fail fast on inputs that do not exist (every data entry must match at least one file).

    Returns:
        ``{field: [input file URIs]}`` for every data field that is set.
    """
    from pipeline.data.sources import DataError, expand_inputs

    found: dict[str, list[str]] = {}
    for field, spec in _input_specs(config):
        try:
            found[field] = expand_inputs(spec, field)
        except DataError as err:
            raise ConfigError(str(err)) from err
    for field, folder, marker in (
        ("model.base", config.model.base, "config.json"),
        ("model.tokenizer", config.model.tokenizer, "tokenizer_config.json"),
    ):
        if folder and not storage.exists(storage.join(folder, marker)):
            raise ConfigError(
                f"{field}: no Hugging Face model files found at {folder} (no {marker})"
            )
    return found


def check_remote_safe(config: PipelineConfig, source: str) -> None:
    """Refuse settings that only work when Airflow and Ray share one machine.

    Every Ray pod would get its own empty copy of a local folder or SQLite file: stages could
    not find each other's outputs and every run would promote itself into a registry that
    disappears with its pod.

    Raises:
        ConfigError: listing each local setting and what to set instead in ``source``.
    """
    problems = []
    root = config.storage.artifact_root
    if not storage.is_s3(root):
        problems.append(
            f"storage.artifact_root is the local folder {root}; set "
            "storage.artifact_root: s3://<bucket>/<prefix>"
        )
    uri = config.tracking.tracking_uri
    if not uri.startswith(("http://", "https://", "databricks")):
        problems.append(
            f"tracking.tracking_uri is {redact(uri)} (a store on the Airflow host); set "
            "tracking.tracking_uri: http(s)://<your mlflow server>"
        )
    location = config.tracking.artifact_location
    if location and "://" not in location.replace("file://", ""):
        problems.append(
            f"tracking.artifact_location is the local folder {location}; set it to "
            "s3://<bucket>/<prefix> or null (the MLflow server's --artifacts-destination)"
        )
    for field, spec in _input_specs(config):
        entries = [spec] if isinstance(spec, str) else list(spec)
        local = [e for e in entries if "://" not in e]
        if local:
            problems.append(f"{field} names local files ({local[0]}); put them under s3://")
    for field, folder in (
        ("model.base", config.model.base),
        ("model.tokenizer", config.model.tokenizer),
    ):
        if folder and "://" not in folder and not folder.startswith("models:/"):
            problems.append(f"{field} is the local folder {folder}; put it under s3://")
    if problems:
        raise ConfigError(
            f"{source}: the Ray cluster is remote (connection ray_default does not point at "
            "this machine), so every setting must name shared storage:\n- " + "\n- ".join(problems)
        )


def check_no_literal_secrets(config: PipelineConfig, source: str) -> None:
    """Refuse tokens written into ``orchestration.runtime_env``: a secret-named env var, or
    credentials in a URI (a ``pip`` index, a ``working_dir``).

    The resolved config is written next to the artifacts, logged to MLflow and its job options
    travel through XCom, which shows them redacted; what Ray receives must be the real value,
    so the only safe form is a ``${NAME}`` reference, expanded on the node from the node's
    environment (a Kubernetes Secret on KubeRay): Ray expands ``env_vars``, pip expands the
    ``pip`` entries.
    """
    found = literal_secrets(config.orchestration.runtime_env, "orchestration.runtime_env")
    if not found:
        return
    names = ", ".join(found)
    last = found[0].rsplit(".", 1)[-1]
    if "[" in last or not is_secret_key(last):
        fix = "write the credentials as ${NAME} references (https://${USER}:${TOKEN}@host/...)"
    else:
        fix = f"write {last}: ${{{last}}} instead"
    raise ConfigError(
        f"{source}: {names} holds a literal secret, which would be stored with the run's "
        f"config and passed through Airflow; {fix} and give the Ray nodes those environment "
        "variables (e.g. from a Kubernetes Secret)"
    )


def inputs_fingerprint(config: PipelineConfig, inputs: dict[str, list[str]], code: str) -> str:
    """Hash of everything a run's first stage reads: the resolved config, each input file's
    identity (size and ETag or modification time), the base model's files and the code version.
    """
    from pipeline.data.sources import fingerprint

    files = {field: [fingerprint(uri) for uri in uris] for field, uris in inputs.items()}
    models = {
        field: storage.content_fingerprint(folder)
        for field, folder in (
            ("model.base", config.model.base),
            ("model.tokenizer", config.model.tokenizer),
        )
        if folder and not folder.startswith("models:/")
    }
    blob = json.dumps([config.fingerprint(), files, models, code], sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def job_options(config: PipelineConfig) -> dict[str, dict[str, Any]]:
    """Per stage: deadline, driver placement, runtime_env and wait budgets for the Ray job
    (the ``job_options`` of the DAG's RayJobOperator)."""
    orch = config.orchestration
    minutes = orch.stage_timeout_minutes
    return {
        stage: {
            "timeout_s": minutes[stage] * 60.0 if stage in minutes else None,
            "entrypoint_num_cpus": orch.driver_num_cpus,
            "entrypoint_memory": int(orch.driver_memory_gb * 1024**3),
            "entrypoint_resources": dict(orch.driver_resources),
            "runtime_env": orch.runtime_env,
            "transient_error_budget_s": orch.transient_error_budget_s,
            "stop_wait_s": orch.stop_wait_s,
        }
        for stage in STAGES
    }


def resolve_run(
    config_path: str, overrides: dict[str, Any], key: str, *, remote_cluster: bool = False
) -> dict[str, Any]:
    """Validate config + overrides, check inputs, apply the plan, write the resolved config.

    With ``compute.plan: auto`` the planner's chosen settings replace the configured ones before
    the config is written (so every Ray job trains with them), and the plan is logged to the
    DAG run's MLflow parent run.

    Args:
        config_path: the YAML file.
        overrides: ``{"cpt.max_steps": 20}`` from the trigger form (None keeps the file's value).
        key: the run key (``run_key``).
        remote_cluster: the Ray cluster is on other machines: local storage is refused.

    Returns:
        Small dict for XCom, secrets redacted: ``config_uri``, ``run_key``, ``artifact_root``,
        ``fingerprint``, ``code_version``, ``inputs_fingerprint``, ``mlflow_run_url`` (parent
        run; "" without ``tracking.ui_url``), ``jobs`` (``job_options``) and ``plan`` (the
        chosen settings per section) when ``compute.plan`` is ``auto``.

    Raises:
        ConfigError: invalid config, missing inputs, local storage for a remote cluster, a
            literal secret in the config, or no plan fits the pool.
    """
    config = load_config(config_path, overrides)
    check_no_literal_secrets(config, config_path)
    if remote_cluster:
        check_remote_safe(config, config_path)
    inputs = check_inputs(config)
    chosen: dict[str, Any] | None = None
    if config.compute.plan == "auto":
        from pipeline import tracking
        from pipeline.planning.search import apply_plan

        config, plan = apply_plan(config)
        tracking.log_plan(config.tracking, key, plan)
        chosen = {section: plan[section]["chosen"] for section in ("cpt", "sft")}
    code = code_version()
    resolved: dict[str, Any] = {
        "config_uri": write_resolved_config(config, key),
        "run_key": key,
        "artifact_root": config.storage.artifact_root,
        "fingerprint": config.fingerprint(),
        "code_version": code,
        "inputs_fingerprint": inputs_fingerprint(config, inputs, code),
        "mlflow_run_url": parent_run_url(config, key),
    }
    if chosen is not None:
        resolved["plan"] = chosen
    shown: dict[str, Any] = redact(resolved)
    # The job options are what Ray receives, so they are the config's own values, never a
    # redacted copy (``https://***@`` would fail the job's pip install): they hold no literal
    # secret, which check_no_literal_secrets made sure of above.
    shown["jobs"] = job_options(config)
    # Also beside the run's artifacts: the run notifier reads it there, where XCom cannot be
    # read (a DAG callback under dag.test(), or in the DAG processor).
    storage.write_json(storage.join(config.storage.artifact_root, key, RUN_FILE), shown)
    return shown


def run_outcome(artifact_root: str, key: str) -> dict[str, Any]:
    """What a finished run decided, read from its artifacts (for notifications).

    Returns:
        ``mlflow_run_url`` (the parent run; "" when unknown) and ``decision``: ``promoted``
        (with ``model``, e.g. ``domain-llm v3``), ``refused`` (with ``reason`` naming the
        failed gates) or ``none`` (promote never committed).
    """
    run_file = storage.join(artifact_root, key, RUN_FILE)
    resolved = storage.read_json(run_file) if storage.exists(run_file) else {}
    outcome: dict[str, Any] = {"mlflow_run_url": resolved.get("mlflow_run_url") or ""}
    promote = storage.committed_result(storage.stage_uri(artifact_root, key, "promote"))
    if promote is None:
        return {**outcome, "decision": "none"}
    outputs = promote.get("outputs", {})
    model = f"{outputs.get(REGISTERED_MODEL, '?')} v{outputs.get(MODEL_VERSION, '?')}"
    if promote.get("skip_reason"):
        return {**outcome, "decision": "refused", "model": model, "reason": promote["skip_reason"]}
    return {**outcome, "decision": "promoted", "model": model}


def parent_run_url(config: PipelineConfig, key: str) -> str:
    """URL of the DAG run's MLflow parent run (created here), "" without ``tracking.ui_url``."""
    if not config.tracking.ui_url:
        return ""
    from pipeline import tracking

    url = tracking.run_url(config.tracking, tracking.parent_run_id(config.tracking, key))
    return url or ""
