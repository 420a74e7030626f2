"""Scalar heads on a decoder backbone: PPO value model and Bradley–Terry reward model."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxalign.models.layers import param
from jaxalign.models.transformer import Transformer

Array = jax.Array


class ValueModel(nnx.Module):
    """A backbone with a linear scalar head: `values[b, t]` for every token.

    `init="zeros"` (value head; Ziegler et al. 2019 / "The N implementation
    details of RLHF with PPO" start the critic at zero so the first advantages
    are the rewards themselves) or `init="reward"` (normal with std
    1/sqrt(D + 1), as OpenAI's lm-human-preferences initialises reward heads).
    """

    def __init__(self, backbone: Transformer, *, rngs: nnx.Rngs | None = None, init: str = "zeros"):
        d = backbone.cfg.hidden_size
        self.backbone = backbone
        if init == "zeros":
            self.head = param(None, (d, 1), ("embed", "value"), init="zeros", dtype=backbone.embed[...].dtype)
        elif init == "reward":
            rngs = rngs or nnx.Rngs(0)
            self.head = param(rngs, (d, 1), ("embed", "value"), std=1.0 / math.sqrt(d + 1),
                              dtype=backbone.embed[...].dtype)
        else:
            raise ValueError(f"init must be 'zeros' or 'reward', got {init!r}")

    @property
    def cfg(self):
        return self.backbone.cfg

    def __call__(self, tokens: Array, positions: Array | None = None, attention_mask: Array | None = None,
                 segment_ids: Array | None = None) -> Array:
        """tokens: [B, T] -> values: [B, T] (float32)."""
        h, _ = self.backbone.hidden_states(tokens, positions, attention_mask, segment_ids)
        return jnp.einsum("btd,do->bto", h.astype(jnp.float32), self.head[...].astype(jnp.float32))[..., 0]


def with_value_head(backbone: Transformer, *, init: str = "zeros", rngs: nnx.Rngs | None = None) -> ValueModel:
    """Wrap a language model's backbone with a scalar head (its LM head is unused)."""
    return ValueModel(backbone, rngs=rngs, init=init)


def last_token_scores(values: Array, attention_mask: Array) -> Array:
    """Score of each sequence: the value at its last real token.

    values: [B, T]; attention_mask: [B, T] (right or left padding) -> [B].
    Matches Hugging Face `*ForSequenceClassification` pooling (rightmost
    non-padding token).
    """
    t = values.shape[1]
    last = jnp.max(jnp.where(attention_mask.astype(bool), jnp.arange(t), -1), axis=1)
    return jnp.take_along_axis(values, jnp.maximum(last, 0)[:, None], axis=1)[:, 0]
