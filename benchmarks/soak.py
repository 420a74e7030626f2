"""Fault soak: a checkpointed toy run killed with SIGKILL many times and resumed, its newest
checkpoint damaged now and then, must end bit-identical to an uninterrupted run.

    python benchmarks/soak.py --kills 20 --corruptions 5 --steps 60 --every 3 --seed 0

The run is `tests/_train_worker.py` (the toy model on 8 simulated CPU devices,
data 2 x fsdp 2 x tensor 2, async Orbax checkpoints); `soak` there alternates
kills right after a save was started (Orbax still writing it) and kills a few
steps after a save, and from the second kill on damages the newest committed
step (64 bytes XOR-ed in its largest state file, or its `state/_METADATA` cut in
half) until `--corruptions` are done. The test suite runs the same with 2 kills
and 1 corruption (tests/test_training_loop.py). Prints each kill, the resume
lines the run printed, and whether every logged metric and the final state
equal the uninterrupted run's bit for bit; exits 1 if not.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from jaxalign.training import Checkpointer  # noqa: E402
from jaxalign.training.metrics import read_jsonl  # noqa: E402
from tests._train_worker import build, run, soak  # noqa: E402

COMPARED = ("loss", "grad_norm", "lr", "finite", "skipped_steps", "token_nll")


def final_state(workdir: str, every: int):
    ckpt = Checkpointer(os.path.join(workdir, "ckpt"), save_every=every)
    try:
        return jax.device_get(ckpt.restore(build("8")[1]())[0])
    finally:
        ckpt.close()


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--kills", type=int, default=20)
    p.add_argument("--corruptions", type=int, default=5)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--every", type=int, default=3)
    p.add_argument("--sleep", type=float, default=0.15)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default=None, help="kept if given; a temporary directory otherwise")
    a = p.parse_args()
    root = a.workdir or tempfile.mkdtemp(prefix="jaxalign_soak_")
    ref_dir, soak_dir = os.path.join(root, "ref"), os.path.join(root, "soak")
    shutil.rmtree(ref_dir, ignore_errors=True)
    shutil.rmtree(soak_dir, ignore_errors=True)
    t0 = time.time()
    run(ref_dir, a.steps, ckpt_every=a.every, sleep=0.0)
    result = soak(soak_dir, a.steps, every=a.every, kills=a.kills, corruptions=a.corruptions, seed=a.seed,
                  sleep=a.sleep)
    for line in result.pop("resume_lines"):
        print("  run printed:", line)
    ref = {r["step"]: r for r in read_jsonl(os.path.join(ref_dir, "metrics.jsonl"))}
    rows = read_jsonl(os.path.join(soak_dir, "metrics.jsonl"))
    steps_ok = [r["step"] for r in rows] == list(range(1, a.steps + 1))
    metrics_ok = steps_ok and all(r.get(k) == ref[r["step"]].get(k) for r in rows for k in COMPARED)
    same = jax.tree.map(np.array_equal, final_state(ref_dir, a.every), final_state(soak_dir, a.every))
    state_ok = all(jax.tree.leaves(same))
    print(f"soak: {result} in {time.time() - t0:.0f} s; every step logged once: {steps_ok}; "
          f"metrics bit-identical: {metrics_ok}; final state bit-identical: {state_ok}")
    if not a.workdir:
        shutil.rmtree(root, ignore_errors=True)
    return 0 if (metrics_ok and state_ok) else 1


if __name__ == "__main__":
    sys.exit(main())
