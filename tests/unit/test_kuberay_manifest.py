"""``docker/kuberay/raycluster.yaml`` against the hosts it runs on, the presets and KubeRay's CRD.

Host figures come from ``pipeline.planning.hardware.POOLS`` (vCPUs, RAM, NVMe, what the kubelet
keeps); what a run needs comes from the presets and the planner. Two Kubernetes rules shape the
memory check: the scheduler places a pod by its requests against the node's allocatable (the
host minus the kubelet's reserve), and pages written to a ``medium: Memory`` emptyDir
(``/dev/shm``: Ray's object store, NCCL) are charged to the pod's memory cgroup, so they come out
of the memory limit: the processes get the limit minus ``/dev/shm``.

Field names are checked against the ``ray.io/v1`` RayCluster schema of KubeRay v1.7.0, trimmed
into ``tests/data/kuberay/`` by ``trim_crd.py`` there (its docstring names the source commit).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline.config import REPO_ROOT, PipelineConfig, load_config
from pipeline.models import MODEL_CACHE_ENV
from pipeline.planning.architecture import architecture_for
from pipeline.planning.hardware import GIB, POOLS, Pool, pool_for
from pipeline.planning.search import HOST_SAFETY, configured_setting, predict, workload_for
from pipeline.train.ray_train import worker_resources

KUBERAY = REPO_ROOT / "docker" / "kuberay"
MANIFEST = KUBERAY / "raycluster.yaml"
README = KUBERAY / "README.md"
CRD = Path(__file__).parents[1] / "data" / "kuberay" / "raycluster-crd-v1.7.0.json"
PRESET_NAMES = (
    "llama3-8b-a100",
    "llama3-8b-h100",
    "llama2-70b-h100",
    "mixtral-8x7b-h100",
    "production.example",
)
PRESETS: dict[str, PipelineConfig] = {
    name: load_config(REPO_ROOT / "configs" / f"{name}.yaml") for name in PRESET_NAMES
}
S3_SECRET = "llm-pipeline-s3"
SHM = "/dev/shm"

# What one node stages on its local disk during a run (bytes per parameter, ZeRO-3).
CHECKPOINT_BYTES_PER_PARAM = 14
"""One checkpoint, summed over a node's ranks: bf16 weights (2) and the fp32 master copy and
Adam moments (12) of each rank's shard. Staged in ``compute.local_scratch`` before its upload
(checkpoint.py keeps one staged at a time; a resume's download goes to the same place)."""
MODEL_BYTES_PER_PARAM = 2
"""A bf16 safetensors copy of the whole model."""
MODEL_COPIES = 4
"""Models fetched into ``$PIPELINE_MODEL_CACHE`` on a GPU pod whose stages follow each other:
the base (CPT), CPT's output (SFT), SFT's output and the champion (evaluate scores base, CPT,
SFT and champion). Nothing evicts the cache while the pod lives."""
RAY_SESSION_GIB = 64
"""``/tmp/ray``: session logs, runtime_env packages, the odd spilled object."""
CONTAINER_LAYER_GIB = 16
"""The container's writable layer and logs, requested beyond its emptyDir volumes."""


# --- reading the manifest -------------------------------------------------------------------


def load_documents(path: Path = MANIFEST) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def raycluster(docs: list[dict[str, Any]]) -> dict[str, Any]:
    [cluster] = [d for d in docs if d["kind"] == "RayCluster"]
    return cluster


def groups(cluster: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The head (as ``head``) and every worker group, by name."""
    spec = cluster["spec"]
    return {"head": spec["headGroupSpec"]} | {g["groupName"]: g for g in spec["workerGroupSpecs"]}


def pod(group: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = group["template"]["spec"]
    return spec


def ray_container(group: dict[str, Any]) -> dict[str, Any]:
    """KubeRay runs Ray in the pod's first container."""
    container: dict[str, Any] = pod(group)["containers"][0]
    return container


_SUFFIXES = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50}
_SUFFIXES |= {"k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "m": 1e-3}


def quantity(value: str | int | float) -> float:
    """A Kubernetes quantity (``500m``, ``64Gi``, ``8``) in base units."""
    text = str(value)
    for suffix in sorted(_SUFFIXES, key=len, reverse=True):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * _SUFFIXES[suffix]
    return float(text)


def resource(container: dict[str, Any], kind: str, name: str) -> float:
    return quantity(container.get("resources", {}).get(kind, {}).get(name, 0))


def ray_resources(group: dict[str, Any]) -> dict[str, float]:
    """Custom resources the group's Ray nodes advertise: ``rayStartParams.resources`` (a JSON
    object inside a quoted string, as KubeRay passes it to ``ray start``), overridden by the
    group's ``resources`` field (KubeRay >= 1.5)."""
    raw = group.get("rayStartParams", {}).get("resources")
    advertised: dict[str, float] = {}
    if raw:
        decoded = json.loads(raw)
        advertised = json.loads(decoded) if isinstance(decoded, str) else decoded
    advertised |= {k: float(v) for k, v in group.get("resources", {}).items()}
    return advertised


def volumes(group: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in pod(group).get("volumes", [])}


def mounts(group: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The Ray container's volume mounts by path."""
    return {m["mountPath"]: m for m in ray_container(group).get("volumeMounts", [])}


def is_memory_backed(volume: dict[str, Any]) -> bool:
    return volume.get("emptyDir", {}).get("medium") == "Memory"


def size_limit(volume: dict[str, Any]) -> float:
    """The emptyDir's ``sizeLimit`` in bytes (0 when unbounded or not an emptyDir)."""
    return quantity(volume.get("emptyDir", {}).get("sizeLimit", 0))


def shm_bytes(group: dict[str, Any]) -> float:
    return sum(size_limit(v) for v in volumes(group).values() if is_memory_backed(v))


def mounted_volume(group: dict[str, Any], path: str) -> dict[str, Any] | None:
    """The volume mounted at ``path`` or at the closest folder above it."""
    for mount_path, mount in sorted(mounts(group).items(), key=lambda m: -len(m[0])):
        if path == mount_path or path.startswith(mount_path.rstrip("/") + "/"):
            return volumes(group)[mount["name"]]
    return None


def env(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e for e in container.get("env", [])}


def gpu_groups(cluster: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        name: g
        for name, g in groups(cluster).items()
        if resource(ray_container(g), "limits", "nvidia.com/gpu") > 0
    }


def group_for_pool(cluster: dict[str, Any], pool: str) -> dict[str, Any]:
    """The one group advertising ``pool_<pool>``, the resource training workers ask for."""
    [group] = [g for g in groups(cluster).values() if f"pool_{pool}" in ray_resources(g)]
    return group


def pool_of(group: dict[str, Any]) -> Pool:
    [name] = [k.removeprefix("pool_") for k in ray_resources(group) if k.startswith("pool_")]
    return POOLS[name]


def presets_on(pool: str) -> dict[str, PipelineConfig]:
    return {name: c for name, c in PRESETS.items() if c.compute.pool == pool}


CLUSTER = raycluster(load_documents())
GPU_GROUPS = sorted(gpu_groups(CLUSTER))


# --- what a preset stages on a node ---------------------------------------------------------


def scratch_need_bytes(config: PipelineConfig) -> float:
    """``compute.local_scratch`` and the model cache of one node: one checkpoint's share of
    the node plus ``MODEL_COPIES`` fetched models."""
    params = architecture_for(config.model).total_params()
    nodes = pool_for(config.compute).num_nodes
    checkpoint = CHECKPOINT_BYTES_PER_PARAM * params / nodes
    return checkpoint + MODEL_COPIES * MODEL_BYTES_PER_PARAM * params


def tmp_need_bytes(config: PipelineConfig) -> float:
    """``/tmp`` of a training node: rank 0 stages the consolidated bf16 model there before its
    upload (export.py), beside Ray's session folder."""
    params = architecture_for(config.model).total_params()
    return MODEL_BYTES_PER_PARAM * params + RAY_SESSION_GIB * GIB


def promote_tmp_need_bytes() -> float:
    """``/tmp`` of a driver pod: promote downloads the largest preset's model and MLflow saves
    another copy before uploading it (promote.py)."""
    largest = max(architecture_for(c.model).total_params() for c in PRESETS.values())
    return 2 * MODEL_BYTES_PER_PARAM * largest + RAY_SESSION_GIB * GIB


@pytest.mark.parametrize(
    ("preset", "scratch_gib", "tmp_gib"),
    [
        ("llama3-8b-a100", 112.2, 79.0),
        ("llama3-8b-h100", 164.5, 79.0),
        ("llama2-70b-h100", 738.8, 192.5),
        ("mixtral-8x7b-h100", 652.4, 151.0),
        ("production.example", 164.5, 79.0),
    ],
)
def test_what_a_preset_stages_per_node(preset: str, scratch_gib: float, tmp_gib: float) -> None:
    """Pins the sizing arithmetic the volumes below are checked against."""
    assert scratch_need_bytes(PRESETS[preset]) / GIB == pytest.approx(scratch_gib, abs=0.1)
    assert tmp_need_bytes(PRESETS[preset]) / GIB == pytest.approx(tmp_gib, abs=0.1)


# --- the hosts ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pool", "cpus", "memory_gib", "disk_gib"),
    [("a100", 62.0, 524.8, 1164.2), ("h100", 206.0, 1685.4, 4936.0)],
)
def test_allocatable_of_the_gpu_hosts(
    pool: str, cpus: float, memory_gib: float, disk_gib: float
) -> None:
    host = POOLS[pool]
    assert host.host_cpus - host.kubelet_reserved_cpus == cpus
    allocatable_memory = host.host_memory_gib - host.kubelet_reserved_memory_gib
    assert allocatable_memory == pytest.approx(memory_gib, abs=0.1)
    allocatable_disk = (host.local_disk_gb - host.kubelet_reserved_disk_gb) * 1e9 / GIB
    assert allocatable_disk == pytest.approx(disk_gib, abs=0.1)


@pytest.mark.parametrize("name", GPU_GROUPS)
def test_gpu_group_fits_its_host_after_the_kubelet_reserve(name: str) -> None:
    group = groups(CLUSTER)[name]
    host = pool_of(group)
    container = ray_container(group)
    gpus = resource(container, "requests", "nvidia.com/gpu")
    cpus = resource(container, "requests", "cpu")
    memory = resource(container, "requests", "memory")
    disk = resource(container, "requests", "ephemeral-storage")

    # One pod per host, one Ray GPU and one pool unit per GPU.
    assert gpus == host.devices_per_node
    assert float(group["rayStartParams"]["num-gpus"]) == host.devices_per_node
    assert ray_resources(group)[f"pool_{host.name}"] == host.devices_per_node
    assert cpus <= host.host_cpus - host.kubelet_reserved_cpus
    allocatable = (host.host_memory_gib - host.kubelet_reserved_memory_gib) * GIB
    assert memory <= allocatable, (
        f"{name}: requests {memory / GIB:.1f} GiB, the host allocates "
        f"{allocatable / GIB:.1f} GiB ({host.host_memory_gb:.0f} GB - "
        f"{host.kubelet_reserved_memory_gib} GiB the kubelet keeps)"
    )
    # /dev/shm is charged to the pod's memory: the processes get the limit minus it, which
    # must hold whatever the planner accepts as fitting the host.
    shm = shm_bytes(group)
    processes = resource(container, "limits", "memory") - shm
    planner_usable = host.host_memory_gib * (1 - HOST_SAFETY) * GIB
    assert 0 < shm < processes
    assert processes >= planner_usable, (
        f"{name}: {processes / GIB:.1f} GiB left beside {shm / GIB:.0f} GiB of /dev/shm; "
        f"the planner accepts plans up to {planner_usable / GIB:.1f} GiB per host"
    )
    for preset, config in presets_on(host.name).items():
        per_worker = worker_resources(config.compute)
        assert set(per_worker) <= {"CPU", "GPU", *ray_resources(group)}, preset
        assert cpus >= per_worker["CPU"] * host.devices_per_node, preset
        for section in ("cpt", "sft"):
            plan = predict(workload_for(config, section), configured_setting(config, section))
            assert plan.memory.host_peak < processes, f"{preset} {section}"
    disk_budget = (host.local_disk_gb - host.kubelet_reserved_disk_gb) * 1e9
    assert 0 < disk <= disk_budget


# --- every pod ------------------------------------------------------------------------------


def test_every_pod_has_guaranteed_qos() -> None:
    """Requests equal limits in every container, the autoscaler sidecar included: the kubelet
    evicts Guaranteed pods last, and a training host is never overcommitted."""
    containers = {
        f"{name}/{c['name']}": c
        for name, g in groups(CLUSTER).items()
        for c in pod(g)["containers"]
    }
    containers["head/autoscaler"] = CLUSTER["spec"]["autoscalerOptions"]
    for where, container in containers.items():
        requests, limits = container["resources"]["requests"], container["resources"]["limits"]
        assert {"cpu", "memory"} <= set(requests), where
        assert {k: quantity(v) for k, v in requests.items()} == {
            k: quantity(v) for k, v in limits.items()
        }, where


def test_every_pod_runs_as_the_service_account_the_manifest_creates() -> None:
    docs = load_documents()
    accounts = {
        (d["metadata"]["namespace"], d["metadata"]["name"])
        for d in docs
        if d["kind"] == "ServiceAccount"
    }
    namespace = CLUSTER["metadata"]["namespace"]
    for name, group in groups(CLUSTER).items():
        account = pod(group).get("serviceAccountName")
        assert account, f"{name}: no serviceAccountName (S3 through IRSA needs one)"
        assert (namespace, account) in accounts, f"{name}: {account} is not in the manifest"


def test_tmp_and_scratch_are_sized_disk_volumes_and_only_shm_is_in_memory() -> None:
    for name, group in groups(CLUSTER).items():
        by_name = volumes(group)
        tmp = mounted_volume(group, "/tmp")
        assert tmp is not None, f"{name}: /tmp is the container's writable layer"
        disk = 0.0
        for path, mount in mounts(group).items():
            volume = by_name[mount["name"]]
            if "emptyDir" not in volume:
                continue
            assert size_limit(volume) > 0, f"{name}: {path} has no sizeLimit"
            assert is_memory_backed(volume) == (path == SHM), f"{name}: {path}"
            disk += 0 if is_memory_backed(volume) else size_limit(volume)
        # The scheduler only counts requests: without one for the emptyDirs, a node with a
        # small root disk takes the pod and evicts it once the volumes fill.
        requested = resource(ray_container(group), "requests", "ephemeral-storage")
        assert requested >= disk + CONTAINER_LAYER_GIB * GIB, name


@pytest.mark.parametrize("preset", PRESET_NAMES)
def test_local_scratch_and_model_cache_are_the_sized_volume_of_the_presets_pool(
    preset: str,
) -> None:
    config = PRESETS[preset]
    group = group_for_pool(CLUSTER, config.compute.pool)
    scratch = config.compute.local_scratch
    assert scratch is not None, f"{preset}: compute.local_scratch is unset (the temp dir)"
    assert scratch in mounts(group), f"{preset}: {scratch} is no mount of the {group['groupName']}"
    volume = volumes(group)[mounts(group)[scratch]["name"]]
    assert not is_memory_backed(volume)
    cache = env(ray_container(group)).get(MODEL_CACHE_ENV, {}).get("value", "")
    assert mounted_volume(group, cache) is volume, f"{MODEL_CACHE_ENV}={cache!r}"
    need = scratch_need_bytes(config)
    assert size_limit(volume) >= need, (
        f"{preset}: {scratch} holds {size_limit(volume) / GIB:.0f} GiB, a node stages "
        f"{need / GIB:.0f} GiB"
    )
    tmp = mounted_volume(group, "/tmp")
    assert tmp is not None and tmp is not volume
    assert size_limit(tmp) >= tmp_need_bytes(config)


def test_driver_pods_tmp_holds_what_promote_stages() -> None:
    wanted = {k for c in PRESETS.values() for k in c.orchestration.driver_resources}
    drivers = [g for g in groups(CLUSTER).values() if wanted & set(ray_resources(g))]
    assert drivers, f"no group advertises the presets' driver resources {sorted(wanted)}"
    for group in drivers:
        tmp = mounted_volume(group, "/tmp")
        assert tmp is not None
        assert size_limit(tmp) >= promote_tmp_need_bytes()
    assert promote_tmp_need_bytes() / GIB == pytest.approx(320.9, abs=0.1)


def test_object_store_fits_in_dev_shm() -> None:
    """Ray's default object store is 30% of the pod's memory; one larger than /dev/shm falls
    back to /tmp (disk) with a warning, so every group sets it below its /dev/shm."""
    for name, group in groups(CLUSTER).items():
        store = group["rayStartParams"].get("object-store-memory")
        assert store is not None, f"{name}: object-store-memory unset"
        assert 0 < float(store) <= shm_bytes(group), name


def test_s3_credentials_are_required_in_every_pod() -> None:
    """A missing secret stops the pod at start (CreateContainerConfigError) instead of letting
    the first upload fail hours into a run, or reach S3 as the node's own role."""
    for name, group in groups(CLUSTER).items():
        for container in pod(group)["containers"]:
            refs = [e["secretRef"] for e in container.get("envFrom", []) if "secretRef" in e]
            refs += [
                e["valueFrom"]["secretKeyRef"]
                for e in container.get("env", [])
                if "secretKeyRef" in e.get("valueFrom", {})
            ]
            optional = [ref["name"] for ref in refs if ref.get("optional", False)]
            assert optional == [], f"{name}/{container['name']}: optional secrets {optional}"
            assert S3_SECRET in {ref["name"] for ref in refs}, f"{name}/{container['name']}"


@pytest.mark.parametrize("preset", PRESET_NAMES)
def test_preset_drivers_land_on_the_cpu_driver_group_only(preset: str) -> None:
    orchestration = PRESETS[preset].orchestration
    wanted = orchestration.driver_resources
    assert wanted, f"{preset}: orchestration.driver_resources is empty: drivers go anywhere"
    everyone = groups(CLUSTER)
    [driver_group] = {n for n, g in everyone.items() if set(wanted) <= set(ray_resources(g))}
    assert driver_group != "head" and driver_group not in GPU_GROUPS
    for name, group in everyone.items():
        if name != driver_group:
            assert not set(wanted) & set(ray_resources(group)), name
    # The head takes no CPU work either: a driver without driver_resources still misses it.
    assert everyone["head"]["rayStartParams"]["num-cpus"] == "0"
    group = everyone[driver_group]
    slots = min(ray_resources(group)[k] / v for k, v in wanted.items())
    container = ray_container(group)
    assert slots * orchestration.driver_num_cpus <= resource(container, "limits", "cpu")
    memory = resource(container, "limits", "memory") - shm_bytes(group)
    assert slots * orchestration.driver_memory_gb * GIB <= memory


@pytest.mark.parametrize("preset", PRESET_NAMES)
def test_preset_data_tasks_land_on_the_cpu_group_one_per_cpu(preset: str) -> None:
    """prepare_data's Ray Data tasks take one CPU each plus ``data.worker_resources``: only the
    cpu group may advertise those (a GPU host's CPUs feed its GPUs), one slot per CPU."""
    wanted = PRESETS[preset].data.worker_resources
    assert wanted, f"{preset}: data.worker_resources is empty: data tasks go to GPU hosts too"
    everyone = groups(CLUSTER)
    [data_group] = {n for n, g in everyone.items() if set(wanted) <= set(ray_resources(g))}
    assert data_group == "cpu"
    group = everyone[data_group]
    slots = min(ray_resources(group)[k] / v for k, v in wanted.items())
    assert slots == float(group["rayStartParams"]["num-cpus"])


# --- field names against the CRD ------------------------------------------------------------


def crd_errors(value: Any, node: dict[str, Any], path: str, defs: dict[str, Any]) -> list[str]:
    """Fields of ``value`` the CRD schema ``node`` does not have, and scalars of the wrong
    type (the API server would drop the first silently and refuse the second)."""
    if "$ref" in node:
        node = defs[node["$ref"]]
    kind = node.get("type")
    if isinstance(value, dict):
        if kind != "object":
            return [f"{path}: an object where the CRD has {kind}"]
        if not node.get("properties") and "additionalProperties" not in node:
            return []  # the root metadata: ObjectMeta, checked by the API server itself
        errors = []
        for key, child in value.items():
            schema = node.get("properties", {}).get(key, node.get("additionalProperties"))
            if schema is None:
                errors.append(f"{path}.{key}: not a field of the CRD")
            else:
                errors += crd_errors(child, schema, f"{path}.{key}", defs)
        return errors
    if isinstance(value, list):
        if kind != "array":
            return [f"{path}: a list where the CRD has {kind}"]
        return [
            e
            for i, item in enumerate(value)
            for e in crd_errors(item, node["items"], f"{path}[{i}]", defs)
        ]
    expected = {
        "string": (str,),
        "integer": (int,),
        "number": (int, float),
        "boolean": (bool,),
        "int-or-string": (int, str),
    }[kind]
    if (isinstance(value, bool) and kind != "boolean") or not isinstance(value, expected):
        return [f"{path}: {value!r} is not {kind}"]
    if "enum" in node and value not in node["enum"]:
        return [f"{path}: {value!r} is not one of {node['enum']}"]
    return []


def crd() -> tuple[dict[str, Any], dict[str, Any]]:
    doc = json.loads(CRD.read_text())
    assert doc["source"]["tag"] == "v1.7.0"
    return doc["schema"], doc["definitions"]


def test_every_field_of_the_manifest_is_in_the_kuberay_crd() -> None:
    schema, defs = crd()
    assert CLUSTER["apiVersion"] == "ray.io/v1"
    assert crd_errors(CLUSTER, schema, "RayCluster", defs) == []


def test_the_crd_check_finds_misspelt_and_mistyped_fields() -> None:
    schema, defs = crd()
    broken = json.loads(json.dumps(CLUSTER))
    worker = broken["spec"]["workerGroupSpecs"][0]
    worker["template"]["spec"]["serviceAcountName"] = "x"
    worker["template"]["spec"]["containers"][0]["resources"]["limit"] = {}
    worker["rayStartParams"]["num-cpus"] = 16
    broken["spec"]["gcsFaultToleranceOptions"] = {"backend": "etcd"}
    errors = crd_errors(broken, schema, "RayCluster", defs)
    assert errors == [
        "RayCluster.spec.workerGroupSpecs[0].rayStartParams.num-cpus: 16 is not string",
        "RayCluster.spec.workerGroupSpecs[0].template.spec.containers[0].resources.limit: "
        "not a field of the CRD",
        "RayCluster.spec.workerGroupSpecs[0].template.spec.serviceAcountName: "
        "not a field of the CRD",
        "RayCluster.spec.gcsFaultToleranceOptions.backend: 'etcd' is not one of "
        "['redis', 'rocksdb']",
    ]


def test_readme_gcs_fault_tolerance_snippet_is_in_the_crd() -> None:
    blocks = re.findall(r"```yaml\n(.*?)```", README.read_text(), flags=re.DOTALL)
    [snippet] = [yaml.safe_load(b) for b in blocks if "gcsFaultToleranceOptions" in b]
    schema, defs = crd()
    assert crd_errors(snippet, schema, "README", defs) == []
    options = snippet["spec"]["gcsFaultToleranceOptions"]
    assert options["redisAddress"].startswith(("redis://", "rediss://"))
    assert "secretKeyRef" in options["redisPassword"]["valueFrom"]
