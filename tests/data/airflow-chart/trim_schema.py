"""Write the part of the official Airflow chart's ``values.schema.json`` that
``docker/helm/airflow-values.yaml`` reaches, for ``tests/unit/test_helm_values.py``.

Source: github.com/apache/airflow, ``chart/values.schema.json`` (810 KB) at commit
b90710803a45d015a221b6045295d0dc9ddb964f ("Add RELEASE_NOTES.rst and Chart.yaml changes for
1.21.0", 2026-04-21: ``chart/Chart.yaml`` version 1.21.0, appVersion 3.2.0; the schema there
last changed in df421a3a17b0dab36698106c494a72c40031fccc).

Kept: every node on a path the values file uses, with all of its keywords (``type``,
``additionalProperties``, ``required``, ``anyOf``, descriptions...) except that ``properties``
holds only the keys the values file sets; a node the values file reaches with a scalar, or an
object the schema maps freely (annotations), is kept whole. ``$ref`` definitions are trimmed the
same way against every value that reaches them; one that only a node kept whole refers to is
kept whole. So the values file validates against this copy exactly as against the full
schema; a key the values file adds later is missing here (the test says so: re-run this).

Regenerate after changing the values file or moving to another chart version (and rename the
output after the version)::

    git -C airflow show <commit>:chart/values.schema.json > values.schema.json
    python tests/data/airflow-chart/trim_schema.py values.schema.json \
        docker/helm/airflow-values.yaml 1.21.0 <commit> \
        > tests/data/airflow-chart/values.schema-1.21.0.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import yaml

REF_PREFIX = "#/definitions/"
COMBINATORS = ("allOf", "anyOf", "oneOf")


def collect(node: dict[str, Any], values: list[Any], schema: dict[str, Any], reach: dict) -> None:
    """Record, for each definition, the values that reach it (following ``$ref`` inline)."""
    ref = node.get("$ref")
    if ref:
        name = ref.removeprefix(REF_PREFIX)
        reach.setdefault(name, []).extend(values)
        collect(schema["definitions"][name], values, schema, reach)
    for key in COMBINATORS:
        for option in node.get(key, []):
            collect(option, values, schema, reach)
    objects = [v for v in values if isinstance(v, dict)]
    for key, child in node.get("properties", {}).items():
        below = [v[key] for v in objects if key in v]
        if below:
            collect(child, below, schema, reach)
    items = node.get("items")
    if isinstance(items, dict):
        elements = [e for v in values if isinstance(v, list) for e in v]
        if elements:
            collect(items, elements, schema, reach)


def trim(node: dict[str, Any], values: list[Any]) -> dict[str, Any]:
    """``node`` with ``properties`` cut to the keys ``values`` set, on every level they reach."""
    objects = [v for v in values if isinstance(v, dict)]
    if not objects and not any(isinstance(v, list) for v in values):
        return node  # reached with scalars only (or not at all): kept whole
    out = dict(node)
    if "properties" in node:
        used = {key for v in objects for key in v}
        out["properties"] = {
            key: trim(child, [v[key] for v in objects if key in v])
            for key, child in node["properties"].items()
            if key in used
        }
    for key in COMBINATORS:
        if key in node:
            out[key] = [trim(option, values) for option in node[key]]
    items = node.get("items")
    if isinstance(items, dict):
        out["items"] = trim(items, [e for v in values if isinstance(v, list) for e in v])
    return out


def refs_in(node: Any) -> set[str]:
    """Names of the definitions a schema subtree refers to."""
    if isinstance(node, dict):
        found = {node["$ref"].removeprefix(REF_PREFIX)} if "$ref" in node else set()
        return found.union(*(refs_in(v) for v in node.values()))
    if isinstance(node, list):
        return set().union(*(refs_in(v) for v in node))
    return set()


def main(schema_file: str, values_file: str, version: str, commit: str) -> None:
    schema = json.loads(Path(schema_file).read_text())
    values = yaml.safe_load(Path(values_file).read_text())
    reach: dict[str, list[Any]] = {}
    collect(schema, [values], schema, reach)
    out = trim({k: v for k, v in schema.items() if k != "definitions"}, [values])
    definitions = {name: trim(schema["definitions"][name], seen) for name, seen in reach.items()}
    pending = refs_in(out) | refs_in(definitions)
    while pending - definitions.keys():
        for name in pending - definitions.keys():
            definitions[name] = schema["definitions"][name]  # under a node kept whole
        pending = refs_in(definitions)
    out["definitions"] = dict(sorted(definitions.items()))
    comment = (
        f"Trimmed from github.com/apache/airflow chart/values.schema.json, chart {version}, "
        f"commit {commit}, by tests/data/airflow-chart/trim_schema.py against "
        "docker/helm/airflow-values.yaml."
    )
    json.dump({"$comment": comment, **out}, sys.stdout, indent=1)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main(*sys.argv[1:5])
