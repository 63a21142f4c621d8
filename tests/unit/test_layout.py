"""Shards planned from lengths and written by separate tasks are the sequential packers' bytes.

Spill files are written here directly (ids, trainable mask, lengths and pack codes per unit), so
the tasks run in this process: what is tested is the plan and the task's placement, against
the packers of ``pack`` fed the same records in one pass.
"""

from __future__ import annotations

import functools
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from pipeline.data import chunks, layout, shard_tasks, shards
from pipeline.data.pack import BlockBuffer, DocumentPacker, ExamplePacker

SEQ, EOS, PAD = 16, 1, 0
Unit = tuple[np.ndarray, np.ndarray]
"""Lengths and pack codes of one synthetic unit."""


def write_unit(scratch: Path, index: int, lengths: np.ndarray, codes: np.ndarray) -> None:
    """A unit's spill: token ids that follow the unit, record and position (never EOS or
    padding), a mask with some untrained tokens, and the pack codes."""
    ids = np.concatenate(
        [np.zeros(0, np.int64)]
        + [3 + (index * 1000 + r * 7 + np.arange(n)) % 60000 for r, n in enumerate(lengths)]
    )
    mask = (np.arange(len(ids)) % 5) != 0
    for part, values in (
        ("ids.npy", ids.astype(np.int32)),
        ("train.npy", mask),
        ("lengths.npy", lengths.astype(np.int32)),
        ("pack.npy", codes.astype(np.int8)),
    ):
        np.save(chunks.spill_path(scratch, index, part), values)


