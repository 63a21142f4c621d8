"""Pack token sequences into fixed-length blocks without cross-document attention.

Each block carries ``position_ids`` that restart at 0 for every document. The attention
backends read those restarts as document boundaries (flash-attention's varlen path, and a
block-diagonal causal mask for sdpa/eager), so a token never attends to another document.
The label of a document's first token is masked because the model would otherwise be trained
to predict it from the previous document's last token. Padding is its own segment.

Blocks are built as token ids plus one flag byte per token (``FLAG_START``: a segment starts
here; ``FLAG_TRAIN``: the token is its own label). Positions and labels derive from the flags,
so shards store 3 bytes per token (with 16-bit ids) and memory stays bounded by one buffer of
rows, whatever the corpus size.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.data.chat import IGNORE_INDEX

FLAG_START = 1
FLAG_TRAIN = 2
RowSink = Callable[[np.ndarray, np.ndarray], None]
"""Receives full rows: ``(ids [k, seq_len], flags [k, seq_len])``."""


def derive_positions(flags: np.ndarray) -> np.ndarray:
    """Position ids (int32): the distance to the last segment start in the row."""
    index = np.broadcast_to(np.arange(flags.shape[-1], dtype=np.int32), flags.shape)
    starts = np.where(flags & FLAG_START, index, 0)
    return (index - np.maximum.accumulate(starts, axis=-1)).astype(np.int32)


def derive_labels(ids: np.ndarray, flags: np.ndarray) -> np.ndarray:
    """Labels (int32): the token where ``FLAG_TRAIN`` is set, ``IGNORE_INDEX`` elsewhere."""
    return np.where(flags & FLAG_TRAIN, ids.astype(np.int32), np.int32(IGNORE_INDEX))


class BlockColumn:
    """One column (``input_ids``, ``position_ids`` or ``labels``) of blocks stored as shards of
    ids and flags (memory-mapped); rows are read and derived only when indexed."""

    def __init__(self, shards: list[tuple[np.ndarray, np.ndarray]], column: str) -> None:
        self.shards, self.column = shards, column
        counts = [len(ids) for ids, _ in shards]
        self.bounds = np.cumsum([0, *counts])
        width = shards[0][0].shape[1] if shards else 0
        self.shape = (int(self.bounds[-1]), int(width))
        self.dtype = np.dtype(np.int32)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index: Any) -> np.ndarray:
        if isinstance(index, slice):
            rows = np.arange(self.shape[0])[index]
        elif np.isscalar(index):
            return self[np.asarray([index])][0]
        else:
            rows = np.asarray(index, dtype=np.int64).reshape(-1)
        rows = np.where(rows < 0, rows + self.shape[0], rows)
        if len(rows) and (rows.min() < 0 or rows.max() >= self.shape[0]):
            raise IndexError(f"block index out of range for {self.shape[0]} blocks")
        out = np.empty((len(rows), self.shape[1]), dtype=np.int32)
        shard_of = np.searchsorted(self.bounds, rows, side="right") - 1
        for shard in np.unique(shard_of):
            picked = np.flatnonzero(shard_of == shard)
            local = rows[picked] - self.bounds[shard]
            ids, flags = self.shards[shard]
            if self.column == "input_ids":
                out[picked] = ids[local]
            elif self.column == "position_ids":
                out[picked] = derive_positions(flags[local])
            else:
                out[picked] = derive_labels(ids[local], flags[local])
        return out


@dataclass
class PackedBlocks:
    """``[n_blocks, seq_len]`` integer arrays: numpy arrays in memory, or ``BlockColumn`` views
    of memory-mapped shards (indexing with an index array returns int32 numpy rows)."""

    input_ids: np.ndarray | BlockColumn
    position_ids: np.ndarray | BlockColumn
    labels: np.ndarray | BlockColumn
    known_trained_tokens: int | None = None
    """Set for shards (from the manifest), so counting needs no pass over the data."""

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def trained_tokens(self) -> int:
        if self.known_trained_tokens is not None:
            return self.known_trained_tokens
        assert isinstance(self.labels, np.ndarray)
        return int((self.labels != IGNORE_INDEX).sum())


class BlockBuffer:
    """Fills rows of ids and flags segment by segment; full batches of rows go to ``sink``."""

    def __init__(
        self, seq_len: int, pad_id: int, sink: RowSink, rows: int = 256, dtype: Any = np.int32
    ) -> None:
        self.seq_len, self.pad_id, self.sink = seq_len, pad_id, sink
        self.ids = np.full((rows, seq_len), pad_id, dtype=dtype)
        self.flags = np.zeros((rows, seq_len), dtype=np.uint8)
        self.row = self.col = 0
        self.blocks = 0
        self.tokens = 0
        """Non-padding tokens placed."""
        self.trained = 0

    def room(self) -> int:
        return self.seq_len - self.col

    def put(self, ids: np.ndarray, trainable: np.ndarray | None = None) -> None:
        """Place one segment in the current row (it must fit); its first label is masked."""
        n = len(ids)
        assert 0 < n <= self.room()
        span = slice(self.col, self.col + n)
        self.ids[self.row, span] = ids
        flags = self.flags[self.row, span]
        flags[:] = FLAG_TRAIN if trainable is None else np.where(trainable, FLAG_TRAIN, 0)
        flags[0] = FLAG_START
        self.trained += int(np.count_nonzero(flags == FLAG_TRAIN))
        self.col += n
        self.tokens += n

    def end_row(self) -> None:
        """Pad the current row (padding is a segment of its own) and start the next."""
        if self.col == 0:
            return
        if self.col < self.seq_len:
            self.flags[self.row, self.col] = FLAG_START
        self.row, self.col = self.row + 1, 0
        self.blocks += 1
        if self.row == len(self.ids):
            self.flush()

    def flush(self) -> None:
        if self.row:
            self.sink(self.ids[: self.row].copy(), self.flags[: self.row].copy())
        self.ids.fill(self.pad_id)
        self.flags.fill(0)
        self.row = 0

    def close(self) -> None:
        self.end_row()
        self.flush()

    @property
    def efficiency(self) -> float:
        """Non-padding share of all token slots written."""
        return self.tokens / max(1, self.blocks * self.seq_len)


class DocumentPacker:
    """Concatenates documents, each followed by EOS, into blocks for causal-LM training.

    A document longer than the room left is split across blocks; its continuation restarts
    positions at 0 and its first label is masked, like a new document.
    """

    def __init__(self, buffer: BlockBuffer, eos_id: int) -> None:
        self.buffer, self.eos_id = buffer, eos_id
        self.documents = 0

    def add(self, tokens: np.ndarray | list[int]) -> None:
        self.documents += 1
        self.add_piece(np.append(np.asarray(tokens, dtype=np.int64), self.eos_id))

    def add_piece(self, rest: np.ndarray) -> None:
        """Tokens of a document, EOS included, from where it starts or from the first token
        of a row (a document that began in an earlier shard task)."""
        while len(rest):
            if self.buffer.room() == 0:
                self.buffer.end_row()
            take = self.buffer.room()
            self.buffer.put(rest[:take])
            rest = rest[take:]


class ExamplePacker:
    """Packs chat examples whole (never split) with best-fit decreasing over a window of
    ``window`` examples, so short examples fill the room long ones leave.

    An example longer than ``seq_len`` is cut to ``seq_len`` tokens and counted in ``truncated``.
    """

    def __init__(self, buffer: BlockBuffer, window: int = 4096) -> None:
        self.buffer, self.window = buffer, window
        self.pending: list[tuple[np.ndarray, np.ndarray]] = []
        self.truncated = 0
        self.examples = 0

    def add(self, ids: np.ndarray | list[int], trainable: np.ndarray | list[bool]) -> None:
        ids_arr, mask = np.asarray(ids, dtype=np.int64), np.asarray(trainable, dtype=bool)
        if len(ids_arr) == 0:
            return
        if len(ids_arr) > self.buffer.seq_len:
            ids_arr, mask = ids_arr[: self.buffer.seq_len], mask[: self.buffer.seq_len]
            self.truncated += 1
        self.examples += 1
        self.pending.append((ids_arr, mask))
        if len(self.pending) >= self.window:
            self._pack_pending()

    def close(self) -> None:
        self._pack_pending()
        self.buffer.close()

    def _pack_pending(self) -> None:
        for members in best_fit([len(ids) for ids, _ in self.pending], self.buffer.seq_len):
            self.buffer.end_row()
            for i in members:
                self.buffer.put(*self.pending[i])
        self.buffer.end_row()
        self.pending = []


def best_fit(sizes: list[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing: bins of item indices (each bin's sizes sum to at most
    ``capacity``), in the order they were opened. Ties go to the earlier item and bin, so the
    bins depend on the sizes alone (``layout`` plans shards with it)."""
    order = sorted(range(len(sizes)), key=lambda i: -sizes[i])
    bins: list[list[int]] = []
    rooms: list[tuple[int, int]] = []  # (room left, bin), sorted
    for i in order:
        size = sizes[i]
        at = bisect.bisect_left(rooms, (size, -1))
        if at < len(rooms):
            room, chosen = rooms.pop(at)
            bins[chosen].append(i)
            bisect.insort(rooms, (room - size, chosen))
        else:
            bins.append([i])
            bisect.insort(rooms, (capacity - size, len(bins) - 1))
    return bins


