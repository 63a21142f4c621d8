"""Where the training loop's collectives run (pipeline/train/collectives.py).

An NCCL process group has no backend for CPU tensors. A gloo backend bound to ``cuda`` alone
(``cuda:gloo``) behaves the same way on a CPU machine, so these tests show the failure the GPU
pools would hit and that the group the project builds for them does not have it.
"""

from __future__ import annotations

import ast
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.config import REPO_ROOT
from pipeline.devstack.host import free_port
from pipeline.train.collectives import host_gather, host_sums, process_group_backend, step_totals

COLLECTIVES = {
    "all_reduce",
    "all_gather",
    "all_gather_object",
    "all_gather_into_tensor",
    "broadcast",
    "broadcast_object_list",
    "reduce_scatter",
    "reduce",
    "gather",
    "scatter",
}


@pytest.fixture
def group(request: pytest.FixtureRequest) -> Iterator[None]:
    import torch.distributed as dist

    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())})
    dist.init_process_group(request.param, rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("group", ["cuda:gloo"], indirect=True)
def test_a_group_bound_to_cuda_only_refuses_cpu_tensors(group: None) -> None:
    """What the loop's old CPU-tensor all-reduces did on every NCCL run."""
    with pytest.raises(RuntimeError, match="No backend type associated with device type cpu"):
        host_sums([3, 4])


# On a GPU pool the string is cpu:gloo,cuda:nccl; without NCCL here, gloo stands in for it.
GPU_GROUP_HERE = process_group_backend(use_gpu=True).replace("cuda:nccl", "cuda:gloo")


@pytest.mark.parametrize("group", [GPU_GROUP_HERE], indirect=True)
def test_the_gpu_pools_group_carries_a_cpu_backend_for_host_counts(group: None) -> None:
    import torch

    assert process_group_backend(use_gpu=True) == "cpu:gloo,cuda:nccl"
    assert host_sums([3, 4]) == [3, 4]
    assert host_gather("node-a") == ["node-a"]
    assert step_totals(torch.tensor([1.5, float("nan")], dtype=torch.float64))[0] == 1.5


def test_cpu_workers_use_plain_gloo() -> None:
    assert process_group_backend(use_gpu=False) == "gloo"


def test_no_module_of_the_trainer_calls_a_collective_except_collectives_py() -> None:
    """Every reduction of pipeline/train goes through the one module that decides its device
    and backend; a direct ``dist.all_reduce`` elsewhere is how the NCCL crash came in."""
    offenders = []
    for path in sorted((REPO_ROOT / "pipeline" / "train").glob("*.py")):
        if path.name == "collectives.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in COLLECTIVES
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id in {"dist", "torch"}
            ):
                offenders.append(f"{Path(path).name}:{node.lineno} {node.func.attr}")
    assert offenders == []
