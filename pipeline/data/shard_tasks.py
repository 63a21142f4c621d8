"""What the workers run in the last pass of prepare_data: pack codes per unit, then shards.

``mark_unit`` turns a unit's selection status into pack codes, telling apart the training
records that share n-grams with the evaluation data. ``write_planned`` writes the shards of one
``layout.ShardTask``: it reads the records its plan names from the spill files and places them
exactly as the sequential packers would, so the shards are the same bytes whichever worker,
node or task wrote them.
"""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import storage
from pipeline.data import chunks, layout, shards
from pipeline.data.decontaminate import Decontaminator
from pipeline.data.pack import BlockBuffer, DocumentPacker
from pipeline.data.select import TRAIN, Selection


def mark_unit(
    scratch: str, index: int, selection: Selection, ngram: int | None, banned: np.ndarray
) -> None:
    """Write ``{index:06d}.pack.npy``: ``layout``'s code for each record of the unit."""
    parts = ("ids.npy", "train.npy", "lengths.npy", "split.npy")
    with chunks.local_spill(scratch, index, parts) as folder:
        codes = selection.status(index, np.load(chunks.spill_path(folder, index, "split.npy")))
        decon = Decontaminator(ngram)
        decon.banned = banned
        if ngram is not None and len(banned):
            ids, mask = chunks.load_spill(folder, index)
            lengths = np.load(chunks.spill_path(folder, index, "lengths.npy"))
            bounds = np.concatenate([[0], np.cumsum(lengths)])
            for i in np.flatnonzero(codes == TRAIN):
                lo, hi = bounds[i], bounds[i + 1]
                if decon.contaminated(ids[lo:hi], mask[lo:hi]):
                    codes[i] = layout.CONTAMINATED
    layout.write_array(chunks.spill_uri(scratch, index, "pack.npy"), codes.astype(np.int8))


class _Spills:
    """The spill files of the units a plan names, open two at a time (a document stream
    alternates between a domain and a replay unit)."""

    def __init__(self, scratch: str, stack: contextlib.ExitStack) -> None:
        self.scratch, self.stack = scratch, stack
        self.open: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray, contextlib.ExitStack]] = {}

    def record(self, index: int, record: int) -> tuple[np.ndarray, np.ndarray]:
        if index not in self.open:
            if len(self.open) == 2:
                oldest = next(iter(self.open))
                self.open.pop(oldest)[3].close()
            unit_stack = contextlib.ExitStack()
            parts = ("ids.npy", "train.npy", "lengths.npy")
            folder = unit_stack.enter_context(chunks.local_spill(self.scratch, index, parts))
            ids, mask = chunks.load_spill(folder, index)
            lengths = np.load(chunks.spill_path(folder, index, "lengths.npy"))
            bounds = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
            self.open[index] = (ids, mask, bounds, unit_stack)
            self.stack.callback(unit_stack.close)
        ids, mask, bounds, _ = self.open[index]
        lo, hi = bounds[record], bounds[record + 1]
        return np.asarray(ids[lo:hi], dtype=np.int64), np.asarray(mask[lo:hi])


def write_planned(
    task: layout.ShardTask,
    scratch: str,
    data_uri: str,
    seq_len: int,
    pad_id: int,
    eos_id: int,
    token_dtype: str,
    shard_blocks: int,
) -> dict[str, Any]:
    """Write one task's shards into ``data_uri``; returns their manifest entries (``shards``)
    and the task's ``blocks`` and ``trained_tokens``."""
    plan = layout.read_plan(task.plan)
    dtype = np.dtype(token_dtype)
    with contextlib.ExitStack() as stack:
        if storage.is_s3(data_uri):
            folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="shards-")))
        else:
            folder = Path(data_uri)
            folder.mkdir(parents=True, exist_ok=True)
        writer = shards.ShardWriter(folder, task.split, shard_blocks, dtype, task.first_shard)
        buffer = BlockBuffer(seq_len, pad_id, writer, rows=256, dtype=dtype)
        spills = _Spills(scratch, stack)
        if task.kind == "documents":
            packer = DocumentPacker(buffer, eos_id)
            for unit, record, start, stop in plan.tolist():
                ids, _ = spills.record(unit, record)
                packer.add_piece(np.append(ids, eos_id)[start:stop])
        else:
            row = -1
            for unit, record, at, length in plan.tolist():
                if at != row:
                    buffer.end_row()
                    row = at
                ids, mask = spills.record(unit, record)
                buffer.put(ids[:length], mask[:length])
        buffer.close()
        entry = writer.close()
        if buffer.blocks != task.rows:
            raise RuntimeError(
                f"shard task {task.plan} wrote {buffer.blocks} blocks, its plan {task.rows}"
            )
        if storage.is_s3(data_uri):
            for shard in entry["shards"]:
                for name in shard["files"].values():
                    storage.upload_file(folder / name, storage.join(data_uri, name))
    return {
        "shards": entry["shards"],
        "blocks": entry["blocks"],
        "trained_tokens": entry["trained_tokens"],
    }
