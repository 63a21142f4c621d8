"""Held-out loss, perplexity and bits-per-byte of one model.

Every model is scored on the same raw held-out text, tokenized with its own tokenizer, so a
candidate and a champion with different tokenizers compare on bits-per-byte.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.data import chat, pack
from pipeline.data.chat import IGNORE_INDEX

if TYPE_CHECKING:
    from transformers import PreTrainedModel


@dataclass
class HeldoutScore:
    nll_sum: float
    """Summed next-token negative log-likelihood (nats) over scored tokens."""
    tokens: int
    """Scored tokens (labels that are not masked)."""
    bytes: int
    """UTF-8 bytes the scored tokens stand for."""

    @property
    def loss(self) -> float:
        return self.nll_sum / max(self.tokens, 1)

    @property
    def perplexity(self) -> float:
        return math.exp(min(self.loss, 50.0))

    @property
    def bits_per_byte(self) -> float:
        return self.nll_sum / math.log(2) / max(self.bytes, 1)

    def as_dict(self) -> dict[str, float]:
        return {
            **asdict(self),
            "loss": self.loss,
            "perplexity": self.perplexity,
            "bits_per_byte": self.bits_per_byte,
        }


def score_blocks(
    model: PreTrainedModel,
    blocks: pack.PackedBlocks,
    byte_lengths: list[int],
    batch_size: int,
    max_batches: int,
    attention: str | None = None,
) -> HeldoutScore:
    """Sum the loss over packed blocks, documents isolated as in training.

    ``attention`` is the kernel the model was loaded with; None reads it from the model's config.
    """
    import torch
    import torch.nn.functional as F

    from pipeline.train.attention import packed_model_inputs

    attention = attention or model.config._attn_implementation
    lengths = torch.tensor(byte_lengths, dtype=torch.long)
    nll, tokens, nbytes = 0.0, 0, 0
    device = next(model.parameters()).device
    with torch.no_grad():
        for start in range(0, min(len(blocks), batch_size * max_batches), batch_size):
            ids = torch.as_tensor(blocks.input_ids[start : start + batch_size], dtype=torch.long)
            pos = torch.as_tensor(blocks.position_ids[start : start + batch_size], dtype=torch.long)
            labels = torch.as_tensor(blocks.labels[start : start + batch_size], dtype=torch.long)
            inputs = packed_model_inputs(ids.to(device), pos.to(device), attention)
            # The flash-attention path returns one flattened row: back to [B, S, V].
            logits = model(**inputs).logits.reshape(*ids.shape, -1).float()
            target = labels[:, 1:]
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]),
                target.reshape(-1).to(device),
                ignore_index=IGNORE_INDEX,
                reduction="sum",
            )
            mask = target != IGNORE_INDEX
            nll += float(loss)
            tokens += int(mask.sum())
            nbytes += int(lengths[target[mask]].sum())
    return HeldoutScore(nll, tokens, nbytes)


def score_model(
    model_dir: str | Path,
    heldout: dict[str, Any],
    seq_len: int,
    chat_format: chat.ChatFormat,
    batch_size: int,
    max_batches: int,
    attention: str,
) -> dict[str, dict[str, float]]:
    """Domain and instruction scores of the model folder (which holds its tokenizer)."""
    import torch

    from pipeline.data.tokenizer import load_tokenizer, token_byte_lengths
    from pipeline.train.model import load_causal_lm

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    tok = load_tokenizer(model_dir)
    model = load_causal_lm(model_dir, attention, dtype)
    model.to(device).eval()  # type: ignore[arg-type]  # transformers 5 types .to() oddly
    byte_lengths = token_byte_lengths(tok)
    docs = tok(heldout["documents"], add_special_tokens=False)["input_ids"]
    domain = pack.pack_documents(docs, seq_len, tok.eos_token_id, tok.pad_token_id)
    examples = [chat.tokenize_chat(c, tok, chat_format) for c in heldout["chats"]]
    instructions, _ = pack.pack_examples(examples, seq_len, tok.pad_token_id)
    return {
        "domain": score_blocks(
            model, domain, byte_lengths, batch_size, max_batches, attention
        ).as_dict(),
        "instructions": score_blocks(
            model, instructions, byte_lengths, batch_size, max_batches, attention
        ).as_dict(),
    }
