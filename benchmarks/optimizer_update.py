"""The optimizer update of SmolLM2-135M's parameters: jaxalign's against plain optax and torch.

    JAX_PLATFORMS=cpu python benchmarks/optimizer_update.py [--rounds 5 --calls 3 --out results/optimizer_update.json]

Five variants, each on 134.5M float32 parameters shaped like SmolLM2-135M's
(the `Transformer` of its config, built abstractly; random values):

- `optax_adamw`: plain `optax.adamw(1e-3)` and `optax.apply_updates` under
  `jax.jit`, params and optimizer state donated: the floor.
- `jaxalign_update`: the update program of jaxalign's train step, as the step
  runs it (`make_train_step(..., split_update=True)`: the gradient norm,
  clipping to 1.0, the NaN guard on the kept state, AdamW with decoupled
  weight decay 0.01 on matrices; the state donated). The loss is a stand-in,
  so the gradient program is trivial; only the update program is timed.
- `jaxalign_update_step_options`: the same program compiled with the XLA:CPU
  options a one-program step gets (YNNPACK dot fusions, `jaxalign.host`): the
  step of any model past 16M parameters, SmolLM2 included, runs its update
  inside one program compiled that way.
- `global_norm`: the gradient norm alone (one read of the gradient).
- `torch_fused`: `torch.optim.AdamW(fused=True)` (torch CPU, 2 threads) on
  the same shapes.

The variants run in `--rounds` interleaved rounds of `--calls` timed calls
each, after `--warmup` calls, so that a neighbour's load on the shared cores
falls on all of them alike. Printed and written: per variant the median of
all calls, the min and max, the per-round medians; the update programs'
temporary bytes (XLA memory analysis); the ratio of each jaxalign update to plain optax (median over rounds of each round's ratio, and the
ratio of the overall medians); the 1-minute load average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from jaxalign import models, training  # noqa: E402
from jaxalign import sharding as shd  # noqa: E402
from jaxalign.host import train_step_compiler_options  # noqa: E402
from jaxalign.training import step as step_module  # noqa: E402

SMOLLM2 = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
               num_attention_heads=9, num_key_value_heads=3, head_dim=64, tie_word_embeddings=True,
               rope_theta=1e5, max_position_embeddings=2048)


def smollm2_params(seed: int = 0):
    """(params, ModelDef): random float32 arrays in the tree of SmolLM2-135M's `Transformer`."""
    cfg = models.tiny_config("llama", **SMOLLM2)
    abstract = nnx.eval_shape(lambda: models.Transformer(cfg, rngs=nnx.Rngs(0)))
    model_def, shapes = training.ModelDef.of(abstract)
    leaves, treedef = jax.tree.flatten(shapes)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    params = [jax.jit(lambda k, s=s: 0.02 * jax.random.normal(k, s.shape, s.dtype))(k) for k, s in zip(keys, leaves)]
    return jax.tree.unflatten(treedef, params), model_def


def load_average() -> float:
    return os.getloadavg()[0]


def timed(fn) -> float:
    t = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - t


def build_variants(params, model_def, grads):
    """name -> a zero-argument callable running one update (each holds its own state)."""
    variants = {}

    # Plain optax, params and state donated.
    tx = optax.adamw(1e-3)
    plain = {"params": jax.tree.map(jnp.copy, params)}
    plain["opt"] = jax.jit(tx.init)(plain["params"])

    def plain_update(p, s, g):
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    plain_update = jax.jit(plain_update, donate_argnums=(0, 1))

    def run_plain():
        plain["params"], plain["opt"] = plain_update(plain["params"], plain["opt"], grads)
        return plain["params"]

    variants["optax_adamw"] = run_plain

    # jaxalign's update program, from the train step itself.
    optimizer = training.make_optimizer(training.OptimConfig(lr=1e-3, schedule="constant", warmup_steps=0,
                                                             weight_decay=0.01, grad_clip_norm=1.0))
    mesh = shd.make_mesh(shd.MeshConfig(), devices=jax.devices()[:1])
    rep = shd.replicated(mesh)
    own = jax.device_put(jax.tree.map(jnp.copy, params), rep)
    state = training.TrainState(params=own, opt_state=jax.jit(optimizer.init)(own),
                                step=jnp.zeros((), jnp.int32), rng=jax.random.PRNGKey(0),
                                skipped_steps=jnp.zeros((), jnp.int32))
    state = jax.device_put(state, rep)

    def stand_in_loss(model, batch, rng):
        # A loss touching one parameter: the gradient program is trivial, the update program is the step's.
        return jnp.sum(model.final_norm.scale[...]) * batch["x"][0], {}

    step = step_module.make_train_step(stand_in_loss, optimizer, model_def=model_def,
                                       shardings=training.state_shardings(state), split_update=True)
    batch = {"x": np.ones((1,), np.float32)}
    _, update = step.compiled(state, batch)
    # The same program compiled with the options a one-program step (any model past 16M parameters)
    # gets for its whole program, the update included (host.train_step_compiler_options).
    _, lowered = step.lower(state, batch)
    update_step_options = lowered.compile(train_step_compiler_options(jax.devices()[0].platform))
    loss = jnp.float32(1.0)
    memory = {}
    for name, program in (("jaxalign_update", update), ("jaxalign_update_step_options", update_step_options)):
        holder = {"state": jax.tree.map(jnp.copy, state)}  # each its own copy, allocated alike

        def run(program=program, holder=holder):
            holder["state"], metrics = program(holder["state"], grads, loss)
            return holder["state"].params, metrics

        variants[name] = run
        m = program.memory_analysis()
        memory[name] = {"temp_bytes": m.temp_size_in_bytes, "alias_bytes": m.alias_size_in_bytes}

    norm = jax.jit(training.optim.global_norm)
    variants["global_norm"] = lambda: norm(grads)

    variants["torch_fused"] = torch_variant(params, grads)
    return variants, memory


