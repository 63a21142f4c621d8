"""Export the trained weights as a Hugging Face model folder with its tokenizer."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline import storage

if TYPE_CHECKING:
    from pipeline.config import PipelineConfig
    from pipeline.train.loop import LoopSpec


def save_model(engine: Any, spec: LoopSpec, config: PipelineConfig, rank: int) -> None:
    """Gather the full weights onto rank 0 and write a Hugging Face model folder with tokenizer.

    Under ZeRO-3 every rank must take part in the gather (one layer at a time, to CPU).
    """
    import torch.distributed as dist

    from pipeline.data.tokenizer import load_tokenizer

    if config.compute.zero_stage == 3:
        state = engine._zero3_consolidated_16bit_state_dict()
    else:
        state = engine.module.state_dict()
    if rank == 0:
        with (
            storage.local_staging(spec.output_uri) as out,
            tempfile.TemporaryDirectory() as scratch,
        ):
            engine.module.save_pretrained(str(out), state_dict=state, safe_serialization=True)
            tok_dir = storage.download_dir(spec.tokenizer_uri, Path(scratch))
            load_tokenizer(tok_dir).save_pretrained(str(out))
    dist.barrier()
