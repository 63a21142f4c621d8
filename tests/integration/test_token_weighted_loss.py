"""The loss of a step weighs every target token equally, however the step is split.

One optimizer step over the same four SFT blocks (49, 9, 1 and 0 target tokens) is run as
micro 4 x accum 1 x 1 rank, micro 1 x accum 4 x 1 rank and micro 1 x accum 2 x 2 ranks (gloo,
DeepSpeed ZeRO-3 with CPU Adam). The exported weights, the reported loss and the gradient norm
(which gradient clipping uses) must agree: a mean of per-micro-batch means would give the
9-token block as much weight as the 49-token one and differ between the three splits.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest

from pipeline import storage
from pipeline.config import REPO_ROOT, ModelConfig, load_config
from pipeline.contract import MANIFEST_FILE
from pipeline.data.pack import FLAG_START, FLAG_TRAIN
from pipeline.data.shards import ShardWriter, token_dtype
from pipeline.devstack.local_training import run_local
from pipeline.train.loop import TRAIN_METRICS_FILE, LoopSpec

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]
SEQ = 64
TARGETS = (49, 9, 1, 0)
TINY = ModelConfig(
    name="tiny", hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2
)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A tokenizer, a tiny Llama and one split of four blocks with known target counts."""
    from pipeline.data.tokenizer import train_bpe_tokenizer
    from pipeline.train.model import build_llama

    root = tmp_path_factory.mktemp("token-loss")
    texts = [
        json.loads(line)["text"]
        for line in (REPO_ROOT / "configs/demo_data/domain.jsonl").read_text().splitlines()[:200]
    ]
    tok: PreTrainedTokenizerBase = train_bpe_tokenizer(texts, vocab_size=300)
    tok.save_pretrained(str(root / "tokenizer"))
    build_llama(TINY, tok, SEQ, seed=0).save_pretrained(str(root / "model"))

    rng = np.random.default_rng(0)
    ids = rng.integers(10, len(tok), size=(4, SEQ), dtype=np.int32)
    flags = np.zeros(ids.shape, dtype=np.uint8)
    flags[:, 0] = FLAG_START  # one example per block
    for row, n in enumerate(TARGETS):
        flags[row, SEQ - n :] |= FLAG_TRAIN  # the answer at the end, the prompt masked
    data = root / "data"
    data.mkdir()
    writer = ShardWriter(data, "sft_train", shard_blocks=4, dtype=token_dtype(len(tok)))
    writer(ids, flags)
    manifest = {"seq_len": SEQ, "splits": {"sft_train": writer.close()}}
    storage.write_json(storage.join(str(data), MANIFEST_FILE), manifest)
    return {
        "root": str(root),
        "tokenizer": str(root / "tokenizer"),
        "model": str(root / "model"),
        "data": str(data),
    }


def _train(
    inputs: dict[str, str], name: str, micro: int, accum: int, world: int, steps: int = 1
) -> dict[str, Any]:
    config = load_config(
        REPO_ROOT / "configs" / "demo.yaml",
        {
            "data.seq_len": SEQ,
            "sft.max_steps": steps,
            "sft.warmup_steps": 0,
            "sft.lr": 0.05,
            "sft.grad_clip": 0.5,
            "sft.micro_batch_size": micro,
            "sft.grad_accum_steps": accum,
            "compute.num_workers": world,
        },
    )
    out = str(Path(inputs["root"]) / name)
    spec = LoopSpec(
        config=config.model_dump(mode="json"),
        section="sft",
        model_uri=inputs["model"],
        tokenizer_uri=inputs["tokenizer"],
        data_uri=inputs["data"],
        split="sft_train",
        output_uri=f"{out}/model",
        checkpoint_uri=f"{out}/checkpoints",
        mlflow_run_id="",
    )
    run_local(spec, world)
    metrics: dict[str, Any] = json.loads(Path(out, "model", TRAIN_METRICS_FILE).read_text())
    return metrics


def _weights(path: str) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(Path(path) / "model.safetensors"))


