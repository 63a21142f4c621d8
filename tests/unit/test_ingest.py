"""Reading and validating records: every bad-input kind is quarantined with file, line, reason."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.data import sources
from pipeline.data.ingest import Fields, Rejection, chat_messages, document_text, is_heldout
from pipeline.data.sources import BadRecord, DataError, Record, WorkUnit

ANSWER = {"role": "assistant", "content": "Your refund is on its way."}
QUESTION = {"role": "user", "content": "Where is my refund?"}
FIELDS = Fields()


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
    assert document_text({"body": "x"}, Fields(text="body")) == "x"


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
    custom = Fields(messages="turns", role="from", content="value")
    turns = {"turns": [{"from": "user", "value": "Q"}, {"from": "assistant", "value": "A"}]}
    assert chat_messages(turns, custom) == [
        {"role": "user", "content": "Q"},
        {"role": "assistant", "content": "A"},
    ]


def test_is_heldout_reads_the_first_32_bits_of_the_hash() -> None:
    assert is_heldout("00000000" + "f" * 56, 0.01)
    assert not is_heldout("ffffffff" + "0" * 56, 0.49)
    assert is_heldout("19999999" + "0" * 56, 0.1)
    assert not is_heldout("1999999a" + "0" * 56, 0.1)
