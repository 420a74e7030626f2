"""What chunking the LM head's log-probs (`jaxalign.models.logprobs.head_logprobs`) saves and costs.

    JAX_PLATFORMS=cpu .venv/bin/python benchmarks/chunked_logprobs.py

memory: XLA's `memory_analysis()` of the compiled gradient (w.r.t. the head
  and the hidden states) of Σ log p at Llama-3.1-8B's head (D 4096, V 128,256,
  bf16 weights) for 32 rows × 1,024 positions: compiled from shapes only.
time: wall time of that gradient, run, at SmolLM2-135M's head (D 576,
  V 49,152) for 4 rows × 256 positions, whole and in chunks of 128, 64 and
  32 positions: the price of recomputing each chunk's logits in the backward
  pass (the best of 5 runs; on a shared CPU, compare rows of one run only).
`logprob_chunk` None is the automatic size (≤ 256 MiB of float32 logits per chunk).
docs/training.md ("Chunked log-probs") reads it.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
from flax import nnx

from jaxalign.models import Transformer, tiny_config
from jaxalign.models.logprobs import chunk_positions, head_logprobs


def head_model(hidden: int, vocab: int, *, tied: bool, dtype, abstract: bool):
    cfg = tiny_config("llama", hidden_size=hidden, vocab_size=vocab, num_hidden_layers=1, intermediate_size=64,
                      num_attention_heads=1, num_key_value_heads=1, head_dim=64, tie_word_embeddings=tied)
    make = lambda: Transformer(cfg, rngs=nnx.Rngs(0), param_dtype=dtype)  # noqa: E731
    return nnx.eval_shape(make) if abstract else make()


def grad_fn(graphdef, chunk):
    def loss(params, hidden, targets):
        return jnp.sum(head_logprobs(nnx.merge(graphdef, params), hidden, targets, logprob_chunk=chunk))

    return jax.jit(jax.grad(loss, argnums=(0, 1)))


def memory(rows=32, time_=1024, hidden=4096, vocab=128_256):
    graphdef, params = nnx.split(head_model(hidden, vocab, tied=False, dtype=jnp.bfloat16, abstract=True))
    h = jax.ShapeDtypeStruct((rows, time_, hidden), jnp.bfloat16)
    y = jax.ShapeDtypeStruct((rows, time_), jnp.int32)
    print(f"memory: grad of Σ log p, D {hidden}, V {vocab}, {rows} x {time_} positions (XLA:CPU memory_analysis)")
    print("| logprob_chunk | positions per chunk | temporaries GiB | compile s |")
    print("|---|---|---|---|")
    for chunk in (0, None, 64):
        t0 = time.perf_counter()
        compiled = grad_fn(graphdef, chunk).lower(params, h, y).compile()
        temp = compiled.memory_analysis().temp_size_in_bytes
        size = chunk_positions(chunk, rows=rows, time=time_, vocab=vocab)
        print(f"| {chunk} | {size} | {temp / 2**30:.2f} | {time.perf_counter() - t0:.1f} |")


def speed(rows=4, time_=256, hidden=576, vocab=49_152, repeats=5):
    graphdef, params = nnx.split(head_model(hidden, vocab, tied=True, dtype=jnp.float32, abstract=False))
    h = jax.random.normal(jax.random.PRNGKey(0), (rows, time_, hidden))
    y = jax.random.randint(jax.random.PRNGKey(1), (rows, time_), 0, vocab)
    print(f"\ntime: grad of Σ log p, D {hidden}, V {vocab} (tied), {rows} x {time_} positions, best of {repeats}")
    print("| logprob_chunk | positions per chunk | temporaries MiB | step ms |")
    print("|---|---|---|---|")
    for chunk in (0, 128, 64, 32):
        fn = grad_fn(graphdef, chunk)
        temp = fn.lower(params, h, y).compile().memory_analysis().temp_size_in_bytes
        jax.block_until_ready(fn(params, h, y))
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(params, h, y))
            best = min(best, time.perf_counter() - t0)
        size = chunk_positions(chunk, rows=rows, time=time_, vocab=vocab)
        print(f"| {chunk} | {size} | {temp / 2**20:.0f} | {best * 1e3:.0f} |")


if __name__ == "__main__":
    memory()
    speed()
