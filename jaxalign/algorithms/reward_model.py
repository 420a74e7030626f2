"""Reward model: Bradley–Terry on (chosen, rejected) pairs with a scalar head."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxalign.losses import bradley_terry_loss
from jaxalign.models import ValueModel, last_token_scores
from jaxalign.rewards.model import NORM_KEY

__all__ = ["NORM_KEY", "pair_scores", "reward_loss_fn", "reward_statistics"]


def _stacked(batch: dict):
    """chosen_* and rejected_* `[B, T]` -> one `[2B, T]` forward (chosen rows first)."""
    cat = lambda k: jnp.concatenate([batch["chosen_" + k], batch["rejected_" + k]])  # noqa: E731
    return cat("tokens"), cat("attention_mask"), cat("positions")


def pair_scores(model: ValueModel, batch: dict):
    """Scores of the chosen and rejected sequences: two `[B]` arrays."""
    tokens, mask, positions = _stacked(batch)
    scores = last_token_scores(model(tokens, positions=positions, attention_mask=mask), mask)
    b = batch["chosen_tokens"].shape[0]
    return scores[:b], scores[b:]


def reward_loss_fn(model: ValueModel, batch: dict, rng: jax.Array):
    """−log σ(r_w − r_l − margin) as a `(sum, count)` pair; `batch["margin"]` is optional `[B]`."""
    del rng
    chosen, rejected = pair_scores(model, batch)
    parts, metrics = bradley_terry_loss(chosen, rejected, margin=batch.get("margin"), return_parts=True)
    return parts, metrics


def reward_statistics(score_fn, batches) -> dict[str, float]:
    """Mean and std of the scores of every chosen and rejected sequence in `batches`.

    Saved next to the model (`save_hf(..., extra_config={NORM_KEY: stats})`) so
    that a scorer can report normalised rewards (r − mean) / std, as in
    Ziegler et al. 2019, without re-reading the data.
    """
    scores = []
    for batch in batches:
        chosen, rejected = score_fn(batch)
        scores += [np.asarray(chosen), np.asarray(rejected)]
    allv = np.concatenate(scores).astype(np.float64)
    return {"mean": float(allv.mean()), "std": float(allv.std() + 1e-8), "count": int(allv.size)}
