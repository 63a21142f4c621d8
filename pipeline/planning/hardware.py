"""What one host of each Ray worker pool has, with the config's overrides applied.

``POOLS`` is the project's one table of GPU figures: the planner, the training loop's MFU
(``pipeline.train.throughput``) and the GPU benchmarks read the peak FLOP/s from it. Its host
figures (vCPUs, RAM, local NVMe, what the kubelet keeps) are what the KubeRay worker groups of
``docker/kuberay/raycluster.yaml`` are sized against (tests/unit/test_kuberay_manifest.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from pipeline.config import ComputeConfig

GIB = 2**30


@dataclass(frozen=True)
class Pool:
    """One host type of a worker group and how many of them a run uses."""

    name: str
    has_gpu: bool
    """False for CPU workers: everything a worker holds lives in host RAM."""
    device_memory_gib: float
    """Memory of one GPU (0 for CPU workers)."""
    devices_per_node: int
    """GPUs per host (CPU workers per host on the cpu pool)."""
    host_memory_gb: float
    """RAM of one host, decimal GB as vendors quote it."""
    peak_tflops: dict[str, float]
    """Dense matmul peak of one device per precision (``bf16``, ``fp32``), TFLOP/s."""
    intra_node_gbyte_s: float
    """Collective bus bandwidth between devices of one host (NVLink), GB/s per device."""
    interconnect_gbit_s: float
    """Network bandwidth between hosts, per host, Gbit/s."""
    pcie_gbyte_s: float
    """Host-to-device copy bandwidth per device, GB/s (pinned memory)."""
    hbm_gbyte_s: float
    """Device memory bandwidth (bounds the GPU optimizer step), GB/s."""
    runtime_reserved_gib: float
    """Memory the CUDA context, cuBLAS workspaces and NCCL take outside PyTorch's allocator."""
    host_cpus: int
    """vCPUs of one host (0 on the cpu pool: the demo's one machine is no Kubernetes node)."""
    local_disk_gb: float
    """Local NVMe of one host, decimal GB: where the kubelet keeps emptyDir volumes when its
    root directory is on the NVMe RAID (docker/kuberay/README.md)."""
    kubelet_reserved_cpus: float
    """CPUs of one host that pods cannot request: kube-reserved and system-reserved (GKE's
    formula: 6% of the first core ... 0.25% of every core above 4) plus the DaemonSets (GPU
    operator, CNI, kube-proxy, log and metric agents)."""
    kubelet_reserved_memory_gib: float
    """RAM of one host that pods cannot request: kube-reserved and system-reserved (GKE's
    formula: 25% of the first 4 GiB, 20% of the next 4, 10% of the next 8, 6% of the next
    112, 2% above 128 GiB), the 100 MiB hard-eviction threshold, and 16 GiB for DaemonSets
    and the memory the kernel and GPU driver keep below the nominal figure."""
    kubelet_reserved_disk_gb: float
    """Local disk of one host that pods cannot request: the kubelet's hard-eviction threshold
    (``nodefs.available<10%``) plus 100 GB for container images."""
    num_nodes: int = 1

    @property
    def host_memory_gib(self) -> float:
        return self.host_memory_gb * 1e9 / GIB

    def inter_node_gbyte_s_per_device(self) -> float:
        return self.interconnect_gbit_s / 8 / self.devices_per_node


