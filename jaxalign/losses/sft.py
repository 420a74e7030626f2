"""Next-token log-probabilities and the supervised fine-tuning loss."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxalign.losses.aggregation import aggregate_parts, finish, masked_mean

Array = jnp.ndarray


def token_logprobs(logits: Array, targets: Array) -> Array:
    """Log-probability of each target token under its logits.

    log p(y_t) = logits[t, y_t] − logsumexp(logits[t, :])

    Args:
      logits: `[batch, time, vocab]`; `logits[:, t]` is the distribution of
        `targets[:, t]` (shifting inputs against targets is the caller's job).
      targets: `[batch, time]` integer token ids.

    Returns:
      `[batch, time]` log-probabilities, float32 for low-precision logits
      (bf16/f16 are upcast before the logsumexp; float64 stays float64).

    Example:
      >>> token_logprobs(jnp.zeros((1, 1, 4)), jnp.array([[2]]))  # [[-log 4]]
    """
    dtype = jnp.promote_types(logits.dtype, jnp.float32)
    logits = logits.astype(dtype)
    # Subtract the max first: exp cannot overflow, and the final difference
    # is between small numbers (logit − logsumexp of raw logits ~1e4 would
    # cancel away float32 digits). The max is a constant of the gradient.
    shifted = logits - jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
    picked = jnp.take_along_axis(shifted, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return picked - jnp.log(jnp.sum(jnp.exp(shifted), axis=-1))


def sft_loss(
    logits: Array,
    targets: Array,
    mask: Array,
    *,
    agg: str = "token-mean",
    return_parts: bool = False,
):
    """Negative log-likelihood of demonstration tokens.

    L = agg_t(−log p(y_t)) over the tokens where `mask` is 1; `token-mean` is
    the usual cross-entropy (Σ m·nll / Σ m).

    Args:
      logits: `[batch, time, vocab]`, aligned with `targets` (see
        `token_logprobs`).
      targets: `[batch, time]` token ids.
      mask: `[batch, time]`, 1 on the tokens to learn (typically the answer).
      agg: reduction, see `jaxalign.losses.aggregation`.
      return_parts: return `(numerator, denominator)` instead of the scalar.

    Returns:
      `(loss, metrics)`; metrics: `nll` (token mean), `accuracy` (argmax equals
      target, token mean), `tokens` (count).

    Example:
      >>> logits = jnp.zeros((1, 2, 4)); y = jnp.array([[1, 3]]); m = jnp.ones((1, 2))
      >>> sft_loss(logits, y, m)[0]  # log 4
    """
    nll = -token_logprobs(logits, targets)
    mask = mask.astype(nll.dtype)
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(nll.dtype)
    metrics = {
        "nll": masked_mean(nll, mask),
        "accuracy": masked_mean(correct, mask),
        "tokens": jnp.sum(mask),
    }
    return finish(*aggregate_parts(nll, mask, agg), return_parts), metrics
