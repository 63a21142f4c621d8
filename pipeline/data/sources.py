"""Where input records come from: paths, globs, folders, ``s3://`` prefixes, Hugging Face
``datasets`` folders and streamed ``hf:`` sources (``hf_inputs``), split into work units.

A unit is what one worker reads at a time, about ``chunk_bytes`` of input: a line-aligned byte
range of a JSONL file, a run of row groups of a Parquet file (read by range requests on S3), a
row range of a ``save_to_disk`` Arrow file, one shard of a streamed source, or a whole JSON
array or plain-text file. Reading never stops at a
bad record: each comes back as a ``BadRecord`` with its line (or record number) and reason.
JSONL is streamed in blocks, so a line longer than ``max_record_bytes`` (a multi-GB line) is
quarantined without ever being held in memory; ``\n``, ``\r\n`` and old-Mac ``\r`` all end a line.
"""

from __future__ import annotations

import fnmatch
import glob
import hashlib
import io
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pipeline import storage
from pipeline.data import hf_inputs
from pipeline.data.errors import DataError

__all__ = ["BadRecord", "DataError", "Record", "WorkUnit"]

Format = Literal["jsonl", "json", "parquet", "text", "arrow", "hf"]
_FORMATS: dict[str, Format] = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".parquet": "parquet",
    ".arrow": "arrow",
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
    """First byte (JSONL; a line start), row group (Parquet), row (Arrow) or shard (``hf``)."""
    end: int = -1
    """One past the last of those; -1 reads to the end (for ``hf``: the shard count)."""
    size: int = -1
    """Input bytes of a row-range unit (its share of the file); -1: ``end - start`` (JSONL) or
    the whole file."""


def input_format(uri: str) -> Format:
    """The format named by the file's extension (``hf`` for a streamed ``hf:`` source)."""
    if hf_inputs.is_stream(uri):
        return "hf"
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
        if hf_inputs.is_stream(entry):
            found.append(entry)
            continue
        folder = Path(entry)
        dataset = None if storage.is_s3(entry) or not folder.is_dir() else folder
        files = hf_inputs.folder_files(dataset, field) if dataset else None
        if files is not None:
            found.extend(f for f in files if f not in found)
            continue
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
    if hf_inputs.is_stream(uri):
        return 0  # unknown before it is streamed
    if storage.is_s3(uri):
        bucket, _, key = uri.removeprefix("s3://").partition("/")
        return int(storage._s3_client().head_object(Bucket=bucket, Key=key)["ContentLength"])
    return Path(uri).stat().st_size


def fingerprint(uri: str) -> dict[str, Any]:
    """Cheap identity of an input file (size and ETag or modification time); a streamed source
    is named only (its provider versions it: pin a revision in the entry)."""
    if hf_inputs.is_stream(uri):
        return {"uri": uri, "streamed": True}
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
        if fmt == "parquet":
            units.extend(_parquet_units(uri, chunk_bytes))
            continue
        if fmt == "arrow":
            units.extend(_arrow_units(uri, chunk_bytes))
            continue
        if fmt == "hf":
            shards = hf_inputs.stream_shards(uri, uri)
            units.extend(WorkUnit(uri, fmt, shard, shards) for shard in range(shards))
            continue
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


def _parquet_units(uri: str, chunk_bytes: int) -> list[WorkUnit]:
    """Runs of whole row groups of about ``chunk_bytes`` (compressed) each."""
    import pyarrow.parquet as pq

    try:
        with _open_binary(uri) as handle:
            meta = pq.ParquetFile(handle).metadata
    except Exception:
        return [WorkUnit(uri, "parquet")]  # unreadable: the reader quarantines it with a reason
    units, start, size = [], 0, 0
    for group in range(meta.num_row_groups):
        row_group = meta.row_group(group)
        size += sum(row_group.column(c).total_compressed_size for c in range(row_group.num_columns))
        if size >= chunk_bytes or group == meta.num_row_groups - 1:
            units.append(WorkUnit(uri, "parquet", start, group + 1, size))
            start, size = group + 1, 0
    return units or [WorkUnit(uri, "parquet", 0, 0, 0)]


def _arrow_units(uri: str, chunk_bytes: int) -> list[WorkUnit]:
    """Row ranges of a ``save_to_disk`` Arrow file, each about ``chunk_bytes`` of it."""
    rows, size = hf_inputs.arrow_rows(uri), file_size(uri)
    per_unit = max(1, rows * chunk_bytes // max(size, 1))
    units = []
    for lo in range(0, rows, per_unit):
        hi = min(lo + per_unit, rows)
        # Differences of rounded cumulative shares: the units' sizes add up to the file's.
        units.append(WorkUnit(uri, "arrow", lo, hi, size * hi // rows - size * lo // rows))
    return units or [WorkUnit(uri, "arrow", 0, 0, 0)]


class _RangeReader(io.RawIOBase):
    """A seekable read-only file over an S3 object, by range requests: Parquet's footer and
    the row groups asked for are all that is fetched."""

    def __init__(self, uri: str) -> None:
        self.uri, self.position, self.size = uri, 0, file_size(uri)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.position, io.SEEK_END: self.size}[whence]
        self.position = max(0, base + offset)
        return self.position

    def readinto(self, buffer: Any) -> int:
        end = min(self.position + len(buffer), self.size)
        data = read_range(self.uri, self.position, end) if end > self.position else b""
        buffer[: len(data)] = data
        self.position += len(data)
        return len(data)


def _open_binary(uri: str) -> Any:
    return io.BufferedReader(_RangeReader(uri), 1 << 20) if storage.is_s3(uri) else open(uri, "rb")


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
            return self._counted(_read_parquet(unit.uri, unit.start, unit.end))
        if unit.fmt == "arrow":
            return self._counted(_numbered(hf_inputs.read_arrow(unit.uri, unit.start, unit.end)))
        if unit.fmt == "hf":
            return self._counted(_numbered(hf_inputs.stream_rows(unit.uri, unit.start, unit.end)))
        size = file_size(unit.uri)
        if size > self.max_record_bytes:
            return iter([_too_long(0 if unit.fmt == "json" else 1, size, self.max_record_bytes)])
        data = read_range(unit.uri, 0, -1)
        return _read_json_array(data) if unit.fmt == "json" else _read_text(data)

    def _counted(self, records: Iterator[Record | BadRecord]) -> Iterator[Record | BadRecord]:
        # Rows, like a JSONL unit's lines, number the next unit's records after this one's.
        for record in records:
            self.lines = max(self.lines, record.line)
            yield record

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


def _numbered(rows: Iterator[Any]) -> Iterator[Record | BadRecord]:
    for number, row in enumerate(rows, start=1):
        yield Record(number, row)


def _read_parquet(uri: str, start: int = 0, end: int = -1) -> Iterator[Record | BadRecord]:
    """Rows of row groups ``[start, end)`` (every group when ``end`` is -1), by range requests
    on S3; memory is bounded by a batch, not by the file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    number = 0
    try:
        with _open_binary(uri) as handle:
            parquet = pq.ParquetFile(handle)
            groups = range(start, parquet.metadata.num_row_groups if end < 0 else end)
            for batch in parquet.iter_batches(batch_size=1024, row_groups=list(groups)):
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
