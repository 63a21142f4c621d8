"""The pipeline's typed configuration: one schema for every stage.

Config flows one way: a YAML file (``configs/*.yaml``) plus the trigger form's overrides are
validated here, in Airflow, before any GPU is touched; the resolved config is written next to the
run's artifacts and every Ray job entrypoint loads that same file back through this module.

Every field is documented by the docstring under it (pydantic turns those into the JSON schema
descriptions, which the Airflow Params form shows). Unknown keys and bad values are errors that
name the field and, when loaded from YAML, the file and line.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from pipeline.contract import INSTRUCTION_METRICS, JUDGE_METRIC, STAGES


class ConfigError(ValueError):
    """A config file or override is malformed; the message says which field and how to fix it."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


_DEFAULT_PHONE_REGIONS = ["US", "GB", "DE", "FR", "IN", "JP", "BR", "AU"]


def _unknown_phone_regions(regions: list[str]) -> list[str]:
    """The entries of ``regions`` that phonenumbers does not know."""
    if regions == _DEFAULT_PHONE_REGIONS:
        # Known good (tests/unit/test_clean_pii.py): the Airflow image, which loads configs to
        # plan, need not install phonenumbers for a config that keeps the default.
        return []
    import phonenumbers  # here, not at the top: configs load at DAG parse time

    return [r for r in regions if r not in phonenumbers.SUPPORTED_REGIONS]


PiiType = Literal["secret", "email", "iban", "national_id", "card", "ip", "phone"]
"""The built-in PII types of ``pipeline.data.pii`` (``PII_TYPES``)."""
AttentionKernel = Literal["flash_attention_2", "flex_attention", "sdpa", "eager"]
"""The attention kernels ``compute.attention`` may name (besides ``auto``)."""


class RecordFields(_Section):
    """Field names of the input records (JSONL, JSON and Parquet): ``data.fields.*``."""

    text: str = "text"
    """Field holding a document's text."""

    messages: str = "messages"
    """Field holding a chat's list of turns."""

    role: str = "role"
    """Field of a turn holding its role (``system``, ``user`` or ``assistant``)."""

    content: str = "content"
    """Field of a turn holding its text."""

    prompt: str = "prompt"
    """For prompt/response records (no ``messages`` field): the user's prompt."""

    response: str = "response"
    """For prompt/response records: the assistant's answer."""


_FORMER_FIELD_KEYS = {f"{name}_field": name for name in RecordFields.model_fields}


