"""The jitted train step: exact gradient accumulation and a NaN/Inf guard.

A loss function has the signature

    loss_fn(model: nnx.Module, batch: pytree, rng: jax.Array) -> (loss, aux)

where `loss` is either a scalar or a `(numerator, denominator)` pair (e.g.
(sum of token losses, number of tokens)). With pairs, the step sums both over
the micro-batches and divides once, so the loss and its gradient equal those of
the full batch exactly (up to float reassociation). The denominator must not
depend on the parameters (it is treated as a constant). A scalar loss is taken
as the pair (loss, 1): micro-batch losses are then averaged with equal weight.

`aux` is a flat dict of scalars. A `(sum, count)` pair in it is combined the
same exact way; a plain scalar is averaged over micro-batches.

Static options of the loss (e.g. DPO's `last`, how many trailing columns
to score) are keyword arguments of the step, `step(state, batch, last=64)`,
passed on to `loss_fn(model, batch, rng, **options)`: compile-time constants,
each distinct value compiled once. A batch holds arrays only; a Python int
in it is refused, so no option travels hidden in the data.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxalign import sharding as shd
from jaxalign.host import release_host_memory, train_step_compiler_options
from jaxalign.training.optim import AdamW, all_finite, global_norm
from jaxalign.training.state import ModelDef, TrainState

LossFn = Callable[[Any, Any, jax.Array], tuple[Any, dict]]
RESERVED_METRICS = ("loss", "grad_norm", "lr", "finite", "skipped_steps")


# `split_update=None` splits a step into two programs when its gradient takes at most this many bytes.
SPLIT_MAX_GRADIENT_BYTES = 64 * 2**20


class TrainStep:
    """`step(state, batch) -> (state, metrics)`, jitted with explicit shardings.

    The state argument is donated: do not reuse it after the call. Host
    (NumPy) batches are placed with `shard_batch` first. Attributes:
    `nan_policy` (read by the loop), `mesh`, `shardings` (of the state),
    `split_update`.

    A step is one compiled program, or two run one after the other: the
    gradient, `(state, batch) -> (grads, metrics)` (the loss, its aux metrics
    and the gradient summed over micro-batches), then the update,
    `(state, grads, loss) -> (state, metrics)` (the gradient norm, the finite
    check and the optimizer update, with the state donated). Same arithmetic
    either way, up to float32 rounding (XLA fuses the two layouts
    differently). Two programs halve the compile's host-memory peak (XLA:CPU
    holds memory for every distinct kernel until a whole program is built)
    but hold the gradient apart from the gradient program's temporaries, up
    to one gradient more at the step's own peak. `split_update=None` picks two
    programs when the gradient takes at most `SPLIT_MAX_GRADIENT_BYTES` (64
    MiB: 16M float32 parameters), where the compile sets the process's peak,
    and one program above (docs/training.md, "Memory of a step").
    """

    def __init__(self, gradient_fn, update_fn, shardings: TrainState, nan_policy: str,
                 split_update: bool | None = None, grad_shardings: Any = None):
        self._gradient_fn = gradient_fn
        self._update_fn = update_fn
        self.shardings = shardings
        # The gradient covers the trainable params only (all of them unless some are frozen).
        self.grad_shardings = shardings.params if grad_shardings is None else grad_shardings
        self.nan_policy = nan_policy
        self.split_update = split_update
        self.mesh = jax.tree.leaves(shardings)[0].mesh
        self._jitted: dict = {}
        self._executables: dict = {}

    def splits(self, state: TrainState) -> bool:
        """Whether a step on `state` runs as two programs (gradient, update) or one."""
        if self.split_update is not None:
            return self.split_update
        return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state.params)) <= SPLIT_MAX_GRADIENT_BYTES

    def _get(self, arrays, static, split: bool) -> tuple:
        # One jit per batch layout: in_shardings must name every batch leaf
        # (arrays split on their leading dim, scalars replicated).
        leaves = jax.tree.leaves(arrays)
        key = (jax.tree.structure(arrays), tuple(jnp.ndim(x) for x in leaves), static, split)
        if key not in self._jitted:
            batch_sh = jax.tree.map(lambda x: shd.batch_sharding(self.mesh, jnp.ndim(x)), arrays)
            replicated = shd.replicated(self.mesh)
            if not split:
                def step(state, arrays):
                    return _run(lambda s, a: self._gradient_fn(s, a, static), self._update_fn, state, arrays)

                self._jitted[key] = (jax.jit(step, in_shardings=(self.shardings, batch_sh),
                                             out_shardings=(self.shardings, replicated), donate_argnums=(0,)),)
            else:
                gradient = jax.jit(
                    lambda state, arrays: self._gradient_fn(state, arrays, static),
                    in_shardings=(self.shardings, batch_sh),
                    out_shardings=(self.grad_shardings, replicated),
                    keep_unused=True,  # the whole state is an argument: its memory analysis counts what is resident
                )
                update = jax.jit(
                    self._update_fn,
                    in_shardings=(self.shardings, self.grad_shardings, replicated),
                    out_shardings=(self.shardings, replicated),
                    donate_argnums=(0,),
                )
                self._jitted[key] = (gradient, update)
        return self._jitted[key]

    def place_batch(self, batch: Any) -> Any:
        """Batch -> global arrays with the batch sharding (no-op if already so).

        A Python int in the batch is refused: options are keywords of the step.
        """
        _check_arrays(batch)
        return shd.shard_batch(batch, self.mesh)

    def lower(self, state: TrainState, batch: Any, **options) -> tuple:
        """The lowered programs, `(step,)` or `(gradient, update)`, for inspecting shardings and cost.

        `state` and `batch` may be sharded `jax.ShapeDtypeStruct`s: a step then compiles ahead of time
        for devices this process does not have (experiments/plan.py, for a TPU topology).
        """
        abstract = all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(batch))
        arrays, static = (batch if abstract else self.place_batch(batch)), _static(options)
        with jax.set_mesh(self.mesh):
            return self._lower(state, arrays, static)

    def compiled(self, state: TrainState, batch: Any, **options) -> tuple:
        """The compiled programs this step runs for `batch`'s layout, `(step,)` or `(gradient, update)`
        (compiled now if new). The last one returns the new state.

        For XLA's memory and cost analyses of what actually runs: the same
        executables `__call__` uses, with the same compiler options.
        """
        arrays, static = self.place_batch(batch), _static(options)
        with jax.set_mesh(self.mesh):
            return self._executable(state, arrays, static)

    def memory_bytes(self, state: TrainState, batch: Any, **options) -> int | None:
        """Peak device memory of a step from XLA's memory analysis; None where the backend gives none.

        One program: its arguments, outputs and temporaries, less what
        donation lets the new state reuse. Two: the larger of the gradient
        program's (the state and batch it takes, its temporaries and the
        gradient it returns) and the update program's (state, gradient and
        temporaries, less the donated state) plus the batch, still held.
        """
        arrays, static = self.place_batch(batch), _static(options)
        with jax.set_mesh(self.mesh):
            programs = self._executable(state, arrays, static)
        analyses = [p.memory_analysis() for p in programs]
        if any(m is None for m in analyses):
            return None
        if len(analyses) == 1:
            return int(_program_bytes(analyses[0]))
        batch_bytes = sum(x.nbytes for x in jax.tree.leaves(arrays))
        return int(max(_program_bytes(analyses[0]), _program_bytes(analyses[1]) + batch_bytes))

    def __call__(self, state: TrainState, batch: Any, **options) -> tuple[TrainState, dict]:
        arrays, static = self.place_batch(batch), _static(options)
        # The mesh context lets models constrain activations with bare
        # PartitionSpecs while the step is traced.
        with jax.set_mesh(self.mesh):
            programs = self._executable(state, arrays, static)
            if len(programs) == 1:
                return programs[0](state, arrays)
            return _run(*programs, state, arrays)

    def _lower(self, state: TrainState, arrays: Any, static: tuple) -> tuple:
        programs = self._get(arrays, static, self.splits(state))
        if len(programs) == 1:
            return (programs[0].lower(state, arrays),)
        gradient, update = programs
        lowered_gradient = gradient.lower(state, arrays)
        grads, metrics = lowered_gradient.out_info
        return lowered_gradient, update.lower(state, grads, metrics["loss"])

    def _executable(self, state: TrainState, arrays: Any, static: tuple) -> tuple:
        """The compiled programs for these argument types, compiled ahead of the first run.

        Compiling apart from running lets the compiler's host memory go back
        to the OS before the step's own buffers are allocated, so the two
        peaks do not stack (about 0.5 GB of peak RSS on SmolLM2-135M). The
        heap freed before each compile (tracing, earlier programs) goes back
        first too, so each compile's own peak starts from a lower base.
        """
        leaves, treedef = jax.tree.flatten((state, arrays))
        key = (treedef, tuple((x.shape, x.dtype, getattr(x, "weak_type", False), getattr(x, "sharding", None))
                              for x in leaves), static)
        if key not in self._executables:
            lowered = self._lower(state, arrays, static)
            # The step and the gradient program get the dot fusions; a separate update program has no dots
            # and compiles with XLA's defaults.
            options = (train_step_compiler_options(self.mesh.devices.flat[0].platform), None)
            compiled = []
            for program, program_options in zip(lowered, options):
                release_host_memory()
                compiled.append(program.compile(program_options))
            release_host_memory()
            self._executables[key] = tuple(compiled)
        return self._executables[key]


def _run(gradient, update, state: TrainState, arrays: Any) -> tuple[TrainState, dict]:
    """One step from its two parts: traced inside a one-program step, or the two compiled programs."""
    grads, metrics = gradient(state, arrays)
    state, update_metrics = update(state, grads, metrics["loss"])
    return state, _ordered_metrics(metrics, update_metrics)


def _program_bytes(mem) -> int:
    """Arguments + outputs + temporaries - donated aliases of one program's memory analysis."""
    return (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
            - mem.alias_size_in_bytes)


