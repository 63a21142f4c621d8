"""The last pass of prepare_data: selected records from the spill files into shards.

The driver streams the held-out records into ``heldout.json``; their token n-grams and those of
``data.eval_sets`` (the held-out ones with ``data.decontaminate_heldout``) are what training
records must not share (decontamination). Tasks mark each unit's contaminated training
records; the driver lays every split out from lengths alone (documents with the replay corpus
interleaved at ``data.replay_ratio``, chats best-fit; ``layout``), and tasks write the shards in
parallel (``shard_tasks``): the bytes the sequential packers would have written.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline import storage
from pipeline.config import PipelineConfig
from pipeline.contract import HELDOUT_FILE, SPLITS
from pipeline.data import chunks, layout, shard_tasks, shards
from pipeline.data.decontaminate import Decontaminator
from pipeline.data.select import HELDOUT, TRAIN, Selection

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

Item = tuple[np.ndarray, np.ndarray, Any]
"""Token ids, trainable mask, raw record (text or messages; None unless asked for)."""


def records(
    scratch: str,
    selection: Selection | None,
    indices: list[int],
    wanted: int,
    raw: bool = False,
) -> Iterator[Item]:
    """Records of the given units whose status is ``wanted`` (every record when no selection),
    one unit's spill at a time."""
    parts = ("ids.npy", "train.npy", "lengths.npy", "split.npy")
    for index in indices:
        with chunks.local_spill(scratch, index, parts + (("records.jsonl",) if raw else ())) as at:
            ids, mask = chunks.load_spill(at, index)
            lengths = np.load(chunks.spill_path(at, index, "lengths.npy"))
            bounds = np.concatenate([[0], np.cumsum(lengths)])
            status = None
            if selection is not None:
                split_keys = np.load(chunks.spill_path(at, index, "split.npy"))
                status = selection.status(index, split_keys)
            lines = open(chunks.spill_path(at, index, "records.jsonl")) if raw else None  # noqa: SIM115
            try:
                for i in range(len(bounds) - 1):
                    line = lines.readline() if lines else None
                    if status is not None and status[i] != wanted:
                        continue
                    lo, hi = bounds[i], bounds[i + 1]
                    yield (
                        np.array(ids[lo:hi]),  # copies: the spill may be a removed download
                        np.array(mask[lo:hi]),
                        (json.loads(line) if line else None),
                    )
            finally:
                if lines:
                    lines.close()


class HeldoutWriter:
    """Streams ``heldout.json`` (``documents``: domain texts, ``general_documents``: replay
    texts, ``chats``: message lists) to disk."""

    def __init__(self, path: Path) -> None:
        self.handle = open(path, "w")  # noqa: SIM115
        self.handle.write('{"documents": [')
        self.first = True

    def add(self, value: Any) -> None:
        self.handle.write(("" if self.first else ",\n") + json.dumps(value, ensure_ascii=False))
        self.first = False

    def next_list(self, key: str) -> None:
        self.handle.write(f'], "{key}": [')
        self.first = True

    def close(self) -> None:
        self.handle.write("]}\n")
        self.handle.close()


