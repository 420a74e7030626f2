"""The shared decoder-only transformer and its KV cache, its layers stacked and scanned.

    model = Transformer(cfg, rngs=nnx.Rngs(0))
    logits = model(tokens)                                # [B, T, V]
    cache = model.init_cache(batch=B, max_len=S)
    logits, cache = model(prompt, attention_mask=m, cache=cache)   # prefill
    logits, cache = model(next_tok[:, None], cache=cache)          # one step

The decoder's layers are one `Block` whose parameters carry a leading layer
axis (`[L, ...]`, logical axis `layers`); `jax.lax.scan` runs it, so a program
holds one layer body whatever the depth: compile time and executable size do
not grow with the number of layers. What differs between layers (a sliding
window, a local rotary base, GPT-2's 1/(layer + 1) score scale) is a per-layer
table indexed by the scanned layer number. `remat` recomputes each layer's
activations in the backward pass instead of keeping them (`REMAT_POLICIES`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxalign.models.config import ModelConfig, rope_inv_freq
from jaxalign.models.layers import MLP, Attention, Norm, default_positions, make_attention_mask, param, upcast
from jaxalign.sharding import constrain_rows

Array = jax.Array

# What the backward pass keeps of a layer's forward pass (`Transformer(remat=...)`, `model.remat`):
# none: everything (fastest, most memory); full: only the layer's input, the rest is recomputed;
# save_dots: the projections' outputs (matmuls without batch dimensions), not the attention
# scores or the elementwise work between them.
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """Preallocated keys/values for incremental decoding.

    k, v: `[L, B, KV, S, Dh]` (heads before slots: the decode step's attention
    dots read a layer's cache in place); valid: `[B, S]` slots holding real
    tokens; index: next slot to write (scalar, shared by the batch);
    next_pos: `[B]` position of each sequence's next token.
    """

    k: Array
    v: Array
    valid: Array
    index: Array
    next_pos: Array

    @property
    def max_len(self) -> int:
        return self.valid.shape[1]


class Block(nnx.Module):
    """One decoder layer; `Transformer.layers` is a Block whose parameters are stacked over layers."""

    def __init__(self, cfg: ModelConfig, *, rngs, param_dtype):
        d = cfg.hidden_size
        self.cfg = cfg
        self.attn_norm = Norm(d, cfg, rngs=rngs, param_dtype=param_dtype)
        self.attn = Attention(cfg, rngs=rngs, param_dtype=param_dtype)
        self.mlp_norm = Norm(d, cfg, rngs=rngs, param_dtype=param_dtype)
        self.mlp = MLP(cfg, rngs=rngs, param_dtype=param_dtype)
        if cfg.sandwich_norms:
            self.post_attn_norm = Norm(d, cfg, rngs=rngs, param_dtype=param_dtype)
            self.post_mlp_norm = Norm(d, cfg, rngs=rngs, param_dtype=param_dtype)

    def __call__(self, x, positions, mask, layer, cache=None):
        """x: [B, T, D] -> (x, cache); `layer`: this layer's `LayerTables` row (see Attention)."""
        x = constrain_rows(x)  # rows stay split over data/fsdp under FSDP's parameter layout
        h, cache = self.attn(self.attn_norm(x), positions, mask, layer, cache)
        if self.cfg.sandwich_norms:
            h = self.post_attn_norm(h)
        x = x + h
        h = self.mlp(self.mlp_norm(x))
        if self.cfg.sandwich_norms:
            h = self.post_mlp_norm(h)
        return x + h, cache


def stacked_blocks(cfg: ModelConfig, rngs: nnx.Rngs, param_dtype) -> Block:
    """`cfg.num_layers` independently initialised layers as one Block of `[L, ...]` parameters."""

    @nnx.split_rngs(splits=cfg.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(r):
        return Block(cfg, rngs=r, param_dtype=param_dtype)

    block = make(rngs)
    for _, v in nnx.iter_graph(block):
        if isinstance(v, nnx.Variable):
            v.set_metadata(axes=("layers",) + tuple(v.get_metadata()["axes"]))
    return block


def layer_tables(cfg: ModelConfig) -> dict[str, np.ndarray]:
    """What differs between layers, one row per layer (NumPy; indexed by the scanned layer number).

    inv_freq: `[L, Dh/2]` rotary inverse frequencies (a local base on sliding-window layers);
    scale: `[L]` the attention score scale; mask: `[L]` index into the distinct windows'
    masks (`windows`: their sizes, None = no window).
    """
    n = cfg.num_layers
    windows = sorted({cfg.window(i) for i in range(n)}, key=lambda w: (w is not None, w or 0))
    scale = np.full(n, cfg.query_scale, np.float64)
    if cfg.scale_attn_by_inverse_layer_idx:
        scale /= np.arange(1, n + 1)
    inv = np.stack([rope_inv_freq(cfg.rope_for(i), cfg.head_dim) for i in range(n)]) if cfg.positions == "rope" \
        else np.zeros((n, 1))
    return {"inv_freq": inv, "scale": scale, "mask": np.array([windows.index(cfg.window(i)) for i in range(n)]),
            "windows": windows}


class Transformer(nnx.Module):
    """Decoder-only language model for every supported family.

    Args:
      cfg: the switches (see :class:`ModelConfig`).
      rngs: initialisation randomness (normal(0, 0.02) weights, unit norms).
      param_dtype: storage dtype of parameters (float32 or bfloat16).
      dtype: computation dtype; norms, softmax and logits run in float32.
      lm_head: build the untied output projection (reward/value backbones skip it).
      remat: what the backward pass keeps of each layer (`REMAT_POLICIES`: none, full, save_dots).
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32, dtype=jnp.float32,
                 lm_head: bool = True, remat: str = "none"):
        if remat not in REMAT_POLICIES:
            raise ValueError(f"remat must be one of {sorted(REMAT_POLICIES)}, got {remat!r}")
        d = cfg.hidden_size
        self.cfg = cfg
        self.dtype = dtype
        self.remat = remat
        self.embed = param(rngs, (cfg.vocab_size, d), ("vocab", "embed"), dtype=param_dtype)
        if cfg.positions == "learned":
            self.pos_embed = param(rngs, (cfg.max_position_embeddings, d), ("position", "embed"),
                                   dtype=param_dtype, std=0.01)
        self.layers = stacked_blocks(cfg, rngs, param_dtype)
        self.final_norm = Norm(d, cfg, rngs=rngs, param_dtype=param_dtype)
        if lm_head and not cfg.tie_embeddings:
            self.lm_head = param(rngs, (d, cfg.vocab_size), ("embed", "vocab"), dtype=param_dtype)

    def init_cache(self, batch: int, max_len: int, dtype=None) -> KVCache:
        """An empty cache for `batch` sequences of up to `max_len` tokens."""
        cfg = self.cfg
        shape = (cfg.num_layers, batch, cfg.num_kv_heads, max_len, cfg.head_dim)
        dtype = dtype or self.dtype
        return KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
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
        b, t = tokens.shape
        if attention_mask is None:
            attention_mask = segment_ids > 0 if segment_ids is not None else jnp.ones((b, t), bool)
        attention_mask = attention_mask.astype(bool)
        if cache is None:
            if positions is None:
                positions = default_positions(attention_mask, (b, t))
            slots, k_valid, slot = jnp.arange(t), attention_mask, None
        else:
            if segment_ids is not None:
                raise ValueError("segment_ids (packing) is not supported with a KV cache")
            slot = cache.index
            if positions is None:
                positions = cache.next_pos[:, None] + default_positions(attention_mask, (b, t))
            k_valid = jax.lax.dynamic_update_slice_in_dim(cache.valid, attention_mask, slot, axis=1)
            slots = slot + jnp.arange(t)
        tables = layer_tables(self.cfg)
        k_slots = jnp.arange(k_valid.shape[1])
        masks = jnp.stack([make_attention_mask(slots, k_slots, k_valid, w, segment_ids, segment_ids)
                           for w in tables["windows"]])  # [windows, B, T, S]
        x = self.embed_tokens(tokens, positions)
        kv = None if cache is None else (cache.k, cache.v)
        x, kv = self._decoder(x, positions, masks, tables, kv, slot)
        x = self.final_norm(x)
        if cache is None:
            return x, None
        return x, KVCache(k=kv[0], v=kv[1], valid=k_valid, index=slot + t,
                          next_pos=cache.next_pos + attention_mask.sum(-1).astype(jnp.int32))

    def _decoder(self, x, positions, masks, tables, kv, slot):
        """Scan the stacked layers over `x: [B, T, D]`; `kv`: the whole cache `(k, v)` or None."""
        graphdef, state = nnx.split(self.layers)
        wide = upcast(x.dtype)
        inv_freq, scale = jnp.asarray(tables["inv_freq"], wide), jnp.asarray(tables["scale"], wide)
        mask_of = jnp.asarray(tables["mask"], jnp.int32)

        def body(carry, xs):
            x, kv = carry
            layer_state, i = xs
            layer = {"index": i, "inv_freq": inv_freq[i], "scale": scale[i], "slot": slot}
            mask = masks[0] if masks.shape[0] == 1 else masks[mask_of[i]]
            x, kv = nnx.merge(graphdef, layer_state)(x, positions, mask, layer, kv)
            return (x, kv), None

        policy = REMAT_POLICIES[self.remat]
        if self.remat != "none":
            body = jax.checkpoint(body, policy=policy)
        (x, kv), _ = jax.lax.scan(body, (x, kv), (state, jnp.arange(self.cfg.num_layers)))
        return x, kv

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
