"""Run the training recipe on this machine without Ray: one process per rank, torch.distributed
started here with the backends Ray Train gets (``collectives.process_group_backend``: gloo on
CPU, ``cpu:gloo,cuda:nccl`` on GPUs).

For debugging a stage's training outside a cluster, for single-GPU benchmarks and for tests
that need several ranks but not Ray's worker management. Production runs go through
``pipeline.train.ray_train.fit``, which runs the same ``train_worker``.
"""

from __future__ import annotations

import os
from typing import Any

from pipeline.devstack.host import free_port
from pipeline.train.collectives import process_group_backend
from pipeline.train.loop import LoopSpec, spec_dict, train_worker


def _rank_main(rank: int, world: int, port: int, backend: str, spec: dict[str, Any]) -> None:
    import torch.distributed as dist

    os.environ.update(
        {
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world),
            "LOCAL_WORLD_SIZE": str(world),
        }
    )
    dist.init_process_group(backend, rank=rank, world_size=world)
    try:
        train_worker(spec)
    finally:
        dist.destroy_process_group()


def run_local(spec: LoopSpec, world_size: int) -> None:
    """Train ``spec`` on ``world_size`` local processes; returns when every rank is done.

    Raises:
        torch.multiprocessing.ProcessRaisedException: a rank failed (its traceback included).
    """
    import torch
    import torch.multiprocessing as mp

    backend = process_group_backend(use_gpu=torch.cuda.is_available())
    mp.start_processes(
        _rank_main,
        args=(world_size, free_port(), backend, spec_dict(spec)),
        nprocs=world_size,
        start_method="spawn",
    )
