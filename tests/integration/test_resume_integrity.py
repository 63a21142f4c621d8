"""A checkpoint that was changed after it was saved is refused before it is loaded, and no file
of it can run code on a rank, on the real worker function (one gloo rank, DeepSpeed on CPU, a
tiny Llama built here; see tests/trainer_harness.py).

- every rank records the size and sha256 of the files it wrote in ``_MANIFEST-rank<r>.json``
  before the checkpoint is committed;
- a resume refuses, naming the file, a flipped byte, a truncated or deleted file, a deleted
  manifest, an unlisted file DeepSpeed would load, and a manifest entry outside the folder; on
  a local root and on S3; with two ranks, both refuse when one rank's shard is bad;
- DeepSpeed's files are unpickled weights-only: a planted object is refused even when the
  manifest was rewritten to match it, and every ZeRO stage still resumes exactly.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pipeline.devstack.host import free_port
from pipeline.train.checkpoint import (
    COMPLETE_MARKER,
    CheckpointRefused,
    CheckpointStore,
    manifest_name,
    tag_for,
)
from tests.trainer_harness import (
    exported_weights,
    single_rank_group,
    stopped_after,
    tiny_config,
    train,
    write_inputs,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

# Two steps, one checkpoint at step 2 (ZeRO-3, CPU Adam): a second run with the same config
# resumes from it and has nothing left to train.
TWO_STEPS = {"cpt.max_steps": 2}
MODEL = "zero_pp_rank_0_mp_rank_00_model_states.pt"
OPTIM = "zero_pp_rank_0_mp_rank_00_optim_states.pt"
RNG = "rank0_rng.pt"
MANIFEST = manifest_name(0)


@pytest.fixture(scope="module")
def group() -> Iterator[None]:
    with single_rank_group():
        yield


@pytest.fixture(autouse=True)
def _no_zero3_config_left_behind() -> Iterator[None]:
    """A refused resume raises out of ``setup``, before ``finish`` drops the recipe's ZeRO-3
    ``HfDeepSpeedConfig``, and what DeepSpeed keeps of the failed engine still references the
    recipe (its scheduler lambda closes over it): the config stays registered with
    transformers, and the next test's model would load partitioned. A worker whose setup
    fails exits; the test process goes on."""
    yield
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return write_inputs(tmp_path_factory.mktemp("integrity-inputs"))


@pytest.fixture(scope="module")
def saved(
    group: None, inputs: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("saved")
    metrics = train(inputs, out, tiny_config(**TWO_STEPS))
    metrics["out"], metrics["series"] = out, Path(metrics["checkpoint_uri"])
    return metrics


def _copy(saved: dict[str, Any], into: Path) -> tuple[Path, Path]:
    """A copy of the saved checkpoints to tamper with: the folder to resume from, and step 2."""
    root = into / "checkpoints"
    shutil.copytree(saved["series"].parent, root)
    return root, root / saved["series"].name / tag_for(2)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _edit_manifest(folder: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    manifest = json.loads((folder / MANIFEST).read_text())
    edit(manifest["files"])
    (folder / MANIFEST).write_text(json.dumps(manifest))


def _relist(folder: Path, name: str) -> None:
    """What someone who can write the prefix does after changing ``name``: fix the manifest."""
    size, digest = (folder / name).stat().st_size, _sha256(folder / name)
    _edit_manifest(folder, lambda files: files.update({name: {"size": size, "sha256": digest}}))


def test_the_manifest_lists_every_file_with_its_size_and_sha256(saved: dict[str, Any]) -> None:
    folder = saved["series"] / tag_for(2)
    written = sorted(p.name for p in folder.iterdir() if not p.name.startswith("_"))
    assert written == ["loop_state.json", RNG, MODEL, OPTIM]
    assert json.loads((folder / MANIFEST).read_text()) == {
        "format": 1,
        "tag": tag_for(2),
        "rank": 0,
        "files": {
            name: {"size": (folder / name).stat().st_size, "sha256": _sha256(folder / name)}
            for name in written
        },
    }
    # Written before the commit marker: a committed checkpoint always has its manifest.
    assert (folder / MANIFEST).stat().st_mtime_ns <= (folder / COMPLETE_MARKER).stat().st_mtime_ns


def test_an_untouched_checkpoint_resumes(
    saved: dict[str, Any], inputs: dict[str, str], tmp_path: Path
) -> None:
    root, _ = _copy(saved, tmp_path)
    again = train(inputs, tmp_path / "again", tiny_config(**TWO_STEPS), root)
    assert again["resumed_from_step"] == 2
    assert again["loss_history"] == saved["loss_history"]
    weights, expected = exported_weights(tmp_path / "again"), exported_weights(saved["out"])
    assert weights.keys() == expected.keys()
    assert all(weights[k].equal(expected[k]) for k in expected)


# What was done to the step-2 folder -> the file the refusal names, and the reason it gives.
TAMPERING: dict[str, tuple[Callable[[Path], None], str, str]] = {
    "flipped-byte-in-optimizer-states": (
        lambda f: _flip_byte(f / OPTIM),
        OPTIM,
        "its sha256 differs from the manifest",
    ),
    "flipped-byte-in-loop-state": (
        lambda f: _flip_byte(f / "loop_state.json"),
        "loop_state.json",
        "its size or sha256 differs from the manifest",
    ),
    "deleted-rng-state": (
        lambda f: (f / RNG).unlink(),
        RNG,
        "listed in the manifest but missing",
    ),
    "deleted-manifest": (
        lambda f: (f / MANIFEST).unlink(),
        MANIFEST,
        "missing (every committed checkpoint has one)",
    ),
    # ZeRO-3 globs zero_pp_rank_0_mp_rank_*_model_states.pt: DeepSpeed would load this one too.
    "unlisted-model-states": (
        lambda f: shutil.copyfile(f / MODEL, f / MODEL.replace("mp_rank_00", "mp_rank_01")),
        MODEL.replace("mp_rank_00", "mp_rank_01"),
        "not listed in the manifests, and this rank would load it",
    ),
    "entry-outside-the-folder": (
        lambda f: _edit_manifest(f, lambda files: files.update({"../" + RNG: files[RNG]})),
        repr("../" + RNG),
        f"listed in {MANIFEST}: leaves the folder",
    ),
    "absolute-entry": (
        lambda f: _edit_manifest(f, lambda files: files.update({"/etc/" + RNG: files[RNG]})),
        repr("/etc/" + RNG),
        f"listed in {MANIFEST}: leaves the folder",
    ),
}


@pytest.mark.parametrize("tampering", list(TAMPERING), ids=list(TAMPERING))
def test_a_changed_checkpoint_is_refused_naming_the_file(
    tampering: str, saved: dict[str, Any], inputs: dict[str, str], tmp_path: Path
) -> None:
    root, folder = _copy(saved, tmp_path)
    change, name, reason = TAMPERING[tampering]
    change(folder)
    with pytest.raises(CheckpointRefused) as refused:
        train(inputs, tmp_path / "again", tiny_config(**TWO_STEPS), root)
    message = str(refused.value)
    assert f"checkpoint {folder} is refused and the resume stops: {name}: {reason}." in message
    assert f"delete {folder} to resume from the previous complete checkpoint" in message


def test_a_truncated_file_is_refused_with_both_sizes(
    saved: dict[str, Any], inputs: dict[str, str], tmp_path: Path
) -> None:
    root, folder = _copy(saved, tmp_path)
    size = (folder / MODEL).stat().st_size
    (folder / MODEL).write_bytes((folder / MODEL).read_bytes()[:-1])
    with pytest.raises(CheckpointRefused) as refused:
        train(inputs, tmp_path / "again", tiny_config(**TWO_STEPS), root)
    assert f": {MODEL}: {size - 1} bytes where the manifest says {size}." in str(refused.value)


class _Payload:
    """What an attacker who can write the checkpoint prefix would plant: code run on unpickling
    (here, creating a marker file)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (str(self.marker), "w"))


