"""DeepSpeed as the trainer uses it: the config built from the pipeline config (no JSON files
to keep in sync), the engine and its optimizer, and everything ZeRO-3 changes about loading,
training and saving a model. ZeRO-3 partitions every parameter across the ranks, so the model
must be loaded partitioned, parameters created after loading must be partitioned too, MoE
blocks fetch their experts as one unit, and saving gathers the weights from every rank; the
rest of the trainer does not branch on the ZeRO stage.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import re
import subprocess
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from pipeline.config import ComputeConfig, TrainConfig

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

log = logging.getLogger(__name__)


def deepspeed_config(compute: ComputeConfig, train: TrainConfig, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config for one training stage.

    The optimizer is declared here so DeepSpeed picks its CPU Adam when the optimizer state is
    offloaded; the learning-rate schedule stays in the training loop.
    """
    zero: dict[str, Any] = {"stage": compute.zero_stage}
    if compute.zero_stage == 3:
        zero |= {
            "overlap_comm": compute.pool != "cpu",
            "contiguous_gradients": True,
            "stage3_gather_16bit_weights_on_model_save": True,
        }
    if compute.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": compute.pool != "cpu"}
    if compute.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": compute.pool != "cpu"}
    bf16 = compute.precision == "bf16"
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.grad_accum_steps,
        "train_batch_size": train.micro_batch_size * train.grad_accum_steps * world_size,
        "gradient_clipping": train.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": train.lr,
                "betas": [0.9, 0.95],
                "eps": 1e-8,
                "weight_decay": train.weight_decay,
                # Fused GPU Adam cannot build on CPU workers; plain torch AdamW runs there.
                "torch_adam": compute.pool == "cpu" and not compute.offload_optimizer,
            },
        },
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if bf16:
        # bf16 keeps 8 bits of mantissa: summing 8-32 micro-batches of gradients over 32 ranks
        # in it loses the small ones. Accumulate and reduce in fp32 (as torchtitan does); the
        # config validator refuses ZeRO-0 with bf16, which DeepSpeed can only run in bf16.
        config["data_types"] = {"grad_accum_dtype": "fp32"}
        config["communication_data_type"] = "fp32"
    return config


