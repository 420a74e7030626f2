"""PPO: the clipped policy objective (shared with GRPO/DAPO), the clipped
value loss, GAE and masked whitening."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxalign.losses.aggregation import aggregate_parts, finish, masked_mean
from jaxalign.losses.kl import kl_penalty
from jaxalign.losses.terms import entropy_bonus, weight_policy_term

Array = jnp.ndarray

# |log ρ| is clamped here before exp so a wildly off-policy token cannot
# overflow float32 (exp(88.7)); ρ ∈ [e^-20, e^20] leaves every realistic
# clipping decision unchanged.
LOG_RATIO_MAX = 20.0


def clipped_surrogate(
    logps: Array,
    old_logps: Array | None,
    advantages: Array,
    mask: Array,
    *,
    clip_eps_low: float,
    clip_eps_high: float,
    dual_clip: float | None = None,
):
    """Per-token clipped policy loss and its metrics (the core of PPO, GRPO, DAPO).

    ρ = exp(log π_θ − log π_old);  ℓ = −min(ρA, clip(ρ, 1−ε_low, 1+ε_high)A);
    with dual clip c (Ye et al. 2020, "Mastering Complex Control in MOBA
    Games with Deep RL"), for A < 0: ℓ = min(ℓ, −cA).

    `old_logps=None` means the tokens were sampled by this very policy
    (one update per rollout): π_old = stop_gradient(π_θ), so ρ = 1 with the
    policy-gradient derivative.

    Returns `(per_token_loss [batch, time], metrics)`. Metrics are token means
    over `mask` whatever the aggregation of the loss: `clip_frac_low` (A < 0 and
    ρ < 1−ε_low: the lower clip is what the min picked), `clip_frac_high`
    (A > 0 and ρ > 1+ε_high), `dual_clip_frac` (A < 0 and ρ > c, when set),
    `approx_kl` (k3 estimate of KL(π_old ‖ π_θ): ρ − 1 − log ρ, unbiased and
    ≥ 0 on tokens sampled from π_old), `ratio_mean`, `ratio_max`, `ratio_min`.

    Example:
      >>> lp = jnp.log(jnp.array([[2.0, 0.5]])); m = jnp.ones((1, 2))
      >>> per_token, metrics = clipped_surrogate(lp, jnp.zeros((1, 2)), jnp.array([[1.0, -1.0]]), m,
      ...                                        clip_eps_low=0.2, clip_eps_high=0.2)
      >>> print(per_token, metrics["clip_frac_high"], metrics["clip_frac_low"])  # 1.2 and 0.8 bind
      [[-1.2  0.8]] 0.5 0.5
    """
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
    if old_logps is None:
        old_logps = jax.lax.stop_gradient(logps)
    if advantages.ndim == logps.ndim - 1:
        advantages = advantages[..., None]  # one advantage per sequence
    valid = mask > 0
    # Select real tokens *before* any arithmetic: padding may hold garbage
    # (−inf log-probs, NaN), and a where after the fact still lets 0 · NaN
    # into the gradient.
    advantages = jnp.where(valid, jnp.broadcast_to(advantages, logps.shape), 0.0)
    log_ratio = jnp.where(valid, logps - old_logps, 0.0)
    log_ratio = jnp.clip(log_ratio, -LOG_RATIO_MAX, LOG_RATIO_MAX)
    ratio = jnp.exp(log_ratio)

    unclipped = -advantages * ratio
    clipped = -advantages * jnp.clip(ratio, 1.0 - clip_eps_low, 1.0 + clip_eps_high)
    per_token = jnp.maximum(unclipped, clipped)
    if dual_clip is not None:
        per_token = jnp.where(advantages < 0, jnp.minimum(per_token, -dual_clip * advantages), per_token)

    dtype = per_token.dtype
    metrics = {
        "clip_frac_low": masked_mean(((advantages < 0) & (ratio < 1.0 - clip_eps_low)).astype(dtype), mask),
        "clip_frac_high": masked_mean(((advantages > 0) & (ratio > 1.0 + clip_eps_high)).astype(dtype), mask),
        "approx_kl": masked_mean(kl_penalty(jnp.zeros_like(log_ratio), log_ratio, kind="k3"), mask),
        "ratio_mean": masked_mean(ratio, mask),
        "ratio_max": jnp.max(jnp.where(valid, ratio, -jnp.inf)),
        "ratio_min": jnp.min(jnp.where(valid, ratio, jnp.inf)),
    }
    if dual_clip is not None:
        metrics["dual_clip_frac"] = masked_mean(((advantages < 0) & (ratio > dual_clip)).astype(dtype), mask)
    return jnp.where(valid, per_token, 0.0), metrics


def ppo_policy_loss(
    logps: Array,
    old_logps: Array | None,
    advantages: Array,
    mask: Array,
    *,
    clip_eps_low: float = 0.2,
    clip_eps_high: float | None = None,
    dual_clip: float | None = None,
    agg: str = "token-mean",
    norm_len: float | None = None,
    entropy: Array | None = None,
    entropy_coef: float = 0.0,
    is_weights: Array | None = None,
    return_parts: bool = False,
):
    """PPO clipped policy loss (Schulman et al. 2017, "Proximal Policy
    Optimization Algorithms").

    L = agg(−min(ρA, clip(ρ, 1−ε, 1+ε_high)A)), ρ = π_θ/π_old per token;
    ε_high defaults to ε; optional dual clip c > 1 bounds the loss of A < 0
    tokens by −cA (see `clipped_surrogate`). Optional importance weights w
    multiply the per-token term (w·ℓ_t) and an entropy bonus subtracts
    c·agg(H), as in `grpo_loss`.

    Args:
      logps: `[batch, time]` log π_θ of the sampled tokens.
      old_logps: `[batch, time]` log π_old (the sampler), or None for
        stop_gradient(logps).
      advantages: `[batch, time]`, or `[batch]` (one per sequence, broadcast).
      mask: `[batch, time]` 1 on response tokens.
      clip_eps_low, clip_eps_high: ε_low and ε_high (defaults to ε_low).
      dual_clip: c, or None.
      agg, norm_len: reduction, see `jaxalign.losses.aggregation`.
      entropy, entropy_coef, is_weights: as in `grpo_loss`.
      return_parts: return `(numerator, denominator)` instead of the scalar.

    Returns:
      `(loss, metrics)`, metrics as in `clipped_surrogate`, plus `entropy`
      when `entropy` is given.

    Example:
      >>> lp = jnp.log(jnp.full((1, 2), 0.5)); m = jnp.ones((1, 2))
      >>> loss, metrics = ppo_policy_loss(lp + jnp.log(2.0), lp, jnp.ones(1), m)
      >>> print(loss, metrics["clip_frac_high"])  # ρ = 2 clipped to 1.2
      -1.2 1.0
    """
    clip_eps_high = clip_eps_low if clip_eps_high is None else clip_eps_high
    per_token, metrics = clipped_surrogate(
        logps, old_logps, advantages, mask,
        clip_eps_low=clip_eps_low, clip_eps_high=clip_eps_high, dual_clip=dual_clip,
    )
    per_token = weight_policy_term(per_token, is_weights, mask)
    per_token = entropy_bonus(per_token, metrics, entropy, mask, entropy_coef)
    return finish(*aggregate_parts(per_token, mask, agg, norm_len=norm_len), return_parts), metrics


def ppo_value_loss(
    values: Array,
    old_values: Array,
    returns: Array,
    mask: Array,
    *,
    clip: float | None = 0.2,
    agg: str = "token-mean",
    norm_len: float | None = None,
    return_parts: bool = False,
):
    """Clipped value loss (as in the PPO2 baselines code and Ziegler et al. 2019).

    ℓ = ½ max((V − R)², (V_old + clip(V − V_old, −ε_v, ε_v) − R)²);
    `clip=None` gives the plain ½(V − R)².

    Args:
      values: `[batch, time]` V from the current critic.
      old_values: `[batch, time]` V at rollout time.
      returns: `[batch, time]` targets R (e.g. from `gae`).
      mask: `[batch, time]`.
      clip: ε_v, or None.
      agg, norm_len, return_parts: as in `ppo_policy_loss`.

    Returns:
      `(loss, metrics)`; metrics: `value_clip_frac` (the clipped term is the
      larger one), `explained_variance` (1 − Var[R − V]/Var[R], masked),
      `value_mean`, `returns_mean`.

    Example:
      >>> v = jnp.zeros((1, 1)); r = jnp.ones((1, 1)); m = jnp.ones((1, 1))
      >>> print(ppo_value_loss(v, v, r, m)[0])  # ½ (0 − 1)²
      0.5
    """
    valid = mask > 0
    # Padding may hold garbage; select first so no NaN reaches the gradient.
    values, old_values, returns = (jnp.where(valid, x, 0.0) for x in (values, old_values, returns))
    unclipped = jnp.square(values - returns)
    if clip is None:
        per_token = unclipped
        clip_frac = jnp.zeros((), unclipped.dtype)
    else:
        clipped_values = old_values + jnp.clip(values - old_values, -clip, clip)
        clipped = jnp.square(clipped_values - returns)
        per_token = jnp.maximum(unclipped, clipped)
        clip_frac = masked_mean((clipped > unclipped).astype(unclipped.dtype), mask)
    per_token = jnp.where(valid, 0.5 * per_token, 0.0)

    returns_mean = masked_mean(returns, mask)
    residual = returns - values
    residual_mean = masked_mean(residual, mask)
    var_returns = masked_mean(jnp.square(returns - returns_mean), mask)
    var_residual = masked_mean(jnp.square(residual - residual_mean), mask)
    metrics = {
        "value_clip_frac": clip_frac,
        "explained_variance": 1.0 - var_residual / jnp.maximum(var_returns, 1e-8),
        "value_mean": masked_mean(values, mask),
        "returns_mean": returns_mean,
    }
    return finish(*aggregate_parts(per_token, mask, agg, norm_len=norm_len), return_parts), metrics


def gae(rewards: Array, values: Array, mask: Array, *, gamma: float, lam: float):
    """Generalized Advantage Estimation (Schulman et al. 2016, "High-Dimensional
    Continuous Control Using GAE"), scanned backwards over time.

    δ_t = r_t + γ V_{t+1} − V_t,  A_t = δ_t + γλ A_{t+1},  R_t = A_t + V_t,
    with V and A beyond the last valid token equal to 0 (the episode ends).

    Masked positions are skipped, not treated as episode ends: the recursion
    links each valid token to the *next valid* token, one γ per valid step.
    For right-padded sequences this is the usual GAE; for masked spans inside
    a sequence (e.g. tool output in a multi-turn rollout) the span is
    transparent. Rewards/values at masked positions are never read, and
    advantages and returns there are 0.

    Args:
      rewards: `[batch, time]` per-token rewards (e.g. −β_KL·k1 plus the
        reward-model score on the last token).
      values: `[batch, time]` critic values V_t.
      mask: `[batch, time]` 1 on response tokens.
      gamma, lam: γ and λ.

    Returns:
      `(advantages, returns)`, each `[batch, time]`. Not meant to be
      differentiated: apply them as constants (they come from the rollout).

    Example:
      >>> r = jnp.array([[0., 1.]]); v = jnp.zeros((1, 2)); m = jnp.ones((1, 2))
      >>> print(gae(r, v, m, gamma=1.0, lam=1.0)[0])
      [[1. 1.]]
    """
    valid = mask > 0
    rewards = jnp.where(valid, rewards, 0.0)
    values = jnp.where(valid, values, 0.0)

    def step(carry, xs):
        next_value, next_adv = carry
        r, v, ok = xs
        adv = r + gamma * next_value - v + gamma * lam * next_adv
        carry = (jnp.where(ok, v, next_value), jnp.where(ok, adv, next_adv))
        return carry, jnp.where(ok, adv, 0.0)

    zeros = jnp.zeros(rewards.shape[:-1], rewards.dtype)
    time_major = lambda x: jnp.moveaxis(x, -1, 0)  # noqa: E731
    _, adv = jax.lax.scan(
        step, (zeros, zeros), (time_major(rewards), time_major(values), time_major(valid)), reverse=True
    )
    advantages = jnp.moveaxis(adv, 0, -1)
    return advantages, jnp.where(valid, advantages + values, 0.0)


def whiten(x: Array, mask: Array, *, shift_mean: bool = True, eps: float = 1e-8) -> Array:
    """Masked normalisation to zero mean and unit variance.

    y = (x − μ)/sqrt(σ² + eps), μ and σ² (population variance, ddof 0) over
    the tokens where `mask` is 1; `shift_mean=False` adds μ back (scale only,
    as for rewards). Masked positions are 0.

    Args:
      x: `[batch, time]`; mask: `[batch, time]`.

    Example:
      >>> print(whiten(jnp.array([[1., 3., 9.]]), jnp.array([[1, 1, 0]])).round(4))
      [[-1.  1.  0.]]
    """
    mean = masked_mean(x, mask)
    var = masked_mean(jnp.square(x - mean), mask)
    y = (x - mean) * jax.lax.rsqrt(var + eps)
    if not shift_mean:
        y = y + mean
    return jnp.where(mask > 0, y, 0.0)
