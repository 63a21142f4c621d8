"""Pick the attention kernel at run time, and build packed-block inputs that keep documents apart.

One place decides the kernel (``select_attention``) and one place decides how a packed
micro-batch reaches it (``packed_model_inputs``); the training loop and the evaluator call both.

A packed block is a ``[B, S]`` row of documents whose ``position_ids`` restart at 0 for every
document (the padding at the end of a block is a segment of its own). Transformers only infers
document boundaries from position ids for some kernels and some batch sizes (flash-attention:
batch size 1 only), so the boundaries are always passed explicitly, in the form each kernel reads:

- ``flash_attention_2``: the micro-batch is flattened into one ``[1, B*S]`` row and the
  document boundaries go in as ``cu_seq_lens_q/k`` and ``max_length_q/k``; transformers then
  calls flash-attn's varlen kernel, with no padding and no mask.
- ``flex_attention``: a document ``BlockMask`` (causal and same document).
- ``document_sdpa`` (what ``compute.attention: sdpa`` loads): the flash form, one ``[1, B*S]``
  row and ``cu_seq_lens``, read by ``document_sdpa_attention``, which this module registers with
  transformers. It runs torch's sdpa with ``is_causal=True`` on each document by itself, so a
  block costs the sum of its documents' squared lengths, and no ``S x S`` mask is built.
- ``sdpa`` and ``eager``: a ``[B, 1, S, S]`` block-diagonal causal mask (boolean for sdpa,
  additive float for eager, the forms their attention functions take as they are). With a dense
  mask torch's sdpa computes all ``S x S`` scores of a block, whatever its documents' lengths;
  plain ``sdpa`` keeps this rule for models loaded with it outside the pipeline.

flash-attn only builds against CUDA, so it is an optional extra of the GPU image; the same code
runs document_sdpa on CPU workers.
"""

from __future__ import annotations

import importlib.util
import logging
from itertools import pairwise
from typing import TYPE_CHECKING, Any, get_args

from pipeline.config import AttentionKernel

if TYPE_CHECKING:
    import torch
    from torch.nn.attention.flex_attention import BlockMask

log = logging.getLogger(__name__)

KERNELS: tuple[str, ...] = get_args(AttentionKernel)
"""The kernels ``compute.attention`` names (minus ``auto``)."""

DOCUMENT_SDPA = "document_sdpa"
"""The implementation ``compute.attention: sdpa`` loads: sdpa run per document of a packed row.

The name holds "sdpa" so that transformers checks the model supports sdpa when loading it. It
lives in memory only: ``save_pretrained`` does not write ``_attn_implementation`` to
``config.json``, so an exported model loads anywhere with the default kernel.
"""


def flash_attention_available() -> bool:
    """Whether flash_attention_2 can run here: a CUDA device and the flash-attn package."""
    import torch

    return torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None


def flex_attention_available() -> bool:
    """Whether flex_attention can run here: a CUDA device and torch's flex_attention module.

    Transformers compiles flex attention with inductor; on CPU that costs tens of seconds per
    shape and runs slower than sdpa, so it is not offered there.
    """
    import torch

    return (
        torch.cuda.is_available()
        and importlib.util.find_spec("torch.nn.attention.flex_attention") is not None
    )


def select_attention(requested: str) -> str:
    """Resolve ``compute.attention`` to the implementation transformers should load, and log it.

    ``auto`` is flash_attention_2 where flash-attn is installed on CUDA, else flex_attention on
    CUDA, else sdpa. ``eager`` runs only on request. sdpa resolves to ``DOCUMENT_SDPA``, which
    this call registers with transformers, so a model can be loaded with the returned name.

    Args:
        requested: the value of ``compute.attention``.

    Returns:
        ``DOCUMENT_SDPA`` for sdpa, else the requested or chosen one of ``KERNELS``.

    Raises:
        ValueError: flash_attention_2 or flex_attention was requested but cannot run here, or
            the name is not a known kernel.
    """
    if requested == "auto":
        if flash_attention_available():
            chosen = "flash_attention_2"
        elif flex_attention_available():
            chosen = "flex_attention"
        else:
            chosen = "sdpa"
    elif requested == "flash_attention_2" and not flash_attention_available():
        raise ValueError(
            "compute.attention=flash_attention_2 needs a CUDA device and the flash-attn package "
            "(pip install '.[gpu]' in the GPU image); use 'auto' or 'sdpa' elsewhere"
        )
    elif requested == "flex_attention" and not flex_attention_available():
        raise ValueError(
            "compute.attention=flex_attention needs a CUDA device (and torch>=2.5); "
            "use 'auto' or 'sdpa' elsewhere"
        )
    elif requested in KERNELS:
        chosen = requested
    else:
        raise ValueError(
            f"compute.attention={requested!r} is not a kernel; expected 'auto' or one of {KERNELS}"
        )
    if chosen == "sdpa":
        register_document_sdpa()
        chosen = DOCUMENT_SDPA
    log.info("attention backend: %s (requested %s)", chosen, requested)
    return chosen


