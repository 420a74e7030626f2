"""A trained reward model as a reward function."""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from jaxalign.models import ValueModel, last_token_scores
from jaxalign.rewards.base import Rollout

NORM_KEY = "jaxalign_reward_normalization"  # config.json entry the reward-model trainer writes


class RewardModelScorer:
    """Scores `[prompt ; completion]` with a `ValueModel` at the last real token.

    With `normalization={"mean", "std"}` (saved by the reward-model trainer in
    the checkpoint's config) the score is (r − mean)/std, so a KL coefficient
    means the same thing across reward models (Ziegler et al. 2019).
    """

    def __init__(self, model: ValueModel, normalization: dict | None = None):
        self.graphdef, self.state = nnx.split(model)
        self.mean = float((normalization or {}).get("mean", 0.0))
        self.std = float((normalization or {}).get("std", 1.0))

        @jax.jit
        def score(state, tokens, mask):
            m = nnx.merge(self.graphdef, state)
            return last_token_scores(m(tokens, attention_mask=mask), mask)

        self._score = score

    @classmethod
    def from_pretrained(cls, path) -> "RewardModelScorer":
        import json
        from pathlib import Path

        from jaxalign.models import load_hf

        model, _ = load_hf(path)
        if not isinstance(model, ValueModel):
            raise ValueError(f"{path} is not a sequence-classification (reward) checkpoint")
        config = json.loads((Path(path) / "config.json").read_text())
        return cls(model, config.get(NORM_KEY))

    def __call__(self, rollout: Rollout) -> np.ndarray:
        raw = self._score(self.state, np.asarray(rollout.tokens), np.asarray(rollout.mask))
        return (np.asarray(raw, np.float32) - self.mean) / self.std
