"""Supervised fine-tuning: next-token cross-entropy on the response tokens."""

from __future__ import annotations

import jax

from jaxalign.algorithms.common import completion_hidden
from jaxalign.losses import nll_loss
from jaxalign.models.logprobs import head_logprobs


def sft_loss_fn(model, batch: dict, rng: jax.Array, *, logprob_chunk: int | None = None):
    """Token-mean NLL of the response as a `(sum, count)` pair (exact under accumulation).

    batch: `tokens`, `loss_mask`, `attention_mask`, `positions`, `segment_ids`
    `[B, T]` from `jaxalign.data` (packed rows work: segments do not attend
    to each other and positions restart). Logits at t score token t + 1.
    logprob_chunk: positions per chunk of the LM head and softmax
    (`jaxalign.models.logprobs.head_logprobs`; None: automatic, 0: all at once);
    bind it with `functools.partial` for `make_train_step`.
    """
    del rng
    tokens = batch["tokens"]
    logps, correct = head_logprobs(model, completion_hidden(model, batch, None), tokens[:, 1:],
                                   logprob_chunk=logprob_chunk, correct=True)
    parts, metrics = nll_loss(logps, batch["loss_mask"][:, 1:], correct=correct, return_parts=True)
    return parts, {"nll": parts, "token_accuracy": metrics["accuracy"]}
