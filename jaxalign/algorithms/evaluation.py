"""Measurements every algorithm is compared on: accuracy, KL to a reference, memory, size."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxalign.algorithms.rollout import SamplingConfig, make_logprob_fn, sample
from jaxalign.rewards import Rollout


def batches(prompt_data, batch_size: int):
    """Prompt batches over `PromptData` in order (the last one may be smaller)."""
    from jaxalign.data import collate_prompts

    n = len(prompt_data)
    width = int(prompt_data.lengths().max())
    for lo in range(0, n, batch_size):
        idx = range(lo, min(lo + batch_size, n))
        batch = collate_prompts([prompt_data.tokens[i] for i in idx], length=width, pad_id=prompt_data.pad_id)
        batch["prompts"] = [prompt_data.prompts[i] for i in idx]
        batch["answers"] = [prompt_data.answers[i] for i in idx]
        yield batch


def greedy_score(sampler, params, prompt_data, reward_fn, tokenizer, *, max_new_tokens: int,
                 batch_size: int = 1000) -> float:
    """Mean reward of greedy completions (for a 0/1 verifier: accuracy)."""
    total, count = 0.0, 0
    for batch in batches(prompt_data, batch_size):
        result = sampler(params, batch["prompt_tokens"], batch["prompt_mask"], max_new_tokens=max_new_tokens,
                         rng=jax.random.PRNGKey(0), greedy=True, eos_ids=(tokenizer.eos_token_id,),
                         pad_id=tokenizer.pad_token_id or 0)
        texts = tokenizer.batch_decode(np.where(np.asarray(result.mask) > 0, np.asarray(result.completions),
                                                tokenizer.pad_token_id or 0).tolist(), skip_special_tokens=True)
        rollout = Rollout(batch["prompts"], texts, batch["answers"], np.zeros((len(texts), 1)),
                          np.zeros((len(texts), 1)), np.asarray(result.lengths), np.asarray(result.truncated))
        r = np.asarray(reward_fn(rollout))
        total, count = total + float(r.sum()), count + len(r)
    return total / max(count, 1)


class KLMeter:
    """KL(π ‖ π_ref) per completion, estimated on samples from π at temperature 1.

    Σ_t (log π − log π_ref) over the sampled tokens, averaged over
    completions: an unbiased Monte-Carlo estimate of the sequence-level KL.
    logprob_chunk: positions per chunk of the reference's LM head (`response_logprobs`).
    """

    def __init__(self, reference_model, reference_params, *, logprob_chunk: int | None = None):
        self.ref_params = jax.tree.map(jnp.copy, reference_params)
        self.ref_logps = make_logprob_fn(reference_model, logprob_chunk=logprob_chunk)

    def __call__(self, sampler, params, prompt_data, tokenizer, *, max_new_tokens: int, seed: int = 0,
                 batch_size: int = 1000) -> float:
        cfg = SamplingConfig(max_new_tokens=max_new_tokens)
        kls = []
        for k, batch in enumerate(batches(prompt_data, batch_size)):
            _, arrays = sample(sampler, params, batch, n=1, cfg=cfg, eos_ids=(tokenizer.eos_token_id,),
                               pad_id=tokenizer.pad_token_id or 0, rng=jax.random.PRNGKey(seed + k),
                               tokenizer=tokenizer)
            ref = np.asarray(self.ref_logps(self.ref_params, arrays))
            mask = arrays["loss_mask"][:, 1:]
            kls.append(((arrays["old_logps"] - ref) * mask).sum(1))
        return float(np.concatenate(kls).mean())


def count_params(params) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


def step_memory_bytes(train_step, state, batch) -> int | None:
    """Peak memory of the compiled step from XLA's memory analysis (`TrainStep.memory_bytes`: arguments +
    outputs + temporaries less what donation lets outputs reuse, for a step split in two the larger of its
    gradient and update programs); None where the backend gives no analysis."""
    return train_step.memory_bytes(state, batch)
