"""The train state: a plain pytree, so the step is a pure, jittable function.

An NNX model is split once into a static `ModelDef` (graph definition, the
structure of its Params with their metadata, and any non-Param variables) and
a pure nested dict of Param arrays. Only the dict lives in the `TrainState`;
the step rebuilds the module with `ModelDef.merge` inside the trace.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from jaxalign import sharding as shd


class TrainState(NamedTuple):
    """Everything a step reads and writes; all leaves are jax arrays.

    params: pure nested dict of Param arrays (`nnx.to_pure_dict` layout).
    opt_state: the optax state for the trainable `params` (`ModelDef.split_trainable`; all of them
      unless the model has frozen Params, e.g. a LoRA model's base).
    step: int32 [] — steps taken, including skipped (non-finite) ones.
    rng: uint32 [2] — raw PRNG key, split once per step (raw so Orbax saves it).
    skipped_steps: int32 [] — steps whose update was dropped by the NaN guard.
    """

    params: Any
    opt_state: Any
    step: jax.Array
    rng: jax.Array
    skipped_steps: jax.Array


@dataclasses.dataclass(frozen=True, eq=False)
class ModelDef:
    """The static half of a split NNX model: rebuilds a module from params."""

    graphdef: Any
    param_treedef: Any
    rest: Any
    # Pure dict of bools over the params, True where a Param trains (a LoRA model: its adapters and
    # any head); None: all train. Frozen Params get no gradient and no optimizer state.
    trainable: Any = None

    @classmethod
    def of(cls, model: nnx.Module) -> tuple["ModelDef", dict]:
        """Splits `model` into (ModelDef, pure params dict)."""
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        pure = nnx.to_pure_dict(params)
        mask = nnx.to_pure_dict(params, extract_fn=lambda v: not v.get_metadata().get("frozen", False))
        trainable = None if all(jax.tree.leaves(mask)) else mask
        # `merge` maps dict leaves to Variable leaves by position; both flatten
        # in sorted-key order, checked here once rather than trusted.
        var_paths = [p[:-1] for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
        dict_paths = [p for p, _ in jax.tree_util.tree_flatten_with_path(pure)[0]]
        if [_keys(p) for p in var_paths] != [_keys(p) for p in dict_paths]:
            raise ValueError("Param state and its pure dict flatten in different orders")
        return cls(graphdef, jax.tree.structure(params), rest, trainable), pure

    def merge(self, params: Any) -> nnx.Module:
        """A module whose Params are `params` (works on tracers inside jit)."""
        state = jax.tree.unflatten(self.param_treedef, jax.tree.leaves(params))
        return nnx.merge(self.graphdef, state, self.rest)

    def split_trainable(self, tree: Any) -> tuple[Any, Any]:
        """A params-shaped dict -> (trainable part, frozen part), two nested dicts."""
        if self.trainable is None:
            return tree, {}
        return _select(tree, self.trainable, True), _select(tree, self.trainable, False)

    def join(self, trainable: Any, frozen: Any) -> Any:
        """The inverse of `split_trainable`."""
        if self.trainable is None:
            return trainable
        return _union(trainable, frozen)


def _select(tree: dict, mask: dict, keep: bool) -> dict:
    out = {}
    for k, m in mask.items():
        v = _select(tree[k], m, keep) if isinstance(m, dict) else (tree[k] if m == keep else {})
        if not (isinstance(v, dict) and not v):
            out[k] = v
    return out


def _union(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _union(out[k], v) if k in out else v
    return out


def _keys(path) -> tuple:
    return tuple(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))) for k in path)


def init_train_state(
    model: nnx.Module,
    optimizer: optax.GradientTransformation,
    *,
    mesh: Mesh | None = None,
    seed: int = 0,
) -> tuple[TrainState, ModelDef]:
    """Builds the initial state, placed on `mesh` by the rules table.

    Params keep their placement if the model was already sharded
    (`shard_model`, `create_sharded_model`), else are moved. The optimizer
    state is created directly in its shards; scalars are replicated.
    `mesh=None` means one device.

    The state takes over the model's arrays where they already sit in their
    shards: the step donates them, so after the first step the model object
    itself no longer holds valid Params. Copy (or `nnx.clone`) the model
    first if it must stay usable, e.g. as a frozen reference.
    """
    if mesh is None:
        mesh = shd.make_mesh(shd.MeshConfig(), devices=jax.devices()[:1])
    model_def, params = ModelDef.of(model)
    p_shard = shd.param_shardings(model, mesh)
    params = jax.device_put(params, p_shard)
    trained, trained_shard = model_def.split_trainable(params)[0], model_def.split_trainable(p_shard)[0]
    abstract_opt = jax.eval_shape(optimizer.init, trained)
    o_shard = shd.opt_state_shardings(abstract_opt, trained_shard, mesh)
    opt_state = jax.jit(optimizer.init, out_shardings=o_shard)(trained)
    rep = shd.replicated(mesh)
    state = TrainState(
        params=params,
        opt_state=opt_state,
        step=jax.device_put(jnp.zeros((), jnp.int32), rep),
        rng=jax.device_put(jax.random.PRNGKey(seed), rep),
        skipped_steps=jax.device_put(jnp.zeros((), jnp.int32), rep),
    )
    return state, model_def


def state_shardings(state: TrainState) -> TrainState:
    """The sharding of every leaf of a placed (or abstract, sharded) state."""
    return jax.tree.map(lambda x: x.sharding, state)


def abstract_state(state: TrainState) -> TrainState:
    """ShapeDtypeStructs with shardings: the restore target for a checkpoint."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
    )