class _Collect:
    def __init__(self) -> None:
        self.parts: list[tuple[np.ndarray, np.ndarray]] = []

    def __call__(self, ids: np.ndarray, flags: np.ndarray) -> None:
        self.parts.append((ids, flags))

    def blocks(self, seq_len: int) -> PackedBlocks:
        if not self.parts:
            empty = np.zeros((0, seq_len), dtype=np.int32)
            return PackedBlocks(empty, empty.copy(), empty.copy())
        ids = np.concatenate([p[0] for p in self.parts]).astype(np.int32)
        flags = np.concatenate([p[1] for p in self.parts])
        return PackedBlocks(ids, derive_positions(flags), derive_labels(ids, flags))


def pack_documents(
    docs: Iterable[list[int] | np.ndarray], seq_len: int, eos_id: int, pad_id: int
) -> PackedBlocks:
    """Pack documents in memory (see ``DocumentPacker``); int32 arrays."""
    collect = _Collect()
    buffer = BlockBuffer(seq_len, pad_id, collect)
    packer = DocumentPacker(buffer, eos_id)
    for doc in docs:
        packer.add(doc)
    buffer.close()
    return collect.blocks(seq_len)


def pack_examples(
    examples: Iterable[tuple[list[int], list[int]]], seq_len: int, pad_id: int, window: int = 4096
) -> tuple[PackedBlocks, int]:
    """Pack chat examples in memory (see ``ExamplePacker``); returns blocks and how many were
    truncated. Labels must be the token itself or ``IGNORE_INDEX``."""
    collect = _Collect()
    packer = ExamplePacker(BlockBuffer(seq_len, pad_id, collect), window)
    for ids, labels in examples:
        packer.add(ids, np.asarray(labels) != IGNORE_INDEX)
    packer.close()
    return collect.blocks(seq_len), packer.truncated
