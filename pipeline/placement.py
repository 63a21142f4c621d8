"""Bounded placement: wait for the cluster to fit a stage's workers, or fail saying what is short.

Ray queues work it cannot place, and Ray Train retries starting a worker group that does not
fit for as long as the job lives, so a job asking for GPUs no node offers shows RUNNING until
its stage deadline, and every later run queues behind it. A stage first reserves its workers'
bundles as one placement group (which also asks an autoscaler for the nodes), waits at most
``compute.placement_timeout_minutes``, and releases the group again: the workers then start
in the room it found.
"""

from __future__ import annotations

from typing import Any


class PlacementTimeoutError(RuntimeError):
    """The cluster could not place a stage's workers within the placement timeout."""


def shortfall(
    bundles: list[dict[str, float]], total: dict[str, float], available: dict[str, float]
) -> str:
    """``GPU: 8 needed, 0 in the cluster (0 free); ...`` for each resource the cluster lacks
    for ``bundles``, else the free amounts (the room exists, but other work holds it)."""
    needed: dict[str, float] = {}
    for bundle in bundles:
        for name, amount in bundle.items():
            needed[name] = needed.get(name, 0.0) + amount
    lines = [
        f"{name}: {_num(amount)} needed, {_num(total.get(name, 0.0))} in the cluster "
        f"({_num(available.get(name, 0.0))} free)"
        for name, amount in sorted(needed.items())
        if total.get(name, 0.0) < amount or available.get(name, 0.0) < amount
    ]
    return "; ".join(lines) or "every resource exists, but not on few enough nodes at once"


def _num(value: float) -> str:
    return f"{value:g}"


def reserve(bundles: list[dict[str, float]], timeout_minutes: float, what: str) -> None:
    """Wait until the cluster can place ``bundles`` together (Ray Train's PACK strategy).

    Args:
        bundles: one resource dict per worker, as Ray Train or the task will request them.
        timeout_minutes: ``compute.placement_timeout_minutes``.
        what: names the workers and their pool in the error (``4 h100 training workers``).

    Raises:
        PlacementTimeoutError: not placed in time; names each missing resource, how much the
            cluster has, and the setting to change.
    """
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    group: Any = placement_group(bundles, strategy="PACK")
    try:
        placed = group.wait(timeout_seconds=timeout_minutes * 60)
    finally:
        remove_placement_group(group)
    if not placed:
        short = shortfall(bundles, ray.cluster_resources(), ray.available_resources())
        raise PlacementTimeoutError(
            f"the cluster could not place {what} within compute.placement_timeout_minutes="
            f"{timeout_minutes:g}: {short}. Add nodes of that pool (its KubeRay worker group's "
            "replicas or maxReplicas), lower compute.num_workers, or raise the timeout"
        )
