"""Artifact storage: a local folder or ``s3://bucket/prefix``, with the stage commit protocol.

A stage writes its files under ``<artifact_root>/<run_key>/<stage>/``, then ``result.json``,
then the ``_SUCCESS`` marker last. A reader trusts a stage folder only when ``_SUCCESS`` exists,
so a stage that died half-way is simply redone. Local writes go through a temporary file and
``os.replace``; S3 PUTs are atomic per object.

boto3 is imported lazily so config validation and the Airflow plugin stay light.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

SUCCESS_MARKER = "_SUCCESS"
RESULT_FILE = "result.json"


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def join(base: str, *parts: str) -> str:
    """Join URI or path parts with '/' (S3 keys and POSIX paths alike)."""
    out = base.rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


def _split_s3(uri: str) -> tuple[str, str]:
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    if not bucket:
        raise ValueError(f"S3 URI {uri!r} has no bucket; expected s3://bucket/prefix")
    return bucket, key


_clients = threading.local()


def _s3_client() -> Any:
    """An S3 client for this thread and the current ``AWS_*`` settings.

    AWS_ENDPOINT_URL is honoured by boto3 itself; it points at MinIO or moto in development.
    A session per thread: boto3's default session is not thread-safe, and checkpoints upload
    from a background thread while the training loop goes on. Clients are kept, because making
    one loads the service model again (about 0.1 s, more than a small request), keyed by the
    process and the settings (a fork, or a run pointed at another endpoint, gets a new one).
    """
    import boto3

    key = (
        os.getpid(),
        tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("AWS_"))),
    )
    cache: dict[Any, Any] = getattr(_clients, "by_settings", None) or {}
    _clients.by_settings = cache
    if key not in cache:
        cache.clear()  # settings changed: the old client's endpoint or credentials are stale
        cache[key] = boto3.session.Session().client("s3")
    return cache[key]


def write_bytes(uri: str, data: bytes) -> None:
    """Write one object atomically."""
    if is_s3(uri):
        bucket, key = _split_s3(uri)
        _s3_client().put_object(Bucket=bucket, Key=key, Body=data)
        return
    path = Path(uri)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        # mkstemp creates 0600 files; artifacts are read by other users (Airflow vs Ray workers).
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_bytes(uri: str) -> bytes:
    """Read one object; raises FileNotFoundError naming the URI when it is absent."""
    if is_s3(uri):
        from botocore.exceptions import ClientError

        bucket, key = _split_s3(uri)
        try:
            body: bytes = _s3_client().get_object(Bucket=bucket, Key=key)["Body"].read()
        except ClientError as err:
            if err.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                raise FileNotFoundError(uri) from err
            raise
        return body
    return Path(uri).read_bytes()


def exists(uri: str) -> bool:
    if is_s3(uri):
        from botocore.exceptions import ClientError

        bucket, key = _split_s3(uri)
        try:
            _s3_client().head_object(Bucket=bucket, Key=key)
        except ClientError as err:
            if err.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return False
            raise
        return True
    return Path(uri).exists()


def write_json(uri: str, obj: Any) -> None:
    write_bytes(uri, json.dumps(obj, indent=2, sort_keys=True).encode())


def read_json(uri: str) -> Any:
    return json.loads(read_bytes(uri))


def upload_dir(local_dir: str | Path, uri: str) -> None:
    """Copy a local folder's files to ``uri`` (a no-op when they are the same place)."""
    local_dir = Path(local_dir)
    if not local_dir.is_dir():
        raise FileNotFoundError(f"local folder to upload not found: {local_dir}")
    if not is_s3(uri):
        if Path(uri).resolve() != local_dir.resolve():
            shutil.copytree(local_dir, uri, dirs_exist_ok=True)
        return
    bucket, prefix = _split_s3(uri)
    client = _s3_client()
    for path in sorted(p for p in local_dir.rglob("*") if p.is_file()):
        client.upload_file(str(path), bucket, join(prefix, path.relative_to(local_dir).as_posix()))


def inside_parts(rel: str, source: str) -> list[str]:
    """The path segments of ``rel``, a key below a downloaded prefix, refusing any that would
    leave the target folder (``..``, an absolute path from ``//``, ``.``, a backslash).

    Object keys are untrusted: whoever can write the bucket could otherwise plant
    ``models/m1/../../../../etc/cron.d/x`` and have every node that downloads the model write it.

    Raises:
        ValueError: naming ``source`` (the object) and the segment.
    """
    parts = rel.split("/")
    for part in parts:
        if part in ("", ".", "..") or "\\" in part or "\0" in part:
            raise ValueError(
                f"{source}: object key segment {part!r} would write outside the download "
                "folder; refusing the download (rename or delete that object)"
            )
    return parts


