"""The sampling distribution: temperature, then top-k, then top-p (nucleus).

The sampler draws from `sampling_logprobs(logits, ...)` and reports the
log-probability of each drawn token under that same distribution. A trainer
that wants the behaviour policy's log-probs (pi_old) recomputes them with the
same function on teacher-forced logits, so sampler and trainer agree to
float32 rounding.

Conventions (the order is that of Hugging Face's and vLLM's samplers):
- temperature: logits / temperature (> 0).
- top_k: keep tokens whose tempered logit is >= the k-th largest (ties at the
  boundary are all kept).
- top_p: on the distribution left after top-k, keep the smallest prefix of
  tokens, in decreasing probability, whose mass reaches p; the most likely
  token is always kept (so a tiny p is greedy).
Tokens outside the kept set get log-probability -inf.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def sampling_logprobs(logits: Array, *, temperature: float | Array = 1.0, top_k: int | Array | None = None,
                      top_p: float | Array | None = None) -> Array:
    """Log-probs `[..., V]` of the distribution sampled from (-inf outside the kept set).

    logits: [..., V] raw model logits. `top_k` and `top_p` may be traced
    scalars (one compiled function serves every value); `None` skips the
    filter, and its sort, entirely.

    >>> sampling_logprobs(jnp.log(jnp.array([0.5, 0.3, 0.2])), top_p=0.7)  # keeps 0.5, 0.3: log(5/8), log(3/8)
    Array([-0.47000366, -0.9808293 ,        -inf], dtype=float32)
    """
    x = logits.astype(jnp.float32) / jnp.asarray(temperature, jnp.float32)
    if top_k is None and top_p is None:
        return jax.nn.log_softmax(x, axis=-1)
    vocab = x.shape[-1]
    desc = -jnp.sort(-x, axis=-1)  # [..., V] largest first
    rank = jnp.arange(vocab)
    if top_k is not None:
        k = jnp.clip(jnp.asarray(top_k, jnp.int32), 1, vocab)
        desc = jnp.where(rank < k, desc, -jnp.inf)
    if top_p is not None:
        probs = jax.nn.softmax(desc, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        # Rank 0 is kept whatever p is: its mass_before is exactly 0.
        desc = jnp.where((mass_before < top_p) | (rank == 0), desc, -jnp.inf)
    kept = jnp.sum(desc > -jnp.inf, axis=-1, keepdims=True)  # >= 1
    threshold = jnp.take_along_axis(desc, kept - 1, axis=-1)  # smallest kept logit
    return jax.nn.log_softmax(jnp.where(x >= threshold, x, -jnp.inf), axis=-1)


def token_logprobs(logprobs: Array, tokens: Array) -> Array:
    """Pick `logprobs: [..., V]` at `tokens: [...]` -> `[...]`."""
    return jnp.take_along_axis(logprobs, tokens[..., None].astype(jnp.int32), axis=-1)[..., 0]


def argmax_first(x: Array) -> Array:
    """`jnp.argmax(x, axis=-1)`, bit for bit, as two plain reductions: `[..., V]` -> `[...]` int32.

    The first index of the largest value; a NaN counts as the largest, as in
    `jnp.argmax`. XLA:CPU lowers `argmax` to one reduction over (value, index)
    pairs, which it does not vectorise; two plain reductions it does
    (measured in docs/sampling.md, Randomness).
    """
    largest = jnp.max(x, axis=-1, keepdims=True)
    index = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
    hit = (x == largest) | jnp.isnan(x)
    return jnp.min(jnp.where(hit, index, x.shape[-1]), axis=-1)


def sample_categorical(key: Array, logits: Array) -> Array:
    """`jax.random.categorical(key, logits, axis=-1)`, bit for bit: `[..., V]` -> `[...]` int32.

    The same Gumbel noise (`jax.random.gumbel(key, logits.shape, logits.dtype)`)
    plus the logits, then `argmax_first`. jax's own version fuses the noise
    into its (value, index) reduction, which XLA:CPU runs serially
    (docs/sampling.md, Randomness).
    """
    return argmax_first(jax.random.gumbel(key, logits.shape, logits.dtype) + logits)


__all__ = ["argmax_first", "sample_categorical", "sampling_logprobs", "token_logprobs"]
