"""Model hyper-parameters and their mapping to and from Hugging Face ``config.json``.

One dataclass covers the Llama 3.x, Qwen2/Qwen2.5 and Qwen3 families; the
differences are flags (q/k/v bias, q/k RMSNorm, explicit head_dim, tied
embeddings, llama3 RoPE scaling).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3")
DTYPES = ("float32", "bfloat16")
REMAT = ("none", "full", "dots", "attn", "dots_attn")  # see transformer.REMAT_POLICIES
ATTENTION = ("auto", "xla", "xla_chunked", "cudnn", "splash")  # see models/attention.py
SUPPORTED_ACTIVATIONS = ("silu", "swish")  # transformers' ACT2FN maps both to SiLU


# Numerics and memory options: not part of the architecture, so they may be set on top of a model.path
# config.json (config.validate) and are passed through every reload of a checkpoint.
NUMERICS = ("param_dtype", "compute_dtype", "remat", "logits_chunk", "attention")


def numerics(cfg) -> dict[str, Any]:
    """``{field: value}`` of the NUMERICS fields of a ModelConfig (or a section that extends it)."""
    return {k: getattr(cfg, k) for k in NUMERICS}


class ModelConfigError(ValueError):
    """A model config that cannot be built (bad value, unsupported family)."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a decoder-only transformer, plus numerics options."""

    model_type: str = "qwen2"  # llama | qwen2 | qwen3 (decides the HF export names)
    vocab_size: int = 128
    hidden_size: int = 64
    intermediate_size: int = 172
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 0  # 0 = hidden_size // num_heads
    rope_theta: float = 10000.0
    rope_type: str = "default"  # default | llama3
    rope_factor: float = 8.0  # llama3 scaling parameters (ignored for default)
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position: int = 8192
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    tie_embeddings: bool = True
    attention_bias: bool = True  # q/k/v projection bias (Qwen2)
    qk_norm: bool = False  # per-head RMSNorm on q and k (Qwen3)
    param_dtype: str = "float32"
    compute_dtype: str = "float32"
    remat: str = "none"  # none | full | dots | attn | dots_attn: what the backward keeps vs recomputes (transformer.REMAT_POLICIES)
    # Training's output layer runs this many response positions at a time (models/logprobs.py): peak memory
    # rows * logits_chunk * vocab * 4 bytes per live copy instead of rows * T * vocab * 4; 0 = all at once.
    logits_chunk: int = 256
    attention: str = "auto"  # auto | xla | xla_chunked | cudnn | splash (models/attention.py); not in config.json
    init_std: float = 0.02

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    @property
    def o_bias(self) -> bool:
        """transformers' Llama/Qwen3 put `attention_bias` on o_proj too; Qwen2 only on q/k/v."""
        return self.attention_bias and self.model_type != "qwen2"

    def validate(self, prefix: str = "model") -> None:
        def bad(key, value, allowed):
            raise ModelConfigError(f"{prefix}.{key}={value!r} is invalid: {allowed}")

        if self.model_type not in SUPPORTED_MODEL_TYPES:
            bad("model_type", self.model_type, f"supported model types are {SUPPORTED_MODEL_TYPES}")
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads"):
            if getattr(self, key) <= 0:
                bad(key, getattr(self, key), "must be > 0")
        if self.num_heads % self.num_kv_heads:
            bad("num_kv_heads", self.num_kv_heads, f"must divide num_heads={self.num_heads}")
        if not self.head_dim and self.hidden_size % self.num_heads:
            bad("head_dim", self.head_dim, "set it explicitly when hidden_size % num_heads != 0")
        if self.dim_per_head % 2:
            bad("head_dim", self.dim_per_head, "must be even for RoPE")
        if self.rope_type not in ("default", "llama3"):
            bad("rope_type", self.rope_type, "supported: 'default', 'llama3'")
        for key in ("param_dtype", "compute_dtype"):
            if getattr(self, key) not in DTYPES:
                bad(key, getattr(self, key), f"allowed: {DTYPES}")
        if self.remat not in REMAT:
            bad("remat", self.remat, f"allowed: {REMAT}")
        if self.logits_chunk < 0:
            bad("logits_chunk", self.logits_chunk, "must be >= 0 (0 = no chunking)")
        if self.attention not in ATTENTION:
            bad("attention", self.attention, f"allowed: {ATTENTION}")
        # Family flags must match what transformers builds for the model_type.
        if self.model_type == "qwen2" and not self.attention_bias:
            bad("attention_bias", self.attention_bias, "qwen2 models always have q/k/v bias")
        if (self.model_type == "qwen3") != self.qk_norm:
            bad("qk_norm", self.qk_norm, "q/k norm is on exactly for model_type 'qwen3'")