class DataConfig(_Section):
    domain_corpus: str | list[str]
    """JSONL file (local path or s3:// URI) of domain documents, or a list of files, globs
    (``data/*.jsonl``), folders and ``s3://`` prefixes. JSONL, JSON arrays (``.json``), Parquet
    and plain text (``.txt``: one document per file) are read; records carry the
    ``fields.text`` field. Relative paths resolve against the config file's folder."""

    instructions: str | list[str]
    """Chat examples, as paths, globs or ``s3://`` prefixes like ``domain_corpus``: records with
    ``fields.messages`` (a list of ``{fields.role, fields.content}`` turns, roles system,
    user, assistant) or with ``fields.prompt`` and ``fields.response``."""

    replay_corpus: str | list[str] | None = None
    """Optional general-domain documents mixed into continued pre-training, read like
    ``domain_corpus``; guards against forgetting general skills. A ``heldout_fraction`` of it is
    kept out of training as the general corpus of the forgetting gate (``general_documents``
    in ``heldout.json``)."""

    replay_ratio: float = Field(0.0, ge=0.0, lt=1.0)
    """Share of CPT training tokens taken from ``replay_corpus`` (0.2: one token in five); fewer
    when the replay corpus runs out, and the manifest records the share reached."""

    fields: RecordFields = Field(default_factory=RecordFields)
    """The names of the fields records carry, for inputs whose fields are named differently."""

    max_bad_fraction: float = Field(0.01, ge=0.0, le=1.0)
    """Largest share of bad records (invalid UTF-8 or JSON, missing or wrong fields, unusable
    chats) the stage accepts; each goes to ``quarantine.jsonl`` with file, line and reason.
    Above it the stage fails, listing the first bad lines and the counts per reason."""

    max_doc_chars: int = Field(100_000, ge=100)
    """Longest document kept whole (characters, after cleaning); see ``long_doc_action``."""

    long_doc_action: Literal["split", "drop"] = "split"
    """What happens to a longer document: split at paragraph (else line, else character)
    boundaries into pieces of at most ``max_doc_chars``, or dropped. Both are counted."""

    pii_patterns: dict[str, str] = Field(default_factory=dict)
    """Extra PII patterns scrubbed after the built-in types (``pii_types``):
    ``{TYPE: regex}``; matches become ``<TYPE>`` and are counted per type."""

    pii_types: list[PiiType] = Field(default_factory=lambda: list(get_args(PiiType)))
    """Built-in PII types scrubbed (with ``scrub_pii``), all by default: ``secret`` (API keys,
    tokens, private keys: detect-secrets' patterns and key-like high-entropy values),
    ``email``, ``iban`` (checksum-validated), ``national_id`` (US SSN, Spanish DNI),
    ``card`` (issuer prefix and Luhn), ``ip`` (IPv4/IPv6, not version numbers), ``phone``
    (valid numbers for phonenumbers). A type left out is kept in the text."""

    pii_placeholders: dict[str, str] = Field(default_factory=dict)
    """Replacement text per type, e.g. ``{email: "[email]"}``; keys are ``pii_types`` names,
    values non-empty. A type not listed becomes ``<TYPE>`` (``<EMAIL>``)."""

    phone_regions: list[str] = Field(default_factory=lambda: list(_DEFAULT_PHONE_REGIONS))
    """ISO 3166 regions (phonenumbers' codes) national-format phone numbers are parsed in, in
    order; numbers written with ``+`` and a country code are found whatever the list."""

    @model_validator(mode="before")
    @classmethod
    def _fields_moved(cls, data: Any) -> Any:
        """The record field names were ``data.<name>_field`` before ``data.fields``."""
        former = sorted(set(data) & set(_FORMER_FIELD_KEYS)) if isinstance(data, dict) else []
        if former:
            moved = ", ".join(
                f"data.{key} -> data.fields.{_FORMER_FIELD_KEYS[key]}" for key in former
            )
            raise ValueError(f"record field names moved under data.fields: {moved}")
        return data

    @model_validator(mode="after")
    def _pii_settings_valid(self) -> DataConfig:
        unknown = sorted(set(self.pii_placeholders) - set(self.pii_types))
        if unknown:
            raise ValueError(
                f"pii_placeholders has keys {unknown} that are not in pii_types "
                f"{self.pii_types}; use the type names, e.g. {{email: '[email]'}}"
            )
        empty = sorted(k for k, v in self.pii_placeholders.items() if not v.strip())
        if empty:
            raise ValueError(f"pii_placeholders for {empty} must be non-empty text")
        if not self.phone_regions:
            raise ValueError("phone_regions must list at least one region, e.g. [US]")
        bad = _unknown_phone_regions(self.phone_regions)
        if bad:
            raise ValueError(
                f"phone_regions {bad} are not regions phonenumbers knows; use ISO 3166 "
                "alpha-2 codes in capitals, e.g. US, GB, DE"
            )
        return self

    near_dup_threshold: float | None = Field(0.8, gt=0.0, le=1.0)
    """Estimated Jaccard similarity (MinHash LSH over token 5-grams, candidates verified on
    their signatures) from which two documents count as near duplicates; one per cluster is
    kept, and the held-out split is drawn by cluster. ``None`` keeps near duplicates (exact
    duplicates are always removed)."""

    chat_near_dup_threshold: float | None = Field(0.95, gt=0.0, le=1.0)
    """``near_dup_threshold`` for chats. Stricter by default: instruction sets are often
    templated on purpose (the same request about different items), which is not duplication."""

    decontaminate_ngram: int | None = Field(32, ge=8)
    """Training documents and chats (their answers) sharing a run of this many tokens with the
    evaluation data (``eval_sets``; the held-out split too with ``decontaminate_heldout``) are
    dropped and counted. ``None`` turns it off."""

    eval_sets: list[str] = Field(default_factory=list)
    """Evaluation data (paths, globs, ``s3://`` prefixes; documents or chats, e.g. benchmark
    questions with answers) that training data must not overlap (``decontaminate_ngram``)."""

    decontaminate_heldout: bool = False
    """Also treat the held-out split as evaluation data for decontamination. Off by default:
    the split is already drawn by near-duplicate cluster, and in-domain text shares long
    boilerplate (signatures, disclaimers, templated answers) that would drop most of it."""

    num_workers: int | None = Field(None, ge=1)
    """Ray Data tasks that read, clean and tokenize at once (one CPU each). ``None``: as many
    as the cluster's CPUs allow (a local Ray started outside a cluster gets the process's CPUs:
    its affinity and cgroup quota, a pod's CPUs and not its node's)."""

    worker_resources: dict[str, float] = Field(default_factory=dict)
    """Custom Ray resources each data task asks for besides its CPU, e.g. ``{cpu_pool: 0.01}``
    where only the CPU worker group advertises ``cpu_pool``: data preparation then never takes
    a GPU node's CPUs. Empty: any node with a free CPU."""

    chunk_bytes: int = Field(64 * 2**20, ge=2**16)
    """Input bytes one worker handles at a time; with ``num_workers`` it bounds the memory."""

    max_record_bytes: int = Field(32 * 2**20, ge=2**10)
    """Longest input record read: a longer JSONL line (or a larger text or JSON array file) is
    quarantined as ``record_too_long`` with its file and line, streamed past without being held
    in memory."""

    seq_len: int = Field(256, ge=16, le=131072)
    """Tokens per packed training block (CPT and SFT)."""

    heldout_fraction: float = Field(0.1, gt=0.0, lt=0.5)
    """Share of documents and of chat examples kept out of training for evaluation; the split
    is by content hash, so it is stable when fresh data is appended."""

    min_chars: int = Field(20, ge=0)
    """Documents shorter than this after cleaning are dropped."""

    scrub_pii: bool = True
    """Replace the PII of ``pii_types`` (secrets, e-mail addresses, IBANs, national ids, payment
    cards, IPs, phone numbers), plus ``pii_patterns``, with typed placeholders (``<EMAIL>``,
    ``pii_placeholders``) before tokenizing."""

    chat_format: Literal["chatml", "llama3", "tokenizer"] = "chatml"
    """How chat turns are rendered into tokens. ``chatml``: ``<|im_start|>``/``<|im_end|>``
    turns; when the tokenizer lacks these tokens they are added (and the model's embeddings
    grow to match). ``llama3``: the Llama 3 header tokens, which the tokenizer must have.
    ``tokenizer``: the base tokenizer's own ``chat_template`` (e.g. an instruct model's), nothing
    added; it must render each conversation as a prefix of its continuation. The exported
    tokenizer carries the template training used, so ``apply_chat_template`` matches it."""

    shard_blocks: int = Field(4096, ge=1)
    """Packed blocks per shard file."""

    shard_task_tokens: int = Field(1 << 22, ge=1)
    """Least tokens per shard-writing task: the training splits' shards are written by tasks
    of whole consecutive shards, grouped until a task holds this many tokens. Larger tasks
    read each unit's spill fewer times (from S3, once per task that needs it); smaller ones
    spread a small corpus over more workers. The shards' bytes do not depend on it."""


