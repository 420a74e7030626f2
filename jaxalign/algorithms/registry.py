"""The names an on-policy config picks from: advantage estimators and policy losses.

A new estimator or loss is one decorated function; the driver
(`jaxalign.algorithms.onpolicy`) looks it up by the config's `advantage` /
`policy_loss` field. docs/algorithms.md, "Add an algorithm", has an example.

| advantage    | Â                                                                  | per token |
|--------------|--------------------------------------------------------------------|-----------|
| group        | (R − mean_group R) / std_group R (GRPO)                            | no        |
| none         | R − mean_group R (Dr. GRPO: no std division)                       | no        |
| rloo         | R_i − mean_{j≠i} R_j within the group (RLOO)                       | no        |
| reinforce_pp | (R − mean) / std over the batch; with the KL in the reward, the    | yes       |
|              | whitened per-token return Σ_{s≥t} r_s (REINFORCE++)                 |           |
| gae          | GAE over the critic's values of r_t = −β·KL_t + [t = last]·R (PPO) | yes       |

| policy_loss | loss                                      | function                       |
|-------------|-------------------------------------------|--------------------------------|
| ppo_clip    | clipped token ratio (+ β·KL in the loss)  | `jaxalign.losses.grpo_loss`    |
| gspo        | clipped sequence ratio                    | `jaxalign.losses.gspo_loss`    |
| cispo       | clipped, stop-gradient token IS weight    | `jaxalign.losses.cispo_loss`   |
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import numpy as np

from jaxalign.losses import (
    cispo_loss,
    gae,
    group_advantages,
    grpo_loss,
    gspo_loss,
    reinforce_pp_advantages,
    rloo_advantages,
    whiten,
)

ADVANTAGE_ESTIMATORS: dict[str, Callable] = {}
POLICY_LOSSES: dict[str, Callable] = {}


@dataclasses.dataclass(frozen=True)
class AdvantageInputs:
    """What an estimator may read, NumPy arrays over the rollout's R real rows (N completion columns).

    rewards: `[R]` scores after the reward shapers. mask: `[R, N]` 1 on
    completion tokens. group_size: G (rows come in groups of G samples of one
    prompt). beta: the current KL weight. token_kl: `[R, N]` per-token KL to
    the reference (zero off the mask) when the config puts it in the reward,
    else None. values: `[R, N]` the critic's values, for estimators that
    train one, else None.
    """

    rewards: np.ndarray
    mask: np.ndarray
    group_size: int
    beta: float = 0.0
    token_kl: np.ndarray | None = None
    values: np.ndarray | None = None


def register_advantage_estimator(name: str, *, per_token: bool = False):
    """Decorator: `fn(inputs: AdvantageInputs, cfg) -> advantages` becomes `advantage=name`.

    The advantages are `[R]` (one per sequence) or, with `per_token=True`,
    `[R, N]`. An estimator for a critic (`cfg.uses_critic`) returns
    `(advantages, returns)`.
    """

    def register(fn):
        fn.per_token = per_token
        ADVANTAGE_ESTIMATORS[name] = fn
        return fn

    return register


def register_policy_loss(name: str):
    """Decorator: `fn(logps, batch, cfg, entropy) -> ((numerator, denominator), metrics)` becomes
    `policy_loss=name`.

    logps, entropy: `[R, N]` of the completion tokens under the trained
    policy. batch: `old_logps`, `mask`, `advantages` (`[R]` or `[R, N]`), and
    `ref_logps` when the loss carries the KL, `is_weights` with `tis`.
    """

    def register(fn):
        POLICY_LOSSES[name] = fn
        return fn

    return register


def per_token(name: str) -> bool:
    """Whether the estimator `name` gives one advantage per token (`[R, N]`) rather than per sequence."""
    return getattr(ADVANTAGE_ESTIMATORS[name], "per_token", False)


# Each a single compiled program (eager jnp ops would compile one small program per op and shape).
_group = jax.jit(group_advantages, static_argnums=1, static_argnames=("scale", "eps"))
_rloo = jax.jit(rloo_advantages, static_argnums=1)
_reinforce_pp = jax.jit(reinforce_pp_advantages, static_argnums=1)


@functools.partial(jax.jit, static_argnames=("gamma", "lam", "whiten_advantages"))
def _gae(rewards, values, mask, gamma: float, lam: float, whiten_advantages: bool):
    adv, returns = gae(rewards, values, mask, gamma=gamma, lam=lam)
    return (whiten(adv, mask) if whiten_advantages else adv), returns


def token_rewards(x: AdvantageInputs, scores: np.ndarray) -> np.ndarray:
    """Per-token rewards `[R, N]`: −β·KL_t, plus the score on each row's last completion token."""
    rewards = np.zeros(x.mask.shape, np.float32) if x.token_kl is None else -x.beta * x.token_kl
    last = x.mask.shape[1] - 1 - np.argmax(x.mask[:, ::-1] > 0, axis=1)
    rewards[np.arange(len(last)), last] += scores
    return rewards.astype(np.float32)


