"""Rollout/trainer mismatch: importance-sampling corrections for tokens drawn
by a sampler whose log-probs differ from the trainer's.

The sampler (a KV-cached decode, maybe in bf16) and the trainer's forward pass
over the same tokens are different programs, so π_sampler ≠ π_old even for
the same weights, and the PPO ratio π_θ/π_old is then off-policy by the
factor π_old/π_sampler. The corrections, chosen by name (`IS_CORRECTIONS`),
with C = `is_cap` ≥ 1 and δ_t = log π_old − log π_sampler:

| is_correction | per-token weight           | mask                                      |
|---------------|----------------------------|-------------------------------------------|
| `none`        | 1                          | unchanged                                 |
| `tis`         | min(exp(δ_t), C)           | unchanged                                 |
| `mis`         | 1                          | 0 where exp(δ_t) ∉ [1/C, C]               |

Truncated IS (TIS) keeps every token with a bounded weight; masked IS (MIS)
drops the tokens the two programs disagree on most. With
`is_level="sequence"` the ratio is the sequence's, exp(Σ_t m_t δ_t): TIS puts
the row's truncated weight on each of its tokens, MIS drops the whole row.
References: Yao et al. 2025, "Your Efficient RL Framework Secretly Brings You
Off-Policy RL Training" (TIS); Liu et al. 2025, "When Speed Kills Stability"
(masked / sequence-level variants).
"""

from __future__ import annotations

import jax.numpy as jnp

from jaxalign.losses.aggregation import masked_mean
from jaxalign.losses.kl import kl_penalty
from jaxalign.losses.ppo import LOG_RATIO_MAX

Array = jnp.ndarray

IS_LEVELS = ("token", "sequence")


def _log_ratio(old_logps: Array, sampler_logps: Array, mask: Array, is_level: str) -> Array:
    """δ per token, or the row's Σ_t m δ broadcast over the row; 0 on padding."""
    if is_level not in IS_LEVELS:
        raise ValueError(f"unknown is_level {is_level!r}; valid: {list(IS_LEVELS)}")
    valid = mask > 0
    # Select before subtracting: padding may hold −inf in both arrays.
    delta = jnp.where(valid, old_logps, 0.0) - jnp.where(valid, sampler_logps, 0.0)
    if is_level == "sequence":
        delta = jnp.broadcast_to(jnp.sum(delta, axis=-1, keepdims=True), delta.shape)
    return jnp.clip(delta, -LOG_RATIO_MAX, LOG_RATIO_MAX)


def _check_cap(is_cap: float) -> None:
    if not is_cap >= 1.0:
        raise ValueError(f"is_cap must be >= 1 (weights and the band [1/C, C] are around 1), got {is_cap}")


def tis_weights(
    old_logps: Array, sampler_logps: Array, mask: Array, *, is_cap: float, is_level: str = "token"
) -> Array:
    """Truncated importance weights min(π_old/π_sampler, C), `[batch, time]`.

    Args:
      old_logps: `[batch, time]` the trainer's log π_old of the sampled tokens.
      sampler_logps: `[batch, time]` the sampler's log-probs of the same tokens.
      mask: `[batch, time]` 1 on completion tokens.
      is_cap: C ≥ 1.
      is_level: `token` (one weight per token) or `sequence` (the row's).

    Returns:
      Weights (0 on padding); exactly 1 where the two log-probs are equal.

    Example:
      >>> old = jnp.log(jnp.array([[0.5, 0.5, 0.9]])); m = jnp.array([[1, 1, 0]])
      >>> print(tis_weights(old, jnp.log(jnp.array([[0.5, 0.1, 0.3]])), m, is_cap=2.0))
      [[1. 2. 0.]]
    """
    _check_cap(is_cap)
    ratio = jnp.exp(_log_ratio(old_logps, sampler_logps, mask, is_level))
    return jnp.where(mask > 0, jnp.minimum(ratio, is_cap), 0.0)


def mis_mask(
    old_logps: Array, sampler_logps: Array, mask: Array, *, is_cap: float, is_level: str = "token"
) -> Array:
    """`mask` with 0 where π_old/π_sampler leaves [1/C, C] (the token, or its whole row).

    Args: as in `tis_weights`.

    Returns:
      `[batch, time]` in `mask`'s dtype.

    Example:
      >>> old = jnp.log(jnp.array([[0.5, 0.5], [0.5, 0.5]])); m = jnp.ones((2, 2))
      >>> sampler = jnp.log(jnp.array([[0.5, 0.1], [0.4, 0.4]]))
      >>> print(mis_mask(old, sampler, m, is_cap=2.0))
      [[1. 0.]
       [1. 1.]]
      >>> print(mis_mask(old, sampler, m, is_cap=2.0, is_level="sequence"))  # 5 and 25/16
      [[0. 0.]
       [1. 1.]]
    """
    _check_cap(is_cap)
    log_ratio = _log_ratio(old_logps, sampler_logps, mask, is_level)
    # Compare in log space: the band is symmetric there, [−log C, log C].
    inside = jnp.abs(log_ratio) <= jnp.log(jnp.asarray(is_cap, log_ratio.dtype))
    return jnp.where(inside, mask, jnp.zeros_like(mask))