class ModelConfig(_Section):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    """Short name of the model family; used in run names and the registered model name."""

    base: str | None = None
    """Model to start from: a Hugging Face-format folder (local or ``s3://``) or a registered
    version, ``models:/<name>@champion`` (the model in production, for weekly retraining) or
    ``models:/<name>/<version>``. Fetched once per node, not once per rank. ``None`` builds a
    fresh model from the fields below (tiny models for development and tests)."""

    tokenizer: str | None = None
    """Tokenizer folder (local, ``s3://`` or ``models:/``; only its tokenizer files are read).
    ``None`` uses the base model's tokenizer, or trains a byte-level BPE tokenizer on the
    domain corpus when there is no base model."""

    vocab_size: int = Field(4096, ge=256)
    """Vocabulary size of a tokenizer trained by the pipeline (ignored when one is given)."""

    hidden_size: int = Field(128, ge=8)
    """Width of the residual stream (models built from config only)."""

    intermediate_size: int = Field(344, ge=8)
    """Width of the MLP (models built from config only)."""

    num_layers: int = Field(2, ge=1)
    """Decoder layers (models built from config only)."""

    num_heads: int = Field(4, ge=1)
    """Attention heads (models built from config only)."""

    num_kv_heads: int = Field(2, ge=1)
    """Key/value heads for grouped-query attention (models built from config only)."""

    rope_theta: float = Field(10000.0, gt=0)
    """RoPE base frequency (models built from config only)."""

    config_json: str | None = None
    """Hugging Face ``config.json`` (local or s3://) describing ``base``'s architecture for the
    memory and throughput planner (``pipeline plan``), so presets plan without reaching ``base``.
    ``None``: the planner reads ``base``'s config.json, or the fields of a model built from
    config. Relative paths resolve against the config file's folder."""

    architecture: Literal["llama", "mixtral"] = "llama"
    """Architecture of a model built from config (``base: null``): dense Llama or sparse
    mixture-of-experts Mixtral. A base model's architecture comes from its ``config.json``."""

    num_experts: int = Field(8, ge=2)
    """Experts per MoE layer (``architecture: mixtral`` built from config only)."""

    experts_per_token: int = Field(2, ge=1)
    """Experts each token is routed to (``architecture: mixtral`` built from config only)."""

    @model_validator(mode="after")
    def _heads_divide(self) -> ModelConfig:
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be divisible by num_kv_heads "
                f"({self.num_kv_heads})"
            )
        if self.experts_per_token > self.num_experts:
            raise ValueError(
                f"experts_per_token ({self.experts_per_token}) must not exceed num_experts "
                f"({self.num_experts})"
            )
        return self


TrainingMethod = Literal["full", "lora", "qlora"]
"""How a training section updates the model (``cpt.method``, ``sft.method``)."""
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
"""Every linear projection of a Llama-family decoder layer, as peft names them (not the router
or the LM head): what QLoRA found necessary to match full fine-tuning."""


