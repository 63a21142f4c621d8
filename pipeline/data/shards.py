"""Shard files and the manifest that describes them.

A split (``cpt_train``, ``cpt_heldout``, ``sft_train``, ``sft_heldout``) is a list of shards;
a shard is two ``.npy`` files: token ids ``[blocks, seq_len]`` in the smallest dtype that
holds the vocabulary, and one flag byte per token (segment start, trained; see ``pack``).
Readers memory-map them, so a rank touches only the blocks it indexes. The manifest records
each file's sha256, so a reader detects a truncated or replaced shard instead of training on it.
``s3://`` shards are downloaded once per node to a local cache folder and memory-mapped there.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import storage
from pipeline.contract import MANIFEST_FILE
from pipeline.data.pack import BlockColumn, PackedBlocks

FORMAT = "npy-ids-flags/1"
CACHE_ENV = "PIPELINE_SHARD_CACHE"


def token_dtype(vocab_size: int) -> np.dtype[Any]:
    """The smallest unsigned dtype that holds every token id."""
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


class ShardWriter:
    """A row sink (see ``pack.BlockBuffer``) that writes one split's shards into ``folder``."""

    def __init__(
        self,
        folder: Path,
        split: str,
        shard_blocks: int,
        dtype: np.dtype[Any],
        first_index: int = 0,
    ) -> None:
        """``first_index``: number of the first shard written (a task writing from the middle
        of a split)."""
        self.folder, self.split, self.shard_blocks, self.dtype = folder, split, shard_blocks, dtype
        self.first_index = first_index
        self.shards: list[dict[str, Any]] = []
        self.ids: list[np.ndarray] = []
        self.flags: list[np.ndarray] = []
        self.pending = 0
        self.trained_tokens = 0
        self.seq_len = 0

    def __call__(self, ids: np.ndarray, flags: np.ndarray) -> None:
        self.seq_len = ids.shape[1]
        start = 0
        while start < len(ids):
            take = min(self.shard_blocks - self.pending, len(ids) - start)
            self.ids.append(ids[start : start + take].astype(self.dtype))
            self.flags.append(flags[start : start + take])
            self.pending += take
            start += take
            if self.pending == self.shard_blocks:
                self._write()

    def _write(self) -> None:
        index = self.first_index + len(self.shards)
        ids, flags = np.concatenate(self.ids), np.concatenate(self.flags)
        files = {
            "ids": f"{self.split}-{index:05d}.ids.npy",
            "flags": f"{self.split}-{index:05d}.flags.npy",
        }
        np.save(self.folder / files["ids"], ids)
        np.save(self.folder / files["flags"], flags)
        trained = int(np.count_nonzero(flags & 2))
        self.trained_tokens += trained
        self.shards.append(
            {
                "files": files,
                "blocks": len(ids),
                "trained_tokens": trained,
                "sha256": {k: _sha256(self.folder / f) for k, f in files.items()},
            }
        )
        self.ids, self.flags, self.pending = [], [], 0

    def close(self) -> dict[str, Any]:
        """Write the last partial shard; returns the split's manifest entry."""
        if self.pending:
            self._write()
        return {
            "shards": self.shards,
            "blocks": sum(s["blocks"] for s in self.shards),
            "trained_tokens": self.trained_tokens,
            "dtype": self.dtype.name,
        }


def _local_copy(data_uri: str, name: str, sha256: str, verify: bool) -> Path:
    """A local path for a shard file: in place for local data, else a node-local cached copy.

    A download is checked in a temporary file and moved into the cache only when it matches
    ``sha256``, so a bad download never poisons the cache: once the object is fixed, the next
    read on this node succeeds. A cached copy that no longer matches is removed and fetched again.

    Raises:
        ValueError: the file (local or just downloaded) does not match ``sha256``.
    """
    uri = storage.join(data_uri, name)
    mismatch = ValueError(f"shard {uri} does not match its manifest checksum; rerun prepare_data")
    if not storage.is_s3(data_uri):
        if verify and _sha256(Path(uri)) != sha256:
            raise mismatch
        return Path(uri)
    root = Path(os.environ.get(CACHE_ENV, Path(tempfile.gettempdir()) / "pipeline-shards"))
    target = root / sha256[:2] / f"{sha256}.npy"
    if target.exists():
        if not verify or _sha256(target) == sha256:
            return target
        target.unlink(missing_ok=True)  # damaged on the node's disk: fetch it again
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(f".{os.getpid()}.part")
    try:
        storage.download_file(uri, partial)
        if _sha256(partial) != sha256:
            raise mismatch
        os.replace(partial, target)  # ranks on one node may race; the content is identical
    finally:
        partial.unlink(missing_ok=True)
    return target


def read_split(
    data_uri: str, manifest: dict[str, Any], split: str, verify: bool = True
) -> PackedBlocks:
    """Memory-map every shard of a split (verifying checksums unless ``verify`` is False).

    Raises:
        KeyError: the manifest has no such split.
        ValueError: a shard file does not match its checksum.
    """
    if split not in manifest["splits"]:
        raise KeyError(
            f"split {split!r} not in manifest at {data_uri}; has {sorted(manifest['splits'])}"
        )
    entry = manifest["splits"][split]
    mapped: list[tuple[np.ndarray, np.ndarray]] = []
    for shard in entry["shards"]:
        arrays = []
        for kind in ("ids", "flags"):
            name, expected = shard["files"][kind], shard["sha256"][kind]
            path = _local_copy(data_uri, name, expected, verify)
            arrays.append(np.load(path, mmap_mode="r"))
        mapped.append((arrays[0], arrays[1]))
    if not mapped:
        empty = np.zeros((0, manifest["seq_len"]), dtype=np.int32)
        return PackedBlocks(empty, empty.copy(), empty.copy(), 0)
    return PackedBlocks(
        BlockColumn(mapped, "input_ids"),
        BlockColumn(mapped, "position_ids"),
        BlockColumn(mapped, "labels"),
        int(entry["trained_tokens"]),
    )


def read_manifest(data_uri: str) -> dict[str, Any]:
    manifest: dict[str, Any] = storage.read_json(storage.join(data_uri, MANIFEST_FILE))
    return manifest
