"""Generation throughput: jaxalign's sampler next to transformers' `generate` (torch, CPU).

    python -m benchmarks.sampling            # tiny + ~110M Llama, batch 1/8/32, 64 and 256 new tokens
    python -m benchmarks.sampling --quick    # tiny full grid, ~110M at 64 new tokens only

Both sides run the same random weights (ours saved with `save_hf`, loaded by
`from_pretrained`), the same 32-token prompts, and sample at temperature 1
with no top-k/top-p and no early stop (no EOS for us, `min_new_tokens` for
transformers), so both generate exactly batch x new_tokens tokens. Compile
time is excluded from jaxalign's tokens/s and reported in its own column.
Rows go to results/sampling.json, each with the 1-minute load average at its end
(this benchmark alone accounts for about 2 of it).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _pin_threads(argv: list[str]) -> None:
    """`--threads N`: run both libraries on the first N cores only, set before they load.

    On a machine shared with other jobs, two-thread torch collapses (its
    OpenMP workers spin waiting for a descheduled peer) while XLA degrades
    gently, which would make the comparison meaningless; one core each is
    robust to a neighbour. XLA sizes its pool from the affinity mask.
    """
    if "--threads" in argv:
        n = int(argv[argv.index("--threads") + 1])
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:n])


_pin_threads(sys.argv)

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from jaxalign.models import Transformer, save_hf, tiny_config  # noqa: E402
from jaxalign.sampling import Sampler, compile_stats  # noqa: E402

PROMPT_LEN = 32
MODELS = {
    "tiny-llama": dict(max_position_embeddings=512),  # tiny_config: hidden 64, 2 layers, vocab 128
    "llama-110M": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                       num_key_value_heads=12, head_dim=64, vocab_size=32000, max_position_embeddings=2048,
                       tie_word_embeddings=True),
}


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def bench_model(name: str, batches, lengths, repeats: int) -> list[dict]:
    import torch
    import transformers

    model = Transformer(tiny_config("llama", **MODELS[name]), rngs=nnx.Rngs(0))
    n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    with tempfile.TemporaryDirectory() as tmp:
        save_hf(model, tmp)
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp, attn_implementation="sdpa").eval()
    sampler, params = Sampler(model), nnx.state(model, nnx.Param)
    vocab = model.cfg.vocab_size
    rows = []
    for batch in batches:
        prompts = np.random.default_rng(batch).integers(3, vocab, size=(batch, PROMPT_LEN)).astype(np.int32)
        mask = np.ones_like(prompts)
        for new in lengths:
            def ours(seed):
                out = sampler(params, prompts, mask, max_new_tokens=new, rng=jax.random.key(seed))
                jax.block_until_ready(out.completions)
                assert out.completions.shape == (batch, new) and bool(out.mask.all())
                return out

            def theirs():
                with torch.no_grad():
                    out = hf.generate(input_ids=torch.tensor(prompts, dtype=torch.long),
                                      attention_mask=torch.tensor(mask, dtype=torch.long), do_sample=True,
                                      temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=new, min_new_tokens=new,
                                      pad_token_id=0)
                assert out.shape == (batch, PROMPT_LEN + new)

            before = compile_stats()
            _, first = timed(lambda: ours(0))
            compile_s = compile_stats().seconds - before.seconds
            if not rows:
                theirs()  # warm-up (first-call allocations, lazy imports)
            # Interleaved, so that load from other processes hits both sides alike.
            jax_s = hf_s = float("inf")
            for i in range(repeats):
                jax_s = min(jax_s, timed(functools.partial(ours, i + 1))[1])
                hf_s = min(hf_s, timed(theirs)[1])
            row = dict(model=name, params_m=round(n_params / 1e6, 1), batch=batch, prompt=PROMPT_LEN,
                       new_tokens=new, jaxalign_tok_s=batch * new / jax_s, transformers_tok_s=batch * new / hf_s,
                       speedup=hf_s / jax_s, jaxalign_compile_s=compile_s, jaxalign_first_call_s=first,
                       load_avg_1min=os.getloadavg()[0])
            rows.append(row)
            print(format_row(row), flush=True)
    return rows


HEADER = (f"{'model':<11} {'params':>7} {'batch':>5} {'new':>4} {'jaxalign tok/s':>14} "
          f"{'transformers tok/s':>18} {'speedup':>7} {'compile s':>9} {'load':>5}")


def format_row(r: dict) -> str:
    return (f"{r['model']:<11} {r['params_m']:>6}M {r['batch']:>5} {r['new_tokens']:>4} "
            f"{r['jaxalign_tok_s']:>14.1f} {r['transformers_tok_s']:>18.1f} {r['speedup']:>6.2f}x "
            f"{r['jaxalign_compile_s']:>9.2f} {r['load_avg_1min']:>5.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="~110M model at 64 new tokens only")
    parser.add_argument("--threads", type=int, default=None, help="use only the first N cores (both sides)")
    parser.add_argument("--out", default="results/sampling.json")
    args = parser.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    cores = len(os.sched_getaffinity(0))
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), {cores} of {os.cpu_count()} CPUs")
    print(HEADER, flush=True)
    rows = bench_model("tiny-llama", (1, 8, 32), (64, 256), repeats=3)
    rows += bench_model("llama-110M", (1, 8, 32), (64,) if args.quick else (64, 256), repeats=2)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    env = dict(jax=jax.__version__, torch=torch.__version__, cpus=os.cpu_count(), cores_used=cores,
               torch_threads=torch.get_num_threads(), machine=platform.machine(),
               quick=args.quick, prompt_len=PROMPT_LEN, sampling="temperature 1, no top-k/top-p, no EOS")
    out.write_text(json.dumps(dict(env=env, rows=rows), indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
