"""Static shapes for generation: round lengths up so compiles stay few.

A jitted sampler compiles once per distinct (prompt width, generation
buffer) pair. Rounding both up to a power of two (at least `MIN_BUCKET`)
bounds the number of compiles by log2 of the longest length, at the price of
at most 2x extra left padding in the prefill (padding slots are masked, so
results do not change) and a KV cache up to 2x longer than needed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

MIN_BUCKET = 16


def bucket_length(length: int, minimum: int = MIN_BUCKET) -> int:
    """Smallest power of two >= `length` and >= `minimum`."""
    if length < 1:
        raise ValueError(f"length must be positive, got {length}")
    return max(minimum, 1 << (length - 1).bit_length())


def left_pad(tokens: jax.Array, mask: jax.Array, width: int, pad_id: int) -> tuple[jax.Array, jax.Array]:
    """Add columns on the left so that `tokens, mask: [B, P]` become `[B, width]`."""
    extra = width - tokens.shape[1]
    if extra < 0:
        raise ValueError(f"cannot pad width {tokens.shape[1]} down to {width}")
    if extra == 0:
        return tokens, mask
    return (jnp.pad(tokens, ((0, 0), (extra, 0)), constant_values=pad_id),
            jnp.pad(mask, ((0, 0), (extra, 0)), constant_values=0))


def check_left_padded(mask: np.ndarray) -> None:
    """Raise unless every row of `mask: [B, P]` is 0...0 1...1 with at least one 1."""
    mask = np.asarray(mask).astype(bool)
    if mask.ndim != 2:
        raise ValueError(f"prompt_mask must be [batch, time], got shape {mask.shape}")
    if not mask[:, -1].all():
        raise ValueError("prompts must be left-padded: every row's last token must be real (mask 1)")
    if (mask[:, 1:] < mask[:, :-1]).any():
        raise ValueError("prompts must be left-padded: a row's mask goes 1 -> 0")


__all__ = ["MIN_BUCKET", "bucket_length", "check_left_padded", "left_pad"]
