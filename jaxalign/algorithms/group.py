"""The group-rollout algorithm: GRPO, Dr. GRPO and DAPO are presets of one config.

Per step: draw `prompts_per_step` prompts, sample G completions each, score
them, turn rewards into group-relative advantages, and take `mu` optimiser
steps on the rollout with the old-policy ratio. No critic.

| preset  | scale | agg                       | β    | clip (low, high) | dynamic sampling | overlong |
|---------|-------|---------------------------|------|------------------|------------------|----------|
| grpo    | group | seq-mean-token-mean       | 0.04 | 0.2, 0.2         | off              | off      |
| dr_grpo | none  | seq-mean-token-sum-norm   | 0.04 | 0.2, 0.2         | off              | off      |
| dapo    | group | token-mean                | 0    | 0.2, 0.28        | on               | filter + soft punishment |

Dr. GRPO changes only what its paper names (no std division, a constant
length normaliser); β stays GRPO's so the comparison isolates those two.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxalign.algorithms.common import completion_logits, entropy_from_logits
from jaxalign.algorithms.rollout import (
    SamplingConfig,
    completion_stats,
    completion_width,
    concat_rows,
    make_logprob_fn,
    positions,
    sample,
)
from jaxalign.models import copy_tree
from jaxalign.losses import dynamic_sampling_mask, group_advantages, grpo_loss, overlong_penalty, token_logprobs

# Host-side helpers of the rollout, each one compiled program rather than a
# dozen eagerly dispatched ops (every eager op shape is its own compiled
# program, ~1.5 MB of resident memory each on XLA:CPU).
_advantages = jax.jit(group_advantages, static_argnums=1, static_argnames=("scale", "eps"))
_keep_groups = jax.jit(dynamic_sampling_mask, static_argnums=1, static_argnames="atol")
_overlong = jax.jit(overlong_penalty, static_argnames=("max_len", "cache_len"))


@dataclasses.dataclass(frozen=True)
class GroupConfig:
    """Options of the group-rollout algorithm (see the module table for presets).

    group_size: G samples per prompt. prompts_per_step: groups per batch.
    scale: `group_advantages` scale (`group`, `batch`, `none`).
    beta, kl: KL-to-reference weight and estimator; β = 0 loads no reference.
    agg: loss aggregation mode. clip_eps_low, clip_eps_high: ε_low, ε_high.
    mu: optimiser steps per rollout (ratio against the sampling policy).
    dynamic_sampling: keep only groups whose rewards differ, drawing more
      prompts until the batch is full or `max_sampling_rounds` is reached
      (unfilled groups are masked out, never duplicated).
    overlong_filter: truncated samples get zero loss weight.
    overlong_cache: L_cache of the soft overlong punishment (0 = off); the
      budget L_max is `sampling.max_new_tokens`.
    """

    group_size: int = 8
    prompts_per_step: int = 32
    sampling: SamplingConfig = SamplingConfig()
    scale: str = "group"
    beta: float = 0.04
    kl: str = "k3"
    agg: str = "seq-mean-token-mean"
    clip_eps_low: float = 0.2
    clip_eps_high: float | None = None
    mu: int = 1
    dynamic_sampling: bool = False
    max_sampling_rounds: int = 4
    overlong_filter: bool = False
    overlong_cache: int = 0


PRESETS = {
    "grpo": dict(scale="group", beta=0.04, kl="k3", agg="seq-mean-token-mean", clip_eps_low=0.2, clip_eps_high=None),
    "dr_grpo": dict(scale="none", beta=0.04, kl="k3", agg="seq-mean-token-sum-norm", clip_eps_low=0.2,
                    clip_eps_high=None),
    "dapo": dict(scale="group", beta=0.0, agg="token-mean", clip_eps_low=0.2, clip_eps_high=0.28,
                 dynamic_sampling=True, overlong_filter=True),
}


def preset(name: str, **overrides) -> GroupConfig:
    """`GroupConfig` of a named preset (`grpo`, `dr_grpo`, `dapo`) with overrides."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; valid: {sorted(PRESETS)}")
    return GroupConfig(**{**PRESETS[name], **overrides})


