"""Pack token sequences into fixed-length blocks without cross-document attention.

Each block carries ``position_ids`` that restart at 0 for every document. The attention
backends read those restarts as document boundaries (flash-attention's varlen path, and a
block-diagonal causal mask for sdpa/eager), so a token never attends to another document.
The label of a document's first token is masked because the model would otherwise be trained
to predict it from the previous document's last token.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from pipeline.data.chat import IGNORE_INDEX


@dataclass
class PackedBlocks:
    """``[n_blocks, seq_len]`` int32 arrays."""

    input_ids: np.ndarray
    position_ids: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def trained_tokens(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())


class _BlockWriter:
    """Accumulates (ids, labels) segments into blocks, each segment with positions from 0."""

    def __init__(self, seq_len: int, pad_id: int) -> None:
        self.seq_len, self.pad_id = seq_len, pad_id
        self.ids: list[int] = []
        self.pos: list[int] = []
        self.labels: list[int] = []
        self.blocks: list[tuple[list[int], list[int], list[int]]] = []

    def room(self) -> int:
        return self.seq_len - len(self.ids)

    def add(self, ids: list[int], labels: list[int]) -> None:
        assert len(ids) <= self.room()
        self.ids += ids
        self.pos += list(range(len(ids)))
        self.labels += labels

    def flush(self) -> None:
        if not self.ids:
            return
        pad = self.room()
        # Padding is its own segment (positions from 0) so it never joins a real document.
        self.add([self.pad_id] * pad, [IGNORE_INDEX] * pad)
        self.blocks.append((self.ids, self.pos, self.labels))
        self.ids, self.pos, self.labels = [], [], []

    def result(self) -> PackedBlocks:
        self.flush()
        if not self.blocks:
            empty = np.zeros((0, self.seq_len), dtype=np.int32)
            return PackedBlocks(empty, empty.copy(), empty.copy())
        ids, pos, labels = (
            np.asarray(col, dtype=np.int32) for col in zip(*self.blocks, strict=True)
        )
        return PackedBlocks(ids, pos, labels)


def pack_documents(
    docs: Iterable[list[int]], seq_len: int, eos_id: int, pad_id: int
) -> PackedBlocks:
    """Concatenate documents (each followed by EOS) into blocks for causal-LM training.

    A document longer than the room left is split across blocks; its continuation restarts
    positions at 0 and its first label is masked, like a new document.
    """
    writer = _BlockWriter(seq_len, pad_id)
    for doc in docs:
        tokens = [*doc, eos_id]
        while tokens:
            if writer.room() == 0:
                writer.flush()
            piece, tokens = tokens[: writer.room()], tokens[writer.room() :]
            writer.add(piece, [IGNORE_INDEX, *piece[1:]])
    return writer.result()


def pack_examples(
    examples: Iterable[tuple[list[int], list[int]]], seq_len: int, pad_id: int
) -> tuple[PackedBlocks, int]:
    """Pack chat examples whole (never split) into blocks; returns blocks and how many were truncated.

    An example longer than ``seq_len`` is cut to ``seq_len`` tokens and counted.
    """
    writer = _BlockWriter(seq_len, pad_id)
    truncated = 0
    for ids, labels in examples:
        if len(ids) > seq_len:
            ids, labels = ids[:seq_len], labels[:seq_len]
            truncated += 1
        if len(ids) > writer.room():
            writer.flush()
        writer.add(ids, [IGNORE_INDEX, *labels[1:]])
    return writer.result(), truncated
