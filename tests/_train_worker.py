"""A complete toy training run; imported by the tests and run as a subprocess.

`python tests/_train_worker.py --workdir D --steps N --ckpt-every K --sleep S
--eval-every E`
trains the toy model on the 8-device (data 2, fsdp 2, tensor 2) mesh with
checkpoints, and is what the kill -9 test kills mid-way.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
from flax import nnx  # noqa: E402

from _toy_model import ToyData, ToyLM, make_batch, token_mean_loss  # noqa: E402
from jaxalign import sharding as shd  # noqa: E402
from jaxalign.training import (  # noqa: E402
    Checkpointer,
    OptimConfig,
    init_train_state,
    make_optimizer,
    make_train_step,
    state_shardings,
    train,
)

OPTIM = OptimConfig(lr=1e-2, warmup_steps=2, total_steps=20, weight_decay=0.1, grad_clip_norm=1.0)


def mesh_for(kind: str):
    if kind == "one":
        return shd.make_mesh(shd.MeshConfig(), devices=jax.devices()[:1])
    return shd.make_mesh(shd.MeshConfig(data=2, fsdp=2, tensor=2))


@functools.lru_cache(maxsize=None)
def build(kind: str = "8", nan_policy: str = "skip", micro_batches: int = 1):
    """(step, fresh_state) for one configuration; cached so tests share compiles."""
    mesh = mesh_for(kind)
    tx = make_optimizer(OPTIM)

    def fresh_state():
        return init_train_state(ToyLM(rngs=nnx.Rngs(0)), tx, mesh=mesh, seed=0)

    state, model_def = fresh_state()
    step = make_train_step(
        token_mean_loss, tx, model_def=model_def, shardings=state_shardings(state),
        micro_batches=micro_batches, nan_policy=nan_policy,
    )
    eval_batch = shd.shard_batch(make_batch(999), mesh)

    @jax.jit
    def eval_loss(params):
        (total, count), _ = token_mean_loss(model_def.merge(params), eval_batch, None)
        return {"loss": total / count}

    def eval_fn(state, step_num):
        return eval_loss(state.params)

    return step, (lambda: fresh_state()[0]), eval_fn


def run_steps(kind: str, steps: int, micro_batches: int = 1, poison_at: tuple[int, ...] = ()):
    """`steps` bare steps on ToyData(seed=1): (final host state, host metrics list)."""
    step, fresh_state, _ = build(kind, "skip", micro_batches)
    state, data, out = fresh_state(), ToyData(seed=1, poison_at=poison_at), []
    for _ in range(steps):
        state, metrics = step(state, next(data))
        out.append(jax.device_get(metrics))
    return jax.device_get(state), out


class SlowData(ToyData):
    """ToyData that sleeps before each batch, so a kill lands mid-run.

    hang_at: before this batch index (0-based) it waits until the process is
    killed, so the kill lands after step `hang_at` however late it comes.
    """

    def __init__(self, sleep: float, hang_at: int | None = None, **kw):
        super().__init__(**kw)
        self.sleep, self.hang_at = sleep, hang_at

    def __next__(self):
        time.sleep(self.sleep)
        if self.position == self.hang_at:
            while True:
                time.sleep(60)
        return super().__next__()


def run(workdir: str, steps: int, *, ckpt_every: int = 0, sleep: float = 0.0,
        poison_at: tuple[int, ...] = (), nan_policy: str = "skip", log_every: int = 1,
        eval_every: int = 0, async_save: bool = True, hang_at: int | None = None):
    """Trains (or resumes, if `workdir/ckpt` holds a checkpoint) to `steps`."""
    step, fresh_state, eval_fn = build("8", nan_policy)
    ckpt = None
    if ckpt_every:
        ckpt = Checkpointer(os.path.join(workdir, "ckpt"), save_every=ckpt_every, keep=3,
                            async_save=async_save)
    data = SlowData(sleep, hang_at, seed=1, poison_at=poison_at)
    try:
        return train(step, fresh_state(), data, num_steps=steps, workdir=workdir,
                     checkpointer=ckpt, eval_fn=eval_fn, eval_every=eval_every,
                     log_every=log_every, console=False, progress=False)
    finally:
        if ckpt is not None:
            ckpt.close()


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--workdir", required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--ckpt-every", type=int, default=0)
    p.add_argument("--sleep", type=float, default=0.0)
    p.add_argument("--eval-every", type=int, default=0)
    p.add_argument("--hang-at", type=int, default=None)
    a = p.parse_args()
    run(a.workdir, a.steps, ckpt_every=a.ckpt_every, sleep=a.sleep, eval_every=a.eval_every, hang_at=a.hang_at)
    print("DONE", flush=True)
