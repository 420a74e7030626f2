"""Jitted autoregressive generation over a preallocated KV cache.

    result = generate(model, prompts, prompt_mask, max_new_tokens=64, rng=jax.random.key(0),
                      temperature=1.0, top_p=0.95, eos_ids=(2,), n=8)
    result.completions   # [B*n, 64]; rows i*n .. i*n+n-1 sample prompt i

One call is: prefill the B left-padded prompts once, repeat the cache n times
along the batch (the GRPO group shares its prompt's keys and values), then a
`lax.while_loop` that feeds one token per step and stops when every row has
emitted an EOS or `max_new_tokens` is reached. That is one program, holding one
layer body whatever the depth (the model scans its stacked layers). On a mesh
the cache is sharded like the activations: rows over `data`/`fsdp`, KV heads
over `tensor`; `Sampler(cache_dtype=jnp.bfloat16)` halves it.

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
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxalign.host import sampler_compiler_options
from jaxalign import sharding
from jaxalign.models import KVCache
from jaxalign.sampling.buckets import bucket_length, check_left_padded, left_pad
from jaxalign.sampling import decoding
from jaxalign.sampling.decoding import (Draw, Loop, Static, compiled, grow_rows, keep_going, out_shapes,
                                        outputs, record, spec, start)

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


def compile_stats() -> CompileStats:
    """Compiles so far in this process (all samplers) and the seconds they took."""
    return CompileStats(decoding._stats["count"], decoding._stats["seconds"])


class Sampler:
    """Generation for one model architecture, called with any params of that architecture.

        sampler = Sampler(model)
        result = sampler(params, prompts, prompt_mask, max_new_tokens=..., rng=...)

    `params` is the model's Param state as `nnx.split(model, nnx.Param, ...)`
    gives it, or its `nnx.to_pure_dict` (the train state's layout): any pytree
    whose leaves come in the same order.

    Args:
      model: the model (loaded, or `abstract_hf`'s shapes only to `precompile`).
      cache_dtype: the KV cache's dtype (default: the model's compute dtype);
        `jnp.bfloat16` halves the cache of a float32 model, at the price of
        log-probs that differ from a float32 teacher-forced pass by the rounding.
    """

    def __init__(self, model: nnx.Module, *, cache_dtype=None):
        self.graphdef, state, self.rest = nnx.split(model, nnx.Param, ...)
        self.param_treedef = jax.tree.structure(state)
        self.cache_dtype = None if cache_dtype is None else jnp.dtype(cache_dtype).name
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
        out = out_shapes(self._executable(static, args))
        # A call also runs a few small ops around the program (the cut to max_new_tokens, the prompts
        # repeated n times), each compiled at its first use. Running them here on zeros of the outputs'
        # shapes compiles them now too, so the first call compiles nothing on top of the weights.
        zeros = jax.tree.map(lambda s: jax.device_put(np.zeros(s.shape, s.dtype), s.sharding), out)
        _finish(zeros, prompts, prompt_mask, max_new_tokens, n)

    def _prepare(self, params: Any, prompts: Array, prompt_mask: Array, *, max_new_tokens: int, rng: Array,
                 temperature: float, top_k: int | None, top_p: float | None, eos_ids: tuple[int, ...], n: int,
                 greedy: bool, pad_id: int, return_raw_logprobs: bool,
                 compiling: bool = False) -> tuple[Static, tuple, tuple[Array, Array]]:
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
        static = Static(n=n, buffer=bucket_length(max_new_tokens), greedy=greedy, use_top_k=top_k is not None,
                        use_top_p=top_p is not None, raw_logprobs=return_raw_logprobs, cache_dtype=self.cache_dtype)
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

    def _executable(self, static: Static, args: tuple):
        leaves = jax.tree.leaves(args)
        options = sampler_compiler_options(_device(leaves[0]).platform)
        key = ("rollout", self.graphdef, jax.tree.structure(args), static, tuple(spec(x) for x in leaves),
               tuple(sorted((options or {}).items())))
        return compiled(key, functools.partial(_rollout, self.graphdef, static), args, options)


def generate(model: nnx.Module, prompts: Array, prompt_mask: Array, *, max_new_tokens: int, rng: Array,
             **options) -> SampleResult:
    """Sample from `model` with its own params; see `Sampler.__call__` for the options."""
    params = nnx.state(model, nnx.Param)
    return Sampler(model)(params, prompts, prompt_mask, max_new_tokens=max_new_tokens, rng=rng, **options)


def _rollout(graphdef, static: Static, params, rest, prompts, prompt_mask, *sampling):
    """The traced one-program generation. prompts, prompt_mask: [B, P] -> SampleResult fields over [B*n, buffer].

    sampling: the `Draw` fields (rng, temperature, top_k, top_p, max_new_tokens, eos_ids, pad_id).
    """
    draw = Draw(*sampling)
    model = nnx.merge(graphdef, params, rest)
    width = prompts.shape[1]
    place = _cache_placement(params)
    cache = place(model.init_cache(batch=prompts.shape[0], max_len=width, dtype=static.cache_dtype))
    hidden, cache = model.hidden_states(prompts, attention_mask=prompt_mask, cache=cache)
    first_logits = grow_rows(model.logits(hidden[:, -1:])[:, 0], static.n)  # [R, V]
    segments = cache_segments(width, static.buffer)
    cache = place(expand_cache(cache, static.n, segments[0][1]))
    loop = start(static, draw, first_logits, cache)

    def decode(loop: Loop) -> Loop:
        hidden, cache = model.hidden_states(loop.last[:, None], cache=loop.cache)
        return record(static, draw, loop, model.logits(hidden)[:, 0], place(cache))

    for i, (end, slots) in enumerate(segments):  # the cache grows between segments: attention reads what is filled
        if i:
            loop = loop._replace(cache=place(expand_cache(loop.cache, 1, slots)))
        loop = jax.lax.while_loop(lambda loop, end=end: keep_going(draw, loop) & (loop.step < end), decode, loop)
    return outputs(static, loop)


# Decode segments: a buffer of at least 2 x MIN_SEGMENT columns is filled in up to MAX_SEGMENTS equal
# segments, each attending over a cache just long enough for it (a decode step reads all of its cache).
MIN_SEGMENT, MAX_SEGMENTS = 32, 4


def cache_segments(width: int, buffer: int) -> list[tuple[int, int]]:
    """(end column, cache slots) of each decode segment for prompts `width` wide and `buffer` columns.

    Column 0 comes from the prefill; column c > 0 is drawn by the decode step that writes slot
    `width + c - 1`, so a segment ending at column `end` needs `width + end - 1` slots (the last one
    gets `width + buffer`, the cache without segments). Attention at a decode step reads every slot of
    its cache, empty ones masked: with 4 segments the steps read 5/8 of the slots a single full-length
    cache makes them read (the prompt aside), at the price of a decode body compiled per segment and a
    copy of the cache between segments (buffer 256: 4 segments of 64 columns; 64: 2 of 32; 32: one).
    """
    count = max(1, min(MAX_SEGMENTS, buffer // MIN_SEGMENT))
    ends = [buffer * (i + 1) // count for i in range(count)]
    return [(end, width + end - (end < buffer)) for end in ends]


# The cache's logical axes ([L, B, KV, S, Dh]): rows like a batch, KV heads like the K/V projections.
CACHE_AXES = ("layers", "batch", "kv_heads", None, "head_dim")


def _cache_placement(params):
    """A function constraining a cache's k, v to the params' mesh (`CACHE_AXES`); identity off a mesh."""
    shardings = [getattr(x, "sharding", None) for x in jax.tree.leaves(params)]
    mesh = next((s.mesh for s in shardings if isinstance(s, jax.sharding.NamedSharding)), None)
    if mesh is None or mesh.size == 1:
        return lambda cache: cache

    def place(cache: KVCache) -> KVCache:
        where = jax.sharding.NamedSharding(mesh, sharding.spec_for(CACHE_AXES, cache.k.shape, mesh))
        k, v = (jax.lax.with_sharding_constraint(x, where) for x in (cache.k, cache.v))
        return dataclasses.replace(cache, k=k, v=v)

    return place


def expand_cache(cache: KVCache, n: int, max_len: int) -> KVCache:
    """Repeat each row n times (contiguously) and extend the slots to `max_len` (empty, invalid)."""
    grow = max_len - cache.max_len

    def kv(x):  # [L, B, KV, S, Dh] -> [L, B*n, KV, max_len, Dh]
        x = jnp.repeat(x, n, axis=1) if n > 1 else x
        return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, grow), (0, 0)))

    return KVCache(k=kv(cache.k), v=kv(cache.v), valid=jnp.pad(grow_rows(cache.valid, n), ((0, 0), (0, grow))),
                   index=cache.index, next_pos=grow_rows(cache.next_pos, n))


__all__ = ["CACHE_AXES", "CompileStats", "SampleResult", "Sampler", "compile_stats", "expand_cache", "generate"]


def _finish(out: dict, prompts: Array, prompt_mask: Array, max_new_tokens: int, n: int) -> SampleResult:
    """The program's outputs -> the call's `SampleResult` (prompts, prompt_mask: [B, P] as given)."""
    # The program fills a bucket-wide buffer; columns past max_new_tokens stay empty.
    for name in ("completions", "logprobs", "mask", "raw_logprobs"):
        if out[name] is not None:  # a full-width slice is the array itself (no program)
            out[name] = out[name][:, :max_new_tokens]
    if n > 1:
        prompts, prompt_mask = jnp.repeat(prompts, n, axis=0), jnp.repeat(prompt_mask, n, axis=0)
    return SampleResult(**out, prompts=prompts, prompt_mask=prompt_mask)


def _device(x) -> jax.Device:
    """The (first) device an argument lives on; the default device for a host value."""
    sharding = getattr(x, "sharding", None)
    return next(iter(sharding.device_set)) if sharding is not None else jax.devices()[0]


def _int32_on_device(x) -> jax.Array:
    """An int32 device array; a host array goes by `device_put` (no staging program compiled)."""
    if isinstance(x, jax.Array):
        return x if x.dtype == jnp.int32 else x.astype(jnp.int32)
    return jax.device_put(np.asarray(x, np.int32))