def torch_variant(params, grads):
    import torch

    torch.set_num_threads(2)
    tensors = [torch.from_numpy(np.array(x)) for x in jax.tree.leaves(params)]
    for t, g in zip(tensors, jax.tree.leaves(grads)):
        t.requires_grad_(True)
        t.grad = torch.from_numpy(np.array(g))
    opt = torch.optim.AdamW(tensors, lr=1e-3, weight_decay=0.01, fused=True)

    def run():
        opt.step()

    return run


def summary(samples: list[list[float]]) -> dict:
    flat = [x for r in samples for x in r]
    return {"median_s": statistics.median(flat), "min_s": min(flat), "max_s": max(flat),
            "round_medians_s": [statistics.median(r) for r in samples], "calls": len(flat)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--calls", type=int, default=3, help="timed calls per variant per round")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--out", default="results/optimizer_update.json")
    a = p.parse_args()

    params, model_def = smollm2_params()
    grads = jax.tree.map(lambda x: x * 0.5 + 1e-3, params)  # finite, norm > 1: clipping acts
    n_params = sum(x.size for x in jax.tree.leaves(params))
    variants, memory = build_variants(params, model_def, grads)
    load_before = load_average()
    for fn in variants.values():
        for _ in range(a.warmup):
            timed(fn)
    samples = {k: [] for k in variants}
    for r in range(a.rounds):
        order = list(variants) if r % 2 == 0 else list(reversed(variants))
        for k in order:
            samples[k].append([timed(variants[k]) for _ in range(a.calls)])
    load_after = load_average()

    rows = {k: summary(v) for k, v in samples.items()}
    base = rows["optax_adamw"]
    ratios = {}
    for name in ("jaxalign_update", "jaxalign_update_step_options"):
        per_round = [o / b for o, b in zip(rows[name]["round_medians_s"], base["round_medians_s"])]
        ratios[name] = {"median_of_round_ratios": statistics.median(per_round), "round_ratios": per_round,
                        "ratio_of_medians": rows[name]["median_s"] / base["median_s"]}
    result = {
        "params": n_params,
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "load_1min_before": load_before, "load_1min_after": load_after},
        "rounds": a.rounds, "calls_per_round": a.calls, "warmup": a.warmup,
        "variants": rows,
        "update_program_memory": {**memory, "param_bytes": 4 * n_params},
        "over_optax_adamw": ratios,
    }
    print(f"optimizer update, {n_params / 1e6:.1f}M float32 parameters (SmolLM2-135M shapes); "
          f"{a.rounds} rounds x {a.calls} calls; load {load_before:.2f} -> {load_after:.2f}")
    print(f"{'variant':18s} {'median ms':>10s} {'min ms':>8s} {'max ms':>8s}  per-round medians ms")
    for k, v in rows.items():
        rounds = " ".join(f"{x * 1e3:.0f}" for x in v["round_medians_s"])
        print(f"{k:18s} {v['median_s'] * 1e3:10.1f} {v['min_s'] * 1e3:8.1f} {v['max_s'] * 1e3:8.1f}  {rounds}")
    for name, ratio in ratios.items():
        print(f"{name} / optax_adamw: {ratio['median_of_round_ratios']:.2f}x (median of round ratios), "
              f"{ratio['ratio_of_medians']:.2f}x (ratio of medians); update program temporaries "
              f"{memory[name]['temp_bytes'] / 2**20:.0f} MiB")
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
