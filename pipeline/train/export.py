"""Export the trained weights as a Hugging Face model folder with its tokenizer, for serving.

Training runs without a KV cache (packed documents must not attend across their boundaries);
the export turns it back on, stops generation at the end of an assistant turn, and carries the
chat template training rendered with, so ``apply_chat_template`` formats a conversation exactly
as the model saw it in SFT.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline import storage

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from pipeline.data.chat import ChatFormat


def save_model(
    engine: Any,
    *,
    output_uri: str,
    tokenizer_uri: str,
    chat_format: ChatFormat,
    zero_stage: int,
    rank: int,
) -> None:
    """Gather the full weights onto rank 0 and write a Hugging Face model folder with tokenizer.

    Every rank must call this (under ZeRO-3 all take part in the gather). Only rank 0 writes,
    and the other ranks return without waiting for it: a 140 GB export can take longer than the
    process group's collective timeout, so no barrier follows the gather.
    """
    from pipeline.train.zero import full_state_dict

    state = full_state_dict(engine, zero_stage)
    if rank != 0:
        return
    with (
        storage.local_staging(output_uri) as out,
        tempfile.TemporaryDirectory() as scratch,
    ):
        tok_dir = storage.download_dir(tokenizer_uri, Path(scratch))
        export_pretrained(engine.module.model, state, tok_dir, chat_format, out)


def export_pretrained(
    model: PreTrainedModel,
    state: dict[str, Any] | None,
    tokenizer_dir: Path,
    fmt: ChatFormat,
    out: Path,
) -> None:
    """Write ``model`` (with ``state`` as its weights, when given) and the tokenizer to ``out``
    for inference: KV cache on, generation stopping at the end of a turn, chat template attached.
    """
    from pipeline.data.tokenizer import attach_chat_template, load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    # Tokenizers written before the template was attached at prepare_data get it here.
    attach_chat_template(tok, fmt)
    with inference_settings(model, tok, fmt):
        model.save_pretrained(str(out), state_dict=state)
    tok.save_pretrained(str(out))


@contextmanager
def inference_settings(
    model: PreTrainedModel, tok: PreTrainedTokenizerBase, fmt: ChatFormat
) -> Iterator[None]:
    """While saving: ``use_cache=True`` in ``config.json`` and ``generation_config.json``, and
    generation ending at EOS or the format's end-of-turn token; restored afterwards."""
    from transformers import GenerationConfig

    from pipeline.data.chat import end_of_turn_token

    config, generation = model.config, model.generation_config
    stop = [tok.eos_token_id]
    end = end_of_turn_token(fmt)
    if end is not None and tok.convert_tokens_to_ids(end) not in stop:
        stop.append(tok.convert_tokens_to_ids(end))
    exported = GenerationConfig.from_model_config(config)
    exported.use_cache = True
    exported.bos_token_id = tok.bos_token_id
    exported.eos_token_id = stop if len(stop) > 1 else stop[0]
    exported.pad_token_id = tok.pad_token_id
    training_cache = config.use_cache
    config.use_cache = True
    model.generation_config = exported
    try:
        yield
    finally:
        config.use_cache = training_cache
        model.generation_config = generation
