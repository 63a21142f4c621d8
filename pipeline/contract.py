"""The names stages share, and the readers of what one stage writes for another.

Stages never import each other: what a stage leaves for a later one (a file in its output
folder, a split of the shards, a metric name) is named here, once, and read through here.
It imports only ``pipeline.storage``, so the Airflow side may use it too.
"""

from __future__ import annotations

from typing import Any

from pipeline import storage

STAGES = ("prepare_data", "continued_pretraining", "instruction_finetuning", "evaluate", "promote")
"""The Ray job stages of one run, in order; each is ``python -m pipeline.stages.<stage>``."""

# --- what each stage hands on: keys of ``outputs`` in its ``result.json`` -----------------------
# A stage's outputs are merged over the earlier stages' (``StageContext.previous``), so a later
# stage reads any of them.
DATA = "data"
"""prepare_data: the folder of the shards, the manifest and the held-out set."""
TOKENIZER = "tokenizer"
"""prepare_data: the training tokenizer's folder (chat tokens added, template attached)."""
BASE_MODEL = "base_model"
"""continued_pretraining: the model CPT started from (the base, or one built from config)."""
CPT_MODEL = "cpt_model"
"""continued_pretraining: the exported CPT model."""
SFT_MODEL = "sft_model"
"""instruction_finetuning: the exported SFT model, the candidate."""
EVAL_REPORT = "eval_report"
"""evaluate: the ``EVAL_REPORT_FILE`` with every score and gate."""
EVAL_REPORT_HTML = "eval_report_html"
"""evaluate: the report page with its plots."""
REGISTERED_MODEL = "registered_model"
"""promote: the registered model's name."""
MODEL_VERSION = "model_version"
"""promote: the version the candidate was registered as."""

# Every stage folder ends with ``pipeline.storage``'s commit: ``result.json``, then ``_SUCCESS``.
CONFIG_FILE = "config.yaml"
"""The run's resolved config, in the run's folder; every stage reads it."""

# --- prepare_data: ``<run>/prepare_data/data/`` -----------------------------------------------
MANIFEST_FILE = "manifest.json"
"""Every count, source fingerprints, and the shards with their sha256 (``data.shards``)."""
SPLITS = ("cpt_train", "cpt_heldout", "sft_train", "sft_heldout")
"""The shard splits, by training section and held-out part."""
HELDOUT_FILE = "heldout.json"
"""Held-out texts and chats: ``documents``, ``general_documents``, ``chats`` (evaluate reads)."""
QUARANTINE_FILE = "quarantine.jsonl"
"""One line per bad record: source, line, reason, detail."""
DATA_REPORT_FILE = "data_report.md"

# --- evaluate: its stage folder ----------------------------------------------------------------
EVAL_REPORT_FILE = "eval_report.json"
"""Scores of every model, the gates and the verdict (promote reads)."""
BPB_CORPORA = ("domain", "general", "answer_loss")
"""The corpora scored in bits per byte."""
INSTRUCTION_METRICS = ("exact_match", "rouge_l", "json_valid", "json_keys", "keywords")
"""Per-example instruction metrics in ``scores[model]["instructions"]["examples"]``."""
JUDGE_METRIC = "judge_win_rate"
"""The judge's pairwise win rate of the candidate against the champion (candidate only)."""


def read_heldout(data_uri: str) -> dict[str, Any]:
    """The held-out set prepare_data wrote under ``data_uri`` (its ``data`` output)."""
    heldout: dict[str, Any] = storage.read_json(storage.join(data_uri, HELDOUT_FILE))
    return heldout


def model_metrics(model: str, scores: dict[str, Any]) -> dict[str, float]:
    """One model's headline scores as flat metric names (``candidate.domain.bits_per_byte``):
    what evaluate logs for every model and promote puts on the DAG run's parent run."""
    metrics: dict[str, float] = {}
    for corpus in BPB_CORPORA:
        value = scores.get(corpus, {}).get("bits_per_byte")
        if value is not None:
            metrics[f"{model}.{corpus}.bits_per_byte"] = float(value)
    for name, value in scores.get("instructions", {}).get("means", {}).items():
        if value is not None:
            metrics[f"{model}.instructions.{name}"] = float(value)
    win_rate = scores.get("judge", {}).get("win_rate")
    if win_rate is not None:
        metrics[f"{model}.judge.win_rate"] = float(win_rate)
    return metrics
