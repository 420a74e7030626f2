"""What every generation program shares: the loop state, the token pick, and the write of one column.

The sampler's program (`sampler._rollout`) starts and advances a `Loop` with
these functions; compiled programs are kept here by what they depend on.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from jaxalign.host import release_host_memory
from jaxalign.models import KVCache
from jaxalign.sampling.logits_processing import argmax_first, sample_categorical, sampling_logprobs, token_logprobs

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Static:
    """Options that change the compiled program (everything else is a traced argument)."""

    n: int
    buffer: int  # bucketed max_new_tokens: width of the output buffers
    greedy: bool
    use_top_k: bool
    use_top_p: bool
    raw_logprobs: bool
    cache_dtype: str | None = None  # the KV cache's dtype name (None: the model's compute dtype)


class Draw(NamedTuple):
    """The traced sampling arguments of one call (scalars, and eos_ids: [E])."""

    rng: Array
    temperature: Array
    top_k: Array
    top_p: Array
    max_new_tokens: Array
    eos_ids: Array
    pad_id: Array


class Loop(NamedTuple):
    step: Array  # [] column being filled
    last: Array  # [R] token to feed the model at this step
    done: Array  # [R] bool, EOS already emitted
    tokens: Array  # [R, N]
    logprobs: Array  # [R, N]
    raw: Array | None  # [R, N]
    mask: Array  # [R, N]
    cache: KVCache


def record(static: Static, draw: Draw, loop: Loop, logits: Array, cache: KVCache) -> Loop:
    """Pick column `loop.step`'s tokens from `logits: [R, V]` and write them; rows already done get `pad_id`."""
    logp = sampling_logprobs(logits, temperature=draw.temperature, top_k=draw.top_k if static.use_top_k else None,
                             top_p=draw.top_p if static.use_top_p else None)
    if static.greedy:
        token = argmax_first(logp)
    else:
        token = sample_categorical(jax.random.fold_in(draw.rng, loop.step), logp)
    token = token.astype(jnp.int32)
    logprob = token_logprobs(logp, token)
    raw = token_logprobs(jax.nn.log_softmax(logits, axis=-1), token) if static.raw_logprobs else None
    live = ~loop.done
    token = jnp.where(live, token, draw.pad_id)

    def put(buf, col):
        return jax.lax.dynamic_update_index_in_dim(buf, col.astype(buf.dtype), loop.step, axis=1)

    return Loop(step=loop.step + 1, last=token, done=loop.done | jnp.isin(token, draw.eos_ids),
                tokens=put(loop.tokens, token), logprobs=put(loop.logprobs, jnp.where(live, logprob, 0.0)),
                raw=None if raw is None else put(loop.raw, jnp.where(live, raw, 0.0)),
                mask=put(loop.mask, live), cache=cache)


def start(static: Static, draw: Draw, first_logits: Array, cache: KVCache) -> Loop:
    """Empty output buffers with column 0 drawn from the prefill's `first_logits: [R, V]`."""
    rows, buffer = first_logits.shape[0], static.buffer
    zeros = jnp.zeros((rows, buffer), jnp.float32)
    loop = Loop(step=jnp.int32(0), last=jnp.zeros((rows,), jnp.int32), done=jnp.zeros((rows,), bool),
                tokens=jnp.full((rows, buffer), draw.pad_id, jnp.int32), logprobs=zeros,
                raw=zeros if static.raw_logprobs else None, mask=jnp.zeros((rows, buffer), jnp.int32), cache=cache)
    return record(static, draw, loop, first_logits, cache)


def keep_going(draw: Draw, loop: Loop) -> Array:
    """Whether another decode step is needed: budget left and some row without its EOS."""
    return (loop.step < draw.max_new_tokens) & ~jnp.all(loop.done)


def outputs(static: Static, loop: Loop) -> dict:
    """The program's outputs (the `SampleResult` fields it fills) from the final loop state."""
    rows = loop.tokens.shape[0]
    return dict(completions=loop.tokens, logprobs=loop.logprobs, mask=loop.mask, lengths=loop.mask.sum(-1),
                truncated=~loop.done, prompt_index=jnp.arange(rows, dtype=jnp.int32) // static.n,
                raw_logprobs=loop.raw)


def grow_rows(x: Array, n: int) -> Array:
    """Repeat each row n times, contiguously (the GRPO group shares its prompt's prefill)."""
    return jnp.repeat(x, n, axis=0) if n > 1 else x


# Every sampler program of the process, by (what it runs, its arguments' shapes/dtypes/shardings, options).
_compiled: dict[Any, Any] = {}
_stats = {"count": 0, "seconds": 0.0}


def spec(x) -> tuple:
    """What of an argument a compiled program depends on: shape, dtype, sharding."""
    return (tuple(x.shape), x.dtype, getattr(x, "sharding", None))


def out_shapes(program) -> Any:
    """A compiled program's outputs as `ShapeDtypeStruct`s with their shardings (to compile the next one)."""
    return jax.tree.map(lambda s, where: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=where),
                        program.out_info, program.output_shardings)


def compiled(key: Any, fn: Callable, args: tuple, options: dict | None, donate_argnums: tuple[int, ...] = ()):
    """`jit(fn)` compiled for `args` (arrays or `ShapeDtypeStruct`s), once per `key` in the process."""
    if key not in _compiled:
        begin = time.perf_counter()
        lowered = jax.jit(fn, donate_argnums=donate_argnums).lower(*args)
        release_host_memory()  # before and after: the compile's peak stacks on neither side's freed heap
        _compiled[key] = lowered.compile(options)
        release_host_memory()
        _stats["count"] += 1
        _stats["seconds"] += time.perf_counter() - begin
    return _compiled[key]
