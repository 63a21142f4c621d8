"""Evaluate and promote end to end, as their stage entrypoints run them: real data preparation on
the demo corpus, tiny models on disk, Ray tasks on an in-process local cluster, MLflow on SQLite.

A briefly trained candidate beats the random base and becomes champion; then a deliberately
damaged candidate (the trained weights scaled by 3) is scored against that champion, fails its
gates and is registered as challenger only: the promote task ends skipped with the reason.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pipeline.config import REPO_ROOT, JudgeConfig, PipelineConfig, load_config
from pipeline.identity import write_resolved_config
from pipeline.stages import evaluate, prepare_data, promote
from pipeline.stages.entrypoint import stage_main

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]


def _config(root: Path) -> PipelineConfig:
    return load_config(
        REPO_ROOT / "configs" / "demo.yaml",
        {
            "storage.artifact_root": str(root / "artifacts"),
            "tracking.tracking_uri": f"sqlite:///{root}/mlflow.db",
            "tracking.artifact_location": str(root / "mlruns"),
            "tracking.registered_model": "eval-test",
            "eval.max_documents": 16,
            "eval.max_generations": 4,
            "eval.max_new_tokens": 16,
            "eval.num_workers": 2,
        },
    )


def _train_briefly(base: Path, data_uri: str, out: Path, steps: int = 40) -> None:
    """A plain torch loop over the packed training blocks: enough to beat the random init."""
    import torch
    from transformers import AutoModelForCausalLM

    from pipeline.data.shards import read_manifest, read_split
    from pipeline.data.tokenizer import load_tokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    blocks = read_split(data_uri, read_manifest(data_uri), "cpt_train")
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for step in range(steps):
        rows = [(step * 4 + i) % len(blocks) for i in range(4)]
        ids = torch.as_tensor(blocks.input_ids[rows], dtype=torch.long)
        labels = torch.as_tensor(blocks.labels[rows], dtype=torch.long)
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(str(out))
    load_tokenizer(base).save_pretrained(str(out))


def _damage(good: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from pipeline.data.tokenizer import load_tokenizer

    model = AutoModelForCausalLM.from_pretrained(str(good), dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("proj.weight"):
                param.mul_(3.0)
    model.save_pretrained(str(out))
    load_tokenizer(good).save_pretrained(str(out))


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    """A private in-process cluster, never another test's head: the worker's local Ray of
    ``in_process_ray`` (tests/conftest.py), started before anything could make its fork fail."""
    import ray

    assert ray.is_initialized()
    yield


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory, local_ray: None) -> dict[str, Any]:
    from pipeline.data.tokenizer import load_tokenizer
    from pipeline.train.model import build_model

    root = tmp_path_factory.mktemp("evalpromote")
    cfg = _config(root)
    config_uri = write_resolved_config(cfg, "prep")
    data = stage_main(
        "prepare_data", prepare_data.run, ["--config", config_uri, "--run-key", "prep"]
    )["outputs"]
    tok = load_tokenizer(data["tokenizer"])
    base = root / "base"
    build_model(cfg.model, tok, cfg.data.seq_len, seed=0).save_pretrained(str(base))
    tok.save_pretrained(str(base))
    good, damaged = root / "good", root / "damaged"
    _train_briefly(base, data["data"], good)
    _damage(good, damaged)
    return {"root": root, "cfg": cfg, "data": data, "base": base, "good": good, "bad": damaged}


def _evaluate_and_promote(
    prepared: dict[str, Any], key: str, candidate: Path, cfg: PipelineConfig | None = None
) -> dict[str, Any]:
    """Write the upstream result evaluate reads, then run evaluate and promote's entrypoints."""
    from pipeline import storage

    cfg = cfg or prepared["cfg"]
    config_uri = write_resolved_config(cfg, key)
    upstream = storage.stage_uri(cfg.storage.artifact_root, key, "instruction_finetuning")
    outputs = {
        **prepared["data"],
        "base_model": str(prepared["base"]),
        "cpt_model": str(prepared["good"]),
        "sft_model": str(candidate),
    }
    storage.commit(upstream, {"stage": "instruction_finetuning", "outputs": outputs})
    args = ["--config", config_uri, "--run-key", key]
    ev = stage_main("evaluate", evaluate.run, [*args, "--input", upstream])
    pr = stage_main("promote", promote.run, [*args, "--input", ev["output_uri"]])
    report = json.loads(Path(ev["outputs"]["eval_report"]).read_text())
    return {"evaluate": ev, "promote": pr, "report": report}


def _is_png(path: Path) -> bool:
    head = path.read_bytes()[:24]
    width, height = struct.unpack(">II", head[16:24])
    return head[:8] == b"\x89PNG\r\n\x1a\n" and width > 100 and height > 100


@pytest.fixture(scope="module")
def first(prepared: dict[str, Any]) -> dict[str, Any]:
    return _evaluate_and_promote(prepared, "run-good", prepared["good"])


@pytest.fixture(scope="module")
def judge_endpoint() -> Iterator[str]:
    """The OpenAI-compatible test endpoint of test_judge (checks the bearer token)."""
    from http.server import ThreadingHTTPServer
    from threading import Thread

    from tests.integration.test_judge import JudgeHandler

    server = ThreadingHTTPServer(("127.0.0.1", 0), JudgeHandler)
    Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/v1"
    server.shutdown()


