"""Run the project's training worker in the test process: one gloo rank, a tiny model built
here, and packed blocks written the way prepare_data writes them. Nothing is downloaded.

``train_worker`` is the function every Ray Train worker runs; calling it on a one-rank group
exercises the whole recipe (DeepSpeed engine, objective, checkpoints, resume, export) in a few
seconds per run, which lets a test compare many settings.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import numpy as np

from pipeline import storage
from pipeline.config import REPO_ROOT, PipelineConfig, load_config
from pipeline.contract import MANIFEST_FILE
from pipeline.data.pack import FLAG_START, FLAG_TRAIN
from pipeline.data.shards import ShardWriter, token_dtype
from pipeline.devstack.host import free_port
from pipeline.train.checkpoint import LATEST_POINTER, tag_for
from pipeline.train.loop import TRAIN_METRICS_FILE, LoopSpec, spec_dict, train_worker
from tests.tiny_presets import tiny_model_config

SEQ = 64


@contextmanager
def single_rank_group() -> Iterator[None]:
    """A one-process gloo group, as Ray Train starts it for one CPU worker."""
    saved = dict(os.environ)
    os.environ.update(
        {
            "DS_ACCELERATOR": "cpu",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(free_port()),
            "RANK": "0",
            "LOCAL_RANK": "0",
            "WORLD_SIZE": "1",
            "LOCAL_WORLD_SIZE": "1",
        }
    )
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        yield
    finally:
        # Through DeepSpeed once it has wrapped the group: it caches the world group and its
        # ZeRO groups, which a later test's engine would otherwise find destroyed.
        import deepspeed.comm as ds_comm
        from deepspeed.comm import comm as ds_backend

        if ds_backend.cdb is not None and ds_backend.cdb.is_initialized():
            ds_comm.destroy_process_group()
        else:
            dist.destroy_process_group()
        os.environ.clear()
        os.environ.update(saved)


def write_inputs(
    root: Path,
    architecture: Literal["llama", "mixtral"] = "llama",
    n_blocks: int = 32,
    chat_markers: bool = False,
) -> dict[str, str]:
    """A BPE tokenizer, a tiny model and a ``cpt_train`` split of two documents per block;
    with ``chat_markers`` each document is wrapped in ChatML's ``<|im_start|>`` and
    ``<|im_end|>`` (tokens the model's other data never has)."""
    from pipeline.data.tokenizer import train_bpe_tokenizer
    from pipeline.train.model import build_model

    texts = [
        json.loads(line)["text"]
        for line in (REPO_ROOT / "configs/demo_data/domain.jsonl").read_text().splitlines()[:200]
    ]
    tok = train_bpe_tokenizer(texts, vocab_size=300)
    tok.save_pretrained(str(root / "tokenizer"))
    build_model(tiny_model_config(architecture), tok, SEQ, seed=0).save_pretrained(
        str(root / "model")
    )
    # Demo documents back to back, EOS between them, cut into blocks: text a model can learn.
    stream: list[int] = []
    start, end = tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    for text in texts:
        ids = tok(text)["input_ids"]
        stream += [start, *ids, end] if chat_markers else ids
        stream.append(tok.eos_token_id)
        if len(stream) >= n_blocks * SEQ:
            break
    ids = np.asarray(stream[: n_blocks * SEQ], dtype=np.int32).reshape(n_blocks, SEQ)
    flags = np.full(ids.shape, FLAG_TRAIN, dtype=np.uint8)
    flags[:, 0] |= FLAG_START
    after_eos = np.zeros(ids.shape, dtype=bool)
    after_eos[:, 1:] = ids[:, :-1] == tok.eos_token_id
    flags[after_eos] |= FLAG_START  # documents restart their positions
    data = root / "data"
    data.mkdir()
    writer = ShardWriter(data, "cpt_train", shard_blocks=16, dtype=token_dtype(len(tok)))
    writer(ids, flags)
    manifest = {"seq_len": SEQ, "splits": {"cpt_train": writer.close()}}
    storage.write_json(storage.join(str(data), MANIFEST_FILE), manifest)
    return {"tokenizer": str(root / "tokenizer"), "model": str(root / "model"), "data": str(data)}


def tiny_config(**overrides: Any) -> PipelineConfig:
    """demo.yaml at SEQ tokens, fp32, 4 CPT steps of 2 x 2 blocks, no warm-up."""
    base: dict[str, Any] = {
        "data.seq_len": SEQ,
        "cpt.max_steps": 4,
        "cpt.warmup_steps": 0,
        "cpt.lr": 0.01,
        "cpt.micro_batch_size": 2,
        "cpt.grad_accum_steps": 2,
        "cpt.checkpoint_every": 2,
        "cpt.keep_last": 2,
        "compute.num_workers": 1,
    }
    return load_config(REPO_ROOT / "configs" / "demo.yaml", base | overrides)


def loop_spec(
    inputs: dict[str, str],
    out: Path,
    config: PipelineConfig,
    checkpoints: Path | str | None = None,
) -> LoopSpec:
    """What the CPT stage hands its workers, for ``inputs``, writing under ``out``."""
    return LoopSpec(
        config=config.model_dump(mode="json"),
        section="cpt",
        model_uri=inputs["model"],
        tokenizer_uri=inputs["tokenizer"],
        data_uri=inputs["data"],
        split="cpt_train",
        output_uri=str(out / "model"),
        checkpoint_uri=str(checkpoints or out / "checkpoints"),
        mlflow_run_id="",
    )


def train(
    inputs: dict[str, str],
    out: Path,
    config: PipelineConfig,
    checkpoints: Path | str | None = None,
) -> dict[str, Any]:
    """One ``train_worker`` call on the current group; returns its train_metrics.json."""
    train_worker(spec_dict(loop_spec(inputs, out, config, checkpoints)))
    metrics: dict[str, Any] = json.loads((out / "model" / TRAIN_METRICS_FILE).read_text())
    return metrics


def stopped_after(series: Path, step: int, into: Path) -> Path:
    """A copy of a checkpoint series as a run stopped after ``step`` would have left it: newer
    checkpoints gone, ``latest`` pointing at ``step``. Returns the copy's checkpoints folder."""
    target = into / series.name
    shutil.copytree(series, target)
    for folder in target.glob("step-*"):
        if folder.name > tag_for(step):
            shutil.rmtree(folder)
    (target / LATEST_POINTER).write_text(tag_for(step))
    return into


def exported_weights(out: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(out / "model" / "model.safetensors"))
