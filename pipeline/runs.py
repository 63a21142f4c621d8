"""Turn a DAG run into a pipeline run: run key, validated config, written next to the artifacts.

Runs in the first Airflow task, so a bad config or a missing data file fails there, before any
Ray job or GPU is involved.
"""

from __future__ import annotations

import re
from typing import Any

from pipeline import storage
from pipeline.config import ConfigError, PipelineConfig, load_config
from pipeline.stages.common import write_resolved_config

_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def run_key(dag_id: str, run_id: str) -> str:
    """Folder-safe, unique per DAG run: ``<dag_id>__<run_id>`` with unsafe characters replaced."""
    return f"{_UNSAFE.sub('-', dag_id)}__{_UNSAFE.sub('-', run_id)}".strip("-")


def check_inputs(config: PipelineConfig) -> None:
    """Fail fast on inputs that do not exist (every data entry must match at least one file)."""
    from pipeline.data.sources import DataError, expand_inputs

    for field, spec in (
        ("data.domain_corpus", config.data.domain_corpus),
        ("data.instructions", config.data.instructions),
        ("data.replay_corpus", config.data.replay_corpus),
        ("data.eval_sets", config.data.eval_sets),
    ):
        if not spec:
            continue
        try:
            expand_inputs(spec, field)
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


def resolve_run(config_path: str, overrides: dict[str, Any], key: str) -> dict[str, Any]:
    """Validate config + overrides, check inputs, apply the plan, write the resolved config.

    With ``compute.plan: auto`` the planner's chosen settings replace the configured ones before
    the config is written (so every Ray job trains with them), and the plan is logged to the
    DAG run's MLflow parent run.

    Returns:
        Small dict for XCom: ``config_uri``, ``run_key``, ``artifact_root``, ``fingerprint``, and
        ``plan`` (the chosen settings per section) when ``compute.plan`` is ``auto``.

    Raises:
        ConfigError: invalid config, missing inputs, or no plan fits the pool.
    """
    config = load_config(config_path, overrides)
    check_inputs(config)
    chosen: dict[str, Any] | None = None
    if config.compute.plan == "auto":
        from pipeline import tracking
        from pipeline.planning.search import apply_plan

        config, plan = apply_plan(config)
        tracking.log_plan(config.tracking, key, plan)
        chosen = {section: plan[section]["chosen"] for section in ("cpt", "sft")}
    resolved: dict[str, Any] = {
        "config_uri": write_resolved_config(config, key),
        "run_key": key,
        "artifact_root": config.storage.artifact_root,
        "fingerprint": config.fingerprint(),
    }
    if chosen is not None:
        resolved["plan"] = chosen
    return resolved
