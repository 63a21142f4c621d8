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
    """Fail fast on inputs that do not exist."""
    for field, uri in (
        ("data.domain_corpus", config.data.domain_corpus),
        ("data.instructions", config.data.instructions),
    ):
        if not storage.exists(uri):
            raise ConfigError(f"{field}: file not found: {uri}")
    for field, folder, marker in (
        ("model.base", config.model.base, "config.json"),
        ("model.tokenizer", config.model.tokenizer, "tokenizer_config.json"),
    ):
        if folder and not storage.exists(storage.join(folder, marker)):
            raise ConfigError(
                f"{field}: no Hugging Face model files found at {folder} (no {marker})"
            )


def resolve_run(config_path: str, overrides: dict[str, Any], key: str) -> dict[str, Any]:
    """Validate config + overrides, check inputs, write the resolved config.

    Returns:
        Small dict for XCom: ``config_uri``, ``run_key``, ``artifact_root``, ``fingerprint``.
    """
    config = load_config(config_path, overrides)
    check_inputs(config)
    return {
        "config_uri": write_resolved_config(config, key),
        "run_key": key,
        "artifact_root": config.storage.artifact_root,
        "fingerprint": config.fingerprint(),
    }
