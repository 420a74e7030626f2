"""Reward functions: verifiable checkers and a reward-model scorer.

A reward function takes the decoded completions and the reference answers
and returns one float per completion: `fn(completions: list[str], answers:
list[str]) -> np.ndarray [B]`.
"""

from jaxalign.rewards.verifiers import exact_match

__all__ = ["exact_match"]
