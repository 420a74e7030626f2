"""The on-policy algorithms as rows of one table: a preset is a name for a set of config fields.

| preset       | advantage    | policy_loss | agg                     | β    | KL (estimator, where) | clip ε low, high | other |
|--------------|--------------|-------------|-------------------------|------|-----------------------|------------------|-------|
| grpo         | group        | ppo_clip    | seq-mean-token-mean     | 0.04 | k3, loss              | 0.2, 0.2         |       |
| dr_grpo      | none         | ppo_clip    | seq-mean-token-sum-norm | 0.04 | k3, loss              | 0.2, 0.2         |       |
| dapo         | group        | ppo_clip    | token-mean              | 0    | –                     | 0.2, 0.28        | dynamic sampling, overlong filter |
| gspo         | group        | gspo        | (sequence mean)         | 0    | –                     | 3e-4, 4e-4       |       |
| cispo        | group        | cispo       | token-mean              | 0    | –                     | none, 0.28       |       |
| rloo         | rloo         | ppo_clip    | token-mean              | 0    | –                     | 0.2, 0.2         |       |
| reinforce_pp | reinforce_pp | ppo_clip    | token-mean              | 0.01 | k1, reward            | 0.2, 0.2         |       |
| ppo          | gae          | ppo_clip    | token-mean              | 0.05 | k1, reward            | 0.2, 0.2         | critic, G = 1, μ = 2 |

Papers: GRPO (Shao et al. 2024), Dr. GRPO (Liu et al. 2025), DAPO (Yu et al.
2025), GSPO (Zheng et al. 2025), CISPO (MiniMax-M1, 2025), RLOO (Ahmadian et
al. 2024), REINFORCE++ (Hu 2025), PPO for RLHF (Ziegler et al. 2019; Ouyang et
al. 2022). Dr. GRPO changes only what its paper names (no std division, a
constant length normaliser); β stays GRPO's so a comparison isolates those two.
"""

from __future__ import annotations

import dataclasses

from jaxalign.losses import AGGREGATIONS, IS_CORRECTIONS, KL_ESTIMATORS


