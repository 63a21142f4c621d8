"""prepare_data end to end on a small messy corpus, in process (one worker): what is quarantined,
scrubbed, deduplicated, split and packed, and the shards the trainer reads back."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pipeline.config import load_config
from pipeline.data.chat import IGNORE_INDEX
from pipeline.data.shards import read_manifest, read_split
from pipeline.data.sources import DataError
from pipeline.stages.prepare_data import prepare

REPO = Path(__file__).resolve().parents[2]
WORDS = [
    "refund",
    "courier",
    "order",
    "late",
    "missing",
    "driver",
    "pizza",
    "rain",
    "city",
    "support",
    "ticket",
    "card",
]


def _doc(rng: np.random.Generator, n: int = 120) -> str:
    return " ".join(rng.choice(WORDS, n)) + f" {int(rng.integers(10**9))}."


def _chat(i: int) -> dict[str, Any]:
    return {"messages": [
        {"role": "user", "content": f"Question {i}: where is order {i}?"},
        {"role": "assistant", "content": f"Answer {i}: it left the kitchen {i} minutes ago."},
    ]}  # fmt: skip


def _corpus(tmp_path: Path, bad_lines: list[bytes] | None = None) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    docs = [_doc(rng) for _ in range(200)]
    near = [d.replace("refund", "refunds", 1) + " extra" for d in docs[:20]]
    lines = [json.dumps({"text": d}).encode() for d in docs + near + docs[:10]]
    lines.append(
        json.dumps({"text": "Pay with 4111 1111 1111 1111 from 10.0.0.1 " + _doc(rng)}).encode()
    )
    lines.append(json.dumps({"text": "def f():\n    return 1\n" + _doc(rng)}).encode())
    lines.append(json.dumps({"text": "\n\n".join(_doc(rng, 200) for _ in range(40))}).encode())
    lines += bad_lines or []
    (tmp_path / "a.jsonl").write_bytes(b"\n".join(lines[:150]) + b"\n")
    (tmp_path / "b.jsonl").write_bytes(b"\n".join(lines[150:]) + b"\n")
    chats = [json.dumps(_chat(i)) for i in range(120)]
    last_user = [*_chat(999)["messages"], {"role": "user", "content": "and?"}]
    chats.append(json.dumps({"messages": last_user}))
    (tmp_path / "chats.jsonl").write_text("\n".join(chats) + "\n")
    return {
        "data.domain_corpus": str(tmp_path / "*.jsonl").replace("*.jsonl", "[ab].jsonl"),
        "data.instructions": str(tmp_path / "chats.jsonl"),
        "data.num_workers": 1,
        "data.chunk_bytes": 65536,
        "data.max_doc_chars": 5000,
        "data.seq_len": 128,
        "data.max_bad_fraction": 0.05,
        "storage.artifact_root": str(tmp_path / "artifacts"),
    }


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    tmp = tmp_path_factory.mktemp("messy")
    bad = [b'{"text": oops}', b'{"text": "caf\xe9"}', b'{"body": "x"}']
    config = load_config(REPO / "configs" / "demo.yaml", _corpus(tmp, bad))
    manifest = prepare(config, str(tmp / "out"))
    return manifest, tmp / "out" / "data"


def test_bad_records_are_quarantined_with_file_line_and_reason(
    prepared: tuple[dict[str, Any], Path],
) -> None:
    manifest, data = prepared
    rows = [json.loads(line) for line in (data / "quarantine.jsonl").read_text().splitlines()]
    reasons = sorted(r["reason"] for r in rows)
    assert reasons == [
        "final_turn_not_assistant",
        "invalid_utf8",
        "malformed_json",
        "missing_field",
    ]
    by_reason = {r["reason"]: r for r in rows}
    # b.jsonl holds lines 151..236 of the corpus: the bad ones are its last three lines.
    assert by_reason["malformed_json"]["source"].endswith("b.jsonl")
    assert by_reason["malformed_json"]["line"] == 84
    assert by_reason["invalid_utf8"]["line"] == 85
    assert manifest["counts"]["quarantined"] == {
        "malformed_json": 1, "invalid_utf8": 1, "missing_field": 1, "final_turn_not_assistant": 1,
    }  # fmt: skip


def test_duplicates_pii_and_long_documents_are_counted(
    prepared: tuple[dict[str, Any], Path],
) -> None:
    manifest, data = prepared
    counts = manifest["counts"]
    assert counts["documents"]["exact_duplicates"] == 10
    assert counts["documents"]["near_duplicates"] == 20
    assert counts["pii"] == {"card": 1, "ip": 1}
    assert counts["corpora"]["domain"]["long_split"] == 1
    assert counts["corpora"]["domain"]["long_pieces"] >= 2
    heldout = json.loads((data / "heldout.json").read_text())
    assert not any("4111" in d for d in heldout["documents"])
    assert len(heldout["chats"]) == counts["chats"]["heldout"] > 0


def test_shards_round_trip_and_match_the_manifest(prepared: tuple[dict[str, Any], Path]) -> None:
    manifest, data = prepared
    assert read_manifest(str(data)) == manifest
    assert manifest["token_dtype"] == "uint16"
    for split in ("cpt_train", "cpt_heldout", "sft_train", "sft_heldout"):
        blocks = read_split(str(data), manifest, split)
        entry = manifest["splits"][split]
        assert blocks.input_ids.shape == (entry["blocks"], 128)
        every = np.arange(len(blocks))
        labels = blocks.labels[every]
        assert (
            int((labels != IGNORE_INDEX).sum()) == entry["trained_tokens"] == blocks.trained_tokens
        )
        assert (labels[blocks.position_ids[every] == 0] == IGNORE_INDEX).all()
    cpt = manifest["splits"]["cpt_train"]
    assert cpt["packing_efficiency"] > 0.99


def test_indentation_survives_into_the_shards(prepared: tuple[dict[str, Any], Path]) -> None:
    from transformers import AutoTokenizer

    manifest, data = prepared
    tok = AutoTokenizer.from_pretrained(str(data.parent / "tokenizer"))
    blocks = read_split(str(data), manifest, "cpt_train")
    text = "".join(tok.decode(row) for row in blocks.input_ids[np.arange(len(blocks))])
    heldout = json.loads((data / "heldout.json").read_text())["documents"]
    assert "def f():\n    return 1" in text or any("def f():\n    return 1" in d for d in heldout)


def test_a_corrupted_shard_is_refused(
    prepared: tuple[dict[str, Any], Path], tmp_path: Path
) -> None:
    manifest, data = prepared
    entry = json.loads(json.dumps(manifest))
    entry["splits"]["sft_train"]["shards"][0]["sha256"]["ids"] = "0" * 64
    with pytest.raises(ValueError, match="does not match its manifest checksum"):
        read_split(str(data), entry, "sft_train")


def test_too_many_bad_records_fail_listing_lines_and_reasons(tmp_path: Path) -> None:
    bad = [b'{"text": oops}'] * 30
    config = load_config(REPO / "configs" / "demo.yaml", _corpus(tmp_path, bad))
    with pytest.raises(DataError) as err:
        prepare(config, str(tmp_path / "out"))
    message = str(err.value)
    assert re.search(r"31 of \d+ records are bad", message)
    assert "malformed_json: 30, final_turn_not_assistant: 1" in message
    assert f"{tmp_path / 'b.jsonl'}:84: not valid JSON" in message


def test_replay_corpus_is_mixed_at_the_token_ratio(tmp_path: Path) -> None:
    overrides = _corpus(tmp_path)
    rng = np.random.default_rng(5)
    replay = tmp_path / "replay.parquet"
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": [f"general {i} " + _doc(rng) for i in range(300)]}), replay)
    overrides |= {"data.replay_corpus": str(replay), "data.replay_ratio": 0.25}
    config = load_config(REPO / "configs" / "demo.yaml", overrides)
    with pytest.raises(DataError, match="missing_field"):
        prepare(config, str(tmp_path / "out"))  # replay records need the configured field
    overrides["data.text_field"] = "text"
    config = load_config(REPO / "configs" / "demo.yaml", overrides)
    replay.unlink()
    pq.write_table(pa.table({"text": [f"general {i} " + _doc(rng) for i in range(300)]}), replay)
    manifest = prepare(config, str(tmp_path / "out2"))
    share = manifest["counts"]["documents"]["replay_token_share"]
    assert 0.22 <= share <= 0.26
    assert manifest["counts"]["documents"]["replay_documents"] > 0
