"""Jitted autoregressive generation with a KV cache: tokens, per-token log-probs, masks.

    from jaxalign.sampling import generate
    out = generate(model, prompts, prompt_mask, max_new_tokens=64, rng=jax.random.key(0),
                   temperature=0.8, top_p=0.95, eos_ids=(eos,), n=8)
    out.completions, out.logprobs, out.mask   # [B*n, 64]

`Sampler(model)(params, ...)` does the same with params held elsewhere (a
train state, sharded on a mesh). See docs/sampling.md.
"""

from jaxalign.sampling.buckets import MIN_BUCKET, bucket_length
from jaxalign.sampling.sampler import CompileStats, SampleResult, Sampler, compile_stats, generate
from jaxalign.sampling.logits_processing import argmax_first, sample_categorical, sampling_logprobs, token_logprobs

__all__ = [
    "MIN_BUCKET", "CompileStats", "SampleResult", "Sampler", "argmax_first", "bucket_length", "compile_stats",
    "generate", "sample_categorical", "sampling_logprobs", "token_logprobs",
]