def assemble(
    cfg: PipelineConfig,
    tok: PreTrainedTokenizerBase,
    jobs: dict[str, list[chunks.ChunkJob]],
    doc_sel: Selection,
    chat_sel: Selection,
    scratch: str,
    out: Path,
    data_uri: str,
) -> dict[str, Any]:
    """Write ``heldout.json`` (in ``out``) and the four splits' shards (into ``data_uri``, by
    tasks); returns the manifest's splits part and the counts made here (decontaminated,
    truncated, replay share)."""
    import ray

    from pipeline.data import engine

    d = cfg.data
    dtype = shards.token_dtype(len(tok))
    ids_of = {corpus: [j.index for j in js] for corpus, js in jobs.items()}
    counts: Counter[str] = Counter()
    decon = Decontaminator(d.decontaminate_ngram)
    heldout = HeldoutWriter(out / HELDOUT_FILE)
    for ids, mask, text in records(scratch, doc_sel, ids_of["domain"], HELDOUT, True):
        if d.decontaminate_heldout:
            decon.add_eval(ids, mask)
        heldout.add(text)
    # The replay corpus's held-out part: general text for the forgetting gate, never packed.
    heldout.next_list("general_documents")
    for ids, mask, text in records(scratch, doc_sel, ids_of["replay"], HELDOUT, True):
        if d.decontaminate_heldout:
            decon.add_eval(ids, mask)
        heldout.add(text)
    heldout.next_list("chats")
    for ids, mask, messages in records(scratch, chat_sel, ids_of["instructions"], HELDOUT, True):
        if d.decontaminate_heldout:
            decon.add_eval(ids, mask)
        heldout.add(messages)
    heldout.close()
    for ids, mask, _ in records(scratch, None, ids_of["eval"], TRAIN):
        decon.add_eval(ids, mask)
    decon.freeze()

    resources, workers = dict(d.worker_resources), d.num_workers
    selection_of = {
        index: selection
        for corpus, selection in (
            ("domain", doc_sel),
            ("replay", doc_sel),
            ("instructions", chat_sel),
        )
        for index in ids_of[corpus]
    }
    banned = [ray.put(decon.banned)]  # in a list: a task resolves it, once per node

    ngram = d.decontaminate_ngram

    def mark_unit(index: int) -> None:
        shard_tasks.mark_unit(scratch, index, selection_of[index], ngram, ray.get(banned[0]))

    engine.map_tasks(mark_unit, sorted(selection_of), resources, workers)
    laid = {
        "cpt_train": layout.lay_out_documents(
            layout.document_order(
                scratch, ids_of["domain"], ids_of["replay"], d.replay_ratio, counts
            ),
            scratch, "cpt_train", d.seq_len, d.shard_blocks, d.shard_task_tokens,
        ),
        "cpt_heldout": layout.lay_out_documents(
            layout.heldout_documents(scratch, ids_of["domain"]),
            scratch, "cpt_heldout", d.seq_len, d.shard_blocks, d.shard_task_tokens,
        ),
        "sft_train": layout.lay_out_chats(
            layout.chat_order(scratch, ids_of["instructions"], d.seq_len, counts),
            scratch, "sft_train", d.seq_len, d.shard_blocks, d.shard_task_tokens,
        ),
        "sft_heldout": layout.lay_out_chats(
            layout.chat_order(
                scratch, ids_of["instructions"], d.seq_len, counts, layout.HELDOUT
            ),
            scratch, "sft_heldout", d.seq_len, d.shard_blocks, d.shard_task_tokens,
        ),
    }  # fmt: skip
    tasks = [task for name in SPLITS for task in laid[name].tasks]

    seq_len, blocks_per_shard = d.seq_len, d.shard_blocks
    pad_id, eos_id, dtype_name = tok.pad_token_id, tok.eos_token_id, dtype.name

    def write_shards(task: layout.ShardTask) -> dict[str, Any]:
        # Only plain values in the closure: it is sent to every node.
        return shard_tasks.write_planned(
            task, scratch, data_uri, seq_len, pad_id, eos_id, dtype_name, blocks_per_shard
        )

    try:
        written = engine.map_tasks(write_shards, tasks, resources, workers)
    except BaseException:
        # No manifest names them: a folder of some shards and no manifest would only mislead.
        for name in storage.list_children(data_uri):
            if name.startswith(tuple(f"{split}-" for split in SPLITS)):
                storage.remove(storage.join(data_uri, name))
        raise
    splits: dict[str, Any] = {}
    for name in SPLITS:
        parts = [w for task, w in zip(tasks, written, strict=True) if task.split == name]
        blocks = sum(p["blocks"] for p in parts)
        splits[name] = {
            "shards": [shard for p in parts for shard in p["shards"]],
            "blocks": blocks,
            "trained_tokens": sum(p["trained_tokens"] for p in parts),
            "dtype": dtype.name,
            "records": laid[name].records,
            "tokens": laid[name].tokens,
            "packing_efficiency": round(laid[name].tokens / max(1, blocks * d.seq_len), 5),
        }
    return {
        "format": shards.FORMAT,
        "seq_len": d.seq_len,
        "vocab_size": len(tok),
        "token_dtype": dtype.name,
        "chat_format": d.chat_format,
        "splits": splits,
        # Counts that stayed zero are left out, as they always were.
        "assembly": {k: v for k, v in counts.items() if v or k == "chats_truncated"},
        "decontamination": {"ngram": d.decontaminate_ngram, "eval_ngrams": len(decon.banned)},
    }
