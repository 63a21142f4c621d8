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


def save_adapter_model(
    engine: Any,
    *,
    output_uri: str,
    model_dir: Path,
    tokenizer_dir: Path,
    base_uri: str,
    chat_format: ChatFormat,
    merge: bool,
    zero_stage: int,
    rank: int,
) -> None:
    """Write the trained LoRA adapter (peft format) to ``<output>/adapter`` and, with ``merge``,
    the merged full model to ``<output>`` itself, where every later stage looks for a model.

    Every rank must call this; only the adapter's weights are gathered (a few MB, not the
    base). The merged model is built on rank 0's CPU from the base folder loaded again
    unquantized in its own dtype, with the adapter applied and folded in: for QLoRA that is the
    16-bit base the 4-bit one was quantized from, what serving loads.
    """
    from pipeline.models import ADAPTER_CONFIG
    from pipeline.train.zero import adapter_state_dict

    state = adapter_state_dict(engine, zero_stage)
    if rank != 0:
        return
    peft_model = engine.module.model
    with storage.local_staging(output_uri) as out:
        adapter_dir = out / ADAPTER_CONFIG.parent
        base_name = peft_model.peft_config["default"].base_model_name_or_path
        peft_model.peft_config["default"].base_model_name_or_path = base_uri
        try:
            # The trained token rows are in the adapter; the whole tables are not.
            peft_model.save_pretrained(
                str(adapter_dir), state_dict=state, save_embedding_layers=False
            )
        finally:
            peft_model.peft_config["default"].base_model_name_or_path = base_name
        if merge:
            from pipeline.train.zero import zero3_loading_off

            with zero3_loading_off():  # a whole CPU copy, not partitioned across the ranks
                merged = merge_adapter(model_dir, tokenizer_dir, adapter_dir)
            export_pretrained(merged, None, tokenizer_dir, chat_format, out)
        else:
            from pipeline.data.tokenizer import attach_chat_template, load_tokenizer

            tok = load_tokenizer(tokenizer_dir)
            attach_chat_template(tok, chat_format)
            tok.save_pretrained(str(out))


def merge_adapter(model_dir: Path, tokenizer_dir: Path, adapter_dir: Path) -> PreTrainedModel:
    """The base of ``model_dir`` with the adapter of ``adapter_dir`` folded into its weights
    (``models.adapter_on_base``, merged): a plain causal LM."""
    from pipeline.models import adapter_on_base

    merged: PreTrainedModel = adapter_on_base(
        model_dir, tokenizer_dir, adapter_dir
    ).merge_and_unload()
    return merged


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
