"""What every algorithm needs from a model: per-token log-probs of a batch's response tokens."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxalign.models.logprobs import head_logprobs

Array = jax.Array


def model_logits(model, batch: dict, *, prefix: str = "") -> Array:
    """Logits `[B, T, V]` of `{prefix}tokens` with the batch's masks and positions."""
    return model(batch[prefix + "tokens"], positions=batch.get(prefix + "positions"),
                 attention_mask=batch.get(prefix + "attention_mask"),
                 segment_ids=batch.get(prefix + "segment_ids"))


def response_logprobs(model, batch: dict, *, prefix: str = "", temperature: float = 1.0, last: int | None = None,
                      logprob_chunk: int | None = None):
    """Teacher-forced log-probs of the tokens under `loss_mask`.

    batch: `{prefix}tokens`, `{prefix}loss_mask` `[B, T]`, and optionally
    `{prefix}attention_mask`, `{prefix}positions`, `{prefix}segment_ids`.
    Logits at position t score token t + 1, so both outputs are `[B, T - 1]`
    aligned with `tokens[:, 1:]`. `temperature` divides the logits, matching
    the distribution a sampler drew from at that temperature.
    last: score only the last `last` tokens (a rollout's completion columns):
      the LM head and softmax then run on `last` positions instead of T - 1,
      and both outputs are `[B, last]`, aligned with `tokens[:, -last:]`.
    logprob_chunk: positions per chunk of the LM head and softmax
      (`jaxalign.models.logprobs.head_logprobs`; None: automatic, 0: all at once).

    Returns: (logps [B, T-1] or [B, last] float32, mask of the same shape, float32).
    """
    hidden = completion_hidden(model, batch, last, prefix=prefix)
    width = hidden.shape[1]
    logps = head_logprobs(model, hidden, batch[prefix + "tokens"][:, -width:], temperature=temperature,
                          logprob_chunk=logprob_chunk)
    return logps, batch[prefix + "loss_mask"][:, -width:].astype(jnp.float32)


def completion_hidden(model, batch: dict, last: int | None, *, prefix: str = "") -> Array:
    """Final hidden states that score `tokens[:, 1:]` (or its last `last` columns): `[B, T-1 or last, D]`.

    What `response_logprobs` feeds to `head_logprobs`; public for losses that
    also need entropies (`head_logprobs(..., entropy=True)`).
    """
    hidden, _ = model.hidden_states(batch[prefix + "tokens"], positions=batch.get(prefix + "positions"),
                                    attention_mask=batch.get(prefix + "attention_mask"),
                                    segment_ids=batch.get(prefix + "segment_ids"))
    return hidden[:, :-1] if last is None else hidden[:, -last - 1:-1]


def completion_logits(model, batch: dict, last: int | None, *, prefix: str = "") -> Array:
    """Logits that score `tokens[:, 1:]` (or its last `last` columns): `[B, T-1 or last, V]`, whole.

    For inspection on small vocabularies; the losses go through `head_logprobs`,
    which never holds all of them at once.
    """
    return model.logits(completion_hidden(model, batch, last, prefix=prefix))


def sequence_logprob(logps: Array, mask: Array) -> Array:
    """Sum of the masked token log-probs: `[B, T] -> [B]`."""
    return jnp.sum(logps * mask, axis=-1)


def pair_options(batch: dict, *, last: bool = True) -> tuple[dict, dict]:
    """(arrays, static options) of a preference batch: the batcher's `score_width` (a Python
    int, the trailing columns that hold every response token) becomes the explicit option
    `last=` of a loss that scores responses (`last=False`: dropped, for one that does not)."""
    arrays = {k: v for k, v in batch.items() if k != "score_width"}
    return arrays, {"last": batch["score_width"]} if last and "score_width" in batch else {}


class PairStep:
    """The train step over preference batches for the loop: `(state, batch) -> (state, metrics)`.

    Passes the batch's `score_width` to `train_step` as the explicit option
    `last=` (`pair_options`), so the loss never reads an int out of its batch;
    `last=False` for a loss without that option (the reward model).
    """

    def __init__(self, train_step, *, last: bool = True):
        self.train_step, self.last = train_step, last

    @property
    def nan_policy(self) -> str:
        return self.train_step.nan_policy

    def memory_bytes(self, state, batch: dict) -> int | None:
        arrays, opts = pair_options(batch, last=self.last)
        return self.train_step.memory_bytes(state, arrays, **opts)

    def __call__(self, state, batch: dict):
        arrays, opts = pair_options(batch, last=self.last)
        return self.train_step(state, arrays, **opts)
