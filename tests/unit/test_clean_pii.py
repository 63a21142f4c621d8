"""Cleaning keeps meaning; PII scrubbing catches cards and IPs but not dates or order numbers."""

from __future__ import annotations

import pytest

from pipeline.data.clean import clean_text, split_long_document
from pipeline.data.pii import PiiScrubber, luhn_valid, scrub_pii


def test_clean_text_keeps_indentation_and_inner_spaces() -> None:
    assert clean_text("def f():\n    return 1") == "def f():\n    return 1"
    assert clean_text("a  |  b\n\tc") == "a  |  b\n\tc"


def test_clean_text_normalizes_and_drops_control_characters() -> None:
    raw = "\n\nCafe\u0301 \x00bell\x07  \r\nline two\r\n\n\n\n\nend  \n"
    assert clean_text(raw) == "Caf\u00e9 bell\nline two\n\nend"
    assert clean_text(" \n\t\n ") == ""


def test_long_documents_split_at_paragraphs_then_lines() -> None:
    paragraphs = [f"paragraph {i} " + "x" * 40 for i in range(10)]
    pieces = split_long_document("\n\n".join(paragraphs), max_chars=120)
    assert all(len(p) <= 120 for p in pieces)
    assert "\n\n".join(pieces) == "\n\n".join(paragraphs)
    one_line = "word " * 100
    assert all(len(p) <= 60 for p in split_long_document(one_line.strip(), 60))
    assert split_long_document("short", 60) == ["short"]


def test_scrub_replaces_each_type_and_counts_it() -> None:
    scrubber = PiiScrubber()
    text = (
        "Mail jane.doe+orders@mail.example.co.uk, call +1 555 101 1996 or 020 7946-0958, "
        "card 4111 1111 1111 1111 (also 4012-8888-8888-1881), from 192.168.10.7 or 2001:db8::8a2e:370:7334."
    )
    assert scrubber.scrub(text) == (
        "Mail <EMAIL>, call <PHONE> or <PHONE>, card <CARD> (also <CARD>), from <IP> or <IP>."
    )
    assert dict(scrubber.counts) == {"email": 1, "phone": 2, "card": 2, "ip": 2}


@pytest.mark.parametrize(
    "text",
    [
        "Delivered on 2026-11-29 at 20:00, or 11/29/2026, or 29.11.2026.",
        "Order #4512-7788 shipped; order 4512 7788; ticket no. 1001-2002; ORD-2024-001234.",
        "Surge multiplier 2.4, rated 4 stars, version 1.2.3, took 12:30:45.",
        "Reference 4111 1111 1111 1112 fails the Luhn check.",
    ],
)
def test_dates_times_and_order_numbers_are_not_pii(text: str) -> None:
    assert scrub_pii(text) == (text, 0)


def test_luhn() -> None:
    assert luhn_valid("4111111111111111")
    assert not luhn_valid("4111111111111112")


def test_extra_patterns_get_typed_placeholders() -> None:
    scrubber = PiiScrubber({"EMPLOYEE_ID": r"\bEMP-\d{6}\b"})
    assert scrubber.scrub("badge EMP-123456 at desk") == "badge <EMPLOYEE_ID> at desk"
    assert scrubber.counts["employee_id"] == 1
