"""The built-in comparison (`make demo`): every algorithm on reversed-digit addition.

SFT a tiny Llama to partial accuracy -> label sampled answers with the
verifier (the stand-in for human raters) -> train a reward model -> run DPO,
PPO (reward model), GRPO, Dr. GRPO and DAPO (verifier) from the same SFT
checkpoint with the same number of optimiser steps.
"""

from ml_collections import ConfigDict

from experiments import comparison


def get_config():
    c = ConfigDict()
    # Where SFT lands is seed- and machine-sensitive: the held-out accuracy sits
    # near 9% until the model finds the digit alignment, then jumps within ~100
    # steps. Seed 1 jumps at ~850 steps on an AMD EPYC and ~2100 on an Intel Xeon
    # (the CPUs round differently); seed 2 on the Xeon only at ~6000. max_steps
    # is the safety net that lets every machine reach stop_at_accuracy.
    c.seed = 1
    c.seeds = 3  # the pipeline runs for seeds seed, seed + 1, ...; the table gives mean ± 95% CI
    c.workdir = "runs/demo"
    c.results = "results"
    # The prototype's model: d 128, 2 layers, 4 heads, MLP 512 (~0.4M params).
    c.model = ConfigDict(dict(family="llama", hidden_size=128, intermediate_size=512, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=4, head_dim=32,
                              max_position_embeddings=32))
    c.eval = ConfigDict(dict(prompts=1000, every=10, kl_prompts=500))
    c.sft = ConfigDict(dict(batch_size=64, lr=1e-3, max_steps=6000, eval_every=50, stop_at_accuracy=0.40,
                            train_problems=20000))
    c.pairs = ConfigDict(dict(prompts=4096, samples=8, reference_fallback=False))
    c.reward_model = ConfigDict(dict(steps=100, batch_size=64, lr=3e-4))
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
