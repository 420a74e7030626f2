"""Policy losses that reshape PPO's clipped ratio: GSPO clips one ratio per
sequence, CISPO clips the importance weight and keeps every token's gradient."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxalign.losses.aggregation import aggregate_parts, finish, masked_mean, safe_divide
from jaxalign.losses.kl import kl_penalty
from jaxalign.losses.ppo import LOG_RATIO_MAX
from jaxalign.losses.terms import entropy_bonus, weight_policy_term

Array = jnp.ndarray


def _token_log_ratio(logps: Array, old_logps: Array | None, mask: Array) -> Array:
    """log π_θ − log π_old on valid tokens, 0 on padding (selected before any arithmetic)."""
    if old_logps is None:
        old_logps = jax.lax.stop_gradient(logps)
    valid = mask > 0
    return jnp.where(valid, logps, 0.0) - jnp.where(valid, old_logps, 0.0)


def _ratio_metrics(ratio: Array, valid: Array, weight: Array) -> dict:
    """Mean (weighted by `weight`), max and min of `ratio` over `valid` entries."""
    return {
        "ratio_mean": safe_divide(jnp.sum(jnp.where(valid, ratio * weight, 0.0)), jnp.sum(weight)),
        "ratio_max": jnp.max(jnp.where(valid, ratio, -jnp.inf)),
        "ratio_min": jnp.min(jnp.where(valid, ratio, jnp.inf)),
    }


def gspo_loss(
    logps: Array,
    old_logps: Array | None,
    advantages: Array,
    mask: Array,
    *,
    clip_eps_low: float = 3e-4,
    clip_eps_high: float = 4e-4,
    entropy: Array | None = None,
    entropy_coef: float = 0.0,
    is_weights: Array | None = None,
    return_parts: bool = False,
):
    """GSPO (Zheng et al. 2025, "Group Sequence Policy Optimization").

    One importance ratio per sequence, the geometric mean of the token ratios,
    so that the clip acts on what the reward judged (the whole answer):
      s_i = exp((1/|y_i|) Σ_t m_t (log π_θ − log π_old)_t)
      ℓ_i = −min(s_i Â_i, clip(s_i, 1−ε_low, 1+ε_high) Â_i)
      L = mean of ℓ_i over the rows that have any mask.
    The ε are small because s_i is a per-token average (paper: 3e-4, 4e-4).
    An entropy bonus subtracts entropy_coef · (row token mean of H) per row.

    Args:
      logps: `[batch, time]` log π_θ of the sampled tokens.
      old_logps: `[batch, time]` log π_old, or None for stop_gradient(logps).
      advantages: `[batch]`, one per sequence (e.g. `group_advantages`).
      mask: `[batch, time]` 1 on completion tokens (any value > 0 counts as
        one token of |y_i|); an all-zero row is absent.
      clip_eps_low, clip_eps_high: ε_low, ε_high of the sequence ratio.
      entropy: optional `[batch, time]` per-token entropy of π_θ (logged).
      entropy_coef: weight of the entropy bonus (Python float).
      is_weights: optional `[batch, time]` importance weights (constants); the
        row's masked token mean weights its ℓ_i (pass a row-constant array for
        sequence-level weights).
      return_parts: return `(Σ_i ℓ_i, #present rows)` instead of the mean.

    Returns:
      `(loss, metrics)`; metrics over present rows: `clip_frac_low` (Â < 0 and
      s < 1−ε_low), `clip_frac_high` (Â > 0 and s > 1+ε_high), `ratio_mean`,
      `ratio_max`, `ratio_min` (of s_i); `approx_kl` (token mean of k3 of
      KL(π_old ‖ π_θ)); `entropy` when given.

    Example:
      >>> lp = jnp.zeros((2, 3)); m = jnp.array([[1, 1, 1], [1, 0, 0]])
      >>> loss, metrics = gspo_loss(lp + 0.1, lp, jnp.array([1.0, -1.0]), m)
      >>> print(f"{loss:.4f}", metrics["clip_frac_high"])  # (−1.0004 + e^0.1) / 2
      0.0524 0.5
    """
    if advantages.ndim != 1:
        raise ValueError(f"gspo_loss: advantages must be [batch] (one per sequence), got shape {advantages.shape}")
    log_ratio = _token_log_ratio(logps, old_logps, mask)
    count = jnp.sum(jnp.where(mask > 0, 1.0, 0.0).astype(log_ratio.dtype), axis=-1)  # |y_i|
    present = count > 0
    presentf = present.astype(log_ratio.dtype)

    def row_mean(per_token):  # (1/|y_i|) Σ_t over valid tokens; 0 for an empty row
        return jnp.sum(per_token, axis=-1) / jnp.where(present, count, 1.0)

    # The geometric mean of the token ratios: a per-token average of log ρ.
    ratio = jnp.exp(jnp.clip(row_mean(log_ratio), -LOG_RATIO_MAX, LOG_RATIO_MAX))
    adv = jnp.where(present, advantages, 0.0)

    per_row = jnp.maximum(-adv * ratio, -adv * jnp.clip(ratio, 1.0 - clip_eps_low, 1.0 + clip_eps_high))
    if is_weights is not None:
        per_row = per_row * row_mean(weight_policy_term(jnp.ones_like(log_ratio), is_weights, mask))

    dtype = per_row.dtype
    rows = jnp.sum(presentf)
    metrics = {
        "clip_frac_low": safe_divide(jnp.sum(presentf * ((adv < 0) & (ratio < 1.0 - clip_eps_low))), rows),
        "clip_frac_high": safe_divide(jnp.sum(presentf * ((adv > 0) & (ratio > 1.0 + clip_eps_high))), rows),
        **_ratio_metrics(ratio, present, presentf),
        "approx_kl": masked_mean(kl_penalty(jnp.zeros_like(log_ratio), log_ratio, kind="k3"), mask),
    }
    # The entropy bonus as a per-token term whose row token-mean is subtracted
    # from the row loss (the `seq-mean-token-mean` of H).
    bonus = entropy_bonus(jnp.zeros_like(log_ratio), metrics, entropy, mask, entropy_coef)
    if entropy_coef:
        per_row = per_row + row_mean(bonus)
    per_row = jnp.where(present, per_row, 0.0).astype(dtype)
    return finish(jnp.sum(per_row), rows, return_parts), metrics


def cispo_loss(
    logps: Array,
    old_logps: Array | None,
    advantages: Array,
    mask: Array,
    *,
    eps_low: float | None = None,
    eps_high: float = 0.28,
    agg: str = "token-mean",
    norm_len: float | None = None,
    entropy: Array | None = None,
    entropy_coef: float = 0.0,
    is_weights: Array | None = None,
    return_parts: bool = False,
):
    """CISPO (MiniMax 2025, "MiniMax-M1: Scaling Test-Time Compute Efficiently
    with Lightning Attention", §3.1).

    PPO's clip zeroes the gradient of tokens whose ratio left the trust
    region, which drops rare high-ratio tokens (often the "reflection" tokens
    of long reasoning). CISPO clips the importance weight instead, as a
    constant, so every token keeps a REINFORCE gradient:
      ρ_t = π_θ/π_old,  w_t = sg(clip(ρ_t, 1−ε_low, 1+ε_high))
      ℓ_t = −w_t · Â · log π_θ(y_t),  L = agg(ℓ)
    `eps_low=None` means no lower bound (the paper's setting).

    Args:
      logps: `[batch, time]` log π_θ of the sampled tokens.
      old_logps: `[batch, time]` log π_old, or None for stop_gradient(logps).
      advantages: `[batch]` (one per sequence) or `[batch, time]`.
      mask: `[batch, time]` 1 on completion tokens.
      eps_low, eps_high: ε_low (or None) and ε_high of the weight clip.
      agg, norm_len: reduction, see `jaxalign.losses.aggregation`.
      entropy, entropy_coef: optional entropy bonus, as in `grpo_loss`.
      is_weights: optional `[batch, time]` importance weights (constants).
      return_parts: return `(numerator, denominator)` instead of the scalar.

    Returns:
      `(loss, metrics)`; token means over `mask`: `clip_frac_low` (ρ < 1−ε_low),
      `clip_frac_high` (ρ > 1+ε_high), whatever the sign of Â, `ratio_mean`,
      `approx_kl`; `ratio_max`, `ratio_min`; `entropy` when given.

    Example:
      >>> old = jnp.log(jnp.full((1, 2), 0.25)); m = jnp.ones((1, 2))
      >>> loss, metrics = cispo_loss(old + jnp.log(2.0), old, jnp.ones(1), m)
      >>> print(f"{loss:.4f}", metrics["clip_frac_high"])  # ρ = 2: −1.28 · log 0.5
      0.8872 1.0
    """
    valid = mask > 0
    log_ratio = jnp.clip(_token_log_ratio(logps, old_logps, mask), -LOG_RATIO_MAX, LOG_RATIO_MAX)
    ratio = jnp.exp(log_ratio)
    low = 0.0 if eps_low is None else 1.0 - eps_low
    weight = jax.lax.stop_gradient(jnp.clip(ratio, low, 1.0 + eps_high))
    if advantages.ndim == logps.ndim - 1:
        advantages = advantages[..., None]  # one advantage per sequence
    advantages = jnp.where(valid, jnp.broadcast_to(advantages, logps.shape), 0.0)
    per_token = -weight * advantages * jnp.where(valid, logps, 0.0)
    per_token = weight_policy_term(per_token, is_weights, mask)

    dtype = per_token.dtype
    metrics = {
        "clip_frac_low": masked_mean((ratio < low).astype(dtype), mask),
        "clip_frac_high": masked_mean((ratio > 1.0 + eps_high).astype(dtype), mask),
        **_ratio_metrics(ratio, valid, jnp.where(valid, mask, 0).astype(dtype)),
        "approx_kl": masked_mean(kl_penalty(jnp.zeros_like(log_ratio), log_ratio, kind="k3"), mask),
    }
    per_token = entropy_bonus(per_token, metrics, entropy, mask, entropy_coef)
    per_token = jnp.where(valid, per_token, 0.0)
    return finish(*aggregate_parts(per_token, mask, agg, norm_len=norm_len), return_parts), metrics
