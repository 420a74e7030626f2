"""What fingerprinting costs a checkpoint save and restore: `Checkpointer.save` (async) and `restore`
timed on a tiny Llama's AdamW train state, for the tree at `--root` (run it once per tree).

    python benchmarks/checkpoint_cost.py                      # this tree
    git archive 077b83d | tar -x -C /tmp/old && python benchmarks/checkpoint_cost.py --root /tmp/old

Prints the state's size, the first save's blocking time (with the compile of
the finite check / fingerprint program), the median blocking time of the next
saves (what a training step waits for), the median time until a save is
committed (`wait`), and the median restore time.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

CODE = r'''
import os, shutil, statistics, time, jax
from flax import nnx
from jaxalign import models, training
cfg = models.tiny_config("llama", vocab_size=4096, hidden_size=HIDDEN, intermediate_size=4 * HIDDEN,
                         num_hidden_layers=LAYERS, num_attention_heads=8, num_key_value_heads=4,
                         head_dim=HIDDEN // 8, max_position_embeddings=128)
tx = training.make_optimizer(training.OptimConfig(lr=1e-3, warmup_steps=1, total_steps=100))
state, _ = training.init_train_state(models.Transformer(cfg, rngs=nnx.Rngs(0)), tx, seed=0)
nbytes = sum(x.nbytes for x in jax.tree.leaves(state))
ck = training.Checkpointer(WORK, save_every=1, keep=2)
first = saves = None
blocking, committed = [], []
for step in range(1, 7):
    t = time.perf_counter(); ck.save(step, state, {"position": step}); t1 = time.perf_counter()
    ck.wait(); t2 = time.perf_counter()
    if step == 1:
        first = t1 - t
    else:
        blocking.append(t1 - t); committed.append(t2 - t)
restores = []
for _ in range(3):
    t = time.perf_counter(); out, _ = ck.restore(state); jax.block_until_ready(out); restores.append(time.perf_counter() - t)
ck.close()
print(f"state {nbytes / 2**20:.0f} MiB ({len(jax.tree.leaves(state))} arrays): first save blocks {first * 1e3:.0f} ms; "
      f"next saves block {statistics.median(blocking) * 1e3:.0f} ms (median of 5), committed after "
      f"{statistics.median(committed) * 1e3:.0f} ms; restore {statistics.median(restores) * 1e3:.0f} ms (median of 3)")
'''


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--root", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    a = p.parse_args()
    work = tempfile.mkdtemp(prefix="jaxalign_ckpt_cost_")
    code = f"WORK = {work!r}\nHIDDEN = {a.hidden}\nLAYERS = {a.layers}\n" + CODE
    env = {**os.environ, "PYTHONPATH": os.path.abspath(a.root), "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "2",
           "JAXALIGN_COMPILE_CACHE": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    print(out.stdout.strip() or out.stderr[-2000:])
    subprocess.run(["rm", "-rf", work])


if __name__ == "__main__":
    main()
