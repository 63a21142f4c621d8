"""Decide, per record, what prepare_data keeps: duplicates out, held-out by cluster, bad-data gate.

Works on the small per-record metadata the workers return (``chunks.ChunkResult``), never on
the text: exact keys, MinHash signatures and split keys.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.data import chunks, dedup, ingest
from pipeline.data.sources import DataError

DROP, TRAIN, HELDOUT = 0, 1, 2
_SHOW_BAD = 10


@dataclass
class Selection:
    """Per-record decisions for a group of units deduplicated together."""

    indices: list[int]
    """Unit indices, in order."""
    status: list[np.ndarray]
    """Per unit, per record: DROP, TRAIN or HELDOUT."""
    counts: Counter[str] = field(default_factory=Counter)


def absolute_lines(
    jobs: list[chunks.ChunkJob], results: dict[int, chunks.ChunkResult]
) -> dict[int, int]:
    """Lines before each unit in its file (a JSONL file split into byte ranges)."""
    before: dict[int, int] = {}
    seen: Counter[str] = Counter()
    for job in jobs:
        before[job.index] = seen[job.unit.uri]
        seen[job.unit.uri] += results[job.index].lines
    return before


def merge_quarantine(
    jobs: list[chunks.ChunkJob],
    results: dict[int, chunks.ChunkResult],
    scratch: str,
    out: Path,
) -> list[dict[str, Any]]:
    """Concatenate the workers' quarantine parts into ``out`` with file line numbers; returns the
    first few rows."""
    offsets = absolute_lines(jobs, results)
    first: list[dict[str, Any]] = []
    with open(out, "w") as sink:
        for job in jobs:
            with open(chunks.spill_path(scratch, job.index, "quarantine.jsonl")) as part:
                for line in part:
                    row = json.loads(line)
                    row["line"] += offsets[job.index]
                    sink.write(json.dumps(row) + "\n")
                    if len(first) < _SHOW_BAD:
                        first.append(row)
    return first


def check_bad_fraction(
    read: int,
    bad: Counter[str],
    first: list[dict[str, Any]],
    max_fraction: float,
    quarantine_uri: str = "quarantine.jsonl",
) -> None:
    """Raise when the share of bad records is above ``data.max_bad_fraction``.

    Args:
        read: records read; bad: bad records per reason; first: the first quarantine rows.
        max_fraction: ``data.max_bad_fraction``.
        quarantine_uri: where every bad record is listed (already written), named in the error.

    Raises:
        DataError: too many bad records, or none read at all.
    """
    total_bad = sum(bad.values())
    if read and total_bad / read <= max_fraction:
        return
    if not read:
        raise DataError("no records found in the data inputs (check data.* in the config)")
    shown = "\n".join(f"  {r['source']}:{r['line']}: {r['detail']}" for r in first)
    reasons = ", ".join(f"{reason}: {n}" for reason, n in bad.most_common())
    raise DataError(
        f"{total_bad} of {read} records are bad ({total_bad / read:.1%}), above "
        f"data.max_bad_fraction={max_fraction}; counts per reason: {reasons}. First bad "
        f"records:\n{shown}\nFix the data or raise data.max_bad_fraction; every bad record is "
        f"listed in {quarantine_uri}"
    )


def select(
    results: list[chunks.ChunkResult],
    heldout_from: set[int],
    fraction: float,
    near_dup_threshold: float | None,
) -> Selection:
    """Drop exact then near duplicates (first occurrence wins), and draw the held-out split by
    cluster: only a cluster's representative survives, so no near-duplicate pair straddles
    training and held-out data. Only units in ``heldout_from`` contribute held-out records."""
    sizes = [len(r.exact) for r in results]
    exact = np.concatenate([r.exact for r in results]) if results else np.zeros(0, np.uint64)
    status = np.full(len(exact), DROP, dtype=np.int8)
    _, first = np.unique(exact, return_index=True)
    unique = np.sort(first)
    counts: Counter[str] = Counter(exact_duplicates=len(exact) - len(unique))
    keep = unique
    if near_dup_threshold is not None and len(unique):
        signatures = np.concatenate([r.signatures for r in results])[unique]
        labels = dedup.near_duplicate_clusters(signatures, near_dup_threshold)
        keep = unique[labels == np.arange(len(unique))]
        counts["near_duplicates"] = len(unique) - len(keep)
    eligible = (
        np.concatenate(
            [np.full(n, r.index in heldout_from) for n, r in zip(sizes, results, strict=True)]
        )
        if results
        else np.zeros(0, bool)
    )
    keys = np.concatenate([r.split_keys for r in results]) if results else np.zeros(0, np.uint32)
    held = eligible[keep] & ingest.is_heldout(keys[keep], fraction)
    status[keep[held]] = HELDOUT
    status[keep[~held]] = TRAIN
    counts["train"] = int((status == TRAIN).sum())
    counts["heldout"] = int((status == HELDOUT).sum())
    per_unit = np.split(status, np.cumsum(sizes)[:-1]) if results else []
    return Selection([r.index for r in results], per_unit, counts)
