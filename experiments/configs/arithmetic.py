"""The built-in comparison (`make demo`): every algorithm on reversed-digit addition.

SFT a tiny Llama for a fixed number of steps -> label sampled answers with the
verifier (the stand-in for human raters) -> train a reward model -> run DPO,
PPO (reward model), GRPO, Dr. GRPO and DAPO (verifier) from the same SFT
checkpoint with the same number of optimiser steps.
"""

from ml_collections import ConfigDict

from experiments import comparison


def get_config():
    c = ConfigDict()
    c.seed = 1
    c.seeds = 3  # the pipeline runs for seeds seed, seed + 1, ...; the table gives mean ± 95% CI
    c.workdir = "runs/demo"
    c.results = "results"
    # The prototype's model: d 128, 2 layers, 4 heads, MLP 512 (~0.5M params). RoPE base 100, not 10,000:
    # sequences are 13 tokens, and faster-turning positions let SFT find the digit alignment sooner.
    c.model = ConfigDict(dict(family="llama", hidden_size=128, intermediate_size=512, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=4, head_dim=32,
                              max_position_embeddings=32, rope_theta=100.0))
    c.eval = ConfigDict(dict(prompts=1000, every=10, kl_prompts=500))
    # A fixed step budget, cosine-decayed to 0 (docs/comparison-recipe.md: every seed past 60% at that step).
    c.sft = ConfigDict(dict(batch_size=64, lr=2e-3, warmup_steps=30, steps=300, eval_every=100,
                            train_problems=20000))
    c.pairs = ConfigDict(dict(prompts=4096, samples=8, reference_fallback=False))
    # Bradley–Terry on the pairs; the reward is the answer's log-likelihood under an LM from the SFT weights.
    c.reward_model = ConfigDict(dict(steps=100, batch_size=64, lr=1e-4, warmup_steps=10, heldout_pairs=500))
    c.budget = ConfigDict(dict(steps=60, prompts_per_step=32))  # the same for every algorithm
    c.max_new_tokens = 6
    # Every run a config section (experiments/comparison.py): `--config.runs.dapo.algorithm.clip_eps_high=0.3`.
    # `algorithms` picks and orders them; `new_presets=True` adds GSPO, CISPO, RLOO and REINFORCE++.
    c.runs = ConfigDict(dict(
        dpo=comparison.dpo_run("DPO", 2e-5, beta=0.1),
        rpo=comparison.dpo_run("DPO + NLL (RPO)", 2e-5, beta=0.1, rpo_alpha=1.0),
        ppo_rm=comparison.onpolicy_run("PPO (reward model)", "ppo", 1e-4, reward="reward_model", beta=0.02),
        ppo=comparison.onpolicy_run("PPO (verifier)", "ppo", 1e-4, beta=0.02),
        grpo=comparison.onpolicy_run("GRPO", "grpo", 2e-4, group_size=8),
        dr_grpo=comparison.onpolicy_run("Dr. GRPO", "dr_grpo", 2e-4, group_size=8),
        dapo=comparison.onpolicy_run("DAPO", "dapo", 2e-4, group_size=8),
        gspo=comparison.onpolicy_run("GSPO", "gspo", 2e-4, group_size=8),
        cispo=comparison.onpolicy_run("CISPO", "cispo", 2e-4, group_size=8),
        rloo=comparison.onpolicy_run("RLOO", "rloo", 2e-4, group_size=8),
        reinforce_pp=comparison.onpolicy_run("REINFORCE++", "reinforce_pp", 2e-4, group_size=8),
    ))
    c.algorithms = "dpo,rpo,ppo_rm,ppo,grpo,dr_grpo,dapo"
    c.new_presets = False
    return c