def register_document_sdpa() -> None:
    """Make ``DOCUMENT_SDPA`` an implementation transformers can load a model with.

    Its attention function is ``document_sdpa_attention``; its mask function is sdpa's, so
    generation (a padding mask, a KV cache) builds the masks plain sdpa does. Registering again
    replaces the same entries.
    """
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(DOCUMENT_SDPA, document_sdpa_attention)
    AttentionMaskInterface.register(DOCUMENT_SDPA, sdpa_mask)


def document_sdpa_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    cu_seq_lens_q: torch.Tensor | None = None,
    cu_seq_lens_k: torch.Tensor | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """A transformers attention function: sdpa on each document of a packed row by itself.

    With ``cu_seq_lens_q`` (``packed_model_inputs``) the one row is cut at those offsets and each
    document's queries attend to its own keys, causally: one ``scaled_dot_product_attention``
    call per document, ``is_causal=True``, grouped-query heads shared through ``enable_gqa``.
    Without them (generation, plain batches) this is transformers' sdpa, unchanged.

    Args:
        module: the attention layer (``num_key_value_groups``, ``is_causal``).
        query: ``[1, H, T, D]``.
        key: ``[1, H_kv, T, D]``; ``value`` alike.
        value: see ``key``.
        attention_mask: None, or the 4-D boolean mask transformers built for the row (a sliding
            window shorter than it): each document then takes its own diagonal block.
        dropout: attention dropout probability.
        scaling: the softmax scale.
        is_causal: overrides ``module.is_causal``.
        cu_seq_lens_q: ``[n + 1]`` document offsets into the row.
        cu_seq_lens_k: the same offsets for the keys.
        **kwargs: the layer's other keyword arguments (passed on to transformers' sdpa).

    Returns:
        ``[1, T, H, D]`` and no attention weights, as transformers' sdpa returns.

    Raises:
        ValueError: the row is not one row, keys and queries differ in length or offsets, or the
            layer asks for a position bias or a softcap, which this path does not apply.
    """
    import torch

    if cu_seq_lens_q is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module,
            query,
            key,
            value,
            attention_mask,
            dropout=dropout,
            scaling=scaling,
            is_causal=is_causal,
            **kwargs,
        )
    offsets = cu_seq_lens_q.tolist()
    if cu_seq_lens_k is not None and cu_seq_lens_k.tolist() != offsets:
        raise ValueError("document_sdpa needs the same document offsets for queries and keys")
    if query.shape[0] != 1 or key.shape[2] != query.shape[2] or offsets[-1] != query.shape[2]:
        raise ValueError(
            f"document_sdpa takes one packed row without a KV cache, its offsets ending at its "
            f"length; got query {tuple(query.shape)}, key {tuple(key.shape)}, offsets ending "
            f"at {offsets[-1]}"
        )
    if kwargs.get("position_bias") is not None or kwargs.get("softcap") is not None:
        raise ValueError(
            "document_sdpa applies no position bias or softcap; load this model with "
            "compute.attention: eager"
        )
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    gqa = getattr(module, "num_key_value_groups", 1) > 1
    outputs = []
    for start, end in pairwise(offsets):
        # A mask already holds causality; without one, is_causal lets sdpa skip the upper half.
        mask = None if attention_mask is None else attention_mask[..., start:end, start:end]
        outputs.append(
            torch.nn.functional.scaled_dot_product_attention(
                query[:, :, start:end],
                key[:, :, start:end],
                value[:, :, start:end],
                attn_mask=mask,
                dropout_p=dropout,
                is_causal=causal and mask is None,
                scale=scaling,
                enable_gqa=gqa,
            )
        )
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous(), None