def mismatch_metrics(old_logps: Array, sampler_logps: Array, mask: Array) -> dict:
    """How far the sampler's log-probs are from the trainer's, over `mask`.

    `mismatch_abs_max`, `mismatch_abs_mean`: max and token mean of
    |log π_old − log π_sampler|; `mismatch_kl_k3`: token mean of k3 with
    r = π_old/π_sampler, r − 1 − log r, an unbiased estimate of
    KL(π_sampler ‖ π_old) on tokens the sampler drew (Schulman 2020).

    Example:
      >>> old = jnp.log(jnp.array([[0.5, 0.5]])); m = jnp.array([[1, 0]])
      >>> metrics = mismatch_metrics(old, jnp.log(jnp.array([[0.25, 0.1]])), m)
      >>> print(metrics["mismatch_abs_max"].round(4), metrics["mismatch_kl_k3"].round(4))
      0.6931 0.3069
    """
    valid = mask > 0
    delta = _log_ratio(old_logps, sampler_logps, mask, "token")
    abs_delta = jnp.abs(delta)
    return {
        "mismatch_abs_max": jnp.max(jnp.where(valid, abs_delta, 0.0)),
        "mismatch_abs_mean": masked_mean(abs_delta, mask),
        "mismatch_kl_k3": masked_mean(kl_penalty(jnp.zeros_like(delta), delta, kind="k3"), mask),
    }


def _none(old_logps, sampler_logps, mask, is_cap, is_level):
    return jnp.where(mask > 0, 1.0, 0.0).astype(old_logps.dtype), mask


def _tis(old_logps, sampler_logps, mask, is_cap, is_level):
    return tis_weights(old_logps, sampler_logps, mask, is_cap=is_cap, is_level=is_level), mask


def _mis(old_logps, sampler_logps, mask, is_cap, is_level):
    new_mask = mis_mask(old_logps, sampler_logps, mask, is_cap=is_cap, is_level=is_level)
    return _none(old_logps, sampler_logps, new_mask, is_cap, is_level)[0], new_mask


IS_CORRECTIONS = {"none": _none, "tis": _tis, "mis": _mis}


def importance_correction(
    old_logps: Array,
    sampler_logps: Array,
    mask: Array,
    *,
    is_correction: str = "none",
    is_cap: float = 2.0,
    is_level: str = "token",
):
    """Weights and mask that correct a policy loss for the sampler/trainer mismatch.

    Pass the weights as `is_weights=` and the mask as `mask=` to the policy
    loss (`grpo_loss`, `ppo_policy_loss`, `gspo_loss`, `cispo_loss`). See the
    module docstring for the table of `is_correction` names.

    Args:
      old_logps, sampler_logps, mask: `[batch, time]`, as in `tis_weights`.
      is_correction: one of `IS_CORRECTIONS`.
      is_cap: C ≥ 1 (also checked for `none`, so a bad config fails early).
      is_level: `token` or `sequence`.

    Returns:
      `(is_weights, mask, metrics)`: weights `[batch, time]` (1 on kept
      tokens for `none`/`mis`, 0 on padding), the mask to train on, and
      `mismatch_metrics` plus `is_weight_mean` (token mean over the returned
      mask) and `is_masked_frac` (fraction of the input mask's tokens dropped).

    Example:
      >>> lp = jnp.log(jnp.array([[0.5, 0.25]])); m = jnp.ones((1, 2))
      >>> w, kept, metrics = importance_correction(lp, lp, m, is_correction="tis")
      >>> print(w, kept, metrics["mismatch_abs_max"])
      [[1. 1.]] [[1. 1.]] 0.0
    """
    if is_correction not in IS_CORRECTIONS:
        raise ValueError(f"unknown is_correction {is_correction!r}; valid: {sorted(IS_CORRECTIONS)}")
    _check_cap(is_cap)
    weights, new_mask = IS_CORRECTIONS[is_correction](old_logps, sampler_logps, mask, is_cap, is_level)
    dtype = weights.dtype
    metrics = mismatch_metrics(old_logps, sampler_logps, mask)
    metrics["is_weight_mean"] = masked_mean(weights, new_mask)
    dropped = jnp.where((mask > 0) & ~(new_mask > 0), 1.0, 0.0).astype(dtype)
    metrics["is_masked_frac"] = masked_mean(dropped, mask)
    return weights, new_mask, metrics
