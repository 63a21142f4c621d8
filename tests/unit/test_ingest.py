"""Ingest: errors that name file and line, cleaning, PII scrubbing, dedup and the held-out split."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest

from pipeline.data.ingest import (
    ROLES,
    DataError,
    IngestStats,
    clean_text,
    content_hash,
    is_heldout,
    load_chats,
    load_documents,
    read_jsonl,
    scrub_pii,
)

ANSWER = {"role": "assistant", "content": "Your refund is on its way."}
QUESTION = {"role": "user", "content": "Where is my refund?"}


def _write(path: Path, lines: list[str]) -> str:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def _jsonl(path: Path, records: list[object]) -> str:
    return _write(path, [json.dumps(r) for r in records])


# --- read_jsonl errors -------------------------------------------------------------------


def test_bad_json_names_file_and_line(tmp_path: Path) -> None:
    uri = _write(tmp_path / "docs.jsonl", ['{"text": "fine"}', "", '{"text": "broken'])
    with pytest.raises(DataError, match=re.escape(f"{uri}:3: not valid JSON")):
        read_jsonl(uri)


def test_blank_lines_are_skipped_and_line_numbers_kept(tmp_path: Path) -> None:
    uri = _write(tmp_path / "docs.jsonl", ['{"text": "a"}', "   ", "", '{"text": "b"}'])
    assert read_jsonl(uri) == [(1, {"text": "a"}), (4, {"text": "b"})]


def test_non_object_line_names_the_type(tmp_path: Path) -> None:
    uri = _write(tmp_path / "docs.jsonl", ['{"text": "fine"}', "[1, 2]"])
    with pytest.raises(DataError, match=re.escape(f"{uri}:2: expected a JSON object, got list")):
        read_jsonl(uri)


def test_missing_file_points_at_the_config(tmp_path: Path) -> None:
    uri = str(tmp_path / "nowhere.jsonl")
    with pytest.raises(
        DataError, match=re.escape(f"data file not found: {uri} (check data.* in the config)")
    ):
        read_jsonl(uri)


def test_empty_file_has_no_records(tmp_path: Path) -> None:
    uri = _write(tmp_path / "empty.jsonl", ["", ""])
    with pytest.raises(DataError, match=re.escape(f"{uri}: no records")):
        read_jsonl(uri)


def test_non_utf8_file_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "latin1.jsonl"
    path.write_bytes('{"text": "café"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match=re.escape(f"{path}: not UTF-8 text")):
        read_jsonl(str(path))


def test_data_error_is_a_value_error() -> None:
    assert issubclass(DataError, ValueError)


def test_line_separator_inside_a_string_is_not_a_line_break(tmp_path: Path) -> None:
    record = {"text": "first part\u2028second part"}
    uri = _write(tmp_path / "docs.jsonl", [json.dumps(record, ensure_ascii=False), '{"text": "b"}'])
    assert read_jsonl(uri) == [(1, record), (2, {"text": "b"})]


# --- record validation -------------------------------------------------------------------


def test_document_without_text_names_the_line(tmp_path: Path) -> None:
    uri = _jsonl(tmp_path / "docs.jsonl", [{"text": "a fine document"}, {"body": "x"}])
    with pytest.raises(DataError, match=re.escape(f"{uri}:2: expected a string field 'text'")):
        load_documents(uri, min_chars=0, scrub=False)


def test_document_with_non_string_text_is_rejected(tmp_path: Path) -> None:
    uri = _jsonl(tmp_path / "docs.jsonl", [{"text": 42}])
    with pytest.raises(DataError, match=re.escape(f"{uri}:1: expected a string field 'text'")):
        load_documents(uri, min_chars=0, scrub=False)


def test_invalid_role_names_the_index_and_the_allowed_roles(tmp_path: Path) -> None:
    bad = {"messages": [QUESTION, {"role": "bot", "content": "hi"}, ANSWER]}
    uri = _jsonl(tmp_path / "chats.jsonl", [{"messages": [QUESTION, ANSWER]}, bad])
    expected = (
        f"{uri}:2: messages[1].role is 'bot'; expected one of ('system', 'user', 'assistant')"
    )
    with pytest.raises(DataError, match=re.escape(expected)):
        load_chats(uri, scrub=False)
    assert ROLES == ("system", "user", "assistant")


def test_conversation_without_an_assistant_message_is_rejected(tmp_path: Path) -> None:
    uri = _jsonl(tmp_path / "chats.jsonl", [{"messages": [QUESTION, QUESTION]}])
    with pytest.raises(DataError, match=re.escape(f"{uri}:1: no assistant message")):
        load_chats(uri, scrub=False)


@pytest.mark.parametrize(
    ("messages", "message"),
    [
        (None, "expected a non-empty list field 'messages'"),
        ([], "expected a non-empty list field 'messages'"),
        ([QUESTION, "hello"], "messages[1] is not an object"),
        ([{"role": "assistant", "content": 3}], "messages[0].content must be a string"),
        ([{"content": "no role"}], "messages[0].role is None"),
    ],
)
def test_malformed_messages(tmp_path: Path, messages: object, message: str) -> None:
    uri = _jsonl(tmp_path / "chats.jsonl", [{"messages": messages}])
    with pytest.raises(DataError, match=re.escape(f"{uri}:1: {message}")):
        load_chats(uri, scrub=False)


# --- cleaning and scrubbing --------------------------------------------------------------


def test_clean_text_collapses_spaces_drops_blank_lines_and_normalizes() -> None:
    raw = "  Hello\t\t world  \r\n\n \n  second \u000b  line  \nCafe\u0301"
    assert clean_text(raw) == "Hello world\nsecond line\nCaf\u00e9"
    assert clean_text("already clean") == "already clean"
    assert clean_text(" \n\t\n ") == ""


def test_scrub_pii_replaces_emails_and_phones_and_counts_them() -> None:
    text = (
        "Mail jane.doe+orders@mail.example.co.uk or chidi.31@example.com, "
        "call +1 555 101 1996 or 020 7946-0958. Credit of $14.00 after 42 minutes."
    )
    scrubbed, count = scrub_pii(text)
    assert scrubbed == (
        "Mail <EMAIL> or <EMAIL>, call <PHONE> or <PHONE>. Credit of $14.00 after 42 minutes."
    )
    assert count == 4


def test_scrub_pii_leaves_ordinary_text_alone() -> None:
    text = "Surge multiplier 2.4, rated 4 stars, pickup at 20:00, order #4512."
    assert scrub_pii(text) == (text, 0)


def test_iso_dates_are_not_phone_numbers() -> None:
    assert scrub_pii("Delivered on 2026-11-29.") == ("Delivered on 2026-11-29.", 0)


# --- load_documents / load_chats ---------------------------------------------------------


def test_load_documents_drops_short_docs_and_duplicates_with_stats(tmp_path: Path) -> None:
    records = [
        {"text": "The courier was delayed by traffic."},
        {"text": "The   courier was delayed\tby traffic.  "},  # duplicate once cleaned
        {"text": "too short"},
        {"text": "Contact a@b.com or +1 555 101 1996 today."},
        {"text": "Contact c@d.org or +1 555 222 3333 today."},  # duplicate once scrubbed
        {"text": "A refund was issued for the missing item."},
    ]
    uri = _jsonl(tmp_path / "docs.jsonl", records)
    docs, stats = load_documents(uri, min_chars=20, scrub=True)
    assert docs == [
        "The courier was delayed by traffic.",
        "Contact <EMAIL> or <PHONE> today.",
        "A refund was issued for the missing item.",
    ]
    assert stats == IngestStats(read=6, too_short=1, duplicates=2, pii_replacements=4, kept=3)


def test_load_documents_without_scrubbing_keeps_pii_and_distinct_docs(tmp_path: Path) -> None:
    records = [
        {"text": "Contact a@b.com or +1 555 101 1996 today."},
        {"text": "Contact c@d.org or +1 555 222 3333 today."},
    ]
    uri = _jsonl(tmp_path / "docs.jsonl", records)
    docs, stats = load_documents(uri, min_chars=0, scrub=False)
    assert docs == [r["text"] for r in records]
    assert stats == IngestStats(read=2, too_short=0, duplicates=0, pii_replacements=0, kept=2)


def test_short_is_measured_after_cleaning_and_scrubbing(tmp_path: Path) -> None:
    # 18 raw characters but 8 once cleaned; the second is exactly 12 (kept: >= min_chars).
    uri = _jsonl(
        tmp_path / "docs.jsonl", [{"text": "   only   ten     "}, {"text": "12 chars ok!"}]
    )
    docs, stats = load_documents(uri, min_chars=12, scrub=False)
    assert docs == ["12 chars ok!"]
    assert (stats.too_short, stats.kept) == (1, 1)


def test_load_chats_cleans_scrubs_and_deduplicates(tmp_path: Path) -> None:
    records = [
        {"messages": [{"role": "user", "content": "Mail  me at a@b.com"}, ANSWER]},
        {"messages": [{"role": "user", "content": "Mail me at c@d.com"}, ANSWER]},
        {"messages": [QUESTION, ANSWER]},
    ]
    uri = _jsonl(tmp_path / "chats.jsonl", records)
    chats, stats = load_chats(uri, scrub=True)
    assert chats == [
        [{"role": "user", "content": "Mail me at <EMAIL>"}, ANSWER],
        [QUESTION, ANSWER],
    ]
    assert stats == IngestStats(read=3, too_short=0, duplicates=1, pii_replacements=2, kept=2)


# --- held-out split ----------------------------------------------------------------------


def test_content_hash_is_sha256_hex() -> None:
    assert content_hash("abc") == hashlib.sha256(b"abc").hexdigest()


def test_is_heldout_is_stable_and_matches_the_fraction() -> None:
    keys = [content_hash(f"document {i}") for i in range(10_000)]
    first = [is_heldout(k, 0.1) for k in keys]
    assert first == [is_heldout(k, 0.1) for k in keys]
    assert 0.08 <= sum(first) / len(keys) <= 0.12
    assert 0.28 <= sum(is_heldout(k, 0.3) for k in keys) / len(keys) <= 0.32
    # Raising the fraction only moves records into held-out, never out of it.
    assert all(is_heldout(k, 0.3) for k, held in zip(keys, first, strict=True) if held)


def test_is_heldout_reads_the_first_32_bits_of_the_hash() -> None:
    assert is_heldout("00000000" + "f" * 56, 0.01)
    assert not is_heldout("ffffffff" + "0" * 56, 0.49)
    assert is_heldout("19999999" + "0" * 56, 0.1)  # 429496729 / 4294967295 < 0.1
    assert not is_heldout("1999999a" + "0" * 56, 0.1)
