"""Where every training record goes in the packed shards, decided from lengths alone.

The packers (``pack``) are sequential: a document continues in the row where the previous one
ended, and chats are packed best-fit within windows of consecutive examples. What they write
depends only on the records' order and lengths, so the driver lays the training splits out
from each unit's ``lengths.npy`` and pack codes (a few bytes per record, read one unit at a
time), cuts the layout at shard boundaries and writes one plan file per task into the scratch
folder. The tasks (``shard_tasks.write_planned``) then copy the tokens in parallel and write
the very bytes the sequential packers would have: the output never depends on the workers.

A plan is an ``int64 [n, 4]`` array, one row per piece, in packing order:
documents ``(unit, record, start, stop)``, the tokens ``start:stop`` of the record followed by
EOS (a document that crosses a task's edge is split there); chats ``(unit, record, row, length)``,
the first ``length`` tokens of the record in the task's row ``row``.
"""

from __future__ import annotations

import io
import math
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import numpy as np

from pipeline import storage
from pipeline.data import chunks, select
from pipeline.data.pack import best_fit

# A unit's pack codes (``{index:06d}.pack.npy``): the selection's status, with training records
# that share n-grams with the evaluation data told apart.
SKIP, TRAIN_CLEAN, HELDOUT = select.DROP, select.TRAIN, select.HELDOUT
CONTAMINATED = 3
CHAT_WINDOW = 4096
"""Examples per best-fit window (``pack.ExamplePacker``'s default)."""


@dataclass(frozen=True)
class ShardTask:
    """Consecutive shards of one split, written by one task."""

    split: str
    kind: Literal["documents", "chats"]
    first_shard: int
    rows: int
    """Rows (blocks) the task writes: a multiple of ``shard_blocks`` except in a split's last."""
    plan: str
    """URI of the task's plan file (``.npy``) in the scratch folder."""


@dataclass
class SplitLayout:
    """A training split's tasks and the figures the manifest states about it."""

    tasks: list[ShardTask]
    records: int = 0
    tokens: int = 0
    """Non-padding tokens (EOS included for documents)."""


def unit_codes(scratch: str, index: int) -> tuple[np.ndarray, np.ndarray]:
    """A unit's record lengths and pack codes."""
    with chunks.local_spill(scratch, index, ("lengths.npy", "pack.npy")) as folder:
        lengths = np.load(chunks.spill_path(folder, index, "lengths.npy")).astype(np.int64)
        codes = np.load(chunks.spill_path(folder, index, "pack.npy"))
    return lengths, codes


def _records(scratch: str, indices: list[int]) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    for index in indices:
        lengths, codes = unit_codes(scratch, index)
        yield index, lengths, codes


