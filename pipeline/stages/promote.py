"""Stage 5: register the SFT model in MLflow; move alias ``champion`` only if every gate passed.

The version is registered either way (tagged with the run key and the gate verdict), so a
rejected candidate stays inspectable next to the champion it lost to.
"""

from __future__ import annotations

import logging

from pipeline import storage, tracking
from pipeline.stages.common import StageContext, StageOutput, stage_main

STAGE = "promote"
log = logging.getLogger(__name__)


def register_model(ctx: StageContext) -> str:
    """Create a model version from the SFT model; returns the version number.

    A local model folder is copied into the run's artifacts (the registry must not point at a
    scratch folder); an s3:// model is registered in place, without copying its weights again.
    """
    from mlflow.exceptions import MlflowException

    cfg = ctx.config
    mlc = tracking.client(cfg.tracking)
    model_uri = ctx.previous["sft_model"]
    if storage.is_s3(model_uri):
        source = model_uri
    else:
        mlc.log_artifacts(ctx.mlflow_run_id, model_uri, artifact_path="model")
        source = f"{mlc.get_run(ctx.mlflow_run_id).info.artifact_uri}/model"
    try:
        mlc.create_registered_model(cfg.tracking.registered_model)
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    version = mlc.create_model_version(
        cfg.tracking.registered_model,
        source=source,
        run_id=ctx.mlflow_run_id,
        tags={tracking.RUN_KEY_TAG: ctx.run_key},
    )
    return str(version.version)


def run(ctx: StageContext) -> StageOutput:
    cfg = ctx.config
    report = storage.read_json(ctx.previous["eval_report"])
    version = register_model(ctx)
    mlc = tracking.client(cfg.tracking)
    name = cfg.tracking.registered_model
    mlc.set_model_version_tag(name, version, "gates_passed", str(report["passed"]).lower())
    if report["passed"]:
        mlc.set_registered_model_alias(name, tracking.CHAMPION_ALIAS, version)
        log.info("%s version %s is the new champion", name, version)
    else:
        failed = [g["name"] for g in report["gates"] if not g["passed"]]
        log.info(
            "%s version %s registered but not promoted; failed gates: %s", name, version, failed
        )
    tracking.finish_parent(cfg.tracking, ctx.run_key)
    return StageOutput(
        outputs={"registered_model": name, "model_version": version},
        metrics={"promoted": int(report["passed"]), "model_version": int(version)},
    )


if __name__ == "__main__":
    stage_main(STAGE, run)
