"""One driver for every on-policy algorithm; the algorithms are presets (`config.PRESETS`).

Per step:
  1. sample G completions for each of `prompts_per_step` prompts;
  2. score them (the reward function, then the shapers: a no-EOS score and
     the soft overlong punishment); with dynamic sampling, keep the groups
     whose scores differ and sample more prompts until the batch is full;
  3. recompute the old log-probs with the trainer's program (the sampler's
     are kept to measure and correct the mismatch), the reference's when
     β > 0, the critic's values for `gae`;
  4. advantages from the estimator named by `cfg.advantage` (the KL to the
     reference goes into the per-token reward with `kl_in_reward`);
  5. filters: overlong filter (row weights), `is_correction`;
  6. the training batch, laid out by `batch_layout`;
  7. `mu` passes of `minibatches` optimiser steps with the policy loss named
     by `cfg.policy_loss` (plus the value loss for a critic).
A step whose batch has no token left to train on makes no update and logs
`empty_batch` = 1.

`build` turns a config, a model and the task into a ready run.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import NamedTuple

import jax
import numpy as np
from flax import nnx

from jaxalign import training
from jaxalign.algorithms.common import completion_hidden
from jaxalign.algorithms.config import PRESETS, OnPolicyConfig, preset
from jaxalign.algorithms.ppo import ActorCritic, values_fn
from jaxalign.algorithms.registry import (
    ADVANTAGE_ESTIMATORS,
    POLICY_LOSSES,
    AdvantageInputs,
    per_token,
    register_advantage_estimator,
    register_policy_loss,
)
from jaxalign.algorithms.rollout import SamplingConfig, completion_stats, concat_rows, make_logprob_fn, positions, sample
from jaxalign.losses import (
    adaptive_kl_controller,
    dynamic_sampling_mask,
    fixed_kl_controller,
    importance_correction,
    kl_penalty,
    overlong_penalty,
    ppo_value_loss,
)
from jaxalign.models import clone_model, copy_tree
from jaxalign.models.lora import base_view, has_lora
from jaxalign.models.logprobs import head_logprobs
from jaxalign.sampling import Sampler

__all__ = ["ADVANTAGE_ESTIMATORS", "POLICY_LOSSES", "PRESETS", "AdvantageInputs", "OnPolicyConfig", "OnPolicyRun",
           "OnPolicyStep", "SamplingConfig", "batch_layout", "build", "make_loss_fn", "preset",
           "register_advantage_estimator", "register_policy_loss"]

# Host-side math of the rollout, each one compiled program (see registry.py).
_keep_groups = jax.jit(dynamic_sampling_mask, static_argnums=1, static_argnames="atol")
_overlong = jax.jit(overlong_penalty, static_argnames=("max_len", "cache_len"))
_kl = jax.jit(kl_penalty, static_argnames="kind")
_correction = jax.jit(importance_correction, static_argnames=("is_correction", "is_cap", "is_level"))


def _on_any_process(flag: bool) -> bool:
    """`flag` or-ed over the processes of a multi-host run, so that all of them skip an empty step
    together (each holds its own rows; the train step is one collective program)."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.asarray(flag))))


def batch_layout(cfg: OnPolicyConfig, sampling: SamplingConfig, prompt_width: int) -> dict[str, tuple]:
    """The training batch: `{name: (shape after the row axis, dtype)}`; what `rollout` builds and
    `batch_like` compiles ahead with.

    T = prompt_width + N columns of `[prompt ; completion]` (N = max_new_tokens):
    `tokens`, `attention_mask`, `positions` int32 `[T]`; `mask` (completion
    tokens that train, after the filters), `old_logps` float32 `[N]`;
    `advantages` `[]` or `[N]` (per the estimator); `ref_logps` `[N]` when the
    loss carries the KL; `is_weights` `[N]` with `tis`; `old_values`,
    `returns` `[N]` for a critic.
    """
    t, n = prompt_width + sampling.max_new_tokens, sampling.max_new_tokens
    layout = {k: ((t,), np.int32) for k in ("tokens", "attention_mask", "positions")}
    layout.update({k: ((n,), np.float32) for k in ("mask", "old_logps")})
    layout["advantages"] = ((n,) if per_token(cfg.advantage) else (), np.float32)
    if cfg.needs_reference and not cfg.kl_in_reward:
        layout["ref_logps"] = ((n,), np.float32)
    if cfg.is_correction == "tis":
        layout["is_weights"] = ((n,), np.float32)
    if cfg.uses_critic:
        layout.update({k: ((n,), np.float32) for k in ("old_values", "returns")})
    return layout


