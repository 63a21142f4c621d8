"""Stage 4: score base, CPT, SFT and the current champion on held-out data; decide the gates.

Each model is scored in its own Ray task on the configured pool, so on GPUs they run side by
side. The report (``eval_report.json``) is what the promote stage acts on.
"""

from __future__ import annotations

import logging
import tempfile
from typing import Any

from pipeline import storage, tracking
from pipeline.config import PipelineConfig
from pipeline.eval.gates import evaluate_gates, gates_report
from pipeline.stages.common import StageContext, StageOutput, stage_main
from pipeline.stages.prepare_data import HELDOUT_FILE

STAGE = "evaluate"
REPORT_FILE = "eval_report.json"
log = logging.getLogger(__name__)


def score_one(
    config_dict: dict[str, Any], model_uri: str, from_registry: bool, heldout: dict[str, Any]
) -> dict[str, Any]:
    """Runs as a Ray task: fetch the model folder, score it."""
    from pipeline.config import config_from_dict
    from pipeline.eval.perplexity import score_model
    from pipeline.train.attention import select_attention

    cfg = config_from_dict(config_dict)
    with tempfile.TemporaryDirectory() as scratch:
        if from_registry:
            model_dir = tracking.download_model_version(cfg.tracking, model_uri, scratch)
        else:
            model_dir = str(storage.download_dir(model_uri, scratch))
        return score_model(
            model_dir,
            heldout,
            cfg.data.seq_len,
            cfg.data.chat_format,
            cfg.eval.batch_size,
            cfg.eval.max_batches,
            select_attention(cfg.compute.attention),
        )


def score_all(
    cfg: PipelineConfig, models: dict[str, tuple[str, bool]], heldout: dict[str, Any]
) -> dict[str, Any]:
    import ray

    from pipeline.train.ray_train import worker_resources

    if not ray.is_initialized():
        ray.init()
    resources = worker_resources(cfg.compute)
    task = ray.remote(score_one).options(
        num_cpus=resources.pop("CPU"), num_gpus=resources.pop("GPU", 0), resources=resources
    )
    heldout_ref = ray.put(heldout)
    config_dict = cfg.model_dump(mode="json")
    refs = {
        name: task.remote(config_dict, uri, reg, heldout_ref) for name, (uri, reg) in models.items()
    }
    return {name: ray.get(ref) for name, ref in refs.items()}


def run(ctx: StageContext) -> StageOutput:
    cfg, prev = ctx.config, ctx.previous
    heldout = storage.read_json(storage.join(prev["data"], HELDOUT_FILE))
    models = {
        "base": (prev["base_model"], False),
        "cpt": (prev["cpt_model"], False),
        "candidate": (prev["sft_model"], False),
    }
    champion = tracking.champion_version(cfg.tracking)
    if champion is not None:
        models["champion"] = (champion.source, True)
    scores = score_all(cfg, models, heldout)
    report = {
        "scores": scores,
        "champion_version": champion.version if champion is not None else None,
        **gates_report(evaluate_gates(scores, cfg.eval)),
    }
    report_uri = storage.join(ctx.output_uri, REPORT_FILE)
    storage.write_json(report_uri, report)
    tracking.log_json_artifact(cfg.tracking, ctx.mlflow_run_id, REPORT_FILE, report)
    for gate in report["gates"]:
        log.info(
            "gate %s: %s (%s)", gate["name"], "pass" if gate["passed"] else "FAIL", gate["detail"]
        )
    metrics: dict[str, Any] = {
        f"{model}.{split}.{name}": value
        for model, splits in scores.items()
        for split, values in splits.items()
        for name, value in values.items()
        if name in ("loss", "perplexity", "bits_per_byte")
    }
    metrics["gates_passed"] = int(report["passed"])
    return StageOutput(outputs={"eval_report": report_uri}, metrics=metrics)


if __name__ == "__main__":
    stage_main(STAGE, run)
