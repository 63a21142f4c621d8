"""Ranks that see different checkpoints fail together with the fix, instead of one rank
entering ``load_checkpoint`` alone until the collective timeout.

Two real gloo ranks (torch.multiprocessing) stand in for two nodes: each has its own local
folder, as a local ``artifact_root`` on two hosts would give them.
"""

from __future__ import annotations

import os
import socket
import traceback
from pathlib import Path
from typing import Any

import pytest

from pipeline.devstack.host import free_port
from pipeline.train.checkpoint import (
    COMPLETE_MARKER,
    LATEST_POINTER,
    CheckpointStore,
    refuse_node_local_root,
    tag_for,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def _rank(rank: int, port: int, roots: list[str], errors: Any, check: str) -> None:
    import torch.distributed as dist

    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        if check == "latest":
            CheckpointStore(roots[rank], keep_last=2, rank=rank, world=2).agreed_latest()
        else:
            # Two hosts: each rank reports its own name, as two pods would.
            socket.gethostname = lambda: f"node-{rank}"  # type: ignore[assignment]
            refuse_node_local_root(roots[rank], "cpt", 2)
        errors[rank] = ""
    except (RuntimeError, ValueError):
        errors[rank] = traceback.format_exc()
    finally:
        dist.destroy_process_group()


def _run_two_ranks(roots: list[str], check: str) -> list[str]:
    import torch.multiprocessing as mp

    # Spawned, not forked (the default): a fork of this process can be refused (ENOMEM) once
    # earlier in-process training has left it with tens of GB mapped.
    manager = mp.get_context("spawn").Manager()
    errors = manager.dict()
    mp.start_processes(
        _rank, args=(free_port(), roots, errors, check), nprocs=2, start_method="spawn"
    )
    return [errors[0], errors[1]]


def _complete_checkpoint(root: Path, step: int) -> None:
    folder = root / tag_for(step)
    folder.mkdir(parents=True)
    (folder / COMPLETE_MARKER).write_bytes(b"")
    (root / LATEST_POINTER).write_text(tag_for(step))


def test_ranks_that_see_different_latest_checkpoints_all_fail_with_the_fix(tmp_path: Path) -> None:
    node_a, node_b = tmp_path / "node-a", tmp_path / "node-b"
    _complete_checkpoint(node_a, 4)
    node_b.mkdir()  # the other node never saw a checkpoint
    errors = _run_two_ranks([str(node_a), str(node_b)], "latest")
    for error in errors:
        assert "rank 0: 4, rank 1: none" in error
        assert "s3://" in error


def test_ranks_that_agree_resume_together(tmp_path: Path) -> None:
    _complete_checkpoint(tmp_path / "shared", 6)
    assert _run_two_ranks([str(tmp_path / "shared")] * 2, "latest") == ["", ""]


def test_a_local_checkpoint_root_on_two_nodes_is_refused_before_loading(tmp_path: Path) -> None:
    errors = _run_two_ranks([str(tmp_path / "ckpt")] * 2, "nodes")
    for error in errors:
        assert "the 2 workers run on 2 nodes (node-0, node-1)" in error
        assert "storage.artifact_root to an s3:// URI" in error
    # An s3:// root is fine wherever the workers are.
    assert _run_two_ranks(["s3://bucket/run/cpt/checkpoints"] * 2, "nodes") == ["", ""]
