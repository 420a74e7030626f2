"""A verifiable instruction-following task for small chat models: say it in few words.

A prompt asks to describe a topic "in at most N words" (N in 6..15); a
response earns reward 1 when it

- has at most N words (whitespace-separated) and at least 2,
- names the topic's key word (case-insensitive), so an empty or off-topic
  answer does not pass, and
- ended by itself (EOS within the budget), so a cut-off ramble does not pass.

SmolLM2-135M-Instruct meets this now and then when sampling and rarely when
greedy (it likes 15-30 word answers), which is what a group-relative method
needs to learn from. Records are `{"prompt", "answer"}` with the constraint
JSON-encoded in `answer`, so they go through the ordinary prompt pipeline and
:func:`follows_constraints` reads them back as a verifier.

Held-out prompts use topics that training never sees.
"""

from __future__ import annotations

import json
import re
from typing import Sequence

import numpy as np

from jaxalign.rewards.base import Rollout

TRAIN_TOPICS = (
    "ocean", "coffee", "bicycle", "winter", "moon", "library", "volcano", "chess", "forest", "river",
    "mountain", "bread", "guitar", "rain", "desert", "city", "garden", "train", "cat", "dog", "tea",
    "bridge", "island", "snow", "clock", "candle", "castle", "piano", "camera", "kite", "lighthouse",
    "market", "school", "robot", "planet", "storm", "honey", "paper", "window", "umbrella",
)
TEST_TOPICS = (
    "sunset", "violin", "harbor", "autumn", "apple", "museum", "glacier", "bakery", "comet", "meadow",
    "lantern", "penguin", "tiger", "festival", "canyon", "orchard",
)
TEMPLATES = (
    "Describe {article}{topic} in at most {n} words.",
    "In at most {n} words, tell me about {article}{topic}.",
    "What is {article}{topic}? Answer in at most {n} words.",
)
MIN_WORDS, MAX_WORDS = 6, 15  # the range of N in prompts
MIN_WORDS_FLOOR = 2  # fewer words than this never passes


def _article(topic: str) -> str:
    return "an " if topic[0] in "aeiou" else "a "


def make_records(topics: Sequence[str], rng: np.random.Generator, n: int) -> list[dict]:
    """`n` prompt records over `topics`, each with a random template and word limit."""
    out = []
    for _ in range(n):
        topic = topics[int(rng.integers(len(topics)))]
        limit = int(rng.integers(MIN_WORDS, MAX_WORDS + 1))
        template = TEMPLATES[int(rng.integers(len(TEMPLATES)))]
        prompt = template.format(article=_article(topic), topic=topic, n=limit)
        out.append({"prompt": prompt, "answer": json.dumps({"max_words": limit, "keyword": topic})})
    return out


def train_records(n: int, seed: int = 0) -> list[dict]:
    return make_records(TRAIN_TOPICS, np.random.default_rng(seed), n)


def held_out(n: int) -> list[dict]:
    """A fixed evaluation set on topics disjoint from training."""
    return make_records(TEST_TOPICS, np.random.default_rng(12345), n)


_WORD = re.compile(r"\S+")


def check(completion: str, answer: str, truncated: bool = False) -> dict[str, bool]:
    """Which parts of the constraint in `answer` the completion meets."""
    spec = json.loads(answer)
    words = _WORD.findall(completion)
    return {
        "short": MIN_WORDS_FLOOR <= len(words) <= spec["max_words"],
        "on_topic": spec["keyword"].lower() in completion.lower(),
        "finished": not truncated,
    }



def follows_constraints(rollout: Rollout) -> np.ndarray:
    """Reward function: 1.0 where every part of the constraint holds, else 0.0. Shape [R]."""
    return np.asarray([float(all(check(c, a, bool(t)).values()))
                       for c, a, t in zip(rollout.completions, rollout.answers, rollout.truncated)], np.float32)


def word_counts(completions: Sequence[str]) -> np.ndarray:
    return np.asarray([len(_WORD.findall(c)) for c in completions])


__all__ = ["TEST_TOPICS", "TRAIN_TOPICS", "check", "follows_constraints", "held_out", "make_records",
           "train_records", "word_counts"]
