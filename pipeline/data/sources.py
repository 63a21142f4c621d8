"""Where input records come from: paths, globs and ``s3://`` prefixes, split into work units.

A unit is what one worker reads at a time: a line-aligned byte range of a JSONL file (at most
``chunk_bytes``), or a whole JSON array, Parquet or plain-text file. Reading never stops at a
bad record: each comes back as a ``BadRecord`` with its line (or record number) and reason.
JSONL is streamed in blocks, so a line longer than ``max_record_bytes`` (a multi-GB line) is
quarantined without ever being held in memory; ``\n``, ``\r\n`` and old-Mac ``\r`` all end a line.
"""

from __future__ import annotations

import fnmatch
import glob
import hashlib
import json
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pipeline import storage

Format = Literal["jsonl", "json", "parquet", "text"]
_FORMATS: dict[str, Format] = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".parquet": "parquet",
    ".txt": "text",
    ".md": "text",
}
_GLOB_CHARS = "*?["
_SCAN = 1 << 16
_SCAN_MAX = 1 << 23
_BLOCK = 1 << 20
MAX_RECORD_BYTES = 32 * 2**20
"""Default longest record (``data.max_record_bytes``)."""
# Bytes, not str.splitlines: U+2028/U+2029 inside JSON strings are not line breaks. A raw CR
# cannot occur inside a JSON string (control characters must be escaped), so outside CRLF it
# can only be an old-Mac line end.
_LINE_END = re.compile(rb"\r\n|\r|\n")


class DataError(ValueError):
    """Input data is unusable as a whole; the message names the field, file or line."""


@dataclass(frozen=True)
class Record:
    line: int
    """1-based line (JSONL, relative to the unit's first line) or record number (JSON, Parquet)."""
    value: Any


@dataclass(frozen=True)
class BadRecord:
    line: int
    reason: str
    """Short machine-readable reason (``invalid_utf8``, ``malformed_json``, ...)."""
    detail: str


@dataclass(frozen=True)
class WorkUnit:
    uri: str
    fmt: Format
    start: int = 0
    """First byte (JSONL ranges; a line start)."""
    end: int = -1
    """One past the last byte; -1 reads to the end."""


def input_format(uri: str) -> Format:
    """The format named by the file's extension."""
    suffix = Path(uri.split("?", 1)[0]).suffix.lower()
    if suffix not in _FORMATS:
        raise DataError(
            f"{uri}: unsupported input format {suffix or '(no extension)'!r}; "
            f"expected one of {sorted(_FORMATS)}"
        )
    return _FORMATS[suffix]


def as_list(spec: str | list[str] | None) -> list[str]:
    if spec is None:
        return []
    return [spec] if isinstance(spec, str) else list(spec)


def expand_inputs(spec: str | list[str], field: str) -> list[str]:
    """Every input file named by paths, globs, folders or ``s3://`` prefixes, in a stable order.

    Raises:
        DataError: an entry matches no supported file; the message names ``field``.
    """
    found: list[str] = []
    for entry in as_list(spec):
        matches = _expand_s3(entry) if storage.is_s3(entry) else _expand_local(entry)
        if matches == [entry]:
            input_format(entry)  # a file named exactly must be readable
        matches = [m for m in matches if Path(m).suffix.lower() in _FORMATS]
        if not matches and not any(c in entry for c in _GLOB_CHARS):
            raise DataError(f"{field}: file not found: {entry} (nor a folder or prefix of inputs)")
        if not matches:
            raise DataError(
                f"{field}: no input files found at {entry} (expected files ending in "
                f"{', '.join(sorted(_FORMATS))})"
            )
        found.extend(m for m in matches if m not in found)
    return found


def _expand_local(entry: str) -> list[str]:
    if any(c in entry for c in _GLOB_CHARS):
        return sorted(p for p in glob.glob(entry, recursive=True) if Path(p).is_file())
    path = Path(entry)
    if path.is_dir():
        return sorted(str(p) for p in path.rglob("*") if p.is_file())
    return [entry] if path.is_file() else []


def _expand_s3(entry: str) -> list[str]:
    bucket, _, key = entry.removeprefix("s3://").partition("/")
    cut = min((key.find(c) for c in _GLOB_CHARS if c in key), default=-1)
    prefix = key if cut < 0 else key[:cut]
    paginator = storage._s3_client().get_paginator("list_objects_v2")
    keys = [
        obj["Key"]
        for page in paginator.paginate(Bucket=bucket, Prefix=prefix)
        for obj in page.get("Contents", [])
        if not obj["Key"].endswith("/")
    ]
    if cut >= 0:
        keys = [k for k in keys if fnmatch.fnmatchcase(k, key)]
    elif key in keys:
        keys = [key]  # an exact object, not every object sharing its name as a prefix
    else:
        folder = key.rstrip("/") + "/" if key else ""
        keys = [k for k in keys if k.startswith(folder)]
    return [f"s3://{bucket}/{k}" for k in sorted(keys)]


