"""A deterministic, resumable, per-process batch iterator over tokenized data.

Semantics, chosen so that a run reproduces and resumes exactly:

- Epoch `e` visits the samples in the order `permutation(seed, e)` (numpy
  PCG64 seeded with `[seed, e]`), or in source order with `shuffle=False`.
- `batch_size` is the *global* batch. Global batch `k` of epoch `e` is
  `order[k·B:(k+1)·B]`; process `shard_index` of `shard_count` yields rows
  `[shard_index·b:(shard_index+1)·b]` of it, `b = B / shard_count`. So the
  processes read disjoint slices that together are the single-process batch,
  and every process takes the same number of steps with the same shapes
  (bucket lengths are computed on the global batch).
- The last `len(data) % B` samples of each epoch's order are dropped (a
  different few each epoch when shuffling): batches never change size.
- Packing (`pack_length=T`, SFT only): each epoch's order is packed first-fit
  into global batches of `B` rows of `T` tokens (`batching.plan_packing`);
  no sample is dropped, the epoch's last batch may have empty rows, and the
  number of steps depends on the epoch.
- The state is `{"epoch", "step"}` (the next batch to yield) plus the
  settings that must match on restore. A restored iterator yields exactly
  the batches the uninterrupted one would have; the state is global, so a
  run can resume on a different number of processes. Save it with the
  training checkpoint (it is a JSON-able dict of ints).

Batches are dicts of numpy arrays (see `batching`), plus `index` (`[b]`, the
samples' positions in the source; not in packed batches) and, for prompts,
`prompts` and `answers` as lists of strings.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from jaxalign.data import batching
from jaxalign.data.tokenize import PreferenceData, PromptData, SFTData

Data = SFTData | PreferenceData | PromptData


class Loader:
    """Iterates batches of `data`; `get_state`/`set_state` checkpoint it.

    Args:
      data: the output of `tokenize_sft`, `tokenize_preference` or
        `tokenize_prompts`.
      batch_size: global batch size, divisible by `shard_count`.
      seed: shuffling seed (non-negative int).
      shuffle: reshuffle every epoch; False keeps the source order.
      num_epochs: stop after this many epochs; None iterates forever.
      shard_index, shard_count: this process and the number of processes
        (e.g. `jax.process_index()`, `jax.process_count()`).
      buckets: pad length rule of `batching.bucket_length` (None pads to
        `data.max_length`).
      pack_length: pack SFT samples into rows of this many tokens (at least
        `data.max_length`); None does not pack.
      padding_side: "right" (default for SFT and preference) or "left"
        (default for prompts).
    """

    def __init__(
        self,
        data: Data,
        *,
        batch_size: int,
        seed: int = 0,
        shuffle: bool = True,
        num_epochs: int | None = None,
        shard_index: int = 0,
        shard_count: int = 1,
        buckets: batching.Buckets = None,
        pack_length: int | None = None,
        padding_side: str | None = None,
    ):
        if not isinstance(data, (SFTData, PreferenceData, PromptData)):
            raise TypeError(f"expected tokenized data, got {type(data).__name__}")
        if batch_size < 1 or batch_size % shard_count:
            raise ValueError(f"batch_size={batch_size} must be a positive multiple of shard_count={shard_count}")
        if not 0 <= shard_index < shard_count:
            raise ValueError(f"shard_index={shard_index} not in [0, {shard_count})")
        if seed < 0:
            raise ValueError(f"seed={seed} must be non-negative")
        if pack_length is not None:
            if not isinstance(data, SFTData):
                raise ValueError("packing is implemented for SFT data only")
            if pack_length < data.max_length:
                raise ValueError(f"pack_length={pack_length} < max_length={data.max_length}")
            if buckets is not None or padding_side not in (None, "right"):
                raise ValueError("packed rows have a fixed length and right padding")
        if not pack_length and len(data) < batch_size:
            raise ValueError(f"{len(data)} samples are fewer than batch_size={batch_size}")
        self.data = data
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.num_epochs = num_epochs
        self.shard_index = shard_index
        self.shard_count = shard_count
        self.buckets = buckets
        self.pack_length = pack_length
        self.padding_side = padding_side or ("left" if isinstance(data, PromptData) else "right")
        self.epoch = 0
        self.step = 0
        self._lengths = data.lengths()
        self._plan: tuple[int, list] | None = None

    @property
    def local_batch_size(self) -> int:
        return self.batch_size // self.shard_count

    def order(self, epoch: int) -> np.ndarray:
        """The sample order of `epoch` (positions in `data`)."""
        n = len(self.data)
        if not self.shuffle:
            return np.arange(n)
        return np.random.default_rng([self.seed, epoch]).permutation(n)

    def _packing(self, epoch: int) -> list:
        if self._plan is None or self._plan[0] != epoch:
            plan = batching.plan_packing(self._lengths, self.order(epoch),
                                         rows=self.batch_size, length=self.pack_length)
            self._plan = (epoch, plan)
        return self._plan[1]

    def steps_in_epoch(self, epoch: int) -> int:
        if self.pack_length:
            return len(self._packing(epoch))
        return len(self.data) // self.batch_size

    def batch_at(self, epoch: int, step: int) -> dict[str, Any]:
        """This process's part of global batch `step` of `epoch` (no state change)."""
        if not 0 <= step < self.steps_in_epoch(epoch):
            raise IndexError(f"step {step} outside epoch {epoch} ({self.steps_in_epoch(epoch)} steps)")
        lo, hi = self.shard_index * self.local_batch_size, (self.shard_index + 1) * self.local_batch_size
        data = self.data
        if self.pack_length:
            rows = self._packing(epoch)[step][lo:hi]
            return batching.pack_rows(rows, data.tokens, data.prompt_lengths,
                                      length=self.pack_length, pad_id=data.pad_id)
        glob = self.order(epoch)[step * self.batch_size:(step + 1) * self.batch_size]
        length = batching.bucket_length(int(self._lengths[glob].max()),
                                        max_length=data.max_length, buckets=self.buckets)
        local = glob[lo:hi]
        kw = {"length": length, "pad_id": data.pad_id, "side": self.padding_side}
        if isinstance(data, SFTData):
            batch = batching.collate_sequences([data.tokens[i] for i in local],
                                               data.prompt_lengths[local], **kw)
        elif isinstance(data, PreferenceData):
            batch = batching.collate_preference([data.chosen[i] for i in local],
                                                [data.rejected[i] for i in local],
                                                data.prompt_lengths[local], **kw)
            # The same width in every process (one program): from the global rows.
            batch["score_width"] = batching.score_width(
                [_first_scored(len(seq[i]), int(data.prompt_lengths[i]), length, self.padding_side)
                 for seq in (data.chosen, data.rejected) for i in glob
                 if len(seq[i]) > max(int(data.prompt_lengths[i]), 1)], length)
        else:
            batch = batching.collate_prompts([data.tokens[i] for i in local], **kw)
            batch["prompts"] = [data.prompts[i] for i in local]
            batch["answers"] = [data.answers[i] for i in local]
        batch["index"] = data.index[local]
        return batch

    def __iter__(self) -> Loader:
        return self

    def __next__(self) -> dict[str, Any]:
        while True:
            if self.num_epochs is not None and self.epoch >= self.num_epochs:
                raise StopIteration
            if self.step < self.steps_in_epoch(self.epoch):
                break
            self.epoch, self.step = self.epoch + 1, 0
        batch = self.batch_at(self.epoch, self.step)
        self.step += 1
        return batch

    def _settings(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "shuffle": self.shuffle,
            "batch_size": self.batch_size,
            "num_examples": len(self.data),
            "pack_length": self.pack_length or 0,
        }

    def get_state(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "step": self.step, **self._settings()}

    def set_state(self, state: dict[str, Any]) -> None:
        """Restores a `get_state()`; the settings in it must match this loader's."""
        for key, value in self._settings().items():
            if key in state and state[key] != value:
                raise ValueError(f"loader state has {key}={state[key]!r}, this loader {value!r}")
        self.epoch, self.step = int(state["epoch"]), int(state["step"])


def _first_scored(n: int, prompt_length: int, length: int, side: str) -> int:
    """Column of the first response token of an `n`-token sequence padded to `length`."""
    start = max(prompt_length, 1)
    return start if side == "right" else length - n + start
