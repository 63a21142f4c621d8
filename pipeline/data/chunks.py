"""One worker's job: read a unit of input, validate, clean, scrub, tokenize and sign it.

Runs in a worker process. Token ids go to spill files in a scratch folder (the driver packs
them later, memory-mapped); only small per-record metadata comes back: exact-duplicate keys,
MinHash signatures, held-out split keys and token counts. Bad records go to a quarantine part file.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from pipeline.config import RecordFields
from pipeline.data import chat, dedup, ingest, sources
from pipeline.data.clean import split_long_document
from pipeline.data.pii import DEFAULT_PHONE_REGIONS, PII_TYPES, PiiScrubber

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

Kind = Literal["documents", "chats", "eval"]
_BATCH = 512
_BATCH_CHARS = 8_000_000
"""A batch is encoded when it holds ``_BATCH`` records or this many characters (memory)."""


@dataclass(frozen=True)
class ChunkSettings:
    """The parts of the data config a worker needs (plain data: crosses process boundaries)."""

    tokenizer_dir: str
    scratch: str
    fields: RecordFields
    chat_format: chat.ChatFormat
    scrub_pii: bool
    pii_patterns: dict[str, str]
    min_chars: int
    max_doc_chars: int
    long_doc_action: str
    max_record_bytes: int = sources.MAX_RECORD_BYTES
    pii_types: tuple[str, ...] = PII_TYPES
    pii_placeholders: dict[str, str] = field(default_factory=dict)
    phone_regions: tuple[str, ...] = DEFAULT_PHONE_REGIONS


@dataclass(frozen=True)
class ChunkJob:
    index: int
    """Global unit order; names the spill files."""
    unit: sources.WorkUnit
    kind: Kind
    settings: ChunkSettings


@dataclass
class ChunkResult:
    index: int
    lines: int
    """Lines in the unit (JSONL), to make later units' line numbers absolute."""
    bytes: int
    counts: Counter[str] = field(default_factory=Counter)
    """read, bad, too_short, long_split, long_pieces, long_dropped, kept, tokens."""
    bad: Counter[str] = field(default_factory=Counter)
    pii: Counter[str] = field(default_factory=Counter)
    exact: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))
    signatures: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.uint32))
    """MinHash signatures ``[n, NUM_PERM]`` (32 bits per slot: 512 bytes per record)."""
    split_keys: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint32))
    lengths: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))


def spill_path(scratch: str, index: int, part: str) -> Path:
    return Path(scratch) / f"{index:06d}.{part}"


def warm_up() -> None:
    """Import what encoding needs (transformers' tokenizer classes: a second) before the first
    unit."""
    import transformers.tokenization_utils_tokenizers  # noqa: F401


@lru_cache(maxsize=2)
def _tokenizer(path: str) -> PreTrainedTokenizerBase:
    # One process per core already: rayon threads inside each would oversubscribe the CPUs.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from pipeline.data.tokenizer import load_tokenizer

    return load_tokenizer(path)


