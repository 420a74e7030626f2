"""A tiny NNX language model following jaxalign's `axes` metadata convention.

embedding -> MLP block (with a residual) -> norm -> unembedding. Fast enough
to compile in well under a second; used by the sharding and training tests.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


class ToyLM(nnx.Module):
    def __init__(self, vocab: int = 32, embed: int = 16, mlp: int = 32, *, rngs: nnx.Rngs):
        init = jax.nn.initializers.normal(0.2)
        self.embed = nnx.Param(init(rngs.params(), (vocab, embed)), axes=("vocab", "embed"))
        self.w_in = nnx.Param(init(rngs.params(), (embed, mlp)), axes=("embed", "mlp"))
        self.b_in = nnx.Param(jnp.zeros((mlp,)), axes=("mlp",))
        self.w_out = nnx.Param(init(rngs.params(), (mlp, embed)), axes=("mlp", "embed"))
        self.scale = nnx.Param(jnp.ones((embed,)), axes=("norm",))
        self.unembed = nnx.Param(init(rngs.params(), (embed, vocab)), axes=("embed", "vocab"))

    def __call__(self, tokens, positions=None, attention_mask=None, segment_ids=None, cache=None):
        """tokens: [B, T] int32 -> logits [B, T, V]."""
        x = self.embed[...][tokens]
        h = jax.nn.gelu(x @ self.w_in[...] + self.b_in[...])
        x = x + h @ self.w_out[...]
        x = x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6) * self.scale[...]
        return x @ self.unembed[...]


def token_mean_loss(model, batch, rng):
    """Next-token cross-entropy as a (sum, count) pair over `batch["mask"]`."""
    del rng
    logits = model(batch["tokens"][:, :-1])
    targets = batch["tokens"][:, 1:]
    mask = batch["mask"][:, 1:].astype(jnp.float32)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
    nll = -jnp.take_along_axis(logp, targets[..., None], -1)[..., 0]
    total = jnp.sum(nll * mask)
    if "poison" in batch:  # a scalar flag that makes this step's loss NaN
        total = jnp.where(batch["poison"] > 0, jnp.nan, total)
    count = jnp.sum(mask)
    return (total, count), {"token_nll": (total, count), "nll_sum": total}


def make_batch(seed: int, batch: int = 8, time: int = 12, vocab: int = 32) -> dict:
    """Random tokens with a ragged mask: row i keeps its first 2 + (i*5 % time-2) tokens."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, (batch, time), dtype=np.int32)
    lengths = 2 + (np.arange(batch) * 5 + seed) % (time - 2)
    mask = (np.arange(time)[None, :] < lengths[:, None]).astype(np.int32)
    return {"tokens": tokens, "mask": mask}


class ToyData:
    """Deterministic, checkpointable iterator: batch k is `make_batch(seed*1000 + k)`.

    Every batch carries a scalar `poison` flag, 1.0 at the positions in
    `poison_at` (0-based), which makes `token_mean_loss` NaN for that batch.
    """

    def __init__(self, seed: int = 0, poison_at: tuple[int, ...] = (), **batch_kw):
        self.seed, self.position, self.batch_kw = seed, 0, batch_kw
        self.poison_at = set(poison_at)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        b = make_batch(self.seed * 1000 + self.position, **self.batch_kw)
        b["poison"] = np.float32(self.position in self.poison_at)
        self.position += 1
        return b

    def get_state(self) -> dict:
        # A NumPy integer on purpose: real loaders return them, and the
        # checkpoint must still write the state as JSON.
        return {"seed": self.seed, "position": np.int64(self.position)}

    def set_state(self, state: dict) -> None:
        self.seed, self.position = int(state["seed"]), int(state["position"])
