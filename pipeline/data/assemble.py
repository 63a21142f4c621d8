"""The last pass of prepare_data: selected records from the spill files into shards.

Held-out records go first, streamed by the driver into ``heldout.json`` and the held-out
shards; their token n-grams and those of ``data.eval_sets`` (the held-out ones with
``data.decontaminate_heldout``) are what training records must not share (decontamination).
Tasks then mark each unit's contaminated training records; the driver lays the training splits
out from lengths alone (documents with the replay corpus interleaved at ``data.replay_ratio``,
chats best-fit; ``layout``), and tasks write those shards in parallel (``shard_tasks``), the
bytes the sequential packers would have written.
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
from pipeline.data.pack import BlockBuffer, DocumentPacker, ExamplePacker
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
    """Write the four splits and ``heldout.json``; returns the manifest's splits part and the
    counts made here (decontaminated, truncated, replay share).

    The driver streams the held-out records into ``heldout.json`` and the held-out shards in
    ``out`` (the evaluation n-grams come from them); the training splits are laid out from
    lengths (``layout``) and written into ``data_uri`` by tasks (``shard_tasks``).
    """
    import ray

    from pipeline.data import engine

    d = cfg.data
    dtype = shards.token_dtype(len(tok))
    held_splits = ("cpt_heldout", "sft_heldout")
    writers = {s: shards.ShardWriter(out, s, d.shard_blocks, dtype) for s in held_splits}
    buffers = {
        s: BlockBuffer(d.seq_len, tok.pad_token_id, writers[s], rows=256, dtype=dtype)
        for s in held_splits
    }
    ids_of = {corpus: [j.index for j in js] for corpus, js in jobs.items()}
    counts: Counter[str] = Counter()
    decon = Decontaminator(d.decontaminate_ngram)
    heldout = HeldoutWriter(out / HELDOUT_FILE)

    doc_held = DocumentPacker(buffers["cpt_heldout"], tok.eos_token_id)
    for ids, mask, text in records(scratch, doc_sel, ids_of["domain"], HELDOUT, True):
        doc_held.add(ids)
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
    chat_held = ExamplePacker(buffers["sft_heldout"], layout.CHAT_WINDOW)
    for ids, mask, messages in records(scratch, chat_sel, ids_of["instructions"], HELDOUT, True):
        chat_held.add(ids, mask)
        if d.decontaminate_heldout:
            decon.add_eval(ids, mask)
        heldout.add(messages)
    heldout.close()
    for ids, mask, _ in records(scratch, None, ids_of["eval"], TRAIN):
        decon.add_eval(ids, mask)
    decon.freeze()
    chat_held.close()
    buffers["cpt_heldout"].close()

    resources, workers = dict(d.worker_resources), d.num_workers
    selection_of = {"domain": doc_sel, "replay": doc_sel, "instructions": chat_sel}
    units = [(i, selection_of[c]) for c in ("domain", "replay", "instructions") for i in ids_of[c]]
    banned = [ray.put(decon.banned)]  # in a list: a task resolves it, once per node

    def mark_unit(unit: tuple[int, Selection]) -> None:
        shard_tasks.mark_unit(scratch, unit[0], unit[1], d.decontaminate_ngram, ray.get(banned[0]))

    engine.map_tasks(mark_unit, units, resources, workers)
    cpt = layout.lay_out_documents(
        layout.document_order(scratch, ids_of["domain"], ids_of["replay"], d.replay_ratio, counts),
        scratch, "cpt_train", d.seq_len, d.shard_blocks, d.shard_task_tokens,
    )  # fmt: skip
    sft = layout.lay_out_chats(
        layout.chat_order(scratch, ids_of["instructions"], d.seq_len, counts),
        scratch, "sft_train", d.seq_len, d.shard_blocks, d.shard_task_tokens,
    )  # fmt: skip

    def write_shards(task: layout.ShardTask) -> dict[str, Any]:
        return shard_tasks.write_planned(
            task, scratch, data_uri, d.seq_len, tok.pad_token_id, tok.eos_token_id, dtype.name,
            d.shard_blocks,
        )  # fmt: skip

    try:
        written = engine.map_tasks(write_shards, cpt.tasks + sft.tasks, resources, workers)
    except BaseException:
        # No manifest names them: a folder of some shards and no manifest would only mislead.
        for name in storage.list_children(data_uri):
            if name.startswith(("cpt_train-", "sft_train-")):
                storage.remove(storage.join(data_uri, name))
        raise
    splits: dict[str, Any] = {}
    for name, laid in (("cpt_train", cpt), ("sft_train", sft)):
        parts = [
            w for task, w in zip(cpt.tasks + sft.tasks, written, strict=True) if task.split == name
        ]
        blocks = sum(p["blocks"] for p in parts)
        splits[name] = {
            "shards": [shard for p in parts for shard in p["shards"]],
            "blocks": blocks,
            "trained_tokens": sum(p["trained_tokens"] for p in parts),
            "dtype": dtype.name,
            "records": laid.records,
            "tokens": laid.tokens,
            "packing_efficiency": round(laid.tokens / max(1, blocks * d.seq_len), 5),
        }
    held_examples = {"cpt_heldout": doc_held.documents, "sft_heldout": chat_held.examples}
    for name in held_splits:
        entry = writers[name].close()
        entry["records"] = held_examples[name]
        entry["tokens"] = buffers[name].tokens
        entry["packing_efficiency"] = round(buffers[name].efficiency, 5)
        splits[name] = entry
    counts["chats_truncated"] += chat_held.truncated
    return {
        "format": shards.FORMAT,
        "seq_len": d.seq_len,
        "vocab_size": len(tok),
        "token_dtype": dtype.name,
        "chat_format": d.chat_format,
        "splits": {name: splits[name] for name in SPLITS},
        # Counts that stayed zero are left out, as they always were.
        "assembly": {k: v for k, v in counts.items() if v or k == "chats_truncated"},
        "decontamination": {"ngram": d.decontaminate_ngram, "eval_ngrams": len(decon.banned)},
    }
