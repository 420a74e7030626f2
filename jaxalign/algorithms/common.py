"""What every algorithm needs from a model: per-token log-probs of a batch's response tokens."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxalign.losses import token_logprobs

Array = jax.Array


def model_logits(model, batch: dict, *, prefix: str = "") -> Array:
    """Logits `[B, T, V]` of `{prefix}tokens` with the batch's masks and positions."""
    return model(batch[prefix + "tokens"], positions=batch.get(prefix + "positions"),
                 attention_mask=batch.get(prefix + "attention_mask"),
                 segment_ids=batch.get(prefix + "segment_ids"))


def response_logprobs(model, batch: dict, *, prefix: str = "", temperature: float = 1.0):
    """Teacher-forced log-probs of the tokens under `loss_mask`.

    batch: `{prefix}tokens`, `{prefix}loss_mask` `[B, T]`, and optionally
    `{prefix}attention_mask`, `{prefix}positions`, `{prefix}segment_ids`.
    Logits at position t score token t + 1, so both outputs are `[B, T - 1]`
    aligned with `tokens[:, 1:]`. `temperature` divides the logits, matching
    the distribution a sampler drew from at that temperature.

    Returns: (logps [B, T-1] float32, mask [B, T-1] float32).
    """
    tokens = batch[prefix + "tokens"]
    logits = model_logits(model, batch, prefix=prefix)
    if temperature != 1.0:
        logits = logits / temperature
    logps = token_logprobs(logits[:, :-1], tokens[:, 1:])
    return logps, batch[prefix + "loss_mask"][:, 1:].astype(jnp.float32)


def sequence_logprob(logps: Array, mask: Array) -> Array:
    """Sum of the masked token log-probs: `[B, T] -> [B]`."""
    return jnp.sum(logps * mask, axis=-1)


def entropy_from_logits(logits: Array, mask: Array) -> Array:
    """Mean per-token entropy of the masked positions (a scalar)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    ent = -jnp.sum(jnp.exp(logp) * logp, axis=-1)
    return jnp.sum(ent * mask) / jnp.maximum(jnp.sum(mask), 1.0)
