"""Write the field tree of KubeRay's RayCluster CRD (``ray.io/v1``) that the manifest test checks.

Source: github.com/ray-project/kuberay, tag ``v1.7.0`` (commit
59d663aeec13760646da3db9c1cf8cfe883e30b7), ``ray-operator/config/crd/bases/ray.io_rayclusters.yaml``
(934 KB: both API versions, every description). Kept: the ``v1`` version's openAPIV3Schema
without ``status`` and without descriptions, each node reduced to ``type`` (``int-or-string``
for Kubernetes quantities), ``enum``, ``properties``, ``items`` and ``additionalProperties``.
The pod template (identical under the head and every worker group) and the container (under
``containers`` and ``initContainers``) are stored once, as ``{"$ref": name}``.

Regenerate after a KubeRay upgrade (and rename the output after the new tag)::

    git -C kuberay show v1.7.0:ray-operator/config/crd/bases/ray.io_rayclusters.yaml > crd.yaml
    python tests/data/kuberay/trim_crd.py crd.yaml v1.7.0 \
        59d663aeec13760646da3db9c1cf8cfe883e30b7 > tests/data/kuberay/raycluster-crd-v1.7.0.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import yaml

CRD_PATH = "ray-operator/config/crd/bases/ray.io_rayclusters.yaml"


def compact(node: dict[str, Any]) -> dict[str, Any]:
    """The parts of one schema node that say which fields exist and what they hold."""
    out: dict[str, Any] = {}
    if node.get("x-kubernetes-int-or-string"):
        out["type"] = "int-or-string"
    elif "type" in node:
        out["type"] = node["type"]
    if "enum" in node:
        out["enum"] = node["enum"]
    if "properties" in node:
        out["properties"] = {k: compact(v) for k, v in sorted(node["properties"].items())}
    if "items" in node:
        out["items"] = compact(node["items"])
    extra = node.get("additionalProperties")
    if isinstance(extra, dict):
        out["additionalProperties"] = compact(extra)
    elif extra is True:
        out["additionalProperties"] = {}
    return out


def share(node: dict[str, Any], shared: dict[str, Any], name: str) -> dict[str, Any]:
    """``node`` with every subtree equal to ``shared`` replaced by ``{"$ref": name}``."""
    if node == shared:
        return {"$ref": name}
    out = dict(node)
    if "properties" in out:
        out["properties"] = {k: share(v, shared, name) for k, v in out["properties"].items()}
    for key in ("items", "additionalProperties"):
        if key in out:
            out[key] = share(out[key], shared, name)
    return out


def main(crd_file: str, tag: str, commit: str) -> None:
    crd = yaml.safe_load(Path(crd_file).read_text())
    [v1] = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = compact(v1["schema"]["openAPIV3Schema"])
    del schema["properties"]["status"]
    spec = schema["properties"]["spec"]["properties"]
    pod_template = spec["headGroupSpec"]["properties"]["template"]
    container = pod_template["properties"]["spec"]["properties"]["containers"]["items"]
    schema = share(share(schema, pod_template, "PodTemplateSpec"), container, "Container")
    doc = {
        "source": {
            "repository": "github.com/ray-project/kuberay",
            "tag": tag,
            "commit": commit,
            "path": CRD_PATH,
            "version": "v1",
        },
        "definitions": {
            "PodTemplateSpec": share(pod_template, container, "Container"),
            "Container": container,
        },
        "schema": schema,
    }
    json.dump(doc, sys.stdout, indent=1, sort_keys=True)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main(*sys.argv[1:4])
