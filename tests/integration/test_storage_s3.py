"""S3 artifact storage against a real HTTP S3 endpoint (moto's server), through boto3."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pipeline import storage

pytestmark = pytest.mark.integration

boto3 = pytest.importorskip("boto3")


@pytest.fixture(scope="module")
def s3_endpoint(s3_server: dict[str, str]) -> str:
    """The session's moto S3 server (tests/conftest.py)."""
    return s3_server["AWS_ENDPOINT_URL"]


@pytest.fixture
def bucket(
    s3_endpoint: str, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> str:
    """A fresh bucket per test, with boto3 pointed at the local endpoint only."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/aws-config")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/aws-credentials")
    name = request.node.name.replace("_", "-").lower()[:50].strip("-")
    boto3.client("s3").create_bucket(Bucket=name)
    return name


def test_write_read_json_and_exists(bucket: str) -> None:
    uri = f"s3://{bucket}/run-1/prepare_data/manifest.json"
    assert not storage.exists(uri)
    storage.write_json(uri, {"shards": ["a", "b"], "tokens": 123456})
    assert storage.exists(uri)
    assert storage.read_json(uri) == {"shards": ["a", "b"], "tokens": 123456}
    # The object really is in the bucket under that key.
    body = boto3.client("s3").get_object(Bucket=bucket, Key="run-1/prepare_data/manifest.json")
    stored = body["Body"].read()
    assert stored == b'{\n  "shards": [\n    "a",\n    "b"\n  ],\n  "tokens": 123456\n}'


def test_read_of_missing_key_raises_file_not_found_naming_the_uri(bucket: str) -> None:
    uri = f"s3://{bucket}/run-1/nothing/result.json"
    with pytest.raises(FileNotFoundError) as info:
        storage.read_bytes(uri)
    assert str(info.value) == uri


def test_commit_writes_result_then_success(bucket: str) -> None:
    stage_dir = storage.stage_uri(f"s3://{bucket}/pipeline", "run-7", "evaluate")
    assert stage_dir == f"s3://{bucket}/pipeline/run-7/evaluate"
    assert storage.committed_result(stage_dir) is None
    result = {"stage": "evaluate", "status": "ok", "metrics": {"domain_bpb": 0.91}}
    storage.commit(stage_dir, result)
    assert storage.committed_result(stage_dir) == result
    listing = boto3.client("s3").list_objects_v2(Bucket=bucket, Prefix="pipeline/run-7/evaluate/")
    objects = {obj["Key"]: obj for obj in listing["Contents"]}
    prefix = "pipeline/run-7/evaluate"
    assert set(objects) == {f"{prefix}/result.json", f"{prefix}/_SUCCESS"}
    assert objects[f"{prefix}/_SUCCESS"]["Size"] == 0


def test_result_without_success_marker_is_not_trusted(bucket: str) -> None:
    stage_dir = f"s3://{bucket}/run-1/continued_pretraining"
    storage.write_json(f"{stage_dir}/result.json", {"status": "ok"})
    assert storage.committed_result(stage_dir) is None


def test_upload_and_download_dir_round_trip_nested_files(bucket: str, tmp_path: Path) -> None:
    files = {
        "config.json": b'{"hidden_size": 64}',
        "model.safetensors": bytes(range(256)) * 64,
        "tokenizer/tokenizer.json": b'{"version": "1.0"}',
        "optim/rank_0/state.pt": b"\x00" * 10,
    }
    src = tmp_path / "src"
    for rel, data in files.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(data)
    uri = f"s3://{bucket}/run-1/sft/checkpoint/"
    storage.upload_dir(src, uri)
    keys = boto3.client("s3").list_objects_v2(Bucket=bucket)["Contents"]
    assert sorted(obj["Key"] for obj in keys) == sorted(
        f"run-1/sft/checkpoint/{rel}" for rel in files
    )

    dst = tmp_path / "dst"
    assert storage.download_dir(uri, dst) == dst
    got = {p.relative_to(dst).as_posix(): p.read_bytes() for p in dst.rglob("*") if p.is_file()}
    assert got == files


def test_download_dir_takes_only_the_folder_not_its_siblings(bucket: str, tmp_path: Path) -> None:
    storage.write_bytes(f"s3://{bucket}/run-1/ckpt/a.bin", b"a")
    storage.write_bytes(f"s3://{bucket}/run-1/ckpt-old/b.bin", b"b")
    dst = storage.download_dir(f"s3://{bucket}/run-1/ckpt", tmp_path / "dst")
    assert sorted(p.name for p in dst.rglob("*")) == ["a.bin"]


def test_download_dir_skips_folder_marker_objects(bucket: str, tmp_path: Path) -> None:
    client = boto3.client("s3")
    client.put_object(Bucket=bucket, Key="models/base/", Body=b"")
    client.put_object(Bucket=bucket, Key="models/base/tokenizer/", Body=b"")
    client.put_object(Bucket=bucket, Key="models/base/tokenizer/vocab.json", Body=b"{}")
    dst = storage.download_dir(f"s3://{bucket}/models/base", tmp_path / "dst")
    files = sorted(p.relative_to(dst).as_posix() for p in dst.rglob("*") if p.is_file())
    assert files == ["tokenizer/vocab.json"]


def test_download_of_missing_folder_raises(bucket: str, tmp_path: Path) -> None:
    uri = f"s3://{bucket}/run-1/absent"
    expected = re.escape(f"artifact folder not found or empty: {uri}")
    with pytest.raises(FileNotFoundError, match=expected):
        storage.download_dir(uri, tmp_path / "dst")


def test_upload_of_missing_local_folder_raises(bucket: str, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope"):
        storage.upload_dir(tmp_path / "nope", f"s3://{bucket}/run-1/x")


def test_local_staging_uploads_on_success_only(bucket: str) -> None:
    uri = f"s3://{bucket}/run/stage/model"
    with storage.local_staging(uri) as folder:
        (folder / "weights.bin").write_bytes(b"\x00\x01")
        (folder / "sub").mkdir()
        (folder / "sub" / "config.json").write_text("{}")
    assert storage.read_bytes(f"{uri}/weights.bin") == b"\x00\x01"
    assert storage.read_bytes(f"{uri}/sub/config.json") == b"{}"
    assert not folder.exists()  # the scratch copy is gone

    failed = f"s3://{bucket}/run/stage/failed"
    with pytest.raises(RuntimeError), storage.local_staging(failed) as folder:
        (folder / "half.bin").write_bytes(b"x")
        raise RuntimeError("training died")
    assert not storage.exists(f"{failed}/half.bin")


@pytest.mark.parametrize(
    "key", ["{model}/../../../../{outside}", "{model}//{outside}", "{model}/./x.txt"]
)
def test_object_keys_never_write_outside_the_download_folder(
    bucket: str, tmp_path: Path, key: str
) -> None:
    outside = tmp_path / "outside.txt"
    model = f"models/{tmp_path.name}"  # the parametrized cases share the bucket
    client = boto3.client("s3")
    client.put_object(Bucket=bucket, Key=f"{model}/config.json", Body=b"{}")
    planted = key.format(model=model, outside=str(outside).lstrip("/"))
    client.put_object(Bucket=bucket, Key=planted, Body=b"planted")
    with pytest.raises(ValueError, match="would write outside the download folder") as err:
        storage.download_dir(f"s3://{bucket}/{model}", tmp_path / "download")
    assert f"s3://{bucket}/{planted}" in str(err.value)
    assert not outside.exists() and not (tmp_path / "x.txt").exists()
