"""Which settings a resume may change (pipeline/train/trajectory.py): every field of the train
and compute sections is classified, and only the math ones move the fingerprint."""

from __future__ import annotations

import pytest

from pipeline.config import REPO_ROOT, ComputeConfig, TrainConfig, load_config
from pipeline.train import trajectory

INPUTS = ["/base", "/data", "cpt_train"]


def _fingerprint(**overrides: object) -> str:
    config = load_config(REPO_ROOT / "configs" / "demo.yaml", overrides)
    return trajectory.training_fingerprint(config, "cpt", INPUTS)


def test_every_train_and_compute_field_is_classified_once() -> None:
    train, compute = set(TrainConfig.model_fields), set(ComputeConfig.model_fields)
    assert train == trajectory.TRAIN_MATH | trajectory.TRAIN_OPERATIONAL
    assert not trajectory.TRAIN_MATH & trajectory.TRAIN_OPERATIONAL
    assert compute == trajectory.COMPUTE_MATH | trajectory.COMPUTE_OPERATIONAL
    assert not trajectory.COMPUTE_MATH & trajectory.COMPUTE_OPERATIONAL


@pytest.mark.parametrize(
    "change",
    [
        {"cpt.log_every": 5},
        {"cpt.checkpoint_every": 3},
        {"cpt.keep_last": 4},
        {"cpt.max_bad_steps": 9},
        {"cpt.spike_factor": 3.0},
        {"compute.activation_checkpointing": False},
        {"compute.checkpoint_every_n_layers": 2},
        {"compute.attention": "eager"},
        {"compute.cross_entropy": "full"},
        {"compute.cpus_per_worker": 4},
        {"compute.max_failures": 0},
        {"cpt.micro_batch_size": 2, "cpt.grad_accum_steps": 2},  # 4 x 1 before: same batch
        {"data.num_workers": 3},
        {"sft.lr": 0.5},  # another section's trajectory
    ],
)
def test_operational_changes_keep_the_fingerprint(change: dict[str, object]) -> None:
    assert _fingerprint(**change) == _fingerprint()


@pytest.mark.parametrize(
    "change",
    [
        {"cpt.lr": 0.01},
        {"cpt.max_steps": 31},
        {"cpt.seed": 1},
        {"cpt.micro_batch_size": 8},  # a bigger global batch
        {"compute.precision": "bf16", "compute.zero_stage": 2},
        {"compute.zero_stage": 2},
        {"model.hidden_size": 96, "model.num_heads": 4},
        {"data.seq_len": 128},
    ],
)
def test_math_changes_move_the_fingerprint(change: dict[str, object]) -> None:
    assert _fingerprint(**change) != _fingerprint()


def test_changed_settings_name_each_key_with_old_and_new_values() -> None:
    base = load_config(REPO_ROOT / "configs" / "demo.yaml")
    changed = load_config(
        REPO_ROOT / "configs" / "demo.yaml", {"compute.attention": "eager", "cpt.log_every": 5}
    )
    saved = trajectory.operational_settings(base, "cpt")
    assert trajectory.changed_settings(saved, trajectory.operational_settings(changed, "cpt")) == [
        "compute.attention: 'sdpa' -> 'eager'",
        "cpt.log_every: 1 -> 5",
    ]