def encode_texts(tok: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    """Token ids of raw texts, as ``tok(texts, add_special_tokens=False,
    split_special_tokens=True)`` gives: no BOS/EOS added, and a special token's string inside
    the text (``<|im_start|>``, ``<|end_of_text|>``) is encoded as plain text, never as the
    control token (a document must not fake a turn or an end of text)."""
    return [e.ids for e in chat.encode_batch(tok, texts, split_special_tokens=True)]


class _Spill:
    """Accumulates one unit's kept records: token ids, trainable masks, raw values."""

    def __init__(self, job: ChunkJob) -> None:
        self.job = job
        self.ids: list[np.ndarray] = []
        self.masks: list[np.ndarray] = []
        self.raw = open(spill_path(job.settings.scratch, job.index, "records.jsonl"), "w")  # noqa: SIM115

    def add(self, ids: Any, mask: np.ndarray | None, raw: Any) -> None:
        self.ids.append(np.asarray(ids, dtype=np.uint32))
        self.masks.append(np.ones(len(ids), bool) if mask is None else mask)
        self.raw.write(json.dumps(raw, ensure_ascii=False) + "\n")

    def close(self) -> np.ndarray:
        self.raw.close()
        lengths = np.array([len(a) for a in self.ids], dtype=np.int64)
        scratch, index = self.job.settings.scratch, self.job.index
        flat = np.concatenate(self.ids) if self.ids else np.zeros(0, np.uint32)
        np.save(spill_path(scratch, index, "ids.npy"), flat)
        masks = np.concatenate(self.masks) if self.masks else np.zeros(0, bool)
        np.save(spill_path(scratch, index, "train.npy"), masks)
        return lengths


def process_chunk(job: ChunkJob) -> ChunkResult:
    """Read, validate, clean, scrub, tokenize and sign one unit; see the module docstring.

    Bad records never raise (they are quarantined).

    Raises:
        RuntimeError: anything else failed; the message names the file and byte range, which
            a worker's traceback alone does not.
    """
    try:
        return _process_unit(job)
    except Exception as err:
        unit = job.unit
        where = unit.uri if unit.end < 0 else f"{unit.uri} (bytes {unit.start}-{unit.end})"
        raise RuntimeError(f"prepare_data failed on {where}: {type(err).__name__}: {err}") from err


def _process_unit(job: ChunkJob) -> ChunkResult:
    settings = job.settings
    tok = _tokenizer(settings.tokenizer_dir)
    scrubber = PiiScrubber(
        settings.pii_patterns,
        types=settings.pii_types,
        placeholders=settings.pii_placeholders,
        phone_regions=settings.phone_regions,
    )
    records = sources.stream_unit(job.unit, settings.max_record_bytes)
    result = ChunkResult(job.index, 0, unit_bytes(job.unit))
    spill = _Spill(job)
    signatures: list[np.ndarray] = []
    exact: list[int] = []
    split_keys: list[int] = []
    # Records waiting to be encoded in one batch, in input order: a document's text, or a
    # conversation (as scrubbed) and its rendering.
    pending: list[str | tuple[list[dict[str, str]], chat.RenderedChat]] = []
    pending_chars = 0

    def keep(ids: Any, mask: np.ndarray | None, raw: Any, key_text: str) -> None:
        spill.add(ids, mask, raw)
        exact.append(dedup.exact_key(key_text))
        split_keys.append(ingest.split_key(key_text))
        signatures.append(dedup.minhash(np.asarray(ids)).astype(np.uint32))
        result.counts["kept"] += 1
        result.counts["tokens"] += len(ids)

    def flush() -> None:
        nonlocal pending_chars
        texts = [item for item in pending if isinstance(item, str)]
        documents = iter(encode_texts(tok, texts) if texts else [])
        rendered = [item[1] for item in pending if not isinstance(item, str)]
        chats = iter(chat.encode_chats(rendered, tok) if rendered else [])
        for item in pending:
            if isinstance(item, str):
                keep(next(documents), None, item, item)
            else:
                ids, labels = next(chats)
                keep(ids, labels != chat.IGNORE_INDEX, item[0], json.dumps(item[0], sort_keys=True))
        pending.clear()
        pending_chars = 0

    def add(item: str | tuple[list[dict[str, str]], chat.RenderedChat]) -> None:
        nonlocal pending_chars
        pending.append(item)
        pending_chars += len(item) if isinstance(item, str) else len(item[1].text)
        if len(pending) >= _BATCH or pending_chars >= _BATCH_CHARS:
            flush()

    quarantine = open(spill_path(settings.scratch, job.index, "quarantine.jsonl"), "w")  # noqa: SIM115
    with quarantine:
        for record in records:
            result.counts["read"] += 1
            parsed = _parse(record, job.kind, settings.fields)
            if isinstance(parsed, list):
                messages = _scrub_chat(parsed, scrubber) if settings.scrub_pii else parsed
                try:
                    rendered = chat.render_chat(messages, tok, settings.chat_format)
                except chat.ContentNotVerbatim as err:
                    parsed = sources.BadRecord(record.line, "unencodable_chat", str(err))
                else:
                    add((messages, rendered))
                    continue
            if isinstance(parsed, sources.BadRecord):
                result.bad[parsed.reason] += 1
                row = {"source": job.unit.uri, "line": parsed.line, "reason": parsed.reason}
                quarantine.write(json.dumps({**row, "detail": parsed.detail}) + "\n")
                continue
            text = scrubber.scrub(parsed) if settings.scrub_pii else parsed
            if len(text.strip()) < max(1, settings.min_chars):
                result.counts["too_short"] += 1
                continue
            if len(text) > settings.max_doc_chars:
                if settings.long_doc_action == "drop":
                    result.counts["long_dropped"] += 1
                    continue
                pieces = split_long_document(text, settings.max_doc_chars)
                result.counts["long_split"] += 1
                result.counts["long_pieces"] += len(pieces)
                for piece in pieces:
                    add(piece)
            else:
                add(text)
        flush()
    result.lines = records.lines  # known once the unit is read through
    result.lengths = spill.close()
    result.pii = scrubber.counts
    result.exact = np.array(exact, dtype=np.uint64)
    result.split_keys = np.array(split_keys, dtype=np.uint32)
    result.signatures = (
        np.stack(signatures) if signatures else np.zeros((0, dedup.NUM_PERM), dtype=np.uint32)
    )
    return result


def _parse(
    record: sources.Record | sources.BadRecord, kind: Kind, fields: RecordFields
) -> sources.BadRecord | str | list[dict[str, str]]:
    if isinstance(record, sources.BadRecord):
        return record
    value = record.value
    as_chat = kind == "chats" or (
        kind == "eval"
        and isinstance(value, dict)
        and (fields.messages in value or fields.prompt in value)
    )
    parsed = ingest.chat_messages(value, fields) if as_chat else ingest.document_text(value, fields)
    if isinstance(parsed, ingest.Rejection):
        return sources.BadRecord(record.line, parsed.reason, parsed.detail)
    return parsed


def _scrub_chat(messages: list[dict[str, str]], scrubber: PiiScrubber) -> list[dict[str, str]]:
    return [{"role": m["role"], "content": scrubber.scrub(m["content"])} for m in messages]


def unit_bytes(unit: sources.WorkUnit) -> int:
    """Bytes of input in ``unit`` (its byte range, or the whole file)."""
    if unit.end >= 0:
        return unit.end - unit.start
    return sources.file_size(unit.uri)


def load_spill(scratch: str, index: int) -> tuple[np.ndarray, np.ndarray]:
    """Memory-mapped flat token ids and trainable mask of one unit."""
    ids = np.load(spill_path(scratch, index, "ids.npy"), mmap_mode="r")
    mask = np.load(spill_path(scratch, index, "train.npy"), mmap_mode="r")
    return ids, mask
