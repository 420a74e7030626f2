"""Where the mean is taken: per-token losses reduced to a scalar by name.

Every mode is a (numerator, denominator) pair. The denominator never depends
on the parameters (only on the mask), so a trainer that sums numerators and
denominators over micro-batches and divides once at the end gets exactly the
full-batch loss and gradient:

    loss_full = sum_k num_k / sum_k den_k

Modes (m is the 0/1 mask, x the per-token loss, rows are sequences):

| agg                       | numerator                    | denominator         |
|---------------------------|------------------------------|---------------------|
| `token-mean`              | sum_it m x                   | sum_it m            |
| `seq-mean-token-mean`     | sum_i (sum_t m x / sum_t m)  | #rows with a token  |
| `seq-mean-token-sum`      | sum_i sum_t m x              | #rows with a token  |
| `seq-mean-token-sum-norm` | sum_i sum_t m x / norm_len   | #rows with a token  |

A row whose mask is all zero is *absent*: it adds nothing to any numerator or
denominator, in every mode. So zeroing a row's mask is the same as slicing the
row out, which is how sample dropping (DAPO overlong filtering, dynamic
sampling) composes with every mode.

`seq-mean-token-sum-norm` is Dr. GRPO's constant normaliser (Liu et al. 2025,
"Understanding R1-Zero-Like Training"): `norm_len` defaults to the padded
length `mask.shape[-1]`; micro-batches must then share that padded length (or
pass the same `norm_len`) for accumulation to stay exact.
"""

from __future__ import annotations

import jax.numpy as jnp

Array = jnp.ndarray


def _row_parts(per_token: Array, mask: Array) -> tuple[Array, Array, Array]:
    """Per-row masked sum, per-row token count, and whether the row is present."""
    per_token = jnp.asarray(per_token)
    mask = jnp.asarray(mask).astype(per_token.dtype)
    # `where`, not a product: padding may hold inf/NaN, and 0 * NaN = NaN.
    row_sum = jnp.sum(jnp.where(mask > 0, per_token * mask, 0), axis=-1)
    row_count = jnp.sum(mask, axis=-1)
    present = (row_count > 0).astype(per_token.dtype)
    return row_sum, row_count, present


def _token_mean(per_token, mask, norm_len):
    row_sum, row_count, _ = _row_parts(per_token, mask)
    return jnp.sum(row_sum), jnp.sum(row_count)


def _seq_mean_token_mean(per_token, mask, norm_len):
    row_sum, row_count, present = _row_parts(per_token, mask)
    row_mean = safe_divide(row_sum, row_count)
    return jnp.sum(row_mean * present), jnp.sum(present)


def _seq_mean_token_sum(per_token, mask, norm_len):
    row_sum, _, present = _row_parts(per_token, mask)
    return jnp.sum(row_sum), jnp.sum(present)


def _seq_mean_token_sum_norm(per_token, mask, norm_len):
    row_sum, _, present = _row_parts(per_token, mask)
    norm_len = mask.shape[-1] if norm_len is None else norm_len
    return jnp.sum(row_sum) / norm_len, jnp.sum(present)


AGGREGATIONS = {
    "token-mean": _token_mean,
    "seq-mean-token-mean": _seq_mean_token_mean,
    "seq-mean-token-sum": _seq_mean_token_sum,
    "seq-mean-token-sum-norm": _seq_mean_token_sum_norm,
}


def aggregate_parts(
    per_token: Array, mask: Array, agg: str = "token-mean", *, norm_len: float | None = None
) -> tuple[Array, Array]:
    """Numerator and denominator of the `agg` reduction of a per-token loss.

    Args:
      per_token: `[batch, time]` per-token values.
      mask: `[batch, time]`, 1 for tokens that count, 0 for padding (bool or
        float 0/1).
      agg: one of `AGGREGATIONS` (see the module docstring for the formulas).
      norm_len: constant length of `seq-mean-token-sum-norm`; defaults to
        `mask.shape[-1]`. Ignored by the other modes.

    Returns:
      `(numerator, denominator)`, scalars; the loss is `numerator / denominator`.

    Example:
      >>> x = jnp.array([[1., 2., 3.], [4., 0., 0.]])
      >>> m = jnp.array([[1, 1, 1], [1, 0, 0]])
      >>> print(*aggregate_parts(x, m, "token-mean"))
      10.0 4.0
      >>> print(*aggregate_parts(x, m, "seq-mean-token-mean"))  # mean 2 and mean 4
      6.0 2.0
    """
    if agg not in AGGREGATIONS:
        raise ValueError(f"unknown agg {agg!r}; valid: {sorted(AGGREGATIONS)}")
    return AGGREGATIONS[agg](per_token, mask, norm_len)


def safe_divide(numerator: Array, denominator: Array) -> Array:
    """`numerator / denominator`, and 0 when nothing counted (denominator 0).

    Denominators are sums of mask values, so they are ≥ 0; with fractional
    (soft) masks they can lie in (0, 1) and are divided by as they are. The
    stand-in 1 for a zero denominator keeps the unused branch, and so the
    gradient, finite.

    Example:
      >>> print(safe_divide(jnp.array(1.0), jnp.array(0.25)), safe_divide(jnp.array(0.0), jnp.array(0.0)))
      4.0 0.0
    """
    has_any = denominator > 0
    return jnp.where(has_any, numerator / jnp.where(has_any, denominator, 1), 0.0)


def aggregate(
    per_token: Array, mask: Array, agg: str = "token-mean", *, norm_len: float | None = None
) -> Array:
    """The `agg` reduction of `per_token: [batch, time]` under `mask: [batch, time]`.

    Equals `numerator / denominator` of `aggregate_parts` (0 for an all-masked
    batch).

    Example:
      >>> x = jnp.array([[1., 2., 3.], [4., 0., 0.]]); m = jnp.array([[1, 1, 1], [1, 0, 0]])
      >>> print(aggregate(x, m, "token-mean"), aggregate(x, m, "seq-mean-token-sum"))
      2.5 5.0
    """
    return safe_divide(*aggregate_parts(per_token, mask, agg, norm_len=norm_len))


def masked_mean(x: Array, mask: Array) -> Array:
    """Token mean of `x` over `mask` (both `[batch, time]`); used for metrics.

    Example:
      >>> print(masked_mean(jnp.array([[1.0, 2.0, jnp.nan]]), jnp.array([[1, 1, 0]])))
      1.5
    """
    return aggregate(x, mask, "token-mean")


def finish(numerator: Array, denominator: Array, return_parts: bool):
    """What a loss returns: the scalar, or the pair for exact accumulation."""
    if return_parts:
        return numerator, denominator
    return safe_divide(numerator, denominator)
