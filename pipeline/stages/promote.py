"""Stage 5: register the SFT model in MLflow; move alias ``champion`` only if every gate passed.

The candidate is logged with MLflow's transformers flavour, so
``mlflow.transformers.load_model("models:/<name>@champion")`` and ``mlflow models serve`` work
on it, and registered as a new version tagged with its lineage (run key, data manifest digest,
base model, config fingerprint, code version, gate verdict). Alias ``challenger`` always moves
to it; ``champion`` only when the evaluation report says every gate passed, otherwise the stage
ends with a skip reason naming the failed gates. The version stays inspectable either way.

A retry is idempotent: the version tagged with this run key is found and reused, never
registered twice.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from pipeline import storage, tracking
from pipeline.config import PipelineConfig, TrackingConfig
from pipeline.contract import (
    DATA,
    EVAL_REPORT,
    MANIFEST_FILE,
    MODEL_VERSION,
    REGISTERED_MODEL,
    SFT_MODEL,
    model_metrics,
)
from pipeline.identity import code_version
from pipeline.models import fetch_model
from pipeline.stages.entrypoint import StageContext, StageOutput, stage_main

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

STAGE = "promote"
TASK = "text-generation"
log = logging.getLogger(__name__)

# Lineage tags on the model version (and on the logged model).
DATA_DIGEST_TAG = "pipeline.data_digest"
BASE_MODEL_TAG = "pipeline.base_model"
CONFIG_TAG = "pipeline.config_fingerprint"
CODE_VERSION_TAG = "pipeline.code_version"
GATES_TAG = "gates_passed"


def lineage_tags(ctx: StageContext, report: dict[str, Any]) -> dict[str, str]:
    """What the version was made from: the data digest is prepare_data's ``sources_digest``,
    the code version the stage entrypoint's (package version and source hash).

    Raises:
        ValueError: the previous outputs lack ``data`` (promote must run after prepare_data).
    """
    cfg = ctx.config
    if "data" not in ctx.previous:
        raise ValueError(
            "promote needs the prepared data folder (outputs['data'] of prepare_data) for the "
            f"lineage tags; the previous outputs hold only {sorted(ctx.previous)}"
        )
    manifest = storage.read_json(storage.join(ctx.previous[DATA], MANIFEST_FILE))
    return {
        tracking.RUN_KEY_TAG: ctx.run_key,
        DATA_DIGEST_TAG: str(manifest.get("sources_digest", "unknown")),
        BASE_MODEL_TAG: cfg.model.base or f"scratch:{cfg.model.name}",
        CONFIG_TAG: cfg.fingerprint(),
        CODE_VERSION_TAG: code_version(),
        GATES_TAG: str(bool(report["passed"])).lower(),
        **method_tags(cfg),
    }


def method_tags(cfg: PipelineConfig) -> dict[str, str]:
    """How each training section trained: ``pipeline.cpt_method`` and ``pipeline.sft_method``
    (full, lora, qlora) and, for an adapter, its settings as ``pipeline.<section>_adapter``."""
    tags: dict[str, str] = {}
    for section in ("cpt", "sft"):
        train = getattr(cfg, section)
        tags[f"pipeline.{section}_method"] = train.method
        if train.method != "full":
            adapter = train.adapter.model_dump(mode="json", exclude={"merge"})
            if train.method != "qlora":
                del adapter["double_quant"]
            adapter["target_modules"] = ",".join(adapter["target_modules"])
            tags[f"pipeline.{section}_adapter"] = " ".join(
                f"{key}={str(value).lower() if isinstance(value, bool) else value}"
                for key, value in adapter.items()
            )
    return tags


def find_version(mlc: MlflowClient, name: str, run_key: str) -> ModelVersion | None:
    """The version of ``name`` an earlier attempt of this run registered, if any."""
    found = mlc.search_model_versions(
        f"name = '{name}' and tags.`{tracking.RUN_KEY_TAG}` = '{run_key}'"
    )
    return min(found, key=lambda v: int(v.version)) if found else None


def serving_requirements() -> list[str]:
    """Pinned pip requirements of the logged model: what loads and runs it (MLflow's default
    list adds torchvision, which a language model does not use)."""
    from importlib.metadata import version

    # A local version label (2.13.0+cpu, +cu128) is not on PyPI; the server picks its build.
    return [f"{pkg}=={version(pkg).split('+')[0]}" for pkg in ("transformers", "torch")]


def log_transformers_model(ctx: StageContext, tags: dict[str, str]) -> Any:
    """Log the SFT model folder (local or s3://) with the transformers flavour to the stage's
    run; returns MLflow's ``ModelInfo`` (``model_uri`` is ``models:/<model_id>``).

    The weights are loaded into host memory once: MLflow 3.17's by-path logging (a checkpoint
    folder as a string) fails on transformers 5 (``check_task`` returns the pipeline class as
    a dotted string), so the model and tokenizer objects are logged instead.
    """
    import huggingface_hub
    import mlflow
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # Explicit requirements and card: MLflow would otherwise load the model in a subprocess
    # to infer them and ask the Hugging Face Hub for a card of a local folder.
    card = huggingface_hub.ModelCard(
        f"---\nlibrary_name: transformers\npipeline_tag: {TASK}\n---\n"
        f"# {ctx.config.tracking.registered_model}\n\n"
        + "\n".join(f"- {key}: `{value}`" for key, value in sorted(tags.items()))
    )
    mlflow.set_experiment(experiment_id=tracking.experiment_id(ctx.config.tracking))
    # Through the node's model cache, as evaluate read it: a remote folder is fetched once, and
    # an adapter-only SFT output is merged onto its base (the registry holds full weights).
    model_dir = fetch_model(ctx.previous[SFT_MODEL], ctx.config.tracking)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype="auto")
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    return mlflow.transformers.log_model(
        {"model": model, "tokenizer": tokenizer},
        name="model",
        task=TASK,
        run_id=ctx.mlflow_run_id,
        model_card=card,
        pip_requirements=serving_requirements(),
        tags=tags,
    )


def register_model(ctx: StageContext, tags: dict[str, str]) -> tuple[str, bool]:
    """The version holding this run's candidate: ``(version, reused)``. An earlier attempt's
    version (found by the run-key tag) is reused; otherwise the model is logged and a version
    created with ``tags``."""
    from mlflow.exceptions import MlflowException

    mlc = tracking.client(ctx.config.tracking)
    name = ctx.config.tracking.registered_model
    existing = find_version(mlc, name, ctx.run_key)
    if existing is not None:
        log.info("run %s already registered %s version %s", ctx.run_key, name, existing.version)
        return str(existing.version), True
    info = log_transformers_model(ctx, tags)
    try:
        mlc.create_registered_model(name)
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    version = mlc.create_model_version(
        name, source=info.model_uri, run_id=ctx.mlflow_run_id, tags=tags, model_id=info.model_id
    )
    return str(version.version), False


def champion_moved(
    config: TrackingConfig, evaluated_against: str | None, candidate: str
) -> str | None:
    """Why the candidate may not take the champion alias although it passed: the champion is
    neither the version it was evaluated against nor the candidate itself (a newer run promoted
    meanwhile, and this is a retry of an older run's promote). None when it may."""
    current = tracking.champion_version(config)
    now = str(current.version) if current is not None else None
    if now in (evaluated_against, candidate):
        return None
    was = f"v{evaluated_against}" if evaluated_against else "none"
    return (
        f"the champion moved since this candidate was evaluated (was {was}, now v{now}); "
        "evaluate it against the new champion (clear this run's evaluate task) to promote it"
    )


def move_aliases(config: TrackingConfig, version: str, passed: bool) -> list[str]:
    """Point ``challenger`` (always) and ``champion`` (when ``passed``) at ``version`` of the
    registered model; returns summary lines."""
    mlc, name = tracking.client(config), config.registered_model
    mlc.set_registered_model_alias(name, tracking.CHALLENGER_ALIAS, version)
    lines = [f"alias {tracking.CHALLENGER_ALIAS} -> {name} v{version}"]
    if passed:
        mlc.set_registered_model_alias(name, tracking.CHAMPION_ALIAS, version)
        lines.append(f"alias {tracking.CHAMPION_ALIAS} -> {name} v{version}")
    else:
        current = tracking.champion_version(config)
        held = f"v{current.version}" if current is not None else "no version"
        lines.append(f"alias {tracking.CHAMPION_ALIAS} unchanged (stays on {held})")
    return lines


def run(ctx: StageContext) -> StageOutput:
    cfg = ctx.config
    name = cfg.tracking.registered_model
    report = storage.read_json(ctx.previous[EVAL_REPORT])
    passed = bool(report["passed"])
    failed = [g["name"] for g in report.get("gates", []) if not g["passed"]]
    version, reused = register_model(ctx, lineage_tags(ctx, report))
    # Compare-and-set: the gates compared with one champion; only over that one may it win
    # (or be confirmed, on a retry of the promote that already moved the alias to it).
    moved = (
        champion_moved(cfg.tracking, report.get("champion_version"), version) if passed else None
    )
    if moved:
        passed = False
        log.warning("not promoting: %s", moved)
    summary = [
        f"{name} version {version} "
        + ("found (registered by an earlier attempt of this run)" if reused else "registered")
    ]
    summary += move_aliases(cfg.tracking, version, passed)
    decision = "promoted" if passed else "rejected"
    # A report may fail without naming a gate (hand-edited, or an older format): say so.
    refused = ", ".join(failed) or "none named in the report"
    why = moved or f"failed gates: {refused}"
    summary.append(f"decision: {decision}" + ("" if passed else f" ({why})"))
    for line in summary:
        log.info(line)
    metrics: dict[str, Any] = {"promoted": int(passed), "model_version": int(version)}
    parent = tracking.parent_run_id(cfg.tracking, ctx.run_key)
    tracking.log_metrics(
        cfg.tracking,
        parent,
        {**metrics, **model_metrics("candidate", report.get("scores", {}).get("candidate", {}))},
    )
    tracking.client(cfg.tracking).set_tag(parent, tracking.DECISION_TAG, decision)
    tracking.finish_parent(cfg.tracking, ctx.run_key)
    return StageOutput(
        outputs={REGISTERED_MODEL: name, MODEL_VERSION: version},
        metrics=metrics,
        summary=summary,
        skip_reason=None if passed else f"promotion refused: {why}",
    )


if __name__ == "__main__":
    stage_main(STAGE, run)
