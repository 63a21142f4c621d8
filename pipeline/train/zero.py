"""DeepSpeed configs built from the pipeline config (no JSON files to keep in sync)."""

from __future__ import annotations

import re
import subprocess
from typing import Any

from pipeline.config import ComputeConfig, TrainConfig


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
    return {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.grad_accum_steps,
        "train_batch_size": train.micro_batch_size * train.grad_accum_steps * world_size,
        "gradient_clipping": train.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": compute.precision == "bf16"},
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


# Messages of DeepSpeed's JIT op builds (FusedAdam on GPUs, CPUAdam for optimizer offload).
_BUILD_FAILURES = (
    "Error building extension",
    "invalid literal for int()",
    "ninja",
    "nvcc",
    "--version",
)


def initialize_engine(model: Any, ds_config: dict[str, Any], lr_scheduler: Any) -> Any:
    """``deepspeed.initialize`` with the schedule; an optimizer op that fails to build is
    reported with its cause and the fix instead of a bare traceback.

    Raises:
        RuntimeError: DeepSpeed could not JIT-build the optimizer op this config needs.
    """
    import deepspeed

    try:
        engine, *_ = deepspeed.initialize(
            model=model,
            model_parameters=[p for p in model.parameters() if p.requires_grad],
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
