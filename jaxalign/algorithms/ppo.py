"""PPO for RLHF (Ziegler et al. 2019; Ouyang et al. 2022): actor, critic, reference, reward.

Per step: sample completions with the actor, score them with the reward
function(s), form per-token rewards r_t = −β·(log π_old − log π_ref)_t plus
the score on the last completion token, estimate advantages with GAE on the
critic's values, then run `epochs` passes of `minibatches` clipped-ratio
updates of actor and critic together.

Implementation details followed (Huang et al. 2024, "The N Implementation
Details of RLHF with PPO"): reward-model scores normalised by the statistics
saved with the reward model; value head zero-initialised; logits divided by
the sampling temperature wherever log-probs are recomputed; the score sits
on the EOS (last generated) token, and completions that never emit EOS can
get a fixed penalty score (`no_eos_score`); advantages whitened per batch;
value loss clipped around the rollout's values; adaptive KL coefficient.
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxalign.algorithms.common import entropy_from_logits, model_logits
from jaxalign.algorithms.rollout import SamplingConfig, completion_stats, make_logprob_fn, positions, sample
from jaxalign.losses import (
    adaptive_kl_controller,
    fixed_kl_controller,
    gae,
    kl_penalty,
    ppo_policy_loss,
    ppo_value_loss,
    token_logprobs,
    whiten,
)
from jaxalign.models import Transformer, ValueModel, clone_model, copy_tree, with_value_head
from jaxalign.training import ModelDef


# The rollout's host-side math as single compiled programs (eager jnp ops would
# compile one small program per op and shape, ~1.5 MB of resident memory each).
@functools.partial(jax.jit, static_argnames="kind")
def _kl(old_logps, ref_logps, kind: str):
    return kl_penalty(old_logps, ref_logps, kind=kind)


@functools.partial(jax.jit, static_argnames=("gamma", "lam", "whiten_advantages"))
def _advantages(rewards, values, mask, gamma: float, lam: float, whiten_advantages: bool):
    adv, returns = gae(rewards, values, mask, gamma=gamma, lam=lam)
    return (whiten(adv, mask) if whiten_advantages else adv), returns


@dataclasses.dataclass(frozen=True)
class PPOConfig:
    """kl_coef: β of the per-token KL penalty; with `kl_target` set, the
    adaptive controller of Ziegler et al. steers it (horizon `kl_horizon`).
    critic: `separate` (a copy of the policy backbone with its own head) or
    `shared` (one backbone, two heads)."""

    prompts_per_step: int = 32
    samples_per_prompt: int = 1
    sampling: SamplingConfig = SamplingConfig()
    kl_coef: float = 0.05
    kl_target: float | None = None
    kl_horizon: int = 10000
    kl_estimator: str = "k1"
    gamma: float = 1.0
    lam: float = 0.95
    clip_eps_low: float = 0.2
    value_clip: float | None = 0.2
    vf_coef: float = 0.1
    epochs: int = 2
    minibatches: int = 1
    whiten_advantages: bool = True
    no_eos_score: float | None = None
    critic: str = "separate"


class ActorCritic(nnx.Module):
    """The trained pair: `actor` (a language model) and `critic` (a value model)."""

    def __init__(self, actor: Transformer, *, shared: bool = False):
        if shared:
            self.actor, self.critic = actor, with_value_head(actor)
        else:
            self.actor = actor
            self.critic = with_value_head(clone_model(actor))


def make_ppo_loss_fn(cfg: PPOConfig):
    """`loss_fn(actor_critic, batch, rng)`: policy loss + vf_coef · value loss, token-mean.

    batch: `tokens`, `attention_mask`, `positions`, `loss_mask` `[R, T]`;
    `old_logps`, `old_values`, `advantages`, `returns` `[R, T-1]`.
    """

    def loss_fn(ac: ActorCritic, batch, rng):
        del rng
        logits = model_logits(ac.actor, batch)[:, :-1] / cfg.sampling.temperature
        logps = token_logprobs(logits, batch["tokens"][:, 1:])
        values = ac.critic(batch["tokens"], positions=batch["positions"],
                           attention_mask=batch["attention_mask"])[:, :-1]
        mask = batch["loss_mask"][:, 1:].astype(jnp.float32)
        (pn, den), pm = ppo_policy_loss(logps, batch["old_logps"], batch["advantages"], mask,
                                        clip_eps_low=cfg.clip_eps_low, return_parts=True)
        (vn, _), vm = ppo_value_loss(values, batch["old_values"], batch["returns"], mask, clip=cfg.value_clip,
                                     return_parts=True)
        metrics = {**pm, **{f"value_{k}": v for k, v in vm.items()},
                   "policy_loss": (pn, den), "value_loss": (vn, den), "entropy": entropy_from_logits(logits, mask)}
        return (pn + cfg.vf_coef * vn, den), metrics

    return loss_fn


def _values_fn(critic: ValueModel):
    model_def, _ = ModelDef.of(critic)

    @jax.jit
    def fn(params, tokens, attention_mask):
        m = model_def.merge(params)
        return m(tokens, attention_mask=attention_mask)[:, :-1]

    return fn


class PPOStep:
    """One PPO iteration for the generic loop: `(state, prompt_batch) -> (state, metrics)`.

    `state.params` is the `ActorCritic` pure dict; `model` is the
    ActorCritic (for its structure), `reference` the frozen SFT policy.
    """

    def __init__(self, cfg: PPOConfig, *, train_step, model: ActorCritic, reference: Transformer,
                 reward_fn, tokenizer, sampler, seed: int = 0):
        self.cfg, self.train_step, self.sampler = cfg, train_step, sampler
        self.reward_fn, self.tokenizer = reward_fn, tokenizer
        self.nan_policy = train_step.nan_policy
        self.shared = model.critic.backbone is model.actor
        # A copy: the train state may alias (and donate) the arrays the policy started from.
        self.ref_params = copy_tree(nnx.to_pure_dict(nnx.state(reference, nnx.Param)))
        self.ref_logps = make_logprob_fn(reference, temperature=cfg.sampling.temperature)
        self.values = _values_fn(model.critic)
        self.kl_ctl = (adaptive_kl_controller(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)
                       if cfg.kl_target is not None else fixed_kl_controller(cfg.kl_coef))
        self.kl_state = self.kl_ctl.init()
        self.key = jax.random.PRNGKey(seed)
        self.eos_ids = (tokenizer.eos_token_id,)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def _critic_params(self, params):
        if self.shared:
            return {"backbone": params["actor"], "head": params["critic"]["head"]}
        return params["critic"]

    def rollout(self, params, prompt_batch: dict, step: int) -> tuple[dict, dict]:
        cfg = self.cfg
        t0 = time.perf_counter()
        rng = jax.random.fold_in(self.key, step)
        rollout, arrays = sample(self.sampler, params["actor"], prompt_batch, n=cfg.samples_per_prompt,
                                 cfg=cfg.sampling, eos_ids=self.eos_ids, pad_id=self.pad_id, rng=rng,
                                 tokenizer=self.tokenizer)
        gen_time = time.perf_counter() - t0
        scores = np.asarray(self.reward_fn(rollout), np.float32)
        if cfg.no_eos_score is not None:
            scores = np.where(rollout.truncated, cfg.no_eos_score, scores)
        batch = {"tokens": arrays["tokens"], "attention_mask": arrays["attention_mask"],
                 "positions": positions(arrays["attention_mask"]), "loss_mask": arrays["loss_mask"],
                 "old_logps": arrays["old_logps"]}
        mask = arrays["loss_mask"][:, 1:].astype(np.float32)
        ref = np.asarray(self.ref_logps(self.ref_params, batch))
        old_values = np.asarray(self.values(self._critic_params(params), batch["tokens"], batch["attention_mask"]))
        kl = np.asarray(_kl(batch["old_logps"], ref, kind=cfg.kl_estimator)) * mask
        beta = float(self.kl_state.kl_coef)
        last = mask.shape[1] - 1 - np.argmax(mask[:, ::-1], axis=1)  # last completion token of each row
        rewards = -beta * kl
        rewards[np.arange(len(last)), last] += scores
        adv, returns = _advantages(rewards, old_values, mask, gamma=cfg.gamma, lam=cfg.lam,
                                   whiten_advantages=cfg.whiten_advantages)
        batch.update(old_values=old_values, advantages=np.asarray(adv) * mask, returns=np.asarray(returns))
        seq_kl = kl.sum(1)
        self.kl_state = self.kl_ctl.update(self.kl_state, float(seq_kl.mean()), len(seq_kl))
        metrics = {"reward_mean": float(scores.mean()), "reward_std": float(scores.std()),
                   "kl_ref": float(seq_kl.mean()), "kl_coef": beta, "gen_time_s": gen_time,
                   **completion_stats(rollout)}
        return batch, metrics

    def __call__(self, state, prompt_batch: dict):
        cfg = self.cfg
        t0 = time.perf_counter()
        batch, metrics = self.rollout(state.params, prompt_batch, int(jax.device_get(state.step)))
        rows = batch["tokens"].shape[0]
        if rows % cfg.minibatches:
            raise ValueError(f"{rows} rollout rows do not split into {cfg.minibatches} minibatches")
        size = rows // cfg.minibatches
        order_rng = np.random.default_rng(int(jax.device_get(state.step)))
        for _ in range(cfg.epochs):
            order = order_rng.permutation(rows)
            for k in range(cfg.minibatches):
                idx = order[k * size:(k + 1) * size]
                self.last_batch = {key: v[idx] for key, v in batch.items()}
                state, step_metrics = self.train_step(state, self.last_batch)
        metrics = {**step_metrics, **metrics, "step_time_s": time.perf_counter() - t0}
        return state, metrics