@dataclasses.dataclass(frozen=True)
class OnPolicyConfig:
    """Every option of the on-policy driver; field names are the loss keywords.

    advantage: advantage estimator, a name in `registry.ADVANTAGE_ESTIMATORS`.
    policy_loss: a name in `registry.POLICY_LOSSES`.
    group_size: G samples per prompt. prompts_per_step: prompts per step
      (a rollout has prompts_per_step · G rows).
    mu: passes over each rollout (GRPO's μ, PPO's epochs); after the first,
      the ratio is taken against the policy that sampled.
    minibatches: optimiser steps per pass, each on a shuffled share of the rows.
    beta, kl: KL-to-reference weight β and estimator (`k1`, `k2`, `k3`);
      β = 0 loads no reference model.
    kl_in_reward: put −β·KL_t into the per-token reward (PPO, REINFORCE++)
      instead of the loss.
    kl_target, kl_horizon: with `kl_in_reward`, steer β towards a target KL
      per sequence (Ziegler et al. 2019); None keeps β fixed.
    agg: loss reduction (`jaxalign.losses.AGGREGATIONS`).
    clip_eps_low, clip_eps_high: ε_low and ε_high of the ratio clip
      (ε_high None = ε_low; CISPO: ε_low None = no lower bound).
    entropy_coef: weight of the entropy bonus in the policy loss.
    dynamic_sampling: keep only groups whose rewards differ, drawing more
      prompts until the batch is full or `max_sampling_rounds` is reached
      (unfilled rows are masked out, never duplicated).
    overlong_filter: truncated samples get zero loss weight.
    overlong_cache: L_cache of the soft overlong punishment added to the
      reward (0 = off); the budget L_max is the sampling's `max_new_tokens`.
    no_eos_score: the score of a completion that never emits EOS (None: the
      reward function's own).
    is_correction: rollout/trainer mismatch correction, `none`, `tis`
      (truncated importance weights) or `mis` (masking); see
      `jaxalign.losses.importance_correction`.
    is_cap: C, the cap of `tis` and the band [1/C, C] of `mis`.
    is_level: `token` or `sequence` ratios for `tis` / `mis`.
    critic: for `advantage="gae"`: `separate` (a copy of the policy backbone
      with its own value head) or `shared` (one backbone, two heads).
    gamma, lam: GAE's γ and λ. whiten_advantages: whiten GAE advantages per batch.
    value_clip: clip of the value loss around the rollout's values (None = off).
    vf_coef: weight of the value loss.
    """

    advantage: str = "group"
    policy_loss: str = "ppo_clip"
    group_size: int = 8
    prompts_per_step: int = 32
    mu: int = 1
    minibatches: int = 1
    beta: float = 0.04
    kl: str = "k3"
    kl_in_reward: bool = False
    kl_target: float | None = None
    kl_horizon: int = 10000
    agg: str = "seq-mean-token-mean"
    clip_eps_low: float | None = 0.2
    clip_eps_high: float | None = None
    entropy_coef: float = 0.0
    dynamic_sampling: bool = False
    max_sampling_rounds: int = 4
    overlong_filter: bool = False
    overlong_cache: int = 0
    no_eos_score: float | None = None
    is_correction: str = "none"
    is_cap: float = 2.0
    is_level: str = "token"
    critic: str = "separate"
    gamma: float = 1.0
    lam: float = 0.95
    whiten_advantages: bool = True
    value_clip: float | None = 0.2
    vf_coef: float = 0.1

    def __post_init__(self):
        from jaxalign.algorithms.registry import ADVANTAGE_ESTIMATORS, POLICY_LOSSES, per_token

        choices = {"advantage": ADVANTAGE_ESTIMATORS, "policy_loss": POLICY_LOSSES, "kl": KL_ESTIMATORS,
                   "agg": AGGREGATIONS, "is_correction": IS_CORRECTIONS, "is_level": ("token", "sequence"),
                   "critic": ("separate", "shared")}
        for name, valid in choices.items():
            if getattr(self, name) not in valid:
                raise ValueError(f"algorithm.{name}={getattr(self, name)!r}; valid: {sorted(valid)}")
        for name in ("group_size", "prompts_per_step", "mu", "minibatches", "max_sampling_rounds"):
            if getattr(self, name) < 1:
                raise ValueError(f"algorithm.{name}={getattr(self, name)} must be >= 1")
        if self.prompts_per_step * self.group_size % self.minibatches:
            raise ValueError(f"algorithm.minibatches={self.minibatches} does not divide the "
                             f"{self.prompts_per_step * self.group_size} rows of a rollout")
        if self.kl_target is not None and not self.kl_in_reward:
            raise ValueError("algorithm.kl_target steers the KL in the reward: it needs kl_in_reward=True")
        if self.is_cap < 1:
            raise ValueError(f"algorithm.is_cap={self.is_cap} must be >= 1 (the band is [1/C, C])")
        if self.clip_eps_low is None and self.policy_loss != "cispo":
            raise ValueError(f"algorithm.clip_eps_low=None (no lower bound) is CISPO's; "
                             f"policy_loss {self.policy_loss!r} needs a number")
        if self.beta > 0 and not self.kl_in_reward and self.policy_loss != "ppo_clip":
            raise ValueError(f"algorithm.policy_loss={self.policy_loss!r} has no KL term: set beta=0 or kl_in_reward=True")
        if self.uses_critic and self.agg != "token-mean":
            raise ValueError(f"algorithm.advantage='gae' adds a token-mean value loss: agg must be 'token-mean', "
                             f"got {self.agg!r}")
        if self.policy_loss == "gspo" and per_token(self.advantage):
            raise ValueError(f"algorithm.policy_loss='gspo' takes one advantage per sequence; "
                             f"advantage {self.advantage!r} gives one per token")

    @property
    def uses_critic(self) -> bool:
        return self.advantage == "gae"

    @property
    def needs_reference(self) -> bool:
        return self.beta > 0


PRESETS: dict[str, dict] = {
    "grpo": dict(advantage="group", agg="seq-mean-token-mean", beta=0.04, kl="k3"),
    "dr_grpo": dict(advantage="none", agg="seq-mean-token-sum-norm", beta=0.04, kl="k3"),
    "dapo": dict(advantage="group", agg="token-mean", beta=0.0, clip_eps_high=0.28, dynamic_sampling=True,
                 overlong_filter=True),
    "gspo": dict(advantage="group", policy_loss="gspo", agg="token-mean", beta=0.0, clip_eps_low=3e-4,
                 clip_eps_high=4e-4),
    "cispo": dict(advantage="group", policy_loss="cispo", agg="token-mean", beta=0.0, clip_eps_low=None,
                  clip_eps_high=0.28),
    "rloo": dict(advantage="rloo", agg="token-mean", beta=0.0),
    "reinforce_pp": dict(advantage="reinforce_pp", agg="token-mean", beta=0.01, kl="k1", kl_in_reward=True),
    "ppo": dict(advantage="gae", agg="token-mean", beta=0.05, kl="k1", kl_in_reward=True, group_size=1, mu=2),
}


def preset(name: str, **overrides) -> OnPolicyConfig:
    """The `OnPolicyConfig` of a row of `PRESETS`, with `overrides` on top."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; valid: {sorted(PRESETS)}")
    fields = {f.name for f in dataclasses.fields(OnPolicyConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown algorithm field(s) {unknown}; valid: {sorted(fields)}")
    return OnPolicyConfig(**{**PRESETS[name], **overrides})
