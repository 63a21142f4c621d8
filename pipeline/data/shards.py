"""Shard files and the manifest that describes them.

A split (``cpt_train``, ``cpt_heldout``, ``sft_train``, ``sft_heldout``) is a list of ``.npz``
shards of packed blocks. The manifest records each shard's block count and sha256, so a reader
detects a truncated or replaced shard instead of training on it.
"""

from __future__ import annotations

import hashlib
import io
from typing import Any

import numpy as np

from pipeline import storage
from pipeline.data.pack import PackedBlocks

MANIFEST_FILE = "manifest.json"


def write_split(
    blocks: PackedBlocks, data_uri: str, split: str, shard_blocks: int
) -> dict[str, Any]:
    """Write one split as shards; returns its manifest entry."""
    shards = []
    for index, start in enumerate(range(0, max(len(blocks), 1), shard_blocks)):
        end = min(start + shard_blocks, len(blocks))
        buffer = io.BytesIO()
        np.savez(
            buffer,
            input_ids=blocks.input_ids[start:end],
            position_ids=blocks.position_ids[start:end],
            labels=blocks.labels[start:end],
        )
        data = buffer.getvalue()
        name = f"{split}-{index:05d}.npz"
        storage.write_bytes(storage.join(data_uri, name), data)
        shards.append(
            {"file": name, "blocks": end - start, "sha256": hashlib.sha256(data).hexdigest()}
        )
    return {"shards": shards, "blocks": len(blocks), "trained_tokens": blocks.trained_tokens}


def read_split(data_uri: str, manifest: dict[str, Any], split: str) -> PackedBlocks:
    """Load and verify every shard of a split."""
    if split not in manifest["splits"]:
        raise KeyError(
            f"split {split!r} not in manifest at {data_uri}; has {sorted(manifest['splits'])}"
        )
    parts: dict[str, list[np.ndarray]] = {"input_ids": [], "position_ids": [], "labels": []}
    for shard in manifest["splits"][split]["shards"]:
        uri = storage.join(data_uri, shard["file"])
        data = storage.read_bytes(uri)
        if hashlib.sha256(data).hexdigest() != shard["sha256"]:
            raise ValueError(
                f"shard {uri} does not match its manifest checksum; rerun prepare_data"
            )
        with np.load(io.BytesIO(data)) as arrays:
            for key in parts:
                parts[key].append(arrays[key])
    return PackedBlocks(
        *(np.concatenate(parts[key]) for key in ("input_ids", "position_ids", "labels"))
    )


def read_manifest(data_uri: str) -> dict[str, Any]:
    manifest: dict[str, Any] = storage.read_json(storage.join(data_uri, MANIFEST_FILE))
    return manifest
