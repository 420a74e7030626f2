"""AdamW with warm-up + decay schedules, global-norm clipping and a decay mask, fused for the train step.

`make_optimizer` returns an `AdamW`: an optax transformation (`init`,
`update`), usable wherever optax's are, plus `apply`, the guarded in-place
update the train step runs in one pass over the parameters.

Why its own AdamW rather than `optax.chain(clip_by_global_norm, adamw)`:
the train step must never keep a non-finite state (the NaN guard), and the
only exact check of an arbitrary optax update is to compute it, test it, and
compute it again in place: three passes over the parameters, the gradient
and both moments where plain AdamW makes one (docs/training.md, "The
optimizer update"). Here the guard is decided from scalars: the state keeps
upper bounds of max|params|, max|mu| and max(nu); with the gradient norm the
step already computes, the update's arithmetic bounds every new value (see
`plan` in `make_optimizer`). When those bounds are below `LIMIT` (all of
ordinary training) the update runs in place in one pass; otherwise the exact
check runs first (the candidate feeding one reduction) and resets the bounds
to a power of two above the new state's largest value. Either way a
non-finite update keeps the previous state.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

# Every bound must stay below this for the one-pass path: 2**126, under float32's and bfloat16's largest
# finite values (3.40e38, 3.39e38) with room for the last rounding.
LIMIT = 2.0**126
# Relative slack on each bound for float32 rounding: a handful of roundings of 2**-24 each.
_SLACK = 1.0 + 2.0**-18


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """Optimizer hyper-parameters.

    `schedule`: `constant`, `cosine` (to 0 at `total_steps`) or `linear`
    (to 0 at `total_steps`); all start with a linear warm-up from 0 over
    `warmup_steps`. `grad_clip_norm`: global-norm clipping threshold, None or 0
    to disable. Weight decay is decoupled (AdamW) and applied only to
    matrices (`decay_mask`: no decay on norms and biases). The moments are
    float32 whatever the parameters' dtype.
    """

    lr: float = 1e-3
    schedule: Literal["constant", "cosine", "linear"] = "cosine"
    warmup_steps: int = 0
    total_steps: int = 1000
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    grad_clip_norm: float | None = 1.0


def make_schedule(
    lr: float, schedule: str, warmup_steps: int, total_steps: int
) -> optax.Schedule:
    """Learning rate as a function of the update count (0-based)."""
    if schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0,
            peak_value=lr,
            warmup_steps=warmup_steps,
            decay_steps=max(total_steps, warmup_steps + 1),
            end_value=0.0,
        )
    if schedule == "linear":
        decay = optax.linear_schedule(lr, 0.0, max(total_steps - warmup_steps, 1))
    elif schedule == "constant":
        decay = optax.constant_schedule(lr)
    else:
        raise ValueError(f"unknown schedule {schedule!r}: constant, cosine or linear")
    if warmup_steps == 0:
        return decay
    warmup = optax.linear_schedule(0.0, lr, warmup_steps)
    return optax.join_schedules([warmup, decay], [warmup_steps])


def decay_mask(params: Any) -> Any:
    """True for parameters that get weight decay: matrices, i.e. two or more dims besides a layer axis.

    A leaf below a key named `layers` is a scanned stack (`Transformer.layers`):
    its leading axis counts layers, so a stacked norm scale `[L, D]` is still
    a vector and gets no decay.
    """
    def matrix(path, p):
        stacked = any(getattr(k, "key", None) == "layers" for k in path)
        return p.ndim - int(stacked) >= 2

    return jax.tree_util.tree_map_with_path(matrix, params)


def global_norm(tree: Any) -> jax.Array:
    """float32 []: sqrt(Σ x²) over all leaves, accumulated in float32 (as `optax.global_norm`)."""
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


class AdamWState(NamedTuple):
    """count: int32 [] updates applied; learning_rate: float32 [] the lr of the last one (logged);
    mu, nu: float32 moments in the params' tree; bounds: float32 [3], upper bounds of
    (max|params|, max|mu|, max nu) that decide the one-pass update (`plan`)."""

    count: jax.Array
    learning_rate: jax.Array
    mu: Any
    nu: Any
    bounds: jax.Array


class AdamW(NamedTuple):
    """An optax transformation (`init`, `update`) with the train step's guarded update `apply`.

    `apply(grads, grad_norm, inputs_finite, params, state) -> (params, state, finite)`:
    clips with the given `grad_norm` (of `grads`, `global_norm`), updates in
    place, and keeps `params` and `state` unchanged unless `inputs_finite`
    (the loss and `grad_norm`) and the whole new state are finite.
    """

    init: Callable[[Any], AdamWState]
    update: Callable[..., tuple[Any, AdamWState]]
    apply: Callable[..., tuple[Any, AdamWState, jax.Array]]


class _Plan(NamedTuple):
    """The scalars of one update, shared by every leaf."""

    count: jax.Array
    lr: jax.Array
    scale: jax.Array  # the clipping factor, min(1, clip / |g|)
    bc1: jax.Array
    bc2: jax.Array
    bounds: jax.Array  # of the new state, valid when `safe`
    safe: jax.Array  # every value of the update provably below LIMIT


def make_optimizer(config: OptimConfig) -> AdamW:
    """AdamW from `config`: per element, with g clipped by the global norm and t the update count (1-based),

        mu <- b1 mu + (1 - b1) g,   nu <- b2 nu + (1 - b2) g²
        p  <- p - lr(t-1) [ (mu / (1 - b1^t)) / (sqrt(nu / (1 - b2^t)) + eps) + wd p ]

    (Loshchilov & Hutter 2019, "Decoupled Weight Decay Regularization"; the
    same arithmetic as `optax.chain(optax.clip_by_global_norm(c),
    optax.adamw(..., mask=decay_mask))` up to float rounding), wd only where
    `decay_mask`. The lr used is in the state as `learning_rate`, so the step
    logs the value applied (`optax.tree_utils.tree_get(state, "learning_rate")`).
    """
    schedule = make_schedule(config.lr, config.schedule, config.warmup_steps, config.total_steps)
    b1, b2, eps, wd = config.b1, config.b2, config.eps, config.weight_decay
    clip = config.grad_clip_norm or None

    def init(params: Any) -> AdamWState:
        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
        max_p = _max_abs(params)
        return AdamWState(count=jnp.zeros((), jnp.int32), learning_rate=jnp.asarray(schedule(0), jnp.float32),
                          mu=zeros, nu=jax.tree.map(jnp.zeros_like, zeros),
                          bounds=jnp.stack([max_p, jnp.float32(0), jnp.float32(0)]))

    def plan(state: AdamWState, grad_norm: jax.Array) -> _Plan:
        """The update's scalars and bounds on every value it computes.

        With G = max|g·scale| <= |g|·scale (a float sum of non-negative terms
        is at least each term), from bounds (P, M, V) of the current state:
        |mu'| <= max(M, G), nu' <= max(V, G²), the Adam ratio
        |r| <= |mu'| / (bc1 eps) (its denominator is at least eps), and
        |p'| <= P + 4 lr (|r| + wd P): rounding p - d to the nearest float
        moves it by at most |d| from the exact value, since p itself is a
        float (twice over for a bfloat16 cast). Each bound carries `_SLACK`
        for float32 rounding.
        """
        count = state.count + 1
        lr = jnp.asarray(schedule(state.count), jnp.float32)
        norm = grad_norm.astype(jnp.float32)
        scale = jnp.float32(1.0) if clip is None else jnp.where(norm < clip, 1.0, clip / norm).astype(jnp.float32)
        t = count.astype(jnp.float32)
        bc1, bc2 = 1 - jnp.float32(b1) ** t, 1 - jnp.float32(b2) ** t
        p_max, mu_max, nu_max = state.bounds[0], state.bounds[1], state.bounds[2]
        g = norm * scale * _SLACK
        mu_new = jnp.maximum(mu_max, g) * _SLACK
        nu_new = jnp.maximum(nu_max, g * g) * _SLACK
        ratio = mu_new / bc1 / eps * _SLACK
        step = jnp.abs(lr) * (ratio + abs(wd) * p_max) * _SLACK
        p_new = (p_max + 4 * step) * _SLACK
        checked = jnp.stack([p_new, mu_new, nu_new, mu_new / bc1, nu_new / bc2, ratio, step])
        return _Plan(count, lr, scale, bc1, bc2, jnp.stack([p_new, mu_new, nu_new]), jnp.all(checked < LIMIT))

    def leaf(p, g, mu, nu, h: _Plan, decay: bool, take):
        """One leaf's (new params, mu, nu), computed in float32; the old ones where `take` is False.

        The select is per element, in the fusion that writes the element: each old value is read
        before its own new one overwrites it, so XLA updates the donated buffers in place."""
        g = g.astype(jnp.float32) * h.scale
        mu = jnp.where(take, (1 - b1) * g + b1 * mu, mu)
        # g² as |g|·|g| (the same bits): not an expression XLA merges with `global_norm`'s square of
        # an unclipped gradient, which it would then write out as a gradient-sized temporary.
        nu = jnp.where(take, (1 - b2) * (jnp.abs(g) * jnp.abs(g)) + b2 * nu, nu)
        r = (mu / h.bc1) / (jnp.sqrt(nu / h.bc2) + eps)
        if decay and wd:
            r = r + wd * p.astype(jnp.float32)
        return jnp.where(take, (p.astype(jnp.float32) - h.lr * r).astype(p.dtype), p), mu, nu

    def new_state(params, grads, state: AdamWState, h: _Plan, bounds, take=True) -> tuple[Any, AdamWState]:
        out = jax.tree.map(lambda p, g, mu, nu, decay: leaf(p, g, mu, nu, h, decay, take),
                           params, grads, state.mu, state.nu, decay_mask(params))
        treedef = jax.tree.structure(params)
        new_p, mu, nu = (jax.tree.unflatten(treedef, xs) for xs in zip(*treedef.flatten_up_to(out)))
        return new_p, AdamWState(jnp.where(take, h.count, state.count), jnp.where(take, h.lr, state.learning_rate),
                                 mu, nu, jnp.where(take, bounds, state.bounds))

    def update(grads, state: AdamWState, params=None):
        if params is None:
            raise ValueError("AdamW.update needs params (for weight decay and the guard's bounds)")
        h = plan(state, global_norm(grads))
        new_p, new = new_state(params, grads, state, h, h.bounds)
        updates = jax.tree.map(lambda a, b: a.astype(jnp.float32) - b.astype(jnp.float32), new_p, params)
        return updates, new

    def apply(grads, grad_norm, inputs_finite, params, state: AdamWState):
        h = plan(state, grad_norm)

        def trust_bounds(params, state):
            return jnp.bool_(True), h.bounds

        def check_candidate(params, state):
            # Bounds too loose to decide (or a huge lr): compute the update, feeding only a reduction
            # of its float exponents (XLA:CPU writes a reduction's operand out: one byte per
            # parameter rather than four). Exponent 255 is Inf or NaN; below, 2^(e - 126) bounds
            # every value, and becomes the bound of params and moments from then on.
            cand_p, cand = new_state(params, grads, state, h, h.bounds)
            e = _largest_exponent(cand_p, cand.mu, cand.nu)
            return e < 255, jnp.full((3,), jnp.ldexp(jnp.float32(1), e.astype(jnp.int32) - 126))

        # The conditional returns scalars only: a branch returning params and moments makes XLA copy
        # the whole state to its output when nested; the update itself is a per-element select
        # (`new_state`), measured no slower than a conditional around it.
        ok, bounds = jax.lax.cond(h.safe | ~inputs_finite, trust_bounds, check_candidate, params, state)
        finite = inputs_finite & ok
        new_p, new = new_state(params, grads, state, h, bounds, take=finite)
        return new_p, new, finite

    return AdamW(init, update, apply)


def _max_abs(tree: Any) -> jax.Array:
    """float32 []: max |x| over every leaf (0 for an empty tree)."""
    leaves = [jnp.max(jnp.abs(x)).astype(jnp.float32) for x in jax.tree.leaves(tree) if x.size]
    return jnp.max(jnp.stack(leaves)) if leaves else jnp.float32(0)


def _largest_exponent(*trees: Any) -> jax.Array:
    """uint8 []: the largest biased float32 exponent of any element of same-shaped `trees` (255: Inf/NaN)."""
    def leaf(*xs):
        exps = [(jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32) >> 23 & 0xFF).astype(jnp.uint8)
                for x in xs]
        return jnp.max(functools.reduce(jnp.maximum, exps))

    return jnp.max(jnp.stack(jax.tree.leaves(jax.tree.map(leaf, *trees))))


def all_finite(tree: Any) -> jax.Array:
    """bool []: every float leaf of `tree` is free of NaN/Inf."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)