def download_dir(uri: str, local_dir: str | Path) -> Path:
    """Make the files under ``uri`` available locally; local URIs are used in place."""
    if not is_s3(uri):
        if not Path(uri).is_dir():
            raise FileNotFoundError(f"artifact folder not found: {uri}")
        return Path(uri)
    local_dir = Path(local_dir)
    bucket, prefix = _split_s3(uri)
    client = _s3_client()
    paginator = client.get_paginator("list_objects_v2")
    found = False
    for page in paginator.paginate(Bucket=bucket, Prefix=prefix.rstrip("/") + "/"):
        for obj in page.get("Contents", []):
            found = True
            if obj["Key"].endswith("/"):
                continue  # a "folder" marker made by S3 consoles, not a file
            rel = obj["Key"][len(prefix.rstrip("/")) + 1 :]
            target = local_dir.joinpath(*inside_parts(rel, f"s3://{bucket}/{obj['Key']}"))
            target.parent.mkdir(parents=True, exist_ok=True)
            client.download_file(bucket, obj["Key"], str(target))
    if not found:
        raise FileNotFoundError(f"artifact folder not found or empty: {uri}")
    return local_dir


def stage_uri(artifact_root: str, run_key: str, stage: str) -> str:
    return join(artifact_root, run_key, stage)


def committed_result(stage_dir: str) -> dict[str, Any] | None:
    """The stored ``result.json`` of a stage folder, or None if the stage never committed."""
    if not exists(join(stage_dir, SUCCESS_MARKER)):
        return None
    result: dict[str, Any] = read_json(join(stage_dir, RESULT_FILE))
    return result


def commit(stage_dir: str, result: dict[str, Any]) -> None:
    """Write ``result.json`` and then the ``_SUCCESS`` marker, in that order."""
    write_json(join(stage_dir, RESULT_FILE), result)
    write_bytes(join(stage_dir, SUCCESS_MARKER), b"")


@contextmanager
def local_staging(uri: str) -> Iterator[Path]:
    """A local folder to write into; uploaded to ``uri`` on success when ``uri`` is remote."""
    if not is_s3(uri):
        path = Path(uri)
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    tmp = Path(tempfile.mkdtemp(prefix="stage-"))
    try:
        yield tmp
        upload_dir(tmp, uri)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def list_children(uri: str) -> list[str]:
    """Names of the files and folders directly under ``uri`` (empty when it does not exist)."""
    if not is_s3(uri):
        path = Path(uri)
        return sorted(p.name for p in path.iterdir()) if path.is_dir() else []
    bucket, prefix = _split_s3(uri)
    prefix = prefix.rstrip("/") + "/"
    names: set[str] = set()
    paginator = _s3_client().get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=bucket, Prefix=prefix, Delimiter="/"):
        names.update(p["Prefix"][len(prefix) :].rstrip("/") for p in page.get("CommonPrefixes", []))
        names.update(o["Key"][len(prefix) :] for o in page.get("Contents", []))
    return sorted(n for n in names if n)


def delete_tree(uri: str) -> None:
    """Delete a folder (or S3 prefix) and everything under it; a missing one is fine."""
    if not is_s3(uri):
        shutil.rmtree(uri, ignore_errors=True)
        return
    bucket, prefix = _split_s3(uri)
    client = _s3_client()
    paginator = client.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=bucket, Prefix=prefix.rstrip("/") + "/"):
        keys = [{"Key": obj["Key"]} for obj in page.get("Contents", [])]
        if keys:
            client.delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True})


def upload_file(local_path: str | Path, uri: str) -> None:
    """Copy one local file to ``uri`` (S3 multipart for large files; a local copy otherwise)."""
    if not is_s3(uri):
        Path(uri).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(local_path, uri)
        return
    bucket, key = _split_s3(uri)
    _s3_client().upload_file(str(local_path), bucket, key)


def download_file(uri: str, local_path: str | Path) -> None:
    """Copy one object to a local file."""
    Path(local_path).parent.mkdir(parents=True, exist_ok=True)
    if not is_s3(uri):
        shutil.copyfile(uri, local_path)
        return
    bucket, key = _split_s3(uri)
    _s3_client().download_file(bucket, key, str(local_path))


def remove(uri: str) -> None:
    """Delete one file or object; a missing one is fine."""
    if is_s3(uri):
        bucket, key = _split_s3(uri)
        _s3_client().delete_object(Bucket=bucket, Key=key)
        return
    Path(uri).unlink(missing_ok=True)


def content_fingerprint(uri: str) -> str:
    """Short hash of what is under an ``s3://`` prefix (keys, sizes, ETags: one listing), so a
    node-local cache notices when a folder was rewritten in place. Local paths hash their files'
    names, sizes and modification times."""
    import hashlib

    entries: list[str] = []
    if is_s3(uri):
        bucket, prefix = _split_s3(uri)
        paginator = _s3_client().get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=bucket, Prefix=prefix.rstrip("/") + "/"):
            entries += [
                f"{o['Key']}|{o['Size']}|{o.get('ETag', '')}" for o in page.get("Contents", [])
            ]
    else:
        for path in sorted(p for p in Path(uri).rglob("*") if p.is_file()):
            stat = path.stat()
            entries.append(f"{path}|{stat.st_size}|{stat.st_mtime_ns}")
    return hashlib.sha256("\n".join(sorted(entries)).encode()).hexdigest()[:16]