def make_group_loss_fn(cfg: GroupConfig):
    """`loss_fn(policy, batch, rng)` over a rollout batch, as `(numerator, denominator)`.

    batch: `tokens`, `attention_mask`, `positions`, `loss_mask` `[R, T]`;
    `old_logps`, `ref_logps` (when β > 0) `[R, T-1]`, or `[R, N]` for the last
    N (completion) columns only, which is what `GroupStep` passes: the LM head
    and softmax then skip the prompt; `advantages`, `weights` `[R]`.
    """
    temperature = cfg.sampling.temperature

    def loss_fn(policy, batch, rng):
        del rng
        width = batch["old_logps"].shape[1]
        last = None if width == batch["tokens"].shape[1] - 1 else width
        logits = completion_logits(policy, batch, last) / temperature
        logps = token_logprobs(logits, batch["tokens"][:, -width:])
        mask = batch["loss_mask"][:, -width:].astype(jnp.float32) * batch["weights"][:, None]
        parts, metrics = grpo_loss(logps, batch["old_logps"], batch.get("ref_logps"), batch["advantages"], mask,
                                   clip_eps_low=cfg.clip_eps_low, clip_eps_high=cfg.clip_eps_high, beta=cfg.beta,
                                   kl=cfg.kl, agg=cfg.agg, return_parts=True)
        metrics["entropy"] = entropy_from_logits(logits, mask)
        return parts, metrics

    return loss_fn


