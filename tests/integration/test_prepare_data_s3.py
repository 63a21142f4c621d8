"""prepare_data reading many input files under an s3:// prefix from a real S3 endpoint (moto's
server), writing shards back to S3, and the trainer's reader caching them on the node."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import REPO_ROOT, load_config
from pipeline.data.shards import read_manifest, read_split
from pipeline.preflight import check_inputs
from pipeline.stages.prepare_data import prepare

pytestmark = pytest.mark.integration
boto3 = pytest.importorskip("boto3")


@pytest.fixture(scope="module")
def s3_endpoint(s3_server: dict[str, str]) -> str:
    """The session's moto S3 server (tests/conftest.py)."""
    return s3_server["AWS_ENDPOINT_URL"]


@pytest.fixture
def bucket(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/aws-config")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/aws-credentials")
    monkeypatch.setenv("PIPELINE_SHARD_CACHE", str(tmp_path / "shard-cache"))
    boto3.client("s3").create_bucket(Bucket="corpus")
    return "corpus"


def test_many_s3_files_are_read_and_shards_written_back(bucket: str, tmp_path: Path) -> None:
    s3 = boto3.client("s3")
    domain = (REPO_ROOT / "configs" / "demo_data" / "domain.jsonl").read_text().splitlines()
    for part in range(8):  # eight domain files, one with a bad line
        lines = domain[part::8] + (['{"text": broken'] if part == 3 else [])
        s3.put_object(Bucket=bucket, Key=f"domain/part-{part}.jsonl", Body="\n".join(lines))
    chats = (REPO_ROOT / "configs" / "demo_data" / "instructions.jsonl").read_text()
    s3.put_object(Bucket=bucket, Key="chats/all.jsonl", Body=chats)
    s3.put_object(Bucket=bucket, Key="domain/README", Body=b"not data")
    config = load_config(
        REPO_ROOT / "configs" / "demo.yaml",
        {
            "data.domain_corpus": f"s3://{bucket}/domain/",
            "data.instructions": [f"s3://{bucket}/chats/*.jsonl"],
            "data.num_workers": 2,
            "data.chunk_bytes": 65536,
        },
    )
    check_inputs(config)
    out = f"s3://{bucket}/runs/r1/prepare_data"
    manifest = prepare(config, out)

    assert [s["uri"] for s in manifest["sources"]["domain"]] == [
        f"s3://{bucket}/domain/part-{i}.jsonl" for i in range(8)
    ]
    assert manifest["counts"]["corpora"]["domain"]["read"] == len(domain) + 1
    assert manifest["counts"]["quarantined"] == {"malformed_json": 1}
    quarantine = s3.get_object(Bucket=bucket, Key="runs/r1/prepare_data/data/quarantine.jsonl")
    row = json.loads(quarantine["Body"].read())
    assert (row["source"], row["line"]) == (f"s3://{bucket}/domain/part-3.jsonl", 194)
    data_uri = f"{out}/data"
    assert read_manifest(data_uri) == manifest
    blocks = read_split(data_uri, manifest, "cpt_train")
    rows = blocks.input_ids[np.array([0, len(blocks) - 1])]
    assert rows.shape == (2, 256)
    assert len(list((tmp_path / "shard-cache").rglob("*.npy"))) == 2  # ids and flags, cached
    heldout = json.loads(
        s3.get_object(Bucket=bucket, Key="runs/r1/prepare_data/data/heldout.json")["Body"].read()
    )
    assert heldout["documents"] and heldout["chats"]
    assert s3.head_object(Bucket=bucket, Key="runs/r1/prepare_data/tokenizer/tokenizer.json")


def test_too_many_bad_records_leave_the_quarantine_file_in_the_bucket(bucket: str) -> None:
    from pipeline.data.sources import DataError

    s3 = boto3.client("s3")
    domain = (REPO_ROOT / "configs" / "demo_data" / "domain.jsonl").read_text().splitlines()
    s3.put_object(
        Bucket=bucket, Key="bad/domain.jsonl", Body="\n".join(domain + ['{"text": x}'] * 40)
    )
    chats = (REPO_ROOT / "configs" / "demo_data" / "instructions.jsonl").read_text()
    s3.put_object(Bucket=bucket, Key="bad/chats.jsonl", Body=chats)
    config = load_config(
        REPO_ROOT / "configs" / "demo.yaml",
        {
            "data.domain_corpus": f"s3://{bucket}/bad/domain.jsonl",
            "data.instructions": f"s3://{bucket}/bad/chats.jsonl",
            "data.num_workers": 1,
        },
    )
    out = f"s3://{bucket}/runs/bad/prepare_data"
    with pytest.raises(DataError) as err:
        prepare(config, out)
    body = s3.get_object(Bucket=bucket, Key="runs/bad/prepare_data/data/quarantine.jsonl")["Body"]
    assert f"every bad record is listed in {out}/data/quarantine.jsonl" in str(err.value)
    rows = [json.loads(line) for line in body.read().splitlines()]
    assert len(rows) == 40
    assert (rows[0]["source"], rows[0]["line"], rows[0]["reason"]) == (
        f"s3://{bucket}/bad/domain.jsonl", len(domain) + 1, "malformed_json",
    )  # fmt: skip
    assert "runs/bad/prepare_data/data/manifest.json" not in [
        o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="runs/bad/")["Contents"]
    ]


def test_a_corrupt_shard_download_is_not_cached_and_a_fixed_object_then_loads(
    bucket: str, tmp_path: Path
) -> None:
    from pipeline.data.shards import ShardWriter

    local = tmp_path / "shards"
    local.mkdir()
    writer = ShardWriter(local, "cpt_train", shard_blocks=8, dtype=np.dtype(np.uint16))
    ids = np.arange(8 * 16, dtype=np.int64).reshape(8, 16) % 1000
    writer(ids, np.full((8, 16), 3, dtype=np.uint8))
    manifest = {"splits": {"cpt_train": writer.close()}, "seq_len": 16}
    s3 = boto3.client("s3")
    files = manifest["splits"]["cpt_train"]["shards"][0]["files"]
    for name in files.values():
        s3.put_object(Bucket=bucket, Key=f"shards/{name}", Body=(local / name).read_bytes())
    good = (local / files["ids"]).read_bytes()
    s3.put_object(Bucket=bucket, Key=f"shards/{files['ids']}", Body=good[:-8] + b"\0" * 8)
    data_uri = f"s3://{bucket}/shards"
    cache = tmp_path / "shard-cache"

    with pytest.raises(ValueError, match=f"shard {data_uri}/{files['ids']} does not match"):
        read_split(data_uri, manifest, "cpt_train")
    assert sorted(p.name for p in cache.rglob("*") if p.is_file()) == []  # nothing poisoned
    s3.put_object(Bucket=bucket, Key=f"shards/{files['ids']}", Body=good)  # the object is fixed
    blocks = read_split(data_uri, manifest, "cpt_train")
    assert blocks.input_ids[np.arange(8)].tolist() == ids.tolist()
    assert len([p for p in cache.rglob("*") if p.is_file()]) == 2  # ids and flags, verified

    # A cached copy damaged on the node's disk is removed and fetched again.
    sha = manifest["splits"]["cpt_train"]["shards"][0]["sha256"]["ids"]
    cached = cache / sha[:2] / f"{sha}.npy"
    cached.write_bytes(b"damaged")
    assert read_split(data_uri, manifest, "cpt_train").input_ids[np.arange(8)].tolist() == (
        ids.tolist()
    )
    assert cached.read_bytes() == good