class AdapterConfig(_Section):
    """The LoRA adapter a section trains when its ``method`` is ``lora`` or ``qlora``."""

    rank: int = Field(16, ge=1, le=1024)
    """LoRA rank ``r``: each targeted ``d_in x d_out`` weight gets ``r (d_in + d_out)``
    trainable parameters beside it."""

    alpha: int = Field(32, ge=1)
    """LoRA ``alpha``: the adapter's output is scaled by ``alpha / r`` (``alpha / sqrt(r)``
    with ``rslora``)."""

    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    """Dropout on each targeted layer's input, on the adapter's path only."""

    target_modules: list[str] = Field(default_factory=lambda: list(LORA_TARGETS))
    """Module names that get an adapter; the default is every linear projection of the decoder.
    A name no module of the model has is refused when training starts."""

    dora: bool = False
    """Weight-decomposed LoRA (DoRA): a trained magnitude per output row besides the low-rank
    direction; slower per step."""

    rslora: bool = False
    """Rank-stabilised scaling ``alpha / sqrt(r)`` instead of ``alpha / r``."""

    double_quant: bool = True
    """QLoRA: quantize the 4-bit blocks' absmax values too (about 0.37 bits per weight saved)."""

    train_chat_tokens: bool = True
    """Also train the embedding and LM-head rows of the chat format's special tokens (added to
    a base tokenizer, or never seen in pre-training): without it they stay as initialised. Every
    other row stays frozen."""

    merge: bool = True
    """Write the merged full model (the base with the adapter folded in: what is evaluated,
    trained on by the next stage, served and registered) beside the adapter. Off: the stage
    writes the adapter and the tokenizer alone, a few MB instead of a model's copy, and each
    later stage merges it onto its base once per node as it fetches it."""

    @field_validator("target_modules")
    @classmethod
    def _targets_named(cls, targets: list[str]) -> list[str]:
        if not targets:
            raise ValueError("name at least one module, e.g. q_proj")
        bad = [t for t in targets if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", t)]
        if bad:
            raise ValueError(f"{bad}: module names are identifiers such as q_proj")
        return targets


class TrainConfig(_Section):
    max_steps: int = Field(ge=1)
    """Optimizer steps."""

    micro_batch_size: int = Field(4, ge=1)
    """Packed blocks per worker per forward pass."""

    grad_accum_steps: int = Field(1, ge=1)
    """Micro-batches accumulated per optimizer step."""

    lr: float = Field(gt=0, le=1.0)
    """Peak learning rate."""

    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    """Cosine decay floor as a fraction of ``lr``."""

    warmup_steps: int = Field(0, ge=0)
    """Linear warm-up steps before the cosine decay."""

    weight_decay: float = Field(0.0, ge=0)
    """AdamW weight decay."""

    grad_clip: float = Field(1.0, gt=0)
    """Global gradient-norm clip."""

    seed: int = Field(0, ge=0)
    """Seed for model init (when built from config) and data order."""

    log_every: int = Field(1, ge=1)
    """Log the step metrics (loss, learning rate applied, grad norm, tokens/s, MFU, memory) to
    MLflow and the job log every this many steps."""

    checkpoint_every: int = Field(50, ge=1)
    """Write a resumable checkpoint (DeepSpeed engine state plus loop state) every this many
    optimizer steps, and always after the last step. A new attempt of the stage resumes from
    the newest complete one."""

    keep_last: int = Field(2, ge=1)
    """Complete checkpoints to keep; older ones are deleted only after a newer one is complete."""

    max_bad_steps: int = Field(3, ge=0)
    """Consecutive steps with a non-finite loss that are skipped (no optimizer update) before
    the stage aborts, naming the step and the last good checkpoint."""

    spike_factor: float | None = Field(None, gt=1.0)
    """Loss-spike guard, off by default: abort when the loss stays above this many times its
    running mean for ``spike_steps`` consecutive steps (the weights of a diverging run are
    never saved past the last good checkpoint)."""

    spike_steps: int = Field(5, ge=1)
    """Consecutive spiking steps that trip the loss-spike guard (see ``spike_factor``)."""

    method: TrainingMethod = "full"
    """``full`` trains every weight; ``lora`` trains a low-rank adapter over frozen weights;
    ``qlora`` does the same over a base quantized to 4-bit NF4 (bitsandbytes)."""

    adapter: AdapterConfig = AdapterConfig()
    """The adapter's settings (read when ``method`` is ``lora`` or ``qlora``)."""

    @model_validator(mode="after")
    def _warmup_fits(self) -> TrainConfig:
        if self.warmup_steps >= self.max_steps:
            raise ValueError(
                f"warmup_steps ({self.warmup_steps}) must be below max_steps ({self.max_steps})"
            )
        return self


class JudgeConfig(_Section):
    endpoint: str
    """Base URL of an OpenAI-compatible API (``.../v1``); ``POST {endpoint}/chat/completions``."""

    model: str
    """Judge model name sent in the request."""

    rubric: str = (
        "You compare two answers to the same user request. Prefer the answer that is correct, "
        "complete and follows the requested format. Reply with exactly one letter: A or B."
    )
    """System prompt the judge gets; it must ask for a one-letter verdict, A or B."""

    api_key_env: str | None = "JUDGE_API_KEY"
    """Environment variable holding the API key, read where the judge runs: inside the
    evaluate stage's Ray job, so set it on the Ray worker pods from a Kubernetes Secret
    (``env: [{name: JUDGE_API_KEY, valueFrom: {secretKeyRef: ...}}]``). Never logged, never a
    config value. ``None``: no key is sent (a local endpoint without authentication)."""

    airflow_conn_id: str | None = None
    """Not supported; setting it is a config error. The judge runs inside the Ray job, where
    Airflow's connection store cannot be read, and handing the key over from the Airflow side
    would put it in the job's ``runtime_env``, which the Ray dashboard's job API shows to anyone
    who can open it. Use ``api_key_env`` set on the Ray workers from a secret."""

    max_examples: int = Field(16, ge=1)
    """Held-out chats judged pairwise (each twice, with the answers' positions swapped)."""

    timeout_s: float = Field(60.0, gt=0)
    """Per-request timeout."""

    @model_validator(mode="after")
    def _key_stays_secret(self) -> JudgeConfig:
        """Refuse what would expose the API key: a key source the job cannot read, or an
        endpoint that receives it in clear."""
        import ipaddress
        from urllib.parse import urlsplit

        from pipeline.redact import redact_text

        if self.airflow_conn_id is not None:
            raise ValueError(
                "eval.judge.airflow_conn_id is not supported: the judge runs inside the Ray job, "
                "which cannot read Airflow connections; remove it and set eval.judge.api_key_env "
                "(default JUDGE_API_KEY) on the Ray workers from a Kubernetes Secret"
            )
        url = urlsplit(self.endpoint)
        host = url.hostname or ""
        try:
            loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
        except ValueError:  # a DNS name: only localhost is known to stay on this machine
            loopback = False
        if url.scheme != "https" and not (url.scheme == "http" and loopback):
            # The API key travels as a header: over plain http anyone on the path reads it.
            shown = redact_text(self.endpoint)
            raise ValueError(
                f"eval.judge.endpoint {shown!r} must be https:// (the API key is sent with every "
                "request); plain http:// is allowed for a loopback host only (127.0.0.1, "
                "localhost, ::1)"
            )
        return self


class EvalConfig(_Section):
    batch_size: int = Field(8, ge=1)
    """Windows (or generation prompts) per forward pass."""

    max_documents: int = Field(64, ge=1)
    """Held-out documents scored per corpus (domain, general), a fixed seeded sample: the same
    documents for every model, whatever its tokenizer."""

    window_stride: float = Field(0.5, gt=0.0, le=1.0)
    """Documents longer than ``data.seq_len`` tokens are scored in windows of seq_len tokens
    that advance by this fraction of seq_len; each token is scored once, with the most context
    the window allows."""

    general_corpus: str | list[str] | None = None
    """General (non-domain) text for the forgetting gate: JSONL/text files or globs, local or
    s3://. ``None``: the held-out part of ``data.replay_corpus`` when set, else the general
    text set shipped with the project (``configs/general_data/general.jsonl``)."""

    max_generations: int = Field(32, ge=0)
    """Held-out chats answered by generation (greedy, KV cache on); 0 turns generation off."""

    max_new_tokens: int = Field(128, ge=1)
    """Longest generated answer, in tokens."""

    json_required_keys: list[str] = Field(default_factory=list)
    """Keys every answer must carry when the reference answer is a JSON object (a check is run
    only on those examples; validity of the JSON is always checked there)."""

    required_keywords: list[str] = Field(default_factory=list)
    """Case-insensitive keywords counted in every generated answer (the ``keywords`` metric is
    the fraction of these present, averaged over examples)."""

    judge: JudgeConfig | None = None
    """Optional LLM judge (candidate vs champion, pairwise); ``None``: no judge."""

    bootstrap_samples: int = Field(1000, ge=100)
    """Bootstrap resamples over documents / examples for each gate's confidence interval."""

    confidence: float = Field(0.9, gt=0.5, lt=1.0)
    """Two-sided confidence level of the gate intervals."""

    min_improvement: float = Field(0.0, ge=0)
    """Relative improvement in domain bits-per-byte the candidate needs over the champion (over
    the base model when there is no champion). The gate passes when the whole interval of the
    relative improvement lies above this value."""

    max_general_regression: float = Field(0.02, ge=0)
    """Largest relative increase in general bits-per-byte over the champion (or base) that
    passes; the gate fails when the interval's lower end lies above it (a regression is
    certain), so noise alone never fails it."""

    max_instruction_regression: dict[str, float] = Field(
        default_factory=lambda: {"rouge_l": 0.02, "exact_match": 0.05, "json_valid": 0.0}
    )
    """Largest absolute drop of each instruction metric (exact_match, rouge_l, json_valid,
    json_keys, keywords, judge_win_rate) against the champion that passes; metrics not listed
    are reported but not gated."""

    shard_model: bool = False
    """Load each evaluated model across all GPUs of its worker (``device_map="auto"``), for
    models larger than one GPU; the worker then reserves ``eval_gpus_per_worker`` GPUs."""

    gpus_per_worker: int = Field(1, ge=0)
    """GPUs one evaluation worker reserves (all of a node's GPUs for a sharded 70B model)."""

    num_workers: int = Field(1, ge=1)
    """Evaluation workers per model; documents and chats are split across them
    (data-parallel) and the scores merged."""

    @model_validator(mode="after")
    def _known_instruction_metrics(self) -> EvalConfig:
        known = [*INSTRUCTION_METRICS, JUDGE_METRIC]
        unknown = sorted(set(self.max_instruction_regression) - set(known))
        if unknown:
            raise ValueError(
                f"max_instruction_regression: unknown metric(s) {unknown}; expected some of {known}"
            )
        return self


class ComputeConfig(_Section):
    pool: Literal["cpu", "a100", "h100"] = "cpu"
    """Ray worker group the training workers are placed on."""

    num_workers: int = Field(2, ge=1)
    """Training workers (one per GPU on GPU pools)."""

    cpus_per_worker: int = Field(1, ge=1)
    """CPUs reserved per worker (data loading, CPU optimizer offload)."""

    zero_stage: Literal[0, 1, 2, 3] = 3
    """DeepSpeed ZeRO stage."""

    offload_optimizer: bool = True
    """Keep optimizer state on CPU (ZeRO-Offload; uses DeepSpeed's CPU Adam)."""

    precision: Literal["fp32", "bf16"] = "bf16"
    """Parameter and compute precision; bf16 keeps fp32 master weights in the optimizer."""

    attention: Literal["auto", AttentionKernel] = "auto"
    """Attention kernel. ``auto`` picks flash_attention_2 when CUDA and flash-attn are present,
    else flex_attention on CUDA, else sdpa; ``eager`` only on request. Requesting
    flash_attention_2 or flex_attention where it cannot run stops the stage at start; the stage
    logs which kernel ran. Packed documents stay isolated on every kernel
    (``pipeline.train.attention.packed_model_inputs``)."""

    activation_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""

    checkpoint_every_n_layers: int = Field(1, ge=1)
    """Selective activation checkpointing: with ``activation_checkpointing`` on, only every
    n-th decoder layer (layers 0, n, 2n, ...) recomputes its activations; the others keep
    them. 1 checkpoints every layer (least memory); 2 halves the recompute and keeps half the
    layers' activations."""

    cross_entropy: Literal["auto", "full", "chunked", "fused"] = "auto"
    """How the loss is computed from the last hidden states. ``full``: the LM head's logits for
    the whole micro-batch, then cross-entropy (``vocab x tokens`` floats alive at once).
    ``chunked``: the LM head and the loss run ``loss_chunk_tokens`` tokens at a time and are
    recomputed in backward, so full fp32 logits never exist (any ZeRO stage, any device).
    ``fused``: liger-kernel's fused linear cross-entropy (CUDA, ZeRO 0-2: it reads the whole
    LM head weight). ``auto``: ``fused`` where it can run, else ``chunked``."""

    loss_chunk_tokens: int = Field(4096, ge=64)
    """Tokens per chunk of the ``chunked`` cross-entropy."""

    compile_layers: bool = False
    """``torch.compile`` every decoder layer (not the whole model: ZeRO-3's hooks and the
    packed-attention inputs stay outside the compiled graphs). The first steps pay the compile
    time."""

    local_scratch: str | None = None
    """Node-local folder for per-rank checkpoint staging (uploads to ``s3://``) and the
    checkpoint copies a resume loads; each is deleted once uploaded or loaded. ``None``: the
    system temp dir. On GPU pods, point it at the NVMe volume (a 70B checkpoint stages about
    1 TB per node)."""

    offload_params: bool = False
    """Keep ZeRO-3 parameter partitions on CPU too (ZeRO-Infinity style; needs zero_stage 3 and
    offload_optimizer). Frees GPU memory for the largest models at the cost of PCIe traffic."""

    plan: Literal["off", "auto"] = "off"
    """``auto``: the first task replaces zero_stage, the offload switches, activation
    checkpointing and each stage's micro-batch size (keeping its global batch) with the plan
    ``pipeline plan`` predicts fastest among those that fit the pool, and logs it to MLflow."""

    gpu_memory_gib: float | None = Field(None, gt=0)
    """Memory of one GPU. ``None``: the pool's figure (a100: 80, h100: 80); set 40 for
    A100 40GB hosts. Used by the planner only."""

    gpus_per_node: int | None = Field(None, ge=1)
    """GPUs (or CPU workers) per host. ``None``: the pool's figure (a100: 4, h100: 8). Nodes are
    num_workers / gpus_per_node, rounded up. Used by the planner only."""

    host_memory_gb: float | None = Field(None, gt=0)
    """RAM of one host in GB. ``None``: the pool's figure (a100: 600, h100: 1872). Used by the
    planner only."""

    interconnect_gbit_s: float | None = Field(None, gt=0)
    """Network bandwidth between hosts, per host, in Gbit/s. ``None``: the pool's figure
    (a100: 400, h100: 3200). Used by the planner only."""

    pcie_gbyte_s: float | None = Field(None, gt=0)
    """Host-to-GPU copy bandwidth per GPU in GB/s (offload traffic). ``None``: the pool's
    figure (a100: 20, h100: 40). Used by the planner only."""

    max_failures: int = Field(2, ge=0)
    """Worker-group restarts Ray Train attempts inside one Ray job when a worker process dies
    (``FailureConfig.max_failures``); each restart resumes from the newest complete
    checkpoint."""

    placement_timeout_minutes: float = Field(30.0, gt=0)
    """How long a stage waits for the cluster to place all its workers (a GPU node pool
    scaling up takes minutes) before it fails naming the missing resources and the pool.
    Without it, a job asking for GPUs no node has waits, RUNNING, until the stage deadline."""

    @model_validator(mode="after")
    def _offload_needs_zero(self) -> ComputeConfig:
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("offload_optimizer needs zero_stage 1, 2 or 3")
        if self.offload_params and not (self.zero_stage == 3 and self.offload_optimizer):
            raise ValueError("offload_params needs zero_stage 3 and offload_optimizer: true")
        if self.zero_stage == 0 and self.precision == "bf16":
            raise ValueError(
                "zero_stage 0 with bf16 accumulates and reduces gradients in bf16 (DeepSpeed "
                "offers no fp32 accumulation without ZeRO); use zero_stage 1, which on one GPU "
                "costs only an fp32 gradient buffer more"
            )
        if self.compile_layers and self.zero_stage == 3:
            raise ValueError(
                "compile_layers with zero_stage 3: ZeRO-3's parameter hooks inside the decoder "
                "layers break the compiled graphs; use zero_stage 0-2 or compile_layers: false"
            )
        if self.cross_entropy == "fused" and self.zero_stage == 3:
            raise ValueError(
                "cross_entropy 'fused' reads the whole LM head weight, which ZeRO-3 partitions; "
                "use 'chunked' (or 'auto') with zero_stage 3"
            )
        if self.cross_entropy == "fused" and self.pool == "cpu":
            raise ValueError(
                "cross_entropy 'fused' is liger-kernel's CUDA kernel; use 'chunked' (or 'auto') "
                "on the cpu pool"
            )
        return self


class TrackingConfig(_Section):
    tracking_uri: str = "sqlite:///.local/mlflow/mlflow.db"
    """MLflow tracking URI. Relative sqlite paths resolve against the repository root."""

    artifact_location: str | None = ".local/mlflow/artifacts"
    """Where a new MLflow experiment stores run artifacts (only used when the experiment is
    created). Relative paths resolve against the repository root. ``None`` lets an MLflow
    server choose (its ``--artifacts-destination``)."""

    experiment: str = "domain-llm"
    """MLflow experiment that holds one parent run per DAG run."""

    registered_model: str = "domain-llm"
    """Model registry name the promote stage registers versions under."""

    ui_url: str | None = "http://127.0.0.1:5000"
    """Base URL of the MLflow UI a person's browser opens, for the Airflow task links and the
    notifications (``make mlflow-ui`` serves the default store there). ``None`` hides the links.
    Required with an MLflow server (an http(s) ``tracking_uri``): the address the pipeline
    reaches it at (``http://mlflow.mlops.svc:5000``) seldom opens outside the cluster."""

    @model_validator(mode="after")
    def _server_needs_ui_url(self) -> TrackingConfig:
        server = self.tracking_uri.startswith(("http://", "https://"))
        if server and "ui_url" not in self.model_fields_set:
            raise ValueError(
                "ui_url is required when tracking_uri is an MLflow server: set the address a "
                "browser opens (e.g. https://mlflow.example.com; the tracking_uri itself when "
                "people can open it), or null for no links"
            )
        return self


class StorageConfig(_Section):
    artifact_root: str = ".local/artifacts"
    """Where stage outputs go: ``<artifact_root>/<run_key>/<stage>/``. A local folder (relative
    to the repository root) or an ``s3://bucket/prefix`` URI."""


class OrchestrationConfig(_Section):
    stage_timeout_minutes: dict[str, float] = Field(
        default_factory=lambda: {
            "prepare_data": 180.0,
            "continued_pretraining": 4320.0,
            "instruction_finetuning": 1440.0,
            "evaluate": 360.0,
            "promote": 60.0,
        }
    )
    """Deadline of each stage's Ray job, from submission; when it passes the job is stopped
    and the task fails. Stages not listed get no deadline."""

    @field_validator("stage_timeout_minutes")
    @classmethod
    def _known_stages(cls, value: dict[str, float]) -> dict[str, float]:
        unknown = sorted(set(value) - set(STAGES))
        if unknown:
            raise ValueError(f"unknown stage(s) {unknown}; expected some of {list(STAGES)}")
        return value

    dagrun_timeout_hours: float | None = Field(168.0, gt=0)
    """Airflow ``dagrun_timeout``: a DAG run still going after this long is failed (its
    running jobs are stopped). ``None``: no limit."""

    transient_error_budget_s: float = Field(600.0, ge=0)
    """Seconds of consecutive failed Ray API calls (connection refused, 5xx, timeouts) that a
    waiting task tolerates, with backoff, before it fails; a head restart fits in it."""

    stop_wait_s: float = Field(180.0, ge=0)
    """After asking Ray to stop a job, how long to wait until Ray reports it STOPPED before a
    new attempt may start."""

    driver_num_cpus: float = Field(1.0, ge=0)
    """CPUs reserved for each stage's Ray job driver (``entrypoint_num_cpus``)."""

    driver_memory_gb: float = Field(2.0, ge=0)
    """Memory reserved for each stage's Ray job driver (``entrypoint_memory``)."""

    driver_resources: dict[str, float] = Field(default_factory=dict)
    """Custom Ray resources the driver needs (``entrypoint_resources``), e.g.
    ``{"driver": 1}`` advertised only by a CPU worker group, so drivers never land on the head."""

    runtime_env: dict[str, Any] = Field(default_factory=dict)
    """Ray ``runtime_env`` of every stage job (``env_vars``, ``pip``, ``working_dir``...).
    Empty on KubeRay when the worker image already holds the pipeline package."""

    schedule: Literal["weekly", "asset", "weekly_or_asset", "manual"] = "manual"
    """When the DAG runs by itself: ``weekly``, when fresh domain data lands (``asset``), either,
    or only when triggered. Read when the DAG file is parsed."""

    data_asset_uri: str | None = None
    """Location watched for fresh domain data (local folder or ``s3://bucket/prefix``);
    defaults to the folder of ``data.domain_corpus``."""


class PipelineConfig(_Section):
    data: DataConfig
    model: ModelConfig
    cpt: TrainConfig
    sft: TrainConfig
    eval: EvalConfig = EvalConfig()
    orchestration: OrchestrationConfig = OrchestrationConfig()
    compute: ComputeConfig = ComputeConfig()
    tracking: TrackingConfig = TrackingConfig()
    storage: StorageConfig = StorageConfig()

    @model_validator(mode="after")
    def _adapters_fit_compute(self) -> PipelineConfig:
        for section in ("cpt", "sft"):
            train: TrainConfig = getattr(self, section)
            if train.method == "qlora" and self.compute.offload_params:
                raise ValueError(
                    f"{section}.method qlora with compute.offload_params: ZeRO-3 would move the "
                    "4-bit weights to the host without their bitsandbytes quantization state. "
                    "Set compute.offload_params: false (the 4-bit base is a quarter of the "
                    "16-bit one) or use method lora"
                )
        return self

    def fingerprint(self) -> str:
        """Short hash of the resolved config; a stage retry reuses a result only when it matches."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


REPO_ROOT = Path(__file__).resolve().parent.parent
"""The project's root: where ``configs/`` is, in a checkout and in the images (``/opt/project``,
an editable install). The DAGs folder may be elsewhere (``/opt/airflow/dags``, a git-sync)."""


def default_config_path() -> str:
    """The config the DAGs parse and a trigger starts from: ``PIPELINE_CONFIG``, else
    ``configs/demo.yaml`` of the installed project."""
    return os.environ.get("PIPELINE_CONFIG") or str(REPO_ROOT / "configs" / "demo.yaml")


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> PipelineConfig:
    """Load a YAML config, apply dotted overrides and validate.

    Args:
        path: YAML file. Relative data paths in it resolve against its folder.
        overrides: ``{"cpt.max_steps": 20, ...}``; a ``None`` value keeps the file's value.

    Returns:
        The validated config, with local paths made absolute.

    Raises:
        ConfigError: the file is missing or malformed, a key is unknown, or a value is invalid;
            the message names the field and the file and line it came from.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    text = path.read_text()
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    applied = {key: value for key, value in (overrides or {}).items() if value is not None}
    for key, value in applied.items():
        _set_dotted(raw, key, value)
    try:
        config = PipelineConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_describe(err, path, text, overridden=set(applied))) from err
    return resolve_paths(config, path.parent)


