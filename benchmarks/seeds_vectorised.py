"""Would running the comparison's seeds vectorised in one program be cheaper? Measured on its SFT step.

    .venv/bin/python benchmarks/seeds_vectorised.py [--seeds 3] [--rounds 7]

Times the demo model's SFT update (loss, gradient, AdamW) for S seeds two
ways on the same inputs: S calls of the one-seed program one after the other,
and one call of the program `jax.vmap`-ed over S stacked parameter sets. The
rounds alternate the two, and the medians are printed with their ratio. The
SFT step is the part of a seed that vectorises most simply (the RL runs add a
sampler and a Python verifier per step); if it gains little, the rest would
gain less. The measurement and the choice are in docs/comparison.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from experiments.configs import arithmetic as demo  # noqa: E402
from jaxalign import models  # noqa: E402
from jaxalign.losses import sft_loss  # noqa: E402


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--batch", type=int, default=64)
    args = ap.parse_args(argv)
    cfg = demo.get_config()
    over = {k: v for k, v in cfg.model.items() if k != "family"}
    mcfg = models.tiny_config(cfg.model.family, vocab_size=16, **over)
    graph, _ = nnx.split(models.Transformer(mcfg, rngs=nnx.Rngs(0)))
    params = [nnx.split(models.Transformer(mcfg, rngs=nnx.Rngs(s)))[1] for s in range(args.seeds)]
    tx = optax.adamw(1e-3)
    rng = np.random.default_rng(0)
    width = 14
    tokens = [jnp.asarray(rng.integers(0, 16, (args.batch, width)), jnp.int32) for _ in range(args.seeds)]
    mask = jnp.ones((args.batch, width - 1), jnp.float32)

    def update(p, opt, toks):
        def loss(p):
            logits = nnx.merge(graph, p)(toks)
            return sft_loss(logits[:, :-1], toks[:, 1:], mask)[0]

        grads = jax.grad(loss)(p)
        upd, opt = tx.update(grads, opt, p)
        return optax.apply_updates(p, upd), opt

    one = jax.jit(update)
    many = jax.jit(jax.vmap(update))
    opts = [tx.init(p) for p in params]
    stacked = jax.tree.map(lambda *x: jnp.stack(x), *params)
    stacked_opt = jax.tree.map(lambda *x: jnp.stack(x), *opts)
    stacked_tokens = jnp.stack(tokens)
    jax.block_until_ready(one(params[0], opts[0], tokens[0]))  # compile both before timing
    jax.block_until_ready(many(stacked, stacked_opt, stacked_tokens))
    seq, vec = [], []
    for _ in range(args.rounds):
        t = time.perf_counter()
        for _ in range(10):
            outs = [one(p, o, x) for p, o, x in zip(params, opts, tokens)]
        jax.block_until_ready(outs)
        seq.append((time.perf_counter() - t) / 10)
        t = time.perf_counter()
        for _ in range(10):
            out = many(stacked, stacked_opt, stacked_tokens)
        jax.block_until_ready(out)
        vec.append((time.perf_counter() - t) / 10)
    result = {"seeds": args.seeds, "batch": args.batch, "sequential_ms": 1000 * statistics.median(seq),
              "vectorised_ms": 1000 * statistics.median(vec)}
    result["speedup"] = result["sequential_ms"] / result["vectorised_ms"]
    print(f"{args.seeds} seeds' SFT update, batch {args.batch}: one after the other "
          f"{result['sequential_ms']:.1f} ms, vectorised {result['vectorised_ms']:.1f} ms "
          f"({result['speedup']:.2f}x)")
    return result


if __name__ == "__main__":
    main()