@pytest.fixture(scope="module")
def runs(inputs: dict[str, str]) -> dict[str, dict[str, Any]]:
    """The same optimizer step, split three ways."""
    return {
        "m4a1w1": _train(inputs, "m4a1w1", micro=4, accum=1, world=1),
        "m1a4w1": _train(inputs, "m1a4w1", micro=1, accum=4, world=1),
        "m1a2w2": _train(inputs, "m1a2w2", micro=1, accum=2, world=2),
    }


def test_one_step_is_the_same_however_it_is_split(
    inputs: dict[str, str], runs: dict[str, dict[str, Any]]
) -> None:
    import torch

    # The logged learning rate is the one the step applied (no warm-up: the peak), not the
    # next step's (the cosine floor, since max_steps is 1).
    assert [r["lr_history"] for r in runs.values()] == [[0.05]] * 3
    reference = runs["m4a1w1"]
    assert reference["target_tokens_seen"] == sum(TARGETS) == 59
    assert reference["skipped_steps"] == 0
    for name, metrics in runs.items():
        assert metrics["loss_history"][0] == pytest.approx(
            reference["loss_history"][0], abs=1e-5
        ), name
        assert metrics["grad_norm"] == pytest.approx(reference["grad_norm"], rel=1e-4), name
    # The clip threshold (0.5) is below the norm: clipping applied to the right quantity.
    assert reference["grad_norm"] > 0.5
    weights = {name: _weights(str(Path(inputs["root"], name, "model"))) for name in runs}
    changed = False
    for key, tensor in weights["m4a1w1"].items():
        for name in ("m1a4w1", "m1a2w2"):
            # Adam's first step moves every weight by ~lr (0.05) times g/(|g| + eps): fp32
            # summation-order noise in tiny gradients shows up as at most ~1e-5. A token-count
            # weighting error would flip whole update signs (0.1).
            torch.testing.assert_close(
                weights[name][key], tensor, atol=2e-5, rtol=0, msg=f"{name} {key}"
            )
        base = _weights(inputs["model"])[key]
        changed = changed or not torch.equal(base, tensor)
    assert changed


def test_a_checkpoint_from_another_world_size_is_refused(
    inputs: dict[str, str], runs: dict[str, dict[str, Any]]
) -> None:
    """Same training, two workers then one: the checkpoint is found and refused, not ignored."""
    import torch.multiprocessing as mp

    assert runs["m1a2w2"]["checkpoint_steps"] == [1]
    with pytest.raises(mp.ProcessRaisedException) as err:
        _train(inputs, "m1a2w2", micro=1, accum=2, world=1)
    message = str(err.value)
    assert "was written by 2 workers and this attempt has 1" in message
    assert "compute.num_workers=2" in message


def test_a_non_finite_later_micro_batch_drops_the_gradients_already_accumulated(
    inputs: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Step 1 goes non-finite in its first micro-batch in one run and in its second (after the
    first's backward) in the other; both must skip step 1 entirely and land on equal weights."""
    import torch

    monkeypatch.setenv("PIPELINE_FAULTS", "nan_loss:rank=0:step=1:micro=0")
    first = _train(inputs, "nan-micro0", micro=1, accum=2, world=1, steps=2)
    monkeypatch.setenv("PIPELINE_FAULTS", "nan_loss:rank=0:step=1:micro=1")
    second = _train(inputs, "nan-micro1", micro=1, accum=2, world=1, steps=2)
    for metrics in (first, second):
        assert metrics["skipped_steps"] == 1
        assert metrics["loss_history"][0] is None
    assert second["loss_history"][1] == pytest.approx(first["loss_history"][1], abs=1e-6)
    a = _weights(str(Path(inputs["root"], "nan-micro0", "model")))
    b = _weights(str(Path(inputs["root"], "nan-micro1", "model")))
    for key, tensor in a.items():
        torch.testing.assert_close(b[key], tensor, atol=2e-5, rtol=0, msg=key)
