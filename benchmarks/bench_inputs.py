"""Inputs the GPU check trains on, built locally (nothing is downloaded), and the process group.

- a word-level tokenizer with one token per id (only its files are needed: the loop saves it
  next to the trained weights),
- a freshly initialised Llama-architecture model written with ``save_pretrained``, once, then
  loaded by every training run,
- synthetic documents of variable length (about ``DOCS_PER_BLOCK`` segments per block) packed
  by ``pipeline.data.pack.DocumentPacker`` into ``pipeline.data.shards.ShardWriter`` shards with
  a manifest, exactly as prepare_data's assembly writes them,
- packed rows of equal-length documents for the packed-versus-alone logits check.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import storage
from pipeline.config import REPO_ROOT, ModelConfig, load_config
from pipeline.contract import MANIFEST_FILE
from pipeline.data import shards
from pipeline.data.pack import BlockBuffer, DocumentPacker, PackedBlocks

DEMO_CONFIG = REPO_ROOT / "configs" / "demo.yaml"
SPLIT = "cpt_train"
DOCS_PER_BLOCK = 4.3
"""Target number of packed segments (documents or document pieces) per block."""


@dataclass(frozen=True)
class Shape:
    """Model, data and run size."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    intermediate: int
    seq_len: int
    steps: int
    """Optimizer steps per training row (the loop times all but the first)."""
    precision: str
    """``bf16`` on GPUs; ``fp32`` on CPU (the CPU path checks arithmetic, not speed)."""
    micro_divisor: int
    """Each row's micro batch is divided by this (``--small`` keeps CPU steps short)."""


# The 1.10B Llama of the issue: 16 layers of 60.8M parameters plus 2 x 65.5M (embedding, head).
GPU_SHAPE = Shape(2048, 16, 32, 8, 32000, 8192, 4096, 4, "bf16", 1)
SMALL_SHAPE = Shape(64, 2, 4, 2, 512, 172, 128, 3, "fp32", 4)
# The resume row needs the loop's collectives and checkpoint round trip, not the 1.1B's 15 GB
# checkpoints: the same vocabulary, sequence and head layout on 2 narrow layers (38M).
GPU_RESUME_SHAPE = Shape(512, 2, 8, 2, 32000, 1408, 4096, 2, "bf16", 1)


def shape_overrides(shape: Shape) -> dict[str, Any]:
    """The config overrides that size the demo config's model and blocks to ``shape``."""
    return {
        "data.seq_len": shape.seq_len,
        "model.vocab_size": shape.vocab,
        "model.hidden_size": shape.hidden,
        "model.intermediate_size": shape.intermediate,
        "model.num_layers": shape.layers,
        "model.num_heads": shape.heads,
        "model.num_kv_heads": shape.kv_heads,
    }


def model_config(shape: Shape) -> ModelConfig:
    """The demo config's ``model`` section resized to ``shape``."""
    return load_config(DEMO_CONFIG, shape_overrides(shape)).model


