"""Stage 2: continued pre-training (causal LM) on the packed domain text.

Starts from ``model.base``, or builds a fresh Llama-architecture model from the config and keeps
those initial weights as ``base_model/`` so evaluation can compare against them.
"""

from __future__ import annotations

import tempfile

from pipeline import storage
from pipeline.contract import BASE_MODEL, CPT_MODEL, DATA, TOKENIZER
from pipeline.stages.entrypoint import StageContext, StageOutput, stage_main

STAGE = "continued_pretraining"


def initial_model(ctx: StageContext) -> str:
    """URI of the weights training starts from.

    A registered base (``models:/<name>@champion``) is pinned to the storage URI of the version
    the alias points at now, so the whole run (and evaluation's ``base`` score) uses that one
    version even if the alias moves meanwhile.
    """
    cfg = ctx.config
    if cfg.model.base:
        from pipeline.models import resolve_model_uri

        return resolve_model_uri(cfg.model.base, cfg.tracking)
    from pipeline.data.tokenizer import load_tokenizer
    from pipeline.train.model import build_model

    base_uri = storage.join(ctx.output_uri, "base_model")
    with storage.local_staging(base_uri) as out, tempfile.TemporaryDirectory() as scratch:
        tok = load_tokenizer(storage.download_dir(ctx.previous[TOKENIZER], scratch))
        model = build_model(cfg.model, tok, cfg.data.seq_len, cfg.cpt.seed)
        model.save_pretrained(str(out), safe_serialization=True)
        tok.save_pretrained(str(out))
    return base_uri


def run(ctx: StageContext) -> StageOutput:
    from pipeline.train.loop import LoopSpec
    from pipeline.train.ray_train import fit, training_summary

    base_uri = initial_model(ctx)
    model_uri = storage.join(ctx.output_uri, "model")
    spec = LoopSpec(
        config=ctx.config.model_dump(mode="json"),
        section="cpt",
        model_uri=base_uri,
        tokenizer_uri=ctx.previous[TOKENIZER],
        data_uri=ctx.previous[DATA],
        split="cpt_train",
        output_uri=model_uri,
        checkpoint_uri=storage.join(ctx.output_uri, "checkpoints"),
        mlflow_run_id=ctx.mlflow_run_id,
    )
    metrics = fit(spec, ctx.config.compute, name=f"{ctx.run_key}-{STAGE}")
    return StageOutput(
        outputs={BASE_MODEL: base_uri, CPT_MODEL: model_uri},
        metrics=metrics,
        summary=training_summary(metrics),
    )


if __name__ == "__main__":
    stage_main(STAGE, run)
