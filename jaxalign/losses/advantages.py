"""Sequence-level advantage estimators beyond GRPO's group z-score: RLOO's
leave-one-out baseline and REINFORCE++'s batch normalisation.

Batches hold the G samples of each prompt contiguously, as in
`jaxalign.losses.group`.
"""

from __future__ import annotations

import jax.numpy as jnp

from jaxalign.losses.group import _groups

Array = jnp.ndarray


def _centred_in_groups(rewards: Array, group_size: int) -> Array:
    """R − mean_g R per group; exactly 0 in a group whose rewards are all equal
    (the mean of G equal floats need not round back to the value)."""
    r = _groups(rewards, group_size)
    no_spread = jnp.max(r, axis=-1, keepdims=True) == jnp.min(r, axis=-1, keepdims=True)
    return jnp.where(no_spread, 0.0, r - jnp.mean(r, axis=-1, keepdims=True)).reshape(rewards.shape)


def rloo_advantages(rewards: Array, group_size: int) -> Array:
    """REINFORCE leave-one-out advantages (Ahmadian et al. 2024, "Back to
    Basics: Revisiting REINFORCE Style Optimization for Learning from Human
    Feedback in LLMs"; Kool et al. 2019).

    Each sample's baseline is the mean reward of the other G − 1 samples of
    its prompt, which is unbiased because it does not depend on the sample:
      Â_i = R_i − (1/(G−1)) Σ_{j≠i} R_j = G/(G−1) · (R_i − mean_g R)

    Args:
      rewards: `[batch]`, the G samples of each prompt contiguous.
      group_size: G ≥ 2 (one sample has no other to be its baseline).

    Returns:
      `[batch]` advantages; a group of equal rewards gets exactly 0.

    Example:
      >>> print(rloo_advantages(jnp.array([1.0, 0.0, 0.0, 3.0, 3.0, 3.0]), 3))
      [ 1.  -0.5 -0.5  0.   0.   0. ]
    """
    if group_size < 2:
        raise ValueError(f"rloo_advantages: group_size must be >= 2 (a leave-one-out baseline needs "
                         f"another sample of the prompt), got {group_size}")
    r = _groups(rewards, group_size)
    # The literal leave-one-out mean (sum − R_i)/(G − 1): exact for small
    # integer rewards, unlike G/(G−1)·(R − mean).
    others = (jnp.sum(r, axis=-1, keepdims=True) - r) / (group_size - 1)
    no_spread = jnp.max(r, axis=-1, keepdims=True) == jnp.min(r, axis=-1, keepdims=True)
    return jnp.where(no_spread, 0.0, r - others).reshape(rewards.shape)


def reinforce_pp_advantages(rewards: Array, group_size: int | None = None) -> Array:
    """REINFORCE++ advantages (Hu 2025, "REINFORCE++: A Simple and Efficient
    Approach for Aligning Large Language Models").

    A baseline and a scale taken over the whole batch rather than one prompt's
    group, so a prompt with few samples is not over-weighted:
      group_size None: Â = (R − mean_batch R) / std_batch(R)
      group_size G:    Â = (R − mean_g R) / std_batch(R − mean_g R)
                       (the paper's "REINFORCE++-baseline")
    std is the sample standard deviation (ddof 1); when it is 0 (all rewards
    equal, or every group without spread) the advantages are exactly 0. The
    paper's per-token KL penalty in the reward is the caller's: build token
    rewards, returns with `gae(r, 0, mask, gamma=1, lam=1)`, then `whiten`.

    Args:
      rewards: `[batch]` (G samples per prompt contiguous when grouped).
      group_size: None, or G ≥ 2 dividing the batch.

    Returns:
      `[batch]` advantages.

    Example:
      >>> r = jnp.array([1.0, 0.0, 0.0, 1.0])
      >>> print(reinforce_pp_advantages(r).round(4))
      [ 0.866 -0.866 -0.866  0.866]
      >>> print(reinforce_pp_advantages(jnp.array([1.0, 0.0, 2.0, 2.0]), group_size=2).round(4))
      [ 1.2247 -1.2247  0.      0.    ]
    """
    rewards = jnp.asarray(rewards)
    if rewards.ndim != 1 or rewards.shape[0] < 2:
        raise ValueError(f"reinforce_pp_advantages: rewards must be [batch] with batch >= 2, got shape {rewards.shape}")
    if group_size is None:
        no_spread = jnp.max(rewards) == jnp.min(rewards)
        centred = jnp.where(no_spread, 0.0, rewards - jnp.mean(rewards))
    else:
        if group_size < 2:
            raise ValueError(f"reinforce_pp_advantages: group_size must be >= 2 or None, got {group_size}")
        centred = _centred_in_groups(rewards, group_size)
    std = jnp.std(centred, ddof=1)
    return centred / jnp.where(std > 0, std, 1.0)