def write_tokenizer(vocab: int, out: Path) -> Any:
    """A word-level tokenizer whose ids 0-2 are BOS/EOS/PAD and every other id is a token."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from pipeline.data.tokenizer import BOS, EOS, PAD

    words = {BOS: 0, EOS: 1, PAD: 2} | {f"t{i}": i for i in range(3, vocab)}
    backend = Tokenizer(models.WordLevel(words, unk_token=PAD))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=BOS, eos_token=EOS, pad_token=PAD
    )
    tok.save_pretrained(str(out))
    return tok


def write_model(shape: Shape, tok: Any, out: Path, cuda: bool, seed: int = 0) -> int:
    """Initialise a Llama of ``shape`` (on the GPU when there is one: seconds instead of a
    minute for the 1.1B) and save it in the training precision.

    Returns:
        Its parameter count.
    """
    import torch

    from pipeline.train.model import build_llama

    dtype = torch.bfloat16 if shape.precision == "bf16" else torch.float32
    with torch.device("cuda" if cuda else "cpu"):
        model = build_llama(model_config(shape), tok, shape.seq_len, seed)
    model.to(dtype)  # type: ignore[arg-type]  # transformers' stubs type .to() oddly
    model.save_pretrained(str(out), safe_serialization=True)
    n_params = sum(p.numel() for p in model.parameters())
    del model
    return n_params


def synthetic_documents(shape: Shape, n_blocks: int, seed: int) -> list[np.ndarray]:
    """Random documents whose lengths average ``DOCS_PER_BLOCK`` segments per packed block.

    A block boundary splits one document into two segments, so documents average
    ``seq_len / (DOCS_PER_BLOCK - 1)`` tokens (EOS included), drawn uniformly in [1/4, 7/4] of it.
    """
    rng = np.random.default_rng(seed)
    mean = shape.seq_len / (DOCS_PER_BLOCK - 1)
    docs: list[np.ndarray] = []
    total = 0
    while total < n_blocks * shape.seq_len:
        length = max(1, int(rng.integers(int(mean / 4), int(mean * 7 / 4))) - 1)
        docs.append(rng.integers(3, shape.vocab, size=length))
        total += length + 1
    return docs


def write_data(
    docs: list[np.ndarray], data_dir: Path, shape: Shape, eos_id: int, pad_id: int
) -> PackedBlocks:
    """Pack ``docs`` into a ``cpt_train`` split with a manifest, the way prepare_data's assembly
    does (``DocumentPacker`` -> ``BlockBuffer`` -> ``ShardWriter``).

    Returns:
        The split as read back by the trainer's own reader.
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    dtype = shards.token_dtype(shape.vocab)
    writer = shards.ShardWriter(data_dir, SPLIT, 4096, dtype)
    buffer = BlockBuffer(shape.seq_len, pad_id, writer, rows=256, dtype=dtype)
    packer = DocumentPacker(buffer, eos_id)
    for doc in docs:
        packer.add(doc)
    buffer.close()
    manifest = {
        "format": shards.FORMAT,
        "seq_len": shape.seq_len,
        "vocab_size": shape.vocab,
        "token_dtype": dtype.name,
        "splits": {SPLIT: writer.close()},
    }
    storage.write_json(str(data_dir / MANIFEST_FILE), manifest)
    return shards.read_split(str(data_dir), manifest, SPLIT)


def segments_per_block(blocks: PackedBlocks) -> float:
    """Mean segments per block; the last block, mostly padding, is left out."""
    full = len(blocks) - 1
    return float((blocks.position_ids[:full] == 0).sum()) / full


def equality_rows(shape: Shape, rows: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``rows`` packed rows of 3 documents of ``seq_len // 3`` tokens each: ids and positions.

    One document length, so a kernel that compiles per shape (flex attention) compiles the
    documents run alone once; it is no multiple of 128 (1365 at 4096, 42 at 128), so the
    boundaries fall inside flex attention's blocks.
    """
    rng = np.random.default_rng(seed)
    length = shape.seq_len // 3
    ids = rng.integers(3, shape.vocab, size=(rows, 3 * length))
    return ids, np.tile(np.arange(3 * length) % length, (rows, 1))


# --- the device and the process group ---------------------------------------------------------


def device_facts() -> dict[str, Any]:
    """CUDA device name and compute capability, or the CPU's name."""
    import torch

    if not torch.cuda.is_available():
        return {"cuda": False, "name": platform.processor() or "cpu", "capability": None}
    major, minor = torch.cuda.get_device_capability(0)
    name = torch.cuda.get_device_name(0)
    return {"cuda": True, "name": name, "capability": f"{major}.{minor}"}


def set_cuda_arch(facts: dict[str, Any]) -> None:
    """Pin ``TORCH_CUDA_ARCH_LIST`` to this GPU before DeepSpeed JIT-builds its ops.

    Unset, torch derives "9.0a" on Hopper, which DeepSpeed's op builder cannot parse (the loop
    sets it too; the op-build rows run before any loop).
    """
    if facts["cuda"] and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        os.environ["TORCH_CUDA_ARCH_LIST"] = facts["capability"]


def project_backend(cuda: bool) -> str:
    """The backend Ray Train and devstack/local_training.py give a training process group here:
    ``cpu:gloo,cuda:nccl`` on CUDA (the loop's GPU tensors reduce through NCCL), gloo on CPU."""
    from pipeline.train.collectives import process_group_backend

    return process_group_backend(cuda)


def init_process_group(backend: str, cuda: bool) -> None:
    """A world-size-1 default group, as Ray Train would have started it for one worker."""
    import torch
    import torch.distributed as dist

    from pipeline.devstack.host import free_port

    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    env |= {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"}
    for key, value in env.items():
        os.environ.setdefault(key, value)
    if cuda:
        torch.cuda.set_device(0)
    dist.init_process_group(backend, rank=0, world_size=1)
