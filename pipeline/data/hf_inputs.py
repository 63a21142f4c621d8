"""Hugging Face ``datasets`` inputs: folders written by ``save_to_disk``, Hub-layout dataset
folders, and any source ``datasets`` can stream (``hf:`` entries).

- A ``save_to_disk`` folder (``state.json`` + ``dataset_info.json``) is read from its Arrow
  files, memory-mapped, in row ranges of about ``chunk_bytes``; a ``DatasetDict`` folder
  (``dataset_dict.json``) gives its ``train`` split.
- A Hub-layout folder (a ``README.md`` dataset card with YAML front matter, or a
  ``dataset_info.json`` without ``state.json``, as ``huggingface-cli download`` leaves it) gives
  the data files of its ``train`` split, found the way the Hub finds them
  (``datasets.data_files``); the card itself is never read as a document.
- ``hf:<path or Hub id>[#<split>]`` streams ``datasets.load_dataset(..., streaming=True)``, one
  work unit per shard of the streamed dataset (its files).

Every file name comes from the folder's own metadata, which is untrusted: a name that leaves
the folder is refused.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.data.errors import DataError

STREAM_PREFIX = "hf:"
SAVED_STATE = "state.json"
SAVED_INFO = "dataset_info.json"
SAVED_DICT = "dataset_dict.json"
CARD = "README.md"
SPLIT = "train"


def is_stream(entry: str) -> bool:
    return entry.startswith(STREAM_PREFIX)


def _inside(folder: Path, name: str, field: str) -> str:
    path = (folder / name).resolve()
    if not path.is_relative_to(folder.resolve()):
        raise DataError(f"{field}: {folder} names a data file outside its folder: {name!r}")
    if not path.is_file():
        raise DataError(f"{field}: {folder} names a data file that does not exist: {name!r}")
    return str(path)


def _is_hub_folder(folder: Path) -> bool:
    card = folder / CARD
    if card.is_file():
        with open(card, encoding="utf-8", errors="replace") as handle:
            if handle.readline().strip() == "---":
                return True
    return (folder / SAVED_INFO).is_file() or (folder / "dataset_infos.json").is_file()


def folder_files(folder: Path, field: str) -> list[str] | None:
    """The data files of a ``datasets`` folder (see the module docstring); None for a plain
    folder of input files.

    Raises:
        DataError: the folder's metadata is unreadable, names files outside it, or has no
            ``train`` split; the message names ``field`` and the folder.
    """
    if (folder / SAVED_DICT).is_file():
        splits = _json(folder / SAVED_DICT, field).get("splits", [])
        if SPLIT not in splits:
            raise DataError(
                f"{field}: {folder} is a DatasetDict with splits {splits} and no {SPLIT!r}; "
                f"name the split's folder instead, e.g. {folder / str(splits[0] if splits else '')}"
            )
        return folder_files(Path(_inside(folder, f"{SPLIT}/{SAVED_STATE}", field)).parent, field)
    if (folder / SAVED_STATE).is_file():
        state = _json(folder / SAVED_STATE, field)
        files = state.get("_data_files")
        if not isinstance(files, list) or not all(
            isinstance(f, dict) and isinstance(f.get("filename"), str) for f in files
        ):
            raise DataError(f"{field}: {folder / SAVED_STATE} lists no _data_files filenames")
        return [_inside(folder, f["filename"], field) for f in files]
    if _is_hub_folder(folder):
        return _hub_files(folder, field)
    return None


def _json(path: Path, field: str) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise DataError(f"{field}: {path} is not readable JSON ({err})") from err
    if not isinstance(value, dict):
        raise DataError(f"{field}: {path} must hold a JSON object")
    return value


def _hub_files(folder: Path, field: str) -> list[str]:
    from datasets.data_files import DataFilesDict, get_data_patterns
    from datasets.exceptions import DataFilesNotFoundError

    try:
        patterns = get_data_patterns(str(folder))
    except (DataFilesNotFoundError, FileNotFoundError) as err:
        raise DataError(
            f"{field}: {folder} is a dataset folder with no data files ({err})"
        ) from err
    if SPLIT not in patterns:
        raise DataError(
            f"{field}: {folder} has splits {sorted(patterns)} and no {SPLIT!r}; name the "
            "split's files instead (a path or glob)"
        )
    files = DataFilesDict.from_patterns({SPLIT: patterns[SPLIT]}, base_path=str(folder))[SPLIT]
    return [_inside(folder, str(Path(f).relative_to(folder.resolve())), field) for f in files]


def _parse_stream(entry: str) -> tuple[str, str]:
    spec = entry.removeprefix(STREAM_PREFIX)
    path, _, split = spec.partition("#")
    return path, split or SPLIT


def _streamed(entry: str) -> Any:
    import datasets

    path, split = _parse_stream(entry)
    return datasets.load_dataset(path, split=split, streaming=True)


def stream_shards(entry: str, field: str) -> int:
    """Shards of a streamed ``hf:`` source (each one work unit).

    Raises:
        DataError: ``datasets`` cannot open it; the message names ``field``.
    """
    try:
        return int(_streamed(entry).num_shards)
    except Exception as err:
        raise DataError(f"{field}: datasets cannot stream {entry!r}: {err}") from err


def stream_rows(entry: str, shard: int, shards: int) -> Iterator[Any]:
    """Rows of one shard of a streamed source."""
    yield from _streamed(entry).shard(num_shards=shards, index=shard)


def arrow_rows(path: str) -> int:
    """Rows of a ``save_to_disk`` Arrow file (memory-mapped: only batch headers are read)."""
    import pyarrow as pa

    with pa.memory_map(path) as source:
        return sum(batch.num_rows for batch in pa.ipc.open_stream(source))


def read_arrow(path: str, start: int, end: int) -> Iterator[dict[str, Any]]:
    """Rows ``[start, end)`` of a ``save_to_disk`` Arrow file, a record batch at a time."""
    import pyarrow as pa

    with pa.memory_map(path) as source:
        offset = 0
        for batch in pa.ipc.open_stream(source):
            lo, hi = max(start - offset, 0), min(end - offset, batch.num_rows)
            offset += batch.num_rows
            if lo < hi:
                yield from batch.slice(lo, hi - lo).to_pylist()
            if offset >= end:
                return
