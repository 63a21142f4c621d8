"""Values found by the name of the field that holds them, in the structured text a company's
data is full of: ``"phone": "8327965565"``, ``DB_PASSWORD=...``, a CSV or TSV column named
``ssn``, an SQL ``INSERT`` whose column list names ``phone``.

A bare ``035791202`` or ``shpat_69ce...`` says little on its own; under a field called ``ssn`` or
``api_key`` it says what it is. This module only reads the structure: it yields each value with
the PII type its field name stands for, and ``pipeline.data.pii`` decides, with that type's
validator, whether the value is one.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterator

# Field names per type: the whole name, or its last part after ``_``, ``-`` or ``.``
# (``customer_phone``, ``stripe.api_key``, ``DB_PASSWORD``).
_NAMES = {
    "secret": r"api[_-]?key|apikey|secret|secret[_-]?key|client[_-]?secret|access[_-]?key|"
    r"private[_-]?key|token|access[_-]?token|auth[_-]?token|refresh[_-]?token|password|"
    r"passwd|pwd|passphrase",
    "phone": r"phone|phone[_-]?number|mobile|mobile[_-]?number|cell|cellphone|telephone|tel|"
    r"msisdn|whatsapp",
    "national_id": r"ssn|social[_-]?security(?:[_-]?number)?|dni|nie|nif|documento[_-]?numero",
    "iban": r"iban",
    "card": r"card[_-]?number|card[_-]?no|cc[_-]?number|pan",
    "email": r"e[_-]?mail|email[_-]?address|mail",
}
_KIND_OF = [(kind, re.compile(rf"(?i)(?:^|.*[_.-])(?:{names})$")) for kind, names in _NAMES.items()]
# A key right before a ``:``/``=`` (``"phone": ``, ``DB_PASSWORD=``, ``api_key => ``), and the
# value after it: quoted, or a token with digit groups after it (``+44 20 7946 0958``).
_KEY_BEFORE = re.compile(r"""([A-Za-z][\w.-]{0,48})["'`]?[ \t]*$""")
_SEPARATOR = re.compile(r"=>?|:")  # as ``=>|[:=]``, twice as fast (no alternation first)
_VALUE_AFTER = re.compile(
    r"""[ \t]*(?:"(?P<dq>[^"\n]*)"|'(?P<sq>[^'\n]*)'|(?P<bare>[^\s,;}\]"'][^\s,;}\]"']*"""
    r"""(?:[ ][\d()+-][\d()+ -]*)?))"""
)
_IDENTIFIER = re.compile(r"[\"'`]?[A-Za-z_][\w.-]{0,48}[\"'`]?")
_INSERT = re.compile(
    r"(?i)\binsert\s+into\s+[\w.\"`]+\s*\((?P<columns>[^)]*)\)\s*values\s*(?P<rows>(?:\([^;]*?\)\s*,?\s*)+)"
)
_ROW = re.compile(r"\(([^()]*(?:\([^()]*\)[^()]*)*)\)")
_DELIMITERS = ",\t;|"

Field = tuple[str, int, int]
"""``(type, start, end)`` of a value in the text."""


def field_kind(name: str) -> str | None:
    """The PII type a field called ``name`` holds, or None."""
    name = name.strip().strip("\"'`")
    return next((kind for kind, pattern in _KIND_OF if pattern.match(name)), None)


def find_field_values(text: str) -> Iterator[Field]:
    """Every value under a PII-named key, table column or SQL column, with its type."""
    yield from _key_values(text)
    yield from _table_cells(text)
    if "insert" in text.lower():
        yield from _insert_values(text)


def _key_values(text: str) -> Iterator[Field]:
    # Separators first: prose has few, and only the words right before one can be a key.
    for sep in _SEPARATOR.finditer(text):
        key = _KEY_BEFORE.search(text, max(0, sep.start() - 52), sep.start())
        kind = field_kind(key.group(1)) if key else None
        if kind is None:
            continue
        m = _VALUE_AFTER.match(text, sep.end())
        if m is None:
            continue
        group = next(g for g in ("dq", "sq", "bare") if m.group(g) is not None)
        start, end = m.span(group)
        value = text[start:end]
        stripped = value.strip()
        if stripped:
            start += value.find(stripped)
            yield kind, start, start + len(stripped)


def _table_cells(text: str) -> Iterator[Field]:
    """Cells under a PII-named column of a delimited table: a header line of two or more
    identifiers (``applicant_id,ssn,state``), then rows."""
    lines = text.split("\n")
    offset = 0
    for number, header in enumerate(lines):
        start_of_rows = offset + len(header) + 1
        offset = start_of_rows
        delimiter = next((d for d in _DELIMITERS if d in header), None)
        if delimiter is None:
            continue
        names = header.split(delimiter)
        if len(names) < 2 or not all(_IDENTIFIER.fullmatch(n.strip()) for n in names):
            continue
        columns = [field_kind(name) for name in names]
        if not any(columns):
            continue
        position = start_of_rows
        for line in lines[number + 1 :]:
            cells = line.split(delimiter)
            cursor = position
            for kind, cell in zip(columns, cells, strict=False):
                value = cell.strip().strip("\"'")
                if kind and value:
                    at = cursor + cell.find(value)
                    yield kind, at, at + len(value)
                cursor += len(cell) + 1
            position += len(line) + 1
        return  # one header per text: the rows below it are the table


def _insert_values(text: str) -> Iterator[Field]:
    for m in _INSERT.finditer(text):
        kinds = [field_kind(c) for c in m.group("columns").split(",")]
        if not any(kinds):
            continue
        for row in _ROW.finditer(text, m.start("rows"), m.end("rows")):
            cells = next(csv.reader([row.group(1)], quotechar="'", skipinitialspace=True), [])
            cursor = row.start(1)
            for kind, cell in zip(kinds, cells, strict=False):
                at = text.find(cell, cursor, row.end(1)) if cell else -1
                if at < 0:
                    continue
                cursor = at + len(cell)
                if kind:
                    yield kind, at, at + len(cell)
