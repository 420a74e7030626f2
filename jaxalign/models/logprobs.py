"""Target-token log-probs (and entropies) through a model's LM head, in chunks of positions.

At a 128k–256k vocabulary the float32 logits `[rows, time, vocab]` of a
training batch are larger than a chip's memory. `head_logprobs` runs the LM
head, the log-softmax and the gather of each target's log-prob over chunks of
positions (`jax.lax.map`), and `jax.checkpoint` makes the backward pass
recompute each chunk's logits instead of saving them: at no point, forward or
backward, do more than one chunk's logits exist. Per position the arithmetic
is the full computation's (the softmax always spans the whole vocabulary), so
values and gradients equal it to float32 rounding.

Chunks cut the time axis and keep every row, so a batch sharded over rows
(`data`, `fsdp`) stays sharded the same way inside each chunk.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxalign.losses import token_logprobs, token_logprobs_and_entropy

Array = jax.Array

# Bytes of one chunk's float32 logits under `logprob_chunk=None`. The backward
# pass of a chunk holds about three logits-sized buffers (the logits, their
# exponentials, the cotangent), so ~0.75 GiB per chunk at most, small next to
# a 16–95 GiB accelerator; while a chunk still spans ≥ 256 positions × rows at
# a 256k vocabulary, enough rows for the head's matmul to run at full rate.
CHUNK_LOGITS_BYTES = 256 * 2**20


def chunk_positions(logprob_chunk: int | None, *, rows: int, time: int, vocab: int) -> int:
    """Positions per chunk for `head_logprobs`; `time` (one chunk: the plain computation) or fewer.

    logprob_chunk: None: as many positions as keep one chunk's float32 logits
      `[rows, chunk, vocab]` within `CHUNK_LOGITS_BYTES`; 0: no chunking; k > 0:
      k positions per chunk.

    Example:
      >>> chunk_positions(None, rows=16, time=2048, vocab=128_256)  # Llama 3: 32 positions x 16 rows
      32
      >>> chunk_positions(None, rows=64, time=20, vocab=14)  # a small vocabulary: one chunk
      20
    """
    if logprob_chunk is None:
        logprob_chunk = max(1, CHUNK_LOGITS_BYTES // (4 * max(rows, 1) * vocab))
    if logprob_chunk < 0:
        raise ValueError(f"logprob_chunk must be None (automatic), 0 (no chunking) or positive, got {logprob_chunk}")
    return time if logprob_chunk == 0 else min(logprob_chunk, time)


def head_logprobs(model, hidden: Array, targets: Array, *, temperature: float = 1.0,
                  logprob_chunk: int | None = None, entropy: bool = False, correct: bool = False):
    """Log-probs of `targets` under `model.logits(hidden) / temperature`, chunked over positions.

    log p_t = l_t[y_t] − logsumexp(l_t), l_t = logits(h_t) / τ (the model's
    tied or untied head and final softcap included), and, with `entropy`,
    H_t = −Σ_v p_t[v] log p_t[v]; with `correct`, [y_t = argmax l_t].

    Args:
      model: anything with `logits(hidden [B, T, D]) -> [B, T, V]` (a `Transformer`).
      hidden: `[B, T, D]` final hidden states; `hidden[:, t]` scores `targets[:, t]`.
      targets: `[B, T]` token ids.
      temperature: τ, the sampling temperature the log-probs should match.
      logprob_chunk: positions per chunk (see `chunk_positions`): None picks
        it from the vocabulary (one chunk's logits ≤ 256 MiB), 0 computes the
        whole `[B, T, V]` at once.
      entropy, correct: also return the per-token entropy / argmax hit.

    Returns:
      `logps [B, T]` float32, followed by `entropy [B, T]` and `correct [B, T]`
      (float32 0/1) when asked for, as a tuple.

    Example:
      >>> class Uniform:  # four equally likely tokens
      ...     def logits(self, h):
      ...         return jnp.zeros(h.shape[:2] + (4,))
      >>> logps, ent = head_logprobs(Uniform(), jnp.zeros((1, 3, 2)), jnp.zeros((1, 3), int),
      ...                            logprob_chunk=2, entropy=True)
      >>> print(logps.round(4), ent.round(4))  # log 4 = 1.3863
      [[-1.3863 -1.3863 -1.3863]] [[1.3863 1.3863 1.3863]]
    """
    b, t, d = hidden.shape
    vocab = jax.eval_shape(model.logits, jax.ShapeDtypeStruct((1, 1, d), hidden.dtype)).shape[-1]
    size = chunk_positions(logprob_chunk, rows=b, time=t, vocab=vocab)

    def stats(h, y):
        logits = model.logits(h)
        if temperature != 1.0:
            logits = logits / temperature
        if entropy:
            out = token_logprobs_and_entropy(logits, y)
        else:
            out = (token_logprobs(logits, y),)
        if correct:
            out += ((jnp.argmax(logits, axis=-1) == y).astype(out[0].dtype),)
        return out

    if size >= t:
        out = stats(hidden, targets)
    else:
        k = -(-t // size)
        pad = k * size - t
        # [B, T, ...] -> [k, B, size, ...]: chunk i holds positions [i·size, (i+1)·size) of every row.
        h = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0))).reshape(b, k, size, d).swapaxes(0, 1)
        y = jnp.pad(targets, ((0, 0), (0, pad))).reshape(b, k, size).swapaxes(0, 1)
        # Saving nothing but the chunk's inputs: the backward pass recomputes its logits.
        chunked = jax.lax.map(jax.checkpoint(lambda hy: stats(*hy), prevent_cse=False), (h, y))
        out = tuple(o.swapaxes(0, 1).reshape(b, k * size)[:, :t] for o in chunked)
    return out[0] if len(out) == 1 else out
