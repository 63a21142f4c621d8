"""Stage 1: raw domain text and chat examples -> tokenizer, packed shards and a manifest.

Outputs (under ``<run>/prepare_data/``): ``tokenizer/``, ``data/manifest.json`` and the shards
``data/{cpt,sft}_{train,heldout}-NNNNN.npz``.
"""

from __future__ import annotations

import logging
import tempfile
from typing import Any, TypeVar

from pipeline import storage, tracking
from pipeline.data import chat, ingest, pack, shards, tokenizer
from pipeline.stages.common import StageContext, StageOutput, stage_main

STAGE = "prepare_data"
HELDOUT_FILE = "heldout.json"
log = logging.getLogger(__name__)
T = TypeVar("T")


def split_heldout(items: list[T], keys: list[str], fraction: float) -> tuple[list[T], list[T]]:
    """Stable train/held-out split by content hash (see ``ingest.is_heldout``)."""
    train: list[T] = []
    heldout: list[T] = []
    for item, key in zip(items, keys, strict=True):
        (heldout if ingest.is_heldout(key, fraction) else train).append(item)
    if not train or not heldout:
        raise ValueError(
            f"data.heldout_fraction={fraction} leaves {len(train)} training and {len(heldout)} "
            "held-out records; provide more data or change the fraction"
        )
    return train, heldout


def run(ctx: StageContext) -> StageOutput:
    cfg = ctx.config
    docs, doc_stats = ingest.load_documents(
        cfg.data.domain_corpus, cfg.data.min_chars, cfg.data.scrub_pii
    )
    chats, chat_stats = ingest.load_chats(cfg.data.instructions, cfg.data.scrub_pii)
    doc_train, doc_heldout = split_heldout(
        docs, [ingest.content_hash(d) for d in docs], cfg.data.heldout_fraction
    )
    chat_keys = [ingest.content_hash(repr(c)) for c in chats]
    chat_train, chat_heldout = split_heldout(chats, chat_keys, cfg.data.heldout_fraction)

    tokenizer_uri = storage.join(ctx.output_uri, "tokenizer")
    with storage.local_staging(tokenizer_uri) as tok_dir:
        source = cfg.model.tokenizer or cfg.model.base
        if source:
            with tempfile.TemporaryDirectory() as scratch:
                tok = tokenizer.load_tokenizer(storage.download_dir(source, scratch))
        else:
            tok = tokenizer.train_bpe_tokenizer(doc_train, cfg.model.vocab_size)
        tok.save_pretrained(str(tok_dir))
    chat.check_chat_tokens(tok, cfg.data.chat_format)
    eos, pad = tok.eos_token_id, tok.pad_token_id

    seq = cfg.data.seq_len
    encode = lambda texts: tok(texts, add_special_tokens=False)["input_ids"]  # noqa: E731
    splits = {
        "cpt_train": pack.pack_documents(encode(doc_train), seq, eos, pad),
        "cpt_heldout": pack.pack_documents(encode(doc_heldout), seq, eos, pad),
    }
    truncated = 0
    for name, convs in (("sft_train", chat_train), ("sft_heldout", chat_heldout)):
        examples = [chat.tokenize_chat(c, tok, cfg.data.chat_format) for c in convs]
        splits[name], cut = pack.pack_examples(examples, seq, pad)
        truncated += cut

    data_uri = storage.join(ctx.output_uri, "data")
    split_entries = {
        name: shards.write_split(b, data_uri, name, cfg.data.shard_blocks)
        for name, b in splits.items()
    }
    manifest: dict[str, Any] = {
        "seq_len": seq,
        "vocab_size": len(tok),
        "chat_format": cfg.data.chat_format,
        "splits": split_entries,
        "documents": vars(doc_stats),
        "chats": {**vars(chat_stats), "truncated": truncated},
    }
    # Raw held-out text lets evaluation re-tokenize for models with another tokenizer (the champion).
    storage.write_json(
        storage.join(data_uri, HELDOUT_FILE), {"documents": doc_heldout, "chats": chat_heldout}
    )
    storage.write_json(storage.join(data_uri, shards.MANIFEST_FILE), manifest)
    tracking.log_json_artifact(cfg.tracking, ctx.mlflow_run_id, shards.MANIFEST_FILE, manifest)
    log.info("manifest: %s", {k: v["blocks"] for k, v in split_entries.items()})

    metrics = {f"{name}_blocks": entry["blocks"] for name, entry in split_entries.items()}
    metrics |= {
        f"{name}_trained_tokens": entry["trained_tokens"] for name, entry in split_entries.items()
    }
    metrics |= {
        "documents_kept": doc_stats.kept,
        "documents_duplicates": doc_stats.duplicates,
        "pii_replacements": doc_stats.pii_replacements + chat_stats.pii_replacements,
        "chats_kept": chat_stats.kept,
        "chats_truncated": truncated,
        "vocab_size": len(tok),
    }
    return StageOutput(outputs={"tokenizer": tokenizer_uri, "data": data_uri}, metrics=metrics)


if __name__ == "__main__":
    stage_main(STAGE, run)
