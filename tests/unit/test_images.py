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

    from pipeline.stages.common import code_version

    out = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "image-tag"], capture_output=True, text=True
    )
    tag = out.stdout.strip()
    assert out.returncode == 0 and tag == code_version().replace("+", "-")
    assert re.fullmatch(r"\d+\.\d+\.\d+-src\.[0-9a-f]{10}", tag)  # a valid Docker tag
