"""Packing: documents and chat examples into fixed blocks with per-document positions."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pytest

from pipeline.data.chat import IGNORE_INDEX, tokenize_chat
from pipeline.data.pack import (
    BlockBuffer,
    DocumentPacker,
    PackedBlocks,
    pack_documents,
    pack_examples,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

EOS, PAD = 1, 2
M = IGNORE_INDEX


# --- pack_documents ----------------------------------------------------------------------


def test_two_documents_and_padding_in_one_block() -> None:
    blocks = pack_documents([[10, 11, 12], [20, 21]], seq_len=8, eos_id=EOS, pad_id=PAD)
    assert len(blocks) == 1
    assert blocks.input_ids.tolist() == [[10, 11, 12, EOS, 20, 21, EOS, PAD]]
    # Positions restart per document, and the padding is a segment of its own.
    assert blocks.position_ids.tolist() == [[0, 1, 2, 3, 0, 1, 2, 0]]
    # First token of each document masked (it would be predicted from the previous document).
    assert blocks.labels.tolist() == [[M, 11, 12, EOS, M, 21, EOS, M]]
    assert blocks.trained_tokens == 5


def test_arrays_are_int32_with_shape_blocks_by_seq_len() -> None:
    blocks = pack_documents([[5] * 7, [6] * 7, [7] * 3], seq_len=8, eos_id=EOS, pad_id=PAD)
    for array in (blocks.input_ids, blocks.position_ids, blocks.labels):
        assert array.dtype == np.int32
        assert array.shape == (3, 8)


def test_long_document_is_split_and_its_continuations_restart() -> None:
    doc = list(range(10, 20))  # 10 tokens + EOS = 11 tokens over blocks of 4
    blocks = pack_documents([doc], seq_len=4, eos_id=EOS, pad_id=PAD)
    assert blocks.input_ids.tolist() == [
        [10, 11, 12, 13],
        [14, 15, 16, 17],
        [18, 19, EOS, PAD],
    ]
    assert blocks.position_ids.tolist() == [[0, 1, 2, 3], [0, 1, 2, 3], [0, 1, 2, 0]]
    assert blocks.labels.tolist() == [
        [M, 11, 12, 13],
        [M, 15, 16, 17],
        [M, 19, EOS, M],
    ]
    assert blocks.trained_tokens == 8


def test_a_document_that_fills_the_block_exactly_needs_no_padding() -> None:
    blocks = pack_documents([[3, 4, 5], [6, 7, 8]], seq_len=4, eos_id=EOS, pad_id=PAD)
    assert blocks.input_ids.tolist() == [[3, 4, 5, EOS], [6, 7, 8, EOS]]
    assert blocks.position_ids.tolist() == [[0, 1, 2, 3], [0, 1, 2, 3]]
    assert blocks.labels.tolist() == [[M, 4, 5, EOS], [M, 7, 8, EOS]]


def test_trained_tokens_counted_by_hand() -> None:
    # seq_len 6: [a a a a E | b b] -> block 1 = a a a a E b, block 2 = b E c E pad pad
    docs = [[30, 31, 32, 33], [40, 41], [50]]
    blocks = pack_documents(docs, seq_len=6, eos_id=EOS, pad_id=PAD)
    assert blocks.input_ids.tolist() == [[30, 31, 32, 33, EOS, 40], [41, EOS, 50, EOS, PAD, PAD]]
    assert blocks.position_ids.tolist() == [[0, 1, 2, 3, 4, 0], [0, 1, 0, 1, 0, 1]]
    assert blocks.labels.tolist() == [[M, 31, 32, 33, EOS, M], [M, EOS, M, EOS, M, M]]
    # Doc a: 4 of 5; doc b: split into [40] and [41, E] -> 0 + 1; doc c: 1 of 2.
    assert blocks.trained_tokens == 4 + 1 + 1


def test_every_document_is_followed_by_eos_and_nothing_is_lost() -> None:
    docs = [list(range(100, 100 + n)) for n in (3, 9, 1, 14, 5)]
    blocks = pack_documents(docs, seq_len=8, eos_id=EOS, pad_id=PAD)
    flat = blocks.input_ids.reshape(-1).tolist()
    assert [t for t in flat if t != PAD] == [t for d in docs for t in [*d, EOS]]
    assert flat.count(EOS) == len(docs)
    # Padding is never trained.
    assert (blocks.labels[blocks.input_ids == PAD] == IGNORE_INDEX).all()


def test_no_documents_gives_zero_blocks_of_the_right_width() -> None:
    blocks = pack_documents([], seq_len=16, eos_id=EOS, pad_id=PAD)
    assert len(blocks) == 0
    assert blocks.input_ids.shape == (0, 16)
    assert blocks.trained_tokens == 0


def test_real_tokenized_documents(
    tokenizer: PreTrainedTokenizerBase, domain_texts: list[str]
) -> None:
    docs = tokenizer(domain_texts[:20], add_special_tokens=False)["input_ids"]
    blocks = pack_documents(docs, 64, tokenizer.eos_token_id, tokenizer.pad_token_id)
    total = sum(len(d) + 1 for d in docs)
    # Every block starts a segment at position 0; positions step by 1 inside a segment.
    assert (blocks.position_ids[:, 0] == 0).all()
    steps = np.diff(blocks.position_ids, axis=1)
    starts = blocks.position_ids[:, 1:] == 0
    assert ((steps == 1) | starts).all()
    # Every segment start (document, continuation or padding) has a masked label.
    assert (blocks.labels[blocks.position_ids == 0] == IGNORE_INDEX).all()
    n_segment_starts = int((blocks.position_ids == 0).sum())
    n_pad = int((blocks.input_ids == tokenizer.pad_token_id).sum())
    n_pad_segments = int(
        ((blocks.input_ids == tokenizer.pad_token_id) & (blocks.position_ids == 0)).sum()
    )
    assert blocks.trained_tokens == total - (n_segment_starts - n_pad_segments)
    assert blocks.input_ids.size == total + n_pad
    assert n_pad < 64


# --- pack_examples -----------------------------------------------------------------------


def test_examples_are_packed_best_fit_and_never_split() -> None:
    examples = [
        ([5, 6, 7], [M, M, 7]),
        ([8, 9, 10, 11], [M, 9, 10, 11]),
        ([12, 13], [M, 13]),
    ]
    blocks, truncated = pack_examples(examples, seq_len=6, pad_id=PAD)
    assert truncated == 0
    # Longest first; the 2-token example fills the room the 4-token one leaves.
    assert blocks.input_ids.tolist() == [[8, 9, 10, 11, 12, 13], [5, 6, 7, PAD, PAD, PAD]]
    assert blocks.position_ids.tolist() == [[0, 1, 2, 3, 0, 1], [0, 1, 2, 0, 1, 2]]
    assert blocks.labels.tolist() == [[M, 9, 10, 11, M, 13], [M, M, 7, M, M, M]]
    assert blocks.trained_tokens == 5


def test_first_label_of_each_example_is_masked_even_when_trainable() -> None:
    blocks, _ = pack_examples([([5, 6], [5, 6]), ([7, 8], [7, 8])], seq_len=4, pad_id=PAD)
    assert blocks.labels.tolist() == [[M, 6, M, 8]]


def test_long_examples_are_truncated_and_counted() -> None:
    examples = [
        (list(range(20, 30)), list(range(20, 30))),  # 10 tokens > 6
        ([1, 2], [M, 2]),
        (list(range(40, 47)), [M] * 7),  # 7 tokens > 6
    ]
    blocks, truncated = pack_examples(examples, seq_len=6, pad_id=PAD)
    assert truncated == 2
    assert blocks.input_ids.tolist() == [
        [20, 21, 22, 23, 24, 25],
        [40, 41, 42, 43, 44, 45],
        [1, 2, PAD, PAD, PAD, PAD],
    ]
    assert blocks.labels.tolist() == [[M, 21, 22, 23, 24, 25], [M] * 6, [M, 2, M, M, M, M]]
    assert blocks.trained_tokens == 6


def _segments(blocks: PackedBlocks) -> list[list[int]]:
    """Attention spans: runs of a row from one position-0 to the next."""
    spans = []
    for ids, pos in zip(blocks.input_ids.tolist(), blocks.position_ids.tolist(), strict=True):
        for i, p in enumerate(pos):
            if p == 0:
                spans.append([])
            spans[-1].append(ids[i])
    return spans


@pytest.mark.parametrize("seed", range(25))
def test_property_examples_never_share_a_span_and_no_token_is_lost(seed: int) -> None:
    rng = np.random.default_rng(seed)
    seq_len = int(rng.integers(8, 64))
    examples = []
    for k in range(int(rng.integers(1, 60))):
        n = int(rng.integers(1, seq_len + 1))
        ids = [1000 * (k + 1) + i for i in range(n)]  # ids name their example
        labels = [t if rng.random() < 0.5 else M for t in ids]
        examples.append((ids, labels))
    blocks, truncated = pack_examples(examples, seq_len, PAD, window=int(rng.integers(1, 20)))
    assert truncated == 0
    spans = [s for s in _segments(blocks) if s[0] != PAD]
    # Each attention span is exactly one example: none mixed, none split, none lost.
    assert sorted(map(tuple, spans)) == sorted(tuple(ids) for ids, _ in examples)
    trained = sorted(t for t in blocks.labels.reshape(-1).tolist() if t != M)
    assert trained == sorted(t for ids, labels in examples for t in labels[1:] if t != M)


@pytest.mark.parametrize("seed", range(25))
def test_property_documents_lose_no_token_and_positions_restart(seed: int) -> None:
    rng = np.random.default_rng(seed)
    seq_len = int(rng.integers(4, 40))
    docs = [[1000 * (k + 1) + i for i in range(int(rng.integers(1, 90)))] for k in range(20)]
    blocks = pack_documents(docs, seq_len, EOS, PAD)
    flat = blocks.input_ids.reshape(-1).tolist()
    assert [t for t in flat if t != PAD] == [t for d in docs for t in [*d, EOS]]
    for span in _segments(blocks):
        owners = {t // 1000 for t in span if t not in (EOS, PAD)}
        assert len(owners) <= 1  # a span never holds two documents


def test_sft_labels_cover_every_answer_token_and_end_of_turn_and_no_prompt(
    tokenizer: PreTrainedTokenizerBase,
) -> None:
    chat = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Where is my order?"},
        {"role": "assistant", "content": "On its way."},
        {"role": "user", "content": "And the refund?"},
        {"role": "assistant", "content": "Issued today."},
    ]
    ids, labels = tokenize_chat(chat, tokenizer, "chatml")
    blocks, _ = pack_examples([(ids, labels)], seq_len=len(ids) + 3, pad_id=PAD)
    trained = [t for t in blocks.labels[0].tolist() if t != M]
    expected = tokenizer("On its way.<|im_end|>", add_special_tokens=False)["input_ids"]
    expected += tokenizer("Issued today.<|im_end|>", add_special_tokens=False)["input_ids"]
    assert trained == expected
    assert tokenizer.decode(trained) == "On its way.<|im_end|>Issued today.<|im_end|>"


def test_buffered_packer_reports_efficiency() -> None:
    rows: list[np.ndarray] = []
    buffer = BlockBuffer(8, PAD, lambda ids, flags: rows.append(ids), rows=2)
    packer = DocumentPacker(buffer, EOS)
    for doc in ([1, 2, 3], [4, 5, 6, 7, 8, 9, 10, 11, 12]):
        packer.add(doc)
    buffer.close()
    assert sum(len(r) for r in rows) == 2
    assert buffer.tokens == 14 and buffer.efficiency == 14 / 16


def test_packed_chats_keep_exactly_the_answer_tokens(tokenizer: PreTrainedTokenizerBase) -> None:
    chat = [
        {"role": "user", "content": "Where is my order?"},
        {"role": "assistant", "content": "It is on its way."},
    ]
    ids, labels = tokenize_chat(chat, tokenizer, "chatml")
    blocks, truncated = pack_examples([(ids, labels)] * 3, seq_len=2 * len(ids) + 1, pad_id=2)
    assert truncated == 0
    assert len(blocks) == 2  # two examples fit in the first block, the third gets its own
    trained = blocks.labels[blocks.labels != IGNORE_INDEX].tolist()
    answer = [label for label in labels if label != IGNORE_INDEX]
    assert trained == answer * 3
    assert tokenizer.decode(answer) == "It is on its way.<|im_end|>"
