"""Local artifact storage: atomic writes, the commit protocol, folder copies."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from pipeline import storage


def test_write_and_read_json_round_trip(tmp_path: Path) -> None:
    uri = str(tmp_path / "a" / "b" / "metrics.json")
    storage.write_json(uri, {"loss": 1.25, "steps": [1, 2, 3], "name": "cpt"})
    assert storage.read_json(uri) == {"loss": 1.25, "steps": [1, 2, 3], "name": "cpt"}
    # Keys are sorted and indented so that stored results diff cleanly.
    assert Path(uri).read_text() == (
        '{\n  "loss": 1.25,\n  "name": "cpt",\n  "steps": [\n    1,\n    2,\n    3\n  ]\n}'
    )


def test_write_bytes_replaces_atomically_and_leaves_no_temp_files(tmp_path: Path) -> None:
    uri = str(tmp_path / "out" / "blob.bin")
    storage.write_bytes(uri, b"first")
    storage.write_bytes(uri, b"second, longer")
    assert storage.read_bytes(uri) == b"second, longer"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["blob.bin"]
    # Readable by the other services that share the artifact folder, not 0600 like mkstemp's.
    assert stat.S_IMODE(os.stat(uri).st_mode) == 0o644


def test_failed_write_keeps_the_old_file_and_removes_its_temp_file(tmp_path: Path) -> None:
    uri = str(tmp_path / "blob.bin")
    storage.write_bytes(uri, b"old")
    with pytest.raises(TypeError):
        storage.write_bytes(uri, "not bytes")  # type: ignore[arg-type]
    assert storage.read_bytes(uri) == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["blob.bin"]


def test_exists(tmp_path: Path) -> None:
    uri = str(tmp_path / "x.json")
    assert not storage.exists(uri)
    storage.write_json(uri, {})
    assert storage.exists(uri)


def test_read_of_missing_file_names_it(tmp_path: Path) -> None:
    uri = str(tmp_path / "missing.json")
    with pytest.raises(FileNotFoundError, match=r"missing\.json"):
        storage.read_json(uri)


def test_commit_writes_result_then_success_and_committed_result_returns_it(
    tmp_path: Path,
) -> None:
    stage_dir = storage.stage_uri(str(tmp_path), "run-1", "continued_pretraining")
    assert stage_dir == f"{tmp_path}/run-1/continued_pretraining"
    assert storage.committed_result(stage_dir) is None
    result = {"stage": "continued_pretraining", "status": "ok", "metrics": {"loss": 2.5}}
    storage.commit(stage_dir, result)
    assert storage.committed_result(stage_dir) == result
    marker = Path(stage_dir, storage.SUCCESS_MARKER)
    assert marker.read_bytes() == b""
    assert marker.stat().st_mtime_ns >= Path(stage_dir, storage.RESULT_FILE).stat().st_mtime_ns


def test_result_without_success_marker_is_not_trusted(tmp_path: Path) -> None:
    stage_dir = str(tmp_path / "stage")
    storage.write_json(storage.join(stage_dir, storage.RESULT_FILE), {"status": "ok"})
    assert storage.committed_result(stage_dir) is None


def make_tree(root: Path) -> dict[str, bytes]:
    files = {
        "config.json": b'{"hidden_size": 64}',
        "model/weights.bin": bytes(range(256)) * 4,
        "model/shards/part-00000.bin": b"\x00\x01",
    }
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return files


def read_tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_upload_dir_copies_nested_files(tmp_path: Path) -> None:
    files = make_tree(tmp_path / "src")
    target = str(tmp_path / "artifacts" / "run" / "checkpoint")
    storage.upload_dir(tmp_path / "src", target)
    assert read_tree(Path(target)) == files
    # Uploading a folder onto itself is a no-op.
    storage.upload_dir(target, target)
    assert read_tree(Path(target)) == files


def test_upload_of_missing_folder_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope"):
        storage.upload_dir(tmp_path / "nope", str(tmp_path / "dst"))


def test_download_dir_on_a_local_folder_returns_it_in_place(tmp_path: Path) -> None:
    files = make_tree(tmp_path / "ckpt")
    scratch = tmp_path / "scratch"
    got = storage.download_dir(str(tmp_path / "ckpt"), scratch)
    assert got == tmp_path / "ckpt"
    assert read_tree(got) == files
    assert not scratch.exists()


def test_download_of_missing_folder_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"artifact folder not found: .*/absent"):
        storage.download_dir(str(tmp_path / "absent"), tmp_path / "scratch")


def test_join_and_uri_kinds() -> None:
    assert storage.join("s3://bucket/prefix/", "/run/", "stage") == "s3://bucket/prefix/run/stage"
    assert storage.join("/tmp/a", "b") == "/tmp/a/b"
    assert storage.is_s3("s3://b/k") and not storage.is_s3("/tmp/s3://x")