@pytest.fixture(scope="module")
def second(prepared: dict[str, Any], first: dict[str, Any], judge_endpoint: str) -> dict[str, Any]:
    """The damaged candidate, judged against the champion by a judge that always says "A"."""
    from tests.integration.test_judge import KEY, KEY_ENV

    judge = {"endpoint": judge_endpoint, "model": "always-a", "api_key_env": KEY_ENV}
    cfg = prepared["cfg"].model_copy(
        update={"eval": prepared["cfg"].eval.model_copy(update={"judge": JudgeConfig(**judge)})}
    )
    with pytest.MonkeyPatch.context() as env:
        env.setenv(KEY_ENV, KEY)
        return _evaluate_and_promote(prepared, "run-damaged", prepared["bad"], cfg)


def test_trained_candidate_passes_against_the_base_and_becomes_champion(
    first: dict[str, Any],
) -> None:
    report = first["report"]
    assert report["reference"] == "base" and report["champion_version"] is None
    assert report["passed"] is True, report["gates"]
    gates = {g["name"]: g for g in report["gates"]}
    assert gates["domain_bpb"]["low"] > 0.0
    scores = report["scores"]
    # Same 16 documents for every model, whole UTF-8 documents: identical byte counts.
    assert scores["candidate"]["domain"]["bytes"] == scores["base"]["domain"]["bytes"]
    assert len(scores["candidate"]["domain"]["documents"]) == 16
    assert len(scores["candidate"]["instructions"]["examples"]) == 4
    assert (
        scores["candidate"]["domain"]["bits_per_byte"]
        < 0.8 * scores["base"]["domain"]["bits_per_byte"]
    )
    promoted = first["promote"]
    assert promoted["skip_reason"] is None
    assert promoted["outputs"]["model_version"] == "1"


def test_report_is_written_with_valid_plots(first: dict[str, Any]) -> None:
    html = Path(first["report"]["report_html"])
    assert html.name == "report.html" and html.is_file()
    text = html.read_text()
    assert "domain_bpb" in text
    images = sorted(html.parent.glob("*.png"))
    assert len(images) >= 2 and all(_is_png(p) for p in images)
    assert any(line.startswith("candidate vs base model") for line in first["evaluate"]["summary"])


def test_damaged_candidate_is_not_promoted(
    prepared: dict[str, Any], first: dict[str, Any], second: dict[str, Any]
) -> None:
    from mlflow import MlflowClient

    report = second["report"]
    assert report["reference"] == "champion" and report["champion_version"] == "1"
    assert report["passed"] is False
    failed = {g["name"] for g in report["gates"] if not g["passed"]}
    assert {"domain_bpb", "general_bpb"} <= failed
    assert second["promote"]["skip_reason"].startswith("promotion refused")
    uri = prepared["cfg"].tracking.tracking_uri
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    assert str(client.get_model_version_by_alias("eval-test", "champion").version) == "1"
    assert str(client.get_model_version_by_alias("eval-test", "challenger").version) == "2"
    # The champion was fetched from the registry and scores exactly as the model it was.
    scores = report["scores"]
    assert (
        scores["champion"]["domain"]["documents"]
        == first["report"]["scores"]["candidate"]["domain"]["documents"]
    )
    assert scores["candidate"]["domain"]["bits_per_byte"] == pytest.approx(1.3271, abs=2e-3)
    # Position bias only ("A" in both orders): every pair is a tie, never a win.
    judged = scores["candidate"]["judge"]
    assert [e["win"] for e in judged["examples"]] == [0.5] * 4 and judged["win_rate"] == 0.5


def test_an_old_runs_promote_retried_after_a_newer_promotion_keeps_the_new_champion(
    prepared: dict[str, Any], first: dict[str, Any], second: dict[str, Any]
) -> None:
    """run-good was evaluated against no champion; a newer run then took the alias (v2 here).
    Its promote, retried, must not move the alias back over a model it was never compared
    with."""
    from mlflow import MlflowClient

    from pipeline import storage

    uri = prepared["cfg"].tracking.tracking_uri
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.set_registered_model_alias("eval-test", "champion", "2")  # the newer run's promotion
    try:
        promote_dir = first["promote"]["output_uri"]
        storage.remove(storage.join(promote_dir, storage.SUCCESS_MARKER))  # it died before commit
        config_uri = write_resolved_config(prepared["cfg"], "run-good")
        args = ["--config", config_uri, "--run-key", "run-good"]
        retried = stage_main(
            "promote", promote.run, [*args, "--input", first["evaluate"]["output_uri"]]
        )
        assert retried["outputs"]["model_version"] == "1"  # its version, found again
        assert retried["skip_reason"] == (
            "promotion refused: the champion moved since this candidate was evaluated (was none, "
            "now v2); evaluate it against the new champion (clear this run's evaluate task) to "
            "promote it"
        )
        assert str(client.get_model_version_by_alias("eval-test", "champion").version) == "2"
    finally:
        client.set_registered_model_alias("eval-test", "champion", "1")