@register_advantage_estimator("group")
def group(x: AdvantageInputs, cfg) -> np.ndarray:
    return np.asarray(_group(x.rewards, x.group_size, scale="group"))


@register_advantage_estimator("none")
def no_std(x: AdvantageInputs, cfg) -> np.ndarray:
    return np.asarray(_group(x.rewards, x.group_size, scale="none"))


@register_advantage_estimator("rloo")
def rloo(x: AdvantageInputs, cfg) -> np.ndarray:
    return np.asarray(_rloo(x.rewards, x.group_size))


@register_advantage_estimator("reinforce_pp", per_token=True)
def reinforce_pp(x: AdvantageInputs, cfg) -> np.ndarray:
    """REINFORCE++ (Hu 2025); with G > 1 its baseline form (centred within each group first)."""
    g = x.group_size if x.group_size > 1 else None
    if x.token_kl is None:
        adv = np.asarray(_reinforce_pp(x.rewards, g))
        return np.broadcast_to(adv[:, None], x.mask.shape).astype(np.float32)
    scores = x.rewards - (np.repeat(x.rewards.reshape(-1, g).mean(1), g) if g else 0.0)
    # Returns-to-go of the per-token rewards (γ = 1), whitened over the batch's tokens.
    adv, _ = _gae(token_rewards(x, scores.astype(np.float32)), np.zeros_like(x.mask), x.mask,
                  gamma=1.0, lam=1.0, whiten_advantages=True)
    return np.asarray(adv)


@register_advantage_estimator("gae", per_token=True)
def generalized(x: AdvantageInputs, cfg) -> tuple[np.ndarray, np.ndarray]:
    if x.values is None:
        raise ValueError("advantage 'gae' needs the critic's values")
    adv, returns = _gae(token_rewards(x, x.rewards), x.values, x.mask, gamma=cfg.gamma, lam=cfg.lam,
                        whiten_advantages=cfg.whiten_advantages)
    return np.asarray(adv) * x.mask, np.asarray(returns)


@register_policy_loss("ppo_clip")
def ppo_clip(logps, batch, cfg, entropy):
    return grpo_loss(logps, batch["old_logps"], batch.get("ref_logps"), batch["advantages"], batch["mask"],
                     clip_eps_low=cfg.clip_eps_low, clip_eps_high=cfg.clip_eps_high,
                     beta=0.0 if cfg.kl_in_reward else cfg.beta, kl=cfg.kl, agg=cfg.agg, entropy=entropy,
                     entropy_coef=cfg.entropy_coef, is_weights=batch.get("is_weights"), return_parts=True)


@register_policy_loss("gspo")
def gspo(logps, batch, cfg, entropy):
    return gspo_loss(logps, batch["old_logps"], batch["advantages"], batch["mask"], clip_eps_low=cfg.clip_eps_low,
                     clip_eps_high=cfg.clip_eps_low if cfg.clip_eps_high is None else cfg.clip_eps_high,
                     entropy=entropy, entropy_coef=cfg.entropy_coef, is_weights=batch.get("is_weights"),
                     return_parts=True)


@register_policy_loss("cispo")
def cispo(logps, batch, cfg, entropy):
    return cispo_loss(logps, batch["old_logps"], batch["advantages"], batch["mask"], eps_low=cfg.clip_eps_low,
                      eps_high=cfg.clip_eps_high, agg=cfg.agg, entropy=entropy, entropy_coef=cfg.entropy_coef,
                      is_weights=batch.get("is_weights"), return_parts=True)
