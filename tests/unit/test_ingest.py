"""Reading and validating records: every bad-input kind is quarantined with file, line, reason."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import RecordFields
from pipeline.data import sources
from pipeline.data.ingest import (
    Rejection,
    chat_messages,
    document_text,
    is_heldout,
    split_key,
)
from pipeline.data.sources import BadRecord, DataError, Record, WorkUnit

ANSWER = {"role": "assistant", "content": "Your refund is on its way."}
QUESTION = {"role": "user", "content": "Where is my refund?"}
FIELDS = RecordFields()


def _records(unit: WorkUnit) -> list[Record | BadRecord]:
    return list(sources.read_unit(unit)[1])


def test_jsonl_bad_lines_do_not_stop_reading_and_keep_their_line_numbers(tmp_path: Path) -> None:
    path = tmp_path / "docs.jsonl"
    path.write_bytes(
        b'{"text": "fine"}\n\n{"text": "broken\n'
        + b'{"text": "caf\xe9"}\n'  # latin-1, not UTF-8
        + b'{"text": "still read"}\n'
    )
    got = _records(WorkUnit(str(path), "jsonl", 0, path.stat().st_size))
    assert [type(r).__name__ for r in got] == ["Record", "BadRecord", "BadRecord", "Record"]
    assert (got[1].line, got[1].reason) == (3, "malformed_json")
    assert (got[2].line, got[2].reason) == (4, "invalid_utf8")
    assert got[3] == Record(5, {"text": "still read"})


def test_units_split_a_file_at_line_starts_and_count_lines(tmp_path: Path) -> None:
    path = tmp_path / "docs.jsonl"
    lines = [json.dumps({"text": f"document number {i}"}) for i in range(200)]
    path.write_text("\n".join(lines) + "\n")
    units = sources.plan_units([str(path)], chunk_bytes=1000)
    assert len(units) > 3
    assert units[0].start == 0 and units[-1].end == path.stat().st_size
    texts, total_lines = [], 0
    for unit in units:
        count, records = sources.read_unit(unit)
        texts += [r.value["text"] for r in records if isinstance(r, Record)]
        total_lines += count
    assert texts == [f"document number {i}" for i in range(200)]
    assert total_lines == 200


def test_line_separator_inside_a_string_is_not_a_line_break(tmp_path: Path) -> None:
    path = tmp_path / "docs.jsonl"
    record = {"text": "first part\u2028second part"}
    path.write_text(json.dumps(record, ensure_ascii=False) + '\n{"text": "b"}\n')
    assert _records(WorkUnit(str(path), "jsonl", 0, -1)) == [
        Record(1, record),
        Record(2, {"text": "b"}),
    ]


def test_json_array_parquet_and_text_inputs(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text(json.dumps([{"text": "one"}, {"text": "two"}]))
    pq.write_table(pa.table({"text": ["three", "four"]}), tmp_path / "b.parquet")
    (tmp_path / "c.txt").write_text("def f():\n    return 1\n")
    uris = sources.expand_inputs(str(tmp_path / "*"), "data.domain_corpus")
    values = [r.value for u in sources.plan_units(uris, 1 << 20) for r in _records(u)]
    assert values == [
        {"text": "one"}, {"text": "two"}, {"text": "three"}, {"text": "four"},
        "def f():\n    return 1\n",
    ]  # fmt: skip


def test_expand_inputs_takes_lists_globs_and_folders_and_names_the_field(tmp_path: Path) -> None:
    for name in ("x.jsonl", "y.jsonl", "notes.bin"):
        (tmp_path / name).write_text("{}\n")
    assert sources.expand_inputs(str(tmp_path), "f") == [
        str(tmp_path / "x.jsonl"),
        str(tmp_path / "y.jsonl"),
    ]
    assert sources.expand_inputs([str(tmp_path / "y.jsonl"), str(tmp_path / "*.jsonl")], "f") == [
        str(tmp_path / "y.jsonl"), str(tmp_path / "x.jsonl"),
    ]  # fmt: skip
    with pytest.raises(DataError, match=r"data\.instructions: no input files found at"):
        sources.expand_inputs(str(tmp_path / "missing-*.jsonl"), "data.instructions")


def test_document_fields_are_checked() -> None:
    assert document_text({"text": "  indented\n    code"}, FIELDS) == "  indented\n    code"
    assert document_text({"body": "x"}, FIELDS) == Rejection(
        "missing_field", "expected a string field 'text'"
    )
    assert document_text({"text": 42}, FIELDS).reason == "wrong_type"  # type: ignore[union-attr]
    assert document_text([1, 2], FIELDS) == Rejection(
        "not_an_object", "expected a JSON object, got list"
    )
    assert document_text({"body": "x"}, RecordFields(text="body")) == "x"


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ({"messages": [QUESTION, {"role": "bot", "content": "hi"}, ANSWER]}, "unknown_role"),
        ({"messages": [QUESTION, QUESTION]}, "no_assistant_turn"),
        ({"messages": [QUESTION, {"role": "assistant", "content": "  \n"}]}, "empty_assistant"),
        ({"messages": [QUESTION, ANSWER, QUESTION]}, "final_turn_not_assistant"),
        ({"messages": []}, "wrong_type"),
        ({"messages": [QUESTION, "hello"]}, "wrong_type"),
        ({"messages": [{"role": "assistant", "content": 3}]}, "wrong_type"),
        ({"chat": []}, "missing_field"),
        ("just text", "not_an_object"),
    ],
)
def test_bad_chats_are_rejected_with_their_reason(value: object, reason: str) -> None:
    result = chat_messages(value, FIELDS)
    assert isinstance(result, Rejection)
    assert result.reason == reason


def test_prompt_response_pairs_and_custom_field_names() -> None:
    pair = chat_messages({"prompt": "Where?", "response": "Here."}, FIELDS)
    assert pair == [
        {"role": "user", "content": "Where?"},
        {"role": "assistant", "content": "Here."},
    ]
    custom = RecordFields(messages="turns", role="from", content="value")
    turns = {"turns": [{"from": "user", "value": "Q"}, {"from": "assistant", "value": "A"}]}
    assert chat_messages(turns, custom) == [
        {"role": "user", "content": "Q"},
        {"role": "assistant", "content": "A"},
    ]


def test_is_heldout_reads_the_first_32_bits_of_the_hash() -> None:
    keys = np.array([0x00000000, 0xFFFFFFFF, 0x19999999, 0x1999999A], dtype=np.uint32)
    assert is_heldout(keys, 0.1).tolist() == [True, False, True, False]
    assert is_heldout(keys, 0.01).tolist() == [True, False, False, False]
    assert split_key("x") == int(hashlib.sha256(b"x").hexdigest()[:8], 16)


def test_old_mac_line_ends_split_records_and_units(tmp_path: Path) -> None:
    path = tmp_path / "mac.jsonl"
    lines = [json.dumps({"text": f"document number {i}"}) for i in range(200)]
    path.write_bytes("\r".join(lines[:100]).encode() + b"\r\n" + "\r".join(lines[100:]).encode())
    assert _records(WorkUnit(str(path), "jsonl", 0, -1))[:2] == [
        Record(1, {"text": "document number 0"}),
        Record(2, {"text": "document number 1"}),
    ]
    units = sources.plan_units([str(path)], chunk_bytes=1000)
    # 6,290 bytes in line-aligned ranges of about 1,000 (the CRLF at byte 3,059 is one line end).
    assert [u.start for u in units] == [0, 1013, 2036, 3059, 4083, 5107, 6131]
    assert all(path.read_bytes()[u.start - 1 : u.start] in (b"\r", b"\n") for u in units[1:])
    texts, total_lines = [], 0
    for unit in units:
        records = sources.stream_unit(unit)
        texts += [r.value["text"] for r in records if isinstance(r, Record)]
        total_lines += records.lines
    assert texts == [f"document number {i}" for i in range(200)]
    assert total_lines == 200


def test_a_line_longer_than_max_record_bytes_is_quarantined_without_being_held(
    tmp_path: Path,
) -> None:
    import tracemalloc

    path = tmp_path / "huge.jsonl"
    huge = b'{"text": "' + b"x" * (16 << 20) + b'"}'
    path.write_bytes(b'{"text": "before"}\n' + huge + b'\n{"text": "after"}\n')
    del huge
    tracemalloc.start()
    got = list(sources.stream_unit(WorkUnit(str(path), "jsonl", 0, -1), max_record_bytes=65536))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert got == [
        Record(1, {"text": "before"}),
        BadRecord(
            2,
            "record_too_long",
            "16777228 bytes, above data.max_record_bytes=65536; skipped without reading it whole",
        ),
        Record(3, {"text": "after"}),
    ]
    assert peak < 4 << 20  # 1 MiB blocks, never the 16 MiB line


def test_empty_and_truncated_parquet_files_are_bad_records_naming_the_file(
    tmp_path: Path,
) -> None:
    good = tmp_path / "good.parquet"
    pq.write_table(pa.table({"text": [f"row {i}" for i in range(50)]}), good)
    (tmp_path / "empty.parquet").write_bytes(b"")
    (tmp_path / "cut.parquet").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    for name in ("empty.parquet", "cut.parquet"):
        uri = str(tmp_path / name)
        [bad] = _records(WorkUnit(uri, "parquet"))
        assert isinstance(bad, BadRecord)
        assert (bad.line, bad.reason) == (1, "unreadable_parquet")
        assert bad.detail.startswith(f"{uri}: not a readable Parquet file after 0 rows (")
    assert len(_records(WorkUnit(str(good), "parquet"))) == 50


def test_lone_surrogates_are_rejected_as_invalid_unicode(tmp_path: Path) -> None:
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "ok"}\n{"text": "emoji half \\ud83d here"}\n')
    records = _records(WorkUnit(str(path), "jsonl", 0, -1))
    assert document_text(records[1].value, FIELDS) == Rejection(  # type: ignore[union-attr]
        "invalid_unicode",
        "field 'text' holds a lone UTF-16 surrogate '\\ud83d' at character 11 (a broken \\u "
        "escape); it is not text",
    )
    chat = {"messages": [{"role": "user", "content": "hi \udfff"}, ANSWER]}
    assert chat_messages(chat, FIELDS) == Rejection(
        "invalid_unicode",
        "messages[0].content holds a lone UTF-16 surrogate '\\udfff' at character 3 (a broken "
        "\\u escape); it is not text",
    )
    paired = json.loads('{"text": "paired \\ud83d\\ude00 is fine"}')  # a whole pair: one emoji
    assert document_text(paired, FIELDS) == "paired \U0001f600 is fine"
