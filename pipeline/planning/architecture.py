"""The decoder's dimensions, read without weights: config fields or a Hugging Face config.json."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline import storage
from pipeline.config import ConfigError, ModelConfig

# Hugging Face ``model_type`` values whose decoder is Llama-shaped (RMSNorm, RoPE, GQA, SwiGLU).
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "mixtral", "qwen2", "qwen3", "qwen2_moe", "qwen3_moe")


@dataclass(frozen=True)
class Architecture:
    """A Llama-family decoder (optionally mixture-of-experts), as the planner sees it."""

    name: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    """Width of one expert's MLP (of the only MLP for dense models)."""
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    num_experts: int = 1
    experts_per_token: int = 1
    tied_embeddings: bool = False

    @property
    def kv_width(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def q_width(self) -> int:
        return self.num_heads * self.head_dim

    def attention_params(self) -> int:
        d = self.hidden_size
        return 2 * d * self.q_width + 2 * d * self.kv_width

    def expert_params(self) -> int:
        return 3 * self.hidden_size * self.intermediate_size

    def layer_params(self) -> int:
        """One decoder layer: attention, every expert's MLP, the router, two RMSNorm weights."""
        router = self.hidden_size * self.num_experts if self.num_experts > 1 else 0
        experts = self.num_experts * self.expert_params()
        return self.attention_params() + experts + router + 2 * self.hidden_size

    def total_params(self) -> int:
        embeddings = self.vocab_size * self.hidden_size * (1 if self.tied_embeddings else 2)
        return embeddings + self.num_layers * self.layer_params() + self.hidden_size

    def active_params(self) -> int:
        """Parameters one token goes through (all of them for dense models)."""
        idle = self.num_experts - self.experts_per_token
        return self.total_params() - self.num_layers * idle * self.expert_params()

    def largest_module_params(self) -> int:
        """Largest single module's own parameters, as DeepSpeed's ``model_to_params`` counts."""
        d = self.hidden_size
        return max(self.vocab_size * d, d * self.intermediate_size, d * self.q_width)


def from_hf_config(raw: dict[str, Any], source: str) -> Architecture:
    """Read a Hugging Face ``config.json`` (Llama 2/3, Mistral, Mixtral, Qwen 2/3).

    Raises:
        ConfigError: the model type is not Llama-shaped or a dimension is missing.
    """
    model_type = raw.get("model_type", "")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(
            f"{source}: model_type {model_type!r} is not one the planner knows; expected one of "
            f"{list(SUPPORTED_MODEL_TYPES)}"
        )
    try:
        hidden = int(raw["hidden_size"])
        heads = int(raw["num_attention_heads"])
        experts = int(raw.get("num_local_experts") or raw.get("num_experts") or 1)
        ff = int(
            raw["moe_intermediate_size"]
            if "moe_intermediate_size" in raw
            else raw["intermediate_size"]
        )
        return Architecture(
            name=str(raw.get("_name_or_path") or model_type),
            vocab_size=int(raw["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=ff,
            num_layers=int(raw["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(raw.get("num_key_value_heads") or heads),
            head_dim=int(raw.get("head_dim") or hidden // heads),
            num_experts=experts,
            experts_per_token=int(raw.get("num_experts_per_tok") or 1) if experts > 1 else 1,
            tied_embeddings=bool(raw.get("tie_word_embeddings", False)),
        )
    except KeyError as err:
        raise ConfigError(f"{source}: config.json has no {err.args[0]!r}") from err


def from_model_config(model: ModelConfig) -> Architecture:
    """The architecture of a model built from the config's own fields (tiny demo models)."""
    return Architecture(
        name=model.name,
        vocab_size=model.vocab_size,
        hidden_size=model.hidden_size,
        intermediate_size=model.intermediate_size,
        num_layers=model.num_layers,
        num_heads=model.num_heads,
        num_kv_heads=model.num_kv_heads,
        head_dim=model.hidden_size // model.num_heads,
        num_experts=model.num_experts if model.architecture == "mixtral" else 1,
        experts_per_token=model.experts_per_token if model.architecture == "mixtral" else 1,
    )


def architecture_for(model: ModelConfig) -> Architecture:
    """The planner's view of ``model``, read without weights.

    ``model.config_json`` wins (so a preset plans without reaching ``base``); else ``base``'s
    config.json; else, for a model built from config, its fields.

    Raises:
        ConfigError: ``base`` is set but its config.json cannot be read here, and
            ``model.config_json`` is not set.
    """
    if model.config_json:
        if not storage.exists(model.config_json):
            raise ConfigError(f"model.config_json: file not found: {model.config_json}")
        return from_hf_config(storage.read_json(model.config_json), model.config_json)
    if model.base is None:
        return from_model_config(model)
    config_json = (
        None if model.base.startswith("models:/") else storage.join(model.base, "config.json")
    )
    if config_json is None or not storage.exists(config_json):
        raise ConfigError(
            f"model.base: the planner needs the architecture and cannot read a config.json at "
            f"{model.base}; set model.config_json to a Hugging Face config.json (e.g. "
            f"configs/architectures/llama-2-70b.json)"
        )
    return from_hf_config(storage.read_json(config_json), config_json)
