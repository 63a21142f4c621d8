"""Decide, per record, what prepare_data keeps: duplicates out, held-out by cluster, bad-data gate.

Works on the duplicate edges of the dedup shuffle and on each unit's split keys, never on the
text; the driver keeps 8 bytes per dropped duplicate and nothing per kept record.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import storage
from pipeline.data import chunks, dedup, ingest
from pipeline.data.sources import DataError

DROP, TRAIN, HELDOUT = 0, 1, 2
_SHOW_BAD = 10


@dataclass
class Selection:
    """Which records of one dedup group stay: the duplicates to drop (record ids, sorted) and
    the held-out draw, applied unit by unit (``status``) so that no per-record array of the
    corpus is ever built."""

    indices: list[int]
    """Unit indices of the group, in order."""
    drops: np.ndarray
    """Sorted ``chunks.record_id`` of every duplicate dropped (8 bytes per duplicate)."""
    heldout_from: set[int]
    fraction: float
    counts: Counter[str] = field(default_factory=Counter)

    def status(self, index: int, split_keys: np.ndarray) -> np.ndarray:
        """DROP, TRAIN or HELDOUT for each record of unit ``index``."""
        held = index in self.heldout_from
        status = np.where(held & ingest.is_heldout(split_keys, self.fraction), HELDOUT, TRAIN)
        lo, hi = np.searchsorted(
            self.drops, [chunks.record_id(index, 0), chunks.record_id(index + 1, 0)]
        )
        status[self.drops[lo:hi] & 0xFFFFFFFF] = DROP
        return status.astype(np.int8)


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
            part = storage.read_bytes(chunks.spill_uri(scratch, job.index, "quarantine.jsonl"))
            for line in part.decode().splitlines():
                if line:
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
    indices: list[int],
    edges: tuple[np.ndarray, np.ndarray, np.ndarray],
    fraction: float,
    scratch: str,
) -> Selection:
    """Drop exact then near duplicates (the earliest record of each cluster wins), and draw the
    held-out split by cluster: only a cluster's representative survives, so no near-duplicate
    pair straddles training and held-out data.

    Args:
        indices: the group's units; edges: its duplicate edges (``engine.duplicate_edges``).
        scratch: the spill folder, for the split keys counted here unit by unit.
    """
    a, b, exact = edges
    nodes, labels = dedup.components(a, b)
    drops = nodes[labels != nodes]
    exact_dropped = len(np.unique(b[exact]))
    counts: Counter[str] = Counter(
        exact_duplicates=exact_dropped, near_duplicates=len(drops) - exact_dropped
    )
    selection = Selection(list(indices), drops, set(indices), fraction, counts)
    for index in indices:
        with chunks.local_spill(scratch, index, ("split.npy",)) as folder:
            split_keys = np.load(chunks.spill_path(folder, index, "split.npy"))
        status = selection.status(index, split_keys)
        counts["train"] += int((status == TRAIN).sum())
        counts["heldout"] += int((status == HELDOUT).sum())
    return selection