def packed_model_inputs(
    input_ids: torch.Tensor, position_ids: torch.Tensor, attention: str
) -> dict[str, Any]:
    """Keyword arguments for ``model(**kwargs)`` that keep packed documents apart on ``attention``.

    Works the same passed to a DeepSpeed engine. A document starts at the beginning of every row
    and wherever a position id does not continue the previous one (every restart at 0); each
    token attends causally to the earlier tokens of its own document only, at any batch size.

    The caller reads ``logits.reshape(B, S, -1)``: flash_attention_2 and ``DOCUMENT_SDPA`` return
    ``[1, B*S, V]`` whose rows are contiguous, so the reshape is exact. The caller computes the
    loss itself from those logits and its labels; no ``labels`` go in.

    With sdpa and eager the explicit mask replaces the one transformers would build, including
    any sliding window of the model (Mistral v0.1): keep ``seq_len`` within the window there.

    The ``DOCUMENT_SDPA`` inputs are only for a model loaded with that name: plain sdpa would
    ignore ``cu_seq_lens`` and attend across the whole flattened row.

    Args:
        input_ids: ``[B, S]`` token ids, on the model's device.
        position_ids: ``[B, S]`` positions restarting at 0 for every document, same device.
        attention: the kernel the model was loaded with (what ``select_attention`` returned).

    Returns:
        ``input_ids``, ``position_ids`` and ``use_cache=False``, plus ``cu_seq_lens_q/k`` and
        ``max_length_q/k`` (flash_attention_2; ``DOCUMENT_SDPA`` with them on the CPU and a
        ``[1, B*S]`` all-True ``attention_mask``) or a 4-D ``attention_mask`` (the others).

    Raises:
        ValueError: the shapes differ or are not 2-D, or ``attention`` is neither one of
            ``KERNELS`` nor ``DOCUMENT_SDPA``.
    """
    if input_ids.ndim != 2 or input_ids.shape != position_ids.shape:
        raise ValueError(
            f"packed inputs must be [batch, seq_len] alike; got input_ids "
            f"{tuple(input_ids.shape)} and position_ids {tuple(position_ids.shape)}"
        )
    starts = document_starts(position_ids)
    inputs: dict[str, Any] = {
        "input_ids": input_ids,
        "position_ids": position_ids,
        "use_cache": False,
    }
    if attention == "flash_attention_2":
        inputs["input_ids"] = input_ids.reshape(1, -1)
        inputs["position_ids"] = position_ids.reshape(1, -1)
        inputs.update(_varlen_kwargs(starts))
    elif attention == DOCUMENT_SDPA:
        import torch

        inputs["input_ids"] = input_ids.reshape(1, -1)
        inputs["position_ids"] = position_ids.reshape(1, -1)
        # document_sdpa_attention slices by these in Python: on the CPU, reading them in every
        # layer costs no device sync.
        inputs.update(_varlen_kwargs(starts.cpu()))
        # "No padding": transformers then builds no mask (sdpa's is_causal covers it). Without
        # a mask it would find the documents in the position ids and build a [B*S, B*S] one.
        inputs["attention_mask"] = torch.ones_like(inputs["input_ids"], dtype=torch.bool)
    elif attention == "flex_attention":
        inputs["attention_mask"] = document_block_mask(starts)
    elif attention == "sdpa":
        inputs["attention_mask"] = block_diagonal_causal_mask(starts)
    elif attention == "eager":
        import torch

        allowed = block_diagonal_causal_mask(starts)
        # eager adds the mask to the scores (a bool would add 1.0); float32 whatever the model's
        # dtype, the sum promotes to float32 and the blocked scores vanish in its softmax.
        additive = torch.zeros(allowed.shape, device=allowed.device)
        inputs["attention_mask"] = additive.masked_fill_(~allowed, torch.finfo(torch.float32).min)
    else:
        raise ValueError(
            f"no packed-input rule for attention {attention!r}; expected one of "
            f"{(*KERNELS, DOCUMENT_SDPA)}"
        )
    return inputs


def document_starts(position_ids: torch.Tensor) -> torch.Tensor:
    """``[B, S]`` bool: True where a document (or the padding segment) begins.

    That is column 0 of every row and every position id that is not the previous one plus one,
    the same rule transformers uses to find packed sequences.
    """
    import torch

    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    return starts


def block_diagonal_causal_mask(starts: torch.Tensor) -> torch.Tensor:
    """``[B, 1, S, S]`` bool, True where query ``q`` may attend to key ``k``: same document, k <= q."""
    import torch

    document = starts.cumsum(-1)
    index = torch.arange(starts.shape[-1], device=starts.device)
    causal = index[:, None] >= index[None, :]
    same_document = document[:, :, None] == document[:, None, :]
    return (same_document & causal)[:, None]


def document_block_mask(starts: torch.Tensor) -> BlockMask:
    """The flex-attention ``BlockMask`` of ``block_diagonal_causal_mask`` (causal, same document).

    Built compiled on CUDA, as transformers does (no dense ``S x S`` mask in memory); eagerly
    elsewhere, where small test shapes build faster than they compile.
    """
    from torch.nn.attention.flex_attention import create_block_mask

    document = starts.cumsum(-1)

    def same_document_causal(
        batch: torch.Tensor, head: torch.Tensor, q: torch.Tensor, kv: torch.Tensor
    ) -> torch.Tensor:
        return (q >= kv) & (document[batch, q] == document[batch, kv])

    batch_size, seq_len = starts.shape
    return create_block_mask(
        same_document_causal,
        B=batch_size,
        H=None,
        Q_LEN=seq_len,
        KV_LEN=seq_len,
        device=starts.device,
        _compile=starts.is_cuda,
    )


def _varlen_kwargs(starts: torch.Tensor) -> dict[str, Any]:
    """flash-attn varlen arguments for the micro-batch flattened into one row.

    ``cu_seq_lens`` are the flat offsets of every document start plus the total length. Passing
    them spares transformers re-deriving them from position ids in every layer (and it would not
    at batch size > 1). ``max_length`` is a Python int: flash-attn wants one, and it costs one
    device sync here instead of one per layer.
    """
    import torch

    flat = starts.reshape(-1)
    total = torch.tensor([flat.numel()], device=flat.device)
    cu_seq_lens = torch.cat([flat.nonzero().view(-1), total]).to(torch.int32)
    max_length = int(cu_seq_lens.diff().max())
    return {
        "cu_seq_lens_q": cu_seq_lens,
        "cu_seq_lens_k": cu_seq_lens,
        "max_length_q": max_length,
        "max_length_k": max_length,
    }
