"""Reward functions: verifiable checkers and a reward-model scorer.

A reward function maps a `Rollout` (what was sampled, decoded and tokenized)
to one float per completion: `fn(rollout) -> np.ndarray [R]`. Text checkers
`fn(completions, answers)` are adapted with `from_verifier`.
"""

from jaxalign.rewards.base import Rollout, RewardFn, combine, from_verifier
from jaxalign.rewards.model import RewardModelScorer
from jaxalign.rewards.verifiers import VERIFIERS, exact_match, last_number, numeric_match

__all__ = ["VERIFIERS", "RewardFn", "RewardModelScorer", "Rollout", "combine", "exact_match", "from_verifier",
           "last_number", "numeric_match"]