def make_loss_fn(cfg: OnPolicyConfig, sampling: SamplingConfig, *, logprob_chunk: int | None = None):
    """`loss_fn(model, batch, rng) -> ((numerator, denominator), metrics)` over a `batch_layout` batch.

    Only the N completion columns go through the LM head (`last=N`, fixed by
    the sampling config), `logprob_chunk` positions at a time
    (`jaxalign.models.logprobs.head_logprobs`: log-probs and entropies without
    the whole `[R, N, V]` logits). The model is the policy, or an
    `ActorCritic` when the config trains a critic (then + vf_coef · the
    token-mean value loss).
    """
    n, temperature = sampling.max_new_tokens, sampling.temperature
    policy_loss = POLICY_LOSSES[cfg.policy_loss]

    def loss_fn(model, batch, rng):
        del rng
        policy = model.actor if cfg.uses_critic else model
        logps, entropy = head_logprobs(policy, completion_hidden(policy, batch, n), batch["tokens"][:, -n:],
                                       temperature=temperature, logprob_chunk=logprob_chunk, entropy=True)
        (num, den), metrics = policy_loss(logps, batch, cfg, entropy)
        if not cfg.uses_critic:
            return (num, den), metrics
        values = model.critic(batch["tokens"], positions=batch["positions"],
                              attention_mask=batch["attention_mask"])[:, -n - 1:-1]
        (vn, _), vm = ppo_value_loss(values, batch["old_values"], batch["returns"], batch["mask"],
                                     clip=cfg.value_clip, return_parts=True)
        metrics = {**metrics, **{f"value_{k}": v for k, v in vm.items()},
                   "policy_loss": (num, den), "value_loss": (vn, den)}
        return (num + cfg.vf_coef * vn, den), metrics

    return loss_fn


