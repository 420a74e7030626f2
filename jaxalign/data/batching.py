"""Padding, length bucketing and packing of token sequences into numpy batches.

Batch conventions (all arrays int32, `[B, T]`):
- `tokens`: token ids, `pad_id` where padded.
- `segment_ids`: 1, 2, 3, ... for the sequences packed in a row, 0 = padding
  (unpacked rows hold one segment: 1 on every real token).
- `attention_mask`: `segment_ids > 0`. A packed row also needs attention
  restricted to equal `segment_ids` (block-diagonal causal attention).
- `positions`: 0, 1, 2, ... within each segment, 0 on padding.
- `loss_mask`: 1 on the tokens to be predicted (completion and its EOS), 0
  on prompt and padding, and always 0 on the first token of a segment
  (nothing in the segment predicts it). The shift is the consumer's:
  logits at t score `tokens[t + 1]` where `loss_mask[t + 1]` is 1.

Right padding is for training batches; left padding (`side="left"`) is for
generation prompts, so every prompt ends at the last column.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

Buckets = int | Sequence[int] | None


def power_of_two_buckets(min_length: int, max_length: int) -> tuple[int, ...]:
    """(min_length, 2·min_length, 4·min_length, ...) capped by and ending at max_length."""
    out, n = [], min_length
    while n < max_length:
        out.append(n)
        n *= 2
    return (*out, max_length)


def bucket_length(n: int, *, max_length: int, buckets: Buckets = None) -> int:
    """The padded length for a batch whose longest sequence has `n` tokens.

    buckets: None pads to `max_length` (one shape); an int `m` rounds up to
    a multiple of `m` (capped at `max_length`); a sequence of lengths picks
    the smallest one >= n (its largest must be >= max_length). Either way a
    jitted step sees a bounded set of shapes.
    """
    if n > max_length:
        raise ValueError(f"sequence of {n} tokens > max_length={max_length}")
    if buckets is None:
        return max_length
    if isinstance(buckets, int):
        if buckets < 1:
            raise ValueError(f"bucket multiple must be positive, got {buckets}")
        return min(-(-max(n, 1) // buckets) * buckets, max_length)
    sizes = sorted(buckets)
    if not sizes or sizes[-1] < max_length:
        raise ValueError(f"buckets {sizes} must reach max_length={max_length}")
    return next(s for s in sizes if s >= n)


def score_width(first_columns: Sequence[int], length: int) -> int:
    """Trailing columns of a `[B, length]` batch that hold every scored token.

    first_columns: the column of each row's first loss-masked token (rows
    with none are left out). The width `length - min(first_columns)` is
    rounded up to a multiple of `ceil(length / 4)`, so a padded length gets
    at most four widths (four compiles of a step that scores this many
    columns), and capped at `length - 1` (token 0 is never scored).
    """
    cols = [int(c) for c in first_columns]
    if not cols:
        return 1
    step = -(-length // 4)
    return min(-(-(length - min(cols)) // step) * step, length - 1)


def first_scored_columns(loss_mask: np.ndarray) -> list[int]:
    """Column of the first 1 in each row of a `[B, T]` loss mask (rows without one skipped)."""
    mask = np.asarray(loss_mask) != 0
    return np.argmax(mask, axis=1)[mask.any(axis=1)].tolist()


def pad(seqs: Sequence[np.ndarray], length: int, *, pad_id: int, side: str = "right"):
    """Pads 1-D int sequences to `[len(seqs), length]`; returns (tokens, mask)."""
    if side not in ("right", "left"):
        raise ValueError(f"side={side!r}; expected 'right' or 'left'")
    tokens = np.full((len(seqs), length), pad_id, np.int32)
    mask = np.zeros((len(seqs), length), np.int32)
    for row, seq in enumerate(seqs):
        n = len(seq)
        if n > length:
            raise ValueError(f"sequence of {n} tokens does not fit length {length}")
        cols = slice(0, n) if side == "right" else slice(length - n, length)
        tokens[row, cols] = seq
        mask[row, cols] = 1
    return tokens, mask


def positions_from_mask(mask: np.ndarray) -> np.ndarray:
    """0, 1, 2, ... over the 1s of each row (either padding side), 0 elsewhere."""
    return ((np.cumsum(mask, axis=1) - 1) * mask).astype(np.int32)


def response_mask(length: int, prompt_length: int) -> np.ndarray:
    """1 from the response start on, never on token 0."""
    out = np.zeros(length, np.int32)
    out[max(prompt_length, 1):] = 1
    return out


def collate_sequences(
    seqs: Sequence[np.ndarray],
    prompt_lengths: Sequence[int],
    *,
    length: int,
    pad_id: int,
    side: str = "right",
) -> dict[str, np.ndarray]:
    """`tokens`, `loss_mask`, `attention_mask`, `segment_ids`, `positions` `[B, length]`."""
    tokens, mask = pad(seqs, length, pad_id=pad_id, side=side)
    loss, _ = pad([response_mask(len(s), p) for s, p in zip(seqs, prompt_lengths)],
                  length, pad_id=0, side=side)
    return {
        "tokens": tokens,
        "loss_mask": loss,
        "attention_mask": mask,
        "segment_ids": mask.copy(),
        "positions": positions_from_mask(mask),
    }


def collate_preference(
    chosen: Sequence[np.ndarray],
    rejected: Sequence[np.ndarray],
    prompt_lengths: Sequence[int],
    *,
    length: int,
    pad_id: int,
    side: str = "right",
) -> dict[str, np.ndarray]:
    """`chosen_*` and `rejected_*` arrays, both `[B, length]` (concatenate for `[2B, T]`).

    Also `score_width`, a Python int (see `score_width`): the last columns
    that hold every response token, so a DPO step runs the LM head on those
    only. A train step treats it as a compile-time constant.
    """
    out = {}
    first = []
    for name, seqs in (("chosen", chosen), ("rejected", rejected)):
        batch = collate_sequences(seqs, prompt_lengths, length=length, pad_id=pad_id, side=side)
        out.update({f"{name}_{k}": v for k, v in batch.items()})
        first += first_scored_columns(batch["loss_mask"])
    out["score_width"] = score_width(first, length)
    return out


def collate_prompts(
    seqs: Sequence[np.ndarray], *, length: int, pad_id: int, side: str = "left"
) -> dict[str, np.ndarray]:
    """`prompt_tokens`, `prompt_mask`, `prompt_positions` `[B, length]`, left-padded by default."""
    tokens, mask = pad(seqs, length, pad_id=pad_id, side=side)
    return {"prompt_tokens": tokens, "prompt_mask": mask, "prompt_positions": positions_from_mask(mask)}


def plan_packing(lengths: np.ndarray, order: Sequence[int], *, rows: int, length: int) -> list[list[list[int]]]:
    """Groups `order` into batches of `rows` rows of at most `length` tokens.

    First fit over the rows of the current batch; a sequence that fits no row
    closes the batch and opens the next, so the plan is a pure function of
    (lengths, order) and the last batch may have empty rows. Returns
    `plan[batch][row] = [sample, ...]`.
    """
    plan: list[list[list[int]]] = []
    batch = [[] for _ in range(rows)]
    used = [0] * rows
    for i in order:
        n = int(lengths[i])
        if n > length:
            raise ValueError(f"sample {i} has {n} tokens > packed length {length}")
        row = next((r for r in range(rows) if used[r] + n <= length), None)
        if row is None:
            plan.append(batch)
            batch, used, row = [[] for _ in range(rows)], [0] * rows, 0
        batch[row].append(int(i))
        used[row] += n
    if any(batch):
        plan.append(batch)
    return plan


def pack_rows(
    rows: Sequence[Sequence[int]],
    seqs: Sequence[np.ndarray],
    prompt_lengths: Sequence[int],
    *,
    length: int,
    pad_id: int,
) -> dict[str, np.ndarray]:
    """Packs `seqs[i]` for i in each row into `[len(rows), length]` arrays."""
    shape = (len(rows), length)
    out = {
        "tokens": np.full(shape, pad_id, np.int32),
        "loss_mask": np.zeros(shape, np.int32),
        "segment_ids": np.zeros(shape, np.int32),
        "positions": np.zeros(shape, np.int32),
    }
    for r, members in enumerate(rows):
        start = 0
        for segment, i in enumerate(members, start=1):
            seq = seqs[i]
            end = start + len(seq)
            if end > length:
                raise ValueError(f"row {r} overflows length {length}")
            out["tokens"][r, start:end] = seq
            out["loss_mask"][r, start:end] = response_mask(len(seq), prompt_lengths[i])
            out["segment_ids"][r, start:end] = segment
            out["positions"][r, start:end] = np.arange(len(seq))
            start = end
    out["attention_mask"] = (out["segment_ids"] > 0).astype(np.int32)
    return out
