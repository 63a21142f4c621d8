"""Where Ray puts a stage's driver and its training workers, on a real two-node cluster.

Both nodes run on this machine as separate raylets: a head that advertises neither the driver
resource nor a GPU pool (like the KubeRay head), and a node joined with ``ray start --address``
that carries ``driver`` (the CPU worker group of ``docker/kuberay/raycluster.yaml``) and
``pool_a100`` (a GPU group). Nodes are told apart by node id, read from the head's state API.

Where the driver ran is the job's ``driver_node_id`` (the node Ray scheduled the entrypoint on).
The driver itself cannot say: with two raylets on one host, ``ray.init()`` in the driver
connects to the head's raylet, and the dashboard reads driver logs from the head's log folder;
neither happens with one node per host. So the probe writes its task's node id to a file.
"""

from __future__ import annotations

import json
import shlex
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from pipeline.config import ComputeConfig, OrchestrationConfig
from pipeline.devstack.ray_cluster import (
    RayHead,
    alive_nodes,
    ray_head,
    ray_worker_node,
    wait_for_nodes,
)
from pipeline.train.ray_train import worker_resources
from ray_jobs.hooks import TERMINAL_STATUSES, RayJobsHook

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

# The driver runs one task placed like a training worker and writes where it ran.
PROBE = """
import json, sys
from pathlib import Path
import ray
ray.init()
@ray.remote
def where():
    return ray.get_runtime_context().get_node_id()
Path(sys.argv[2]).write_text(ray.get(where.options(**json.loads(sys.argv[1])).remote()))
"""


@dataclass(frozen=True)
class TwoNodes:
    head: RayHead
    head_node_id: str
    worker_node_id: str


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TwoNodes]:
    workdir = tmp_path_factory.mktemp("ray-two-nodes")
    with ray_head(workdir, num_cpus=1, resources={}) as head:
        [head_node] = wait_for_nodes(head, 1)
        # One fake GPU: Ray accepts a declared count without a device, and the pool's workers
        # ask for GPU: 1 as on the real pool.
        with ray_worker_node(
            head, workdir, num_cpus=2, num_gpus=1, resources={"driver": 4, "pool_a100": 1}
        ) as worker_node_id:
            yield TwoNodes(head, head_node["node_id"], worker_node_id)


@pytest.fixture
def hook(two_nodes: TwoNodes, monkeypatch: pytest.MonkeyPatch) -> RayJobsHook:
    monkeypatch.setenv("AIRFLOW_CONN_RAY_PLACEMENT", two_nodes.head.airflow_conn_uri())
    return RayJobsHook("ray_placement")


def _task_options(resources: dict[str, float]) -> dict[str, Any]:
    """``worker_resources`` as ``ray.remote`` options (CPU and GPU have their own keywords)."""
    custom = dict(resources)
    return {"num_cpus": custom.pop("CPU"), "num_gpus": custom.pop("GPU", 0), "resources": custom}


def _probe_entrypoint(task_options: dict[str, Any], out: Path) -> str:
    args = [PROBE, json.dumps(task_options), str(out)]
    return "python -c " + " ".join(shlex.quote(arg) for arg in args)


def _ended(hook: RayJobsHook, submission_id: str, timeout: float = 90) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = hook.get_job(submission_id)
        assert job is not None
        if job["status"] in TERMINAL_STATUSES:
            assert job["status"] == "SUCCEEDED", job
            return job
        time.sleep(0.5)
    raise AssertionError(f"job {submission_id} did not end within {timeout} s")


def test_the_head_advertises_no_driver_or_pool_resource(two_nodes: TwoNodes) -> None:
    nodes = {node["node_id"]: node for node in alive_nodes(two_nodes.head)}
    assert set(nodes) == {two_nodes.head_node_id, two_nodes.worker_node_id}
    head, worker = nodes[two_nodes.head_node_id], nodes[two_nodes.worker_node_id]
    assert head["is_head_node"] and not worker["is_head_node"]
    assert "driver" not in head["resources_total"] and "pool_a100" not in head["resources_total"]
    assert worker["resources_total"]["driver"] == 4
    assert worker["resources_total"]["pool_a100"] == 1


def test_driver_with_entrypoint_resources_lands_on_the_worker_and_training_on_its_pool(
    two_nodes: TwoNodes, hook: RayJobsHook, tmp_path: Path
) -> None:
    orchestration = OrchestrationConfig(driver_resources={"driver": 1}, driver_memory_gb=0.5)
    pool_worker = _task_options(worker_resources(ComputeConfig(pool="a100")))
    assert pool_worker["resources"] == {"pool_a100": 1.0}
    placed_id = f"placed-{uuid.uuid4().hex[:8]}"
    bare_id = f"bare-{uuid.uuid4().hex[:8]}"
    hook.submit_job(
        entrypoint=_probe_entrypoint(pool_worker, tmp_path / "placed"),
        submission_id=placed_id,
        entrypoint_num_cpus=orchestration.driver_num_cpus,
        entrypoint_memory=int(orchestration.driver_memory_gb * 2**30),
        entrypoint_resources=orchestration.driver_resources,
    )
    # The control: without entrypoint resources Ray runs the driver on the head, which is what
    # the KubeRay head's GCS and dashboard would compete with.
    # Its task asks for nothing: it runs wherever there is a free CPU.
    hook.submit_job(
        entrypoint=_probe_entrypoint({"num_cpus": 0}, tmp_path / "bare"), submission_id=bare_id
    )

    placed, bare = _ended(hook, placed_id), _ended(hook, bare_id)
    assert placed["driver_node_id"] == two_nodes.worker_node_id
    assert (tmp_path / "placed").read_text() == two_nodes.worker_node_id
    assert bare["driver_node_id"] == two_nodes.head_node_id


def test_a_driver_resource_no_node_has_leaves_the_job_pending_off_the_head(
    two_nodes: TwoNodes, hook: RayJobsHook
) -> None:
    """A typo in ``orchestration.driver_resources`` leaves the job PENDING, never on the head."""
    submission_id = f"nowhere-{uuid.uuid4().hex[:8]}"
    hook.submit_job(
        entrypoint='python -c "print(1)"',
        submission_id=submission_id,
        entrypoint_resources={"drivers": 1},
    )
    time.sleep(3)
    job = hook.get_job(submission_id)
    assert job is not None and job["status"] == "PENDING", job
    assert hook.stop_job(submission_id)
