"""The Airflow trigger form, derived from the config schema (one source of truth).

Each form field is a config field: its type, bounds, choices and help text come from the
pydantic schema, its hint shows the value in the default config file. An empty field keeps the
config file's value. Validation is repeated by ``load_config`` in the first task, which is the
authority; the form only catches mistakes before the run is created.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from pipeline.config import REPO_ROOT, ConfigError, PipelineConfig

FORM_FIELDS = (
    "data.domain_corpus",
    "data.instructions",
    "data.seq_len",
    "cpt.max_steps",
    "cpt.lr",
    "cpt.method",
    "cpt.adapter.rank",
    "sft.max_steps",
    "sft.lr",
    "sft.method",
    "sft.adapter.rank",
    "compute.pool",
    "compute.num_workers",
    "compute.zero_stage",
    "compute.offload_optimizer",
    "compute.attention",
    "eval.min_improvement",
)
"""Config fields a person may change when triggering a run by hand."""

CONFIG_PARAM = "config"
"""The form field naming the YAML file; restricted to ``allowed_config_dirs``."""

SECTION_TITLES = {
    "data": "Data",
    "cpt": "Continued pre-training",
    "sft": "Instruction fine-tuning",
    "compute": "Compute",
    "eval": "Evaluation gates",
}
"""Form sections, one per config section, in the form's order."""

FIELD_TITLES = {
    "data.domain_corpus": "Domain corpus",
    "data.instructions": "Instruction data",
    "data.seq_len": "Sequence length",
    "cpt.max_steps": "CPT max steps",
    "cpt.lr": "CPT learning rate",
    "cpt.method": "CPT method",
    "cpt.adapter.rank": "CPT LoRA rank",
    "sft.max_steps": "SFT max steps",
    "sft.lr": "SFT learning rate",
    "sft.method": "SFT method",
    "sft.adapter.rank": "SFT LoRA rank",
    "compute.pool": "Worker pool",
    "compute.num_workers": "Training workers",
    "compute.zero_stage": "ZeRO stage",
    "compute.offload_optimizer": "Offload optimizer to CPU",
    "compute.attention": "Attention kernel",
    "eval.min_improvement": "Minimum improvement over champion",
}
"""Labels a person reads; the dotted key stays the parameter name (and the conf key)."""

_SCHEMA_KEYS = (
    "type",
    "enum",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "pattern",
)
_LITERAL = re.compile(r"``(.+?)``")


def plain_text(doc: str) -> str:
    """A docstring as one plain line: reST ``literals`` lose their backticks."""
    return _LITERAL.sub(r"\1", " ".join(doc.split()))


def _field_property(dotted: str) -> dict[str, Any]:
    *sections, name = dotted.split(".")
    model: Any = PipelineConfig
    for section in sections:  # ``sft.adapter.rank``: nested sections, one at a time
        model = model.model_fields[section].annotation
        assert isinstance(model, type) and issubclass(model, BaseModel), dotted
    prop: dict[str, Any] = model.model_json_schema()["properties"][name]
    return prop


def _file_value(raw: dict[str, Any], dotted: str) -> Any:
    """The value ``dotted`` has in a config file's mapping (None when it is not set there)."""
    value: Any = raw
    for key in dotted.split("."):
        value = value.get(key) if isinstance(value, dict) else None
    return value


def field_schema(dotted: str) -> dict[str, Any]:
    """JSON schema of one config field, nullable (null = keep the config file's value).

    Choices (literals and booleans) become an ``enum`` led by ``None`` and without a ``type``:
    Airflow's form then draws a select whose empty choice reads "keep the file's value",
    rather than a switch that cannot show "unset".
    """
    prop = _field_property(dotted)
    if "anyOf" in prop:  # Optional fields: take the non-null branch
        prop = {**prop, **next(p for p in prop["anyOf"] if p.get("type") != "null")}
    schema = {k: prop[k] for k in _SCHEMA_KEYS if k in prop}
    if "const" in prop:
        schema["enum"] = [prop["const"]]
    if schema.get("type") == "boolean":
        schema["enum"] = [True, False]
    if "enum" in schema:
        schema["enum"] = [None, *schema["enum"]]
        schema.pop("type", None)
    elif "type" in schema:
        schema["type"] = ["null", schema["type"]]
    schema["description"] = plain_text(str(prop.get("description", "")))
    return schema


