"""Where the training loop's collectives run: one module decides, for Ray Train and the local
launcher (``devstack/local_training.py``).

An NCCL process group has no backend for CPU tensors: an all-reduce of a CPU tensor raises
``No backend type associated with device type cpu``. GPU workers therefore get one process
group with two backends, ``cpu:gloo,cuda:nccl``: the loop's small host-side counts (target
tokens, the latest checkpoint each rank sees) go through gloo without touching the GPU, and
everything computed on the GPU (loss sums, the finite flags) is reduced there by NCCL, with one
host sync per optimizer step (``step_totals``), never one per micro-batch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

GPU_BACKEND = "cpu:gloo,cuda:nccl"
CPU_BACKEND = "gloo"


def process_group_backend(use_gpu: bool) -> str:
    """The ``torch.distributed`` backend string every training process group is created with."""
    return GPU_BACKEND if use_gpu else CPU_BACKEND


def host_sums(values: list[int]) -> list[int]:
    """Element-wise sums over all ranks of small host-side integers (gloo, no device sync)."""
    import torch
    import torch.distributed as dist

    counts = torch.tensor(values, dtype=torch.int64)
    dist.all_reduce(counts)
    return [int(v) for v in counts.tolist()]


def host_gather(value: Any) -> list[Any]:
    """Every rank's ``value`` (picklable, small), in rank order, through the CPU backend."""
    import torch.distributed as dist

    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def step_totals(sums: torch.Tensor) -> list[float]:
    """Sum a 1-D tensor of per-rank step sums over all ranks on its own device and read it back:
    the one host sync of an optimizer step. A non-finite entry stays non-finite in the sum, so
    a finite check on the result covers every rank."""
    import torch.distributed as dist

    dist.all_reduce(sums)
    return [float(v) for v in sums.double().tolist()]