def _ordered_metrics(gradient_metrics: dict, update_metrics: dict) -> dict:
    """The step's metrics in one dict: loss, grad_norm, finite, skipped_steps, lr, then the loss's aux."""
    out = {"loss": gradient_metrics["loss"], **update_metrics}
    out.update((k, v) for k, v in gradient_metrics.items() if k not in out)
    return out


def make_train_step(
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    *,
    model_def: ModelDef,
    shardings: TrainState,
    micro_batches: int = 1,
    nan_policy: Literal["skip", "stop"] = "skip",
    split_update: bool | None = None,
) -> TrainStep:
    """Builds the train step.

    micro_batches: the batch's leading dim B is split into this many
      micro-batches of B / micro_batches rows; micro-batch i takes rows
      i, i + M, i + 2M, … so that every device holds part of every
      micro-batch (no data movement). Gradients are accumulated in float32.
    nan_policy: if the loss, the gradient norm or any leaf of the updated
      params and optimizer state is not finite, the update is dropped in both
      policies (params and optimizer state unchanged, `skipped_steps` + 1,
      metric `finite` False); with "stop" the loop then raises.
    shardings: the state's shardings (`state_shardings(state)`); the
      step's outputs use the same, so no resharding happens between steps.
    split_update: compile the gradient and the optimizer update as two
      programs (True) or one (False); None: two when the gradient takes at
      most `SPLIT_MAX_GRADIENT_BYTES` (see `TrainStep`).
    """
    if nan_policy not in ("skip", "stop"):
        raise ValueError(f"nan_policy must be 'skip' or 'stop', got {nan_policy!r}")
    mesh = jax.tree.leaves(shardings)[0].mesh
    param_sh = shardings.params

    # Differentiated with respect to the trainable params only: frozen ones (a LoRA model's base)
    # take no gradient and no optimizer state.
    def parts(params, frozen, batch, rng, options):
        loss, aux = loss_fn(model_def.merge(model_def.join(params, frozen)), batch, rng, **dict(options))
        num, den = loss if isinstance(loss, (tuple, list)) else (loss, 1.0)
        return num, (jax.lax.stop_gradient(jnp.asarray(den, jnp.float32)), aux)

    grad_fn = jax.value_and_grad(parts, has_aux=True)

    def accumulate(params, batch, rng, options):
        """Returns (summed grads, summed numerator, summed denominator, aux)."""
        params, frozen = model_def.split_trainable(params)
        if micro_batches == 1:
            (num, (den, aux)), grads = grad_fn(params, frozen, batch, rng, options)
            grads = jax.tree.map(lambda g: g.astype(jnp.float32), grads)
            return grads, num.astype(jnp.float32), den, _combine_aux(aux, 1)

        leaves, treedef = jax.tree.flatten(batch)
        split_idx = [i for i, x in enumerate(leaves) if jnp.ndim(x) > 0]
        xs = [_split_micro(leaves[i], micro_batches, mesh) for i in split_idx]

        def body(carry, inputs):
            g_acc, num_acc, den_acc = carry
            i, mb_leaves = inputs
            mb = list(leaves)
            for j, x in zip(split_idx, mb_leaves):
                mb[j] = x
            (num, (den, aux)), grads = grad_fn(
                params, frozen, jax.tree.unflatten(treedef, mb), jax.random.fold_in(rng, i), options
            )
            g_acc = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), g_acc, grads)
            return (g_acc, num_acc + num.astype(jnp.float32), den_acc + den), aux

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
        zeros = jax.lax.with_sharding_constraint(zeros, model_def.split_trainable(param_sh)[0])
        init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
        (grads, num, den), aux = jax.lax.scan(body, init, (jnp.arange(micro_batches), xs))
        return grads, num, den, _combine_aux(aux, micro_batches)

    def gradient(state: TrainState, batch: Any, options: tuple = ()) -> tuple[Any, dict]:
        _, step_rng = jax.random.split(state.rng)
        grads, num, den, aux = accumulate(state.params, batch, step_rng, options)
        loss = num / den
        grads = jax.tree.map(lambda g, p: (g / den).astype(p.dtype), grads,
                             model_def.split_trainable(state.params)[0])
        clash = set(aux) & set(RESERVED_METRICS)
        if clash:
            raise ValueError(f"loss aux metrics may not use the reserved names {sorted(clash)}")
        return grads, {"loss": loss, **aux}

    def update(state: TrainState, grads: Any, loss: jax.Array) -> tuple[TrainState, dict]:
        rng, _ = jax.random.split(state.rng)  # the split `gradient` made: its first half is the next key
        # The norm's reductions are here, not in the gradient program: the two programs then
        # compile about the same number of distinct kernels (see `TrainStep`).
        grad_norm = global_norm(grads)
        inputs_finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        trained, frozen = model_def.split_trainable(state.params)
        if isinstance(optimizer, AdamW):
            # One pass over params, gradient and moments, guarded from scalar bounds (optim.py).
            trained, new_opt, finite = optimizer.apply(grads, grad_norm, inputs_finite, trained, state.opt_state)
        else:
            trained, new_opt, finite = _checked_update(optimizer, grads, inputs_finite, trained, state.opt_state)
        new_params = model_def.join(trained, frozen)
        skipped = state.skipped_steps + (~finite).astype(jnp.int32)
        new_state = TrainState(
            params=new_params,
            opt_state=new_opt,
            step=state.step + 1,
            rng=rng,
            skipped_steps=skipped,
        )
        metrics = {"grad_norm": grad_norm, "finite": finite, "skipped_steps": skipped}
        lr = _find_lr(new_opt)
        if lr is not None:
            metrics["lr"] = lr
        return new_state, metrics

    return TrainStep(gradient, update, shardings, nan_policy, split_update,
                     grad_shardings=model_def.split_trainable(param_sh)[0])


