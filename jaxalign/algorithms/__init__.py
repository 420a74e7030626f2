"""Algorithms as thin glue: a batch -> the arguments of a loss (forward passes of the
models it needs), and for the on-policy ones the rollout phase. See docs/algorithms.md.

    sft.sft_loss_fn, reward_model.reward_loss_fn, dpo.make_dpo_loss_fn  (offline)
    ppo.PPOStep, group.GroupStep with group.preset("grpo" | "dr_grpo" | "dapo")  (on-policy)
"""
