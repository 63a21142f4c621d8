"""Where models and tokenizers are, and fetching them: local folders, ``s3://`` folders and
registered versions (``models:/<name>@<alias>``, ``models:/<name>/<version>``).

Remote models are fetched once per node into a node-local cache that every rank then reads;
a tokenizer is fetched alone (its files, never the weights next to them).
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline import storage

if TYPE_CHECKING:
    from pipeline.config import TrackingConfig

log = logging.getLogger(__name__)

MODEL_CACHE_ENV = "PIPELINE_MODEL_CACHE"
"""Node-local folder for fetched models; the system temp dir when unset (on KubeRay, point it
at the pod's largest local volume)."""
COMPLETE_MARKER = ".fetch-complete"
REGISTRY_PREFIX = "models:/"


def resolve_model_uri(uri: str, tracking: TrackingConfig) -> str:
    """Where a model's files are: ``models:/<name>@<alias>`` and ``models:/<name>/<version>``
    become the registered version's storage URI (an alias is resolved now, so a run keeps the
    version it started from); other URIs are returned as they are (``file://`` as a path).

    Raises:
        ValueError: a ``models:/`` URI names neither an alias nor a version.
    """
    if not uri.startswith(REGISTRY_PREFIX):
        return uri.removeprefix("file://")
    from pipeline import tracking as mlflow_tracking

    ref = uri.removeprefix(REGISTRY_PREFIX).strip("/")
    mlc = mlflow_tracking.client(tracking)
    if "@" in ref:
        name, alias = ref.split("@", 1)
        version = str(mlc.get_model_version_by_alias(name, alias).version)
    elif "/" in ref:
        name, version = ref.split("/", 1)
    else:
        raise ValueError(
            f"model URI {uri!r}: expected models:/<name>@<alias> or models:/<name>/<version>"
        )
    source = str(mlc.get_model_version_download_uri(name, version))
    log.info("%s is version %s of %s at %s", uri, version, name, source)
    return source.removeprefix("file://")


ADAPTER_CONFIG = Path("adapter") / "adapter_config.json"
"""Where a training stage's model output holds its peft adapter (``pipeline.train.lora``)."""


def fetch_model(uri: str, tracking: TrackingConfig) -> Path:
    """A local folder with the model files of ``uri``: its full weights, config and tokenizer.

    A training stage's output that holds an adapter alone (``adapter.merge: false``) is merged
    onto its base once per node (``merged_adapter``), so every caller gets full weights.

    Raises:
        FileNotFoundError: the local folder or remote prefix does not exist.
    """
    folder = fetch_files(uri, tracking)
    if (folder / ADAPTER_CONFIG).is_file() and not (folder / "config.json").is_file():
        return merged_adapter(folder, tracking)
    return folder


def _cache_dir() -> Path:
    cache = Path(os.environ.get(MODEL_CACHE_ENV) or Path(tempfile.gettempdir()) / "pipeline-models")
    cache.mkdir(parents=True, exist_ok=True)
    return cache


def merged_adapter(folder: Path, tracking: TrackingConfig) -> Path:
    """The full model an adapter-only stage output stands for, built once per node in the
    model cache: its base (the URI the adapter names, fetched the same way, so a chain of
    adapter-only stages resolves) grown to the output's tokenizer as training grew it, with the
    adapter folded in, saved with the output's tokenizer and the base's generation settings.

    Ranks may call this at once: a file lock lets one build while the others wait. Call it
    outside ZeRO-3's partitioned loading (the merge loads the base whole, on the CPU).
    """
    import json

    adapter_dir = folder / ADAPTER_CONFIG.parent
    base_uri = str(json.loads((folder / ADAPTER_CONFIG).read_text())["base_model_name_or_path"])
    base_dir = fetch_model(base_uri, tracking)
    weights = hashlib.sha256()
    for path in sorted(adapter_dir.iterdir()):
        weights.update(path.name.encode() + b"\0" + path.read_bytes())
    key = hashlib.sha256(f"merged|{base_dir}|{weights.hexdigest()}".encode()).hexdigest()[:24]

    def merge(partial: Path) -> Path:
        log.info("merging the adapter of %s onto its base %s", folder, base_uri)
        merged = adapter_on_base(base_dir, folder, adapter_dir).merge_and_unload()
        merged.save_pretrained(str(partial))
        for name in (*TOKENIZER_FILES, "generation_config.json"):
            source = (folder if name != "generation_config.json" else base_dir) / name
            if source.is_file():
                shutil.copyfile(source, partial / name)
        return partial

    return _built_once(key, merge, f"{folder} on {base_uri}")


def _built_once(key: str, build: Callable[[Path], Path], note: str) -> Path:
    """``<model cache>/<key>``, made by ``build`` unless a complete copy is there already.

    ``build`` fills a fresh ``<key>.partial`` folder it is given and returns the folder to keep
    (that one or a folder inside it). Every rank may call this at once: a file lock lets one
    build while the others wait, and a marker written last makes a half-finished build (a
    killed rank) count as absent.
    """
    cache = _cache_dir()
    target = cache / key
    with (cache / f"{key}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / COMPLETE_MARKER).is_file():
            return target
        partial = cache / f"{key}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        shutil.rmtree(target, ignore_errors=True)
        build(partial).rename(target)
        shutil.rmtree(partial, ignore_errors=True)
        (target / COMPLETE_MARKER).write_text(note)
    return target


def adapter_on_base(base_dir: Path, tokenizer_dir: Path, adapter_dir: Path) -> Any:
    """The model of ``base_dir`` in its own dtype, grown to the tokenizer of ``tokenizer_dir``
    as training grew it, with the peft adapter of ``adapter_dir`` applied, unmerged
    (``PeftModel``, on CPU, in eval mode)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype="auto")
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    if len(tok) > int(base.config.get_text_config().vocab_size):
        # The grown rows are all trained token rows (training refuses otherwise), which the
        # adapter replaces: their starting values here do not matter.
        base.resize_token_embeddings(len(tok))
    return PeftModel.from_pretrained(base, str(adapter_dir)).eval()


def fetch_files(uri: str, tracking: TrackingConfig) -> Path:
    """A local folder with the files of ``uri``, as they are stored.

    Local folders are used in place. ``s3://`` folders and registered versions are downloaded
    once per node into ``$PIPELINE_MODEL_CACHE`` (keyed by the resolved URI and, for ``s3://``,
    the folder's listing, so a folder rewritten in place is fetched again): every
    rank may call this at once; a file lock lets one download while the others wait, and a
    marker written last makes a half-finished download (a killed rank) count as absent.

    Raises:
        FileNotFoundError: the local folder or remote prefix does not exist.
    """
    source = resolve_model_uri(uri, tracking)
    # A registered version lives wherever MLflow's artifact store puts it (a local path,
    # mlflow-artifacts:/, s3://): it is always fetched through MLflow, which also lays out the
    # transformers flavour's weights and tokenizer as one from_pretrained folder.
    from_registry = uri.startswith(REGISTRY_PREFIX)
    if not from_registry and "://" not in source:
        if not Path(source).is_dir():
            raise FileNotFoundError(f"model folder not found: {source} (model URI {uri})")
        return Path(source)
    # The content fingerprint keys the cache too: an s3:// folder rewritten in place (a rerun
    # that rebuilt base_model/) must not be served from last time's copy.
    version = (
        storage.content_fingerprint(source) if storage.is_s3(source) and not from_registry else ""
    )
    key = hashlib.sha256(f"{source}|{version}".encode()).hexdigest()[:24]

    def download(partial: Path) -> Path:
        log.info("fetching %s into the model cache (%s)", source, key)
        if from_registry:
            from pipeline import tracking as mlflow_tracking

            return Path(mlflow_tracking.download_model_version(tracking, source, str(partial)))
        return storage.download_dir(source, partial)

    return _built_once(key, download, source)


# Every file a Hugging Face tokenizer may be saved as; the weights next to them are not read.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
)


def fetch_tokenizer_files(uri: str, tracking: TrackingConfig, dest: Path) -> Path:
    """A local folder with the tokenizer files of ``uri`` (a local, ``s3://`` or ``models:/``
    model or tokenizer folder); local folders are used in place.

    Raises:
        FileNotFoundError: no tokenizer file is there.
    """
    source = resolve_model_uri(uri, tracking)
    if "://" not in source:
        if not any((Path(source) / name).is_file() for name in TOKENIZER_FILES):
            raise FileNotFoundError(f"no tokenizer files in {source} (from {uri})")
        return Path(source)
    dest.mkdir(parents=True, exist_ok=True)
    if storage.is_s3(source):
        for name in TOKENIZER_FILES:
            try:
                (dest / name).write_bytes(storage.read_bytes(storage.join(source, name)))
            except FileNotFoundError:
                continue
    else:
        import mlflow.artifacts

        listed = mlflow.artifacts.list_artifacts(
            artifact_uri=source, tracking_uri=tracking.tracking_uri
        )
        for info in listed:
            name = info.path.rsplit("/", 1)[-1]
            if name in TOKENIZER_FILES:
                mlflow.artifacts.download_artifacts(
                    artifact_uri=storage.join(source, name),
                    dst_path=str(dest),
                    tracking_uri=tracking.tracking_uri,
                )
    if not any(dest.iterdir()):
        raise FileNotFoundError(f"no tokenizer files under {source} (from {uri})")
    return dest
