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


def _largest_file(d: str) -> str:
    files = [os.path.join(r, f) for r, _, fs in os.walk(d) for f in fs]
    return max(files, key=os.path.getsize)


def corrupt_newest(ckpt_dir: str, rng) -> str:
    """Damages the newest committed step of `ckpt_dir` (XOR of 64 bytes in the middle of its largest
    data file, or its `state/_METADATA` cut in half); returns what was done."""
    steps = sorted(int(n) for n in os.listdir(ckpt_dir) if n.isdigit())
    step_dir = os.path.join(ckpt_dir, str(steps[-1]))
    if rng.random() < 0.5:
        # The merged OCDBT files in state/d are what a restore reads (state/ocdbt.process_*/ hold copies).
        merged = os.path.join(step_dir, "state", "d")
        path = _largest_file(merged if os.path.isdir(merged) else os.path.join(step_dir, "state"))
        b = bytearray(open(path, "rb").read())
        m = len(b) // 2
        b[m:m + 64] = bytes(x ^ 0xFF for x in b[m:m + 64])
        how = "xor 64 bytes of"
    else:
        path = os.path.join(step_dir, "state", "_METADATA")
        b = open(path, "rb").read()[: os.path.getsize(path) // 2]
        how = "truncated"
    open(path, "wb").write(bytes(b))
    return f"{how} {os.path.relpath(path, ckpt_dir)}"


def soak(workdir: str, steps: int, *, every: int, kills: int, corruptions: int, seed: int = 0,
         sleep: float = 0.15, log=print) -> dict:
    """Runs the worker (a subprocess) to `steps`, killed with SIGKILL `kills` times and resumed each time.

    Kill points alternate between "save" (right after the worker prints that it
    saved a checkpoint, while Orbax writes it in the background) and "step" (a
    random moment within the steps after its second save; Orbax commits a save
    before it starts the next, so the first one is committed then). After each kill from the
    second on, until `corruptions` are done, the newest checkpoint is damaged
    before resuming (when an older one exists to fall back to). Returns counts
    and the resume lines the worker printed.
    """
    import queue
    import random
    import signal
    import subprocess
    import threading

    rng = random.Random(seed)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": repo + os.pathsep + os.environ.get("PYTHONPATH", ""), "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, os.path.abspath(__file__), "--workdir", workdir, "--steps", str(steps),
           "--ckpt-every", str(every), "--sleep", str(sleep)]
    ckpt_dir = os.path.join(workdir, "ckpt")
    out = {"kills": 0, "kills_during_save": 0, "kills_during_step": 0, "corruptions": 0, "fell_back": 0,
           "resume_lines": []}
    for attempt in range(kills + 1):
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout], daemon=True).start()
        final = attempt == kills
        mode = "save" if attempt % 2 == 0 else "step"
        saves_seen, target_saves, seen = 0, rng.randint(1, 2), []
        deadline = time.time() + 300
        while proc.poll() is None and time.time() < deadline:
            try:
                line = lines.get(timeout=0.05)
            except queue.Empty:
                continue
            seen.append(line)
            if line.startswith(("resumed from step", "fell back to step")):
                out["resume_lines"].append(line.strip())
                out["fell_back"] += line.startswith("fell back")
            if final:
                continue
            if line.startswith("saved checkpoint step"):
                saves_seen += 1
                if mode == "save" and saves_seen == target_saves:
                    time.sleep(rng.uniform(0.0, 0.02))  # Orbax is still writing it in the background
                    break
                if mode == "step" and saves_seen == 2:  # the first of the two is committed by now
                    time.sleep(rng.uniform(0.05, every * sleep))  # lands in one of the next steps
                    break
        if final:
            proc.wait(timeout=300)
            assert proc.returncode == 0, "".join(seen)[-3000:]
            break
        if proc.poll() is not None:  # finished before the kill point: nothing left to kill
            log(f"worker finished before kill {attempt + 1}")
            break
        in_save = any(".orbax-checkpoint-tmp" in n for n in os.listdir(ckpt_dir)) if os.path.isdir(ckpt_dir) else False
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        out["kills"] += 1
        out["kills_during_save" if in_save else "kills_during_step"] += 1
        committed = sorted(int(n) for n in os.listdir(ckpt_dir) if n.isdigit()) if os.path.isdir(ckpt_dir) else []
        log(f"kill {out['kills']} ({mode}{', a save in flight' if in_save else ''}); committed steps {committed}")
        # From the second kill on, until `corruptions` are done (deferred while no older step exists).
        if attempt >= 1 and out["corruptions"] < corruptions and len(committed) >= 2:
            log(f"  corrupted step {committed[-1]}: {corrupt_newest(ckpt_dir, rng)}")
            out["corruptions"] += 1
    return out


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
