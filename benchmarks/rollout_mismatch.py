"""Rollout/trainer log-prob mismatch: a bfloat16 sampler against the float32 trainer.

    JAX_PLATFORMS=cpu python benchmarks/rollout_mismatch.py

Random-init Llama configs (the tests' tiny one and a wider one), the same
float32 parameters in both programs: the sampler computes in float32, then in
bfloat16 (`Transformer(dtype=bfloat16)`), the trainer recomputes the completion's
log-probs in float32 as the on-policy driver does. Prints the driver's
mismatch metrics and what `tis` / `mis` (C = 2) would do; docs/algorithms.md
has the table.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from jaxalign import models  # noqa: E402
from jaxalign.algorithms.rollout import make_logprob_fn  # noqa: E402
from jaxalign.losses import importance_correction  # noqa: E402
from jaxalign.sampling import Sampler  # noqa: E402

CONFIGS = {
    "tiny (d 64, 2 layers, vocab 128)": dict(),
    "wider (d 256, 4 layers, vocab 4096)": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                                                num_attention_heads=8, num_key_value_heads=4, head_dim=32,
                                                vocab_size=4096),
}


def measure(overrides: dict, sampler_dtype=jnp.bfloat16, *, rows: int = 64, prompt_len: int = 16, new_tokens: int = 32, seed: int = 0) -> dict:
    cfg = models.tiny_config("llama", max_position_embeddings=128, **overrides)
    trainer = models.Transformer(cfg, rngs=nnx.Rngs(seed))
    sampler_model = models.Transformer(cfg, rngs=nnx.Rngs(seed), dtype=sampler_dtype)
    params = nnx.to_pure_dict(nnx.state(trainer, nnx.Param))
    prompts = jax.random.randint(jax.random.PRNGKey(seed), (rows, prompt_len), 1, cfg.vocab_size)
    result = Sampler(sampler_model)(params, prompts, jnp.ones_like(prompts), max_new_tokens=new_tokens,
                                    rng=jax.random.PRNGKey(seed + 1), temperature=1.0)
    tokens, mask = result.sequences()
    loss_mask = jnp.concatenate([jnp.zeros_like(result.prompt_mask), result.mask], axis=1)
    old = make_logprob_fn(trainer)(params, {"tokens": tokens, "attention_mask": mask, "loss_mask": loss_mask},
                                   last=new_tokens)
    m = result.mask.astype(jnp.float32)
    out = {}
    for correction in ("tis", "mis"):
        _, _, metrics = importance_correction(old, result.logprobs, m, is_correction=correction, is_cap=2.0)
        out.update({k: float(v) for k, v in metrics.items() if k.startswith("mismatch") or
                    (correction == "tis" and k == "is_weight_mean") or (correction == "mis" and k == "is_masked_frac")})
    _, _, seq = importance_correction(old, result.logprobs, m, is_correction="mis", is_cap=2.0, is_level="sequence")
    out["is_masked_frac_sequence"] = float(seq["is_masked_frac"])
    out["tokens"] = int(m.sum())
    return out


if __name__ == "__main__":
    print(f"platform: {jax.devices()[0].platform}")
    for name, overrides in CONFIGS.items():
        for dtype in (jnp.float32, jnp.bfloat16):
            row = measure(overrides, dtype)
            print(f"{name}, {jnp.dtype(dtype).name} sampler:",
                  {k: (float(f"{v:.3g}") if isinstance(v, float) else v) for k, v in row.items()})