def _rope_from_hf(hf: dict[str, Any], where: str) -> dict[str, Any]:
    # transformers v5 writes `rope_parameters` (theta inside); v4 `rope_theta` + `rope_scaling`.
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default")) or "default"
    out: dict[str, Any] = {"rope_theta": float(theta), "rope_type": rope_type}
    if rope_type == "llama3":
        fields = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        missing = [f for f in fields if params.get(f) is None]
        if missing:
            key = "rope_parameters" if hf.get("rope_parameters") else "rope_scaling"
            raise ModelConfigError(f"{where}: {key} of type 'llama3' lacks {', '.join(missing)} "
                                   f"(it needs {', '.join(fields)}); has {sorted(params)}")
        try:
            out.update(
                rope_factor=float(params["factor"]),
                rope_low_freq_factor=float(params["low_freq_factor"]),
                rope_high_freq_factor=float(params["high_freq_factor"]),
                rope_original_max_position=int(params["original_max_position_embeddings"]),
            )
        except (TypeError, ValueError) as e:
            raise ModelConfigError(f"{where}: rope scaling 'llama3' has a non-numeric field ({e}): {params}") from None
    elif rope_type != "default":
        raise ModelConfigError(f"{where}: rope scaling type {rope_type!r} is not supported (supported: default, llama3)")
    return out


def from_hf_config(hf: dict[str, Any], where: str = "config.json", **overrides: Any) -> ModelConfig:
    """Builds a ModelConfig from a Hugging Face config dict; ``where`` names it in errors."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelConfigError(
            f"{where}: model_type {model_type!r} is not supported (supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    missing = [k for k in required if k not in hf]
    if missing:
        raise ModelConfigError(f"{where}: missing field(s) {missing}")
    if hf.get("mlp_bias"):
        raise ModelConfigError(f"{where}: mlp_bias=true is not supported")
    if hf.get("use_sliding_window"):
        raise ModelConfigError(f"{where}: use_sliding_window=true is not supported")
    act = hf.get("hidden_act", "silu")  # the default of all three transformers configs
    if act not in SUPPORTED_ACTIVATIONS:
        raise ModelConfigError(
            f"{where}: hidden_act={act!r} is not supported (the MLP is SwiGLU: hidden_act must be 'silu')"
        )
    heads = int(hf["num_attention_heads"])
    fields = dict(
        model_type=model_type,
        vocab_size=int(hf["vocab_size"]),
        hidden_size=int(hf["hidden_size"]),
        intermediate_size=int(hf["intermediate_size"]),
        num_layers=int(hf["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or heads),
        # transformers' Qwen3Config defaults head_dim to 128, the others derive it.
        head_dim=int(hf.get("head_dim") or (128 if model_type == "qwen3" else hf["hidden_size"] // heads)),
        max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        # All three transformers configs default to untied (Qwen2.5-0.5B etc. say `true` explicitly).
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        # Qwen2 always has q/k/v bias; Llama and Qwen3 read `attention_bias`.
        attention_bias=True if model_type == "qwen2" else bool(hf.get("attention_bias", False)),
        qk_norm=model_type == "qwen3",
        **_rope_from_hf(hf, where),
    )
    unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(ModelConfig)})
    if unknown:
        raise ModelConfigError(f"{where}: unknown model config override(s) {unknown}")
    fields.update(overrides)
    cfg = ModelConfig(**fields)
    cfg.validate()
    return cfg


def load_hf_config(path: str, **overrides: Any) -> ModelConfig:
    """Reads ``path/config.json`` (a local directory; nothing is downloaded)."""
    file = os.path.join(path, "config.json")
    if not os.path.isfile(file):
        raise FileNotFoundError(f"model directory {path!r} has no config.json")
    try:
        with open(file) as f:
            hf = json.load(f)
    except json.JSONDecodeError as e:
        raise ModelConfigError(f"{file}: not valid JSON ({e})") from None
    return from_hf_config(hf, where=file, **overrides)


_ARCH = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}


def to_hf_config(cfg: ModelConfig, **extra: Any) -> dict[str, Any]:
    """The ``config.json`` dict that transformers needs to rebuild this model."""
    rope: dict[str, Any] = {"rope_type": cfg.rope_type, "rope_theta": cfg.rope_theta}
    if cfg.rope_type == "llama3":
        rope.update(
            factor=cfg.rope_factor,
            low_freq_factor=cfg.rope_low_freq_factor,
            high_freq_factor=cfg.rope_high_freq_factor,
            original_max_position_embeddings=cfg.rope_original_max_position,
        )
    hf = {
        "architectures": [_ARCH[cfg.model_type]],
        "model_type": cfg.model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.dim_per_head,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": cfg.attention_bias,
        "rope_theta": cfg.rope_theta,  # v4 readers
        "rope_scaling": None if cfg.rope_type == "default" else {k: v for k, v in rope.items() if k != "rope_theta"},
        "rope_parameters": rope,  # v5 readers
        "torch_dtype": cfg.param_dtype,
        "use_cache": True,
    }
    if cfg.model_type == "qwen2":
        hf["use_sliding_window"] = False
    hf.update(extra)
    return hf
