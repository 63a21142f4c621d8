"""Stage 4: score base, CPT, SFT and the current champion on the same held-out texts; decide the
gates; write the report a person reads before trusting a promotion.

Every model reads the same fixed documents and chats (``pipeline.eval.scores.score_model``),
tokenized with its own tokenizer, so bits-per-byte compares models with different tokenizers
over the same bytes. Each model is scored by ``eval.num_workers`` Ray tasks on the configured pool
(data-parallel: each takes one share of the documents and chats), a model too large for one GPU is loaded across the GPUs of
its worker (``eval.shard_model``), and models fetched from S3 or the registry are downloaded once
per node. ``eval_report.json`` is what the promote stage acts on; ``report/report.html`` is what a
person reads.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline import storage, tracking
from pipeline.config import PipelineConfig
from pipeline.contract import (
    BASE_MODEL,
    CPT_MODEL,
    DATA,
    EVAL_REPORT,
    EVAL_REPORT_FILE,
    EVAL_REPORT_HTML,
    SFT_MODEL,
    model_metrics,
    read_heldout,
)
from pipeline.placement import reserve
from pipeline.stages.entrypoint import StageContext, StageOutput, stage_main

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

STAGE = "evaluate"
REPORT_DIR = "report"
SIDE_BY_SIDE = 4
"""Generated answers shown next to the champion's in the report."""
log = logging.getLogger(__name__)


def load_for_eval(
    cfg: PipelineConfig, model_uri: str
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, str]:
    """The model (on GPU in bf16 when there is one; across every visible GPU with
    ``eval.shard_model``), its tokenizer and the attention kernel it runs."""
    import torch
    from transformers import AutoModelForCausalLM

    from pipeline.data.tokenizer import load_tokenizer
    from pipeline.models import fetch_model
    from pipeline.train.attention import select_attention

    folder = fetch_model(model_uri, cfg.tracking)
    attention = select_attention(cfg.compute.attention)
    cuda = torch.cuda.is_available()
    kwargs: dict[str, Any] = {
        "attn_implementation": attention,
        "dtype": torch.bfloat16 if cuda else torch.float32,
    }
    if cuda and cfg.eval.shard_model:
        # Layers spread over the worker's GPUs: a 70B model (138 GB in bf16) fits 8 x 80 GB.
        kwargs["device_map"] = "auto"
    model = AutoModelForCausalLM.from_pretrained(str(folder), **kwargs)
    if cuda and not cfg.eval.shard_model:
        model.to("cuda")  # type: ignore[arg-type]  # transformers 5 types .to() oddly
    model.eval()
    log.info("evaluating %s from %s with %s attention", model_uri, folder, attention)
    return model, load_tokenizer(folder), attention


def score_share(
    config_dict: dict[str, Any],
    model_uri: str,
    heldout: dict[str, Any],
    general_docs: list[str],
    part: int,
    parts: int,
) -> dict[str, Any]:
    """Runs as a Ray task: one model's scores on its ``part``-th share of the fixed texts."""
    from pipeline.config import config_from_dict
    from pipeline.eval.scores import score_model

    cfg = config_from_dict(config_dict)
    model, tok, attention = load_for_eval(cfg, model_uri)
    return score_model(model, tok, heldout, general_docs, cfg, attention, part, parts)


def eval_task_resources(cfg: PipelineConfig) -> dict[str, Any]:
    """Ray task options of one evaluation worker on the configured pool."""
    compute, e = cfg.compute, cfg.eval
    if compute.pool == "cpu":
        return {"num_cpus": compute.cpus_per_worker}
    gpus = max(e.gpus_per_worker, 1)
    return {
        "num_cpus": compute.cpus_per_worker,
        "num_gpus": gpus,
        "resources": {f"pool_{compute.pool}": float(gpus)},
    }


def score_all(
    cfg: PipelineConfig, models: dict[str, str], heldout: dict[str, Any], general: list[str]
) -> dict[str, Any]:
    """``{model name: ModelScores}``; every (model, share) is one Ray task, all in parallel."""
    import ray

    from pipeline.eval.scores import merge_scores

    if not ray.is_initialized():
        ray.init()
    options = eval_task_resources(cfg)
    # Queued tasks would wait for a missing GPU node until the stage deadline: at least one
    # evaluation worker must fit within the placement timeout.
    one = {"CPU": float(options["num_cpus"])}
    if "num_gpus" in options:
        one |= {"GPU": float(options["num_gpus"]), **options["resources"]}
    reserve(
        [one], cfg.compute.placement_timeout_minutes, f"an evaluation worker ({cfg.compute.pool})"
    )
    task = ray.remote(score_share).options(**options)
    config_dict = cfg.model_dump(mode="json")
    heldout_ref, general_ref = ray.put(heldout), ray.put(general)
    parts = cfg.eval.num_workers
    refs = {
        name: [
            task.remote(config_dict, uri, heldout_ref, general_ref, part, parts)
            for part in range(parts)
        ]
        for name, uri in models.items()
    }
    return {name: merge_scores(ray.get(shares)) for name, shares in refs.items()}


def side_by_side(scores: dict[str, Any], limit: int = SIDE_BY_SIDE) -> list[dict[str, Any]]:
    """The first generated answers of the candidate next to the champion's."""
    cand = scores["candidate"]["instructions"]["examples"][:limit]
    champ = scores.get("champion", {}).get("instructions", {}).get("examples", [])
    return [
        {
            "prompt": row["prompt"],
            "reference": row["reference"],
            "candidate": row["answer"],
            "champion": champ[i]["answer"] if i < len(champ) else None,
        }
        for i, row in enumerate(cand)
    ]


