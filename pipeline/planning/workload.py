"""What is being planned: one model on one pool for one training section, and one setting."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.planning.architecture import Architecture
from pipeline.planning.hardware import Pool


@dataclass(frozen=True)
class Workload:
    """Everything a plan depends on that the plan does not choose."""

    arch: Architecture
    pool: Pool
    num_workers: int
    """Data-parallel ranks (one per GPU)."""
    cpus_per_worker: int
    seq_len: int
    precision: str
    """``bf16`` (mixed precision, fp32 master weights) or ``fp32``."""
    attention: str
    """The kernel that will run: flash_attention_2, flex_attention, sdpa or eager."""
    blocks_per_worker: int
    """micro_batch_size x grad_accum_steps of the section: fixed, the plan only splits it."""

    @property
    def element_bytes(self) -> int:
        return 2 if self.precision == "bf16" else 4


@dataclass(frozen=True)
class Setting:
    """The DeepSpeed choices a plan makes."""

    zero_stage: int
    offload_optimizer: bool
    offload_params: bool
    activation_checkpointing: bool
    micro_batch_size: int

    def label(self) -> str:
        offload = "+".join(
            name
            for name, on in (("opt", self.offload_optimizer), ("params", self.offload_params))
            if on
        )
        ckpt = "ckpt" if self.activation_checkpointing else "no-ckpt"
        return f"ZeRO-{self.zero_stage} offload:{offload or 'none'} {ckpt} micro {self.micro_batch_size}"
