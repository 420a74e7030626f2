"""Verifiable rewards: the stand-in for a human rater where correctness is checkable."""

from __future__ import annotations

from typing import Sequence

import numpy as np


def exact_match(completions: Sequence[str], answers: Sequence[str]) -> np.ndarray:
    """1.0 where the completion (stripped of surrounding whitespace) equals the answer, else 0.0.

    completions, answers: [B] strings -> rewards: [B] float32.
    """
    if len(completions) != len(answers):
        raise ValueError(f"{len(completions)} completions for {len(answers)} answers")
    return np.array([c.strip() == a.strip() for c, a in zip(completions, answers)], np.float32)