def file_size(uri: str) -> int:
    if storage.is_s3(uri):
        bucket, _, key = uri.removeprefix("s3://").partition("/")
        return int(storage._s3_client().head_object(Bucket=bucket, Key=key)["ContentLength"])
    return Path(uri).stat().st_size


def fingerprint(uri: str) -> dict[str, Any]:
    """Cheap identity of an input file (size and ETag or modification time)."""
    if storage.is_s3(uri):
        bucket, _, key = uri.removeprefix("s3://").partition("/")
        head = storage._s3_client().head_object(Bucket=bucket, Key=key)
        return {"uri": uri, "bytes": int(head["ContentLength"]), "etag": head["ETag"].strip('"')}
    stat = Path(uri).stat()
    return {"uri": uri, "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def read_range(uri: str, start: int, end: int) -> bytes:
    """Bytes ``[start, end)`` of a file (``end`` -1: to the end)."""
    if storage.is_s3(uri):
        bucket, _, key = uri.removeprefix("s3://").partition("/")
        last = "" if end < 0 else str(end - 1)
        if end == start:
            return b""
        body = storage._s3_client().get_object(
            Bucket=bucket, Key=key, Range=f"bytes={start}-{last}"
        )
        data: bytes = body["Body"].read()
        return data
    with open(uri, "rb") as handle:
        handle.seek(start)
        return handle.read() if end < 0 else handle.read(end - start)


def _next_line_start(uri: str, position: int, size: int) -> int:
    """The first line start at or after ``position`` (``size`` when there is none)."""
    if position <= 0:
        return 0
    cursor, step = position - 1, _SCAN
    while cursor < size:
        # One extra byte: a CR at the piece's end may be the first half of a CRLF.
        piece = read_range(uri, cursor, min(cursor + step + 1, size))
        found = _LINE_END.search(piece)
        if found and (found.start() < step or cursor + len(piece) == size):
            return cursor + found.end()
        cursor += min(step, len(piece))
        step = min(step * 2, _SCAN_MAX)  # a very long line: fewer, larger reads
    return size


def plan_units(uris: list[str], chunk_bytes: int) -> list[WorkUnit]:
    """Split the files into units of at most about ``chunk_bytes`` (JSONL at line boundaries)."""
    units: list[WorkUnit] = []
    for uri in uris:
        fmt = input_format(uri)
        if fmt != "jsonl":
            units.append(WorkUnit(uri, fmt))
            continue
        size = file_size(uri)
        start = 0
        while start < size:
            end = _next_line_start(uri, start + chunk_bytes, size)
            units.append(WorkUnit(uri, fmt, start, end))
            start = end
        if size == 0:
            units.append(WorkUnit(uri, fmt, 0, 0))
    return units


class UnitRecords:
    """The records of one unit, bad ones included, streamed (iterating never raises on bad
    content); ``lines`` is the unit's line count (JSONL; 0 otherwise) once iterated, which turns
    the unit-relative line numbers of the following units into file line numbers."""

    def __init__(self, unit: WorkUnit, max_record_bytes: int) -> None:
        self.unit, self.max_record_bytes = unit, max_record_bytes
        self.lines = 0

    def __iter__(self) -> Iterator[Record | BadRecord]:
        unit = self.unit
        if unit.fmt == "jsonl":
            return self._jsonl()
        if unit.fmt == "parquet":
            return _read_parquet(unit.uri)
        size = file_size(unit.uri)
        if size > self.max_record_bytes:
            return iter([_too_long(0 if unit.fmt == "json" else 1, size, self.max_record_bytes)])
        data = read_range(unit.uri, 0, -1)
        return _read_json_array(data) if unit.fmt == "json" else _read_text(data)

    def _jsonl(self) -> Iterator[Record | BadRecord]:
        blocks = _byte_blocks(self.unit.uri, self.unit.start, self.unit.end)
        lines = _bounded_lines(blocks, self.max_record_bytes)
        for number, (raw, length) in enumerate(lines, start=1):
            self.lines = number
            if raw is None:
                yield _too_long(number, length, self.max_record_bytes)
                continue
            if number == 1 and self.unit.start == 0 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]  # a byte-order mark some editors write
            if raw.strip():
                yield _parse_jsonl_line(number, raw)


def stream_unit(unit: WorkUnit, max_record_bytes: int = MAX_RECORD_BYTES) -> UnitRecords:
    """Records of one unit, read in bounded blocks (see ``UnitRecords``).

    Args:
        unit: the unit to read.
        max_record_bytes: a longer JSONL line, text file or JSON array file is one
            ``record_too_long`` bad record instead of a record.
    """
    return UnitRecords(unit, max_record_bytes)


