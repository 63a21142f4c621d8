"""Shared fixtures. Services are started here, never assumed to be running."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from pipeline.localstack import RayHead
from pipeline.localstack import ray_head as start_ray_head


@pytest.fixture(scope="session")
def ray_head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayHead]:
    """A private token-auth Ray head for the whole session (``ray stop`` would hit others)."""
    with start_ray_head(tmp_path_factory.mktemp("ray-head")) as head:
        yield head
