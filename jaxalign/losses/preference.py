"""Pairwise preference losses: Bradley–Terry, DPO and variants, SimPO, ORPO.

All take per-pair arrays `[batch]` (a sequence's summed log-probability is
`(token_logprobs(...) * mask).sum(-1)`) and reduce by the mean over pairs,
kept as a (sum, count) pair so `return_parts=True` accumulates exactly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxalign.losses.aggregation import finish

Array = jnp.ndarray


def _mean(x: Array) -> Array:
    return jnp.mean(x.astype(jnp.promote_types(x.dtype, jnp.float32)))


def _pair_mean(per_pair: Array, return_parts: bool):
    return finish(jnp.sum(per_pair), jnp.asarray(per_pair.shape[0], per_pair.dtype), return_parts)


def bradley_terry_loss(
    chosen_rewards: Array,
    rejected_rewards: Array,
    *,
    margin: Array | float | None = None,
    return_parts: bool = False,
):
    """Reward-model loss on preference pairs (Bradley & Terry 1952; as used by
    Ouyang et al. 2022, InstructGPT; the margin as in Llama 2, Touvron et al. 2023).

    L = mean(−log σ(r_w − r_l − margin))

    Args:
      chosen_rewards: `[batch]` scalar rewards r(x, y_w).
      rejected_rewards: `[batch]` r(x, y_l).
      margin: optional `[batch]` or scalar required gap; None means 0.
      return_parts: return `(sum, count)` instead of the mean.

    Returns:
      `(loss, metrics)`; metrics: `accuracy` (r_w > r_l), `margin` (mean r_w − r_l),
      `chosen_reward`, `rejected_reward` (means).

    Example:
      >>> print(bradley_terry_loss(jnp.array([0.0]), jnp.array([0.0]))[0].round(4))  # log 2
      0.6931
    """
    diff = chosen_rewards - rejected_rewards
    shifted = diff if margin is None else diff - margin
    metrics = {
        "accuracy": _mean(diff > 0),
        "margin": _mean(diff),
        "chosen_reward": _mean(chosen_rewards),
        "rejected_reward": _mean(rejected_rewards),
    }
    return _pair_mean(-jax.nn.log_sigmoid(shifted), return_parts), metrics


# DPO per-pair losses as functions of h, the raw log-ratio margin
# (log π_w − log π_ref,w) − (log π_l − log π_ref,l); z = β·h. Keeping h rather
# than z lets IPO use its own scale 1/(2β) with β entering once.
def _dpo_sigmoid(h, beta, eps):
    z = beta * h
    return (1.0 - eps) * -jax.nn.log_sigmoid(z) + eps * -jax.nn.log_sigmoid(-z)


def _dpo_robust(h, beta, eps):
    z = beta * h
    return ((1.0 - eps) * -jax.nn.log_sigmoid(z) - eps * -jax.nn.log_sigmoid(-z)) / (1.0 - 2.0 * eps)


def _dpo_ipo(h, beta, eps):
    return jnp.square(h - 1.0 / (2.0 * beta))


def _dpo_hinge(h, beta, eps):
    return jax.nn.relu(1.0 - beta * h)


DPO_LOSSES = {
    "sigmoid": _dpo_sigmoid,
    "robust": _dpo_robust,
    "ipo": _dpo_ipo,
    "hinge": _dpo_hinge,
}
# label_smoothing means something only for these; elsewhere it is refused
# rather than silently ignored.
_SMOOTHED = ("sigmoid", "robust")


def dpo_loss(
    policy_chosen_logps: Array,
    policy_rejected_logps: Array,
    ref_chosen_logps: Array,
    ref_rejected_logps: Array,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_nll: Array | None = None,
    rpo_alpha: float = 0.0,
    return_parts: bool = False,
):
    """Direct Preference Optimization (Rafailov et al. 2023) and variants.

    z = β[(log π(y_w) − log π_ref(y_w)) − (log π(y_l) − log π_ref(y_l))], per pair:
      sigmoid: −log σ(z); with ε = label_smoothing > 0 this is cDPO
               (Mitchell 2023): (1−ε)(−log σ(z)) + ε(−log σ(−z))
      robust:  [(1−ε)(−log σ(z)) − ε(−log σ(−z))] / (1−2ε), ε < 0.5
               (Chowdhury et al. 2024, "Provably Robust DPO")
      ipo:     (z/β − 1/(2β))² (Azar et al. 2023, "A General Theoretical
               Paradigm..."); z/β is the raw log-ratio margin, so β enters once
      hinge:   max(0, 1 − z) (SLiC, Zhao et al. 2023)
    RPO (Pang et al. 2024, "Iterative Reasoning Preference Optimization"):
    with `rpo_alpha` α > 0 the loss adds α·mean(chosen_nll).

    Args:
      policy_chosen_logps, policy_rejected_logps: `[batch]` summed log π_θ of
        the chosen / rejected answers.
      ref_chosen_logps, ref_rejected_logps: `[batch]` the same under π_ref.
      beta: β > 0, the KL strength.
      loss_type: one of `DPO_LOSSES`.
      label_smoothing: ε, the assumed label-flip rate (sigmoid, robust only).
      chosen_nll: `[batch]` NLL of each chosen answer, length-normalised as in
        Pang et al. (e.g. `-policy_chosen_logps / chosen_lengths`). Required
        when `rpo_alpha > 0`; otherwise, if given, it is only logged.
      rpo_alpha: α, the weight of the NLL term.
      return_parts: return `(sum, count)` over pairs instead of the mean.

    Returns:
      `(loss, metrics)`; metrics: `chosen_reward`, `rejected_reward` (means of
      the implicit rewards β(log π − log π_ref)), `reward_accuracy` (chosen >
      rejected), `reward_margin`, `preference_loss` (without the NLL term), and
      `chosen_nll` when given.

    Example:
      >>> zero = jnp.zeros(2)
      >>> print(dpo_loss(zero, zero, zero, zero, beta=0.1)[0].round(4))  # z = 0: log 2
      0.6931
    """
    if loss_type not in DPO_LOSSES:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; valid: {sorted(DPO_LOSSES)}")
    if isinstance(beta, (int, float)) and beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if label_smoothing and loss_type not in _SMOOTHED:
        raise ValueError(f"label_smoothing applies to {_SMOOTHED} only, not {loss_type!r}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if rpo_alpha and chosen_nll is None:
        raise ValueError("rpo_alpha > 0 needs chosen_nll")

    chosen_logratio = policy_chosen_logps - ref_chosen_logps
    rejected_logratio = policy_rejected_logps - ref_rejected_logps
    per_pair = DPO_LOSSES[loss_type](chosen_logratio - rejected_logratio, beta, label_smoothing)

    chosen_reward = beta * chosen_logratio
    rejected_reward = beta * rejected_logratio
    metrics = {
        "chosen_reward": _mean(chosen_reward),
        "rejected_reward": _mean(rejected_reward),
        "reward_accuracy": _mean(chosen_reward > rejected_reward),
        "reward_margin": _mean(chosen_reward - rejected_reward),
        "preference_loss": _mean(per_pair),
    }
    if chosen_nll is not None:
        metrics["chosen_nll"] = _mean(chosen_nll)
        if rpo_alpha:
            per_pair = per_pair + rpo_alpha * chosen_nll
    return _pair_mean(per_pair, return_parts), metrics


def simpo_loss(
    policy_chosen_logps: Array,
    policy_rejected_logps: Array,
    chosen_lengths: Array,
    rejected_lengths: Array,
    *,
    beta: float = 2.0,
    gamma: float = 0.5,
    return_parts: bool = False,
):
    """SimPO (Meng et al. 2024, "Simple Preference Optimization with a
    Reference-Free Reward"): length-normalised reward with a target margin.

    L = mean(−log σ(β/|y_w| · log π(y_w) − β/|y_l| · log π(y_l) − γ))

    `gamma` is the absolute margin γ of the paper's formula, in reward units
    (the authors' configs often give the ratio γ/β instead: γ = ratio · β).

    Args:
      policy_chosen_logps, policy_rejected_logps: `[batch]` summed log π_θ.
      chosen_lengths, rejected_lengths: `[batch]` answer token counts |y|.
      beta, gamma: β and γ above.
      return_parts: return `(sum, count)` over pairs instead of the mean.

    Returns:
      `(loss, metrics)`; metrics: `chosen_reward`, `rejected_reward` (means of
      β·log π/|y|), `reward_accuracy`, `reward_margin`.

    Example:
      >>> one = jnp.ones(1)
      >>> print(simpo_loss(-one, -one, one, one, beta=2.0, gamma=0.0)[0].round(4))  # log 2
      0.6931
    """
    chosen_reward = beta * policy_chosen_logps / chosen_lengths
    rejected_reward = beta * policy_rejected_logps / rejected_lengths
    per_pair = -jax.nn.log_sigmoid(chosen_reward - rejected_reward - gamma)
    metrics = {
        "chosen_reward": _mean(chosen_reward),
        "rejected_reward": _mean(rejected_reward),
        "reward_accuracy": _mean(chosen_reward > rejected_reward),
        "reward_margin": _mean(chosen_reward - rejected_reward),
    }
    return _pair_mean(per_pair, return_parts), metrics


def log_odds(avg_logp: Array) -> Array:
    """log(p / (1 − p)) from log p, stably: log p − log(1 − exp(log p)).

    log(1 − e^a) uses log(−expm1(a)) near a = 0 and log1p(−e^a) below
    −log 2 (Mächler 2012, "Accurately Computing log(1 − exp(−|a|))"). `a` is
    clamped to ≤ −eps of its dtype so p = 1 gives large finite odds, not inf.

    Example:
      >>> print(log_odds(jnp.log(jnp.array([0.5, 0.8]))).round(4))  # log 1, log 4
      [0.     1.3863]
    """
    a = jnp.minimum(avg_logp, -jnp.finfo(avg_logp.dtype).eps)
    near_zero = a > -jnp.log(2.0)
    # Each branch gets a harmless stand-in where it is not selected, so its
    # gradient cannot be inf there (and 0 · inf would poison the where).
    log1mexp = jnp.where(
        near_zero,
        jnp.log(-jnp.expm1(jnp.where(near_zero, a, -1.0))),
        jnp.log1p(-jnp.exp(jnp.where(near_zero, -1.0, a))),
    )
    return a - log1mexp


def orpo_loss(
    policy_chosen_logps: Array,
    policy_rejected_logps: Array,
    chosen_lengths: Array,
    rejected_lengths: Array,
    chosen_nll: Array,
    *,
    lam: float = 0.1,
    return_parts: bool = False,
):
    """ORPO (Hong et al. 2024, "ORPO: Monolithic Preference Optimization
    without Reference Model"): SFT NLL plus an odds-ratio preference term.

    a = log π(y)/|y| (length-normalised), log odds(y) = a − log(1 − e^a)
    L = mean(nll_w + λ · (−log σ(log odds(y_w) − log odds(y_l))))

    Args:
      policy_chosen_logps, policy_rejected_logps: `[batch]` summed log π_θ.
      chosen_lengths, rejected_lengths: `[batch]` answer token counts |y|.
      chosen_nll: `[batch]` the SFT term per pair, typically the token-mean
        NLL of the chosen answer, `-policy_chosen_logps / chosen_lengths`.
      lam: λ, the weight of the odds-ratio term.
      return_parts: return `(sum, count)` over pairs instead of the mean.

    Returns:
      `(loss, metrics)`; metrics: `nll`, `or_loss` (the odds-ratio term before
      λ), `log_odds_ratio`, `accuracy` (log odds ratio > 0), all means.

    Example:
      >>> a = jnp.log(jnp.array([0.5]))  # odds 1 for both answers
      >>> print(orpo_loss(a, a, jnp.ones(1), jnp.ones(1), -a, lam=1.0)[0].round(4))  # 2 log 2
      1.3863
    """
    ratio = log_odds(policy_chosen_logps / chosen_lengths) - log_odds(
        policy_rejected_logps / rejected_lengths
    )
    or_loss = -jax.nn.log_sigmoid(ratio)
    metrics = {
        "nll": _mean(chosen_nll),
        "or_loss": _mean(or_loss),
        "log_odds_ratio": _mean(ratio),
        "accuracy": _mean(ratio > 0),
    }
    return _pair_mean(chosen_nll + lam * or_loss, return_parts), metrics
