"""The Airflow image without Docker: its layout read from ``docker/Dockerfile.airflow``, its
packages derived from what that file installs, and a probe that runs Airflow-side code with
nothing else importable.

The layout: every ``COPY`` of the Dockerfile is replayed into a folder standing in for the
container's ``/``, its ``ENV`` lines become the environment, and the project installed with
``pip install -e`` goes on ``PYTHONPATH`` (what an editable install does).

The packages: the distributions ``pip install`` names in the Dockerfile and everything they
require (markers and extras evaluated), looked up in this environment's metadata. Every other
installed distribution's top-level modules are refused by an import hook in the probe, so code
that needs, say, torch or the MLflow server's stack fails there exactly as in the image.

Run as a script (``python tests/airflow_image.py SPEC.json``), the probe installs the hook first
and then runs the steps the spec asks for, printing one JSON line of what it saw.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO_ROOT / "docker" / "Dockerfile.airflow"
PROJECT_DIST = "domain-llm-pipeline"


@dataclass
class ImageLayout:
    """What the Dockerfile builds, replayed under ``root`` (the container's ``/``)."""

    root: Path
    env: dict[str, str] = field(default_factory=dict)
    """Its ``ENV`` lines, container paths mapped under ``root``."""
    editable: list[Path] = field(default_factory=list)
    """Folders installed with ``pip install -e`` (on ``PYTHONPATH`` in the probe)."""
    requirements: list[str] = field(default_factory=list)
    """What ``pip install`` names: ``apache-airflow==3.3.2``, ``domain-llm-pipeline[airflow]``."""
    base_image: str = ""

    def path(self, container_path: str) -> Path:
        """``/opt/airflow/dags`` -> ``<root>/opt/airflow/dags``."""
        return self.root / container_path.lstrip("/")


def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per instruction, continuation lines joined, comments dropped."""
    joined, pending = [], ""
    for line in dockerfile.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        joined.append(pending + line)
        pending = ""
    out = []
    for text in joined:
        name, _, args = text.strip().partition(" ")
        out.append((name.upper(), args.strip()))
    return out


def _pip_requirements(command: str, workdir: str) -> tuple[list[str], list[str]]:
    """Requirements and editable folders of each ``pip install`` in a RUN command."""
    requirements, editable = [], []
    for part in re.split(r"&&|;", command):
        try:
            words = shlex.split(part)
        except ValueError:  # quotes split by the && above: a shell construct, not pip's args
            continue
        if "pip" not in words or "install" not in words:
            continue
        args = words[words.index("install") + 1 :]
        skip_next = False
        for i, arg in enumerate(args):
            if skip_next:
                skip_next = False
                continue
            if arg in ("-c", "-r", "--constraint", "--requirement", "-i", "--index-url"):
                skip_next = True
                continue
            if arg == "-e":
                spec = args[i + 1]
                folder, _, extras = spec.partition("[")
                editable.append(os.path.normpath(os.path.join(workdir, folder)))
                requirements.append(PROJECT_DIST + (f"[{extras}" if extras else ""))
                skip_next = True
                continue
            if not arg.startswith("-"):
                requirements.append(arg)
    return requirements, editable


def lay_out_image(
    root: Path, dockerfile: Path = DOCKERFILE, context: Path = REPO_ROOT
) -> ImageLayout:
    """Replay ``dockerfile``'s COPY, WORKDIR, ENV and ``pip install`` under ``root``."""
    layout = ImageLayout(root=root)
    workdir = "/"
    build_args: dict[str, str] = {}
    for name, raw in _instructions(dockerfile):
        args = re.sub(r"\$\{(\w+)\}", lambda m: build_args.get(m[1], m[0]), raw)
        if name == "ARG":
            key, _, default = args.partition("=")
            build_args[key] = default
        elif name == "FROM":
            layout.base_image = args.split()[0]
        elif name == "WORKDIR":
            workdir = os.path.normpath(os.path.join(workdir, args))
            layout.path(workdir).mkdir(parents=True, exist_ok=True)
        elif name == "ENV":
            for pair in shlex.split(args):
                key, _, value = pair.partition("=")
                layout.env[key] = value
        elif name == "COPY":
            words = [w for w in shlex.split(args) if not w.startswith("--")]
            *sources, dest = words
            target = os.path.join(workdir, dest)
            for source in sources:
                src = context / source
                if src.is_dir():
                    shutil.copytree(src, layout.path(target), dirs_exist_ok=True)
                else:
                    into = layout.path(target)
                    if dest.endswith("/") or len(sources) > 1:
                        into.mkdir(parents=True, exist_ok=True)
                        into = into / src.name
                    into.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(src, into)
        elif name == "RUN":
            requirements, editable = _pip_requirements(args, workdir)
            layout.requirements += requirements
            layout.editable += [layout.path(folder) for folder in editable]
    return layout


def installed_closure(requirements: list[str]) -> set[str]:
    """Canonical names of the installed distributions ``requirements`` pull in, recursively
    (a requirement not installed here cannot be imported here either, so it ends the walk)."""
    from importlib import metadata

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    seen: dict[str, set[str]] = {}
    stack = [Requirement(r) for r in requirements]
    while stack:
        req = stack.pop()
        name = canonicalize_name(req.name)
        extras = set(req.extras)
        if name in seen and extras <= seen[name]:
            continue
        seen[name] = seen.get(name, set()) | extras
        try:
            requires = metadata.distribution(req.name).requires or []
        except metadata.PackageNotFoundError:
            continue
        environments = [{"extra": e} for e in sorted(seen[name])] or [{"extra": ""}]
        for line in requires:
            child = Requirement(line)
            if child.marker is None or any(child.marker.evaluate(e) for e in environments):
                stack.append(child)
    return set(seen)


def refused_modules(requirements: list[str]) -> list[str]:
    """Top-level modules of every installed distribution outside ``requirements``' closure."""
    from importlib import metadata

    from packaging.utils import canonicalize_name

    allowed = installed_closure(requirements)
    refused = set()
    for module, dists in metadata.packages_distributions().items():
        if not any(canonicalize_name(d) in allowed for d in dists):
            refused.add(module)
    return sorted(refused)


# --- the probe (runs in the image's stand-in interpreter) ------------------------------------


class _Refuse:
    """A meta path finder that makes the image's missing packages fail to import."""

    def __init__(self, modules: list[str]) -> None:
        self.modules = set(modules)
        self.refused: set[str] = set()

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> None:
        top = fullname.partition(".")[0]
        if top in self.modules:
            self.refused.add(top)
            raise ModuleNotFoundError(f"No module named {top!r} (not in the Airflow image)")


def _parse_dags(dags_folder: str) -> dict[str, Any]:
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=dags_folder)
    return {
        "errors": {k: str(v) for k, v in bag.import_errors.items()},
        "dags": sorted(bag.dag_ids),
    }


