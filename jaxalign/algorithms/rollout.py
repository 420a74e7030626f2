"""The rollout phase shared by PPO and the GRPO family: sample, decode, lay out for training.

A training batch built from a rollout has R rows of `[prompt ; completion]`
(width P + N, left-padded prompt, right-padded completion) and per-token
arrays of width P + N − 1 aligned with `tokens[:, 1:]`, the targets that
`response_logprobs` scores.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import numpy as np
from flax import nnx

from jaxalign.algorithms.common import response_logprobs
from jaxalign.data.batching import first_scored_columns
from jaxalign.rewards import Rollout
from jaxalign.sampling import Sampler
from jaxalign.training import ModelDef


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int = 16
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None


def sample(sampler: Sampler, params, prompt_batch: dict, *, n: int, cfg: SamplingConfig, eos_ids, pad_id: int,
           rng: jax.Array, tokenizer) -> tuple[Rollout, dict]:
    """Draw `n` completions per prompt; returns the decoded `Rollout` and the training arrays.

    prompt_batch: `prompt_tokens`, `prompt_mask` `[B, P]` (left-padded), and
    `prompts`, `answers` lists. Training arrays (NumPy, R = B·n rows):
    `tokens`, `attention_mask`, `loss_mask` `[R, P+N]` and `old_logps`
    `[R, P+N-1]` (the sampler's log-probs at the sampling temperature).
    """
    result = sampler(params, prompt_batch["prompt_tokens"], prompt_batch["prompt_mask"],
                     max_new_tokens=cfg.max_new_tokens, rng=rng, temperature=cfg.temperature,
                     top_k=cfg.top_k, top_p=cfg.top_p, eos_ids=tuple(eos_ids), n=n, pad_id=pad_id)
    result = jax.device_get(result)
    tokens, mask = (np.asarray(x) for x in result.sequences())
    completions = np.asarray(result.completions)
    gen_mask = np.asarray(result.mask)
    texts = tokenizer.batch_decode(np.where(gen_mask > 0, completions, pad_id).tolist(), skip_special_tokens=True)
    rep = lambda xs: [x for x in xs for _ in range(n)]  # noqa: E731
    rollout = Rollout(prompts=rep(prompt_batch["prompts"]), completions=texts, answers=rep(prompt_batch["answers"]),
                      tokens=tokens, mask=mask, lengths=np.asarray(result.lengths),
                      truncated=np.asarray(result.truncated))
    p = result.prompts.shape[1]
    loss_mask = np.concatenate([np.zeros_like(result.prompt_mask), gen_mask], axis=1)
    old = np.zeros((tokens.shape[0], tokens.shape[1] - 1), np.float32)
    old[:, p - 1:] = np.asarray(result.logprobs)
    arrays = {"tokens": tokens.astype(np.int32), "attention_mask": mask.astype(np.int32),
              "loss_mask": loss_mask.astype(np.int32), "old_logps": old}
    return rollout, arrays


def positions(mask: np.ndarray) -> np.ndarray:
    """Positions counted over real tokens (what the sampler used), `[R, T]`."""
    return np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)


def make_logprob_fn(model: nnx.Module, *, temperature: float = 1.0, logprob_chunk: int | None = None):
    """A jitted `(params, batch, last=None) -> logps` for a frozen model (reference, old policy).

    `[R, T-1]` aligned with `tokens[:, 1:]`, or `[R, last]` for the last `last`
    columns only (see `response_logprobs`, which also says what `logprob_chunk` does).
    """
    model_def, _ = ModelDef.of(model)

    @functools.partial(jax.jit, static_argnames="last")
    def fn(params, tokens, attention_mask, loss_mask, last=None):
        m = model_def.merge(params)
        batch = {"tokens": tokens, "attention_mask": attention_mask, "loss_mask": loss_mask}
        return response_logprobs(m, batch, temperature=temperature, last=last, logprob_chunk=logprob_chunk)[0]

    # Host arrays go to the jitted function as they are (a jnp.asarray each would be one more
    # compiled staging program per shape).
    return lambda params, b, last=None: fn(params, b["tokens"], b["attention_mask"], b["loss_mask"], last=last)


def completion_width(loss_mask: np.ndarray) -> int:
    """N of a rollout batch `[R, P + N]`: columns from the first generated token on.

    Every row generates at least one token (mask 1) at column P, and the
    prompt columns before it have mask 0.
    """
    first = first_scored_columns(loss_mask)
    return int(loss_mask.shape[1] - min(first)) if first else 1


def concat_rows(parts: list[dict]) -> dict:
    """Stack training arrays of several rollouts, left-padding prompts to a common width."""
    width = max(p["tokens"].shape[1] for p in parts)
    out: dict[str, list] = {}
    for p in parts:
        extra = width - p["tokens"].shape[1]
        for k, v in p.items():
            out.setdefault(k, []).append(np.pad(v, ((0, 0), (extra, 0))) if v.ndim == 2 and extra else v)
    return {k: np.concatenate(v) for k, v in out.items()}


def completion_stats(rollout: Rollout) -> dict[str, float]:
    lengths = np.asarray(rollout.lengths, np.float32)
    return {"response_length_mean": float(lengths.mean()), "response_length_max": float(lengths.max()),
            "truncation_rate": float(np.mean(rollout.truncated))}