def config_from_dict(raw: dict[str, Any], source: str = "<dict>") -> PipelineConfig:
    """Validate an already-resolved config (as written next to a run's artifacts)."""
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_describe(err, Path(source), "")) from err


def resolve_paths(config: PipelineConfig, config_dir: Path) -> PipelineConfig:
    """Make local paths absolute: data files against the config's folder, stores against the repo."""

    def local(value: str, base: Path) -> str:
        # ``models:/name@alias`` is a registry URI with a single slash, not a relative path.
        if "://" in value or value.startswith("models:/") or Path(value).is_absolute():
            return value
        return str((base / value).resolve())

    def local_inputs(value: str | list[str], base: Path) -> str | list[str]:
        return local(value, base) if isinstance(value, str) else [local(v, base) for v in value]

    replay = config.data.replay_corpus
    data = config.data.model_copy(
        update={
            "domain_corpus": local_inputs(config.data.domain_corpus, config_dir),
            "instructions": local_inputs(config.data.instructions, config_dir),
            "replay_corpus": local_inputs(replay, config_dir) if replay is not None else None,
            "eval_sets": [local(v, config_dir) for v in config.data.eval_sets],
        }
    )
    model = config.model.model_copy(
        update={
            "base": local(config.model.base, config_dir) if config.model.base else None,
            "tokenizer": local(config.model.tokenizer, config_dir)
            if config.model.tokenizer
            else None,
            "config_json": local(config.model.config_json, config_dir)
            if config.model.config_json
            else None,
        }
    )
    general = config.eval.general_corpus
    evaluation = config.eval.model_copy(
        update={"general_corpus": local_inputs(general, config_dir) if general else None}
    )
    uri = config.tracking.tracking_uri
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + local(uri.removeprefix("sqlite:///"), REPO_ROOT)
    tracking = config.tracking.model_copy(
        update={
            "tracking_uri": uri,
            "artifact_location": local(config.tracking.artifact_location, REPO_ROOT)
            if config.tracking.artifact_location
            else None,
        }
    )
    storage = config.storage.model_copy(
        update={"artifact_root": local(config.storage.artifact_root, REPO_ROOT)}
    )
    return config.model_copy(
        update={
            "data": data,
            "model": model,
            "eval": evaluation,
            "tracking": tracking,
            "storage": storage,
        }
    )