def _resolve(spec: dict[str, Any]) -> dict[str, Any]:
    from pipeline.preflight import resolve_run

    resolved = resolve_run(spec["config"], spec["overrides"], spec["key"])
    return {k: resolved.get(k) for k in ("mlflow_run_url", "plan", "code_version")}


def _ray_job(spec: dict[str, Any]) -> dict[str, Any]:
    import asyncio

    from airflow.exceptions import TaskDeferred

    from ray_jobs.operators import RayJobOperator
    from ray_jobs.triggers import first_event

    operator = RayJobOperator(
        task_id="probe",
        entrypoint=spec["entrypoint"],
        ray_conn_id=spec["conn_id"],
        result_uri=spec["result_uri"],
        poll_interval=0.5,
    )
    from task_instance import FakeTaskInstance  # tests/ is the probe script's sys.path[0]

    ti = FakeTaskInstance(run_id=spec["run_id"], dag_id="airflow_image_probe", task_id="probe")
    context: Any = {"ti": ti}
    try:
        operator.execute(context)
    except TaskDeferred as deferred:
        event = asyncio.run(asyncio.wait_for(first_event(deferred.trigger), 120))  # type: ignore[arg-type]
    else:
        raise AssertionError("RayJobOperator did not defer")
    result: dict[str, Any] = operator.execute_complete(context, event)
    return {"status": event["status"], "result": result, "xcoms": context["ti"].xcoms}


def probe(spec: dict[str, Any]) -> dict[str, Any]:
    """Install the import hook, then run the spec's steps; what each saw, and what was refused."""
    hook = _Refuse(spec["refused"])
    sys.meta_path.insert(0, hook)
    import pipeline

    seen: dict[str, Any] = {"pipeline_file": pipeline.__file__}
    if "dags_folder" in spec:
        seen["dags"] = _parse_dags(spec["dags_folder"])
    if "resolve" in spec:
        seen["resolve"] = _resolve(spec["resolve"])
    if "ray_job" in spec:
        seen["ray_job"] = _ray_job(spec["ray_job"])
    seen["refused_imports"] = sorted(hook.refused)
    return seen


if __name__ == "__main__":
    print(json.dumps(probe(json.loads(Path(sys.argv[1]).read_text())), default=str))