def _checked_update(optimizer: optax.GradientTransformation, grads: Any, inputs_finite: jax.Array,
                    params: Any, opt_state: Any) -> tuple[Any, Any, jax.Array]:
    """Any optax transformation's update, kept only if it and its inputs are finite: (params, opt_state, finite).

    The check looks at what the step would keep: a finite loss and gradient
    can still overflow the parameters or moments (a huge learning rate). The
    candidate update feeds only the finite reductions, which XLA fuses with
    it (nothing parameter-sized is written), and the conditional recomputes
    it in place: two more passes over params, gradient and moments than the
    update alone (`AdamW.apply` avoids them). A conditional, not a `where`
    over both states: XLA then updates the donated params and moments in
    place, where a `where` needs the old moments after the new ones
    overwrite them and copies both moment trees first (docs/training.md,
    "NaN guard").
    """
    def apply(params, opt_state, grads):
        updates, new_opt = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new_opt

    finite = inputs_finite & all_finite(apply(params, opt_state, grads))
    new_params, new_opt = jax.lax.cond(finite, apply, lambda p, o, g: (p, o), params, opt_state, grads)
    return new_params, new_opt, finite


def _static(options: dict) -> tuple:
    """The step's keyword options as a hashable key: ((name, value), ...) sorted by name."""
    try:
        key = tuple(sorted(options.items()))
        hash(key)
    except TypeError as e:
        raise TypeError(f"step options must be hashable compile-time constants, got {options}") from e
    return key


