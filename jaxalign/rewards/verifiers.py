"""Verifiable rewards: the stand-in for a human rater where correctness is checkable."""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np


def exact_match(completions: Sequence[str], answers: Sequence[str]) -> np.ndarray:
    """1.0 where the completion (stripped of surrounding whitespace) equals the answer, else 0.0.

    completions, answers: [B] strings -> rewards: [B] float32.
    """
    if len(completions) != len(answers):
        raise ValueError(f"{len(completions)} completions for {len(answers)} answers")
    return np.array([c.strip() == a.strip() for c, a in zip(completions, answers)], np.float32)


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def last_number(text: str) -> float | None:
    """The last number in `text` (thousands separators allowed), or None.

    A `####` marker (GSM8K's answer format) or `\\boxed{...}` takes precedence
    over numbers elsewhere in the text.
    """
    for marker in ("####", "\\boxed{"):
        if marker in text:
            text = text.rsplit(marker, 1)[1]
            if marker == "\\boxed{":
                text = text.split("}", 1)[0]
            break
    found = _NUMBER.findall(text)
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:
        return None


def numeric_match(completions: Sequence[str], answers: Sequence[str], *, tol: float = 1e-6) -> np.ndarray:
    """1.0 where the completion's final number equals the answer's (GSM8K-style), else 0.0.

    completions, answers: [B] strings -> rewards: [B] float32. A completion
    without a number scores 0.
    """
    if len(completions) != len(answers):
        raise ValueError(f"{len(completions)} completions for {len(answers)} answers")
    out = []
    for c, a in zip(completions, answers):
        got, want = last_number(c), last_number(a)
        out.append(got is not None and want is not None and abs(got - want) <= tol * max(1.0, abs(want)))
    return np.array(out, np.float32)


VERIFIERS = {"exact_match": exact_match, "numeric_match": numeric_match}