def _plant(path: Path, marker: Path) -> None:
    import torch

    state = torch.load(path, weights_only=False)  # the file this test just saved: trusted
    state["note"] = _Payload(marker)
    torch.save(state, path)


def test_a_planted_object_is_refused_by_the_manifest_before_it_is_unpickled(
    saved: dict[str, Any], inputs: dict[str, str], tmp_path: Path
) -> None:
    root, folder = _copy(saved, tmp_path)
    marker = tmp_path / "payload-ran"
    _plant(folder / OPTIM, marker)
    with pytest.raises(CheckpointRefused) as refused:
        train(inputs, tmp_path / "again", tiny_config(**TWO_STEPS), root)
    size = (folder / OPTIM).stat().st_size
    assert f"{OPTIM}: {size} bytes where the manifest says " in str(refused.value)
    assert not marker.exists()


@pytest.mark.parametrize("name", [MODEL, OPTIM, RNG])
def test_a_planted_object_is_refused_at_load_even_with_a_matching_manifest(
    name: str, saved: dict[str, Any], inputs: dict[str, str], tmp_path: Path
) -> None:
    """DeepSpeed's model and optimizer states (through its checkpoint engine) and the RNG file
    (through restore_rng) are unpickled weights-only."""
    root, folder = _copy(saved, tmp_path)
    marker = tmp_path / "payload-ran"
    _plant(folder / name, marker)
    _relist(folder, name)
    with pytest.raises(CheckpointRefused) as refused:
        train(inputs, tmp_path / "again", tiny_config(**TWO_STEPS), root)
    assert (
        f"checkpoint {folder} is refused and the resume stops: {name}: it holds a pickled "
        "object that is not weights: Unsupported global: GLOBAL io.open"
    ) in str(refused.value)
    assert not marker.exists()


