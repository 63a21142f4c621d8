"""Hugging Face ``datasets`` inputs and Parquet row groups as work units: every row read once,
in order, numbered as in its file, whatever the units; untrusted dataset metadata refused."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.data import sources
from pipeline.data.sources import DataError, Record

ROWS = [
    {"text": f"document {i} about a late courier " + "x" * (i % 37), "id": i} for i in range(900)
]


def _read_all(
    spec: str | list[str], chunk_bytes: int
) -> tuple[list[sources.WorkUnit], list[tuple[str, int, dict]]]:
    units = sources.plan_units(sources.expand_inputs(spec, "data.domain_corpus"), chunk_bytes)
    out = []
    before: dict[str, int] = {}
    for unit in units:
        records = sources.stream_unit(unit)
        for record in records:
            assert isinstance(record, Record)
            out.append((unit.uri, before.get(unit.uri, 0) + record.line, record.value))
        before[unit.uri] = before.get(unit.uri, 0) + records.lines
    return units, out


def test_a_save_to_disk_folder_is_read_in_row_ranges_of_its_arrow_files(tmp_path: Path) -> None:
    folder = tmp_path / "saved"
    datasets.Dataset.from_list(ROWS).save_to_disk(str(folder), max_shard_size="20KB")
    arrow_files = sorted(folder.glob("*.arrow"))
    assert len(arrow_files) >= 2
    units, rows = _read_all(str(folder), chunk_bytes=8192)
    assert len(units) > len(arrow_files)  # files split into row ranges, not read whole
    assert {u.fmt for u in units} == {"arrow"}
    assert [r[2] for r in rows] == ROWS
    # Row numbers run on across a file's units: the n-th row of a file is row n.
    first_file = [r for r in rows if r[0] == units[0].uri]
    assert [r[1] for r in first_file] == list(range(1, len(first_file) + 1))
    assert sum(u.size for u in units) == sum(f.stat().st_size for f in arrow_files)


def test_a_dataset_dict_folder_gives_its_train_split(tmp_path: Path) -> None:
    folder = tmp_path / "dict"
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list(ROWS[:50]),
            "test": datasets.Dataset.from_list(ROWS[50:60]),
        }
    ).save_to_disk(str(folder))
    _, rows = _read_all(str(folder), chunk_bytes=1 << 20)
    assert [r[2] for r in rows] == ROWS[:50]
    only_test = tmp_path / "only-test"
    datasets.DatasetDict({"test": datasets.Dataset.from_list(ROWS[:5])}).save_to_disk(
        str(only_test)
    )
    with pytest.raises(
        DataError, match=r"data.domain_corpus: .*only-test is a DatasetDict with splits \['test'\]"
    ):
        sources.expand_inputs(str(only_test), "data.domain_corpus")


def test_state_json_naming_a_file_outside_the_folder_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "saved"
    datasets.Dataset.from_list(ROWS[:10]).save_to_disk(str(folder))
    (tmp_path / "secret.arrow").write_bytes(b"not yours")
    state = json.loads((folder / "state.json").read_text())
    state["_data_files"] = [{"filename": "../secret.arrow"}]
    (folder / "state.json").write_text(json.dumps(state))
    with pytest.raises(DataError, match=r"names a data file outside its folder: '../secret.arrow'"):
        sources.expand_inputs(str(folder), "data.domain_corpus")


def test_a_hub_layout_folder_reads_its_train_files_and_not_its_card(tmp_path: Path) -> None:
    folder = tmp_path / "hub"
    (folder / "data").mkdir(parents=True)
    (folder / "README.md").write_text("---\nlicense: cc-by-4.0\n---\n# Delivery tickets\n")
    pq.write_table(
        pa.Table.from_pylist(ROWS[:300]), folder / "data" / "train-00000-of-00002.parquet"
    )
    pq.write_table(
        pa.Table.from_pylist(ROWS[300:600]), folder / "data" / "train-00001-of-00002.parquet"
    )
    pq.write_table(
        pa.Table.from_pylist(ROWS[600:]), folder / "data" / "test-00000-of-00001.parquet"
    )
    _, rows = _read_all(str(folder), chunk_bytes=1 << 20)
    assert [r[2] for r in rows] == ROWS[:600]  # train only, the card never a document


def test_a_large_parquet_file_is_split_by_row_groups(tmp_path: Path) -> None:
    path = tmp_path / "big.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), path, row_group_size=100)
    units, rows = _read_all(str(path), chunk_bytes=1)  # one row group per unit
    assert len(units) == 9 and [(u.start, u.end) for u in units][:2] == [(0, 1), (1, 2)]
    assert [r[2] for r in rows] == ROWS
    assert [r[1] for r in rows] == list(range(1, 901))


def test_a_streamed_source_gives_one_unit_per_shard(tmp_path: Path) -> None:
    folder = tmp_path / "jsonl"
    folder.mkdir()
    for part in range(3):
        lines = [json.dumps(r) for r in ROWS[part * 300 : (part + 1) * 300]]
        (folder / f"part-{part}.jsonl").write_text("\n".join(lines) + "\n")
    spec = f"hf:{folder}"
    units, rows = _read_all(spec, chunk_bytes=1 << 20)
    assert [(u.fmt, u.start, u.end) for u in units] == [("hf", 0, 3), ("hf", 1, 3), ("hf", 2, 3)]
    assert sorted(r[2]["id"] for r in rows) == list(range(900))
    with pytest.raises(DataError, match=r"datasets cannot stream 'hf:/no/such/dataset'"):
        sources.plan_units(sources.expand_inputs("hf:/no/such/dataset", "f"), 1 << 20)
