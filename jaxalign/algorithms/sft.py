"""Supervised fine-tuning: next-token cross-entropy on the response tokens."""

from __future__ import annotations

import jax

from jaxalign.algorithms.common import model_logits
from jaxalign.losses import sft_loss


def sft_loss_fn(model, batch: dict, rng: jax.Array):
    """Token-mean NLL of the response as a `(sum, count)` pair (exact under accumulation).

    batch: `tokens`, `loss_mask`, `attention_mask`, `positions`, `segment_ids`
    `[B, T]` from `jaxalign.data` (packed rows work: segments do not attend
    to each other and positions restart). Logits at t score token t + 1.
    """
    del rng
    tokens = batch["tokens"]
    logits = model_logits(model, batch)
    parts, metrics = sft_loss(logits[:, :-1], tokens[:, 1:], batch["loss_mask"][:, 1:], return_parts=True)
    return parts, {"nll": parts, "token_accuracy": metrics["accuracy"]}
