"""The Airflow trigger form, derived from the config schema (one source of truth).

Each form field is a config field: its type, bounds, choices and help text come from the
pydantic schema, its hint shows the value in the default config file. An empty field keeps the
config file's value. Validation is repeated by ``load_config`` in the first task, which is the
authority; the form only catches mistakes before the run is created.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from pipeline.config import PipelineConfig

FORM_FIELDS = (
    "data.domain_corpus",
    "data.instructions",
    "data.seq_len",
    "cpt.max_steps",
    "cpt.lr",
    "sft.max_steps",
    "sft.lr",
    "compute.pool",
    "compute.num_workers",
    "compute.zero_stage",
    "compute.offload_optimizer",
    "compute.attention",
    "eval.min_improvement",
)
"""Config fields a person may change when triggering a run by hand."""

_SCHEMA_KEYS = (
    "type",
    "enum",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "pattern",
)


def field_schema(dotted: str) -> dict[str, Any]:
    """JSON schema of one config field, nullable (null = keep the config file's value)."""
    section, _, name = dotted.partition(".")
    model = PipelineConfig.model_fields[section].annotation
    assert isinstance(model, type) and issubclass(model, BaseModel), dotted
    prop = model.model_json_schema()["properties"][name]
    if "anyOf" in prop:  # Optional fields: take the non-null branch
        prop = {**prop, **next(p for p in prop["anyOf"] if p.get("type") != "null")}
    schema = {k: prop[k] for k in _SCHEMA_KEYS if k in prop}
    if "const" in prop:
        schema["enum"] = [prop["const"]]
    if "enum" in schema:
        schema["enum"] = [None, *schema["enum"]]
        schema.pop("type", None)
    elif "type" in schema:
        schema["type"] = ["null", schema["type"]]
    schema["description"] = " ".join(str(prop.get("description", "")).split())
    return schema


def form_fields(default_config: str | Path) -> dict[str, dict[str, Any]]:
    """``{dotted_field: schema}`` with the default config's value appended to each description."""
    path = Path(default_config)
    raw = yaml.safe_load(path.read_text()) if path.is_file() else {}
    fields = {}
    for dotted in FORM_FIELDS:
        section, _, name = dotted.partition(".")
        schema = field_schema(dotted)
        value = (raw.get(section) or {}).get(name)
        if value is not None:
            shown = json.dumps(value) if isinstance(value, bool) else value  # true, not True
            schema["description"] += f" Empty keeps {path.name}'s value: {shown}."
        fields[dotted] = schema
    return fields
