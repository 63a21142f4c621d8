"""Fresh domain data: where it lands (the Airflow Asset's location) and what changed there.

The watch DAG lists the location, compares the listing with the one it saw last (a small
JSON file under the artifact root) and emits the Asset only when files were added or changed.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline import storage
from pipeline.config import PipelineConfig

_GLOB_CHARS = "*?["


def data_asset_uri(config: PipelineConfig) -> str:
    """``orchestration.data_asset_uri``, else the folder of ``data.domain_corpus``, as a
    ``file://`` or ``s3://`` URI (globs cut at their first wildcard).

    Both DAGs build their Asset from this URI alone (its name is the URI): Airflow deactivates
    an Asset whose name is reused with another URI, which a fixed name would do whenever the
    watched location changes.
    """
    location = config.orchestration.data_asset_uri
    if not location:
        corpus = config.data.domain_corpus
        first = corpus if isinstance(corpus, str) else corpus[0]
        cut = min((first.find(c) for c in _GLOB_CHARS if c in first), default=-1)
        location = first if cut < 0 else first[:cut]
        if storage.is_s3(location):
            # A glob or a file name (it has an extension) watches its folder; a prefix itself.
            if cut >= 0 or Path(location).suffix:
                location = location.rsplit("/", 1)[0]
        elif not Path(location).is_dir():
            location = str(Path(location).parent)
    if "://" in location:
        return location.rstrip("/")
    return Path(location).resolve().as_uri()


def location_of(asset_uri: str) -> str:
    """Where to list: the S3 prefix itself, or the local path of a ``file://`` URI."""
    return asset_uri.removeprefix("file://") if asset_uri.startswith("file://") else asset_uri


def list_files(location: str) -> dict[str, str]:
    """``{file URI: identity}`` of every file under a folder or ``s3://`` prefix (identity: size
    and ETag, or size and modification time); empty when the location does not exist."""
    if not storage.is_s3(location):
        root = Path(location)
        if not root.is_dir():
            return {}
        files = (p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))
        return {str(p): f"{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in sorted(files)}
    bucket, _, prefix = location.removeprefix("s3://").partition("/")
    prefix = prefix.rstrip("/") + "/" if prefix else ""
    paginator = storage._s3_client().get_paginator("list_objects_v2")
    return {
        f"s3://{bucket}/{obj['Key']}": f"{obj['Size']}:{obj.get('ETag', '').strip(chr(34))}"
        for page in paginator.paginate(Bucket=bucket, Prefix=prefix)
        for obj in page.get("Contents", [])
        if not obj["Key"].endswith("/")
    }


@dataclass(frozen=True)
class DataChange:
    """What differs between two listings."""

    added: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    files: int = 0
    digest: str = ""
    """Hash of the whole new listing."""

    @property
    def fresh(self) -> bool:
        """New or rewritten files (a removal alone does not call for retraining)."""
        return bool(self.added or self.changed)

    def summary(self, limit: int = 20) -> dict[str, Any]:
        """Small dict for the Asset event's ``extra``: counts and the first names."""
        return {
            "files": self.files,
            "listing_digest": self.digest,
            "added": self.added[:limit],
            "changed": self.changed[:limit],
            "added_count": len(self.added),
            "changed_count": len(self.changed),
            "removed_count": len(self.removed),
        }


def compare(before: dict[str, str], after: dict[str, str]) -> DataChange:
    """The difference between the listing seen last and the current one."""
    blob = json.dumps(after, sort_keys=True).encode()
    return DataChange(
        added=sorted(set(after) - set(before)),
        changed=sorted(k for k in after if k in before and before[k] != after[k]),
        removed=sorted(set(before) - set(after)),
        files=len(after),
        digest=hashlib.sha256(blob).hexdigest()[:16],
    )


def state_uri(artifact_root: str, asset_uri: str) -> str:
    """Where the last seen listing of ``asset_uri`` is kept."""
    name = hashlib.sha256(asset_uri.encode()).hexdigest()[:12]
    return storage.join(artifact_root, "_data_watch", f"{name}.json")


def pending_uri(artifact_root: str, asset_uri: str, digest: str) -> str:
    """Where a listing waits until the Asset event announcing it is committed."""
    return state_uri(artifact_root, asset_uri).removesuffix(".json") + f".pending-{digest}.json"


def check_for_new_data(artifact_root: str, asset_uri: str) -> tuple[DataChange, bool]:
    """List the data location and compare with the last listing.

    The first listing (the baseline) and a listing that only lost files are stored at once:
    no event announces them. A listing with new or changed files is stored as pending only;
    ``commit_listing`` makes it the last seen one once the Asset event is committed, so a
    crash in between announces the same files again on the next check (a retraining run too
    many, never one too few).

    Returns:
        ``(change, first)``: ``first`` is True when there was no stored listing yet; that run
        only records the baseline, so deploying the watch does not retrain on old data.
    """
    state = state_uri(artifact_root, asset_uri)
    first = not storage.exists(state)
    before: dict[str, str] = {} if first else storage.read_json(state)["files"]
    after = list_files(location_of(asset_uri))
    change = compare(before, after)
    listing = {"asset_uri": asset_uri, "files": after}
    if first or (change.removed and not change.fresh):
        storage.write_json(state, listing)
    elif change.fresh:
        storage.write_json(pending_uri(artifact_root, asset_uri, change.digest), listing)
    return change, first


def commit_listing(artifact_root: str, asset_uri: str, digest: str) -> None:
    """Make the pending listing ``digest`` the last seen one (after its event was committed).

    Raises:
        FileNotFoundError: no pending listing ``digest`` (names the file).
    """
    pending = pending_uri(artifact_root, asset_uri, digest)
    if not storage.exists(pending):
        raise FileNotFoundError(f"no pending data listing {pending} to commit")
    storage.write_json(state_uri(artifact_root, asset_uri), storage.read_json(pending))
    storage.remove(pending)
