"""Generation by runs of layers: one compiled program per kind of run, called run after run from the host.

The one-program sampler (`sampler._rollout`) holds the decoder twice (the
prefill and the decode loop's body), unrolled layer by layer: its program,
its compile time and the compiler's memory grow with the depth (about
2.1 MB of executable and 0.45 s of compile per layer on XLA:CPU,
docs/sampling.md). Here the decoder is cut into runs of a few consecutive
layers; a run is compiled once per kind (runs whose layers differ only in
their weights share a program) and called with its layers' weights, so the
programs hold a few layers whatever the depth:

    prefill_embed                          prompts -> x, positions
    prefill_layers (once per run)          x -> x, the run's caches (repeated n times, full width)
    first          final norm, LM head, column 0 of the output
    decode_embed    \
    decode_layers    | once per new token, while a row lacks its EOS and budget is left
    decode_head     /  (decode_layers once per run; it writes the run's caches in place)
    finish         the outputs

The loop state and the token pick are `decoding`'s, as in the one-program
sampler, so both draw the same tokens from the same logits. The price is a
host round trip per token and a dispatch (~0.2 ms on XLA:CPU) per run and
token: nothing once a run takes milliseconds (`layers_per_run`), a loss for
a tiny model; `Sampler` chooses (`wanted`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxalign.models import KVCache, Transformer
from jaxalign.models.layers import default_positions, make_attention_mask
from jaxalign.sampling.decoding import Draw, Loop, Static, compiled, grow_kv, grow_rows, keep_going, outputs, record
from jaxalign.sampling.decoding import out_shapes, spec, start

Array = jax.Array

# Weights one call runs at least: consecutive layers are grouped into runs this large, so that a run's
# decode step takes milliseconds and its dispatch (~0.2 ms on XLA:CPU) is a few percent of it.
RUN_BYTES = 32 << 20
# The layer loop is the default when the decoder makes at least this many runs (each program then holds
# a quarter of the decoder or less); with fewer, one program is as small and faster.
MIN_RUNS = 4


def layers_per_run(model: nnx.Module) -> int:
    """Consecutive layers one call of the layer loop runs: the fewest holding `RUN_BYTES` of weights,
    rounded up to a divisor of the depth where one is near (runs of one length share one program).

    A 30-layer model of 13.5 MiB a layer: 3; a 2-layer model of 66 KiB a layer: 2, all of them.
    """
    depth = len(model.layers)
    leaves = jax.tree.leaves(nnx.state(model.layers[0], nnx.Param))
    layer_bytes = sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in leaves)
    need = min(depth, max(1, -(-RUN_BYTES // max(layer_bytes, 1))))
    return next((d for d in range(need, min(depth, 2 * need) + 1) if depth % d == 0), need)


def wanted(model: nnx.Module) -> bool:
    """Whether `Sampler` runs `model` by runs of layers by default: a `Transformer` whose decoder makes at
    least `MIN_RUNS` runs of `layers_per_run` layers (SmolLM2-135M: 10 runs of 3; the tiny Llama: 1)."""
    if not isinstance(model, Transformer) or not len(model.layers):
        return False
    return -(-len(model.layers) // layers_per_run(model)) >= MIN_RUNS


class LayerLoop:
    """The layer-by-layer programs of one `Transformer` architecture (no weights kept).

    Args:
      model: the model (loaded or abstract); only its structure is read.
      leaf_paths: the key paths of its Param leaves, in the order the sampler flattens params.
      per_program: consecutive layers run by one call (a program holds that many layers): fewer
        calls per token against a larger program; default `layers_per_run(model)`.

    Raises ValueError when the model cannot be split so (not a `Transformer`,
    or a layer holds state other than parameters).
    """

    def __init__(self, model: nnx.Module, leaf_paths: list[tuple], per_program: int | None = None):
        if not isinstance(model, Transformer):
            raise ValueError(f"the layer loop runs jaxalign's Transformer, not {type(model).__name__}")
        cfg = model.cfg
        self.layer_leaves: list[list[int]] = [[] for _ in range(cfg.num_layers)]
        self.top_leaves: list[int] = []
        for i, path in enumerate(leaf_paths):
            keys = [getattr(k, "key", getattr(k, "name", None)) for k in path]
            if keys[0] == "layers":
                self.layer_leaves[int(keys[1])].append(i)
            else:
                self.top_leaves.append(i)
        # The model less its layers: embeddings, final norm, LM head, built abstractly with the same switches.
        embed = model.embed
        top = nnx.eval_shape(lambda: Transformer(dataclasses.replace(cfg, num_layers=0, layer_windows=()),
                                                 rngs=nnx.Rngs(0), param_dtype=embed.dtype, dtype=model.dtype,
                                                 lm_head=hasattr(model, "lm_head")))
        self.top_graphdef, top_state = nnx.split(top, nnx.Param)
        self.top_treedef = jax.tree.structure(top_state)
        if self.top_treedef.num_leaves != len(self.top_leaves):
            raise ValueError("the model's parameters outside its layers are not a Transformer's own")
        # Layers that differ only in their weights share one program: the first of each kind stands for all.
        self.kinds: list[tuple[Any, Any]] = []  # (graphdef, treedef of its Param leaves)
        self.kind_of: list[int] = []
        seen: dict[tuple, int] = {}
        for i, block in enumerate(model.layers):
            kind = (cfg.window(i), cfg.rope_for(i), i if cfg.scale_attn_by_inverse_layer_idx else None)
            if kind not in seen:
                graphdef, state, rest = nnx.split(block, nnx.Param, ...)
                if jax.tree.leaves(rest):
                    raise ValueError("the layer loop needs layers that hold parameters only")
                seen[kind] = len(self.kinds)
                self.kinds.append((graphdef, jax.tree.structure(state)))
            self.kind_of.append(seen[kind])
            if self.kinds[seen[kind]][1].num_leaves != len(self.layer_leaves[i]):
                raise ValueError(f"layer {i} does not hold the parameters its kind's first layer does")
        # Runs of `per_program` layers; runs whose layers are of the same kinds in the same order share a program.
        per_program = layers_per_run(model) if per_program is None else per_program
        if per_program < 1:
            raise ValueError(f"per_program must be >= 1, got {per_program}")
        self.per_program = per_program
        # (first layer, end, kinds, their graphdefs, their treedefs): built once, read on every call.
        self.chunks: list[tuple[int, int, tuple[int, ...], tuple, tuple]] = []
        for first in range(0, cfg.num_layers, per_program):
            end = min(first + per_program, cfg.num_layers)
            kinds = tuple(self.kind_of[first:end])
            self.chunks.append((first, end, kinds, tuple(self.kinds[k][0] for k in kinds),
                                tuple(self.kinds[k][1] for k in kinds)))

    def split(self, leaves: list) -> tuple[tuple, list[tuple]]:
        """The sampler's param leaves -> (the top's leaves, each layer's leaves)."""
        return tuple(leaves[i] for i in self.top_leaves), [tuple(leaves[i] for i in ix) for ix in self.layer_leaves]

    def run(self, static: Static, leaves: list, prompts, prompt_mask, sampling: tuple, options: dict | None,
            compile_only: bool = False) -> dict:
        """Generate (or with `compile_only`, compile every program a call with these arguments runs).

        leaves: the params' leaves in the sampler's order (arrays, or
        `ShapeDtypeStruct`s when compiling only); prompts, prompt_mask:
        [B, P] left-padded, on device; sampling: the `Draw` fields.
        Returns the outputs `sampler._rollout` returns (their `ShapeDtypeStruct`s when compiling only).
        """
        opts = tuple(sorted((options or {}).items()))
        programs: dict[Any, Any] = {}  # this call's: the arguments' shapes stay the same through the loop

        def call(name, ident, fn, args, donate=()):
            """Run program `name` of this call; `ident` (graphdefs, static options) tells it from other models'."""
            program = programs.get(name)
            if program is None:
                key = ("layer_loop", name, ident, jax.tree.structure(args),
                       tuple(spec(x) for x in jax.tree.leaves(args)), opts)
                program = programs[name] = compiled(key, fn, args, options, donate)
            if compile_only:  # what comes out: shapes and shardings, for the next program's compile
                return out_shapes(program)
            return program(*args)

        top, layers = self.split(leaves)
        width = prompts.shape[1]
        max_len = width + static.buffer  # as the one-program sampler's cache
        x, positions = call("prefill_embed", self.top_graphdef,
                            functools.partial(_prefill_embed, self.top_graphdef, self.top_treedef),
                            (top, prompts, prompt_mask))
        ks, vs = [], []
        runs = [(kinds, graphdefs, treedefs, tuple(layers[first:end]))
                for first, end, kinds, graphdefs, treedefs in self.chunks]
        for kinds, graphdefs, treedefs, params in runs:
            x, k, v = call(("prefill_layers", kinds), (graphdefs, static.n, max_len),
                           functools.partial(_prefill_layers, graphdefs, treedefs, static.n, max_len),
                           (params, x, positions, prompt_mask))
            ks.append(k)
            vs.append(v)
        loop, go = call("first", (self.top_graphdef, static),
                        functools.partial(_first, self.top_graphdef, self.top_treedef, static),
                        (top, x, prompt_mask, *sampling))
        while compile_only or bool(go):  # one host round trip per token: did every row end, or the budget?
            x, positions, valid = call("decode_embed", self.top_graphdef,
                                       functools.partial(_decode_embed, self.top_graphdef, self.top_treedef),
                                       (top, loop))
            for i, (kinds, graphdefs, treedefs, params) in enumerate(runs):
                # The layers' caches are donated: the new token is written in place.
                x, ks[i], vs[i] = call(("decode_layers", kinds), graphdefs,
                                       functools.partial(_decode_layers, graphdefs, treedefs),
                                       (params, x, ks[i], vs[i], positions, valid, loop.cache.index), donate=(2, 3))
            loop, go = call("decode_head", (self.top_graphdef, static),
                            functools.partial(_decode_head, self.top_graphdef, self.top_treedef, static),
                            (top, x, valid, loop, *sampling), donate=(3,))
            if compile_only:
                break
        return call("finish", static, functools.partial(outputs, static), (loop,))