# Figures: vendor datasheets; sustained rates come from the kernel efficiencies in throughput.py.
POOLS: dict[str, Pool] = {
    # A100 SXM hosts: 4 GPUs, 600 GB RAM, NVLink 3 (600 GB/s bidirectional, ~240 GB/s bus
    # bandwidth in NCCL), 400 Gbit/s to the next host, PCIe Gen4 x16.
    "a100": Pool(
        name="a100",
        has_gpu=True,
        device_memory_gib=80.0,
        devices_per_node=4,
        host_memory_gb=600.0,
        peak_tflops={"bf16": 312.0, "fp32": 19.5},
        intra_node_gbyte_s=240.0,
        interconnect_gbit_s=400.0,
        pcie_gbyte_s=20.0,
        hbm_gbyte_s=2000.0,
        runtime_reserved_gib=1.5,
        # vCPUs and NVMe of 4-GPU A100 hosts vary by vendor (48 to 96 vCPUs); these are the
        # project's hosts: set yours before trusting the KubeRay manifest test.
        host_cpus=64,
        local_disk_gb=1500.0,
        kubelet_reserved_cpus=2.0,
        kubelet_reserved_memory_gib=34.0,  # GKE's formula: 18.0 GiB for 558.8 GiB, + 16
        kubelet_reserved_disk_gb=250.0,  # 10% of 1500 GB + 100 GB of images
    ),
    # H100 SXM hosts: 8 GPUs, 1872 GB RAM, NVLink 4 (~360 GB/s bus bandwidth), 8 x 400 Gbit/s
    # to the next host, PCIe Gen5 x16.
    "h100": Pool(
        name="h100",
        has_gpu=True,
        device_memory_gib=80.0,
        devices_per_node=8,
        host_memory_gb=1872.0,
        peak_tflops={"bf16": 989.0, "fp32": 67.0},
        intra_node_gbyte_s=360.0,
        interconnect_gbit_s=3200.0,
        pcie_gbyte_s=40.0,
        hbm_gbyte_s=3350.0,
        runtime_reserved_gib=1.5,
        # As GCP's a3-highgpu-8g (whose 1872 GB this is): 208 vCPUs, 16 x 375 GB local SSD.
        host_cpus=208,
        local_disk_gb=6000.0,
        kubelet_reserved_cpus=2.0,
        kubelet_reserved_memory_gib=58.0,  # GKE's formula: 41.7 GiB for 1743.4 GiB, + 16
        kubelet_reserved_disk_gb=700.0,  # 10% of 6000 GB + 100 GB of images
    ),
    # CPU workers (the demo): one host; "device" figures describe one worker's cores, and
    # gloo collectives run through shared memory. peak_tflops is per worker core (AVX2 FMA).
    "cpu": Pool(
        name="cpu",
        has_gpu=False,
        device_memory_gib=0.0,
        devices_per_node=0,  # every worker on one host; set from num_workers in pool_for
        host_memory_gb=16.0,
        peak_tflops={"bf16": 0.05, "fp32": 0.1},
        intra_node_gbyte_s=2.0,
        interconnect_gbit_s=10.0,
        pcie_gbyte_s=10.0,
        hbm_gbyte_s=20.0,
        runtime_reserved_gib=0.0,
        host_cpus=0,
        local_disk_gb=0.0,
        kubelet_reserved_cpus=0.0,
        kubelet_reserved_memory_gib=0.0,
        kubelet_reserved_disk_gb=0.0,
    ),
}


DEVICE_NAME_POOLS = (("A100", "a100"), ("H100", "h100"), ("H200", "h100"))
"""CUDA device-name fragment -> the pool whose per-GPU figures it has. The H200 is the H100's
GH100 chip with more and faster HBM: the same 989 TFLOP/s dense bf16. Every A100 (SXM or
PCIe, 40 or 80 GB) has 312."""
SLOWER_VARIANTS = ("PCIE", "NVL")
"""H100/H200 variants with lower clocks than the SXM parts the h100 pool describes (H100 PCIe
756, H100 NVL and H200 NVL about 835 TFLOP/s dense bf16): no pool claims their peak."""


def gpu_peak_flops(pool: str, precision: str = "bf16") -> float | None:
    """Dense peak FLOP/s of one GPU of ``pool`` (``POOLS[pool].peak_tflops``, no sparsity).

    Args:
        pool: a ``POOLS`` key (``a100``, ``h100``, ``cpu``).
        precision: ``bf16`` or ``fp32``.

    Returns:
        FLOP/s, or None for pools without GPUs (a CPU worker has no peak MFU would compare
        with) and for names that are not in ``POOLS``.
    """
    known = POOLS.get(pool)
    if known is None or not known.has_gpu:
        return None
    return known.peak_tflops[precision] * 1e12


def pool_for_device_name(name: str) -> str | None:
    """The pool whose per-GPU figures (peak FLOP/s, memory) a CUDA device has.

    Args:
        name: ``torch.cuda.get_device_name()``, e.g. ``NVIDIA H100 80GB HBM3``, ``NVIDIA H200``,
            ``NVIDIA A100-SXM4-80GB``.

    Returns:
        ``a100`` or ``h100``; None for other GPUs and for the H100/H200 PCIe and NVL cards,
        whose peaks are lower than the pool's (give those a peak by hand).
    """
    upper = name.upper()
    for fragment, pool in DEVICE_NAME_POOLS:
        if fragment in upper:
            if pool == "h100" and any(v in upper for v in SLOWER_VARIANTS):
                return None
            return pool
    return None


def pool_for(compute: ComputeConfig) -> Pool:
    """The config's pool with its hardware overrides, sized to ``num_workers``.

    Returns:
        The pool with ``num_nodes`` = workers / devices per node, rounded up; on the cpu pool
        all workers share one host unless ``gpus_per_node`` says otherwise, and the peak rate
        is per worker (``cpus_per_worker`` cores).
    """
    pool = POOLS[compute.pool]
    per_node = compute.gpus_per_node or pool.devices_per_node or compute.num_workers
    pool = replace(
        pool,
        devices_per_node=min(per_node, compute.num_workers),
        device_memory_gib=compute.gpu_memory_gib or pool.device_memory_gib,
        host_memory_gb=compute.host_memory_gb or pool.host_memory_gb,
        interconnect_gbit_s=compute.interconnect_gbit_s or pool.interconnect_gbit_s,
        pcie_gbyte_s=compute.pcie_gbyte_s or pool.pcie_gbyte_s,
        num_nodes=math.ceil(compute.num_workers / per_node),
    )
    if not pool.has_gpu:
        cores = compute.cpus_per_worker
        pool = replace(pool, peak_tflops={k: v * cores for k, v in pool.peak_tflops.items()})
    return pool
