"""LoRA and QLoRA adapters with peft, as the training recipe attaches, trains and exports them.

``method: lora`` freezes the loaded model and trains peft's low-rank matrices beside every
targeted linear layer; ``method: qlora`` loads the targeted weights in 4-bit NF4 first
(bitsandbytes ``Linear4bit``, computing in the training dtype). Either way the embedding and
LM-head rows of the chat format's special tokens can be trained too (peft's trainable token
indices): a base tokenizer that lacked them got new rows that would otherwise stay as
initialised, and a base model never saw them in pre-training. Every other row stays frozen.

ZeRO 0-2 hold every parameter on every rank and need nothing here. Under ZeRO-3 the loaded
weights are partitioned and peft's new parameters are created whole; ``zero.partition_loaded_
model`` partitions them after ``attach``. QLoRA's quantized loading bypasses ZeRO-3's
partitioned loading (bitsandbytes quantizes each weight as it loads, DeepSpeed#5660), so every
rank holds the whole 4-bit model until that partitioning: the storage dtype of the 4-bit blocks
is the training dtype, so ZeRO-3 shards them like any other parameter.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from pipeline.config import AdapterConfig, TrainConfig

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from pipeline.data.chat import ChatFormat

log = logging.getLogger(__name__)

EMBEDDING_MODULES = ("embed_tokens", "lm_head")
"""The input embedding and LM head, whose chat-token rows are trained (Llama-family names)."""


def quantization_config(train: TrainConfig, dtype: torch.dtype) -> Any | None:
    """bitsandbytes' 4-bit NF4 config for ``method: qlora`` (None otherwise). Compute and
    storage use the training dtype: ZeRO-3 flattens every parameter of one dtype together."""
    if train.method != "qlora":
        return None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=dtype,
        bnb_4bit_use_double_quant=train.adapter.double_quant,
        bnb_4bit_quant_storage=dtype,
    )


def chat_token_ids(tok: PreTrainedTokenizerBase, fmt: ChatFormat, base_vocab: int) -> list[int]:
    """The rows ``train_chat_tokens`` trains: the chat format's special tokens the tokenizer
    has, and every row the embeddings grew by when it had more tokens than the base model."""
    from pipeline.data.chat import format_tokens

    vocab = tok.get_vocab()
    # A token the tokenizer lacks is not trained (prepare_data's tokenizer has them all).
    ids = {vocab[t] for t in format_tokens(fmt) if t in vocab} | set(range(base_vocab, len(tok)))
    return sorted(ids)


def lora_config(adapter: AdapterConfig, token_ids: list[int]) -> Any:
    """peft's ``LoraConfig`` for ``adapter`` (token rows trained when ``token_ids`` is set)."""
    from peft import LoraConfig

    return LoraConfig(
        r=adapter.rank,
        lora_alpha=adapter.alpha,
        lora_dropout=adapter.dropout,
        target_modules=list(adapter.target_modules),
        use_dora=adapter.dora,
        use_rslora=adapter.rslora,
        bias="none",
        task_type="CAUSAL_LM",
        trainable_token_indices={name: token_ids for name in EMBEDDING_MODULES}
        if token_ids
        else None,
    )


def attach(
    model: PreTrainedModel,
    adapter: AdapterConfig,
    token_ids: list[int],
    seed: int,
    loading: Any | None,
) -> Any:
    """Freeze ``model`` and wrap it with a LoRA adapter (peft ``PeftModelForCausalLM``) whose
    ``A`` matrices are drawn from ``seed``: peft draws them from torch's global generator, which
    anything run before in the process has moved.

    ``loading`` is ZeRO-3's ``HfDeepSpeedConfig`` (``zero.partitioned_loading``), None below
    ZeRO-3.

    Raises:
        ValueError: a name in ``adapter.target_modules`` matches no module of the model (every
            name must: a typo would otherwise train fewer layers than asked, silently).
    """
    from peft import get_peft_model

    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in adapter.target_modules if t not in names]
    if missing:
        raise ValueError(
            f"adapter.target_modules {missing} match no module of this "
            f"{type(model).__name__}; its linear layers are named "
            f"{sorted(_linear_names(model))}"
        )
    import torch

    config = lora_config(adapter, token_ids)
    with (
        torch.random.fork_rng(devices=[]),
        _gathered_embeddings(model, loading if token_ids else None),
    ):
        torch.manual_seed(seed)
        peft_model = get_peft_model(model, config)
    trainable, total = peft_model.get_nb_trainable_parameters()
    log.info(
        "LoRA r=%d alpha=%g on %s%s: %d trainable of %d parameters (%.3f%%)",
        adapter.rank,
        adapter.alpha,
        ",".join(adapter.target_modules),
        f", {len(token_ids)} chat-token rows" if token_ids else "",
        trainable,
        total,
        100 * trainable / max(total, 1),
    )
    return peft_model


def _linear_names(model: PreTrainedModel) -> set[str]:
    import torch

    return {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear)
    }


@contextlib.contextmanager
def _gathered_embeddings(model: PreTrainedModel, loading: Any | None) -> Iterator[None]:
    """Under ZeRO-3, the whole embedding and LM-head tables while peft copies the trained
    rows' starting values out of them.

    peft's own ZeRO-3 path for this allocates its receive buffer on CUDA
    (``TrainableTokensLayer._collect_token_weights``), so CPU workers cannot take it. Gathered
    on every rank (``modifier_rank=None``), the tables are whole everywhere and peft's plain
    path reads the same rows on each rank; transformers' ZeRO-3 switch is off meanwhile so
    that peft takes that path, and back on afterwards.
    """
    if loading is None:
        yield
        return
    import deepspeed

    from pipeline.train.zero import zero3_loading_off

    tables = [model.get_input_embeddings().weight, model.get_output_embeddings().weight]
    with (
        zero3_loading_off(),
        deepspeed.zero.GatheredParameters(tables, modifier_rank=None),
    ):
        yield


def trainable_parameters(model: torch.nn.Module) -> int:
    """Parameters the optimizer updates, also when ZeRO-3 has partitioned them."""
    return sum(
        int(getattr(p, "ds_numel", p.numel())) for p in model.parameters() if p.requires_grad
    )