def _shown(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return value if isinstance(value, str) else json.dumps(value)


def form_fields(default_config: str | Path) -> dict[str, dict[str, Any]]:
    """``{dotted_field: Param kwargs}``: schema, ``title``, ``section`` and the value an empty
    field keeps (the default config's, else the schema default) in the help text, and for
    selects as the label of the empty choice (``values_display``)."""
    path = Path(default_config)
    raw = yaml.safe_load(path.read_text()) if path.is_file() else {}
    fields = {}
    for dotted in FORM_FIELDS:
        section = dotted.partition(".")[0]
        schema = field_schema(dotted)
        value = _file_value(raw, dotted)
        source = f"{path.name}'s value" if value is not None else "the default"
        if value is None:
            value = _field_property(dotted).get("default")
        kept = f"{source}: {_shown(value)}" if value is not None else source
        if value is not None:
            schema["description"] += f" Empty keeps {kept}."
        if "enum" in schema:
            # Keys as the UI's String(value) spells them: "null", "true", "3", "sdpa".
            schema["values_display"] = {
                json.dumps(v).strip('"'): f"(keep {kept})" if v is None else _shown(v)
                for v in schema["enum"]
            }
        schema["title"] = FIELD_TITLES[dotted]
        schema["section"] = SECTION_TITLES[section]
        fields[dotted] = schema
    return fields


def allowed_config_dirs(default_config: str | Path) -> list[Path]:
    """Folders a triggered run may take its YAML from: the repository's ``configs/``, the
    default config's folder and each folder in ``PIPELINE_CONFIG_DIRS`` (``os.pathsep``-separated).
    """
    dirs = [REPO_ROOT / "configs", Path(default_config).resolve().parent]
    extra = os.environ.get("PIPELINE_CONFIG_DIRS", "")
    dirs += [Path(d).resolve() for d in extra.split(os.pathsep) if d.strip()]
    return list(dict.fromkeys(d.resolve() for d in dirs))


def trigger_overrides(
    params: dict[str, Any], conf: dict[str, Any], config_dirs: list[Path]
) -> tuple[str, dict[str, Any]]:
    """The config file and overrides of a triggered run, from the form only.

    Airflow merges ``dag_run.conf`` into params, so without this check anyone allowed to
    trigger could override any config key (``storage.artifact_root``, ``tracking.tracking_uri``).

    Args:
        params: the task's params (form values merged with ``dag_run.conf``).
        conf: the raw ``dag_run.conf``.
        config_dirs: folders the ``config`` file must be under (``allowed_config_dirs``).

    Returns:
        ``(config_path, {dotted_field: value})`` with every form field (None: keep the file's).

    Raises:
        ConfigError: a conf key outside the form, or a config file outside ``config_dirs``.
    """
    allowed = (CONFIG_PARAM, *FORM_FIELDS)
    unknown = sorted(set(conf) - set(allowed))
    if unknown:
        raise ConfigError(
            f"dag_run.conf keys {unknown} are not allowed: a triggered run may set only the "
            f"form's fields: {', '.join(allowed)}. Change other settings in the config file "
            "(reviewed like code) and point 'config' at it."
        )
    config_path = Path(str(params[CONFIG_PARAM])).resolve()
    if not any(config_path.is_relative_to(folder) for folder in config_dirs):
        raise ConfigError(
            f"config: {config_path} is outside the allowed config folders "
            f"({', '.join(map(str, config_dirs))}); put the file there or add its folder to "
            "PIPELINE_CONFIG_DIRS on the Airflow workers"
        )
    overrides = {field: params.get(field) for field in FORM_FIELDS}
    check_data_overrides(config_path, overrides)
    return str(config_path), overrides


DATA_FIELDS = ("data.domain_corpus", "data.instructions")
DATA_PREFIXES_ENV = "PIPELINE_DATA_PREFIXES"
"""More places a trigger may name data in (comma-separated folders or ``s3://`` prefixes: a
colon is part of a URI), besides the folders of the config file's own data."""


def allowed_data_prefixes(config_path: Path) -> list[str]:
    """Where a triggered run may read data from: the folder (or ``s3://`` prefix) of each data
    location in the config file, and each entry of ``PIPELINE_DATA_PREFIXES``."""
    from pipeline.config import load_config

    data = load_config(config_path).data
    entries = [e for spec in (data.domain_corpus, data.instructions) for e in _entries(spec)]
    prefixes = [e.rsplit("/", 1)[0] if "://" in e else str(Path(e).parent) for e in entries]
    prefixes += [p.strip() for p in os.environ.get(DATA_PREFIXES_ENV, "").split(",") if p.strip()]
    return list(dict.fromkeys(p.rstrip("/") for p in prefixes))


def _entries(spec: str | list[str] | None) -> list[str]:
    if spec is None:
        return []
    return [spec] if isinstance(spec, str) else list(spec)


def _inside(entry: str, prefix: str, base: Path) -> bool:
    if entry.startswith(STREAM) or prefix.startswith(STREAM):
        return _stream_inside(entry, prefix, base)
    if "://" in entry or "://" in prefix:
        rest = entry.partition("://")[2]
        if any(part in ("..", ".") for part in rest.split("/")):
            return False
        return entry == prefix or entry.startswith(prefix + "/")
    path = Path(entry) if Path(entry).is_absolute() else base / entry
    return path.resolve().is_relative_to(Path(prefix).resolve())


STREAM = "hf:"
"""A streamed ``datasets`` source (``pipeline.data.hf_inputs``)."""


def _stream_inside(entry: str, prefix: str, base: Path) -> bool:
    """An ``hf:`` entry names a local folder (checked as a path: it must be absolute, since a
    relative one that is missing on the worker falls through to the Hub) or a Hub dataset,
    allowed only under an ``hf:`` prefix of ``PIPELINE_DATA_PREFIXES`` (``hf:my-org/``)."""
    if not entry.startswith(STREAM):
        return False
    target = entry.removeprefix(STREAM).partition("#")[0]
    if not target or ".." in target.split("/"):
        return False
    if prefix.startswith(STREAM):
        allowed = prefix.removeprefix(STREAM).rstrip("/")
        return target == allowed or target.startswith(allowed + "/")
    return Path(target).is_absolute() and _inside(target, prefix, base)


def check_data_overrides(config_path: Path, overrides: dict[str, Any]) -> None:
    """Refuse a form's data input outside ``allowed_data_prefixes``: whatever a trigger names
    is read on the workers, trained into the model and partly copied into the held-out split.

    Raises:
        ConfigError: naming the field, the entry and the allowed places.
    """
    asked = {f: _entries(overrides.get(f)) for f in DATA_FIELDS if overrides.get(f) is not None}
    if not asked:
        return
    allowed = allowed_data_prefixes(config_path)
    for field, entries in asked.items():
        for entry in entries:
            if not any(_inside(entry, prefix, config_path.parent) for prefix in allowed):
                raise ConfigError(
                    f"{field}: {entry} is outside the places a triggered run may read data "
                    f"from ({', '.join(allowed)}); put the data there, or add its folder or "
                    f"s3:// prefix to {DATA_PREFIXES_ENV} on the Airflow workers"
                )
