"""Algorithms as thin glue: a batch -> the arguments of a loss (forward passes of the
models it needs), and for the on-policy ones one driver. See docs/algorithms.md.

    sft.sft_loss_fn, reward_model.reward_loss_fn, dpo.make_dpo_loss_fn  (offline)
    onpolicy.build with onpolicy.preset("grpo" | "dr_grpo" | "dapo" | "gspo" | "cispo" | "rloo"
        | "reinforce_pp" | "ppo")  (on-policy; registries in registry.py, presets in config.py)
"""