@functools.cache
def _unit(scratch: Path, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    ids, mask = chunks.load_spill(scratch, index)
    lengths = np.load(chunks.spill_path(scratch, index, "lengths.npy"))
    return np.asarray(ids), np.asarray(mask), np.concatenate([[0], np.cumsum(lengths)])


def record(scratch: Path, index: int, i: int) -> tuple[np.ndarray, np.ndarray]:
    ids, mask, bounds = _unit(scratch, index)
    return ids[bounds[i] : bounds[i + 1]], mask[bounds[i] : bounds[i + 1]]


def synthetic(
    scratch: Path, first: int, units: int, rng: np.random.Generator, long: int
) -> list[int]:
    """Units of records with random lengths (1 to ``long``) and codes: mostly clean training,
    some held-out, dropped and contaminated."""
    indices = []
    for index in range(first, first + units):
        count = int(rng.integers(0, 40))
        lengths = rng.integers(1, long + 1, count)
        codes = rng.choice(
            [layout.TRAIN_CLEAN, layout.HELDOUT, layout.SKIP, layout.CONTAMINATED],
            count,
            p=[0.7, 0.1, 0.1, 0.1],
        )
        write_unit(scratch, index, lengths, codes)
        indices.append(index)
    return indices


def run_tasks(scratch: Path, out: Path, laid: layout.SplitLayout, shard_blocks: int) -> dict:
    written = [
        shard_tasks.write_planned(
            task, str(scratch), str(out), SEQ, PAD, EOS, "uint16", shard_blocks
        )
        for task in laid.tasks
    ]
    return {
        "shards": [s for w in written for s in w["shards"]],
        "blocks": sum(w["blocks"] for w in written),
        "trained_tokens": sum(w["trained_tokens"] for w in written),
        "dtype": "uint16",
    }


def sequential_documents(
    scratch: Path, out: Path, domain: list[int], replay: list[int], ratio: float, shard_blocks: int
) -> tuple[dict, Counter[str], int]:
    """The one-pass loop the plan reproduces: each domain document, then replay documents while
    replay holds less than ``ratio`` of the tokens; contaminated ones are read past."""
    writer = shards.ShardWriter(out, "cpt_train", shard_blocks, np.dtype(np.uint16))
    buffer = BlockBuffer(SEQ, PAD, writer, rows=7, dtype=np.uint16)
    packer = DocumentPacker(buffer, EOS)
    counts: Counter[str] = Counter()

    def stream(indices: list[int]):
        for index in indices:
            codes = np.load(chunks.spill_path(scratch, index, "pack.npy"))
            for i, code in enumerate(codes):
                if code in (layout.TRAIN_CLEAN, layout.CONTAMINATED):
                    yield code, record(scratch, index, i)[0]

    pool = stream(replay)
    per_domain_token = ratio / (1 - ratio)
    for code, ids in stream(domain):
        if code == layout.CONTAMINATED:
            counts["documents_decontaminated"] += 1
            continue
        packer.add(ids)
        counts["domain_tokens"] += len(ids) + 1
        while counts["replay_tokens"] < per_domain_token * counts["domain_tokens"]:
            item = next(pool, None)
            if item is None:
                break
            if item[0] == layout.CONTAMINATED:
                counts["replay_decontaminated"] += 1
                continue
            packer.add(item[1])
            counts["replay_tokens"] += len(item[1]) + 1
            counts["replay_documents"] += 1
    buffer.close()
    return writer.close(), counts, packer.documents


def shard_bytes(folder: Path, entry: dict) -> list[bytes]:
    return [(folder / name).read_bytes() for s in entry["shards"] for name in s["files"].values()]


@pytest.mark.parametrize(
    ("ratio", "shard_blocks", "task_tokens", "long"),
    [
        (0.0, 3, 1, 40),  # a task per shard; documents longer than a row
        (0.25, 2, 50, 12),  # tasks of two shards, cut inside documents
        (0.6, 4, 10**6, 70),  # one task; documents longer than a shard
        (0.4, 1, 17, 5),  # a task per one-row shard
    ],
)
def test_planned_documents_are_the_sequential_bytes(
    tmp_path: Path, ratio: float, shard_blocks: int, task_tokens: int, long: int
) -> None:
    rng = np.random.default_rng(int(ratio * 100) + shard_blocks)
    scratch, planned, sequential = (tmp_path / n for n in ("scratch", "planned", "sequential"))
    for folder in (scratch, planned, sequential):
        folder.mkdir()
    domain = synthetic(scratch, 0, 6, rng, long)
    replay = synthetic(scratch, 6, 4, rng, long)
    counts: Counter[str] = Counter()
    order = layout.document_order(str(scratch), domain, replay, ratio, counts)
    laid = layout.lay_out_documents(
        order, str(scratch), "cpt_train", SEQ, shard_blocks, task_tokens
    )
    got = run_tasks(scratch, planned, laid, shard_blocks)

    want, want_counts, documents = sequential_documents(
        scratch, sequential, domain, replay, ratio, shard_blocks
    )
    assert got == want  # the manifest entries: files, blocks, trained tokens, checksums
    assert shard_bytes(planned, got) == shard_bytes(sequential, want)
    assert +counts == +want_counts
    assert laid.records == documents
    assert laid.tokens == want_counts["domain_tokens"] + want_counts["replay_tokens"]
    if task_tokens < shard_blocks * SEQ * 3:
        assert len(laid.tasks) > 3  # the cases that cut tasks did cut them
    if ratio:
        assert counts["replay_documents"] > 0 and counts["replay_decontaminated"] > 0


def test_planned_chats_are_the_sequential_bytes_across_windows_and_units(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    scratch, planned, sequential = (tmp_path / n for n in ("scratch", "planned", "sequential"))
    for folder in (scratch, planned, sequential):
        folder.mkdir()
    indices = []
    # More examples than a best-fit window, some longer than a row (cut), some empty.
    for index in range(5):
        count = 1900
        lengths = rng.integers(1, SEQ + 6, count)
        lengths[::97] = 0
        codes = rng.choice(
            [layout.TRAIN_CLEAN, layout.HELDOUT, layout.CONTAMINATED], count, p=[0.8, 0.1, 0.1]
        )
        write_unit(scratch, index, lengths, codes)
        indices.append(index)
    counts: Counter[str] = Counter()
    order = layout.chat_order(str(scratch), indices, SEQ, counts)
    laid = layout.lay_out_chats(order, str(scratch), "sft_train", SEQ, 64, 64 * SEQ)
    got = run_tasks(scratch, planned, laid, 64)

    writer = shards.ShardWriter(sequential, "sft_train", 64, np.dtype(np.uint16))
    packer = ExamplePacker(
        BlockBuffer(SEQ, PAD, writer, rows=256, dtype=np.uint16), layout.CHAT_WINDOW
    )
    decontaminated = 0
    for index in indices:
        for i, code in enumerate(np.load(chunks.spill_path(scratch, index, "pack.npy"))):
            if code == layout.CONTAMINATED:
                decontaminated += 1
            elif code == layout.TRAIN_CLEAN:
                packer.add(*record(scratch, index, i))
    packer.close()
    want = writer.close()

    assert got == want
    assert shard_bytes(planned, got) == shard_bytes(sequential, want)
    assert len(laid.tasks) > 10 and laid.records == packer.examples > layout.CHAT_WINDOW
    assert counts["chats_truncated"] == packer.truncated > 0
    assert counts["chats_decontaminated"] == decontaminated


def test_a_task_that_writes_other_blocks_than_its_plan_fails(tmp_path: Path) -> None:
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    write_unit(scratch, 0, np.array([10, 20, 30]), np.full(3, layout.TRAIN_CLEAN))
    order = layout.document_order(str(scratch), [0], [], 0.0, Counter())
    [task] = layout.lay_out_documents(order, str(scratch), "cpt_train", SEQ, 8, 10**6).tasks
    # The spill changed after planning (a rerun's unit under an old plan): refused, not packed.
    write_unit(scratch, 0, np.array([10, 20, 5]), np.full(3, layout.TRAIN_CLEAN))
    with pytest.raises(RuntimeError, match="wrote 3 blocks, its plan 4"):
        shard_tasks.write_planned(task, str(scratch), str(tmp_path), SEQ, PAD, EOS, "uint16", 8)


def test_heldout_splits_are_laid_out_from_the_heldout_codes_alone(tmp_path: Path) -> None:
    rng = np.random.default_rng(11)
    scratch, planned, sequential = (tmp_path / n for n in ("scratch", "planned", "sequential"))
    for folder in (scratch, planned, sequential):
        folder.mkdir()
    indices = synthetic(scratch, 0, 5, rng, 30)
    laid = layout.lay_out_documents(
        layout.heldout_documents(str(scratch), indices), str(scratch), "cpt_heldout", SEQ, 2, 40
    )
    got = run_tasks(scratch, planned, laid, 2)
    writer = shards.ShardWriter(sequential, "cpt_heldout", 2, np.dtype(np.uint16))
    buffer = BlockBuffer(SEQ, PAD, writer, rows=5, dtype=np.uint16)
    packer = DocumentPacker(buffer, EOS)
    for index in indices:
        for i in np.flatnonzero(
            np.load(chunks.spill_path(scratch, index, "pack.npy")) == layout.HELDOUT
        ):
            packer.add(record(scratch, index, i)[0])
    buffer.close()
    want = writer.close()
    assert got == want and shard_bytes(planned, got) == shard_bytes(sequential, want)
    assert laid.records == packer.documents > 0 and len(laid.tasks) > 1

    counts: Counter[str] = Counter()
    chats = layout.lay_out_chats(
        layout.chat_order(str(scratch), indices, SEQ, counts, layout.HELDOUT),
        str(scratch), "sft_heldout", SEQ, 4, 10**6,
    )  # fmt: skip
    held = sum(
        int((np.load(chunks.spill_path(scratch, i, "pack.npy")) == layout.HELDOUT).sum())
        for i in indices
    )
    assert chats.records == held and "chats_decontaminated" not in counts
