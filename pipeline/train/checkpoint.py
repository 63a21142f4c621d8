"""Resumable training checkpoints: sharded DeepSpeed state plus the loop state, committed atomically.

Layout under a stage's ``checkpoints/<training fingerprint>/`` (local folder or ``s3://``)::

    step-0000010/            DeepSpeed engine state (every rank's shards), loop_state.json,
                             rank<r>_rng.pt (RNG states as plain tensors), _MANIFEST-rank<r>.json
                             (size and sha256 of each file rank r wrote), and _COMPLETE, last
    step-0000020/
    latest                   "step-0000020": advanced only after that folder is complete

A folder without ``_COMPLETE`` is a save that died half-way: it is never resumed from and is
removed by the next attempt. Older complete checkpoints are deleted only after a newer one is
complete (``keep_last``).

On local storage every rank writes in place, then rank 0 commits after a barrier. On S3 every
rank writes to a node-local staging folder (``compute.local_scratch``, else the temp dir; the
same cost as a local save) and a background thread uploads its own files, deleting each once
uploaded, then marks its rank uploaded; rank 0's thread commits once every rank is uploaded.
The loop only waits for an upload when it starts the next save or finishes. A resume from S3
downloads each rank's files to the same scratch folder and deletes them once loaded.

A local checkpoint root is only valid when every rank sees the same folder: ``agreed_latest``
compares every rank's view of the newest checkpoint and fails on all ranks at once when they
differ (instead of one rank loading alone until the collective timeout).

Whoever can write the checkpoint prefix must not be able to run code on the ranks. Each rank
records the size and sha256 of the files it wrote in ``_MANIFEST-rank<r>.json`` before the
checkpoint is committed; a resume checks every file a rank will read against rank 0's manifest
and its own, before anything is parsed, and refuses the checkpoint on every rank at once when a
manifest or a file is missing, a file differs, or an unlisted one would be read. The refusal is
loud and final, never a silent fall-back to an older checkpoint: a damaged checkpoint is either
a storage fault or tampering, and both need a person. Past the manifest (a writer of the prefix
can rewrite it too), nothing is unpickled: DeepSpeed's files are loaded with
``weights_only=True`` and an allowlist of the three DeepSpeed classes they hold
(``CheckpointStore.load_engine``), the RNG files with plain ``weights_only=True``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import storage
from pipeline.train import faults

log = logging.getLogger(__name__)

COMPLETE_MARKER = "_COMPLETE"
LATEST_POINTER = "latest"
LOOP_STATE_FILE = "loop_state.json"
UPLOADED_PREFIX = "_UPLOADED-rank"
MANIFEST_PREFIX = "_MANIFEST-rank"
MANIFEST_FORMAT = 1
COMMIT_TIMEOUT_S = 3600.0
_SHA256 = re.compile(r"^[0-9a-f]{64}$")

# DeepSpeed names per-rank shards zero_pp_rank_<r>_...; our RNG files are rank<r>_rng.pt.
# Everything else (model states of ZeRO 0-2, loop_state.json) is written by rank 0.
_RANK_FILE = re.compile(r"^(?:bf16_)?(?:zero_pp_rank_|rank)(\d+)_")
_TAG = re.compile(r"^step-(\d{7})$")


def tag_for(step: int) -> str:
    return f"step-{step:07d}"


def file_owner(name: str) -> int | None:
    """The rank that writes (and alone reads) ``name``, or None for files every rank reads."""
    match = _RANK_FILE.match(name)
    return int(match.group(1)) if match else None


def manifest_name(rank: int) -> str:
    return f"{MANIFEST_PREFIX}{rank}.json"


def _bookkeeping(name: str) -> bool:
    """Markers, manifests (``_...``) and half-written temporary files (``.…``): never loaded."""
    return name.startswith(("_", "."))


class CheckpointRefused(RuntimeError):
    """A checkpoint does not match its manifests, or holds a pickled object that is not
    weights: the resume stops before a step is trained on it."""


def _written_by(name: str, rank: int) -> bool:
    """Whether ``rank`` writes the checkpoint file ``name``: its own shards, and on rank 0 the
    files every rank reads."""
    owner = file_owner(name)
    return owner == rank or (owner is None and rank == 0)


def _refusal(where: str, name: str, reason: str) -> CheckpointRefused:
    return CheckpointRefused(
        f"checkpoint {where} is refused and the resume stops: {name}: {reason}. "
        f"If this is a storage fault, delete {where} to resume from the previous complete "
        "checkpoint, or delete the whole checkpoints folder to start fresh; if nobody here "
        "changed the file, someone else can write this prefix: restrict who can."
    )


def _sha256(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


class CheckpointStore:
    """The checkpoints of one training stage attempt series (one rank's view of them)."""

    def __init__(
        self,
        root_uri: str,
        keep_last: int,
        rank: int,
        world: int,
        scratch: str | None = None,
        adapter_only: bool = False,
    ) -> None:
        self.root, self.keep_last, self.rank, self.world = root_uri, keep_last, rank, world
        self.adapter_only = adapter_only
        """Adapter training: checkpoints hold the trained parameters and their optimizer state,
        not the frozen base, which every attempt loads again from the stage's input model."""
        self.remote = storage.is_s3(root_uri)
        digest = hashlib.sha256(root_uri.encode()).hexdigest()[:16]
        scratch_root = Path(scratch) if scratch else Path(tempfile.gettempdir())
        self.staging = scratch_root / "pipeline-checkpoints" / digest / f"rank{rank}"
        self._upload: threading.Thread | None = None
        self._upload_error: BaseException | None = None
        self.last_upload_s = 0.0

    # -- reading -------------------------------------------------------------------------------

    def _tags(self) -> dict[int, str]:
        return {
            int(m.group(1)): name
            for name in storage.list_children(self.root)
            if (m := _TAG.match(name))
        }

    def is_complete(self, step: int) -> bool:
        return storage.exists(storage.join(self.root, tag_for(step), COMPLETE_MARKER))

    def latest_step(self) -> int | None:
        """Step of the newest complete checkpoint: the ``latest`` pointer, checked; else a scan."""
        try:
            tag = storage.read_bytes(storage.join(self.root, LATEST_POINTER)).decode().strip()
        except FileNotFoundError:
            tag = ""
        match = _TAG.match(tag)
        if match and self.is_complete(int(match.group(1))):
            return int(match.group(1))
        complete = [step for step in self._tags() if self.is_complete(step)]
        return max(complete) if complete else None

    def agreed_latest(self) -> int | None:
        """``latest_step`` as every rank sees it; all ranks call this together.

        Raises:
            RuntimeError: the ranks see different newest checkpoints (a local checkpoint root
                on more than one node, or a store that is not consistent); every rank raises.
        """
        from pipeline.train.collectives import host_gather

        views = host_gather(self.latest_step())
        if len(set(views)) > 1:
            seen = ", ".join(
                f"rank {r}: {v if v is not None else 'none'}" for r, v in enumerate(views)
            )
            raise RuntimeError(
                f"the ranks disagree on the newest complete checkpoint under {self.root} "
                f"({seen}): each rank reads a different folder. Put storage.artifact_root on "
                "s3:// (or a filesystem every node mounts) when workers span nodes."
            )
        return views[0]

    def read_loop_state(self, step: int) -> dict[str, Any]:
        """``loop_state.json`` of ``step``, checked against rank 0's manifest before it is parsed.

        Raises:
            CheckpointRefused: the manifest is missing, or the file is missing or differs.
        """
        tag = tag_for(step)
        where = storage.join(self.root, tag)
        entry = self._manifest(tag, 0).get(LOOP_STATE_FILE)
        try:
            data = storage.read_bytes(storage.join(where, LOOP_STATE_FILE))
        except FileNotFoundError:
            raise _refusal(where, LOOP_STATE_FILE, "missing") from None
        if entry is None:
            raise _refusal(where, LOOP_STATE_FILE, f"not listed in {manifest_name(0)}")
        if len(data) != entry["size"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise _refusal(where, LOOP_STATE_FILE, "its size or sha256 differs from the manifest")
        state: dict[str, Any] = json.loads(data)
        return state

    def remove_incomplete(self) -> list[str]:
        """Delete half-written checkpoints (rank 0, before training writes new ones)."""
        removed = [tag for step, tag in sorted(self._tags().items()) if not self.is_complete(step)]
        for tag in removed:
            storage.delete_tree(storage.join(self.root, tag))
            log.warning("removed incomplete checkpoint %s (a save that did not finish)", tag)
        return removed

    def local_copy(self, step: int) -> Path:
        """A local folder holding what this rank needs to load ``step`` (downloaded from S3),
        each of those files checked against the manifests; all ranks call this together.

        Raises:
            CheckpointRefused: on every rank, when any rank's files fail the check (one rank
                alone would otherwise wait in DeepSpeed's collectives until they time out).
        """
        from pipeline.train.collectives import host_gather

        tag = tag_for(step)
        target = self.staging / "load" if self.remote else Path(self.root)
        if self.remote:
            shutil.rmtree(target, ignore_errors=True)
            for name in storage.list_children(storage.join(self.root, tag)):
                if self._reads(name) and not _bookkeeping(name):
                    storage.download_file(storage.join(self.root, tag, name), target / tag / name)
        try:
            self._verify(target / tag, tag)
            problem = ""
        except CheckpointRefused as err:
            problem = str(err)
        problems = host_gather(problem)
        if any(problems):
            self.release_local_copy()
            first = self.rank if problem else next(r for r, p in enumerate(problems) if p)
            raise CheckpointRefused(f"rank {first}: {problems[first]}")
        return target

    def _reads(self, name: str) -> bool:
        """Whether this rank loads the checkpoint file ``name`` (a path's last part)."""
        return file_owner(name) in (None, self.rank)

    def _manifest(self, tag: str, rank: int) -> dict[str, dict[str, Any]]:
        """The files rank ``rank`` recorded for ``tag`` (name -> size, sha256), every name
        checked to stay inside the checkpoint folder and to be one that rank writes.

        Raises:
            CheckpointRefused: the manifest is missing or malformed, or an entry is bad.
        """
        where, manifest = storage.join(self.root, tag), manifest_name(rank)
        try:
            saved = json.loads(storage.read_bytes(storage.join(where, manifest)))
        except FileNotFoundError:
            raise _refusal(
                where, manifest, "missing (every committed checkpoint has one)"
            ) from None
        except ValueError as err:  # JSONDecodeError and UnicodeDecodeError alike
            raise _refusal(where, manifest, f"not valid JSON ({err})") from err
        files = saved.get("files") if isinstance(saved, dict) else None
        if not isinstance(files, dict) or (saved.get("tag"), saved.get("rank")) != (tag, rank):
            raise _refusal(where, manifest, f"not the manifest of {tag}, rank {rank}")
        for name, entry in files.items():
            parts = name.split("/")
            if any(part in ("", ".", "..") or "\\" in part or "\0" in part for part in parts):
                raise _refusal(where, repr(name), f"listed in {manifest}: leaves the folder")
            if _bookkeeping(parts[-1]) or not _written_by(parts[-1], rank):
                raise _refusal(
                    where, name, f"listed in {manifest}, but rank {rank} never writes it"
                )
            if not (
                isinstance(entry, dict)
                and type(entry.get("size")) is int
                and _SHA256.match(str(entry.get("sha256")))
            ):
                raise _refusal(where, name, f"its entry in {manifest} is not a size and a sha256")
        return files

    def _verify(self, folder: Path, tag: str) -> None:
        """Check what this rank loads from ``folder`` (``tag`` on local disk) against rank 0's
        manifest (the files every rank reads) and this rank's (its own shards).

        Raises:
            CheckpointRefused: naming the first file that is unlisted, missing or different.
        """
        where = storage.join(self.root, tag)
        expected: dict[str, dict[str, Any]] = {}
        for rank in sorted({0, self.rank}):
            listed = self._manifest(tag, rank)
            expected |= {name: e for name, e in listed.items() if self._reads(Path(name).name)}
        present = {
            path.relative_to(folder).as_posix(): path
            for path in folder.rglob("*")
            if path.is_file() and not _bookkeeping(path.name) and self._reads(path.name)
        }
        for name in sorted(present.keys() - expected.keys()):
            raise _refusal(where, name, "not listed in the manifests, and this rank would load it")
        for name, entry in sorted(expected.items()):
            if name not in present:
                raise _refusal(where, name, "listed in the manifest but missing")
            size = present[name].stat().st_size
            if size != entry["size"]:
                raise _refusal(where, name, f"{size} bytes where the manifest says {entry['size']}")
            if _sha256(present[name]) != entry["sha256"]:
                raise _refusal(where, name, "its sha256 differs from the manifest")

    def load_engine(self, engine: Any, folder: Path, step: int) -> None:
        """``engine.load_checkpoint`` of ``step`` from ``folder`` (``local_copy``'s), with every
        file DeepSpeed reads unpickled by torch's weights-only unpickler (``WeightsOnlyLoads``).

        Raises:
            CheckpointRefused: a file holds an object that is not plain weights.
            RuntimeError: DeepSpeed found no checkpoint to load in ``folder``.
        """
        tag = tag_for(step)
        # During load_checkpoint DeepSpeed calls its checkpoint engine's load() and nothing else.
        saver = engine.checkpoint_engine
        engine.checkpoint_engine = WeightsOnlyLoads(storage.join(self.root, tag))
        try:
            load_path, _ = engine.load_checkpoint(
                str(folder), tag=tag, load_module_strict=not self.adapter_only
            )
        finally:
            engine.checkpoint_engine = saver
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {tag} from {folder}")

    def release_local_copy(self) -> None:
        """Delete what ``local_copy`` downloaded (a no-op for a local root, loaded in place)."""
        if self.remote:
            shutil.rmtree(self.staging / "load", ignore_errors=True)

    # -- writing -------------------------------------------------------------------------------

    def save(
        self,
        engine: Any,
        step: int,
        loop_state: dict[str, Any],
        rng_state: dict[str, Any],
        active: list[faults.Fault],
    ) -> float:
        """Write checkpoint ``step`` (all ranks call this); returns the seconds the loop waited.

        The previous checkpoint's upload, if still running, is waited for first.
        """
        import torch
        import torch.distributed as dist

        started = time.perf_counter()
        self.wait()
        tag = tag_for(step)
        local_root = self.staging / "save" if self.remote else Path(self.root)
        if self.remote:
            shutil.rmtree(local_root / tag, ignore_errors=True)
        engine.save_checkpoint(
            str(local_root),
            tag=tag,
            save_latest=False,
            exclude_frozen_parameters=self.adapter_only,
        )
        folder = local_root / tag
        folder.mkdir(parents=True, exist_ok=True)  # a rank without shards of its own (ZeRO-0)
        torch.save(rng_state, folder / f"rank{self.rank}_rng.pt")
        if self.rank == 0:
            (folder / LOOP_STATE_FILE).write_text(json.dumps(loop_state, indent=2))
        if not self.remote:
            self._write_manifest(folder, tag)
            faults.maybe_kill(active, "sigkill_in_checkpoint", self.rank, step, self.root)
            dist.barrier()
            if self.rank == 0:
                self._commit(step)
            dist.barrier()
            return time.perf_counter() - started
        # Every rank's files are on local disk here; the upload runs beside the training loop.
        dist.barrier()
        self._upload_error = None
        self._upload = threading.Thread(
            target=self._upload_and_commit,
            args=(folder, step, active),
            name=f"checkpoint-upload-{tag}",
            daemon=True,
        )
        self._upload.start()
        return time.perf_counter() - started

    def _upload_and_commit(self, folder: Path, step: int, active: list[faults.Fault]) -> None:
        try:
            started = time.perf_counter()
            tag = tag_for(step)
            mine = self._write_manifest(folder, tag)
            for index, path in enumerate(mine):
                storage.upload_file(
                    path, storage.join(self.root, tag, path.relative_to(folder).as_posix())
                )
                if index == 0:
                    faults.maybe_kill(active, "sigkill_in_checkpoint", self.rank, step, self.root)
                path.unlink()
            storage.write_bytes(storage.join(self.root, tag, f"{UPLOADED_PREFIX}{self.rank}"), b"")
            if self.rank == 0:
                self._wait_for_ranks(tag)
                self._commit(step)
            # Staged files are on S3 now; DeepSpeed also drops a zero_to_fp32 script beside them.
            shutil.rmtree(folder.parent, ignore_errors=True)
            self.last_upload_s = time.perf_counter() - started
        except BaseException as err:  # surfaced by wait() in the training thread
            self._upload_error = err

    def _write_manifest(self, folder: Path, tag: str) -> list[Path]:
        """Record the size and sha256 of this rank's files of ``tag`` (in ``folder``) in
        ``_MANIFEST-rank<r>.json`` beside them, before anything commits; returns those files."""
        mine = sorted(
            path
            for path in folder.rglob("*")
            if path.is_file() and not _bookkeeping(path.name) and _written_by(path.name, self.rank)
        )
        files = {
            path.relative_to(folder).as_posix(): {
                "size": path.stat().st_size,
                "sha256": _sha256(path),
            }
            for path in mine
        }
        manifest = {"format": MANIFEST_FORMAT, "tag": tag, "rank": self.rank, "files": files}
        storage.write_json(storage.join(self.root, tag, manifest_name(self.rank)), manifest)
        return mine

    def _wait_for_ranks(self, tag: str) -> None:
        deadline = time.monotonic() + COMMIT_TIMEOUT_S
        wanted = {f"{UPLOADED_PREFIX}{r}" for r in range(self.world)}
        while not wanted <= set(storage.list_children(storage.join(self.root, tag))):
            if time.monotonic() > deadline:
                raise TimeoutError(f"checkpoint {tag}: not every rank uploaded its shards")
            time.sleep(0.5)

    def _commit(self, step: int) -> None:
        """Mark ``step`` complete, advance ``latest``, then delete what is no longer kept."""
        tag = tag_for(step)
        storage.write_bytes(storage.join(self.root, tag, COMPLETE_MARKER), b"")
        storage.write_bytes(storage.join(self.root, LATEST_POINTER), tag.encode())
        complete = sorted(s for s in self._tags() if self.is_complete(s))
        keep = set(complete[-self.keep_last :])
        for old_step, old_tag in self._tags().items():
            if old_step not in keep:
                storage.delete_tree(storage.join(self.root, old_tag))
        log.info("checkpoint %s committed at %s", tag, storage.join(self.root, tag))

    def wait(self) -> None:
        """Block until the running upload (if any) is committed; re-raise its error."""
        if self._upload is not None:
            self._upload.join()
            self._upload = None
        if self._upload_error is not None:
            err, self._upload_error = self._upload_error, None
            raise RuntimeError(f"checkpoint upload to {self.root} failed: {err}") from err


def _deepspeed_safe_globals() -> list[Any]:
    """The only classes (besides tensors, containers and numbers) in DeepSpeed 0.19's checkpoint
    files for ZeRO 0-3, fp32 and bf16, with and without offload; none runs code when built."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [
        # ZeRO 1-3 optimizer states keep their static loss scaler (scale 1 in fp32 and bf16):
        # __init__ stores one number.
        LossScaler,
        # ZeRO 1-3 optimizer states record their stage as this int enum (a member lookup).
        ZeroStageEnum,
        # ZeRO 1-2 and bf16 optimizer states map every parameter to its slice of the flat
        # partition: a dataclass of two ints.
        fragment_address,
    ]


class WeightsOnlyLoads:
    """Stands in for DeepSpeed's checkpoint engine while ``engine.load_checkpoint`` runs: its
    ``TorchCheckpointEngine.load`` unpickles with ``weights_only=False``, which runs whatever
    code a planted file asks for. This one loads tensors, containers, numbers and the classes of
    ``_deepspeed_safe_globals``, and refuses anything else before building it."""

    def __init__(self, where: str) -> None:
        self.where = where  # the checkpoint's folder as the store names it, for the refusal

    def load(self, path: str, map_location: Any = None) -> Any:
        return _weights_only_load(Path(path), self.where, _deepspeed_safe_globals(), map_location)


def _weights_only_load(path: Path, where: str, allowed: list[Any], map_location: Any = None) -> Any:
    """``torch.load(path, weights_only=True)`` admitting ``allowed`` classes besides tensors,
    containers and numbers.

    Raises:
        CheckpointRefused: naming the file and the object it holds that is not allowed.
    """
    import pickle

    import torch

    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        # torch's own message goes on to suggest weights_only=False: not advice to follow here.
        found = re.search(r"WeightsUnpickler error: (.*?)(?: Please use|$)", str(err), re.M)
        reason = found.group(1) if found else str(err).splitlines()[0]
        raise _refusal(
            where, path.name, f"it holds a pickled object that is not weights: {reason}"
        ) from err


def rng_snapshot() -> dict[str, Any]:
    """Every RNG the loop draws from, as tensors and numbers only (``weights_only`` loads it)."""
    import torch

    _, keys, pos, has_gauss, gauss = np.random.get_state()
    version, py_state, py_gauss = random.getstate()
    snapshot: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "python": {
            "version": int(version),
            "state": torch.tensor(py_state, dtype=torch.int64),
            "gauss": py_gauss,
        },
    }
    if torch.cuda.is_available():
        snapshot["cuda"] = torch.cuda.get_rng_state()
    return snapshot


def restore_rng(path: Path, where: str | None = None) -> None:
    """Restore what ``rng_snapshot`` saved to ``path``, never unpickling arbitrary objects.

    Args:
        path: a ``rank<r>_rng.pt`` file.
        where: the checkpoint folder as the store names it, for a refusal (default: the file's).

    Raises:
        CheckpointRefused: the file holds an object that is not tensors and numbers.
    """
    import torch

    saved = _weights_only_load(path, where or str(path.parent), [])
    torch.set_rng_state(saved["torch"])
    if "cuda" in saved and torch.cuda.is_available():
        torch.cuda.set_rng_state(saved["cuda"])
    state = saved["numpy"]
    keys = state["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, state["pos"], state["has_gauss"], state["gauss"]))
    python = saved["python"]
    random.setstate((python["version"], tuple(python["state"].tolist()), python["gauss"]))


def refuse_node_local_root(checkpoint_uri: str, section: str, world: int) -> None:
    """A local checkpoint root on several nodes would hold each node's own files: ranks would
    disagree on what to resume from. All ranks call this before anything is loaded.

    Raises:
        ValueError: the workers span nodes and the checkpoints go to a local folder.
    """
    from pipeline.train.collectives import host_gather

    if storage.is_s3(checkpoint_uri):
        return
    nodes = sorted(set(host_gather(socket.gethostname())))
    if len(nodes) > 1:
        raise ValueError(
            f"{section}: the {world} workers run on {len(nodes)} nodes ({', '.join(nodes)}) and "
            f"checkpoints go to the local folder {checkpoint_uri}: each node would keep its own "
            "part. Set storage.artifact_root to an s3:// URI for multi-node training."
        )