class GroupStep:
    """One on-policy step for the generic loop: `(state, prompt_batch) -> (state, metrics)`.

    Samples with the current params, scores with `reward_fn`, builds the
    rollout batch and runs `mu` calls of `train_step` on it. Extra prompts
    for dynamic sampling come from `prompts` (the loop's own iterator, so
    the checkpointed data position stays exact).

    The train step is compiled before the first rollout of each prompt
    width (`batch_like` gives the training batch's shapes up front), while
    the heap holds the least: no sampler or reference program and no rollout
    buffers yet, so the compiler's host-memory peak starts lower (measured
    in docs/training.md, "Memory of a step").
    """

    def __init__(self, cfg: GroupConfig, *, train_step, sampler, reward_fn, tokenizer, prompts,
                 reference_params=None, reference_model=None, seed: int = 0):
        if cfg.beta > 0 and reference_params is None:
            raise ValueError("beta > 0 needs the reference params")
        self.cfg, self.train_step, self.sampler = cfg, train_step, sampler
        self.reward_fn, self.tokenizer, self.prompts = reward_fn, tokenizer, prompts
        self.nan_policy = train_step.nan_policy
        # A copy: the train state may alias (and donate) the arrays the policy started from.
        self.ref_params = None if reference_params is None else copy_tree(reference_params)
        self.ref_logps = make_logprob_fn(reference_model, temperature=cfg.sampling.temperature) \
            if cfg.beta > 0 else None
        self.key = jax.random.PRNGKey(seed)
        self.eos_ids = (tokenizer.eos_token_id,)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self._compiled_widths: set[int] = set()

    def batch_like(self, prompt_batch: dict) -> dict:
        """Zeros shaped as the training batch `rollout` builds from `prompt_batch`.

        R = prompts_per_step * group_size rows of width T = P + N (the
        prompts' width and `max_new_tokens`):
        `tokens`, `attention_mask`, `positions`, `loss_mask` int32 `[R, T]`;
        `old_logps` (and `ref_logps` when β > 0) float32 `[R, N]`;
        `advantages`, `weights` float32 `[R]`. (A dynamic-sampling refill
        with wider prompts makes a wider batch.)
        """
        cfg = self.cfg
        rows, n = cfg.prompts_per_step * cfg.group_size, cfg.sampling.max_new_tokens
        width = np.shape(prompt_batch["prompt_tokens"])[1] + n
        batch = {k: np.zeros((rows, width), np.int32) for k in ("tokens", "attention_mask", "positions", "loss_mask")}
        batch["old_logps"] = np.zeros((rows, n), np.float32)
        batch["advantages"] = np.zeros(rows, np.float32)
        batch["weights"] = np.zeros(rows, np.float32)
        if self.ref_logps is not None:
            batch["ref_logps"] = np.zeros((rows, n), np.float32)
        return batch

    def _rewards(self, rollout) -> np.ndarray:
        rewards = np.asarray(self.reward_fn(rollout), np.float32)
        if self.cfg.overlong_cache:
            rewards = rewards + np.asarray(_overlong(
                np.asarray(rollout.lengths), max_len=self.cfg.sampling.max_new_tokens,
                cache_len=self.cfg.overlong_cache))
        return rewards

    def rollout(self, params, prompt_batch: dict, step: int) -> tuple[dict, dict]:
        """Sample, score and select groups; the training batch and rollout metrics."""
        cfg, g, want = self.cfg, self.cfg.group_size, self.cfg.prompts_per_step
        kept, drawn, rounds, first = [], 0, 0, None
        t0 = time.perf_counter()
        gen_tokens = 0
        while True:
            rng = jax.random.fold_in(jax.random.fold_in(self.key, step), rounds)
            rollout, arrays = sample(self.sampler, params, prompt_batch, n=g, cfg=cfg.sampling,
                                     eos_ids=self.eos_ids, pad_id=self.pad_id, rng=rng, tokenizer=self.tokenizer)
            rewards = self._rewards(rollout)
            arrays["rewards"] = rewards
            arrays["truncated"] = np.asarray(rollout.truncated)
            gen_tokens += int(np.sum(rollout.lengths))
            first = first or (rollout, rewards)
            n_groups = len(rewards) // g
            drawn += n_groups
            keep = np.asarray(_keep_groups(rewards, g)) if cfg.dynamic_sampling \
                else np.ones(n_groups, bool)
            rows = np.repeat(keep, g)
            kept.append({k: v[rows] for k, v in arrays.items()})
            rounds += 1
            have = sum(len(k["rewards"]) for k in kept) // g
            if not cfg.dynamic_sampling or have >= want or rounds >= cfg.max_sampling_rounds:
                break
            prompt_batch = next(self.prompts)
        batch = concat_rows(kept)
        have = len(batch["rewards"]) // g
        weights = np.ones(len(batch["rewards"]), np.float32)
        if have > want:
            batch = {k: v[: want * g] for k, v in batch.items()}
            weights = weights[: want * g]
        elif have < want:  # rounds ran out: pad with masked-out rows, never duplicates
            missing = (want - have) * g
            batch = {k: np.concatenate([v, np.zeros((missing,) + v.shape[1:], v.dtype)]) for k, v in batch.items()}
            weights = np.concatenate([weights, np.zeros(missing, np.float32)])
        if cfg.overlong_filter:
            weights = weights * (~batch["truncated"].astype(bool))
        adv = np.asarray(_advantages(batch["rewards"], g, scale=cfg.scale))
        all_rewards = first[1]
        groups = all_rewards.reshape(-1, g)
        metrics = {
            "reward_mean": float(all_rewards.mean()), "reward_std": float(all_rewards.std()),
            "zero_variance_groups": float(np.mean(groups.max(1) == groups.min(1))),
            "groups_drawn": float(drawn), "groups_kept": float(min(have, want)), "sampling_rounds": float(rounds),
            "gen_tokens_per_sec": gen_tokens / max(time.perf_counter() - t0, 1e-9),
            **completion_stats(first[0]),
        }
        # Only the completion columns are scored (the prompt's LM-head work is skipped).
        width = completion_width(batch["loss_mask"])
        train = {"tokens": batch["tokens"], "attention_mask": batch["attention_mask"],
                 "positions": positions(batch["attention_mask"]), "loss_mask": batch["loss_mask"],
                 "old_logps": batch["old_logps"][:, -width:], "advantages": adv.astype(np.float32),
                 "weights": weights}
        if self.ref_logps is not None:
            train["ref_logps"] = np.asarray(self.ref_logps(self.ref_params, train, last=width))
        return train, metrics

    def __call__(self, state, prompt_batch: dict):
        t0 = time.perf_counter()
        width = np.shape(prompt_batch["prompt_tokens"])[1]
        if width not in self._compiled_widths:  # before the rollout: see the class docstring
            self.train_step.compiled(state, self.batch_like(prompt_batch))
            self._compiled_widths.add(width)
        t_rollout = time.perf_counter()
        batch, metrics = self.rollout(state.params, prompt_batch, int(jax.device_get(state.step)))
        t1 = time.perf_counter()
        self.last_batch = batch
        for _ in range(self.cfg.mu):
            state, step_metrics = self.train_step(state, batch)
        metrics = {**step_metrics, **metrics}
        metrics["rollout_time_s"] = t1 - t_rollout
        metrics["step_time_s"] = time.perf_counter() - t0
        return state, metrics
