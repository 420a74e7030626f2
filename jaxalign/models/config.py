"""Model configuration read from a Hugging Face `config.json`.

One decoder implementation serves every supported family; the families differ
only by the switches of :class:`ModelConfig`. :func:`config_from_hf` reads the
Hugging Face config and either honours every field that changes the math or
refuses the checkpoint with an error naming the field.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any

log = logging.getLogger(__name__)

SUPPORTED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "gpt2")

# Hugging Face activation names -> ours.
_ACTIVATIONS = {
    "silu": "silu",
    "swish": "silu",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "gelu": "gelu",
    "relu": "relu",
}

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


class UnsupportedConfigError(ValueError):
    """A config field changes the math in a way jaxalign does not implement."""


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding of one layer type.

    `rope_type` is `default`, `linear` (positions divided by `factor`) or
    `llama3` (frequency-dependent scaling of Llama 3.1).
    """

    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The switches of the shared decoder.

    | switch | families |
    |---|---|
    | `norm="layer"`, `positions="learned"`, `mlp="plain"`, all biases | GPT-2 |
    | `qkv_bias` | Qwen2 (and Llama's `attention_bias`) |
    | `qk_norm` | Qwen3, Gemma 3 |
    | `norm_plus_one`, `embed_scale` | Gemma, Gemma 2, Gemma 3 |
    | `sandwich_norms` (post-attention and post-MLP norms) | Gemma 2, Gemma 3 |
    | `attn_softcap`, `final_softcap` | Gemma 2 |
    | `layer_windows` (sliding window per layer) | Mistral, Qwen2, Gemma 2, Gemma 3 |
    | `rope` / `rope_local` (per layer type) | all RoPE families; Gemma 3 uses both |
    """

    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int = 2048
    norm: str = "rms"  # "rms" | "layer"
    norm_eps: float = 1e-6
    norm_plus_one: bool = False  # Gemma: scale is (1 + w)
    sandwich_norms: bool = False  # Gemma 2/3: extra norms after attention and MLP
    mlp: str = "gated"  # "gated" (gate*up -> down) | "plain" (fc -> proj)
    activation: str = "silu"
    mlp_bias: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False
    positions: str = "rope"  # "rope" | "learned"
    rope: RopeConfig = RopeConfig()
    rope_local: RopeConfig | None = None  # used by sliding-window layers when set (Gemma 3)
    layer_windows: tuple[int | None, ...] = ()  # per layer; None = full causal attention
    attn_scale: float | None = None  # None: head_dim ** -0.5
    attn_softcap: float | None = None
    final_softcap: float | None = None
    embed_scale: bool = False  # Gemma: embeddings times sqrt(hidden_size)
    tie_embeddings: bool = False
    scale_attn_by_inverse_layer_idx: bool = False  # GPT-2 option
    hf_config: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise UnsupportedConfigError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})"
            )
        if self.layer_windows and len(self.layer_windows) != self.num_layers:
            raise UnsupportedConfigError(
                f"layer_types has {len(self.layer_windows)} entries for {self.num_layers} layers"
            )

    @property
    def query_scale(self) -> float:
        return self.attn_scale if self.attn_scale is not None else self.head_dim**-0.5

    def window(self, layer: int) -> int | None:
        return self.layer_windows[layer] if self.layer_windows else None

    def rope_for(self, layer: int) -> RopeConfig:
        if self.rope_local is not None and self.window(layer) is not None:
            return self.rope_local
        return self.rope


def _get(hf: dict, *names, default=None):
    for n in names:
        if n in hf and hf[n] is not None:
            return hf[n]
    return default


def _rope_from(params: dict | None, where: str) -> RopeConfig:
    params = dict(params or {})
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedConfigError(
            f"{where}: rope_type {rope_type!r} is not supported "
            f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
        )
    prf = params.get("partial_rotary_factor", 1.0)
    if prf != 1.0:
        raise UnsupportedConfigError(f"{where}: partial_rotary_factor={prf} is not supported")
    if params.get("attention_factor") not in (None, 1.0):
        raise UnsupportedConfigError(f"{where}: attention_factor is not supported")
    kw = dict(theta=float(params.get("rope_theta", 10000.0)), rope_type=rope_type)
    if rope_type in ("linear", "llama3"):
        kw["factor"] = float(params["factor"])
    if rope_type == "llama3":
        kw["low_freq_factor"] = float(params["low_freq_factor"])
        kw["high_freq_factor"] = float(params["high_freq_factor"])
        kw["original_max_position_embeddings"] = int(params["original_max_position_embeddings"])
    return RopeConfig(**kw)


def _rope_params(hf: dict) -> dict:
    """transformers 5 writes `rope_parameters`; older files `rope_theta` + `rope_scaling`."""
    if hf.get("rope_parameters"):
        return hf["rope_parameters"]
    params = dict(hf.get("rope_scaling") or {})
    params.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
    return params


def _windows(hf: dict, n_layers: int, family: str) -> tuple[int | None, ...]:
    window = hf.get("sliding_window")
    layer_types = hf.get("layer_types")
    if family == "mistral":
        return (window,) * n_layers if window else ()
    if family == "qwen2" or family == "qwen3":
        if not hf.get("use_sliding_window"):
            window = None
    if layer_types:
        out = []
        for t in layer_types:
            if t == "full_attention":
                out.append(None)
            elif t == "sliding_attention":
                if not window:
                    raise UnsupportedConfigError("layer_types has sliding_attention but sliding_window is unset")
                out.append(int(window))
            else:
                raise UnsupportedConfigError(f"layer type {t!r} is not supported")
        return tuple(out) if any(w is not None for w in out) else ()
    return ()


def _activation(hf: dict) -> str:
    name = _get(hf, "hidden_activation", "hidden_act", "activation_function", default="silu")
    if name not in _ACTIVATIONS:
        raise UnsupportedConfigError(f"activation {name!r} is not supported ({', '.join(_ACTIVATIONS)})")
    return _ACTIVATIONS[name]


def _refuse(hf: dict, field: str, ok) -> None:
    if field in hf and hf[field] is not None and not ok(hf[field]):
        raise UnsupportedConfigError(f"config field {field}={hf[field]!r} is not supported")


def config_from_hf(hf: Any) -> ModelConfig:
    """Build a :class:`ModelConfig` from a transformers config (object or dict).

    Raises :class:`UnsupportedConfigError` naming the field when the checkpoint
    uses something the decoder does not implement. Dropout probabilities are
    not applied (RLHF fine-tuning runs without dropout); a non-zero one is
    logged, not silently dropped.
    """
    if not isinstance(hf, dict):
        hf = hf.to_dict()
    family = hf.get("model_type")
    if family not in SUPPORTED_FAMILIES:
        raise UnsupportedConfigError(
            f"model_type {family!r} is not supported (supported: {', '.join(SUPPORTED_FAMILIES)})"
        )
    for f in ("attention_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop"):
        if hf.get(f):
            log.info("%s=%s: dropout is not applied by jaxalign models", f, hf[f])
    _refuse(hf, "use_bidirectional_attention", lambda v: not v)
    _refuse(hf, "pretraining_tp", lambda v: True)  # math-equivalent split of the projections

    if family == "gpt2":
        d = hf["n_embd"]
        n_heads = hf["n_head"]
        _refuse(hf, "add_cross_attention", lambda v: not v)
        return ModelConfig(
            family=family,
            vocab_size=hf["vocab_size"],
            hidden_size=d,
            intermediate_size=hf.get("n_inner") or 4 * d,
            num_layers=hf["n_layer"],
            num_heads=n_heads,
            num_kv_heads=n_heads,
            head_dim=d // n_heads,
            max_position_embeddings=hf["n_positions"],
            norm="layer",
            norm_eps=hf.get("layer_norm_epsilon", 1e-5),
            mlp="plain",
            activation=_activation(hf),
            mlp_bias=True,
            qkv_bias=True,
            o_bias=True,
            positions="learned",
            attn_scale=None if hf.get("scale_attn_weights", True) else 1.0,
            tie_embeddings=hf.get("tie_word_embeddings", True),
            scale_attn_by_inverse_layer_idx=bool(hf.get("scale_attn_by_inverse_layer_idx")),
            hf_config=hf,
        )

    d = hf["hidden_size"]
    n_heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or d // n_heads
    n_layers = hf["num_hidden_layers"]
    gemma = family.startswith("gemma")
    rope_params = _rope_params(hf)
    rope_local = None
    if family == "gemma3_text" and "full_attention" in rope_params:
        rope = _rope_from(rope_params["full_attention"], "rope_parameters.full_attention")
        rope_local = _rope_from(rope_params.get("sliding_attention"), "rope_parameters.sliding_attention")
    else:
        rope = _rope_from(rope_params, "rope_parameters")
    if family == "gemma3_text" and rope_local is None:
        rope_local = RopeConfig(theta=float(hf.get("rope_local_base_freq", 10000.0)))
    attention_bias = bool(hf.get("attention_bias", False))
    scalar = hf.get("query_pre_attn_scalar")
    return ModelConfig(
        family=family,
        vocab_size=hf["vocab_size"],
        hidden_size=d,
        intermediate_size=hf["intermediate_size"],
        num_layers=n_layers,
        num_heads=n_heads,
        num_kv_heads=hf.get("num_key_value_heads") or n_heads,
        head_dim=head_dim,
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        norm="rms",
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        norm_plus_one=gemma,
        sandwich_norms=family in ("gemma2", "gemma3_text"),
        mlp="gated",
        activation=_activation(hf),
        mlp_bias=bool(hf.get("mlp_bias", False)),
        qkv_bias=attention_bias or family == "qwen2",
        o_bias=attention_bias and family != "qwen2",
        qk_norm=family in ("qwen3", "gemma3_text"),
        rope=rope,
        rope_local=rope_local,
        layer_windows=_windows(hf, n_layers, family),
        attn_scale=float(scalar) ** -0.5 if (gemma and scalar) else None,
        attn_softcap=hf.get("attn_logit_softcapping") if gemma else None,
        final_softcap=hf.get("final_logit_softcapping") if gemma else None,
        embed_scale=gemma,
        tie_embeddings=bool(hf.get("tie_word_embeddings", gemma)),
        hf_config=hf,
    )


def rope_inv_freq(rope: RopeConfig, head_dim: int):
    """Inverse frequencies `[head_dim // 2]` (float64 NumPy) for a rope config."""
    import numpy as np

    inv = 1.0 / rope.theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    if rope.rope_type == "linear":
        return inv / rope.factor
    if rope.rope_type == "llama3":
        old = rope.original_max_position_embeddings
        low_wavelen = old / rope.low_freq_factor
        high_wavelen = old / rope.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > low_wavelen, inv / rope.factor, inv)
        smooth = (old / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return np.where(medium, smoothed, scaled)
    return inv
