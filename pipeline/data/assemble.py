"""The second pass of prepare_data: selected records from the spill files into shards.

Held-out records go first; the token n-grams of ``data.eval_sets`` (and of the held-out
records with ``data.decontaminate_heldout``) are what training records must not share
(decontamination). Training documents are then packed with the
replay corpus interleaved at ``data.replay_ratio``; chats are packed best-fit. Everything
streams: one unit's spill is memory-mapped at a time and blocks go to disk shard by shard.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.config import PipelineConfig
from pipeline.contract import HELDOUT_FILE, SPLITS
from pipeline.data import chunks, dedup, shards
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


class Decontaminator:
    """Flags records sharing a run of ``n`` tokens with the evaluation data."""

    def __init__(self, n: int | None) -> None:
        self.n = n
        self.parts: list[np.ndarray] = []
        self.banned = np.zeros(0, dtype=np.uint64)

    def add_eval(self, ids: np.ndarray, mask: np.ndarray) -> None:
        if self.n is not None and len(ids[mask]) >= self.n:
            self.parts.append(dedup.ngram_hashes(ids[mask], self.n))

    def freeze(self) -> None:
        if self.parts:
            self.banned = np.unique(np.concatenate(self.parts))
        self.parts = []

    def contaminated(self, ids: np.ndarray, mask: np.ndarray) -> bool:
        if self.n is None or not len(self.banned) or len(ids[mask]) < self.n:
            return False
        hashes = dedup.ngram_hashes(ids[mask], self.n)
        at = np.minimum(np.searchsorted(self.banned, hashes), len(self.banned) - 1)
        return bool((self.banned[at] == hashes).any())


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
) -> dict[str, Any]:
    """Write the four splits and ``heldout.json`` into ``out``; returns the manifest's splits
    part and the counts made here (decontaminated, truncated, replay share)."""
    d = cfg.data
    dtype = shards.token_dtype(len(tok))
    writers = {s: shards.ShardWriter(out, s, d.shard_blocks, dtype) for s in SPLITS}
    buffers = {
        s: BlockBuffer(d.seq_len, tok.pad_token_id, writers[s], rows=256, dtype=dtype)
        for s in SPLITS
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
    chat_held = ExamplePacker(buffers["sft_heldout"])
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

    domain = records(scratch, doc_sel, ids_of["domain"], TRAIN)
    replay = records(scratch, doc_sel, ids_of["replay"], TRAIN)
    cpt = _pack_cpt(
        DocumentPacker(buffers["cpt_train"], tok.eos_token_id),
        domain,
        replay,
        decon,
        d.replay_ratio,
        counts,
    )
    buffers["cpt_train"].close()
    sft = ExamplePacker(buffers["sft_train"])
    for ids, mask, _ in records(scratch, chat_sel, ids_of["instructions"], TRAIN):
        if decon.contaminated(ids, mask):
            counts["chats_decontaminated"] += 1
            continue
        sft.add(ids, mask)
    sft.close()

    examples = {"cpt_train": cpt.documents, "cpt_heldout": doc_held.documents}
    examples |= {"sft_train": sft.examples, "sft_heldout": chat_held.examples}
    splits = {}
    for name in SPLITS:
        entry = writers[name].close()
        entry["records"] = examples[name]
        entry["tokens"] = buffers[name].tokens
        entry["packing_efficiency"] = round(buffers[name].efficiency, 5)
        splits[name] = entry
    counts["chats_truncated"] = sft.truncated + chat_held.truncated
    return {
        "format": shards.FORMAT,
        "seq_len": d.seq_len,
        "vocab_size": len(tok),
        "token_dtype": dtype.name,
        "chat_format": d.chat_format,
        "splits": splits,
        "assembly": dict(counts),
        "decontamination": {"ngram": d.decontaminate_ngram, "eval_ngrams": len(decon.banned)},
    }


def _pack_cpt(
    packer: DocumentPacker,
    domain: Iterator[Item],
    replay: Iterator[Item],
    decon: Decontaminator,
    ratio: float,
    counts: Counter[str],
) -> DocumentPacker:
    """Domain documents, with replay documents interleaved until replay holds ``ratio`` of the
    tokens."""
    per_domain_token = ratio / (1 - ratio)
    for ids, mask, _ in domain:
        if decon.contaminated(ids, mask):
            counts["documents_decontaminated"] += 1
            continue
        packer.add(ids)
        counts["domain_tokens"] += len(ids) + 1
        while counts["replay_tokens"] < per_domain_token * counts["domain_tokens"]:
            item = next(replay, None)
            if item is None:
                break
            if decon.contaminated(item[0], item[1]):
                counts["replay_decontaminated"] += 1
                continue
            packer.add(item[0])
            counts["replay_tokens"] += len(item[0]) + 1
            counts["replay_documents"] += 1
    return packer
