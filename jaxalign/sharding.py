"""The device mesh, the one table of logical-axis rules, and placement helpers.

Every `nnx.Param` carries its logical axis names as metadata (`axes`, one name
per dimension). `LOGICAL_AXIS_RULES` maps each name to mesh axes; everything
that places parameters, optimizer state or batches derives its
`NamedSharding` from that table, so changing the parallelism layout is a
one-line edit here.

The same code runs on one CPU, on simulated CPU devices
(`XLA_FLAGS=--xla_force_host_platform_device_count=8`) and on a multi-host TPU
pod after `maybe_initialize_distributed()`.
"""

from __future__ import annotations

import dataclasses
import glob
import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

logger = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")

# Logical name -> mesh axis (a name, a tuple of names, or None = replicated).
# `embed` goes to `fsdp` so that parameters are split across the data-parallel
# replicas of an FSDP group (ZeRO-3 style); the wide projection dims go to
# `tensor` (Megatron style). Small or tiny dims (head_dim, norm scales, the
# learned position table, the scalar value head) stay replicated: splitting
# them saves little memory and costs collectives.
LOGICAL_AXIS_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("layers", None),  # the stacked layers' leading axis: every device holds its share of each layer
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("norm", None),
    ("position", None),
    ("value", None),
)

_RULES = dict(LOGICAL_AXIS_RULES)
_warned_unknown: set[str] = set()


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Sizes of the mesh axes; exactly one may be -1, meaning "all the rest".

    `data`: pure data parallelism (parameters replicated across it).
    `fsdp`: data parallelism with parameters and optimizer state sharded.
    `tensor`: tensor (model) parallelism inside each layer.
    """

    data: int = -1
    fsdp: int = 1
    tensor: int = 1


def resolve_mesh_shape(config: MeshConfig, num_devices: int) -> tuple[int, int, int]:
    """Replaces the -1 entry of `config` so that the sizes multiply to `num_devices`."""
    sizes = [config.data, config.fsdp, config.tensor]
    free = [i for i, s in enumerate(sizes) if s == -1]
    if len(free) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {config}")
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh axis sizes must be positive or -1, got {config}")
    fixed = math.prod(s for s in sizes if s != -1)
    if free:
        if num_devices % fixed:
            raise ValueError(f"{num_devices} devices cannot be split as {config}")
        sizes[free[0]] = num_devices // fixed
    if math.prod(sizes) != num_devices:
        raise ValueError(f"mesh {config} needs {math.prod(sizes)} devices, have {num_devices}")
    return tuple(sizes)  # type: ignore[return-value]


def make_mesh(config: MeshConfig = MeshConfig(), devices: Sequence[Any] | None = None) -> Mesh:
    """A mesh with axes (`data`, `fsdp`, `tensor`) over `devices` (default: all).

    Axis types are Auto: shardings come from the rules table and XLA's
    propagation, not from explicit-sharding typing (the pinned JAX defaults
    `jax.make_mesh` to Explicit).
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_mesh_shape(config, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def logical_to_spec(axes: Sequence[str | None]) -> P:
    """PartitionSpec for logical axis names, from the rules table alone.

    Unknown names map to replication (logged once). A mesh axis already used by
    an earlier dimension is not reused (a spec may name each mesh axis once).
    Use `spec_for` when the shape is known, to also check divisibility (and
    to get the canonical form, without trailing Nones).
    """
    used: set[str] = set()
    out = []
    for name in axes:
        rule = _lookup(name)
        mesh_axes = (rule,) if isinstance(rule, str) else tuple(rule or ())
        if any(a in used for a in mesh_axes):
            rule = None
            mesh_axes = ()
        used.update(mesh_axes)
        out.append(rule)
    return P(*out)


def spec_for(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh) -> P:
    """PartitionSpec for one array: the rules, minus what the shape cannot take.

    A dimension whose size is not divisible by the product of its mesh axes
    sizes is replicated instead (e.g. 9 heads on tensor=2, or a vocabulary of
    49,153), and an INFO log line says so: better a working slower layout than
    a crash, and the test of the resolved table makes it visible.
    """
    if len(axes) != len(shape):
        raise ValueError(f"axes {tuple(axes)} do not match shape {tuple(shape)}")
    spec = logical_to_spec(axes)
    out = []
    for name, dim, rule in zip(axes, shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        mesh_axes = (rule,) if isinstance(rule, str) else tuple(rule or ())
        size = math.prod(mesh.shape[a] for a in mesh_axes)
        if dim % size:
            logger.info("replicating %r dim of size %d: not divisible by %s=%d", name, dim, mesh_axes, size)
            rule = None
        out.append(rule)
    # Trailing Nones are dropped because NamedSharding(P("a", None)) !=
    # NamedSharding(P("a")) and jit reports its outputs in the short form.
    while out and out[-1] is None:
        out.pop()
    return P(*out)


def _lookup(name: str | None):
    if name is None:
        return None
    if name not in _RULES:
        if name not in _warned_unknown:
            _warned_unknown.add(name)
            logger.warning("logical axis %r has no rule in LOGICAL_AXIS_RULES: replicated", name)
        return None
    return _RULES[name]


def replicated(mesh: Mesh) -> NamedSharding:
    """Fully replicated sharding on `mesh` (scalars, rng keys, metrics)."""
    return NamedSharding(mesh, P())


def param_axes(model_or_state: nnx.Module | nnx.State) -> dict:
    """Pure nested dict (like `nnx.to_pure_dict`) of each Param's `axes` tuple.

    Params without `axes` metadata get `None` entries (replicated).
    """
    state = model_or_state
    if isinstance(state, nnx.Module):
        state = nnx.state(state, nnx.Param)
    return nnx.to_pure_dict(
        state, extract_fn=lambda v: tuple(v.get_metadata().get("axes") or (None,) * len(v.shape))
    )


def param_shardings(model_or_state: nnx.Module | nnx.State, mesh: Mesh) -> dict:
    """NamedSharding for every Param, as a pure dict matching `nnx.to_pure_dict`.

    Works on concrete and on abstract (`nnx.eval_shape`) models alike.
    """
    state = model_or_state
    if isinstance(state, nnx.Module):
        state = nnx.state(state, nnx.Param)

    def one(v: nnx.Variable) -> NamedSharding:
        axes = v.get_metadata().get("axes") or (None,) * len(v.shape)
        return NamedSharding(mesh, spec_for(axes, v.shape, mesh))

    return nnx.to_pure_dict(state, extract_fn=one)


def shard_model(model: nnx.Module, mesh: Mesh) -> nnx.Module:
    """Moves an NNX model's Params onto `mesh` following the rules (in place)."""
    state = nnx.state(model, nnx.Param)
    placed = jax.device_put(nnx.to_pure_dict(state), param_shardings(state, mesh))
    nnx.replace_by_pure_dict(state, placed)
    nnx.update(model, state)
    return model


def create_sharded_model(make_model: Callable[[], nnx.Module], mesh: Mesh) -> nnx.Module:
    """Builds a model with every Param created directly in its shard.

    `make_model()` is traced abstractly first, so a model too large for one
    device (or one host) is never materialised unsharded.
    """
    shardings = param_shardings(nnx.eval_shape(make_model), mesh)

    @nnx.jit
    def init() -> nnx.Module:
        model = make_model()
        state = nnx.state(model, nnx.Param)
        pure = jax.lax.with_sharding_constraint(nnx.to_pure_dict(state), shardings)
        nnx.replace_by_pure_dict(state, pure)
        nnx.update(model, state)
        return model

    return init()


def constrain_rows(x: jax.Array) -> jax.Array:
    """`x`'s leading (row) dim over the `batch` rule while traced under `jax.set_mesh`; else `x` as is.

    Applied to the residual stream of every decoder layer: without it XLA's
    propagation follows FSDP's parameter layout (`embed` over `fsdp`) into
    the activations and keeps every row on every chip (7x the temporaries of
    a small model's DPO step on 16 chips; docs/scale.md). Rows that do not
    split evenly are left to XLA.
    """
    mesh = jax.sharding.get_abstract_mesh()
    axes = _RULES["batch"]
    if mesh.empty or not set(axes) <= set(mesh.axis_names):
        return x
    if x.shape[0] % math.prod(mesh.shape[a] for a in axes):
        return x
    return jax.lax.with_sharding_constraint(x, P(axes))


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Leading (batch) dim over the `batch` rule; other dims replicated."""
    if ndim == 0:
        return replicated(mesh)
    return NamedSharding(mesh, P(_RULES["batch"]))


def shard_batch(batch: Any, mesh: Mesh) -> Any:
    """Places a batch on `mesh`, leading dim split over (data, fsdp).

    Single process: `batch` is the whole batch (NumPy or jax arrays). Several
    processes: each passes its own rows (the slice `process_batch_slice`
    names) and the result is the global array, assembled with
    `jax.make_array_from_process_local_data`; arrays that are already global
    are only resharded if needed. Scalars are replicated; Python ints (the
    train step's compile-time constants) are returned as they are.
    """
    n = _batch_shards(mesh)
    procs = jax.process_count()

    def one(x):
        if isinstance(x, int):
            return x
        sharding = batch_sharding(mesh, np.ndim(x))
        if isinstance(x, jax.Array) and (procs == 1 or not x.is_fully_addressable):
            return x if x.sharding == sharding else jax.device_put(x, sharding)
        x = np.asarray(x)
        global_shape = (x.shape[0] * procs, *x.shape[1:]) if x.ndim else ()
        if x.ndim and global_shape[0] % n:
            raise ValueError(
                f"global batch of {global_shape[0]} rows does not split over data*fsdp={n} devices"
            )
        if procs == 1:
            return jax.device_put(x, sharding)
        return jax.make_array_from_process_local_data(sharding, x, global_shape)

    return jax.tree.map(one, batch)


def _batch_shards(mesh: Mesh) -> int:
    return math.prod(mesh.shape[a] for a in _RULES["batch"])


def process_batch_slice(global_batch_size: int, mesh: Mesh) -> slice:
    """The rows of a global batch that this process must feed to `shard_batch`.

    The loader of each process reads only these rows. Raises if this process's
    devices do not own one contiguous block (a mesh whose device order
    interleaves processes along the batch axes).
    """
    sharding = batch_sharding(mesh, 1)
    idx = sharding.addressable_devices_indices_map((global_batch_size,)).values()
    starts = sorted({(s[0].start or 0, s[0].stop or global_batch_size) for s in idx})
    lo, hi = starts[0][0], starts[-1][1]
    covered = sum(b - a for a, b in starts)
    if covered != hi - lo:
        raise ValueError("this process's batch rows are not contiguous on this mesh")
    return slice(lo, hi)


def opt_state_shardings(opt_state: Any, params_shardings: Any, mesh: Mesh) -> Any:
    """Shardings for an optax state: param-shaped subtrees follow the params.

    Any subtree with exactly the params' tree structure (Adam's `mu`, `nu`, …)
    takes `params_shardings`; every other leaf (step counts, injected
    hyper-parameters, masked placeholders) is replicated. `opt_state` may be
    concrete or abstract (`jax.eval_shape(tx.init, params)`).
    """
    params_def = jax.tree.structure(params_shardings)
    rep = replicated(mesh)

    def is_param_tree(x):
        return jax.tree.structure(x) == params_def

    def place(x):
        if is_param_tree(x):
            return params_shardings
        return jax.tree.map(lambda _: rep, x)

    return jax.tree.map(place, opt_state, is_leaf=is_param_tree)


def maybe_initialize_distributed(
    env: Mapping[str, str] | None = None,
    tpu_present: bool | None = None,
) -> bool:
    """Joins the JAX distributed system when this is one of several processes.

    Call it first in every entry script, before anything touches a device.
    - `JAXALIGN_COORDINATOR=host:port`, `JAXALIGN_NUM_PROCESSES=n`,
      `JAXALIGN_PROCESS_ID=i`: explicit multi-process launch (any platform;
      on CPU also set `jax_cpu_collectives_implementation=gloo`).
    - On a Cloud TPU VM (TPU chips visible under /dev): every worker of the pod
      runs the same command and JAX reads the topology from the TPU metadata.
    Returns True if the distributed system was initialized by this call.
    """
    env = os.environ if env is None else env
    if jax.distributed.is_initialized():
        return False
    if "JAXALIGN_COORDINATOR" in env:
        jax.distributed.initialize(
            coordinator_address=env["JAXALIGN_COORDINATOR"],
            num_processes=int(env["JAXALIGN_NUM_PROCESSES"]),
            process_id=int(env["JAXALIGN_PROCESS_ID"]),
        )
        return True
    if tpu_present is None:
        tpu_present = bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))
    if tpu_present:
        jax.distributed.initialize()
        return True
    return False
