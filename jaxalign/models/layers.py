"""Building blocks of the shared decoder: norms, rotary embeddings, attention, MLP.

Every parameter is an `nnx.Param` carrying its logical axis names as the
metadata key `axes` (one name per dimension); `jaxalign.sharding` maps those
names to mesh axes. Names used here: `vocab`, `embed`, `mlp`, `heads`,
`kv_heads`, `head_dim`, `norm`, `position`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxalign.models.config import ModelConfig
from jaxalign.models.lora import project

Array = jax.Array
_NEG_INF = -1e30  # finite, so fully masked rows (padding) give no NaN


def upcast(dtype) -> jnp.dtype:
    """The dtype norms, rotary embeddings and softmax run in: float32, or wider if the model is
    (a float64 model is then float64 throughout, usable as a numerical reference)."""
    return jnp.promote_types(dtype, jnp.float32)


def param(rngs: nnx.Rngs | None, shape, axes, *, init="normal", dtype=jnp.float32, std=0.02) -> nnx.Param:
    """A parameter with logical axis names; `rngs=None` is for abstract (shape-only) builds."""
    if init == "zeros":
        value = jnp.zeros(shape, dtype)
    elif init == "ones":
        value = jnp.ones(shape, dtype)
    else:
        value = (std * jax.random.normal(rngs.params(), shape)).astype(dtype)
    return nnx.Param(value, axes=tuple(axes))


def activation(name: str, x: Array) -> Array:
    if name == "silu":
        return jax.nn.silu(x)
    if name == "gelu_tanh":
        return jax.nn.gelu(x, approximate=True)
    if name == "gelu":
        return jax.nn.gelu(x, approximate=False)
    if name == "relu":
        return jax.nn.relu(x)
    raise ValueError(f"unknown activation {name!r}")


class Norm(nnx.Module):
    """RMSNorm (optionally with Gemma's `1 + w` scale) or LayerNorm, in float32 (or wider)."""

    def __init__(self, dim: int, cfg: ModelConfig, *, rngs, param_dtype, axes=("norm",)):
        self.kind, self.eps, self.plus_one = cfg.norm, cfg.norm_eps, cfg.norm_plus_one
        self.scale = param(rngs, (dim,), axes, init="zeros" if self.plus_one else "ones", dtype=param_dtype)
        if self.kind == "layer":
            self.bias = param(rngs, (dim,), axes, init="zeros", dtype=param_dtype)

    def __call__(self, x: Array) -> Array:
        dtype = x.dtype
        wide = upcast(dtype)
        x = x.astype(wide)
        if self.kind == "layer":
            x = x - x.mean(-1, keepdims=True)
        x = x * jax.lax.rsqrt((x * x).mean(-1, keepdims=True) + self.eps)
        scale = self.scale[...].astype(wide)
        if self.plus_one:
            scale = 1.0 + scale
        x = x * scale
        if self.kind == "layer":
            x = x + self.bias[...].astype(wide)
        return x.astype(dtype)


def apply_rope(x: Array, positions: Array, inv_freq: Array) -> Array:
    """Rotate `x: [B, T, H, D]` by `positions: [B, T]` (half-split layout, as Hugging Face).

    inv_freq: `[D/2]` inverse frequencies (`config.rope_inv_freq`).
    """
    d = x.shape[-1]
    wide = upcast(x.dtype)
    angles = positions.astype(wide)[..., None] * inv_freq.astype(wide)  # [B, T, D/2]
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    x32 = x.astype(wide)
    x1, x2 = x32[..., : d // 2], x32[..., d // 2 :]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def make_attention_mask(q_slots: Array, k_slots: Array, k_valid: Array, window: int | None,
                   q_segments: Array | None = None, k_segments: Array | None = None) -> Array:
    """Boolean `[B, Tq, Tk]`: causal over slots, key padding, sliding window, segments.

    q_slots: [B, Tq] or [Tq]; k_slots: [Tk]; k_valid: [B, Tk].
    """
    q = jnp.broadcast_to(q_slots, (k_valid.shape[0],) + q_slots.shape[-1:])[:, :, None]
    k = k_slots[None, None, :]
    mask = (k <= q) & k_valid[:, None, :]
    if window is not None:
        mask &= (q - k) < window
    if q_segments is not None:
        mask &= q_segments[:, :, None] == k_segments[:, None, :]
    return mask


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs, param_dtype):
        d, h, kv, hd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.cfg = cfg
        self.q = param(rngs, (d, h, hd), ("embed", "heads", "head_dim"), dtype=param_dtype)
        self.k = param(rngs, (d, kv, hd), ("embed", "kv_heads", "head_dim"), dtype=param_dtype)
        self.v = param(rngs, (d, kv, hd), ("embed", "kv_heads", "head_dim"), dtype=param_dtype)
        self.o = param(rngs, (h, hd, d), ("heads", "head_dim", "embed"), dtype=param_dtype)
        if cfg.qkv_bias:
            self.q_bias = param(rngs, (h, hd), ("heads", "head_dim"), init="zeros", dtype=param_dtype)
            self.k_bias = param(rngs, (kv, hd), ("kv_heads", "head_dim"), init="zeros", dtype=param_dtype)
            self.v_bias = param(rngs, (kv, hd), ("kv_heads", "head_dim"), init="zeros", dtype=param_dtype)
        if cfg.o_bias:
            self.o_bias = param(rngs, (d,), ("embed",), init="zeros", dtype=param_dtype)
        if cfg.qk_norm:
            self.q_norm = Norm(hd, cfg, rngs=rngs, param_dtype=param_dtype)
            self.k_norm = Norm(hd, cfg, rngs=rngs, param_dtype=param_dtype)

    def __call__(self, x: Array, positions: Array, mask: Array, layer: dict, cache=None):
        """x: [B, T, D]; positions: [B, T]; mask: [B, T, S] bool over the keys attended.

        layer: this layer's `index`, rotary `inv_freq` [Dh/2], score `scale`
        and cache `slot` (see `transformer.layer_tables`). Without a cache the
        keys are this call's own tokens (S = T). With the whole stacked cache
        `(k, v)` of `[L, B, KV, S, Dh]`, this call's keys are written into
        layer `index` at `slot` and that layer's cache is attended.
        Returns (out [B, T, D], the cache or None).
        """
        cfg = self.cfg
        dt = x.dtype
        q = project(self, "q", "btd,dhk->bthk", x)  # + LoRA, QLoRA (models/lora.py)
        k = project(self, "k", "btd,dhk->bthk", x)
        v = project(self, "v", "btd,dhk->bthk", x)
        if cfg.qkv_bias:
            q, k, v = q + self.q_bias[...].astype(dt), k + self.k_bias[...].astype(dt), v + self.v_bias[...].astype(dt)
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if cfg.positions == "rope":
            q, k = apply_rope(q, positions, layer["inv_freq"]), apply_rope(k, positions, layer["inv_freq"])
        keys = "bskd"  # k, v: [B, S, KV, Dh] (S = T)
        if cache is not None:  # a cache is kept as [L, B, KV, S, Dh] (see KVCache)
            ck, cv = cache
            at = (layer["index"], 0, 0, layer["slot"], 0)
            ck = jax.lax.dynamic_update_slice(ck, k.transpose(0, 2, 1, 3)[None].astype(ck.dtype), at)
            cv = jax.lax.dynamic_update_slice(cv, v.transpose(0, 2, 1, 3)[None].astype(cv.dtype), at)
            cache, keys = (ck, cv), "bksd"
            k, v = ck[layer["index"]], cv[layer["index"]]
        b, t, h, hd = q.shape
        kvh = cfg.num_kv_heads
        scale = layer["scale"]
        qg = q.reshape(b, t, kvh, h // kvh, hd)
        scores = jnp.einsum(f"btkgd,{keys}->bkgts", qg, k.astype(dt)).astype(upcast(dt)) * scale
        if cfg.attn_softcap:
            scores = jnp.tanh(scores / cfg.attn_softcap) * cfg.attn_softcap
        scores = jnp.where(mask[:, None, None, :, :], scores, _NEG_INF)
        probs = jax.nn.softmax(scores, axis=-1).astype(dt)
        out = jnp.einsum(f"bkgts,{keys}->btkgd", probs, v.astype(dt)).reshape(b, t, h, hd)
        out = project(self, "o", "bthk,hkd->btd", out)
        if cfg.o_bias:
            out = out + self.o_bias[...].astype(dt)
        return out, cache


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs, param_dtype):
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.cfg = cfg
        if cfg.mlp == "gated":
            self.gate = param(rngs, (d, f), ("embed", "mlp"), dtype=param_dtype)
        self.up = param(rngs, (d, f), ("embed", "mlp"), dtype=param_dtype)
        self.down = param(rngs, (f, d), ("mlp", "embed"), dtype=param_dtype)
        if cfg.mlp_bias:
            if cfg.mlp == "gated":
                self.gate_bias = param(rngs, (f,), ("mlp",), init="zeros", dtype=param_dtype)
            self.up_bias = param(rngs, (f,), ("mlp",), init="zeros", dtype=param_dtype)
            self.down_bias = param(rngs, (d,), ("embed",), init="zeros", dtype=param_dtype)

    def __call__(self, x: Array) -> Array:
        cfg, dt = self.cfg, x.dtype
        up = project(self, "up", "...d,df->...f", x)
        if cfg.mlp_bias:
            up = up + self.up_bias[...].astype(dt)
        if cfg.mlp == "gated":
            gate = project(self, "gate", "...d,df->...f", x)
            if cfg.mlp_bias:
                gate = gate + self.gate_bias[...].astype(dt)
            hidden = activation(cfg.activation, gate) * up
        else:
            hidden = activation(cfg.activation, up)
        out = project(self, "down", "...f,fd->...d", hidden)
        if cfg.mlp_bias:
            out = out + self.down_bias[...].astype(dt)
        return out


def default_positions(attention_mask: Array | None, shape, offset=0) -> Array:
    """Positions `[B, T]`: counted over real tokens when a mask is given (left padding works)."""
    if attention_mask is None:
        return jnp.broadcast_to(jnp.arange(shape[1], dtype=jnp.int32) + offset, shape)
    return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0) + offset


__all__ = ["Attention", "MLP", "Norm", "activation", "apply_rope", "default_positions", "make_attention_mask", "param"]
