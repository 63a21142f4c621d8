"""Stage 3: supervised fine-tuning on chat examples, prompt tokens masked out of the loss."""

from __future__ import annotations

from pipeline import storage
from pipeline.contract import CPT_MODEL, DATA, SFT_MODEL, TOKENIZER
from pipeline.stages.entrypoint import StageContext, StageOutput, stage_main

STAGE = "instruction_finetuning"


def run(ctx: StageContext) -> StageOutput:
    from pipeline.train.loop import LoopSpec
    from pipeline.train.ray_train import fit, training_summary

    model_uri = storage.join(ctx.output_uri, "model")
    spec = LoopSpec(
        config=ctx.config.model_dump(mode="json"),
        section="sft",
        model_uri=ctx.previous[CPT_MODEL],
        tokenizer_uri=ctx.previous[TOKENIZER],
        data_uri=ctx.previous[DATA],
        split="sft_train",
        output_uri=model_uri,
        checkpoint_uri=storage.join(ctx.output_uri, "checkpoints"),
        mlflow_run_id=ctx.mlflow_run_id,
    )
    metrics = fit(spec, ctx.config.compute, name=f"{ctx.run_key}-{STAGE}")
    return StageOutput(
        outputs={SFT_MODEL: model_uri},
        metrics=metrics,
        summary=training_summary(metrics),
    )


if __name__ == "__main__":
    stage_main(STAGE, run)