class OnPolicyStep:
    """`(state, prompt_batch) -> (state, metrics)` for `training.train`.

    `model` is the trained module (the policy, or an `ActorCritic`);
    `reference` the frozen reference policy (used when β > 0). Extra prompts
    for dynamic sampling come from `prompts` (the loop's own iterator, so the
    checkpointed data position stays exact). The train step is compiled
    before the first rollout of each prompt width, while the heap holds the
    least (docs/training.md, "Memory of a step"). `logprob_chunk`: the old and
    reference log-probs' chunking (`make_loss_fn`).
    """

    def __init__(self, cfg: OnPolicyConfig, sampling: SamplingConfig, *, train_step, model, reward_fn, tokenizer,
                 prompts, reference=None, seed: int = 0, logprob_chunk: int | None = None):
        self.cfg, self.sampling, self.train_step = cfg, sampling, train_step
        self.reward_fn, self.tokenizer, self.prompts = reward_fn, tokenizer, prompts
        policy = model.actor if cfg.uses_critic else model
        self.shared_critic = cfg.uses_critic and model.critic.backbone is model.actor
        self.sampler = Sampler(policy)
        self.old_logps = make_logprob_fn(policy, temperature=sampling.temperature, logprob_chunk=logprob_chunk)
        self.ref_logps = self.ref_params = None
        if cfg.needs_reference and has_lora(policy):
            # The base with its adapters off, run on the policy's current params: no second copy.
            self.ref_logps = make_logprob_fn(base_view(policy), temperature=sampling.temperature,
                                             logprob_chunk=logprob_chunk)
        elif cfg.needs_reference:
            # A copy: the train state may alias (and donate) the arrays the policy started from.
            self.ref_params = copy_tree(nnx.to_pure_dict(nnx.state(reference, nnx.Param)))
            self.ref_logps = make_logprob_fn(reference, temperature=sampling.temperature,
                                             logprob_chunk=logprob_chunk)
        self.values = values_fn(model.critic) if cfg.uses_critic else None
        self.kl_ctl = (adaptive_kl_controller(cfg.beta, cfg.kl_target, cfg.kl_horizon)
                       if cfg.kl_target is not None else fixed_kl_controller(cfg.beta))
        self.kl_state = self.kl_ctl.init()
        self.key = jax.random.PRNGKey(seed)
        self.eos_ids = (tokenizer.eos_token_id,)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self._compiled_widths: set[int] = set()
        # Steps in a row that made no update: `state.step` did not move, so the sampling key must.
        self._empty_streak = 0

    @property
    def nan_policy(self) -> str:
        return self.train_step.nan_policy

    def policy_params(self, params):
        """The policy's params within the train state's params."""
        return params["actor"] if self.cfg.uses_critic else params

    def critic_params(self, params):
        if self.shared_critic:
            return {"backbone": params["actor"], "head": params["critic"]["head"]}
        return params["critic"]

    def batch_like(self, prompt_batch: dict) -> dict:
        """Zeros shaped as one optimiser step's batch for prompts as wide as `prompt_batch`'s."""
        rows = self.cfg.prompts_per_step * self.cfg.group_size // self.cfg.minibatches
        width = np.shape(prompt_batch["prompt_tokens"])[1]
        return {k: np.zeros((rows,) + shape, dtype)
                for k, (shape, dtype) in batch_layout(self.cfg, self.sampling, width).items()}

    def _scores(self, rollout) -> np.ndarray:
        scores = np.asarray(self.reward_fn(rollout), np.float32)
        if self.cfg.no_eos_score is not None:
            scores = np.where(rollout.truncated, np.float32(self.cfg.no_eos_score), scores)
        if self.cfg.overlong_cache:
            scores = scores + np.asarray(_overlong(np.asarray(rollout.lengths), max_len=self.sampling.max_new_tokens,
                                                   cache_len=self.cfg.overlong_cache))
        return scores.astype(np.float32)

    def _draw(self, params, prompt_batch: dict, step: int) -> tuple[dict, int, dict]:
        """Steps 1-2: sampled and scored rows (dynamic sampling keeps informative groups), padded
        with zero rows to the batch size; also the number of real rows and the rollout metrics."""
        cfg, g, want = self.cfg, self.cfg.group_size, self.cfg.prompts_per_step
        kept, drawn, rounds, first, gen_tokens = [], 0, 0, None, 0
        t0 = time.perf_counter()
        while True:
            key = jax.random.fold_in(self.key, step)
            if self._empty_streak:
                key = jax.random.fold_in(jax.random.fold_in(key, 2**31 - 1), self._empty_streak)
            rng = jax.random.fold_in(key, rounds)
            rollout, arrays = sample(self.sampler, params, prompt_batch, n=g, cfg=self.sampling,
                                     eos_ids=self.eos_ids, pad_id=self.pad_id, rng=rng, tokenizer=self.tokenizer)
            arrays["scores"] = scores = self._scores(rollout)
            arrays["truncated"] = np.asarray(rollout.truncated)
            gen_tokens += int(np.sum(rollout.lengths))
            first = first or (rollout, scores)
            drawn += len(scores) // g
            keep = np.asarray(_keep_groups(scores, g)) if cfg.dynamic_sampling else np.ones(len(scores) // g, bool)
            kept.append({k: v[np.repeat(keep, g)] for k, v in arrays.items()})
            rounds += 1
            have = sum(len(k["scores"]) for k in kept) // g
            if not cfg.dynamic_sampling or have >= want or rounds >= cfg.max_sampling_rounds:
                break
            prompt_batch = next(self.prompts)
        real = min(have, want) * g
        # Rounds ran out: pad with masked-out rows, never duplicates.
        batch = {k: np.concatenate([v[:real], np.zeros((want * g - real,) + v.shape[1:], v.dtype)])
                 for k, v in concat_rows(kept).items()}
        groups = first[1].reshape(-1, g)
        metrics = {"reward_mean": float(first[1].mean()), "reward_std": float(first[1].std()),
                   "zero_variance_groups": float(np.mean(groups.max(1) == groups.min(1))),
                   "groups_drawn": float(drawn), "groups_kept": float(real // g), "sampling_rounds": float(rounds),
                   "gen_tokens_per_sec": gen_tokens / max(time.perf_counter() - t0, 1e-9),
                   **completion_stats(first[0])}
        return batch, real, metrics

    def rollout(self, params, prompt_batch: dict, step: int) -> tuple[dict | None, dict]:
        """Steps 1-6: the training batch (None when no token is left to train on) and rollout metrics."""
        cfg, n = self.cfg, self.sampling.max_new_tokens
        drawn, real, metrics = self._draw(self.policy_params(params), prompt_batch, step)
        if not _on_any_process(real > 0):
            return None, metrics
        tokens, attention = drawn["tokens"], drawn["attention_mask"]
        completion = drawn["loss_mask"][:, -n:].astype(np.float32)
        model_in = {"tokens": tokens, "attention_mask": attention, "loss_mask": drawn["loss_mask"]}
        old = np.asarray(self.old_logps(self.policy_params(params), model_in, last=n))
        ref = None if self.ref_logps is None else np.asarray(self.ref_logps(
            self.policy_params(params) if self.ref_params is None else self.ref_params, model_in, last=n))
        values = None if self.values is None else \
            np.asarray(self.values(self.critic_params(params), tokens, attention))[:, -n:]
        beta, token_kl = float(self.kl_state.kl_coef), None
        if cfg.kl_in_reward and ref is not None:
            token_kl = np.asarray(_kl(old, ref, kind=cfg.kl)) * completion
            if real:  # (a process of a multi-host run may hold no row this step)
                seq_kl = token_kl[:real].sum(1)
                self.kl_state = self.kl_ctl.update(self.kl_state, float(seq_kl.mean()), real)
                metrics.update(kl_ref=float(seq_kl.mean()), beta=beta)
        inputs = AdvantageInputs(rewards=drawn["scores"][:real], mask=completion[:real], group_size=cfg.group_size,
                                 beta=beta, token_kl=None if token_kl is None else token_kl[:real],
                                 values=None if values is None else values[:real])
        out = ADVANTAGE_ESTIMATORS[cfg.advantage](inputs, cfg)
        adv, returns = out if cfg.uses_critic else (out, None)
        pad = lambda x: np.concatenate([x, np.zeros((len(tokens) - real,) + x.shape[1:], np.float32)])  # noqa: E731
        weights = (np.arange(len(tokens)) < real).astype(np.float32)
        if cfg.overlong_filter:
            weights = weights * ~drawn["truncated"].astype(bool)
        sampler = drawn["old_logps"][:, -n:]
        is_weights, mask, mismatch = _correction(old, sampler, completion * weights[:, None],
                                                 is_correction=cfg.is_correction, is_cap=cfg.is_cap,
                                                 is_level=cfg.is_level)
        metrics.update({k: float(v) for k, v in mismatch.items()})
        mask = np.asarray(mask)
        if not _on_any_process(mask.any()):
            return None, metrics
        fields = {"tokens": tokens, "attention_mask": attention, "positions": positions(attention), "mask": mask,
                  "old_logps": old, "advantages": pad(np.asarray(adv, np.float32)), "ref_logps": ref,
                  "is_weights": np.asarray(is_weights), "old_values": values,
                  "returns": None if returns is None else pad(np.asarray(returns, np.float32))}
        layout = batch_layout(cfg, self.sampling, tokens.shape[1] - n)
        batch = {k: np.asarray(fields[k], dtype) for k, (_, dtype) in layout.items()}
        for k, (shape, _) in layout.items():
            if batch[k].shape != (len(tokens),) + shape:
                raise ValueError(f"training batch field {k!r} has shape {batch[k].shape}, "
                                 f"layout says {(len(tokens),) + shape}")
        return batch, metrics

    def __call__(self, state, prompt_batch: dict):
        cfg, t0 = self.cfg, time.perf_counter()
        width = np.shape(prompt_batch["prompt_tokens"])[1]
        if width not in self._compiled_widths:  # before the rollout: see the class docstring
            self.train_step.compiled(state, self.batch_like(prompt_batch))
            self._compiled_widths.add(width)
        step, t_rollout = int(jax.device_get(state.step)), time.perf_counter()
        batch, metrics = self.rollout(state.params, prompt_batch, step)
        metrics["rollout_time_s"] = time.perf_counter() - t_rollout
        metrics["empty_batch"] = float(batch is None)
        self._empty_streak = self._empty_streak + 1 if batch is None else 0
        if batch is None:
            # No update, and nothing non-finite: the loop's NaN check must not fire.
            metrics.update(finite=True, step_time_s=time.perf_counter() - t0)
            return state, metrics
        rows = len(batch["tokens"])
        size = rows // cfg.minibatches
        order_rng = np.random.default_rng(step)
        for _ in range(cfg.mu):
            if cfg.minibatches == 1:
                state, step_metrics = self.train_step(state, batch)
                continue
            order = order_rng.permutation(rows)
            for k in range(cfg.minibatches):
                idx = order[k * size:(k + 1) * size]
                state, step_metrics = self.train_step(state, {key: v[idx] for key, v in batch.items()})
        metrics = {**step_metrics, **metrics, "step_time_s": time.perf_counter() - t0}
        return state, metrics


class OnPolicyRun(NamedTuple):
    """What `build` returns. step: the step function for `training.train`; state: the initial
    train state; policy_params / policy_module / trained_module: functions of `state.params`."""

    step: OnPolicyStep
    state: training.TrainState
    policy_params: Callable
    policy_module: Callable
    trained_module: Callable


def build(cfg: OnPolicyConfig, sampling: SamplingConfig, model, *, tokenizer, reward_fn, prompts, optimizer,
          mesh=None, seed: int = 0, reference=None, train_options: dict | None = None,
          logprob_chunk: int | None = None) -> OnPolicyRun:
    """A ready on-policy run of `model` (a language model `Transformer`).

    reference: the frozen reference policy, used when β > 0; None then means
      a copy of `model` as given. β = 0 loads none.
    prompts: the prompt iterator of the loop (dynamic sampling draws from it).
    train_options: keywords of `training.make_train_step` (`micro_batches`,
      `nan_policy`, `split_update`).
    logprob_chunk: positions per chunk of the LM head and softmax, in the
      loss and the old/reference log-probs (`jaxalign.models.logprobs.head_logprobs`;
      None: automatic, 0: all at once).
    """
    if cfg.needs_reference and reference is None and not has_lora(model):
        reference = clone_model(model)
    trained = ActorCritic(model, shared=cfg.critic == "shared") if cfg.uses_critic else model
    state, model_def = training.init_train_state(trained, optimizer, mesh=mesh, seed=seed)
    loss_fn = make_loss_fn(cfg, sampling, logprob_chunk=logprob_chunk)
    train_step = training.make_train_step(loss_fn, optimizer, model_def=model_def,
                                          shardings=training.state_shardings(state), **(train_options or {}))
    step = OnPolicyStep(cfg, sampling, train_step=train_step, model=trained, reward_fn=reward_fn,
                        tokenizer=tokenizer, prompts=prompts, reference=reference if cfg.needs_reference else None,
                        seed=seed, logprob_chunk=logprob_chunk)
    policy_of = (lambda m: m.actor) if cfg.uses_critic else (lambda m: m)
    return OnPolicyRun(step, state, step.policy_params, lambda p: policy_of(model_def.merge(p)),
                       model_def.merge)

