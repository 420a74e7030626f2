"""The reward-function interface shared by PPO and the GRPO family."""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class Rollout:
    """What a reward function sees; R = rows (prompts × samples).

    prompts, completions, answers: [R] strings (completions decoded without
    special tokens); tokens, mask: [R, P + N] `[prompt ; completion]` ids and
    attention mask (left-padded prompt, right-padded completion); lengths:
    [R] completion tokens; truncated: [R] no EOS within the budget.
    """

    prompts: Sequence[str]
    completions: Sequence[str]
    answers: Sequence[str]
    tokens: np.ndarray
    mask: np.ndarray
    lengths: np.ndarray
    truncated: np.ndarray


RewardFn = Callable[[Rollout], np.ndarray]


def from_verifier(fn: Callable[[Sequence[str], Sequence[str]], np.ndarray]) -> RewardFn:
    """Adapt a text checker `fn(completions, answers) -> [R]` to the `Rollout` interface."""

    def reward(rollout: Rollout) -> np.ndarray:
        return np.asarray(fn(rollout.completions, rollout.answers), np.float32)

    reward.__name__ = getattr(fn, "__name__", "verifier")
    return reward


def combine(fns: Sequence[tuple[RewardFn, float]]) -> RewardFn:
    """Weighted sum of reward functions: Σ_k w_k · fn_k(rollout)."""
    if not fns:
        raise ValueError("at least one reward function is needed")

    def reward(rollout: Rollout) -> np.ndarray:
        return sum(w * np.asarray(fn(rollout), np.float32) for fn, w in fns)

    return reward
