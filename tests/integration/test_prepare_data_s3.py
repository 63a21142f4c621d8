"""prepare_data reading many input files under an s3:// prefix from a real S3 endpoint (moto's
server), writing shards back to S3, and the trainer's reader caching them on the node."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import REPO_ROOT, load_config
from pipeline.data.shards import read_manifest, read_split
from pipeline.runs import check_inputs
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
