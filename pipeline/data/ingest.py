"""Read, clean, scrub, deduplicate and split the raw domain corpus and chat examples.

Bad input fails with the file and line that caused it; nothing here is silently skipped except
what the manifest counts (too short, duplicates).
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from dataclasses import dataclass
from typing import Any

from pipeline import storage

ROLES = ("system", "user", "assistant")
_EMAIL = re.compile(r"[\w.+-]+@[\w-]+(\.[\w-]+)+")
# Groups of 3-4 digits joined by spaces or hyphens, optionally after +CC and an (area) code:
# matches "+1 555 123 4567" and "(020) 7946-0958", not ISO dates or bare order numbers.
_PHONE = re.compile(
    r"(?<![\w(])(?:\+\d{1,3}[ -]?)?(?:\(\d{2,4}\)[ -]?)?\d{3,4}(?:[ -]\d{3,4}){1,2}(?!\w)"
)
_SPACES = re.compile(r"[ \t\r\f\v]+")


class DataError(ValueError):
    """Input data is malformed; the message names the file and line."""


@dataclass
class IngestStats:
    """What cleaning did, recorded in the manifest."""

    read: int = 0
    too_short: int = 0
    duplicates: int = 0
    pii_replacements: int = 0
    kept: int = 0


def read_jsonl(uri: str) -> list[tuple[int, dict[str, Any]]]:
    """Parse a JSONL file into ``(line_number, object)`` pairs; blank lines are allowed."""
    try:
        text = storage.read_bytes(uri).decode("utf-8")
    except FileNotFoundError as err:
        raise DataError(f"data file not found: {uri} (check data.* in the config)") from err
    except UnicodeDecodeError as err:
        raise DataError(f"{uri}: not UTF-8 text ({err})") from err
    rows = []
    # Split on "\n" only: str.splitlines also breaks on U+2028/U+2029, which JSON strings may hold.
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{uri}:{number}: not valid JSON: {err.msg}") from err
        if not isinstance(obj, dict):
            raise DataError(f"{uri}:{number}: expected a JSON object, got {type(obj).__name__}")
        rows.append((number, obj))
    if not rows:
        raise DataError(f"{uri}: no records")
    return rows


def clean_text(text: str) -> str:
    """Unicode-normalize and collapse runs of spaces, keeping line breaks."""
    text = unicodedata.normalize("NFC", text)
    lines = [_SPACES.sub(" ", line).strip() for line in text.split("\n")]
    return "\n".join(line for line in lines if line)


def scrub_pii(text: str) -> tuple[str, int]:
    """Replace e-mail addresses and phone numbers; returns the text and how many were replaced."""
    text, emails = _EMAIL.subn("<EMAIL>", text)
    text, phones = _PHONE.subn("<PHONE>", text)
    return text, emails + phones


def content_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def is_heldout(key: str, fraction: float) -> bool:
    """Stable split by content hash: appending fresh data never moves old records across it."""
    return int(key[:8], 16) / 0xFFFFFFFF < fraction


def load_documents(uri: str, min_chars: int, scrub: bool) -> tuple[list[str], IngestStats]:
    """Read ``{"text": ...}`` records, clean, scrub, drop short ones and exact duplicates."""
    stats = IngestStats()
    seen: set[str] = set()
    docs = []
    for number, obj in read_jsonl(uri):
        stats.read += 1
        text = obj.get("text")
        if not isinstance(text, str):
            raise DataError(f"{uri}:{number}: expected a string field 'text'")
        text = clean_text(text)
        if scrub:
            text, replaced = scrub_pii(text)
            stats.pii_replacements += replaced
        if len(text) < min_chars:
            stats.too_short += 1
            continue
        key = content_hash(text)
        if key in seen:
            stats.duplicates += 1
            continue
        seen.add(key)
        docs.append(text)
    stats.kept = len(docs)
    return docs, stats


def load_chats(uri: str, scrub: bool) -> tuple[list[list[dict[str, str]]], IngestStats]:
    """Read ``{"messages": [{"role", "content"}, ...]}`` records, validate and deduplicate."""
    stats = IngestStats()
    seen: set[str] = set()
    chats = []
    for number, obj in read_jsonl(uri):
        stats.read += 1
        messages = _validate_messages(obj.get("messages"), f"{uri}:{number}")
        if scrub:
            scrubbed = []
            for message in messages:
                content, replaced = scrub_pii(message["content"])
                stats.pii_replacements += replaced
                scrubbed.append({"role": message["role"], "content": content})
            messages = scrubbed
        key = content_hash(json.dumps(messages, sort_keys=True))
        if key in seen:
            stats.duplicates += 1
            continue
        seen.add(key)
        chats.append(messages)
    stats.kept = len(chats)
    return chats, stats


def _validate_messages(messages: Any, where: str) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: expected a non-empty list field 'messages'")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise DataError(f"{where}: messages[{i}] is not an object")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise DataError(f"{where}: messages[{i}].role is {role!r}; expected one of {ROLES}")
        if not isinstance(content, str):
            raise DataError(f"{where}: messages[{i}].content must be a string")
        out.append({"role": role, "content": clean_text(content)})
    if not any(m["role"] == "assistant" for m in out):
        raise DataError(f"{where}: no assistant message, so nothing to learn from")
    return out