class _Replay:
    """The replay corpus's clean training documents, loaded a unit at a time as the domain
    stream needs them. ``prefix[k]``: replay tokens before window item k (EOS included)."""

    def __init__(self, scratch: str, indices: list[int]) -> None:
        self.units = _records(scratch, indices)
        self.unit = np.zeros(0, np.int64)
        self.record = np.zeros(0, np.int64)
        self.length = np.zeros(0, np.int64)
        self.prefix = np.zeros(0, np.int64)
        self.dirty_before = np.zeros(0, np.int64)
        """Contaminated replay documents before each item: the sequential loop reads past them."""
        self.loaded_tokens = 0
        self.dirty = 0
        self.exhausted = False

    def load_until(self, tokens: float) -> None:
        """Load units until every document starting before ``tokens`` replay tokens is here."""
        while self.loaded_tokens < tokens and not self.exhausted:
            try:
                index, lengths, codes = next(self.units)
            except StopIteration:
                self.exhausted = True
                return
            clean = np.flatnonzero(codes == TRAIN_CLEAN)
            dirty = np.cumsum(codes == CONTAMINATED) - (codes == CONTAMINATED)
            length = lengths[clean] + 1
            self.unit = np.r_[self.unit, np.full(len(clean), index)]
            self.record = np.r_[self.record, clean]
            self.length = np.r_[self.length, length]
            self.prefix = np.r_[self.prefix, self.loaded_tokens + np.cumsum(length) - length]
            self.dirty_before = np.r_[self.dirty_before, self.dirty + dirty[clean]]
            self.loaded_tokens += int(length.sum())
            self.dirty += int((codes == CONTAMINATED).sum())

    def take(self, count: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        taken = self.unit[:count], self.record[:count], self.length[:count]
        self.unit, self.record, self.length = (
            self.unit[count:],
            self.record[count:],
            self.length[count:],
        )
        self.prefix, self.dirty_before = self.prefix[count:], self.dirty_before[count:]
        return taken


def heldout_documents(
    scratch: str, domain: list[int]
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The domain corpus's held-out documents in order, as ``(unit, record, tokens)`` arrays
    per unit (the replay corpus's held-out part is never packed)."""
    for index, lengths, codes in _records(scratch, domain):
        chosen = np.flatnonzero(codes == HELDOUT)
        yield np.full(len(chosen), index), chosen, lengths[chosen] + 1


def document_order(
    scratch: str, domain: list[int], replay: list[int], ratio: float, counts: Counter[str]
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The CPT training documents in packing order, as ``(unit, record, tokens)`` arrays per
    domain unit: after each domain document, the replay documents whose preceding replay
    tokens are below ``ratio / (1 - ratio)`` of the domain tokens so far.

    Counts: ``documents_decontaminated``, ``domain_tokens``, ``replay_documents``,
    ``replay_tokens``, ``replay_decontaminated`` (the contaminated replay documents read past
    before the last one packed: all of them when the replay corpus ran out first).
    """
    per_domain_token = ratio / (1 - ratio)
    pool = _Replay(scratch, replay)
    domain_tokens = 0
    last_dirty = 0
    wanted_more = False
    for index, lengths, codes in _records(scratch, domain):
        counts["documents_decontaminated"] += int((codes == CONTAMINATED).sum())
        clean = np.flatnonzero(codes == TRAIN_CLEAN)
        length = lengths[clean] + 1
        if not len(clean):
            continue
        reach = per_domain_token * (domain_tokens + np.cumsum(length))  # float64, as the loop
        domain_tokens += int(length.sum())
        if per_domain_token == 0:
            yield np.full(len(clean), index), clean, length
            continue
        pool.load_until(float(reach[-1]))
        after = np.searchsorted(pool.prefix, reach, side="left")  # replay taken after doc i
        taken = int(after[-1])
        if taken:
            last_dirty = int(pool.dirty_before[taken - 1])
        wanted_more = (
            pool.exhausted and taken == len(pool.length) and pool.loaded_tokens < reach[-1]
        )
        r_unit, r_record, r_length = pool.take(taken)
        # Domain document i sits after i domain and after[i-1] replay documents; replay
        # document k after the domain documents up to the first whose ``after`` exceeds k.
        before = np.r_[0, after[:-1]]
        places = np.empty(len(clean) + taken, np.int64)
        domain_at = np.arange(len(clean)) + before
        replay_at = np.searchsorted(after, np.arange(taken), side="right") + 1 + np.arange(taken)
        places[domain_at] = np.arange(len(clean))
        places[replay_at] = len(clean) + np.arange(taken)
        units = np.r_[np.full(len(clean), index), r_unit][places]
        records = np.r_[clean, r_record][places]
        tokens = np.r_[length, r_length][places]
        counts["replay_documents"] += taken
        counts["replay_tokens"] += int(r_length.sum())
        yield units, records, tokens
    counts["domain_tokens"] += domain_tokens
    # The loop read every contaminated replay document before the last one it packed, and all
    # of them when it still wanted replay tokens once the corpus ran out.
    if wanted_more:
        pool.load_until(math.inf)
        last_dirty = pool.dirty
    counts["replay_decontaminated"] += last_dirty


def chat_order(
    scratch: str, indices: list[int], seq_len: int, counts: Counter[str], code: int = TRAIN_CLEAN
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The SFT examples with pack code ``code`` (training, or ``HELDOUT``) in order, as
    ``(unit, record, tokens)`` arrays per unit, cut to ``seq_len`` (``chats_truncated``
    counted, and for training ``chats_decontaminated``)."""
    for index, lengths, codes in _records(scratch, indices):
        if code == TRAIN_CLEAN:
            counts["chats_decontaminated"] += int((codes == CONTAMINATED).sum())
        clean = np.flatnonzero((codes == code) & (lengths > 0))
        counts["chats_truncated"] += int((lengths[clean] > seq_len).sum())
        yield np.full(len(clean), index), clean, np.minimum(lengths[clean], seq_len)


class _PlanWriter:
    """Writes each task's plan file and collects the tasks."""

    def __init__(self, scratch: str, split: str, kind: Literal["documents", "chats"]) -> None:
        self.scratch, self.split, self.kind = scratch, split, kind
        self.tasks: list[ShardTask] = []
        self.shards = 0

    def write(self, pieces: list[np.ndarray], rows: int, shard_blocks: int) -> None:
        plan = np.concatenate(pieces) if pieces else np.zeros((0, 4), np.int64)
        uri = storage.join(self.scratch, "plans", f"{self.split}-{len(self.tasks):05d}.npy")
        write_array(uri, plan)
        self.tasks.append(ShardTask(self.split, self.kind, self.shards, rows, uri))
        self.shards += math.ceil(rows / shard_blocks)


def _task_shards(seq_len: int, shard_blocks: int, task_tokens: int) -> int:
    """Whole shards per task: enough for ``task_tokens`` (``data.shard_task_tokens``)."""
    return max(1, math.ceil(task_tokens / (seq_len * shard_blocks)))


def lay_out_documents(
    order: Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]],
    scratch: str,
    split: str,
    seq_len: int,
    shard_blocks: int,
    task_tokens: int,
) -> SplitLayout:
    """Cut the document stream into tasks of whole shards (the last one partial)."""
    span = _task_shards(seq_len, shard_blocks, task_tokens) * shard_blocks * seq_len
    plans = _PlanWriter(scratch, split, "documents")
    layout = SplitLayout(plans.tasks)
    task_start = 0  # stream offset of the current task's first token
    pieces: list[np.ndarray] = []
    for units, records, tokens in order:
        starts = layout.tokens + np.cumsum(tokens) - tokens
        ends = starts + tokens
        layout.records += len(tokens)
        layout.tokens += int(tokens.sum())
        while len(tokens):
            task_end = task_start + span
            inside = int(np.searchsorted(starts, task_end, side="left"))
            lo = np.maximum(task_start - starts[:inside], 0)
            hi = np.minimum(ends[:inside], task_end) - starts[:inside]
            pieces.append(np.stack([units[:inside], records[:inside], lo, hi], axis=1))
            if ends[-1] < task_end:
                break  # the task goes on in the next chunk
            plans.write(pieces, span // seq_len, shard_blocks)
            pieces, task_start = [], task_end
            # What is left: the rest of a document that crosses the edge, and every later one.
            keep = ends > task_end
            units, records, tokens = units[keep], records[keep], tokens[keep]
            starts, ends = starts[keep], ends[keep]
    if pieces:
        rows = math.ceil((layout.tokens - task_start) / seq_len)
        plans.write(pieces, rows, shard_blocks)
    return layout


def lay_out_chats(
    order: Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]],
    scratch: str,
    split: str,
    seq_len: int,
    shard_blocks: int,
    task_tokens: int,
) -> SplitLayout:
    """Best-fit windows of ``CHAT_WINDOW`` examples into rows, cut into tasks of whole shards."""
    task_rows = _task_shards(seq_len, shard_blocks, task_tokens) * shard_blocks
    plans = _PlanWriter(scratch, split, "chats")
    layout = SplitLayout(plans.tasks)
    pieces: list[np.ndarray] = []
    rows = 0  # rows of the current task
    window: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    pending = 0

    def pack_window() -> None:
        nonlocal rows, pieces
        units, records, tokens = (np.concatenate(parts) for parts in zip(*window, strict=True))
        for members in best_fit(tokens.tolist(), seq_len):
            if rows == task_rows:
                plans.write(pieces, rows, shard_blocks)
                pieces, rows = [], 0
            at = np.asarray(members, np.int64)
            row = np.full(len(at), rows)
            pieces.append(np.stack([units[at], records[at], row, tokens[at]], axis=1))
            rows += 1

    for units, records, tokens in order:
        layout.records += len(tokens)
        layout.tokens += int(tokens.sum())
        while len(tokens):
            take = CHAT_WINDOW - pending
            window.append((units[:take], records[:take], tokens[:take]))
            pending += len(tokens[:take])
            units, records, tokens = units[take:], records[take:], tokens[take:]
            if pending == CHAT_WINDOW:
                pack_window()
                window, pending = [], 0
    if pending:
        pack_window()
    if pieces:
        plans.write(pieces, rows, shard_blocks)
    return layout


def write_array(uri: str, array: np.ndarray) -> None:
    """One ``.npy`` file at ``uri`` (a plan, a unit's pack codes), local or on S3."""
    buffer = io.BytesIO()
    np.save(buffer, array)
    storage.write_bytes(uri, buffer.getvalue())


def read_plan(uri: str) -> np.ndarray:
    plan: np.ndarray = np.load(io.BytesIO(storage.read_bytes(uri)))
    return plan