def _check_arrays(batch: Any) -> None:
    """Refuses Python scalars among the batch's leaves (options are keywords of the step)."""
    for path, x in jax.tree_util.tree_leaves_with_path(batch):
        if isinstance(x, (int, float)):
            raise TypeError(f"batch{jax.tree_util.keystr(path)} is the Python {type(x).__name__} {x!r}: a batch "
                            "holds arrays; pass a static option as a keyword of the step, step(state, batch, last=N)")


def _split_micro(x: jax.Array, m: int, mesh) -> jax.Array:
    """[B, ...] -> [m, B/m, ...], micro-batch i holding rows i, i+m, …."""
    if x.shape[0] % m:
        raise ValueError(f"batch of {x.shape[0]} rows does not split into {m} micro-batches")
    rows = x.shape[0] // m
    x = jnp.swapaxes(x.reshape(rows, m, *x.shape[1:]), 0, 1)
    batch_axes = shd.batch_sharding(mesh, 1).spec[0]
    if rows % math.prod(mesh.shape[a] for a in batch_axes) == 0:
        x = jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(None, batch_axes)))
    return x


def _combine_aux(aux: dict, m: int) -> dict:
    """Per-micro-batch aux (stacked on axis 0 when m > 1) -> one value each."""
    out = {}
    for k, v in aux.items():
        if isinstance(v, (tuple, list)):
            s, c = (jnp.sum(x, 0) if m > 1 else x for x in v)
            out[k] = jnp.asarray(s, jnp.float32) / c
        else:
            out[k] = jnp.mean(v, 0) if m > 1 else v
    return out


def _find_lr(opt_state: Any) -> jax.Array | None:
    """The injected `learning_rate` hyper-parameter (not its schedule state)."""
    found = optax.tree_utils.tree_get_all_with_path(
        opt_state, "learning_rate", filtering=lambda _, v: isinstance(v, jax.Array)
    )
    return found[0][1] if len(found) == 1 else None
