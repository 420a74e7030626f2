"""Per-token terms that every policy loss adds the same way: importance
weights on the policy-gradient term and the entropy bonus.

Both act on the per-token loss before the `agg` reduction. Every reduction is
linear in the per-token values for a fixed mask, so agg(ℓ − c·H) equals
agg(ℓ) − c·agg(H) and the `(numerator, denominator)` accumulation stays exact.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxalign.losses.aggregation import masked_mean

Array = jnp.ndarray


def weight_policy_term(per_token: Array, is_weights: Array | None, mask: Array) -> Array:
    """`per_token · sg(is_weights)` on valid tokens; unchanged when `is_weights` is None.

    The weights correct for tokens drawn by another program than the one that
    computed `old_logps` (see `jaxalign.losses.importance`); they are data, so
    no gradient flows into them.

    Example:
      >>> per_token = jnp.array([[1.0, 2.0, 3.0]]); m = jnp.array([[1, 1, 0]])
      >>> print(weight_policy_term(per_token, jnp.array([[0.5, 2.0, 9.0]]), m))
      [[0.5 4.  0. ]]
    """
    if is_weights is None:
        return per_token
    weights = jnp.where(mask > 0, jax.lax.stop_gradient(is_weights), 0.0)
    return per_token * weights


def entropy_bonus(
    per_token: Array, metrics: dict, entropy: Array | None, mask: Array, entropy_coef: float
) -> Array:
    """`per_token − entropy_coef · H` on valid tokens, and `metrics["entropy"]`.

    The entropy is logged (token mean over `mask`) whenever it is given, so a
    run can watch it collapse before deciding on a bonus. `entropy_coef` is a
    Python number: 0 leaves `per_token` untouched (bit for bit).

    Example:
      >>> metrics = {}; m = jnp.array([[1, 1, 0]])
      >>> h = jnp.array([[1.0, 3.0, jnp.nan]])  # padding may hold garbage
      >>> print(entropy_bonus(jnp.zeros((1, 3)), metrics, h, m, 0.1), metrics["entropy"])
      [[-0.1 -0.3  0. ]] 2.0
    """
    if entropy is None:
        if entropy_coef:
            raise ValueError(f"entropy_coef={entropy_coef} needs the per-token entropy array")
        return per_token
    # Padding may hold garbage: select before it meets the loss or the metric.
    entropy = jnp.where(mask > 0, entropy, 0.0)
    metrics["entropy"] = masked_mean(entropy, mask)
    if entropy_coef:
        per_token = per_token - entropy_coef * entropy
    return per_token
