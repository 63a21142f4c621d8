"""The pieces of exact resume that need no engine: the data order, checkpoint discovery, and
fault specs. The real save/kill/resume cycle runs in tests/integration/test_training_resilience.py.
"""

from __future__ import annotations

from itertools import islice
from pathlib import Path

import numpy as np
import pytest

from pipeline.train.checkpoint import CheckpointStore, file_owner, tag_for
from pipeline.train.data_order import DataOrder
from pipeline.train.faults import Fault, parse_faults


def _sequential_stream(n_blocks: int, seed: int):  # type: ignore[no-untyped-def]
    """The order as the pre-resume loop produced it: one permutation per epoch, one after another."""
    epoch = 0
    while True:
        yield from np.random.default_rng([seed, epoch]).permutation(n_blocks)
        epoch += 1


@pytest.mark.parametrize("resume_step", [10, 100])
def test_resuming_jumps_to_the_position_without_replaying(resume_step: int) -> None:
    n_blocks, seed, per_step = 37, 3, 8  # micro 2 x accum 2 x 2 ranks
    start = resume_step * per_step
    expected = list(islice(_sequential_stream(n_blocks, seed), start, start + per_step))
    order = DataOrder(n_blocks, seed)
    got = [int(i) for m in range(2) for r in range(2) for i in order.micro_batch(start, 2, m, r, 2)]
    assert got == expected
    # The cost of resuming: the permutations the step touches, not one per epoch already done.
    epochs_spanned = (start + per_step - 1) // n_blocks - start // n_blocks + 1
    assert order.permutations_built == epochs_spanned <= 2


def test_every_block_is_read_once_per_epoch() -> None:
    order = DataOrder(10, seed=0)
    first_epoch = order.indices(0, 10)
    assert sorted(first_epoch) == list(range(10))
    assert not np.array_equal(order.indices(10, 10), first_epoch)


def test_an_empty_split_is_refused() -> None:
    with pytest.raises(ValueError, match="no blocks"):
        DataOrder(0, seed=0)


def test_shard_files_belong_to_the_rank_that_wrote_them() -> None:
    assert file_owner("zero_pp_rank_3_mp_rank_00_optim_states.pt") == 3
    assert file_owner("bf16_zero_pp_rank_12_mp_rank_00_optim_states.pt") == 12
    assert file_owner("rank1_rng.pt") == 1
    assert file_owner("mp_rank_00_model_states.pt") is None
    assert file_owner("loop_state.json") is None


def _fake_checkpoint(root: Path, step: int, complete: bool) -> None:
    folder = root / tag_for(step)
    folder.mkdir(parents=True)
    (folder / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"x")
    if complete:
        (folder / "_COMPLETE").write_bytes(b"")


def test_latest_is_the_newest_complete_checkpoint(tmp_path: Path) -> None:
    for step, complete in ((2, True), (4, True), (6, False)):
        _fake_checkpoint(tmp_path, step, complete)
    store = CheckpointStore(str(tmp_path), keep_last=2, rank=0, world=1)
    # No pointer yet (a crash between _COMPLETE and the pointer): the scan finds step 4.
    assert store.latest_step() == 4
    (tmp_path / "latest").write_text(tag_for(2))
    assert store.latest_step() == 2
    # A pointer to a folder that is not complete is not trusted.
    (tmp_path / "latest").write_text(tag_for(6))
    assert store.latest_step() == 4
    assert store.remove_incomplete() == [tag_for(6)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", tag_for(2), tag_for(4)]


def test_fault_specs_parse_and_bad_ones_name_the_item() -> None:
    faults = parse_faults("sigkill:rank=1:step=3; nan_loss:rank=0:step=5-7")
    assert faults == [Fault("sigkill", 1, 3, 3), Fault("nan_loss", 0, 5, 7)]
    assert faults[1].hits(0, 6) and not faults[1].hits(1, 6) and not faults[1].hits(0, 8)
    with pytest.raises(ValueError, match="'explode:rank=0:step=1'"):
        parse_faults("explode:rank=0:step=1")


def test_a_loss_spike_is_measured_against_the_running_mean() -> None:
    from pipeline.train.records import is_loss_spike

    steady = [2.0] * 150 + [1.0] * 100  # only the last 100 count: mean 1.0
    assert is_loss_spike(steady, 2.1, factor=2.0, min_history=5)
    assert not is_loss_spike(steady, 1.9, factor=2.0, min_history=5)
    # Too little history (the first steps after initialisation) never trips it.
    assert not is_loss_spike([1.0] * 4, 10.0, factor=2.0, min_history=5)


def test_rng_states_round_trip_without_unpickling(tmp_path: Path) -> None:
    """The RNG file holds tensors and numbers only: ``weights_only`` loads it, and every
    generator the loop draws from continues exactly where it was saved."""
    import random

    import torch

    from pipeline.train.checkpoint import restore_rng, rng_snapshot

    torch.manual_seed(7)
    np.random.seed(7)
    random.seed(7)
    np.random.standard_normal()  # a cached Gaussian is part of numpy's state
    torch.save(rng_snapshot(), tmp_path / "rank0_rng.pt")
    expected = (torch.rand(3), np.random.standard_normal(3), random.random())
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    restore_rng(tmp_path / "rank0_rng.pt")
    got = (torch.rand(3), np.random.standard_normal(3), random.random())
    assert torch.equal(got[0], expected[0])
    assert np.array_equal(got[1], expected[1])
    assert got[2] == expected[2]


class _Payload:
    """What an attacker who can write the checkpoint prefix would plant: code run on load."""

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (print, ("payload ran",))


def test_an_rng_file_with_a_pickled_object_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import torch

    from pipeline.train.checkpoint import CheckpointRefused, restore_rng

    torch.save({"torch": torch.get_rng_state(), "evil": _Payload()}, tmp_path / "rank0_rng.pt")
    with pytest.raises(CheckpointRefused, match=r"rank0_rng\.pt: it holds a pickled object"):
        restore_rng(tmp_path / "rank0_rng.pt")
    assert "payload ran" not in capsys.readouterr().out