def loss_curves(cfg: PipelineConfig, run_key: str) -> dict[str, list[tuple[int, float]]]:
    """Per-step training loss of this run's CPT and SFT stages, from their committed results."""
    curves: dict[str, list[tuple[int, float]]] = {}
    for name, stage in (("cpt", "continued_pretraining"), ("sft", "instruction_finetuning")):
        result = storage.committed_result(
            storage.stage_uri(cfg.storage.artifact_root, run_key, stage)
        )
        history = (result or {}).get("metrics", {}).get("loss_history") or []
        curves[name] = [(i + 1, loss) for i, loss in enumerate(history) if loss is not None]
    return curves


def judge_candidate(cfg: PipelineConfig, scores: dict[str, Any]) -> None:
    """Add the LLM judge's pairwise verdicts to the candidate's scores (eval contract)."""
    from pipeline.eval.judge import judge_pairwise

    judge = cfg.eval.judge
    if judge is None or "champion" not in scores:
        return
    cand = scores["candidate"]["instructions"]["examples"]
    champ = scores["champion"]["instructions"]["examples"]
    pairs = list(zip(cand, champ, strict=True))[: judge.max_examples]
    scores["candidate"]["judge"] = judge_pairwise(
        judge,
        prompts=[c["prompt"] for c, _ in pairs],
        candidate=[c["answer"] for c, _ in pairs],
        champion=[h["answer"] for _, h in pairs],
    )


def write_html_report(
    ctx: StageContext, report: dict[str, Any], curves: dict[str, list[tuple[int, float]]]
) -> str:
    """``report/`` next to ``eval_report.json`` and in the MLflow run; returns the HTML's URI."""
    from pipeline.eval.report import REPORT_FILE as HTML_FILE
    from pipeline.eval.report import write_report

    e = ctx.config.eval
    report_uri = storage.join(ctx.output_uri, REPORT_DIR)
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch) / REPORT_DIR
        write_report(
            report, curves, folder, bootstrap_samples=e.bootstrap_samples, confidence=e.confidence
        )
        storage.upload_dir(folder, report_uri)
        tracking.client(ctx.config.tracking).log_artifacts(
            ctx.mlflow_run_id, str(folder), artifact_path=REPORT_DIR
        )
    return storage.join(report_uri, HTML_FILE)


def headline_metrics(report: dict[str, Any]) -> dict[str, Any]:
    """Flat numbers of every model, and the verdict, for MLflow and the stage result."""
    metrics: dict[str, Any] = {}
    for model, scores in report["scores"].items():
        metrics |= model_metrics(model, scores)
    metrics["gates_passed"] = int(report["passed"])
    return metrics


def run(ctx: StageContext) -> StageOutput:
    from pipeline.eval.gates import decide, gate_table
    from pipeline.eval.scores import general_documents

    cfg, prev = ctx.config, ctx.previous
    heldout = read_heldout(prev[DATA])
    general = general_documents(cfg, heldout)
    models = {"base": prev[BASE_MODEL], "cpt": prev[CPT_MODEL], "candidate": prev[SFT_MODEL]}
    champion = tracking.champion_version(cfg.tracking)
    if champion is not None:
        models["champion"] = f"models:/{cfg.tracking.registered_model}/{champion.version}"
    log.info("scoring %s with %d worker(s) each", sorted(models), cfg.eval.num_workers)
    scores = score_all(cfg, models, heldout, general)
    judge_candidate(cfg, scores)
    report: dict[str, Any] = {
        "scores": scores,
        "champion_version": str(champion.version) if champion is not None else None,
        **decide(scores, cfg.eval, base_pretrained=cfg.model.base is not None),
        "samples": side_by_side(scores),
    }
    report["report_html"] = write_html_report(ctx, report, loss_curves(cfg, ctx.run_key))
    report_uri = storage.join(ctx.output_uri, EVAL_REPORT_FILE)
    storage.write_json(report_uri, report)
    tracking.log_json_artifact(cfg.tracking, ctx.mlflow_run_id, EVAL_REPORT_FILE, report)
    table = gate_table(report["gates"], report["skipped"])
    decision = (
        "every gate passed" if report["passed"] else "gates FAILED: promotion will be refused"
    )
    against = f"champion v{report['champion_version']}" if champion is not None else "base model"
    summary = [f"candidate vs {against}: {decision}", *table, f"report: {report['report_html']}"]
    for line in summary:
        log.info("%s", line)
    return StageOutput(
        outputs={EVAL_REPORT: report_uri, EVAL_REPORT_HTML: report["report_html"]},
        metrics=headline_metrics(report),
        summary=summary,
        report_url=report_page_url(ctx, report["report_html"]),
    )


def report_page_url(ctx: StageContext, html_uri: str) -> str:
    """Where a browser opens the report: the MLflow UI's view of the logged report when there
    is one (it renders HTML artifacts), else the file itself."""
    page = f"/artifacts/{REPORT_DIR}/{Path(html_uri).name}"
    run_url = tracking.run_url(ctx.config.tracking, ctx.mlflow_run_id, page)
    if run_url:
        return run_url
    if storage.is_s3(html_uri):
        return html_uri
    return Path(html_uri).resolve().as_uri()


if __name__ == "__main__":
    stage_main(STAGE, run)
