"""What the NaN guard on the kept state costs: a train step with it against the same step without.

    JAX_PLATFORMS=cpu python benchmarks/guard_cost.py [--hidden 256 --layers 4 --steps 30]

The step "without" is the previous guard (loss and gradient norm only):
jaxalign/training/step.py at `--baseline-rev` (default 480328a, the last
version before the state check), imported as a module beside the current one. Both steps are built for the same tiny Llama, SFT loss and AdamW
and timed alternately; printed: median seconds per step of each, the update
program's temporary bytes (XLA memory analysis) of each, and whether the two
give bit-identical states on finite steps.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from jaxalign import models, training  # noqa: E402
from jaxalign.algorithms import sft  # noqa: E402
from jaxalign.training import step as step_now  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_baseline(rev: str):
    """jaxalign/training/step.py at `rev`, imported as a separate module."""
    text = subprocess.run(["git", "-C", REPO, "show", f"{rev}:jaxalign/training/step.py"],
                          check=True, capture_output=True, text=True).stdout
    path = os.path.join(tempfile.mkdtemp(), "step_baseline.py")
    with open(path, "w") as f:
        f.write(text)
    spec = importlib.util.spec_from_file_location("step_baseline", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--length", type=int, default=64)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--baseline-rev", default="480328a")
    a = p.parse_args()
    baseline = load_baseline(a.baseline_rev)
    cfg = models.tiny_config("llama", vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=4 * a.hidden,
                             num_hidden_layers=a.layers, num_attention_heads=4, num_key_value_heads=2,
                             head_dim=a.hidden // 4, max_position_embeddings=a.length)
    tx = training.make_optimizer(training.OptimConfig(lr=1e-3, warmup_steps=1, total_steps=1000))
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, a.vocab, (a.batch, a.length), dtype=np.int32)
    batch = {"tokens": tokens, "loss_mask": np.ones_like(tokens), "attention_mask": np.ones_like(tokens),
             "positions": np.broadcast_to(np.arange(a.length, dtype=np.int32), tokens.shape).copy(),
             "segment_ids": np.ones_like(tokens)}

    def build(module):
        state, model_def = training.init_train_state(models.Transformer(cfg, rngs=nnx.Rngs(0)), tx, seed=0)
        step = module.make_train_step(sft.sft_loss_fn, tx, model_def=model_def,
                                      shardings=training.state_shardings(state))
        return step, state

    runs = {}
    for name, module in (("without", baseline), ("with", step_now)):
        step, state = build(module)
        programs = step.compiled(state, batch)
        temp = programs[-1].memory_analysis().temp_size_in_bytes
        runs[name] = [step, state, temp, [], programs, []]
    n_params = sum(x.size for x in jax.tree.leaves(runs["with"][1].params))
    norms: dict = {}
    for _ in range(a.steps):
        for name in ("without", "with"):
            r = runs[name]
            t = time.perf_counter()
            r[1], m = r[0](r[1], batch)
            jax.block_until_ready(r[1])
            r[3].append(time.perf_counter() - t)
            norms.setdefault(name, []).append(float(m["grad_norm"]))
            if len(r[4]) == 2:  # the update program alone, on this step's gradient
                grads, gm = r[4][0](r[1], r[0].place_batch(batch))
                jax.block_until_ready(grads)
                t = time.perf_counter()
                r[1], _ = r[4][1](r[1], grads, gm["loss"])
                jax.block_until_ready(r[1])
                r[5].append(time.perf_counter() - t)
    same = all(jax.tree.leaves(jax.tree.map(lambda x, y: bool(np.array_equal(x, y)),
                                            jax.device_get(runs["without"][1]), jax.device_get(runs["with"][1]))))
    print(f"tiny Llama d={a.hidden} L={a.layers} vocab={a.vocab}: {n_params / 1e6:.2f}M params, "
          f"batch {a.batch}x{a.length}, {a.steps} steps each (first dropped), split_update="
          f"{runs['with'][0].splits(runs['with'][1])}")
    for name in ("without", "with"):
        times = runs[name][3][1:]
        upd = runs[name][5][1:]
        print(f"  guard {name:>7} the state check: median {statistics.median(times) * 1e3:.2f} ms/step"
              + (f", update program alone {statistics.median(upd) * 1e3:.2f} ms" if upd else "")
              + f", update program temp {runs[name][2] / 2**20:.2f} MiB")
    print(f"  states bit-identical after {a.steps} finite steps (x2 with the timed updates): {same}; "
          f"grad_norm metrics identical: {norms['with'] == norms['without']}")


if __name__ == "__main__":
    main()