def _prefill_embed(graphdef, treedef, top, prompts, prompt_mask):
    """prompts, prompt_mask: [B, P] -> input embeddings [B, P, D], positions [B, P]."""
    model = nnx.merge(graphdef, jax.tree.unflatten(treedef, top))
    positions = default_positions(prompt_mask.astype(bool), prompts.shape)
    return model.embed_tokens(prompts, positions), positions


def _prefill_layers(graphdefs, treedefs, n, max_len, params, x, positions, prompt_mask):
    """A run of layers over the prompts: x [B, P, D] -> x, and each layer's keys and values
    [B*n, KV, max_len, Dh] (tuples, one per layer)."""
    b, width = prompt_mask.shape
    slots = jnp.arange(width)
    ks, vs = [], []
    for graphdef, treedef, leaves in zip(graphdefs, treedefs, params):
        block = nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))
        cfg = block.cfg
        mask = make_attention_mask(slots, slots, prompt_mask.astype(bool), cfg.window(block.layer))
        empty = jnp.zeros((b, cfg.num_kv_heads, width, cfg.head_dim), x.dtype)
        x, (k, v) = block(x, positions, mask, (empty, empty), jnp.int32(0))
        ks.append(grow_kv(k, n, max_len))
        vs.append(grow_kv(v, n, max_len))
    return x, tuple(ks), tuple(vs)