def read_unit(unit: WorkUnit) -> tuple[int, Iterator[Record | BadRecord]]:
    """Records of one unit, bad ones included (never raises on bad content), held in memory:
    for small inputs (evaluation sets); ``prepare_data`` workers stream with ``stream_unit``.

    Returns:
        The unit's line count (JSONL; 0 otherwise) and the records.
    """
    records = stream_unit(unit)
    values = list(records)
    return records.lines, iter(values)


def _too_long(number: int, length: int, limit: int) -> BadRecord:
    return BadRecord(
        number,
        "record_too_long",
        f"{length} bytes, above data.max_record_bytes={limit}; skipped without reading it whole",
    )


def _byte_blocks(uri: str, start: int, end: int) -> Iterator[bytes]:
    """Bytes ``[start, end)`` of a file (``end`` -1: to the end) in blocks of about 1 MiB."""
    if end == start:
        return
    if storage.is_s3(uri):
        bucket, _, key = uri.removeprefix("s3://").partition("/")
        last = "" if end < 0 else str(end - 1)
        body = storage._s3_client().get_object(
            Bucket=bucket, Key=key, Range=f"bytes={start}-{last}"
        )["Body"]
        yield from body.iter_chunks(_BLOCK)
        return
    with open(uri, "rb") as handle:
        handle.seek(start)
        left = -1 if end < 0 else end - start
        while left != 0:
            block = handle.read(_BLOCK if left < 0 else min(_BLOCK, left))
            if not block:
                return
            left = left if left < 0 else left - len(block)
            yield block


def _bounded_lines(blocks: Iterator[bytes], limit: int) -> Iterator[tuple[bytes | None, int]]:
    """Every line of the byte stream and its length; the line is None when longer than
    ``limit`` bytes (its bytes are dropped as they stream past, never joined)."""
    line: list[bytes] = []
    length, after_cr = 0, False
    for block in blocks:
        if after_cr and block.startswith(b"\n"):
            block = block[1:]  # the LF of a CRLF split across two blocks
        pieces = _LINE_END.split(block) if b"\r" in block else block.split(b"\n")
        after_cr = block.endswith(b"\r")
        for i, piece in enumerate(pieces):
            length += len(piece)
            if length <= limit:
                line.append(piece)
            else:
                line.clear()
            if i < len(pieces) - 1:  # a line end follows this piece
                yield (b"".join(line) if length <= limit else None), length
                line, length = [], 0
    if length:
        yield (b"".join(line) if length <= limit else None), length


def _parse_jsonl_line(number: int, raw: bytes) -> Record | BadRecord:
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        return BadRecord(
            number, "invalid_utf8", f"not UTF-8 text at byte {err.start} ({err.reason})"
        )
    try:
        return Record(number, json.loads(line))
    except json.JSONDecodeError as err:
        return BadRecord(
            number, "malformed_json", f"not valid JSON: {err.msg} (column {err.colno})"
        )


def _read_json_array(data: bytes) -> Iterator[Record | BadRecord]:
    try:
        values = json.loads(data.decode("utf-8-sig"))
    except UnicodeDecodeError as err:
        yield BadRecord(0, "invalid_utf8", f"file is not UTF-8 text at byte {err.start}")
        return
    except json.JSONDecodeError as err:
        yield BadRecord(err.lineno, "malformed_json", f"not valid JSON: {err.msg}")
        return
    if not isinstance(values, list):
        yield BadRecord(0, "malformed_json", "a .json input must hold an array of records")
        return
    for number, value in enumerate(values, start=1):
        yield Record(number, value)


def _read_text(data: bytes) -> Iterator[Record | BadRecord]:
    try:
        yield Record(1, data.decode("utf-8-sig"))
    except UnicodeDecodeError as err:
        yield BadRecord(1, "invalid_utf8", f"file is not UTF-8 text at byte {err.start}")


def _read_parquet(uri: str) -> Iterator[Record | BadRecord]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    with tempfile.TemporaryDirectory() as scratch:
        path = uri
        if storage.is_s3(uri):
            path = str(Path(scratch) / "input.parquet")
            storage.download_file(uri, path)
        number = 0
        try:
            # Batches keep memory bounded by the batch, not the file.
            for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
                for row in batch.to_pylist():
                    number += 1
                    yield Record(number, row)
        except (pa.ArrowException, OSError) as err:
            # A 0-byte, truncated or corrupt file: the rows before the damage are kept.
            yield BadRecord(
                number + 1,
                "unreadable_parquet",
                f"{uri}: not a readable Parquet file after {number} rows ({err})",
            )


def sources_digest(prints: list[dict[str, Any]]) -> str:
    """One hash over every input file's fingerprint."""
    return hashlib.sha256(json.dumps(prints, sort_keys=True).encode()).hexdigest()[:16]
