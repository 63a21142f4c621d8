"""The two images without Docker: base images at the versions the suite tests, every package
pinned or constrained by the suite's lock, and the Ray image laid out so that the stages find
the project and its configs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from pipeline.config import REPO_ROOT
from tests.airflow_image import lay_out_image

DOCKER = REPO_ROOT / "docker"
LOCK = {
    canonicalize_name(name): version
    for name, version in re.findall(
        r"^([A-Za-z0-9_.-]+)==(\S+)$",
        (REPO_ROOT / "requirements" / "constraints.txt").read_text(),
        re.M,
    )
}


@pytest.mark.parametrize(
    ("dockerfile", "package"),
    [("Dockerfile.airflow", "apache-airflow"), ("Dockerfile.ray-gpu", "ray")],
)
def test_base_images_are_the_versions_the_suite_runs(
    dockerfile: str, package: str, tmp_path: Path
) -> None:
    layout = lay_out_image(tmp_path, DOCKER / dockerfile)
    tag = layout.base_image.rsplit(":", 1)[1]
    assert tag.startswith(f"{LOCK[package]}-py"), (layout.base_image, LOCK[package])
    assert re.search(r"-py(thon)?3\.?11", tag), tag  # the suite's Python
    assert (layout.root / "opt/project/pipeline/config.py").is_file()
    assert (layout.root / "opt/project/configs/demo.yaml").is_file()


def test_every_gpu_image_package_is_pinned_or_locked() -> None:
    lines = (DOCKER / "requirements-gpu.txt").read_text().splitlines()
    loose = []
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        req = Requirement(line)
        pinned = any(spec.operator == "==" for spec in req.specifier)
        if not pinned and canonicalize_name(req.name) not in LOCK:
            loose.append(req.name)
    assert loose == []
    # The Dockerfile applies the lock to what the file leaves open.
    assert "-c /tmp/constraints.txt" in (DOCKER / "Dockerfile.ray-gpu").read_text()


def test_the_optional_gpu_kernels_are_pinned() -> None:
    pyproject = (REPO_ROOT / "pyproject.toml").read_text()
    (gpu,) = re.findall(r"^gpu = \[(.*)\]$", pyproject, re.M)
    for spec in re.findall(r'"([^"]+)"', gpu):
        assert "==" in spec, spec


def test_the_image_tag_is_the_code_version_spelled_for_a_registry() -> None:
    import subprocess
    import sys

    from pipeline.identity import code_version

    out = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "image-tag"], capture_output=True, text=True
    )
    tag = out.stdout.strip()
    assert out.returncode == 0 and tag == code_version().replace("+", "-")
    assert re.fullmatch(r"\d+\.\d+\.\d+-src\.[0-9a-f]{10}", tag)  # a valid Docker tag


def _gpu_image_distributions() -> set[str]:
    """Every distribution the Ray image installs: requirements-gpu.txt and, through the
    installed metadata, what those require (with the extras the file asks for)."""
    from importlib import metadata

    todo: list[Requirement] = []
    for line in (DOCKER / "requirements-gpu.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            todo.append(Requirement(line))
    seen: set[str] = set()
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = metadata.requires(req.name) or []
        except metadata.PackageNotFoundError:
            continue  # not in this venv (e.g. liger-kernel): its own needs are not imported here
        for spec in map(Requirement, requires):
            extras = req.extras or {""}
            if spec.marker is None or any(spec.marker.evaluate({"extra": e}) for e in extras):
                todo.append(spec)
    return seen


def test_the_ray_image_installs_every_package_the_stages_import() -> None:
    """A stage runs in the Ray worker image: a package imported by ``pipeline/`` that the image
    lacks fails the first job in production while the CPU venv (which has it) passes."""
    import ast
    import sys
    from importlib import metadata

    providers = metadata.packages_distributions()
    imported: dict[str, str] = {}
    # The developer CLI and its demo: their Airflow commands never run on Ray.
    developer_only = {"cli.py", "devstack/demo.py"}
    for path in sorted((REPO_ROOT / "pipeline").rglob("*.py")):
        if path.relative_to(REPO_ROOT / "pipeline").as_posix() in developer_only:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                top = name.split(".", 1)[0]
                if top != "pipeline" and top not in sys.stdlib_module_names:
                    imported.setdefault(top, str(path.relative_to(REPO_ROOT)))
    installed = _gpu_image_distributions()
    missing = {
        module: where
        for module, where in imported.items()
        if not {canonicalize_name(d) for d in providers.get(module, [module])} & installed
    }
    assert missing == {}, f"imported by pipeline/ but not installed in the Ray image: {missing}"