def optimizer_param_groups(model: Any, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW parameter groups: weight decay on the matmul weights only, not on norms, biases
    or the input embedding (a lookup table: decay would pull rare tokens' rows to zero).

    Shapes are read as ZeRO-3 knows them (``ds_shape``) when the model is partitioned.
    """
    # By module, not by ``.weight``: an adapter's trainable token rows live inside the wrapped
    # embedding, and the wrapper's ``weight`` is a merged copy, not a parameter.
    embedding = {id(p) for p in model.get_input_embeddings().parameters()}
    decay: list[Any] = []
    no_decay: list[Any] = []
    for param in model.parameters():
        if not param.requires_grad:
            continue
        shape = getattr(param, "ds_shape", param.shape)
        (no_decay if len(shape) < 2 or id(param) in embedding else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def cache_cpu_info() -> None:
    """Make py-cpuinfo's ``get_cpu_info`` answer once per process.

    DeepSpeed asks it three times while it starts an engine with its CPU ops (the build flags
    of the shared-memory comm op and of CPU Adam, then CPU Adam's vendor check), and each call
    starts a Python subprocess to read the CPU: about 1.2 s, on every rank of every job. The
    CPU does not change within a process.
    """
    import cpuinfo

    if not hasattr(cpuinfo.get_cpu_info, "cache_info"):
        cpuinfo.get_cpu_info = functools.cache(cpuinfo.get_cpu_info)


# Messages of DeepSpeed's JIT op builds (FusedAdam on GPUs, CPUAdam for optimizer offload).
_BUILD_FAILURES = (
    "Error building extension",
    "invalid literal for int()",
    "ninja",
    "nvcc",
    "--version",
)


def initialize_engine(
    model: Any, param_groups: list[dict[str, Any]], ds_config: dict[str, Any], lr_scheduler: Any
) -> Any:
    """``deepspeed.initialize`` with the schedule; an optimizer op that fails to build is
    reported with its cause and the fix instead of a bare traceback.

    Raises:
        RuntimeError: DeepSpeed could not JIT-build the optimizer op this config needs.
    """
    import deepspeed

    try:
        engine, *_ = deepspeed.initialize(
            model=model,
            model_parameters=param_groups,
            config=ds_config,
            lr_scheduler=lr_scheduler,
            dist_init_required=False,
        )
    except (RuntimeError, ValueError, ImportError, OSError, subprocess.CalledProcessError) as err:
        if not any(marker in str(err) for marker in _BUILD_FAILURES):
            raise
        named = re.search(r"Error building extension '([^']+)'", str(err))
        offload = "offload_optimizer" in ds_config["zero_optimization"]
        op = named.group(1) if named else ("cpu_adam" if offload else "fused_adam")
        raise RuntimeError(
            f"DeepSpeed could not build its {op!r} op: {err}. Fix: set TORCH_CUDA_ARCH_LIST to "
            "the pool's compute capability ('8.0' for A100, '9.0' for H100) so torch does not "
            "pass an arch such as '9.0a' that DeepSpeed cannot parse, and make sure g++, ninja "
            "and the CUDA toolkit are present; the GPU image (docker/Dockerfile.ray-gpu) "
            "prebuilds both ops so that workers never compile at start-up."
        ) from err
    return engine


def discard_step_gradients(engine: Any, micro_steps_taken: int) -> None:
    """Drop every gradient accumulated in an optimizer step that turned out non-finite.

    All micro-batches of the step ran backward (the last one reduced its gradients across the
    ranks at the accumulation boundary) but the optimizer step did not run. Each ZeRO optimizer
    keeps the accumulated gradients in its own buffers, so each is cleared the way DeepSpeed
    itself clears them after an fp16 overflow; then the engine's micro-step counter goes back
    by the ``engine.step()`` calls the step made, so the next step starts clean.
    """
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import INITIAL_MICRO_STEP_ID, DeepSpeedZeroOptimizer

    optimizer = engine.optimizer
    if isinstance(optimizer, DeepSpeedZeroOptimizer_Stage3):  # grads, offload buffers, counters
        optimizer._overflow_clean_up(getattr(optimizer, "loss_scale", 1.0))
    elif isinstance(optimizer, DeepSpeedZeroOptimizer):  # ZeRO-1/2: as its overflow branch
        optimizer.micro_step_id = INITIAL_MICRO_STEP_ID
        optimizer._wait_for_offload_copies()
        optimizer.zero_grad(set_to_none=True)
        optimizer._release_preflattened_grad_buffers()
        if optimizer.cpu_offload:
            optimizer._offload_accumulated_param_ids = set()
            optimizer.reset_cpu_buffers()
        else:
            for key in optimizer.averaged_gradients:
                optimizer.averaged_gradients[key] = None
                optimizer.all_grad_tensors[key] = None
    elif isinstance(optimizer, BF16_Optimizer):  # ZeRO-1 bf16 with fp32 accumulation
        optimizer.clear_hp_grads()
        optimizer.clear_lp_grads(set_to_none=True)
    engine.zero_grad()
    engine.micro_steps -= micro_steps_taken


# -- ZeRO-3: loading partitioned, saving gathered -------------------------------------------------


def partitioned_loading(ds_config: dict[str, Any]) -> Any | None:
    """Under ZeRO-3, the ``HfDeepSpeedConfig`` that makes ``from_pretrained`` partition the
    weights as they load instead of materialising the whole model on every rank; None otherwise.

    The caller keeps it alive until the model is saved: transformers holds it by weak reference
    and asks it whether ZeRO-3 is on (resizing embeddings, gathering for the export).
    """
    if ds_config["zero_optimization"]["stage"] != 3:
        return None
    from transformers.integrations import HfDeepSpeedConfig

    return HfDeepSpeedConfig(ds_config)


@contextlib.contextmanager
def zero3_loading_off() -> Iterator[None]:
    """Within it, transformers and peft see no ZeRO-3 (``partitioned_loading``'s config is
    unregistered, and registered again after): a model loaded inside is whole, on this rank."""
    from transformers.integrations import deepspeed as hf_deepspeed

    registered = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = registered


def partition_loaded_model(model: PreTrainedModel, zero_stage: int) -> None:
    """Under ZeRO-3, partition the parameters loading created whole and make every sparse MoE
    block a leaf module; nothing to do at stages 0-2, where each rank holds the whole model."""
    if zero_stage != 3:
        return
    _partition_new_parameters(model)
    set_moe_leaf_modules(model)


def _partition_new_parameters(model: PreTrainedModel) -> None:
    """Partition parameters that were created whole (transformers builds resized embeddings
    outside ``zero.Init``); DeepSpeed broadcasts rank 0's values first, so every rank starts
    from the same new rows."""
    from transformers.integrations.deepspeed import deepspeed_config as loading_config

    whole = [name for name, p in model.named_parameters() if not hasattr(p, "ds_id")]
    if not whole:
        return
    ds_config = loading_config()
    if ds_config is None:
        raise RuntimeError(
            "zero_stage 3 needs an HfDeepSpeedConfig alive while the model loads (zero.partitioned_loading)"
        )
    import deepspeed

    deepspeed.zero.Init(module=model, config_dict_or_path=ds_config)
    log.info("partitioned %d parameters created after loading: %s", len(whole), whole)


def moe_block_classes() -> list[type[torch.nn.Module]]:
    """The sparse MoE block classes of the MoE architectures the pipeline trains."""
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    return [MixtralSparseMoeBlock, Qwen2MoeSparseMoeBlock, Qwen3MoeSparseMoeBlock]


def set_moe_leaf_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Make every sparse MoE block a ZeRO-3 leaf module; returns the blocks marked.

    ZeRO-3 fetches a module's partitioned weights when the module runs and prefetches by the
    order modules ran before. Routing changes which experts run from step to step and rank to
    rank, which breaks that order (and, with one module per expert, leaves ranks waiting in a
    collective for an expert another rank never ran). A leaf block fetches all its experts on
    entry instead.
    """
    from deepspeed.utils import set_z3_leaf_modules

    present = {type(m) for m in model.modules()} & set(moe_block_classes())
    if not present:
        return []
    blocks: list[torch.nn.Module] = set_z3_leaf_modules(model, list(present))
    log.info("%d MoE blocks set as ZeRO-3 leaf modules", len(blocks))
    return blocks


def full_state_dict(engine: Any, zero_stage: int) -> dict[str, Any] | None:
    """The trained causal LM's whole weights, named as in its model folder.

    ``engine.module`` is the training objective and its ``model`` the LM. Under ZeRO-3 every
    rank must call this: the weights are gathered one layer at a time, to rank 0's CPU, and the
    other ranks get None.
    """
    if zero_stage != 3:
        state: dict[str, Any] = engine.module.model.state_dict()
        return state
    gathered = engine._zero3_consolidated_16bit_state_dict()
    if gathered is None:
        return None
    # The objective names the LM's parameters "model.<name>"; the LM folder wants "<name>".
    return {name.removeprefix("model."): value for name, value in gathered.items()}


def adapter_state_dict(engine: Any, zero_stage: int) -> dict[str, Any] | None:
    """The trained (adapter) parameters of the LM, named as in its ``state_dict``, on rank 0's
    CPU; under ZeRO-3 every rank must call this (the frozen base is not gathered) and the other
    ranks get None."""
    if zero_stage != 3:
        return {
            name: param.detach().cpu()
            for name, param in engine.module.model.named_parameters()
            if param.requires_grad
        }
    gathered = engine._zero3_consolidated_16bit_state_dict(exclude_frozen_parameters=True)
    if gathered is None:
        return None
    return {name.removeprefix("model."): value for name, value in gathered.items()}
