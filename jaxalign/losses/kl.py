"""Per-token KL estimators and KL-coefficient controllers."""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax.numpy as jnp

Array = jnp.ndarray

# Upper clamp on log r inside k3: exp(20) ≈ 4.9e8 is far from float32's
# overflow at exp(88.7), and a ratio that large already means the penalty is
# meaningless. Beyond it k3 saturates (zero gradient). The lower side needs no
# clamp: exp underflows to 0 and k3 ≈ −1 − log r stays finite.
K3_LOG_RATIO_MAX = 20.0


def _k1(log_r):
    return -log_r


def _k2(log_r):
    return 0.5 * jnp.square(log_r)


def _k3(log_r):
    log_r = jnp.minimum(log_r, K3_LOG_RATIO_MAX)
    return jnp.exp(log_r) - 1.0 - log_r


KL_ESTIMATORS = {"k1": _k1, "k2": _k2, "k3": _k3}


def kl_penalty(logps: Array, ref_logps: Array, *, kind: str = "k3") -> Array:
    """Per-token estimate of KL(π_θ ‖ π_ref) on tokens sampled from π_θ.

    With log r = log π_ref − log π_θ per token (Schulman 2020, "Approximating
    KL divergence", http://joschu.net/blog/kl-approx.html):
      k1 = −log r            (unbiased, can be negative)
      k2 = ½ (log r)²        (biased, low variance)
      k3 = r − 1 − log r     (unbiased, ≥ 0; log r clamped to ≤ 20, see
                              `K3_LOG_RATIO_MAX`)

    Args:
      logps: `[...]` log π_θ of the sampled tokens (e.g. `[batch, time]`).
      ref_logps: same shape, log π_ref of the same tokens.
      kind: one of `KL_ESTIMATORS`.

    Returns:
      The estimate per element, same shape; masking is the caller's job.

    Example:
      >>> logps, ref_logps = jnp.log(jnp.array([0.5])), jnp.log(jnp.array([0.25]))
      >>> kl = kl_penalty(logps, ref_logps, kind="k3")  # r = 0.5: 0.5 − 1 + log 2
      >>> print(kl.shape, f"{kl[0]:.4f}")
      (1,) 0.1931
    """
    if kind not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL kind {kind!r}; valid: {sorted(KL_ESTIMATORS)}")
    return KL_ESTIMATORS[kind](ref_logps - logps)


class KLControllerState(NamedTuple):
    kl_coef: Array  # scalar β_KL to use for the next batch


class KLController(NamedTuple):
    """A pure (init, update) pair, like an optax transformation."""

    init: Callable[[], KLControllerState]
    update: Callable[[KLControllerState, Array, Array], KLControllerState]


def fixed_kl_controller(kl_coef: float) -> KLController:
    """A controller whose coefficient never changes; same interface as the
    adaptive one so a trainer need not branch.

    Example:
      >>> c = fixed_kl_controller(0.05)
      >>> print(c.update(c.init(), 3.0, 256).kl_coef)
      0.05
    """

    def init():
        return KLControllerState(jnp.asarray(kl_coef, jnp.float32))

    def update(state, current_kl, n_steps):
        del current_kl, n_steps
        return state

    return KLController(init, update)


def adaptive_kl_controller(init_kl_coef: float, target: float, horizon: float) -> KLController:
    """Adaptive KL coefficient (Ziegler et al. 2019, "Fine-Tuning Language
    Models from Human Preferences", §2.2).

    e = clip(KL / target − 1, −0.2, 0.2);  β ← β · (1 + e · n_steps / horizon)

    `current_kl` is the measured KL of the last batch, `n_steps` the number of
    samples (or steps) it covered. Both functions are jit-able.

    Example:
      >>> c = adaptive_kl_controller(0.1, target=6.0, horizon=10000)
      >>> print(c.update(c.init(), 12.0, 1000).kl_coef.round(6))  # 0.1 · (1 + 0.2 · 0.1)
      0.102
    """

    def init():
        return KLControllerState(jnp.asarray(init_kl_coef, jnp.float32))

    def update(state, current_kl, n_steps):
        error = jnp.clip(current_kl / target - 1.0, -0.2, 0.2)
        return KLControllerState(state.kl_coef * (1.0 + error * n_steps / horizon))

    return KLController(init, update)
