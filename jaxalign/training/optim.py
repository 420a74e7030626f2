"""AdamW with warm-up + decay schedules, global-norm clipping and a decay mask."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import jax
import optax


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """Optimizer hyper-parameters.

    `schedule`: `constant`, `cosine` (to 0 at `total_steps`) or `linear`
    (to 0 at `total_steps`); all start with a linear warm-up from 0 over
    `warmup_steps`. `grad_clip_norm`: global-norm clipping threshold, None or 0
    to disable. Weight decay is decoupled (AdamW) and applied only to
    parameters with two or more dimensions (no decay on norms and biases).
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
    """True for parameters that get weight decay: those with ndim >= 2."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(config: OptimConfig) -> optax.GradientTransformation:
    """AdamW from `config`, with the learning rate exposed in the state.

    The lr is injected as a hyper-parameter so the train step can log the
    value actually used (`optax.tree_utils.tree_get(opt_state, "learning_rate")`).
    """
    schedule = make_schedule(config.lr, config.schedule, config.warmup_steps, config.total_steps)
    adamw = optax.inject_hyperparams(optax.adamw, static_args=("mask",))(
        learning_rate=schedule,
        b1=config.b1,
        b2=config.b2,
        eps=config.eps,
        weight_decay=config.weight_decay,
        mask=decay_mask,
    )
    if not config.grad_clip_norm:
        return adamw
    return optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), adamw)
