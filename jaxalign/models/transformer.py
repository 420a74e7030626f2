"""The shared decoder-only transformer and its KV cache.

    model = Transformer(cfg, rngs=nnx.Rngs(0))
    logits = model(tokens)                                # [B, T, V]
    cache = model.init_cache(batch=B, max_len=S)
    logits, cache = model(prompt, attention_mask=m, cache=cache)   # prefill
    logits, cache = model(next_tok[:, None], cache=cache)          # one step
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from jaxalign.models.config import ModelConfig
from jaxalign.models.layers import MLP, Attention, Norm, default_positions, make_attention_mask, param, upcast

Array = jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """Preallocated keys/values for incremental decoding.

    k, v: per layer `[B, KV, S, Dh]` (heads before slots: the decode step's
    attention dots then read the cache in place; with slots first XLA copied
    every layer's cache into this order at every step); valid: `[B, S]` slots holding real
    tokens; index: next slot to write (scalar, shared by the batch);
    next_pos: `[B]` position of each sequence's next token.
    """

    k: tuple[Array, ...]
    v: tuple[Array, ...]
    valid: Array
    index: Array
    next_pos: Array

    @property
    def max_len(self) -> int:
        return self.valid.shape[1]


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, layer: int, *, rngs, param_dtype):
        d = cfg.hidden_size
        self.cfg, self.layer = cfg, layer
        self.attn_norm = Norm(d, cfg, rngs=rngs, param_dtype=param_dtype)
        self.attn = Attention(cfg, layer, rngs=rngs, param_dtype=param_dtype)
        self.mlp_norm = Norm(d, cfg, rngs=rngs, param_dtype=param_dtype)
        self.mlp = MLP(cfg, rngs=rngs, param_dtype=param_dtype)
        if cfg.sandwich_norms:
            self.post_attn_norm = Norm(d, cfg, rngs=rngs, param_dtype=param_dtype)
            self.post_mlp_norm = Norm(d, cfg, rngs=rngs, param_dtype=param_dtype)

    def __call__(self, x, positions, mask, cache_kv=None, slot=None):
        h, cache_kv = self.attn(self.attn_norm(x), positions, mask, cache_kv, slot)
        if self.cfg.sandwich_norms:
            h = self.post_attn_norm(h)
        x = x + h
        h = self.mlp(self.mlp_norm(x))
        if self.cfg.sandwich_norms:
            h = self.post_mlp_norm(h)
        return x + h, cache_kv


class Transformer(nnx.Module):
    """Decoder-only language model for every supported family.

    Args:
      cfg: the switches (see :class:`ModelConfig`).
      rngs: initialisation randomness (normal(0, 0.02) weights, unit norms).
      param_dtype: storage dtype of parameters (float32 or bfloat16).
      dtype: computation dtype; norms, softmax and logits run in float32.
      lm_head: build the untied output projection (reward/value backbones skip it).
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32, dtype=jnp.float32,
                 lm_head: bool = True):
        d = cfg.hidden_size
        self.cfg = cfg
        self.dtype = dtype
        self.embed = param(rngs, (cfg.vocab_size, d), ("vocab", "embed"), dtype=param_dtype)
        if cfg.positions == "learned":
            self.pos_embed = param(rngs, (cfg.max_position_embeddings, d), ("position", "embed"),
                                   dtype=param_dtype, std=0.01)
        self.layers = nnx.List([Block(cfg, i, rngs=rngs, param_dtype=param_dtype) for i in range(cfg.num_layers)])
        self.final_norm = Norm(d, cfg, rngs=rngs, param_dtype=param_dtype)
        if lm_head and not cfg.tie_embeddings:
            self.lm_head = param(rngs, (d, cfg.vocab_size), ("embed", "vocab"), dtype=param_dtype)

    def init_cache(self, batch: int, max_len: int, dtype=None) -> KVCache:
        """An empty cache for `batch` sequences of up to `max_len` tokens."""
        cfg = self.cfg
        dtype = dtype or self.dtype
        shape = (batch, cfg.num_kv_heads, max_len, cfg.head_dim)
        zeros = tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers))
        return KVCache(k=zeros, v=tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)),
                       valid=jnp.zeros((batch, max_len), bool), index=jnp.zeros((), jnp.int32),
                       next_pos=jnp.zeros((batch,), jnp.int32))

    def hidden_states(self, tokens: Array, positions: Array | None = None, attention_mask: Array | None = None,
                      segment_ids: Array | None = None, cache: KVCache | None = None):
        """Final-norm hidden states `[B, T, D]` (and the updated cache when one is given).

        tokens: [B, T] int; attention_mask: [B, T], 1 for real tokens (left or
        right padding); segment_ids: [B, T] for packed rows (0 = padding),
        attention stays within a segment; positions: [B, T], by default
        counted over real tokens (continuing from the cache).
        """
        cfg = self.cfg
        b, t = tokens.shape
        if attention_mask is None:
            attention_mask = segment_ids > 0 if segment_ids is not None else jnp.ones((b, t), bool)
        attention_mask = attention_mask.astype(bool)
        if cache is None:
            if positions is None:
                positions = default_positions(attention_mask, (b, t))
            slots = jnp.arange(t)
            k_valid, slot = attention_mask, None
        else:
            if segment_ids is not None:
                raise ValueError("segment_ids (packing) is not supported with a KV cache")
            slot = cache.index
            if positions is None:
                positions = cache.next_pos[:, None] + default_positions(attention_mask, (b, t))
            k_valid = jax.lax.dynamic_update_slice_in_dim(cache.valid, attention_mask, slot, axis=1)
            slots = slot + jnp.arange(t)
        k_slots = jnp.arange(k_valid.shape[1])
        masks = {}

        def mask_for(window):
            if window not in masks:
                masks[window] = make_attention_mask(slots, k_slots, k_valid, window, segment_ids, segment_ids)
            return masks[window]

        x = self.embed_tokens(tokens, positions)
        new_k, new_v = [], []
        for i, block in enumerate(self.layers):
            kv = None if cache is None else (cache.k[i], cache.v[i])
            x, kv = block(x, positions, mask_for(cfg.window(i)), kv, slot)
            if cache is not None:
                new_k.append(kv[0])
                new_v.append(kv[1])
        x = self.final_norm(x)
        if cache is None:
            return x, None
        cache = KVCache(k=tuple(new_k), v=tuple(new_v), valid=k_valid, index=slot + t,
                        next_pos=cache.next_pos + attention_mask.sum(-1).astype(jnp.int32))
        return x, cache

    def embed_tokens(self, tokens: Array, positions: Array) -> Array:
        """Input embeddings `[B, T, D]` of `tokens: [B, T]` at `positions: [B, T]` (learned positions added)."""
        cfg = self.cfg
        x = jnp.take(self.embed[...], tokens, axis=0).astype(self.dtype)
        if cfg.embed_scale:
            x = x * jnp.asarray(cfg.hidden_size**0.5, self.dtype)
        if cfg.positions == "learned":
            x = x + jnp.take(self.pos_embed[...], positions, axis=0).astype(self.dtype)
        return x

    def logits(self, hidden: Array) -> Array:
        """Project hidden states `[B, T, D]` to float32 (or wider) logits `[B, T, V]`."""
        cfg = self.cfg
        w = self.embed[...].T if cfg.tie_embeddings else self.lm_head[...]
        out = jnp.einsum("btd,dv->btv", hidden, w.astype(hidden.dtype)).astype(upcast(hidden.dtype))
        if cfg.final_softcap:
            out = jnp.tanh(out / cfg.final_softcap) * cfg.final_softcap
        return out

    def __call__(self, tokens: Array, positions: Array | None = None, attention_mask: Array | None = None,
                 segment_ids: Array | None = None, cache: KVCache | None = None):
        """Logits `[B, T, V]`, or `(logits, cache)` when a cache is given."""
        h, new_cache = self.hidden_states(tokens, positions, attention_mask, segment_ids, cache)
        logits = self.logits(h)
        return logits if cache is None else (logits, new_cache)
