"""Group-relative RL: advantages over G samples of a prompt, the GRPO / Dr.
GRPO / DAPO losses (one core), dynamic sampling and overlong shaping.

Batches hold the G samples of each prompt contiguously: rows
[g·G, (g+1)·G) belong to prompt g.
"""

from __future__ import annotations

import jax.numpy as jnp

from jaxalign.losses.aggregation import aggregate_parts, finish, masked_mean
from jaxalign.losses.kl import kl_penalty
from jaxalign.losses.ppo import clipped_surrogate
from jaxalign.losses.terms import entropy_bonus, weight_policy_term

Array = jnp.ndarray


def _groups(x: Array, group_size: int) -> Array:
    if group_size < 1 or x.shape[0] % group_size:
        raise ValueError(f"batch {x.shape[0]} is not a multiple of group_size {group_size}")
    return x.reshape(x.shape[0] // group_size, group_size)


def _std(x: Array, axis=None) -> Array:
    return jnp.std(x, axis=axis, ddof=1, keepdims=axis is not None)


# The scale s of each mode; all modes centre on the group mean.
GROUP_SCALES = {
    "group": lambda r, eps: _std(r, axis=-1) + eps,
    "batch": lambda r, eps: _std(r) + eps,
    "none": lambda r, eps: jnp.ones((), r.dtype),
}


def group_advantages(rewards: Array, group_size: int, *, scale: str = "group", eps: float = 1e-6) -> Array:
    """Group-relative advantages, one per sample.

    Â_i = (R_i − mean_g R) / s, where s is
      group: std_g(R) + eps, the sample std (ddof 1) of the prompt's group
             (GRPO, Shao et al. 2024, "DeepSeekMath")
      batch: std(R) + eps over the whole batch (ddof 1)
      none:  1, no division (Dr. GRPO, Liu et al. 2025)

    Args:
      rewards: `[batch]`, the G samples of each prompt contiguous.
      group_size: G ≥ 2 (one sample has no baseline); must divide batch.
      scale: one of `GROUP_SCALES`.
      eps: added to the std.

    Returns:
      `[batch]` advantages; a group of identical rewards gets exactly 0
      (also with eps = 0).

    Example:
      >>> print(group_advantages(jnp.array([1., 0., 5., 5.]), 2).round(4))
      [ 0.7071 -0.7071  0.      0.    ]
    """
    if scale not in GROUP_SCALES:
        raise ValueError(f"unknown scale {scale!r}; valid: {sorted(GROUP_SCALES)}")
    if group_size < 2:
        raise ValueError(f"group_size must be >= 2, got {group_size}")
    r = _groups(rewards, group_size)
    # A group without spread carries no signal: make its advantages exactly 0
    # (the mean of G equal floats need not round back to the value itself).
    no_spread = jnp.max(r, axis=-1, keepdims=True) == jnp.min(r, axis=-1, keepdims=True)
    centred = jnp.where(no_spread, 0.0, r - jnp.mean(r, axis=-1, keepdims=True))
    s = GROUP_SCALES[scale](r, eps)
    return (centred / jnp.where(s > 0, s, 1.0)).reshape(rewards.shape)


def grpo_loss(
    logps: Array,
    old_logps: Array | None,
    ref_logps: Array | None,
    advantages: Array,
    mask: Array,
    *,
    clip_eps_low: float = 0.2,
    clip_eps_high: float | None = None,
    beta: float = 0.04,
    kl: str = "k3",
    agg: str = "seq-mean-token-mean",
    norm_len: float | None = None,
    entropy: Array | None = None,
    entropy_coef: float = 0.0,
    is_weights: Array | None = None,
    return_parts: bool = False,
):
    """GRPO (Shao et al. 2024, "DeepSeekMath"), and by its options Dr. GRPO and DAPO.

    ℓ_t = −[w_t·min(ρÂ, clip(ρ, 1−ε, 1+ε_high)Â) − β·KL_kind(π_θ ‖ π_ref)_t + c·H_t],
    L = agg(ℓ), with w the optional importance weights and c·H the optional
    entropy bonus. GRPO: agg `seq-mean-token-mean`, kl `k3`. Dr. GRPO (Liu et al.
    2025): advantages with `scale="none"`, agg `seq-mean-token-sum-norm`.
    DAPO: see `dapo_loss`.

    Args:
      logps: `[batch, time]` log π_θ of the sampled tokens.
      old_logps: `[batch, time]` log π_old, or None for stop_gradient(logps)
        (one update per rollout).
      ref_logps: `[batch, time]` log π_ref, or None when beta == 0 (it is then
        never read; when given with beta == 0 the KL is only logged).
      advantages: `[batch]` (e.g. `group_advantages`) or `[batch, time]`.
      mask: `[batch, time]` 1 on completion tokens. To drop a sample (overlong
        filtering, dynamic sampling) zero its row: `mask * keep[:, None]`; an
        all-zero row is absent in every `agg` mode.
      clip_eps_low, clip_eps_high: ε_low and ε_high (defaults to ε_low).
      beta: KL weight β ≥ 0.
      kl: estimator name, see `jaxalign.losses.kl.KL_ESTIMATORS`.
      agg, norm_len: reduction, see `jaxalign.losses.aggregation`.
      entropy: optional `[batch, time]` per-token entropy H of π_θ (e.g. from
        `token_logprobs_and_entropy`); logged as `entropy` whenever given.
      entropy_coef: c, the weight of the entropy bonus (a Python float; 0
        leaves the loss bit-identical).
      is_weights: optional `[batch, time]` importance weights w (constants,
        e.g. from `importance_correction`) on the policy-gradient term only.
      return_parts: return `(numerator, denominator)` instead of the scalar.

    Returns:
      `(loss, metrics)`: the `clipped_surrogate` metrics plus `kl` (token mean)
      when `ref_logps` is given and `entropy` when `entropy` is given.

    Example:
      >>> lp = jnp.zeros((2, 3)); m = jnp.ones((2, 3)); a = jnp.array([1., -1.])
      >>> loss, metrics = grpo_loss(lp, lp, lp, a, m)  # ρ = 1, KL = 0: mean of −Â
      >>> print(loss, metrics["kl"])
      0.0 0.0
      >>> h = jnp.full((2, 3), 0.5)  # a bonus of 0.1 · 0.5 lowers the loss by 0.05
      >>> print(f"{grpo_loss(lp, lp, lp, a, m, entropy=h, entropy_coef=0.1)[0]:.4f}")
      -0.0500
    """
    if beta and ref_logps is None:
        raise ValueError("grpo_loss: beta > 0 needs ref_logps")
    clip_eps_high = clip_eps_low if clip_eps_high is None else clip_eps_high
    per_token, metrics = clipped_surrogate(
        logps, old_logps, advantages, mask, clip_eps_low=clip_eps_low, clip_eps_high=clip_eps_high
    )
    per_token = weight_policy_term(per_token, is_weights, mask)
    if ref_logps is not None:
        # Padding may hold garbage log-probs: select before the estimator.
        valid = mask > 0
        per_token_kl = kl_penalty(jnp.where(valid, logps, 0.0), jnp.where(valid, ref_logps, 0.0), kind=kl)
        metrics["kl"] = masked_mean(per_token_kl, mask)
        if beta:
            per_token = per_token + beta * per_token_kl
    per_token = entropy_bonus(per_token, metrics, entropy, mask, entropy_coef)
    return finish(*aggregate_parts(per_token, mask, agg, norm_len=norm_len), return_parts), metrics


def dapo_loss(
    logps: Array,
    old_logps: Array | None,
    advantages: Array,
    mask: Array,
    *,
    clip_eps_low: float = 0.2,
    clip_eps_high: float = 0.28,
    agg: str = "token-mean",
    norm_len: float | None = None,
    return_parts: bool = False,
):
    """DAPO (Yu et al. 2025, "DAPO: An Open-Source LLM Reinforcement Learning
    System at Scale"): GRPO with decoupled clip, token-level mean and no KL.

    L = (1/Σ_i|o_i|) Σ_i Σ_t −min(ρÂ_i, clip(ρ, 1−ε_low, 1+ε_high)Â_i)

    Overlong filtering: zero the mask rows of truncated samples
    (`mask * ~truncated[:, None]`). Soft overlong punishment: add
    `overlong_penalty` to the rewards before `group_advantages`. Dynamic
    sampling: keep groups with `dynamic_sampling_mask` when building the batch.

    Args:
      logps, old_logps, advantages, mask: as in `grpo_loss`.
      clip_eps_low, clip_eps_high: ε_low, ε_high (paper: 0.2, 0.28).
      agg, norm_len, return_parts: as in `grpo_loss`.

    Returns:
      `(loss, metrics)` as in `grpo_loss` (no `kl`).

    Example:
      >>> lp = jnp.zeros((1, 2)); m = jnp.ones((1, 2))
      >>> print(dapo_loss(lp + jnp.log(1.25), lp, jnp.ones(1), m)[0])  # ρ = 1.25 < 1.28
      -1.25
    """
    return grpo_loss(
        logps, old_logps, None, advantages, mask,
        clip_eps_low=clip_eps_low, clip_eps_high=clip_eps_high, beta=0.0,
        agg=agg, norm_len=norm_len, return_parts=return_parts,
    )


def dynamic_sampling_mask(rewards: Array, group_size: int, *, atol: float = 1e-6) -> Array:
    """Which groups carry signal (DAPO dynamic sampling): `[batch // G]` bool,
    True iff the group's rewards are not all equal (max − min > atol). For
    0/1 rewards this is 0 < #correct < G.

    Args:
      rewards: `[batch]`, G samples per prompt contiguous.
      group_size: G.
      atol: float tolerance for "equal".

    Example:
      >>> print(dynamic_sampling_mask(jnp.array([1., 1., 0., 1.]), 2))
      [False  True]
    """
    r = _groups(rewards, group_size)
    return (jnp.max(r, axis=-1) - jnp.min(r, axis=-1)) > atol


def overlong_penalty(lengths: Array, *, max_len: int, cache_len: int) -> Array:
    """DAPO soft overlong punishment, added to the task reward.

    0 if |y| ≤ L_max − L_cache; ((L_max − L_cache) − |y|)/L_cache if
    L_max − L_cache < |y| ≤ L_max; −1 beyond L_max.

    Args:
      lengths: `[batch]` completion lengths |y|.
      max_len: L_max; cache_len: L_cache, 0 < L_cache ≤ L_max.

    Example:
      >>> print(overlong_penalty(jnp.array([10, 18, 20, 21]), max_len=20, cache_len=4))
      [ 0.  -0.5 -1.  -1. ]
    """
    if not 0 < cache_len <= max_len:
        raise ValueError(f"need 0 < cache_len <= max_len, got {cache_len}, {max_len}")
    lengths = jnp.asarray(lengths, jnp.promote_types(jnp.asarray(lengths).dtype, jnp.float32))
    soft_start = max_len - cache_len
    ramp = (soft_start - lengths) / cache_len
    return jnp.where(lengths <= soft_start, 0.0, jnp.where(lengths <= max_len, ramp, -1.0))
