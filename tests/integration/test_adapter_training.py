"""LoRA and QLoRA in the training recipe, on the real worker function (one gloo rank, DeepSpeed
on CPU, a tiny Llama built here; see tests/trainer_harness.py), fp32 so that the merge can be
compared to 1e-5.

Every document of the data is wrapped in ChatML's turn markers, tokens the tokenizer has but
the model never trained on: the adapter must train their embedding and LM-head rows and leave
every other row, and every weight it does not target, bit for bit as loaded.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pipeline.config import ConfigError
from tests.trainer_harness import (
    SEQ,
    single_rank_group,
    stopped_after,
    tiny_config,
    train,
    write_inputs,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

ADAPTER = {"cpt.adapter.rank": 4, "cpt.adapter.alpha": 8, "cpt.adapter.dropout": 0.0}
PINNED_LORA = [5.700903, 5.684729, 5.685119, 5.658317]
"""The LoRA run's losses (fp32, seed 0), the same at every ZeRO stage with or without CPU Adam.
Step 1 is the base model's loss: peft starts ``B`` at zero, so the adapter adds nothing before
its first update."""
PINNED_QLORA = [5.699432, 5.682424, 5.682471, 5.656116]
"""The QLoRA run's losses: step 1 differs from LoRA's by the NF4 rounding of the base."""


@pytest.fixture(scope="module")
def group() -> Iterator[None]:
    with single_rank_group():
        yield


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return write_inputs(tmp_path_factory.mktemp("adapter-inputs"), chat_markers=True)


def _lora_config(**more: Any) -> Any:
    return tiny_config(
        **{"cpt.method": "lora", "compute.precision": "fp32", "cpt.lr": 0.01, **ADAPTER, **more}
    )


@pytest.fixture(scope="module")
def lora_run(
    group: None, inputs: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("lora")
    metrics = train(inputs, out, _lora_config())
    return metrics | {"out": out / "model"}


def _chat_ids(inputs: dict[str, str]) -> list[int]:
    from pipeline.data.tokenizer import load_tokenizer

    tok = load_tokenizer(inputs["tokenizer"])
    return [int(i) for i in tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])]


def _tensors(folder: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(next(folder.glob("*.safetensors"))))


def test_lora_trains_the_adapter_and_the_chat_rows_only(
    lora_run: dict[str, Any], inputs: dict[str, str]
) -> None:
    import torch

    assert lora_run["method"] == "lora"
    assert lora_run["loss_history"] == pytest.approx(PINNED_LORA, abs=1e-5)
    assert lora_run["loss_history"][-1] < lora_run["loss_history"][0] - 0.04
    # r (d_in + d_out) for each of the 14 targets, plus the two chat rows of the embedding and
    # the LM head.
    base = _tensors(Path(inputs["model"]))
    per_target = sum(
        4 * (t.shape[0] + t.shape[1]) for n, t in base.items() if n.endswith("_proj.weight")
    )
    width = base["model.embed_tokens.weight"].shape[1]
    assert lora_run["trainable_parameters"] == per_target + 2 * 2 * width
    merged = _tensors(lora_run["out"])
    assert merged.keys() == base.keys()
    chat = _chat_ids(inputs)
    other = torch.ones(base["model.embed_tokens.weight"].shape[0], dtype=torch.bool)
    other[chat] = False
    for table in ("model.embed_tokens.weight", "lm_head.weight"):
        assert torch.equal(merged[table][other], base[table][other]), table
        assert not torch.allclose(merged[table][chat], base[table][chat]), table
    targets = [name for name in base if name.endswith("_proj.weight")]
    assert len(targets) == 2 * 7
    for name in base:
        if name in targets:
            assert not torch.equal(merged[name], base[name]), name  # the adapter folded in
        elif "embed_tokens" not in name and "lm_head" not in name:
            assert torch.equal(merged[name], base[name]), name  # norms: frozen, bit for bit


def test_the_merged_model_equals_the_adapter_on_its_base(
    lora_run: dict[str, Any], inputs: dict[str, str]
) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from pipeline.models import adapter_on_base

    adapter_dir = lora_run["out"] / "adapter"
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["base_model_name_or_path"] == inputs["model"]
    on_base = adapter_on_base(Path(inputs["model"]), Path(inputs["tokenizer"]), adapter_dir)
    merged = AutoModelForCausalLM.from_pretrained(str(lora_run["out"])).eval()
    ids = torch.arange(3, 3 + SEQ).reshape(1, SEQ)
    ids[0, ::7] = torch.tensor(_chat_ids(inputs) * 5)[: len(ids[0, ::7])]
    with torch.no_grad():
        expected = on_base(input_ids=ids).logits
        got = merged(input_ids=ids).logits
    assert (got - expected).abs().max() < 1e-5
    # The adapter changed the model: its logits are not the base's.
    base = AutoModelForCausalLM.from_pretrained(inputs["model"]).eval()
    with torch.no_grad():
        assert (base(input_ids=ids).logits - expected).abs().max() > 1e-3


def test_lora_checkpoints_hold_the_adapter_only_and_resume_exactly(
    lora_run: dict[str, Any], inputs: dict[str, str], tmp_path: Path
) -> None:
    series = Path(lora_run["checkpoint_uri"])
    saved = sum(f.stat().st_size for f in (series / "step-0000004").rglob("*.pt"))
    model_bytes = sum(f.stat().st_size for f in Path(inputs["model"]).glob("*.safetensors"))
    # Adapter (4.3k params), its fp32 Adam moments and the loop state: under the base model.
    assert saved < model_bytes, (saved, model_bytes)
    resumed = train(inputs, tmp_path, _lora_config(), stopped_after(series, 2, tmp_path / "ck"))
    assert resumed["resumed_from_step"] == 2
    assert resumed["loss_history"] == pytest.approx(lora_run["loss_history"], abs=1e-5)
    assert (
        _tensors(tmp_path / "model" / "adapter").keys()
        == _tensors(lora_run["out"] / "adapter").keys()
    )


def test_an_adapter_only_output_is_merged_onto_its_base_when_a_stage_fetches_it(
    lora_run: dict[str, Any],
    inputs: dict[str, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import torch

    from pipeline.config import TrackingConfig
    from pipeline.models import MODEL_CACHE_ENV, fetch_model

    monkeypatch.setenv(MODEL_CACHE_ENV, str(tmp_path / "cache"))
    alone = tmp_path / "alone"
    metrics = train(inputs, alone, _lora_config(**{"cpt.adapter.merge": False}))
    assert metrics["loss_history"] == lora_run["loss_history"]
    names = {p.name for p in (alone / "model").iterdir()}
    assert "config.json" not in names and not any(n.endswith(".safetensors") for n in names)
    assert {"adapter", "tokenizer.json"} <= names
    folder = fetch_model(str(alone / "model"), TrackingConfig())
    assert fetch_model(str(alone / "model"), TrackingConfig()) == folder  # built once
    merged, exported = _tensors(folder), _tensors(lora_run["out"])
    assert merged.keys() == exported.keys()
    assert all(torch.equal(merged[k], exported[k]) for k in exported)
    # The next stage trains from it as from the merged export: the same losses.
    after_alone = train({**inputs, "model": str(alone / "model")}, tmp_path / "a", tiny_config())
    after_merged = train({**inputs, "model": str(lora_run["out"])}, tmp_path / "b", tiny_config())
    assert after_alone["loss_history"] == after_merged["loss_history"]
    assert after_alone["loss_history"][0] < PINNED_LORA[0]  # it starts from the trained adapter


@pytest.mark.parametrize(("zero_stage", "offload"), [(0, False), (1, True), (2, False)])
def test_lora_trains_the_same_at_every_zero_stage(
    group: None, inputs: dict[str, str], tmp_path: Path, zero_stage: int, offload: bool
) -> None:
    config = _lora_config(
        **{"compute.zero_stage": zero_stage, "compute.offload_optimizer": offload}
    )
    assert train(inputs, tmp_path, config)["loss_history"] == pytest.approx(PINNED_LORA, abs=1e-5)


@pytest.mark.parametrize(("zero_stage", "offload"), [(0, False), (1, True), (2, False), (3, True)])
def test_qlora_trains_over_a_4bit_base_at_every_zero_stage(
    group: None, inputs: dict[str, str], tmp_path: Path, zero_stage: int, offload: bool
) -> None:
    config = _lora_config(
        **{
            "cpt.method": "qlora",
            "compute.zero_stage": zero_stage,
            "compute.offload_optimizer": offload,
        }
    )
    metrics = train(inputs, tmp_path, config)
    assert metrics["loss_history"] == pytest.approx(PINNED_QLORA, abs=1e-5)
    # The 14 targeted weights are stored 4-bit: two per byte, in fp32 slots of 4 bytes.
    base = _tensors(Path(inputs["model"]))
    targeted = sum(t.numel() for n, t in base.items() if n.endswith("_proj.weight"))
    full = sum(t.numel() for t in base.values())
    adapter = metrics["trainable_parameters"]
    assert metrics["parameters"] == full - targeted + targeted // 8 + adapter
    # The merged export is the 16-bit base with the adapter folded in: a plain model folder.
    merged = _tensors(tmp_path / "model")
    assert merged.keys() == base.keys()


def test_lora_with_dora_and_rslora_trains(
    group: None, inputs: dict[str, str], tmp_path: Path
) -> None:
    config = _lora_config(
        **{"cpt.adapter.dora": True, "cpt.adapter.rslora": True, "compute.zero_stage": 2}
    )
    metrics = train(inputs, tmp_path, config)
    losses = metrics["loss_history"]
    assert losses[0] == pytest.approx(PINNED_LORA[0], abs=1e-5)  # still the base at step 1
    assert losses[-1] < losses[0] - 0.05
    saved = json.loads((tmp_path / "model" / "adapter" / "adapter_config.json").read_text())
    assert saved["use_dora"] is True and saved["use_rslora"] is True


def test_an_unknown_target_module_is_refused_naming_the_model_s_layers(
    group: None, inputs: dict[str, str], tmp_path: Path
) -> None:
    config = _lora_config(**{"cpt.adapter.target_modules": ["q_proj", "qkv_proj"]})
    with pytest.raises(ValueError, match=r"\['qkv_proj'\] match no module.*'o_proj'"):
        train(inputs, tmp_path, config)


def test_qlora_with_parameter_offload_is_refused_with_the_reason() -> None:
    with pytest.raises(ConfigError, match=r"cpt\.method qlora with compute\.offload_params"):
        tiny_config(**{"cpt.method": "qlora", "compute.offload_params": True})
    with pytest.raises(ConfigError, match=r"sft\.adapter\.target_modules"):
        tiny_config(**{"sft.adapter.target_modules": []})


def test_mixtral_refuses_the_expert_targets_and_trains_lora_on_attention(
    group: None, tmp_path: Path
) -> None:
    # transformers 5 fuses Mixtral's experts into 3-D parameters: no gate/up/down modules.
    inputs = write_inputs(tmp_path / "in", architecture="mixtral", chat_markers=True)
    with pytest.raises(ValueError, match=r"\['gate_proj', 'up_proj', 'down_proj'\] match no"):
        train(inputs, tmp_path / "default", _lora_config())
    attention = {"cpt.adapter.target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}
    metrics = train(inputs, tmp_path / "attention", _lora_config(**attention))
    losses = metrics["loss_history"]
    assert losses[-1] < losses[0] and metrics["final_aux_loss"] is not None
