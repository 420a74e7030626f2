"""Jitted autoregressive generation over a preallocated KV cache.

    result = generate(model, prompts, prompt_mask, max_new_tokens=64, rng=jax.random.key(0),
                      temperature=1.0, top_p=0.95, eos_ids=(2,), n=8)
    result.completions   # [B*n, 64]; rows i*n .. i*n+n-1 sample prompt i

One call is: prefill the B left-padded prompts once, repeat the cache n times
along the batch (the GRPO group shares its prompt's keys and values), then a
`lax.while_loop` that feeds one token per step and stops when every row has
emitted an EOS or `max_new_tokens` is reached.

A trainer holds params as a pytree (sharded on its mesh); `Sampler(model)`
keeps only the static graph definition, and `sampler(params, ...)` runs on
those params as they are, without copies. Compiled executables are cached by
(architecture, argument shapes/dtypes/shardings, static options); prompt
widths and the generation buffer are bucketed (`buckets.py`), and
`compile_stats()` counts the compiles.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxalign.host import release_host_memory, sampler_compiler_options
from jaxalign.models import KVCache
from jaxalign.sampling.buckets import bucket_length, check_left_padded, left_pad
from jaxalign.sampling.logits_processing import argmax_first, sample_categorical, sampling_logprobs, token_logprobs

Array = jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SampleResult:
    """What one `generate` call returns; R = B*n rows, N = max_new_tokens.

    completions: [R, N] int32 token ids; `pad_id` after a row's EOS.
    logprobs: [R, N] float32 log-prob of each token under the distribution it
      was drawn from (temperature, top-k, top-p applied); 0 where mask is 0.
    mask: [R, N] int32, 1 for generated tokens up to and including EOS.
    lengths: [R] int32 number of generated tokens (mask.sum(-1)).
    truncated: [R] bool, no EOS within max_new_tokens.
    prompt_index: [R] int32, the prompt each row continues (row // n).
    prompts, prompt_mask: [R, P] the prompts (as given, left-padded), repeated n times.
    raw_logprobs: [R, N] float32 plain log-softmax of the model's logits at
      each token (what a teacher-forced forward pass recomputes), or None.
    """

    completions: Array
    logprobs: Array
    mask: Array
    lengths: Array
    truncated: Array
    prompt_index: Array
    prompts: Array
    prompt_mask: Array
    raw_logprobs: Array | None = None

    def sequences(self) -> tuple[Array, Array]:
        """`[prompt ; completion]` tokens and mask, `[R, P + N]` each.

        Left padding then right padding: a model's default positions (counted
        over mask 1 tokens) give each real token the position it had while
        sampling, so `model(tokens, attention_mask=mask)[:, P-1:-1]` are the
        logits that produced the completion.
        """
        tokens = jnp.concatenate([self.prompts, self.completions.astype(self.prompts.dtype)], axis=1)
        mask = jnp.concatenate([self.prompt_mask.astype(jnp.int32), self.mask], axis=1)
        return tokens, mask


class CompileStats(NamedTuple):
    count: int
    seconds: float


@dataclasses.dataclass(frozen=True)
class _Static:
    """Options that change the compiled program (everything else is a traced argument)."""

    n: int
    buffer: int  # bucketed max_new_tokens: width of the output buffers
    greedy: bool
    use_top_k: bool
    use_top_p: bool
    raw_logprobs: bool


_compiled: dict[Any, Any] = {}
_stats = {"count": 0, "seconds": 0.0}


def compile_stats() -> CompileStats:
    """Compiles so far in this process (all samplers) and the seconds they took."""
    return CompileStats(_stats["count"], _stats["seconds"])


class Sampler:
    """Generation for one model architecture, called with any params of that architecture.

        sampler = Sampler(model)
        result = sampler(params, prompts, prompt_mask, max_new_tokens=..., rng=...)

    `params` is the model's Param state as `nnx.split(model, nnx.Param, ...)`
    gives it, or its `nnx.to_pure_dict` (the train state's layout): any pytree
    whose leaves come in the same order.
    """

    def __init__(self, model: nnx.Module):
        self.graphdef, state, self.rest = nnx.split(model, nnx.Param, ...)
        self.param_treedef = jax.tree.structure(state)
        self._param_leaves = [jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))
                              for x in jax.tree.leaves(state)]  # kept as shapes only: `precompile`'s default
        self._param_shapes = [tuple(x.shape) for x in self._param_leaves]
        # An abstract model's non-Param state (none in jaxalign's models) has no values to run with.
        self._abstract_rest = any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(self.rest))
        self.cfg = model.cfg

    def __call__(self, params: Any, prompts: Array, prompt_mask: Array, *, max_new_tokens: int, rng: Array,
                 temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                 eos_ids: tuple[int, ...] = (), n: int = 1, greedy: bool = False, pad_id: int = 0,
                 return_raw_logprobs: bool = False) -> SampleResult:
        """Sample `n` completions for each of the B prompts.

        prompts, prompt_mask: [B, P], left-padded (mask 1 = real token).
        max_new_tokens: generation budget per row.
        rng: a PRNG key; a fixed key gives a fixed result. The token of
          column t is drawn with `fold_in(rng, t)` over the whole [B*n, V]
          batch, so row r's draws depend only on (rng, r, t).
        temperature, top_k, top_p: see `logits_processing` (None: no filter).
        eos_ids: tokens that end a row (kept in the completion, mask 1);
          empty: every row runs `max_new_tokens`.
        greedy: take the most likely token instead of sampling (logprobs
          still refer to the tempered/filtered distribution).
        pad_id: filler after EOS (and for the bucketing's extra left padding).
        return_raw_logprobs: also return the unprocessed model log-probs.
        """
        if self._abstract_rest:
            raise ValueError("this sampler was built from an abstract model whose non-parameter state has no "
                             "values; build it from the loaded model to run it")
        static, args, (prompts, prompt_mask) = self._prepare(
            params, prompts, prompt_mask, max_new_tokens=max_new_tokens, rng=rng, temperature=temperature,
            top_k=top_k, top_p=top_p, eos_ids=eos_ids, n=n, greedy=greedy, pad_id=pad_id,
            return_raw_logprobs=return_raw_logprobs)
        out = self._executable(static, args)(*args)
        return _finish(out, prompts, prompt_mask, max_new_tokens, n)

    def precompile(self, batch: int, prompt_len: int, *, max_new_tokens: int, params: Any = None, n: int = 1,
                   greedy: bool = False, top_k: int | None = None, top_p: float | None = None,
                   eos_ids: tuple[int, ...] = (), return_raw_logprobs: bool = False,
                   rng: Array | None = None) -> None:
        """Compile now the program a call with these shapes and options will run.

        batch, prompt_len: the prompts' shape [B, P] (P is bucketed as in a call).
        params: the params the calls will pass, or their `jax.ShapeDtypeStruct`s
          (shape, dtype, sharding); default: the model's own, where a leaf
          without a sharding (an abstract model's) means the default device.
        The other options are those of `__call__`; only what changes the
        program matters (`max_new_tokens`'s bucket, `n`, `greedy`, whether
        `top_k` / `top_p` are set, the number of `eos_ids`,
        `return_raw_logprobs`), not the values. rng: a key of the kind the
        calls pass (default a typed `jax.random.key`; a legacy `PRNGKey` is
        another program); its value does not matter. The small ops a call
        runs around the program (the cut to `max_new_tokens`, the prompts
        repeated `n` times) are compiled here too: a matching call compiles
        nothing.

        No weights are needed: built on `jaxalign.models.abstract_hf`'s model,
        the sampler compiles (or loads from the compilation cache) before
        `load_hf` reads the weights, so the compiler's host memory peak comes
        and goes before the weights take theirs (docs/sampling.md).
        """
        if params is None:
            params = jax.tree.unflatten(self.param_treedef, self._param_leaves)
        default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                             sharding=getattr(x, "sharding", None) or default), params)
        prompts = np.zeros((batch, prompt_len), np.int32)
        static, args, (prompts, prompt_mask) = self._prepare(
            params, prompts, np.ones_like(prompts), max_new_tokens=max_new_tokens,
            rng=jax.random.key(0) if rng is None else rng, temperature=1.0, top_k=top_k, top_p=top_p,
            eos_ids=eos_ids, n=n, greedy=greedy, pad_id=0, return_raw_logprobs=return_raw_logprobs, compiling=True)
        compiled = self._executable(static, args)
        # A call also runs a few small ops around the program (the cut to max_new_tokens, the prompts
        # repeated n times), each compiled at its first use. Running them here on zeros of the outputs'
        # shapes compiles them now too, so the first call compiles nothing on top of the weights.
        zeros = jax.tree.map(lambda s, where: jax.device_put(np.zeros(s.shape, s.dtype), where),
                             compiled.out_info, compiled.output_shardings)
        _finish(zeros, prompts, prompt_mask, max_new_tokens, n)

    def _prepare(self, params: Any, prompts: Array, prompt_mask: Array, *, max_new_tokens: int, rng: Array,
                 temperature: float, top_k: int | None, top_p: float | None, eos_ids: tuple[int, ...], n: int,
                 greedy: bool, pad_id: int, return_raw_logprobs: bool,
                 compiling: bool = False) -> tuple[_Static, tuple, tuple[Array, Array]]:
        """Checks a call's arguments -> (static options, the program's arguments, (prompts, mask) on device)."""
        if max_new_tokens < 1 or n < 1:
            raise ValueError(f"max_new_tokens and n must be >= 1, got {max_new_tokens}, {n}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0 (for argmax decoding pass greedy=True), got {temperature}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be >= 1 (None: no top-k), got {top_k}")
        if top_p is not None and not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (None: no top-p), got {top_p}")
        leaves = jax.tree.leaves(params)
        if [tuple(x.shape) for x in leaves] != self._param_shapes:
            raise ValueError("params do not match the sampler's model (shapes or leaf order differ)")
        if not compiling and any(isinstance(x, jax.ShapeDtypeStruct) for x in leaves):
            raise ValueError("params are shapes only (an abstract model's); pass the loaded params "
                             "(`Sampler.precompile` is the call that needs no values)")
        # One layout for the compiled program, whatever layout the caller holds (no copies).
        params = jax.tree.unflatten(self.param_treedef, leaves)
        prompts, prompt_mask = _int32_on_device(prompts), _int32_on_device(prompt_mask)
        if prompt_mask.is_fully_addressable:
            host_mask = np.asarray(prompt_mask)
            check_left_padded(host_mask)
            self._check_positions(int(host_mask.sum(-1).max()) + max_new_tokens - 1)
        width = prompts.shape[1]
        padded, padded_mask = left_pad(prompts, prompt_mask, bucket_length(width), pad_id)
        static = _Static(n=n, buffer=bucket_length(max_new_tokens), greedy=greedy, use_top_k=top_k is not None,
                         use_top_p=top_p is not None, raw_logprobs=return_raw_logprobs)
        # Host scalars as NumPy: a jnp scalar would be one more compiled program per dtype.
        args = (params, self.rest, padded, padded_mask, rng, np.float32(temperature),
                np.int32(top_k or 0), np.float32(1.0 if top_p is None else top_p), np.int32(max_new_tokens),
                np.asarray(eos_ids, np.int32).reshape(-1), np.int32(pad_id))
        return static, args, (prompts, prompt_mask)

    def _check_positions(self, last_position: int) -> None:
        # A learned position table has no row beyond its size (a gather there
        # would silently read garbage); rotary positions have no such limit.
        limit = self.cfg.max_position_embeddings
        if self.cfg.positions == "learned" and last_position >= limit:
            raise ValueError(f"prompt + max_new_tokens needs position {last_position}, "
                             f"the model has {limit} learned positions")

    def _executable(self, static: _Static, args: tuple):
        def spec(x):
            return (x.shape, x.dtype, getattr(x, "sharding", None))

        leaves = jax.tree.leaves(args)
        sharding = getattr(leaves[0], "sharding", None)  # the first param's
        device = next(iter(sharding.device_set)) if sharding is not None else jax.devices()[0]
        options = sampler_compiler_options(device.platform)
        key = (self.graphdef, jax.tree.structure(args), static, tuple(spec(x) for x in leaves),
               tuple(sorted((options or {}).items())))
        if key not in _compiled:
            start = time.perf_counter()
            fn = jax.jit(functools.partial(_rollout, self.graphdef, static))
            lowered = fn.lower(*args)
            release_host_memory()  # before and after: the compile's peak stacks on neither side's freed heap
            _compiled[key] = lowered.compile(options)
            release_host_memory()
            _stats["count"] += 1
            _stats["seconds"] += time.perf_counter() - start
        return _compiled[key]


def generate(model: nnx.Module, prompts: Array, prompt_mask: Array, *, max_new_tokens: int, rng: Array,
             **options) -> SampleResult:
    """Sample from `model` with its own params; see `Sampler.__call__` for the options."""
    params = nnx.state(model, nnx.Param)
    return Sampler(model)(params, prompts, prompt_mask, max_new_tokens=max_new_tokens, rng=rng, **options)


class _Loop(NamedTuple):
    step: Array  # [] column being filled
    last: Array  # [R] token to feed the model at this step
    done: Array  # [R] bool, EOS already emitted
    tokens: Array  # [R, N]
    logprobs: Array  # [R, N]
    raw: Array | None  # [R, N]
    mask: Array  # [R, N]
    cache: KVCache


def _rollout(graphdef, static: _Static, params, rest, prompts, prompt_mask, rng, temperature, top_k, top_p,
             max_new_tokens, eos_ids, pad_id):
    """The traced program. prompts, prompt_mask: [B, P] -> SampleResult fields over [B*n, buffer]."""
    model = nnx.merge(graphdef, params, rest)
    b, width = prompts.shape
    rows, buffer = b * static.n, static.buffer

    cache = model.init_cache(batch=b, max_len=width)
    hidden, cache = model.hidden_states(prompts, attention_mask=prompt_mask, cache=cache)
    first_logits = jnp.repeat(model.logits(hidden[:, -1:])[:, 0], static.n, axis=0)  # [R, V]
    # Column 0 comes from the prefill; columns 1..N-1 each need one decode step,
    # so the cache holds width + buffer - 1 tokens at most.
    cache = _expand_cache(cache, static.n, width + buffer)

    def pick(logits, step):
        logp = sampling_logprobs(logits, temperature=temperature, top_k=top_k if static.use_top_k else None,
                                 top_p=top_p if static.use_top_p else None)
        if static.greedy:
            token = argmax_first(logp)
        else:
            token = sample_categorical(jax.random.fold_in(rng, step), logp)
        raw = token_logprobs(jax.nn.log_softmax(logits, axis=-1), token) if static.raw_logprobs else None
        return token.astype(jnp.int32), token_logprobs(logp, token), raw

    def record(loop: _Loop, logits: Array, cache: KVCache) -> _Loop:
        token, logprob, raw = pick(logits, loop.step)
        live = ~loop.done
        token = jnp.where(live, token, pad_id)

        def put(buf, col):
            return jax.lax.dynamic_update_index_in_dim(buf, col.astype(buf.dtype), loop.step, axis=1)

        return _Loop(step=loop.step + 1, last=token, done=loop.done | jnp.isin(token, eos_ids),
                     tokens=put(loop.tokens, token), logprobs=put(loop.logprobs, jnp.where(live, logprob, 0.0)),
                     raw=None if raw is None else put(loop.raw, jnp.where(live, raw, 0.0)),
                     mask=put(loop.mask, live), cache=cache)

    zeros = jnp.zeros((rows, buffer), jnp.float32)
    loop = _Loop(step=jnp.int32(0), last=jnp.zeros((rows,), jnp.int32), done=jnp.zeros((rows,), bool),
                 tokens=jnp.full((rows, buffer), pad_id, jnp.int32), logprobs=zeros,
                 raw=zeros if static.raw_logprobs else None, mask=jnp.zeros((rows, buffer), jnp.int32), cache=cache)
    loop = record(loop, first_logits, cache)

    def keep_going(loop: _Loop):
        return (loop.step < max_new_tokens) & ~jnp.all(loop.done)

    def decode(loop: _Loop) -> _Loop:
        hidden, cache = model.hidden_states(loop.last[:, None], cache=loop.cache)
        return record(loop, model.logits(hidden)[:, 0], cache)

    loop = jax.lax.while_loop(keep_going, decode, loop)
    return dict(completions=loop.tokens, logprobs=loop.logprobs, mask=loop.mask, lengths=loop.mask.sum(-1),
                truncated=~loop.done, prompt_index=jnp.arange(rows, dtype=jnp.int32) // static.n,
                raw_logprobs=loop.raw)


def _expand_cache(cache: KVCache, n: int, max_len: int) -> KVCache:
    """Repeat each row n times (contiguously) and extend the slots to `max_len` (empty, invalid)."""
    grow = max_len - cache.max_len

    def rows(x):
        return jnp.repeat(x, n, axis=0) if n > 1 else x

    def kv(x):  # [B, KV, S, Dh]
        return jnp.pad(rows(x), ((0, 0), (0, 0), (0, grow), (0, 0)))

    return KVCache(k=tuple(kv(x) for x in cache.k), v=tuple(kv(x) for x in cache.v),
                   valid=jnp.pad(rows(cache.valid), ((0, 0), (0, grow))), index=cache.index,
                   next_pos=rows(cache.next_pos))


__all__ = ["CompileStats", "SampleResult", "Sampler", "compile_stats", "generate"]


def _finish(out: dict, prompts: Array, prompt_mask: Array, max_new_tokens: int, n: int) -> SampleResult:
    """The program's outputs -> the call's `SampleResult` (prompts, prompt_mask: [B, P] as given)."""
    # The program fills a bucket-wide buffer; columns past max_new_tokens stay empty.
    for name in ("completions", "logprobs", "mask", "raw_logprobs"):
        if out[name] is not None:  # a full-width slice is the array itself (no program)
            out[name] = out[name][:, :max_new_tokens]
    if n > 1:
        prompts, prompt_mask = jnp.repeat(prompts, n, axis=0), jnp.repeat(prompt_mask, n, axis=0)
    return SampleResult(**out, prompts=prompts, prompt_mask=prompt_mask)


def _int32_on_device(x) -> jax.Array:
    """An int32 device array; a host array goes by `device_put` (no staging program compiled)."""
    if isinstance(x, jax.Array):
        return x if x.dtype == jnp.int32 else x.astype(jnp.int32)
    return jax.device_put(np.asarray(x, np.int32))
