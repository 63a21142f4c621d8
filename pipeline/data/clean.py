"""Cleaning that keeps meaning: Unicode NFC, control characters out, indentation kept.

Code and tables depend on whitespace, so only what carries no meaning is touched: trailing
spaces at line ends, carriage returns, and runs of more than one blank line.
"""

from __future__ import annotations

import re
import unicodedata

# C0 and C1 controls except tab and line feed, DEL, and the byte-order mark.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\ufeff]")
_TRAILING = re.compile(r"[ \t]+$", re.MULTILINE)
_BLANK_RUNS = re.compile(r"\n{3,}")


def clean_text(text: str) -> str:
    """NFC-normalize, drop control characters, keep leading and inner whitespace of every line.

    Line endings become ``\\n``; trailing spaces, more than one blank line in a row, and blank
    lines at the start and end go.
    """
    text = unicodedata.normalize("NFC", text)
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL.sub("", text)
    # Both patterns try at every space or line feed (slow on prose); substring tests that
    # rule out any match are ~30x faster and true for most text.
    if " \n" in text or "\t\n" in text or text.endswith((" ", "\t")):
        text = _TRAILING.sub("", text)
    if "\n\n\n" in text:
        text = _BLANK_RUNS.sub("\n\n", text)
    return text.strip("\n")


def split_long_document(text: str, max_chars: int) -> list[str]:
    """Pieces of at most ``max_chars``, cut at paragraph boundaries, else line boundaries, else
    the last space (a single unbroken run of characters is cut where it must be)."""
    if len(text) <= max_chars:
        return [text]
    pieces: list[str] = []
    current = ""
    for unit in _units(text, max_chars):
        joined = f"{current}\n\n{unit}" if current else unit
        if len(joined) <= max_chars:
            current = joined
            continue
        if current:
            pieces.append(current)
        current = unit
    if current:
        pieces.append(current)
    return pieces


def _units(text: str, max_chars: int) -> list[str]:
    """Paragraphs no longer than ``max_chars`` (long ones broken at lines, then spaces)."""
    units: list[str] = []
    for paragraph in text.split("\n\n"):
        if len(paragraph) <= max_chars:
            units.append(paragraph)
            continue
        line_group = ""
        for line in paragraph.split("\n"):
            joined = f"{line_group}\n{line}" if line_group else line
            if len(joined) <= max_chars:
                line_group = joined
                continue
            if line_group:
                units.append(line_group)
            while len(line) > max_chars:
                cut = line.rfind(" ", 0, max_chars + 1)
                cut = cut if cut > max_chars // 2 else max_chars
                units.append(line[:cut])
                line = line[cut:].lstrip(" ")
            line_group = line
        if line_group:
            units.append(line_group)
    return [u for u in units if u.strip()]