def _first(graphdef, treedef, static: Static, top, x, prompt_mask, *sampling):
    """The prefill's last hidden states [B, P, D] -> the loop with column 0 drawn, and whether to go on."""
    draw = Draw(*sampling)
    model = nnx.merge(graphdef, jax.tree.unflatten(treedef, top))
    logits = grow_rows(model.logits(model.final_norm(x[:, -1:]))[:, 0], static.n)  # [R, V]
    valid = grow_rows(prompt_mask.astype(bool), static.n)
    cache = KVCache(k=(), v=(), valid=jnp.pad(valid, ((0, 0), (0, static.buffer))),
                    index=jnp.int32(prompt_mask.shape[1]), next_pos=valid.sum(-1).astype(jnp.int32))
    loop = start(static, draw, logits, cache)
    return loop, keep_going(draw, loop)


def _decode_embed(graphdef, treedef, top, loop: Loop):
    """The tokens just drawn -> their embeddings [R, 1, D], positions [R, 1], the valid slots with theirs."""
    model = nnx.merge(graphdef, jax.tree.unflatten(treedef, top))
    cache = loop.cache
    positions = cache.next_pos[:, None]
    valid = jax.lax.dynamic_update_slice_in_dim(cache.valid, jnp.ones_like(cache.valid[:, :1]), cache.index, axis=1)
    return model.embed_tokens(loop.last[:, None], positions), positions, valid


def _decode_layers(graphdefs, treedefs, params, x, ks, vs, positions, valid, index):
    """A run of layers for one token: x [R, 1, D] -> x, and each layer's keys and values with slot `index`
    written."""
    new_k, new_v = [], []
    for graphdef, treedef, leaves, k, v in zip(graphdefs, treedefs, params, ks, vs):
        block = nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))
        mask = make_attention_mask(index + jnp.arange(1), jnp.arange(valid.shape[1]), valid,
                                   block.cfg.window(block.layer))
        x, (k, v) = block(x, positions, mask, (k, v), index)
        new_k.append(k)
        new_v.append(v)
    return x, tuple(new_k), tuple(new_v)


def _decode_head(graphdef, treedef, static: Static, top, x, valid, loop: Loop, *sampling):
    """The last layer's x [R, 1, D] -> the loop with the next column drawn, and whether to go on."""
    draw = Draw(*sampling)
    model = nnx.merge(graphdef, jax.tree.unflatten(treedef, top))
    cache = KVCache(k=(), v=(), valid=valid, index=loop.cache.index + 1, next_pos=loop.cache.next_pos + 1)
    loop = record(static, draw, loop, model.logits(model.final_norm(x))[:, 0], cache)
    return loop, keep_going(draw, loop)


__all__ = ["MIN_RUNS", "RUN_BYTES", "LayerLoop", "layers_per_run", "wanted"]
