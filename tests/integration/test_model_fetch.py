"""Base models from S3 (a real HTTP endpoint: moto's server) and from the MLflow registry:
fetched once per node however many ranks ask at once; tokenizers fetched without the weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline import storage
from pipeline.config import REPO_ROOT, TrackingConfig, load_config
from pipeline.models import COMPLETE_MARKER, fetch_model, resolve_model_uri
from tests.tiny_presets import llama2_style_tokenizer, save_base_model

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

boto3 = pytest.importorskip("boto3")

# Each rank: count its downloads in a shared file, slowed so that the ranks overlap.
RANK_SCRIPT = """
import sys, time
from pipeline import storage
from pipeline.config import TrackingConfig
from pipeline.models import fetch_model

real = storage.download_dir

def counted(uri, local_dir):
    with open(sys.argv[2], "a") as log:
        log.write(uri + "\\n")
    time.sleep(1.0)
    return real(uri, local_dir)

storage.download_dir = counted
print(fetch_model(sys.argv[1], TrackingConfig()))
"""


@pytest.fixture(scope="module")
def s3_env(s3_server: dict[str, str]) -> Iterator[dict[str, str]]:
    """The S3 endpoint's environment (for this process and subprocesses) and a bucket."""
    with pytest.MonkeyPatch.context() as mp:
        for key, value in s3_server.items():
            mp.setenv(key, value)
        boto3.client("s3").create_bucket(Bucket="models")
        yield s3_server


@pytest.fixture(scope="module")
def base_on_s3(
    s3_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> tuple[str, Path]:
    lines = (REPO_ROOT / "configs" / "demo_data" / "domain.jsonl").read_text().splitlines()
    texts = [json.loads(line)["text"] for line in lines[:300]]
    local = save_base_model(tmp_path_factory.mktemp("base"), "llama", llama2_style_tokenizer(texts))
    uri = "s3://models/meta-llama/Llama-2-tiny-hf"
    storage.upload_dir(local, uri)
    return uri, local


def test_ranks_of_a_node_download_the_base_once(
    base_on_s3: tuple[str, Path], s3_env: dict[str, str], tmp_path: Path
) -> None:
    uri, local = base_on_s3
    count = tmp_path / "downloads.log"
    env = {**os.environ, **s3_env, "PIPELINE_MODEL_CACHE": str(tmp_path / "cache")}
    env["PYTHONPATH"] = str(REPO_ROOT)
    ranks = [
        subprocess.Popen(
            [sys.executable, "-c", RANK_SCRIPT, uri, str(count)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    outputs = [rank.communicate(timeout=300) for rank in ranks]
    assert all(rank.returncode == 0 for rank in ranks), [err[-2000:] for _, err in outputs]
    paths = {out.strip().splitlines()[-1] for out, _ in outputs}
    assert count.read_text().splitlines() == [uri]  # one download for four ranks
    assert len(paths) == 1
    cached = Path(paths.pop())
    assert cached.parent == tmp_path / "cache"
    assert (cached / COMPLETE_MARKER).read_text() == uri
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (cached / name).read_bytes() == (local / name).read_bytes()
    # A later stage on the same node finds it complete and downloads nothing.
    os.environ["PIPELINE_MODEL_CACHE"] = str(tmp_path / "cache")
    try:
        assert fetch_model(uri, TrackingConfig()) == cached
    finally:
        del os.environ["PIPELINE_MODEL_CACHE"]
    assert len(count.read_text().splitlines()) == 1


def test_a_half_finished_download_is_redone(
    base_on_s3: tuple[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    uri, local = base_on_s3
    monkeypatch.setenv("PIPELINE_MODEL_CACHE", str(tmp_path))
    first = fetch_model(uri, TrackingConfig())
    (first / COMPLETE_MARKER).unlink()  # as if the rank was killed before the marker
    (first / "model.safetensors").write_bytes(b"truncated")
    again = fetch_model(uri, TrackingConfig())
    assert again == first
    assert (again / "model.safetensors").read_bytes() == (local / "model.safetensors").read_bytes()


def test_prepare_data_reads_only_the_tokenizer_files_of_an_s3_base(
    base_on_s3: tuple[str, Path], tmp_path: Path
) -> None:
    from pipeline.data.tokenizer import training_tokenizer

    uri, _ = base_on_s3
    config = load_config(REPO_ROOT / "configs" / "demo.yaml", {"model.base": uri})
    tok = training_tokenizer(config, tmp_path / "scratch")
    assert len(tok) == 602  # 600 + <|im_start|> <|im_end|>
    fetched = sorted(p.name for p in (tmp_path / "scratch").iterdir())
    assert fetched == ["tokenizer.json", "tokenizer_config.json"]


def test_the_registry_champion_resolves_to_its_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An alias is pinned to its version when resolved; a version is fetched through MLflow
    into the node's cache once (a copy of the version's files, whatever store holds them)."""
    from pipeline import tracking

    monkeypatch.setenv("PIPELINE_MODEL_CACHE", str(tmp_path / "cache"))

    def weights(folder: Path) -> bytes:
        return (folder / "model.safetensors").read_bytes()

    lines = (REPO_ROOT / "configs" / "demo_data" / "domain.jsonl").read_text().splitlines()
    tok = llama2_style_tokenizer([json.loads(line)["text"] for line in lines[:100]], 400)
    first = save_base_model(tmp_path / "v1", "llama", tok)
    second = save_base_model(tmp_path / "v2", "llama", tok, seed=1)
    config = TrackingConfig(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", registered_model="tiny")
    mlc = tracking.client(config)
    mlc.create_registered_model("tiny")
    for folder in (first, second):
        mlc.create_model_version("tiny", source=str(folder))
    mlc.set_registered_model_alias("tiny", tracking.CHAMPION_ALIAS, "1")
    assert resolve_model_uri("models:/tiny@champion", config) == str(first)
    champion = fetch_model("models:/tiny@champion", config)
    assert champion.parent == tmp_path / "cache" and weights(champion) == weights(first)
    assert fetch_model("models:/tiny/1", config) == champion  # one copy per version and node
    mlc.set_registered_model_alias("tiny", tracking.CHAMPION_ALIAS, "2")
    assert weights(fetch_model("models:/tiny@champion", config)) == weights(second)
    with pytest.raises(ValueError, match="expected models:/<name>@<alias>"):
        resolve_model_uri("models:/tiny", config)


def test_a_folder_rewritten_in_place_is_fetched_again(
    s3_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rerun that rebuilds base_model/ at the same s3:// URI must not get last time's copy."""
    monkeypatch.setenv("PIPELINE_MODEL_CACHE", str(tmp_path / "cache"))
    uri = "s3://models/rebuilt/base_model"
    storage.write_bytes(f"{uri}/config.json", b'{"version": 1}')
    first = fetch_model(uri, TrackingConfig())
    assert fetch_model(uri, TrackingConfig()) == first  # unchanged: served from the cache
    storage.write_bytes(f"{uri}/config.json", b'{"version": 2}')
    second = fetch_model(uri, TrackingConfig())
    assert second != first
    assert json.loads((second / "config.json").read_text()) == {"version": 2}