def _set_dotted(raw: dict[str, Any], dotted: str, value: Any) -> None:
    section, _, field = dotted.partition(".")
    if not field:
        raise ConfigError(f"override {dotted!r}: expected 'section.field', e.g. 'cpt.max_steps'")
    if section not in PipelineConfig.model_fields:
        raise ConfigError(
            f"override {dotted!r}: unknown section {section!r}; "
            f"expected one of {sorted(PipelineConfig.model_fields)}"
        )
    target = raw.setdefault(section, {})
    if not isinstance(target, dict):
        raise ConfigError(f"override {dotted!r}: section {section!r} is not a mapping")
    # ``data.fields.text``: a nested section is walked (and created) one key at a time.
    *parents, leaf = field.split(".")
    for depth, key in enumerate(parents):
        target = target.setdefault(key, {})
        if not isinstance(target, dict):
            where = ".".join([section, *parents[: depth + 1]])
            raise ConfigError(f"override {dotted!r}: {where!r} is not a mapping")
    target[leaf] = value


def _shown_input(item: Any) -> str:
    """The value an error was about, as an error message may show it: secrets redacted (the
    value may be a whole section, with tokens in it; the message reaches logs and the UI) and
    long values cut."""
    from pipeline.redact import redact

    key = str(item["loc"][-1]) if item["loc"] else ""
    shown = repr(redact(item.get("input"), key))
    return shown if len(shown) <= 300 else f"{shown[:300]}... ({len(shown)} characters)"