# Every kind of file DeepSpeed writes: model states of ZeRO 0-2 and of ZeRO-3, ZeRO 1-2 and
# ZeRO-3 optimizer states, bf16 optimizer states; with the three allowlisted classes among them.
STAGES = {
    "zero0": {"compute.zero_stage": 0, "compute.offload_optimizer": False},
    "zero1": {"compute.zero_stage": 1, "compute.offload_optimizer": False},
    "zero2-offload": {"compute.zero_stage": 2},
    "zero3": {"compute.zero_stage": 3, "compute.offload_optimizer": False},
    "zero1-bf16": {
        "compute.zero_stage": 1,
        "compute.offload_optimizer": False,
        "compute.precision": "bf16",
    },
}


@pytest.mark.parametrize("setting", list(STAGES), ids=list(STAGES))
def test_every_zero_stage_resumes_exactly_with_weights_only_loads(
    setting: str, group: None, inputs: dict[str, str], tmp_path: Path
) -> None:
    config = tiny_config(**STAGES[setting])  # 4 steps, checkpoints at 2 and 4
    full = train(inputs, tmp_path / "full", config)
    checkpoints = stopped_after(Path(full["checkpoint_uri"]), 2, tmp_path / "stopped")
    resumed = train(inputs, tmp_path / "resumed", config, checkpoints)
    assert resumed["resumed_from_step"] == 2
    # Steps 3 and 4 need the optimizer's moments as saved: the same losses.
    assert resumed["loss_history"] == pytest.approx(full["loss_history"], abs=1e-6)


def test_a_changed_checkpoint_on_s3_is_refused_and_leaves_no_scratch_files(
    group: None,
    inputs: dict[str, str],
    tmp_path: Path,
    s3_server: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import boto3

    for key, value in s3_server.items():
        monkeypatch.setenv(key, value)
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="integrity-test")
    scratch = tmp_path / "nvme"
    config = tiny_config(**(TWO_STEPS | {"compute.local_scratch": str(scratch)}))
    first = train(inputs, tmp_path / "first", config, "s3://integrity-test/run/checkpoints")
    prefix = first["checkpoint_uri"].removeprefix("s3://integrity-test/") + f"/{tag_for(2)}/"
    listed = s3.list_objects_v2(Bucket="integrity-test", Prefix=prefix)["Contents"]
    assert prefix + MANIFEST in {obj["Key"] for obj in listed}
    body = bytearray(s3.get_object(Bucket="integrity-test", Key=prefix + OPTIM)["Body"].read())
    body[len(body) // 2] ^= 0xFF
    s3.put_object(Bucket="integrity-test", Key=prefix + OPTIM, Body=bytes(body))
    with pytest.raises(CheckpointRefused) as refused:
        train(inputs, tmp_path / "again", config, "s3://integrity-test/run/checkpoints")
    where = f"{first['checkpoint_uri']}/{tag_for(2)}"
    assert f"checkpoint {where} is refused and the resume stops: {OPTIM}: its sha256" in str(
        refused.value
    )
    assert not [p for p in scratch.rglob("*") if p.is_file()]


# -- two ranks: a bad shard on one rank stops both ---------------------------------------------


def _two_rank_checkpoint(root: Path) -> None:
    """A committed step-2 checkpoint as two ZeRO-1 ranks write it, with their manifests."""
    folder = root / tag_for(2)
    folder.mkdir(parents=True)
    owned = {
        0: ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"],
        1: ["zero_pp_rank_1_mp_rank_00_optim_states.pt"],
    }
    for rank, names in owned.items():
        for name in names:
            (folder / name).write_bytes(f"{name} of rank {rank}".encode())
        files = {
            n: {"size": (folder / n).stat().st_size, "sha256": _sha256(folder / n)} for n in names
        }
        manifest = {"format": 1, "tag": tag_for(2), "rank": rank, "files": files}
        (folder / manifest_name(rank)).write_text(json.dumps(manifest))
    (folder / COMPLETE_MARKER).write_bytes(b"")


def _rank(rank: int, port: int, root: str, reports: str) -> None:
    import torch.distributed as dist

    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    dist.init_process_group("gloo", rank=rank, world_size=2)
    error = ""
    try:
        CheckpointStore(root, keep_last=2, rank=rank, world=2).local_copy(2)
    except CheckpointRefused:
        error = traceback.format_exc()
    finally:
        dist.destroy_process_group()
    (Path(reports) / f"rank{rank}.txt").write_text(error)


def _local_copy_on_two_ranks(root: Path, reports: Path) -> list[str]:
    """What ``local_copy`` raised on each of two real gloo ranks ("" when it returned)."""
    import torch.multiprocessing as mp

    reports.mkdir(exist_ok=True)
    args = (free_port(), str(root), str(reports))
    mp.start_processes(_rank, args=args, nprocs=2, start_method="spawn")
    return [(reports / f"rank{rank}.txt").read_text() for rank in range(2)]


def test_a_bad_shard_of_one_rank_is_refused_on_every_rank(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    _two_rank_checkpoint(root)
    assert _local_copy_on_two_ranks(root, tmp_path / "untouched") == ["", ""]
    _flip_byte(root / tag_for(2) / "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    for error in _local_copy_on_two_ranks(root, tmp_path / "flipped"):
        assert "CheckpointRefused: rank 1: checkpoint" in error
        assert "zero_pp_rank_1_mp_rank_00_optim_states.pt: its sha256 differs" in error
