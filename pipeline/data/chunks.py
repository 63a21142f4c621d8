"""One worker's job: read a unit of input, validate, clean, scrub, tokenize and sign it.

Runs as a Ray Data task on a CPU node. Token ids, trainable masks, raw records, lengths and
held-out split keys go to the unit's spill files in the run's scratch folder (local, shared or
``s3://``: workers on other nodes write there too); the driver packs them later, one unit at a
time. Bad records go to a quarantine part file and the unit's counts to a summary file. What the
task returns are the rows the distributed dedup needs: record id, dedup group, exact key and
MinHash signature. A retried task rewrites the same files, so a killed worker changes nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from pipeline import storage
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
    """The tokenizer folder (local, shared or ``s3://``; fetched once per worker process)."""
    scratch: str
    """Spill folder (local, shared or ``s3://``) every worker and the driver can reach."""
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
    group: int = -1
    """Dedup group (``DOCUMENTS``, ``CHATS``); -1: not deduplicated (evaluation sets)."""


DOCUMENTS, CHATS = 0, 1
SPILL_PARTS = ("ids.npy", "train.npy", "lengths.npy", "split.npy", "records.jsonl")


@dataclass
class ChunkResult:
    """A unit's summary (its ``summary.json``): what the driver keeps per unit."""

    index: int
    lines: int
    """Lines in the unit (JSONL), to make later units' line numbers absolute."""
    bytes: int
    counts: Counter[str] = field(default_factory=Counter)
    """read, bad, too_short, long_split, long_pieces, long_dropped, kept, tokens."""
    bad: Counter[str] = field(default_factory=Counter)
    pii: Counter[str] = field(default_factory=Counter)

    def to_json(self) -> dict[str, Any]:
        return {"index": self.index, "lines": self.lines, "bytes": self.bytes,
                "counts": self.counts, "bad": self.bad, "pii": self.pii}  # fmt: skip

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> ChunkResult:
        return cls(
            int(value["index"]), int(value["lines"]), int(value["bytes"]),
            Counter(value["counts"]), Counter(value["bad"]), Counter(value["pii"]),
        )  # fmt: skip


def record_id(index: int, ordinal: np.ndarray | int) -> Any:
    """Global record id: unit index in the high 32 bits, the record's place in it below; ids
    sort in input order."""
    return (np.int64(index) << np.int64(32)) | np.asarray(ordinal, dtype=np.int64)


def spill_uri(scratch: str, index: int, part: str) -> str:
    return storage.join(scratch, f"{index:06d}.{part}")


@contextlib.contextmanager
def local_spill(scratch: str, index: int, parts: tuple[str, ...]) -> Iterator[Path]:
    """A local folder holding ``parts`` of a unit's spill: the scratch folder itself when it is
    local, else a temporary download removed on exit."""
    if not storage.is_s3(scratch):
        yield Path(scratch)
        return
    folder = Path(tempfile.mkdtemp(prefix="spill-"))
    try:
        for part in parts:
            storage.download_file(spill_uri(scratch, index, part), folder / f"{index:06d}.{part}")
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def spill_path(folder: Path | str, index: int, part: str) -> Path:
    return Path(folder) / f"{index:06d}.{part}"


def read_summary(scratch: str, index: int) -> ChunkResult:
    return ChunkResult.from_json(
        json.loads(storage.read_bytes(spill_uri(scratch, index, "summary.json")))
    )


@lru_cache(maxsize=2)
def _tokenizer(path: str) -> PreTrainedTokenizerBase:
    # One task per core already: rayon threads inside each would oversubscribe the CPUs.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from pipeline.data.tokenizer import load_tokenizer

    if storage.is_s3(path):
        path = str(storage.download_dir(path, tempfile.mkdtemp(prefix="tokenizer-")))
    return load_tokenizer(path)


def encode_texts(tok: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    """Token ids of raw texts, as ``tok(texts, add_special_tokens=False,
    split_special_tokens=True)`` gives: no BOS/EOS added, and a special token's string inside
    the text (``<|im_start|>``, ``<|end_of_text|>``) is encoded as plain text, never as the
    control token (a document must not fake a turn or an end of text)."""
    return [e.ids for e in chat.encode_batch(tok, texts, split_special_tokens=True)]


class _Spill:
    """Accumulates one unit's kept records: token ids, trainable masks, raw values; written to
    a local folder, then moved to the scratch folder (``publish``)."""

    def __init__(self, job: ChunkJob, folder: Path) -> None:
        self.job, self.folder = job, folder
        self.ids: list[np.ndarray] = []
        self.masks: list[np.ndarray] = []
        self.raw = open(self.path("records.jsonl"), "w")  # noqa: SIM115

    def path(self, part: str) -> Path:
        return spill_path(self.folder, self.job.index, part)

    def add(self, ids: Any, mask: np.ndarray | None, raw: Any) -> None:
        self.ids.append(np.asarray(ids, dtype=np.uint32))
        self.masks.append(np.ones(len(ids), bool) if mask is None else mask)
        self.raw.write(json.dumps(raw, ensure_ascii=False) + "\n")

    def close(self, split_keys: list[int]) -> None:
        self.raw.close()
        np.save(self.path("lengths.npy"), np.array([len(a) for a in self.ids], dtype=np.int64))
        np.save(self.path("split.npy"), np.array(split_keys, dtype=np.uint32))
        flat = np.concatenate(self.ids) if self.ids else np.zeros(0, np.uint32)
        np.save(self.path("ids.npy"), flat)
        masks = np.concatenate(self.masks) if self.masks else np.zeros(0, bool)
        np.save(self.path("train.npy"), masks)

    def publish(self, result: ChunkResult) -> None:
        """Every part into the scratch folder, the summary last: a unit with a summary is
        whole. Each file is renamed (or uploaded) into place, so a retried task never leaves
        a half-written one."""
        self.path("summary.json").write_text(json.dumps(result.to_json()))
        scratch = self.job.settings.scratch
        for part in (*SPILL_PARTS, "quarantine.jsonl", "summary.json"):
            target = spill_uri(scratch, self.job.index, part)
            if storage.is_s3(scratch):
                storage.upload_file(self.path(part), target)
            else:
                os.replace(self.path(part), target)


ProgressReport = Callable[[int, int, bool], None]
"""Called as a unit is read: records read so far, tokens so far, whether the unit is done."""


def process_chunk(job: ChunkJob, on_batch: ProgressReport | None = None) -> dict[str, np.ndarray]:
    """Read, validate, clean, scrub, tokenize and sign one unit; see the module docstring.

    Bad records never raise (they are quarantined).

    Returns:
        The unit's dedup rows: ``doc`` (``record_id``), ``group``, ``exact`` and ``signature``
        (``[n, NUM_PERM]`` uint32) per kept record; none for units outside dedup.

    Raises:
        RuntimeError: anything else failed; the message names the file and byte range, which
            a worker's traceback alone does not.
    """
    scratch = job.settings.scratch
    # The local write folder sits inside a local scratch folder, so parts are renamed into
    # place on the same filesystem.
    parent = None if storage.is_s3(scratch) else scratch
    folder = Path(tempfile.mkdtemp(prefix=f".unit-{job.index:06d}-", dir=parent))
    try:
        return _process_unit(job, folder, on_batch or (lambda *_: None))
    except Exception as err:
        unit = job.unit
        what = {"jsonl": "bytes", "parquet": "row groups", "arrow": "rows", "hf": "shard"}
        where = unit.uri
        if unit.end >= 0:
            where += f" ({what.get(unit.fmt, 'part')} {unit.start}-{unit.end})"
        raise RuntimeError(f"prepare_data failed on {where}: {type(err).__name__}: {err}") from err
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _process_unit(job: ChunkJob, folder: Path, on_batch: ProgressReport) -> dict[str, np.ndarray]:
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
    spill = _Spill(job, folder)
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
        on_batch(result.counts["read"], result.counts["tokens"], False)

    def add(item: str | tuple[list[dict[str, str]], chat.RenderedChat]) -> None:
        nonlocal pending_chars
        pending.append(item)
        pending_chars += len(item) if isinstance(item, str) else len(item[1].text)
        if len(pending) >= _BATCH or pending_chars >= _BATCH_CHARS:
            flush()

    quarantine = open(spill.path("quarantine.jsonl"), "w")  # noqa: SIM115
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
    result.pii = scrubber.counts
    spill.close(split_keys)
    spill.publish(result)
    on_batch(result.counts["read"], result.counts["tokens"], True)
    if job.group < 0:
        signatures.clear()
        exact.clear()
    return {
        "doc": record_id(job.index, np.arange(len(exact))),
        "group": np.full(len(exact), job.group, dtype=np.int8),
        "exact": np.array(exact, dtype=np.uint64),
        "signature": (
            np.stack(signatures) if signatures else np.zeros((0, dedup.NUM_PERM), np.uint32)
        ),
    }


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
    """Bytes of input in ``unit`` (its byte range or share of the file, or the whole file)."""
    if unit.size >= 0:
        return unit.size
    if unit.end >= 0:
        return unit.end - unit.start
    return sources.file_size(unit.uri)


def load_spill(folder: Path | str, index: int) -> tuple[np.ndarray, np.ndarray]:
    """Memory-mapped flat token ids and trainable mask of one unit (``local_spill``'s folder)."""
    ids = np.load(spill_path(folder, index, "ids.npy"), mmap_mode="r")
    mask = np.load(spill_path(folder, index, "train.npy"), mmap_mode="r")
    return ids, mask