def _describe(
    err: ValidationError, path: Path, text: str, overridden: set[str] | None = None
) -> str:
    lines = [f"{path}: invalid config ({err.error_count()} error(s))"]
    for item in err.errors():
        loc = ".".join(str(part) for part in item["loc"])
        # A value set by an override did not come from the file, so no file line applies.
        if loc in (overridden or set()):
            at = " (from override)"
        else:
            where = _yaml_line(text, item["loc"])
            at = f" (line {where})" if where else ""
        if item["type"] == "extra_forbidden":
            parent = _fields_at(item["loc"][:-1])
            lines.append(f"  {loc}{at}: unknown key; allowed keys here: {parent}")
        else:
            lines.append(f"  {loc}{at}: {item['msg']} (got {_shown_input(item)})")
    return "\n".join(lines)


def _fields_at(loc: tuple[Any, ...]) -> list[str]:
    model: type[BaseModel] = PipelineConfig
    for part in loc:
        annotation = model.model_fields[str(part)].annotation
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return sorted(model.model_fields)


def _yaml_line(text: str, loc: tuple[Any, ...]) -> int | None:
    """1-based line of the key at ``loc`` in the YAML text, if it is there."""
    if not text:
        return None
    try:
        node = yaml.compose(text)
    except yaml.YAMLError:
        return None
    line = None
    for part in loc:
        if not isinstance(node, yaml.MappingNode):
            break
        for key, value in node.value:
            if key.value == str(part):
                line, node = key.start_mark.line + 1, value
                break
        else:
            break
    return line
