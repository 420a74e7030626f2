"""Next-token log-probabilities (and entropies) and the supervised fine-tuning loss."""

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
      >>> print(token_logprobs(jnp.zeros((1, 1, 4)), jnp.array([[2]])).round(4))  # −log 4
      [[-1.3863]]
    """
    shifted, exp, log_z = _softmax_parts(logits)
    return _picked(shifted, targets) - log_z


def _softmax_parts(logits: Array) -> tuple[Array, Array, Array]:
    """Shifted logits, their exp and the log partition, in float32 or wider."""
    dtype = jnp.promote_types(logits.dtype, jnp.float32)
    logits = logits.astype(dtype)
    # Subtract the max first: exp cannot overflow, and the final difference
    # is between small numbers (logit − logsumexp of raw logits ~1e4 would
    # cancel away float32 digits). The max is a constant of the gradient.
    shifted = logits - jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
    exp = jnp.exp(shifted)
    return shifted, exp, jnp.log(jnp.sum(exp, axis=-1))


def _picked(shifted: Array, targets: Array) -> Array:
    return jnp.take_along_axis(shifted, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]


def token_logprobs_and_entropy(logits: Array, targets: Array) -> tuple[Array, Array]:
    """`token_logprobs` and the entropy of each next-token distribution, from
    one softmax (the entropy bonus of the policy losses costs no extra
    `[batch, time, vocab]` exponential).

    H_t = log Z_t − Σ_v p_v l_v = −Σ_v p_v log p_v, with l the shifted logits.

    Args:
      logits: `[batch, time, vocab]`, aligned with `targets`.
      targets: `[batch, time]` integer token ids.

    Returns:
      `(logps, entropy)`, each `[batch, time]` (float32 for low-precision logits).

    Example:
      >>> logps, entropy = token_logprobs_and_entropy(jnp.zeros((1, 1, 4)), jnp.array([[2]]))
      >>> print(logps.round(4), entropy.round(4))  # uniform over 4: H = log 4
      [[-1.3863]] [[1.3863]]
    """
    shifted, exp, log_z = _softmax_parts(logits)
    # Σ p·l as (Σ e^l·l)/Z: the same exp as the log-probs, no second pass.
    # A −inf logit (a banned token) has p = 0 and adds 0, not 0 · −inf = NaN.
    finite = jnp.where(exp > 0, shifted, 0.0)
    mean_logit = jnp.sum(exp * finite, axis=-1) / jnp.sum(exp, axis=-1)
    return _picked(shifted, targets) - log_z, log_z - mean_logit


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
      >>> print(sft_loss(logits, y, m)[0].round(4))  # log 4
      1.3863
    """
    logps = token_logprobs(logits, targets)
    correct = jnp.argmax(logits, axis=-1) == targets
    return nll_loss(logps, mask, correct=correct, agg=agg, return_parts=return_parts)


def nll_loss(
    logps: Array,
    mask: Array,
    *,
    correct: Array | None = None,
    agg: str = "token-mean",
    return_parts: bool = False,
):
    """`sft_loss` from the target log-probs, for callers that never hold the logits whole
    (`jaxalign.models.logprobs.head_logprobs` computes them chunk by chunk).

    L = agg_t(−logps_t) over the tokens where `mask` is 1.

    Args:
      logps: `[batch, time]` log-probabilities of the demonstration tokens.
      mask: `[batch, time]`, 1 on the tokens to learn.
      correct: `[batch, time]`, 1 where the target is the argmax (for the
        `accuracy` metric; None leaves it out).
      agg: reduction, see `jaxalign.losses.aggregation`.
      return_parts: return `(numerator, denominator)` instead of the scalar.

    Returns:
      `(loss, metrics)`; metrics: `nll` (token mean), `tokens` (count), and
      `accuracy` (token mean) when `correct` is given.

    Example:
      >>> loss, metrics = nll_loss(jnp.log(jnp.array([[0.5, 0.25, 1.0]])), jnp.array([[1, 1, 0]]))
      >>> print(loss.round(4), metrics["tokens"])  # (log 2 + log 4) / 2
      1.0397 2.0
    """
    nll = -logps
    mask = mask.astype(nll.dtype)
    metrics = {"nll": masked_mean(nll, mask), "tokens": jnp.sum(mask)}
    if correct is not None:
        metrics["accuracy"] = masked_mean(correct.astype(nll.dtype), mask)
    return finish(*aggregate_parts(nll, mask, agg), return_parts), metrics
