"""prepare_data on the Ray cluster: the per-unit map and the dedup shuffle as Ray Data stages.

The driver plans units (line-aligned byte ranges, Parquet row groups) and hands them to a Ray
Data map whose tasks ask for one CPU plus ``data.worker_resources`` (so they land on the CPU
worker group, never on a GPU node), at most ``data.num_workers`` at a time. A task killed with
its worker (OOM, node loss) is retried by Ray Data (its default for system failures); a task
that raises is not, since bad code or a broken file fails the same way twice. Tasks write their unit's spill to the
scratch folder and return only dedup rows (id, group, exact key, signature), which stay in the
object store, spread over the nodes.

Dedup is two shuffles (``duplicate_edges``): the buckets, then the signatures of the candidate
pairs alone. Only pairs, which follow the duplicates and not the corpus, come back to the driver
for the union-find.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.data import chunks, dedup

log = logging.getLogger(__name__)

_PARTITION_BYTES = 256 * 2**20
"""Bucket rows one dedup task gathers at most (about)."""
_BUCKET_ROW_BYTES = 23
_SIDE_ROW_BYTES = 4 * dedup.NUM_PERM + 13
_PROGRESS_SECONDS = 5.0


_started_here = False
"""Whether this process started the local Ray it is connected to."""


def connect(num_cpus: int | None) -> None:
    """Join the Ray cluster this process runs in (a Ray job's ``RAY_ADDRESS``), or start a
    local one with ``num_cpus`` CPUs (``pipeline prepare-data`` and tests). A local Ray is kept
    for the process's later runs: starting one forks this process, which fails once the process
    maps much memory (a test worker after many DeepSpeed engines)."""
    import ray

    global _started_here
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=False)
        return
    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    _started_here = True


def storage_env() -> dict[str, Any] | None:
    """The runtime env of tasks that read or write storage. On a cluster, None: its nodes and
    the job carry the storage settings. On a local Ray this process started (no dashboard),
    the driver's ``AWS_*`` settings as they are now: the Ray's workers were started with the
    environment of its first run, which a later run may have changed (another endpoint)."""
    settings = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
    if not _started_here or not settings:
        return None  # none: the tasks may run in the workers Ray started in advance
    return {"env_vars": settings}


def peak_memory_mb() -> float:
    """This process's peak resident memory (``VmHWM``: unlike ``ru_maxrss`` it does not start
    from the parent's peak after a fork and exec)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _quiet_context() -> None:
    from ray.data import DataContext

    context = DataContext.get_current()
    # The stage logs its own progress (below); Ray's bars would fill the Airflow task log.
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    from ray.data.context import ShuffleStrategy

    # The hash shuffle (2.60's default) fails to concatenate a partition when some input block
    # sent it no rows; the sort shuffle gathers each group whole and starts no actors.
    context.shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED


class Progress:
    """Records, input bytes and tokens per unit, as tasks report them (a Ray actor)."""

    def __init__(self) -> None:
        self.units: dict[int, tuple[int, int, int]] = {}

    def report(self, index: int, records: int, bytes_done: int, tokens: int) -> None:
        # Keyed by unit: a retried task overwrites its first attempt, never adds to it.
        self.units[index] = (records, bytes_done, tokens)

    def totals(self) -> tuple[int, int, int, int]:
        values = list(self.units.values())
        return (
            len(values),
            sum(v[0] for v in values),
            sum(v[1] for v in values),
            sum(v[2] for v in values),
        )


def _table(columns: dict[str, np.ndarray]) -> Any:
    """An Arrow table of numpy columns; a 2-D column becomes a fixed-size list, so that an
    empty batch has the same schema as a full one (the shuffle concatenates them)."""
    import pyarrow as pa

    arrays = {}
    for name, values in columns.items():
        if values.ndim == 2:
            flat = pa.array(np.ascontiguousarray(values).reshape(-1))
            arrays[name] = pa.FixedSizeListArray.from_arrays(flat, values.shape[1])
        else:
            arrays[name] = pa.array(values)
    return pa.table(arrays)


def _columns(table: Any) -> dict[str, np.ndarray]:
    """``_table`` undone."""
    import pyarrow as pa

    out = {}
    for name in table.column_names:
        column = table.column(name).combine_chunks()
        if pa.types.is_fixed_size_list(column.type):
            width = column.type.list_size
            out[name] = column.flatten().to_numpy(zero_copy_only=False).reshape(-1, width)
        else:
            out[name] = column.to_numpy(zero_copy_only=False)
    return out


def _run_units(
    batch: dict[str, np.ndarray], jobs: dict[int, chunks.ChunkJob], progress: Any
) -> Any:
    [index] = batch["index"].tolist()
    job = jobs[int(index)]
    total = chunks.unit_bytes(job.unit)

    def on_batch(records: int, tokens: int, done: bool) -> None:
        progress.report.remote(job.index, records, total if done else 0, tokens)

    return _table(chunks.process_chunk(job, on_batch))


def process_units(
    jobs: list[chunks.ChunkJob],
    resources: dict[str, float],
    max_workers: int | None,
    on_progress: Callable[[dict[str, float]], None] | None = None,
) -> Any:
    """Run every unit as a Ray Data task (largest first); returns the materialized dedup rows.

    Logs records, MB, tokens, rate and ETA every few seconds while the tasks run, and passes
    the same figures to ``on_progress`` (MLflow).
    """
    import ray
    import ray.data

    _quiet_context()
    sizes = {job.index: chunks.unit_bytes(job.unit) for job in jobs}
    total = sum(sizes.values())
    # Largest first: a big unit started last would leave every other worker idle.
    items = [{"index": i} for i in sorted(sizes, key=lambda i: (-sizes[i], i))]
    progress: Any = ray.remote(num_cpus=0)(Progress).remote()
    options: dict[str, Any] = {"num_cpus": 1, "resources": dict(resources) or None}
    if max_workers:
        options["concurrency"] = max_workers
    run_units: Any = _run_units
    rows = ray.data.from_items(items, override_num_blocks=max(1, len(items))).map_batches(
        run_units,
        batch_size=1,
        batch_format="numpy",
        fn_kwargs={"jobs": {job.index: job for job in jobs}, "progress": progress},
        runtime_env=storage_env(),
        **options,
    )
    started = time.monotonic()
    finished = threading.Event()

    def report() -> None:
        units, records, done, tokens = ray.get(progress.totals.remote())
        elapsed = max(time.monotonic() - started, 1e-9)
        rate = done / elapsed
        eta = (total - done) / rate if rate > 0 else float("nan")
        log.info(
            "prepare_data: %d/%d units, %d records, %.1f of %.1f MB, %d tokens, %.2f MB/s, "
            "ETA %s",
            units, len(jobs), records, done / 1e6, total / 1e6, tokens, rate / 1e6,
            "-" if math.isnan(eta) else f"{eta:.0f} s",
        )  # fmt: skip
        if on_progress is not None:
            figures = {"prepare_records": records, "prepare_tokens": tokens}
            on_progress(figures | {"prepare_mb": done / 1e6, "prepare_mb_per_s": rate / 1e6})

    def watch() -> None:
        while not finished.wait(_PROGRESS_SECONDS):
            report()

    watcher = threading.Thread(target=watch, name="prepare-progress", daemon=True)
    watcher.start()
    try:
        materialized = rows.materialize()
    finally:
        finished.set()
        watcher.join()
    report()
    ray.kill(progress)
    return materialized


def _buckets(table: Any, thresholds: dict[int, float | None], partitions: int) -> Any:
    batch = _columns(table)
    doc, group, exact = batch["doc"], batch["group"], batch["exact"]
    return _table(dedup.bucket_rows(doc, group, exact, batch["signature"], thresholds, partitions))


def _pairs(table: Any) -> Any:
    return _table(dedup.bucket_pairs(_columns(table)))


def _sides(table: Any, needed: np.ndarray, partitions: int) -> Any:
    batch = _columns(table)
    return _table(dedup.pair_sides(batch["doc"], batch["signature"], needed, partitions))


def _similar(table: Any, thresholds: np.ndarray) -> Any:
    return _table(dedup.similar_pairs(_columns(table), thresholds))


def _collect(dataset: Any, columns: tuple[str, ...]) -> list[np.ndarray]:
    parts: dict[str, list[np.ndarray]] = {c: [] for c in columns}
    for batch in dataset.iter_batches(batch_format="numpy", batch_size=1 << 16):
        for c in columns:
            parts[c].append(batch[c])
    return [np.concatenate(parts[c]) if parts[c] else np.zeros(0) for c in columns]


def _partitions(rows: int, row_bytes: int, cpus: int) -> int:
    return max(2 * cpus, math.ceil(rows * row_bytes / _PARTITION_BYTES))


def duplicate_edges(
    rows: Any, thresholds: dict[int, float | None], cpus: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact and near-duplicate edges of the dedup rows, in two shuffles.

    The bucket shuffle gathers each exact-key and LSH band bucket whole (``bucket_rows``: 23
    bytes per record and band, no signature) and pairs its records with its first one
    (``bucket_pairs``). The LSH pairs are only candidates: a map over the records picks the
    signatures they name (``pair_sides``) and a second shuffle, of those alone, brings each
    pair's two signatures together to confirm it (``similar_pairs``). No shuffle carries
    every record's signature, and what reaches the driver is pairs: their number follows the
    duplicates, not the corpus.

    Returns:
        ``a`` (earlier record id), ``b`` (later record id) and ``exact`` per edge.
    """
    count = rows.count()
    empty = np.zeros(0, np.int64)
    if count < 2:
        return empty, empty.copy(), np.zeros(0, bool)
    bands = max((dedup.lsh_params(t)[0] for t in thresholds.values() if t is not None), default=0)
    partitions = _partitions(count * (bands + 1), _BUCKET_ROW_BYTES, cpus)
    pairs = (
        rows.map_batches(
            _buckets,
            batch_format="pyarrow",
            fn_kwargs={"thresholds": thresholds, "partitions": partitions},
            num_cpus=1,
        )
        .groupby("part", num_partitions=partitions)
        .map_groups(_pairs, batch_format="pyarrow", num_cpus=1)
    )
    a, b, group, exact = _collect(pairs, ("a", "b", "group", "exact"))
    a, b, exact = a.astype(np.int64), b.astype(np.int64), exact.astype(bool)
    # A pair found in several bands is confirmed once.
    near = np.unique(np.stack([a[~exact], b[~exact], group[~exact].astype(np.int64)]), axis=1)
    if near.shape[1] == 0:
        return a[exact], b[exact], exact[exact]
    limits = np.array([thresholds[int(g)] or 2.0 for g in near[2]], dtype=np.float64)
    side_partitions = _partitions(2 * near.shape[1], _SIDE_ROW_BYTES, cpus)
    sides = rows.map_batches(
        _sides,
        batch_format="pyarrow",
        fn_kwargs={"needed": near[:2], "partitions": side_partitions},
        num_cpus=1,
    )
    similar = sides.groupby("part", num_partitions=side_partitions).map_groups(
        _similar, batch_format="pyarrow", fn_kwargs={"thresholds": limits}, num_cpus=1
    )
    [confirmed] = _collect(similar, ("pair",))
    confirmed = np.sort(confirmed.astype(np.int64))
    edges_a = np.concatenate([a[exact], near[0, confirmed]])
    edges_b = np.concatenate([b[exact], near[1, confirmed]])
    return edges_a, edges_b, np.r_[np.ones(int(exact.sum()), bool), np.zeros(len(confirmed), bool)]


def _run_task(fn: Callable[[Any], Any], payload: Any) -> Any:
    return fn(payload)


_TASK_RETRIES = 3
"""Retries of a task whose worker died (OOM, a lost node); a task that raises is not retried."""


def map_tasks(
    fn: Callable[[Any], Any],
    payloads: list[Any],
    resources: dict[str, float],
    max_workers: int | None,
) -> list[Any]:
    """``fn(payload)`` for each payload as one Ray task on the CPU nodes (one CPU plus
    ``resources``, at most ``max_workers`` at once), named after ``fn``; returns the results
    in payload order. Payloads are sent one per task: what every task needs belongs in ``fn``'s
    closure, which is sent once.

    Plain tasks, not a Ray Data map: these are a few dozen coarse jobs (a unit's records, a
    few shards), where a Ray Data execution's start (about half a second) would be most of
    their cost.
    """
    import ray

    if not payloads:
        return []
    remote = ray.remote(_run_task).options(
        name=fn.__name__,
        num_cpus=1,
        resources=dict(resources) or None,
        max_retries=_TASK_RETRIES,
        runtime_env=storage_env(),
        # Spread over the CPU nodes: the default packs a node before it uses the next, and
        # these jobs are bound by storage, which every node has its own share of.
        scheduling_strategy="SPREAD",
    )
    shared = ray.put(fn)  # the closure and what it holds, sent once
    limit = max_workers or len(payloads)
    results: list[Any] = [None] * len(payloads)
    pending: dict[Any, int] = {}
    for index, payload in enumerate(payloads):
        if len(pending) == limit:
            [done], _ = ray.wait(list(pending), num_returns=1)
            results[pending.pop(done)] = ray.get(done)
        pending[remote.remote(shared, payload)] = index
    for ref, index in pending.items():
        results[index] = ray.get(ref)
    return results


def write_records(
    units: dict[int, tuple[str, str]],
    selections: dict[str, Any],
    scratch: str,
    data_uri: str,
    resources: dict[str, float],
    max_workers: int | None,
) -> list[dict[str, Any]]:
    """Every unit's kept records as Parquet (``documents.write_unit``), one task per unit;
    returns the files' manifest entries, sorted by file.

    Args:
        units: corpus and source file per unit index; selections: the ``Selection`` per corpus.
    """
    from pipeline.data import documents

    def write_records_of_unit(index: int) -> dict[str, Any]:
        corpus, source = units[index]
        return documents.write_unit(scratch, corpus, index, source, selections[corpus], data_uri)

    entries = map_tasks(write_records_of_unit, sorted(units), resources, max_workers)
    return sorted((e for e in entries if e["rows"]), key=lambda e: e["file"])
