"""The cleaned, deduplicated records as Parquet, for a person to read (``datasets`` opens them).

One file per unit, written by the unit's own Ray Data task from its spill: documents as
``text``, chats as ``messages`` (role and content per turn), each with its ``split`` (``train``
or ``heldout``) and ``source`` file. The text is what the tokenizer saw: cleaned and, with
``data.scrub_pii``, scrubbed. Decontamination happens later, while packing, so a record it
drops is still here (the manifest counts those).
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import storage
from pipeline.data import chunks
from pipeline.data.select import HELDOUT, TRAIN, Selection

FOLDER = "records"


def file_name(corpus: str, index: int) -> str:
    return f"{FOLDER}/{corpus}-{index:06d}.parquet"


def write_unit(
    scratch: str, corpus: str, index: int, source: str, selection: Selection, data_uri: str
) -> dict[str, Any]:
    """Write one unit's kept records to ``data_uri``; returns the manifest entry (file, rows,
    sha256)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    parts = ("split.npy", "records.jsonl")
    with chunks.local_spill(scratch, index, parts) as folder:
        status = selection.status(index, np.load(chunks.spill_path(folder, index, "split.npy")))
        with open(chunks.spill_path(folder, index, "records.jsonl"), encoding="utf-8") as lines:
            values = [json.loads(line) for line, s in zip(lines, status, strict=True) if s != 0]
    split = ["heldout" if s == HELDOUT else "train" for s in status if s in (TRAIN, HELDOUT)]
    name = file_name(corpus, index)
    if not values:
        return {"file": name, "rows": 0, "sha256": ""}  # no file: nothing of this unit was kept
    turn = pa.struct([("role", pa.string()), ("content", pa.string())])
    column = ("messages", pa.list_(turn)) if corpus == "instructions" else ("text", pa.string())
    schema = pa.schema([column, ("split", pa.string()), ("source", pa.string())])
    table = pa.Table.from_pydict(
        {column[0]: values, "split": split, "source": [source] * len(values)}, schema=schema
    )
    with tempfile.TemporaryDirectory(prefix="records-") as local:
        path = Path(local) / "part.parquet"
        # No statistics or creation time that vary run to run: the file's bytes are a function
        # of the records.
        pq.write_table(table, path, compression="zstd", write_statistics=False)
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        storage.upload_file(path, storage.join(data_uri, name))
    return {"file": name, "rows": len(values), "sha256": digest}
